"""Forward model of one tomogram: where each particle projects, what its box shows, what it should show.

Normalisation: a prediction is ``g sqrt(s) D_f(k) F_h(M^T k)`` where ``F_h`` is the unitary 3D FT of
the prepared half map (:mod:`tomoctfrefine.reference`), ``D_f`` the dose weight and ``g = 1.02``. The
factor ``sqrt(s)`` makes it the unitary 2D FT of the projection of the map (sum along the beam), and
``g`` undoes the ``1/(1 + 0.02)`` that RELION's presharpening leaves near the particle centre, so the
contrast scale fitted against observations is the scale of the images relative to the map's
projection, independent of the box (checked against the project's simulator: 1.000 at boxes 160 and
224). RELION omits both factors: its ``rlnCtfScalefactor`` is ``sqrt(s)/1.02`` times ours.

Contrast: raw tilt images show density dark, so the observation model is
``o ~ -c * CTF * prediction = c * sin(gamma) * prediction`` (spec pitfall 1); :func:`predict` returns
the prediction with positive contrast (the projection of the reference).

The tomogram argument is any object with the attributes of :class:`tomoctfrefine.io.Tomogram`
(optics, pixel_size_angstrom, size_px, image_size_px, hand, defocus_slope, projection_matrices,
defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, ctf_bfactor_angstrom2, phase_shift_deg,
pre_exposure_e_per_angstrom2, bfactor_per_electron_dose_angstrom2).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft

from . import kernels
from .physics.ctf import ctf_envelope, ctf_gamma
from .physics.dose import dose_weight
from .physics.geometry import depth_defocus_offset_angstrom, fourier_grid_per_angstrom, project, visible
from .physics.zernike import even_phase_rad
from .reference import PreparedReferences


def prediction_normalisation(box_size_px: int) -> float:
    """``1.02 sqrt(s)``: turns a central slice of the prepared unitary 3D FT into the unitary 2D FT of
    the projection (see the module docstring)."""
    from .reference import PRESHARPEN_EPSILON

    return float(np.sqrt(box_size_px) * (1.0 + PRESHARPEN_EPSILON))


def image_positions_px(tomogram, positions_px: np.ndarray, trajectory_shifts_angstrom: np.ndarray | None = None) -> np.ndarray:
    """Projected position of every particle in every tilt, ``(n_particles, n_tilts, 3)``: image x, y (px)
    and depth (px). ``trajectory_shifts_angstrom`` ``(n_particles, n_tilts, 3)`` is added per tilt
    (``pos_f = pos + shift_f / p``)."""
    projected = project(tomogram.projection_matrices, positions_px)
    if trajectory_shifts_angstrom is not None:
        shifts_px = np.asarray(trajectory_shifts_angstrom, dtype=float) / tomogram.pixel_size_angstrom
        rotation = np.asarray(tomogram.projection_matrices)[:, :3, :3]
        projected = projected + np.einsum("fij,pfj->pfi", rotation, shifts_px)
    return projected


def visibility(tomogram, image_positions: np.ndarray, box_size_px: int) -> np.ndarray:
    """RELION's strict visibility: the box lies inside the tilt image, ``(n_particles, n_tilts)`` bool."""
    return visible(image_positions[..., :2], box_size_px, tuple(tomogram.image_size_px))


def depth_defocus_angstrom(tomogram, positions_px: np.ndarray, hand: float | None = None) -> np.ndarray:
    """Defocus offset of each particle in each tilt from its depth, ``(n_particles, n_tilts)`` Å
    (``hand * p * slope * dz``; added to U and V of the tilt's central CTF)."""
    return depth_defocus_offset_angstrom(
        tomogram.projection_matrices,
        positions_px,
        tuple(tomogram.size_px),
        tomogram.hand if hand is None else hand,
        tomogram.pixel_size_angstrom,
        getattr(tomogram, "defocus_slope", 1.0),
    )


def _per_tilt(tomogram, name: str, default: float) -> np.ndarray:
    values = getattr(tomogram, name, None)
    n_tilts = len(tomogram.projection_matrices)
    if values is None:
        return np.full(n_tilts, default)
    return np.broadcast_to(np.asarray(values, dtype=float), (n_tilts,))


@lru_cache(maxsize=8)
def _even_phase(box_size_px: int, pixel_size_angstrom: float, coefficients: tuple) -> np.ndarray:
    """The even aberration phase on the ``rfft2`` grid (read-only): the same for every tilt, so made once
    per box and coefficients (callers ask for it tilt by tilt)."""
    fx, fy = fourier_grid_per_angstrom(box_size_px, pixel_size_angstrom)
    phase = even_phase_rad(list(coefficients), fx, fy)
    phase.flags.writeable = False
    return phase


def tilt_gamma(tomogram, box_size_px: int, even_zernike: np.ndarray | list = (), tilts=None) -> np.ndarray:
    """CTF phase of each tilt at the tomogram centre incl. the even aberration phase,
    ``(n_tilts, s, s//2+1)`` (or only ``tilts``); a particle at depth offset ``dz`` has
    ``gamma - pi lambda dz |k|^2``."""
    fx, fy = fourier_grid_per_angstrom(box_size_px, tomogram.pixel_size_angstrom)
    coefficients = tuple(float(c) for c in (() if even_zernike is None else even_zernike))
    even = _even_phase(int(box_size_px), float(tomogram.pixel_size_angstrom), coefficients) if any(coefficients) else 0.0
    phase_shift = _per_tilt(tomogram, "phase_shift_deg", 0.0)
    tilts = range(len(phase_shift)) if tilts is None else tilts
    return np.stack([
        ctf_gamma(tomogram.defocus_u_angstrom[f], tomogram.defocus_v_angstrom[f], tomogram.defocus_angle_deg[f],
                  tomogram.optics, fx, fy, phase_shift_deg=phase_shift[f], even_phase_rad=even)
        for f in tilts
    ])


def tilt_damping(tomogram, box_size_px: int, tilts=None) -> np.ndarray:
    """Dose weight times the tilt's CTF B-factor envelope, ``(n_tilts, s, s//2+1)``.

    RELION leaves the B-factor out of the per-pixel statistics but puts it in the scale fit; we put it
    in the prediction everywhere (it is part of the CTF), which changes nothing when B = 0.
    """
    fx, fy = fourier_grid_per_angstrom(box_size_px, tomogram.pixel_size_angstrom)
    k = np.hypot(fx, fy)
    per_dose = float(getattr(tomogram, "bfactor_per_electron_dose_angstrom2", 0.0) or 0.0)
    bfactors = _per_tilt(tomogram, "ctf_bfactor_angstrom2", 0.0)
    tilts = range(len(bfactors)) if tilts is None else tilts
    return np.stack([
        dose_weight(tomogram.pre_exposure_e_per_angstrom2[f], k, per_dose) * (ctf_envelope(bfactors[f], fx, fy) if bfactors[f] else 1.0)
        for f in tilts
    ])


def particle_matrices(tomogram, rotations: np.ndarray) -> np.ndarray:
    """``M = P_3x3 A`` for every particle and tilt, ``(n_particles, n_tilts, 3, 3)``: maps reference
    coordinates to (image x, image y, depth); the slice samples the reference FT at ``M^T k``."""
    return np.einsum("fij,pjk->pfik", np.asarray(tomogram.projection_matrices)[:, :3, :3], rotations)


def box_origins_and_shifts(image_positions: np.ndarray, box_size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer box origin ``round(c) - s/2`` and sub-pixel remainder ``c - round(c)`` of 2D positions ``c``."""
    centre = np.asarray(image_positions)[..., :2]
    rounded = np.floor(centre + 0.5)
    return (rounded - box_size_px // 2).astype(np.int64), centre - rounded


def observe(image: np.ndarray, image_positions: np.ndarray, box_size_px: int, workers: int = -1) -> np.ndarray:
    """Unitary FTs of the boxes at ``image_positions`` ``(m, 2+)`` in one tilt image, centred so that
    the particle centre is the origin (edge clamp, cropCircle taper, sub-pixel phase), ``(m, s, s//2+1)``."""
    origins, shifts = box_origins_and_shifts(image_positions, box_size_px)
    boxes = np.empty((len(origins), box_size_px, box_size_px), dtype=np.float32)
    kernels.extract_boxes(np.ascontiguousarray(image, dtype=np.float32), origins, boxes)
    spectra = scipy.fft.rfft2(boxes, norm="ortho", workers=workers).astype(np.complex64, copy=False)
    kernels.shift_observations(spectra, np.ascontiguousarray(shifts, dtype=np.float64), spectra)
    return spectra


@dataclass(frozen=True)
class Observations:
    """Observed box FTs of one tomogram.

    Attributes
    ----------
    spectra : complex64 (n_particles, n_tilts, s, s//2+1)   zero where not visible
    visible : bool (n_particles, n_tilts)
    image_positions : float (n_particles, n_tilts, 3)
    """

    spectra: np.ndarray
    visible: np.ndarray
    image_positions: np.ndarray


def extract_observations(
    tilt_images: np.ndarray,
    tomogram,
    positions_px: np.ndarray,
    box_size_px: int,
    trajectory_shifts_angstrom: np.ndarray | None = None,
) -> Observations:
    """Observed boxes of every particle in every tilt (for tests and diagnostics: holds all boxes;
    :func:`tomoctfrefine.statistics.compute_statistics` streams instead)."""
    positions = image_positions_px(tomogram, positions_px, trajectory_shifts_angstrom)
    seen = visibility(tomogram, positions, box_size_px)
    n_particles, n_tilts = seen.shape
    spectra = np.zeros((n_particles, n_tilts, box_size_px, box_size_px // 2 + 1), dtype=np.complex64)
    for f in range(n_tilts):
        rows = np.nonzero(seen[:, f])[0]
        if len(rows):
            spectra[rows, f] = observe(tilt_images[f], positions[rows, f], box_size_px)
    return Observations(spectra, seen, positions)


def predict(
    references: PreparedReferences,
    tomogram,
    rotations: np.ndarray,
    half_sets: np.ndarray,
    positions_px: np.ndarray | None = None,
    box_size_px: int | None = None,
) -> np.ndarray:
    """CTF-free, dose-weighted predictions ``1.02 sqrt(s) D_f F_h(M^T k)`` of every particle in every tilt,
    ``(n_particles, n_tilts, s, s//2+1)`` complex64, centred at the origin.

    Equal to the unitary 2D FT of the (dose-filtered) projection of the particle's own half map, so a
    tilt image with contrast scale c shows ``-c CTF * prediction`` (raw images: dark density).
    ``positions_px`` is not needed (the predictions are centred); it is accepted for symmetry with
    :func:`extract_observations`. ``half_sets`` holds RELION's ``rlnRandomSubset`` values (1 or 2).
    """
    s = references.box_size_px if box_size_px is None else box_size_px
    if s != references.box_size_px:
        raise ValueError(f"references were prepared for box {references.box_size_px}, not {s}")
    matrices = particle_matrices(tomogram, np.asarray(rotations, dtype=float))
    n_particles, n_tilts = matrices.shape[:2]
    halves = np.repeat(np.asarray(half_sets, dtype=np.int64) - 1, n_tilts)
    out = np.empty((n_particles * n_tilts, s, s // 2 + 1), dtype=np.complex64)
    kernels.central_slices(references.bricks, references.grid_size, halves, np.ascontiguousarray(matrices.reshape(-1, 3, 3)),
                           float(references.max_radius_px) ** 2, out)
    out = out.reshape(n_particles, n_tilts, s, s // 2 + 1)
    damping = tilt_damping(tomogram, s)
    out *= (prediction_normalisation(s) * damping[None]).astype(np.float32)
    return out


def row_range_mask(weights: np.ndarray, damping: np.ndarray, cutoff_fraction: float = 0.02) -> np.ndarray:
    """RELION's per-row frequency ranges (spec 5.3) as a mask ``(n_tilts, s, s//2+1)``.

    Row y of tilt f keeps ``x < X_f(y)``, ``X_f(y) = 1 + max{x <= sqrt(s²/4 - ky²) : W/mean(W) > tau and
    D > tau}``. Multiply it into the weights to reproduce RELION's pixel set.
    """
    weights = np.asarray(weights, dtype=float)
    n_tilts, s, sh = damping.shape
    weights = np.broadcast_to(weights, damping.shape)
    ky = np.fft.fftfreq(s, 1.0 / s)
    x = np.arange(sh)
    limit = np.sqrt(np.maximum(s * s / 4.0 - ky**2, 0.0))
    mask = np.zeros(damping.shape, dtype=bool)
    for f in range(n_tilts):
        mean = weights[f].mean()
        good = (weights[f] / mean > cutoff_fraction) & (damping[f] > cutoff_fraction) & (x[None, :] <= limit[:, None])
        last = np.where(good.any(axis=1), sh - 1 - np.argmax(good[:, ::-1], axis=1), -1)
        mask[f] = x[None, :] <= last[:, None]
    return mask


def crop_circle_taper(box_size_px: int) -> np.ndarray:
    """RELION's cropCircle weight of a box ``(s, s)``: 1 inside ``s/2 - 5``, cosine edge to 0 at ``s/2``
    (centre ``(s/2, s/2)``)."""
    s = box_size_px
    yy, xx = np.mgrid[0:s, 0:s] - s / 2.0
    r = np.hypot(xx, yy)
    edge = np.where(r < s / 2.0, 0.5 - 0.5 * np.cos(np.pi * (s / 2.0 - r) / 5.0), 0.0)
    return np.where(r < s / 2.0 - 5.0, 1.0, edge)


def box_noise_fraction(box_size_px: int) -> float:
    """Noise power of an observed (cropCircle-tapered) box relative to the tile periodogram that the
    noise weights are made from: ``mean(taper^2)``, about ``pi/4`` (0.74 at s = 128).

    White noise of power ``P`` per unitary Fourier pixel has power ``P * box_noise_fraction(s)`` per
    pixel of ``o`` (so ``E[w |o|^2] = box_noise_fraction`` for pure noise: expect that in residual
    checks). The taper also correlates neighbouring Fourier pixels; for a signal inside the circle the
    two effects cancel, and ``w = 1/P`` used as if pixels were independent gives the right Fisher
    information (real space: the data are the unit-weight pixels inside the circle). Signal that
    the CTF delocalises beyond ``s/2`` is lost to the taper; :func:`windowed_predictions` models that
    loss (without it the fixture's scale dropped by 17 % at box 64, 3.3 µm defocus).
    """
    return float(np.mean(crop_circle_taper(box_size_px) ** 2))


# ---------------------------------------------------------------------------------------------
# Delocalisation: the CTF spreads each particle's signal over lambda * defocus * |k| around it. Where
# that reaches the tapered edge of the box, the observation is a *windowed* CTF-filtered projection,
# not the periodic product CTF x slice; the model must be windowed the same way.

#: The cropCircle taper starts this far inside the box radius (``extract_boxes``).
TAPER_EDGE_PX = 5.0


def particle_radius_px(references: PreparedReferences, energy_fraction: float = 0.99) -> float:
    """Radius (px) around the box centre holding ``energy_fraction`` of the energy of the references'
    projections (three orthogonal views of both half maps) high-passed by ``1 - exp(-|k|^2 / 2 (s/16)^2)``: the particle's
    extent before the CTF. (The prepared maps also hold a smooth disc of radius ``s/2``, RELION's
    mean-subtracting taper, whose energy is at low frequencies, where the CTF hardly delocalises.)"""
    s = references.box_size_px
    views = np.array([np.eye(3), [[0, 0, 1], [0, 1, 0], [1, 0, 0]], [[1, 0, 0], [0, 0, 1], [0, 1, 0]]], dtype=np.float64)
    matrices = np.concatenate([views, views])
    halves = np.repeat(np.arange(2, dtype=np.int64), len(views))
    slices = np.empty((len(matrices), s, s // 2 + 1), dtype=np.complex64)
    limit = min(float(references.max_radius_px), s / 2.0 - 1.0) ** 2 if references.grid_size < s else float(references.max_radius_px) ** 2
    kernels.central_slices(references.bricks, references.grid_size, halves, matrices, limit, slices)
    ky = np.fft.fftfreq(s, 1.0 / s)[:, None]
    slices *= (1.0 - np.exp(-(ky**2 + np.arange(s // 2 + 1)[None, :] ** 2) / (2.0 * (s / 16.0) ** 2))).astype(np.float32)
    power = (np.fft.fftshift(scipy.fft.irfft2(slices, s=(s, s), norm="ortho"), axes=(1, 2)).astype(np.float64) ** 2).sum(axis=0)
    y, x = np.ogrid[0:s, 0:s]
    radius = np.hypot(y - s // 2, x - s // 2).ravel()
    order = np.argsort(radius)
    cumulative = np.cumsum(power.ravel()[order])
    if cumulative[-1] <= 0:
        return 0.0
    index = int(np.searchsorted(cumulative, energy_fraction * cumulative[-1]))
    return float(radius[order[min(index, order.size - 1)]])


def delocalisation_px(gamma: np.ndarray, support: np.ndarray) -> float:
    """Largest displacement ``|grad_k gamma| / (2 pi)`` (pixels) of the frequencies in ``support``.

    gamma, support : (s, s//2+1) on the rfft2 grid (CTF phase in rad; bool).
    """
    s = gamma.shape[0]
    if not np.any(support):
        return 0.0
    centred = np.fft.fftshift(np.asarray(gamma, dtype=np.float64), axes=0)  # rows -s/2 .. s/2-1: contiguous
    gy, gx = np.gradient(centred)
    shift = np.hypot(gx, gy) * s / (2.0 * np.pi)
    return float(shift[np.fft.fftshift(support, axes=0)].max())


def window_padding_px(box_size_px: int, particle_radius_px: float, delocalisation_px: float) -> int:
    """Padded size for the windowed prediction, or 0 if the delocalised particle stays inside the flat
    part of the box's taper (then the periodic prediction is exact and cheaper).

    The padded grid ``S`` must not alias the delocalised particle (radius ``R = particle + delocalisation``)
    into the box's circle: ``S >= s/2 + R`` (+16 px: the particle radius holds 99 % of its energy), and ``S >= s``. (The corners outside the circle only
    enter through their mean, which is subtracted; a little aliasing there is harmless.)
    """
    s = int(box_size_px)
    reach = float(particle_radius_px) + float(delocalisation_px)
    if reach <= s / 2.0 - TAPER_EDGE_PX - 1.0:
        return 0
    size = max(s, int(np.ceil(s / 2.0 + reach + 16.0)))
    size = scipy.fft.next_fast_len(size, real=True)
    while size % 2:
        size = scipy.fft.next_fast_len(size + 1, real=True)
    return int(size)


def windowed_predictions(
    slices: np.ndarray,
    shifts: np.ndarray,
    damping: np.ndarray,
    factor: float,
    padded_gamma: np.ndarray,
    depth_phase: np.ndarray,
    pixel_size_angstrom: float,
    with_flipped: bool = False,
    workers: int = -1,
) -> np.ndarray:
    """``q_s = W[sin(gamma_i) q_i]`` and ``q_c = W[cos(gamma_i) q_i]`` of a batch of particles in one tilt.

    ``q_i = factor * damping * slice_i`` is placed at the particle's sub-pixel offset in its box
    (``shifts``, as :func:`box_origins_and_shifts`), taken to real space, cut to the box's circle
    (cropCircle taper: beyond it the slice holds only interpolation error), zero-padded to the grid of
    ``padded_gamma`` (``S``), multiplied by the CTF terms there (``gamma_i = gamma - depth_phase_i
    |k|^2``; flipped hand ``+``), and cut back to the box exactly as an observed box is cut
    (:func:`kernels.crop_boxes`: mean outside the circle removed, cropCircle taper). The result is in
    the frame of the *unshifted* observed box.

    Returns
    -------
    complex64 (m, 2, s, s//2+1) — ``(q_s, q_c)``; (m, 4, ...) with the flipped hand's pair after them.
    """
    m, s, sh = slices.shape
    big = padded_gamma.shape[0]
    kx = np.arange(sh)
    ky = np.fft.fftfreq(s, 1.0 / s)
    ramp_x = np.exp(-2j * np.pi * shifts[:, 0:1] * kx[None] / s)
    ramp_y = np.exp(-2j * np.pi * shifts[:, 1:2] * ky[None] / s)
    spectra = slices * (factor * damping).astype(np.float32)[None]
    spectra *= ramp_y[:, :, None].astype(np.complex64)
    spectra *= ramp_x[:, None, :].astype(np.complex64)
    images = scipy.fft.irfft2(spectra, s=(s, s), norm="ortho", workers=workers)
    del spectra
    # The projection of the prepared map (zero beyond s/2: its taper) is confined to the box's circle;
    # what the slice's real-space image holds in the corners is trilinear-interpolation error. Periodic,
    # it stays in the corners; padded, the CTF would spread it into the circle: cut it first.
    circle = np.roll(crop_circle_taper(s), (-(s // 2), -(s // 2)), axis=(0, 1)).astype(np.float32)
    padded = np.empty((m, big, big), dtype=np.float32)
    kernels.embed_centred(np.ascontiguousarray(images, dtype=np.float32), circle, padded)
    del images
    # the unitary FT on the padded grid (same pixel size, finer frequency sampling), pruned: only the
    # s rows around the origin are non-zero, so the x pass runs on those alone
    rows = np.r_[0:s // 2, big - s // 2:big]
    half = scipy.fft.rfft(padded[:, rows], axis=-1, norm="ortho", workers=workers)
    del padded
    spectra = np.zeros((m, big, big // 2 + 1), dtype=np.complex64)
    spectra[:, rows] = half
    del half
    spectra = scipy.fft.fft(spectra, axis=1, norm="ortho", workers=workers, overwrite_x=True).astype(np.complex64, copy=False)
    n_out = 4 if with_flipped else 2
    products = np.empty((m, n_out, big, big // 2 + 1), dtype=np.complex64)
    kernels.ctf_products(spectra, np.exp(1j * np.asarray(padded_gamma, dtype=np.float64)), np.ascontiguousarray(depth_phase, dtype=np.float64),
                         1.0 / (big * pixel_size_angstrom) ** 2, with_flipped, products)
    del spectra
    # inverse, pruned: after the y pass only the box's s rows go through the x pass
    products = scipy.fft.ifft(products, axis=2, norm="ortho", workers=workers, overwrite_x=True)[:, :, rows]
    images = scipy.fft.irfft(products, n=big, axis=-1, norm="ortho", workers=workers).astype(np.float32, copy=False)
    del products
    boxes = np.empty((m, n_out, s, s), dtype=np.float32)
    kernels.crop_boxes(np.ascontiguousarray(images), crop_circle_taper(s).astype(np.float32), boxes)
    del images
    return scipy.fft.rfft2(boxes, norm="ortho", workers=workers).astype(np.complex64, copy=False)
