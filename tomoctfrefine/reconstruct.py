"""Particle reconstruction from tilt series, as ``relion_tomo_reconstruct_particle`` does it.

For each particle and each tilt in which it is visible, the box at its projected position is extracted
(integer origin ``round(c) - s/2``, RELION's circular crop, centred unitary FFT, sub-pixel phase shift:
the same observations as the refinement), multiplied by ``-CTF * D`` (tilt images have inverted contrast;
``CTF`` with the particle's depth-dependent defocus, scale, B-factor and even aberrations, ``D`` the dose
weight) and by ``exp(-i chi_odd)``, and inserted as a central slice into the 3D Fourier accumulator of its
half set; ``(CTF D)^2`` is accumulated likewise. The half maps are then gridding-corrected, divided by the
accumulated weight, cropped and tapered. The division is regularised either as RELION does it (a floor of
0.001 x the shell average: RELION's maps, the default of :func:`reconstruct`), with a Wiener term
``sigma^2/tau^2`` estimated per shell from the two half sets (better when Fourier space is sparsely
sampled; the default of ``assess``), or with a constant ``1/SNR`` (RELION's ``--SNR``). Maps have the
particle centre at voxel ``s/2`` and RELION's hand, orientation, contrast and amplitude (pinned by
``tests/test_reconstruct.py`` against RELION 5's own reconstruction of the fixture).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.fft

from . import forward, kernels
from .errors import InputError, Problem
from .io.maps import write_map
from .io.optimisation_set import OptimisationSet
from .io.particles import (
    half_sets as particle_half_sets,
    optics_group_numbers,
    optics_zernike,
    particle_names,
    particle_positions_px,
    particle_rotations,
    particles_of,
    read_particle_set,
)
from .io.tomograms import load_tilt_images, read_tomogram_set, tomogram, tomogram_names
from .io.trajectories import read_trajectories
from .kernels import backproject_slices
from .physics.dose import dose_weight
from .physics.geometry import fourier_grid_per_angstrom
from .physics.zernike import odd_phase_rad
from .progress import Progress, format_duration, format_rate

#: RELION's default ``--cutoff_fract``: frequencies whose dose weight is below it are not inserted.
DOSE_CUTOFF_FRACTION = 0.01
#: RELION's heuristic regularisation: the weight is floored at this fraction of its shell average.
HEURISTIC_WEIGHT_FRACTION = 0.001
#: RELION's ``--taper`` default (pixels).
TAPER_PX = 10.0


@dataclass
class FourierAccumulators:
    """Back-projected data and weights of the two half sets (numpy ``rfftn`` layout ``[kz, ky, kx]``).

    Attributes
    ----------
    data_fs : complex128 (2, s, s, s//2+1)
        Sum of ``-CTF D exp(-i chi_odd) X`` over inserted slices (origin at the box centre).
    weight_fs : float64 (2, s, s, s//2+1)
        Sum of ``(CTF D)^2``.
    particle_count : int64 (2,)
        Particles inserted per half set.
    pixel_size_angstrom : float
    """

    data_fs: np.ndarray
    weight_fs: np.ndarray
    pixel_size_angstrom: float
    particle_count: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.int64))

    @classmethod
    def empty(cls, box_size_px: int, pixel_size_angstrom: float) -> "FourierAccumulators":
        shape = (2, box_size_px, box_size_px, box_size_px // 2 + 1)
        return cls(np.zeros(shape, np.complex128), np.zeros(shape, np.float64), float(pixel_size_angstrom))

    @property
    def box_size_px(self) -> int:
        return self.data_fs.shape[1]


@dataclass
class Reconstruction:
    """Half maps and their average ``[z, y, x]``, at the tilt-series pixel size."""

    half1: np.ndarray
    half2: np.ndarray
    merged: np.ndarray
    pixel_size_angstrom: float
    box_size_px: int
    particle_count: tuple[int, int]


class _Insertion:
    """One side's particles of one optics group of one tomogram, ready to be inserted tilt by tilt.

    Holds what does not depend on the observations (visibility, the CTF phase per tilt, the dose envelope
    and cut-off, the odd-aberration factor, the slice orientations), so that several sides can insert the
    same observed boxes (see :func:`_backproject_together`).
    """

    def __init__(self, accumulators, tomogram, positions_px, rotations, half_sets, even_zernike=None, odd_zernike=None,
                 trajectories_angstrom=None, dose_cutoff_fraction: float = DOSE_CUTOFF_FRACTION):
        s = accumulators.box_size_px
        pixel = float(tomogram.pixel_size_angstrom)
        positions = np.asarray(positions_px, dtype=float).reshape(-1, 3)
        self.accumulators = accumulators
        self.halves = np.asarray(half_sets, dtype=np.int64).reshape(-1) - 1
        self.image_positions = forward.image_positions_px(tomogram, positions, trajectories_angstrom)
        self.seen = forward.visibility(tomogram, self.image_positions, s)
        if len(positions) == 0:
            return
        self.depth = forward.depth_defocus_angstrom(tomogram, positions)
        fx, fy = fourier_grid_per_angstrom(s, pixel)
        freq2 = fx**2 + fy**2
        self.gamma = forward.tilt_gamma(tomogram, s, list(even_zernike) if even_zernike is not None else [])
        damping = forward.tilt_damping(tomogram, s)
        # RELION's findDoseXRanges: per row, pixels inside radius s/2 whose dose weight exceeds the cut-off;
        # the 3D sphere a slice fills has the radius of its row-0 range.
        per_dose = float(getattr(tomogram, "bfactor_per_electron_dose_angstrom2", 0.0) or 0.0)
        dose = np.stack([dose_weight(n, np.sqrt(freq2), per_dose) for n in tomogram.pre_exposure_e_per_angstrom2])
        kept = (dose > dose_cutoff_fraction) & (np.sqrt(freq2) * s * pixel <= s / 2.0)[None]
        self.max_radius = kept[:, 0, :].sum(axis=1).astype(np.float64)
        scale = np.broadcast_to(np.asarray(getattr(tomogram, "ctf_scale", 1.0), dtype=float), (len(self.gamma),))
        self.envelope = np.where(kept, damping * scale[:, None, None], 0.0)
        self.odd_factor = (np.exp(-1j * odd_phase_rad(list(odd_zernike), fx, fy))
                           if odd_zernike is not None and len(odd_zernike) else None)
        matrices = forward.particle_matrices(tomogram, rotations)
        self.inverse_transposed = np.swapaxes(np.linalg.inv(matrices), -1, -2)
        self.depth_phase = np.pi * tomogram.optics.wavelength_angstrom * freq2

    def insert(self, tilt: int, rows: np.ndarray, spectra: np.ndarray) -> None:
        """Insert the observed ``spectra`` of particles ``rows`` in tilt ``tilt``."""
        f = tilt
        modulation = np.sin(self.gamma[f][None] - self.depth[rows, f][:, None, None] * self.depth_phase[None]) * self.envelope[f][None]
        slices = spectra * modulation
        if self.odd_factor is not None:
            slices *= self.odd_factor[None]
        backproject_slices(
            np.ascontiguousarray(slices, dtype=np.complex128),
            np.ascontiguousarray(modulation * modulation, dtype=np.float64),
            np.ascontiguousarray(self.inverse_transposed[rows, f], dtype=np.float64),
            np.ascontiguousarray(self.halves[rows]),
            np.full(len(rows), self.max_radius[f]),
            self.accumulators.data_fs,
            self.accumulators.weight_fs,
        )

    def count_particles(self) -> None:
        """Add the particles seen in at least one tilt to the accumulators' counts (once, at the end)."""
        inserted = self.seen.any(axis=1)
        for half in (0, 1):
            self.accumulators.particle_count[half] += int(np.count_nonzero(inserted & (self.halves == half)))


def _backproject_together(tilt_images: np.ndarray, insertions: list, chunk_bytes: float = 64e6, advance=None) -> None:
    """Insert the observations of several :class:`_Insertion` of one tomogram (same tilt images): each
    distinct box position is extracted and transformed once, and inserted by every insertion that has it
    (two optimisation sets of the same particles, before and after a refinement, share all their boxes).

    ``advance``, if given, is called with the number of particle images inserted after each chunk.
    """
    insertions = [i for i in insertions if i.seen.size and i.seen.any()]
    if not insertions:
        return
    s = insertions[0].accumulators.box_size_px
    chunk = max(1, int(chunk_bytes // (s * (s // 2 + 1) * 16)))
    for f in range(insertions[0].seen.shape[1]):
        rows = [np.flatnonzero(i.seen[:, f]) for i in insertions]
        if not any(len(r) for r in rows):
            continue
        positions = np.concatenate([i.image_positions[r, f, :2] for i, r in zip(insertions, rows)])
        unique, inverse = np.unique(positions, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        offsets = np.cumsum([0] + [len(r) for r in rows])
        for start in range(0, len(unique), chunk):
            stop = min(start + chunk, len(unique))
            spectra = forward.observe(tilt_images[f], unique[start:stop], s)
            inserted = 0
            for i, (insertion, r) in enumerate(zip(insertions, rows)):
                index = inverse[offsets[i] : offsets[i + 1]]
                selected = (index >= start) & (index < stop)
                if selected.any():
                    insertion.insert(f, r[selected], spectra[index[selected] - start])
                    inserted += int(selected.sum())
            if advance is not None:
                advance(inserted)
    for insertion in insertions:
        insertion.count_particles()


def backproject_tomogram(
    accumulators: FourierAccumulators,
    tilt_images: np.ndarray,
    tomogram,
    positions_px: np.ndarray,
    rotations: np.ndarray,
    half_sets: np.ndarray,
    even_zernike: np.ndarray | list | None = None,
    odd_zernike: np.ndarray | list | None = None,
    trajectories_angstrom: np.ndarray | None = None,
    dose_cutoff_fraction: float = DOSE_CUTOFF_FRACTION,
    chunk_bytes: float = 64e6,
    advance=None,
) -> None:
    """Insert the CTF- and dose-weighted observations of one tomogram's particles into ``accumulators``.

    Observations are the refinement's (:func:`tomoctfrefine.forward.observe`); each is multiplied by
    ``-CTF * D = sin(gamma) * D * env_B * scale`` (particle defocus from its depth, even aberrations in
    ``gamma``) and by ``exp(-i chi_odd)``, and weighted by ``(CTF D)^2``. As in RELION, pixels whose dose
    weight is at or below ``dose_cutoff_fraction`` (or beyond radius ``s/2``) are dropped, and each slice
    fills the 3D sphere of its row-0 cut-off radius.

    Parameters
    ----------
    accumulators : FourierAccumulators
        Modified in place.
    tilt_images : (n_tilts, H, W) array
        The tomogram's tilt series (contrast as recorded: dark particles).
    tomogram : Tomogram
        Geometry and per-tilt CTF (``tomoctfrefine.io.tomograms.Tomogram`` fields).
    positions_px : (n, 3) array
        Particle positions in the tomogram frame (pixels).
    rotations : (n, 3, 3) array
        ``A`` mapping reference to tomogram coordinates.
    half_sets : (n,) array of 1 or 2
    even_zernike, odd_zernike : sequences, optional
        RELION Zernike coefficients (radius in 1/Å) of the particles' optics group.
    trajectories_angstrom : (n, n_tilts, 3) array, optional
        Per-tilt shifts in Å added to the positions for extraction (not for the depth defocus).
    dose_cutoff_fraction : float
        RELION's ``--cutoff_fract`` (0.01).
    chunk_bytes : float
        Memory for the slices inserted at once.
    advance : callable, optional
        Called with the number of particle images (a particle in one tilt) inserted, chunk by chunk.
    """
    insertion = _Insertion(accumulators, tomogram, positions_px, rotations, half_sets, even_zernike, odd_zernike,
                           trajectories_angstrom, dose_cutoff_fraction)
    _backproject_together(tilt_images, [insertion], chunk_bytes, advance)


def _radius_3d(s: int) -> np.ndarray:
    """Signed-frequency radius (pixels) on the ``rfftn`` grid of an ``s^3`` volume."""
    k = np.fft.fftfreq(s) * s
    kx = np.fft.rfftfreq(s) * s
    return np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)


def _threads() -> int:
    """Threads for the 3D FFTs: numba's (``--j``), so one setting governs every parallel step."""
    import numba

    return int(numba.get_num_threads())


@lru_cache(maxsize=4)
def _inverse_sinc2(s: int, centred: bool = True) -> np.ndarray:
    """``1 / max(sinc^2(r/s), 0.01)`` on the ``s^3`` grid, centred at voxel ``s/2`` or (``centred=False``)
    at voxel 0 (float32, read-only; cached: every map of a reconstruction has the same box)."""
    coordinate = (np.arange(s) - s // 2).astype(np.float32)
    radius = np.sqrt(coordinate[:, None, None] ** 2 + coordinate[None, :, None] ** 2 + coordinate[None, None, :] ** 2)
    table = (1.0 / np.maximum(np.sinc(radius / np.float32(s)) ** 2, np.float32(1e-2))).astype(np.float32)
    if not centred:
        table = np.ascontiguousarray(np.fft.ifftshift(table))
    table.setflags(write=False)
    return table


def gridding_correct(data_fs: np.ndarray) -> np.ndarray:
    """Real-space map of an accumulated transform, divided by ``sinc^2(r/s)`` (RELION's
    ``griddingCorrect3D_sinc2``: radial, floored at 0.01), centre at voxel ``s/2`` (float32: the maps are
    written in single precision, and single-precision FFTs take half the time and memory)."""
    s = data_fs.shape[0]
    volume = scipy.fft.irfftn(np.asarray(data_fs, dtype=np.complex64), s=(s, s, s), norm="ortho", workers=_threads())
    volume *= _inverse_sinc2(s, centred=False)
    return np.fft.fftshift(volume)


def _gridded_transform(data_fs: np.ndarray) -> np.ndarray:
    """``rfftn`` of the gridding-corrected map with its centre left at voxel 0 (complex64): the transform of
    :func:`gridding_correct`'s map times ``(-1)^(kx+ky+kz)``, a factor no per-voxel division changes, so the
    map is never shifted; :func:`_centred_crop_inverse` takes it back to a centred map."""
    s = data_fs.shape[0]
    threads = _threads()
    volume = scipy.fft.irfftn(np.asarray(data_fs, dtype=np.complex64), s=(s, s, s), norm="ortho", workers=threads)
    volume *= _inverse_sinc2(s, centred=False)
    return scipy.fft.rfftn(volume, norm="ortho", workers=threads, overwrite_x=True)


def _centred_crop_inverse(transform: np.ndarray, crop_size_px: int) -> np.ndarray:
    """The central ``crop^3`` of the centred map whose uncentred ``rfftn`` is ``transform``: the inverse
    FFT one axis at a time, keeping only the cropped planes before the next axis (for a crop of half the
    box, 0.6 of a full inverse FFT)."""
    s = transform.shape[0]
    threads = _threads()
    wanted = (np.arange(crop_size_px) + (s - crop_size_px) // 2 - s // 2) % s  # centred voxel i sits at i - s/2
    planes = scipy.fft.ifft(transform, axis=0, norm="ortho", workers=threads)[wanted]
    rows = scipy.fft.ifft(planes, axis=1, norm="ortho", workers=threads, overwrite_x=True)[:, wanted]
    return np.ascontiguousarray(scipy.fft.irfft(rows, n=s, axis=2, norm="ortho", workers=threads)[:, :, wanted])


def shell_average_linear(values_fs: np.ndarray) -> np.ndarray:
    """Radial average over the half grid with linear binning (RELION's ``fftwHalf_3D_lin``), ``s//2+1`` bins."""
    bins = values_fs.shape[0] // 2 + 1
    total, weight = kernels.shell_sums_linear(np.ascontiguousarray(values_fs, dtype=np.float64), bins)
    return np.where(weight[:bins] > 0, total[:bins] / np.where(weight[:bins] > 0, weight[:bins], 1), 0.0)


def divide_transform(
    transform: np.ndarray,
    weight_fs: np.ndarray,
    snr: float | None = None,
    regulariser_per_shell: np.ndarray | None = None,
    unit_shell_gain: bool = False,
) -> np.ndarray:
    """CTF correction of the ``rfftn`` of a gridding-corrected map, in place (returns ``transform``).

    ``F / (W + 1/SNR)`` when ``snr`` is given (RELION's ``--SNR``); ``F / (W + R)`` with a regulariser
    ``R`` per shell ``round(|k|)`` (e.g. :func:`wiener_shell_ratio`; ``inf`` zeroes a shell); else RELION's
    heuristic ``F / max(W, 0.001 <W>_shell)``. Shells at radius ``>= s/2`` are zeroed in every case.
    With ``unit_shell_gain`` (regulariser only), each shell is divided by its mean gain
    ``<W / (W + R)>``: the per-voxel inverse-variance weighting is kept but the shell is not damped, as
    unfiltered half maps must be for an FSC (a damped shell's masked FSC is mask leakage from its
    neighbours) and for use as references.

    One pass over the grid (:func:`tomoctfrefine.kernels.divide_by_regularised_weight`).
    """
    s = transform.shape[0]
    added = np.zeros(s + 1)
    floor, floor_fraction = np.zeros(2), 0.0
    if snr is not None and snr > 0:
        added[:] = 1.0 / snr
    elif regulariser_per_shell is not None:
        count = min(len(regulariser_per_shell), s + 1)
        added[:count] = regulariser_per_shell[:count]
        added[count:] = np.inf
    else:
        floor, floor_fraction = shell_average_linear(weight_fs), HEURISTIC_WEIGHT_FRACTION
    gain = bool(unit_shell_gain and regulariser_per_shell is not None and not (snr is not None and snr > 0))
    kernels.divide_by_regularised_weight(transform, weight_fs, added, floor, floor_fraction, gain)
    return transform


def divide_by_weight(
    volume: np.ndarray,
    weight_fs: np.ndarray,
    snr: float | None = None,
    regulariser_per_shell: np.ndarray | None = None,
    unit_shell_gain: bool = False,
) -> np.ndarray:
    """CTF correction of a gridding-corrected map (:func:`divide_transform` between two FFTs)."""
    threads = _threads()
    transform = scipy.fft.rfftn(volume.astype(np.float32, copy=False), norm="ortho", workers=threads)
    divide_transform(transform, weight_fs, snr, regulariser_per_shell, unit_shell_gain)
    return scipy.fft.irfftn(transform, s=volume.shape, norm="ortho", workers=threads)


def wiener_shell_ratio(data_fs: np.ndarray, weight_fs: np.ndarray, well_sampled_fraction: float = 0.1) -> np.ndarray:
    """Wiener term ``sigma^2 / tau^2`` per shell ``round(|k|)`` (``s + 1`` values, ``inf`` beyond Nyquist),
    estimated from the two half sets.

    With ``D_h = W_h V + n_h`` (noise variance ``sigma^2 W_h``), the unregularised half estimates
    ``V_h = D_h / W_h`` give ``tau^2 = <Re V_1 conj V_2>`` (signal power) and
    ``sigma^2 = <|V_1 - V_2|^2 / (1/W_1 + 1/W_2)>`` (noise power of one observation), averaged over the
    shell's voxels whose weights both exceed ``well_sampled_fraction`` of the shell average. Dividing by
    ``W + sigma^2/tau^2`` is then the Wiener (MAP) estimate. From the first shell without measurable signal
    (``tau^2 <= 0``) on, the term is at least that of the last shell with signal (finite, so no shell is
    zeroed and the FSC stays defined there).
    """
    s = weight_fs.shape[1]
    count = s // 2 + 1
    weights = np.ascontiguousarray(weight_fs, dtype=np.float64)
    sums, voxels = kernels.shell_sums_rounded(weights, count)
    mean_weight = (sums[0] + sums[1]) / np.maximum(voxels, 1)
    threshold = well_sampled_fraction * 0.5 * mean_weight
    n, cross, noise = kernels.half_set_shell_powers(np.ascontiguousarray(data_fs), weights, threshold, count)
    tau2 = cross / np.maximum(n, 1)
    sigma2 = noise / np.maximum(n, 1)
    valid = (tau2 > 0) & (n > 0)
    ratio = np.where(valid, sigma2 / np.where(valid, tau2, 1.0), np.inf)
    # Beyond the first shell without measurable signal, keep damping at least as strongly as there, but
    # never zero a shell: a zeroed shell has no FSC, and its masked FSC is only leakage from its neighbours.
    first_invalid = next((k for k in range(1, count) if not valid[k]), count)
    if 1 < first_invalid < count:
        floor = ratio[first_invalid - 1]
        tail = ratio[first_invalid:]
        ratio[first_invalid:] = np.where(np.isfinite(tail), np.maximum(tail, floor), floor)
    return np.concatenate([ratio, np.full(s + 1 - count, np.inf)])


def wiener_regulariser(data_fs: np.ndarray, weight_fs: np.ndarray, well_sampled_fraction: float = 0.1) -> np.ndarray:
    """:func:`wiener_shell_ratio` on the ``rfftn`` grid (per voxel; ``inf`` beyond Nyquist)."""
    ratio = wiener_shell_ratio(data_fs, weight_fs, well_sampled_fraction)
    return ratio[np.rint(_radius_3d(weight_fs.shape[1])).astype(np.int64)]


@lru_cache(maxsize=4)
def _taper_weight(s: int, taper_px: float) -> np.ndarray:
    """RELION's taper: 1 inside ``s/2 - taper_px``, a raised cosine to 0 at ``s/2`` (float32, read-only)."""
    half = s / 2.0
    coordinate = np.arange(s) - half
    radius = np.sqrt(coordinate[:, None, None] ** 2 + coordinate[None, :, None] ** 2 + coordinate[None, None, :] ** 2)
    weight = np.where(radius < half - taper_px, 1.0, 0.5 - 0.5 * np.cos(np.pi * (half - radius) / taper_px))
    weight = np.where(radius < half, weight, 0.0).astype(np.float32)
    weight.setflags(write=False)
    return weight


def taper_sphere(volume: np.ndarray, taper_px: float = TAPER_PX) -> np.ndarray:
    """RELION's ``Reconstruction::taper`` (centred): subtract the taper-weighted mean inside radius
    ``s/2``, multiply by a raised cosine over the last ``taper_px`` pixels, zero outside."""
    weight = _taper_weight(volume.shape[0], float(taper_px))
    mean = float(np.sum(weight * volume, dtype=np.float64) / np.sum(weight, dtype=np.float64))
    return weight * (volume - np.asarray(mean, dtype=volume.dtype))


def crop_centre(volume: np.ndarray, crop_size_px: int) -> np.ndarray:
    """Central ``crop^3`` of a cubic volume (RELION's ``unpadCenter3D_full``)."""
    margin = (volume.shape[0] - crop_size_px) // 2
    return volume[margin : margin + crop_size_px, margin : margin + crop_size_px, margin : margin + crop_size_px]


def finalise_map(
    data_fs: np.ndarray,
    weight_fs: np.ndarray,
    crop_size_px: int | None = None,
    snr: float | None = None,
    taper_px: float = TAPER_PX,
    regulariser_per_shell: np.ndarray | None = None,
    unit_shell_gain: bool = False,
) -> np.ndarray:
    """Gridding correction, CTF correction, crop and taper of one accumulated half (or their sum)."""
    return _finish(_gridded_transform(data_fs), weight_fs, crop_size_px, snr, taper_px, regulariser_per_shell, unit_shell_gain)


def _finish(transform, weight_fs, crop_size_px, snr, taper_px, regulariser_per_shell, unit_shell_gain) -> np.ndarray:
    """CTF correction (in place), inverse FFT of the cropped part only, taper."""
    s = transform.shape[0]
    divide_transform(transform, weight_fs, snr, regulariser_per_shell, unit_shell_gain)
    crop = crop_size_px if crop_size_px is not None and 0 < crop_size_px < s else s
    return taper_sphere(_centred_crop_inverse(transform, crop), taper_px).astype(np.float32)


#: Regularisations of the CTF division: RELION's heuristic (its maps, bit for bit up to rounding) or a
#: Wiener filter with the signal and noise powers estimated from the two half sets.
REGULARISATIONS = ("relion", "wiener")


def finalise(
    accumulators: FourierAccumulators,
    crop_size_px: int | None = None,
    snr: float | None = None,
    regularisation: str = "relion",
    progress=None,
) -> Reconstruction:
    """Half maps and the map of both halves together (``(D1 + D2) / (W1 + W2 [+ R])``, as RELION's merged).

    ``regularisation`` is ``"relion"`` (RELION's heuristic; the default, so the maps equal
    ``relion_tomo_reconstruct_particle``'s) or ``"wiener"`` (:func:`wiener_shell_ratio`, better maps when
    the Fourier space is sparsely sampled); a positive ``snr`` overrides both with a constant ``1/SNR``.
    With ``"wiener"`` the merged map is the Wiener (MAP) estimate and the half maps keep unit gain per
    shell (unfiltered, as an FSC and the refinement's references need them). ``progress``, if given, is
    called with 1 after each of the :data:`FINALISE_STEPS` steps (regulariser and gridding correction, half 1,
    half 2, merged).
    """
    if regularisation not in REGULARISATIONS:
        raise ValueError(f"regularisation must be one of {REGULARISATIONS}, not {regularisation!r}")
    tick = progress or (lambda amount: None)
    data, weight = accumulators.data_fs, accumulators.weight_fs
    regulariser = wiener_shell_ratio(data, weight) if regularisation == "wiener" and not snr else None
    # The gridding correction and the FFTs are linear: the merged map's transform is the halves' sum.
    transforms = [_gridded_transform(data[0]), _gridded_transform(data[1])]
    merged_transform = transforms[0] + transforms[1]
    tick(1)
    half1 = _finish(transforms[0], weight[0], crop_size_px, snr, TAPER_PX, regulariser, True)
    tick(1)
    half2 = _finish(transforms[1], weight[1], crop_size_px, snr, TAPER_PX, regulariser, True)
    del transforms
    tick(1)
    merged = _finish(merged_transform, weight[0] + weight[1], crop_size_px, snr, TAPER_PX, regulariser, False)
    tick(1)
    return Reconstruction(
        half1, half2, merged, accumulators.pixel_size_angstrom, accumulators.box_size_px,
        (int(accumulators.particle_count[0]), int(accumulators.particle_count[1])),
    )


#: Steps of :func:`finalise` reported to its ``progress`` callback.
FINALISE_STEPS = 4


#: Largest memory (bytes) for the accumulators of several optimisation sets reconstructed together (they
#: then share every observed box); above it, the sets are reconstructed one after the other.
SHARED_ACCUMULATOR_LIMIT_BYTES = 6e9


def accumulator_bytes(box_size_px: int) -> int:
    """Memory of one :class:`FourierAccumulators` (two halves, complex128 data and float64 weights)."""
    return 2 * box_size_px * box_size_px * (box_size_px // 2 + 1) * (16 + 8)


def _request_problems(opt: OptimisationSet, box: int, box_size_px, crop_size_px) -> list[Problem]:
    problems = []
    if box < 8 or box % 2:
        problems.append(Problem("--b", f"box size {box_size_px} must be even and at least 8", "give an even box size such as 128", "--b"))
    if crop_size_px is not None and crop_size_px > box:
        problems.append(Problem("--crop", f"crop size {crop_size_px} is larger than the box {box}", "give --crop <= --b", "--crop"))
    for name in ("particles_path", "tomograms_path"):
        if getattr(opt, name) is None:
            problems.append(Problem(str(opt.source_path or "optimisation set"), f"no {name.split('_')[0]} file", f"give --{name[0]} or an optimisation set that names it"))
    return problems


@dataclass
class _Source:
    """What one optimisation set reconstructs from."""

    opt: OptimisationSet
    tomograms: object
    particles: object
    trajectories: dict | None
    accumulators: FourierAccumulators | None = None

    @classmethod
    def read(cls, opt: OptimisationSet) -> "_Source":
        trajectories = read_trajectories(opt.resolved("trajectories_path")) if opt.trajectories_path else None
        return cls(opt, read_tomogram_set(opt.resolved("tomograms_path")), read_particle_set(opt.resolved("particles_path")), trajectories)

    def groups(self, name: str):
        """``(tomogram, [(group rows, even, odd, shifts), ...])`` of tomogram ``name`` (None without particles)."""
        if name not in tomogram_names(self.tomograms):
            return None
        rows = particles_of(self.particles, name)
        if len(rows) == 0:
            return None
        tomo = tomogram(self.tomograms, name)
        groups = optics_group_numbers(self.particles, rows)
        parts = []
        for group in np.unique(groups):
            selected = rows[groups == group]
            even, odd = optics_zernike(self.particles, int(group))
            shifts = None
            if self.trajectories is not None:
                shifts = np.stack([self.trajectories.get(n, np.zeros((tomo.tilt_count, 3))) for n in particle_names(self.particles, selected)])
            parts.append((selected, even, odd, shifts))
        return tomo, parts

    def accumulators_for(self, tomo, box: int) -> FourierAccumulators:
        if self.accumulators is None:
            self.accumulators = FourierAccumulators.empty(box, tomo.pixel_size_angstrom)
        elif abs(tomo.pixel_size_angstrom - self.accumulators.pixel_size_angstrom) > 1e-6 * self.accumulators.pixel_size_angstrom:
            raise InputError([Problem(
                str(self.opt.resolved("tomograms_path")),
                f"tomogram {tomo.name} has pixel size {tomo.pixel_size_angstrom} Å, others {self.accumulators.pixel_size_angstrom} Å",
                "reconstruct tomograms of one pixel size together", "rlnTomoTiltSeriesPixelSize")])
        return self.accumulators


def _images_key(tomo) -> tuple:
    """Which tilt images a tomogram's observations come from (equal keys: the same boxes)."""
    stack = str(Path(tomo.stack_path).resolve()) if tomo.stack_path is not None else None
    return stack, tuple(str(p) for p in (tomo.micrograph_paths or ())), tomo.tilt_count


def reconstruct_sets(
    opts: list[OptimisationSet],
    box_size_px: int,
    crop_size_px: int | None = None,
    snr: float | None = None,
    log=None,
    regularisation: str = "relion",
    labels: list[str] | None = None,
    show_bar: bool | None = None,
) -> list[Reconstruction]:
    """Reconstruct the particles of several optimisation sets (each as :func:`reconstruct` does).

    The sets are back-projected together, tomogram by tomogram: a box at the same place in the same tilt
    image is extracted and transformed once for all sets (the sets before and after a CTF refinement
    share all their boxes), unless their accumulators would take more than
    :data:`SHARED_ACCUMULATOR_LIMIT_BYTES`, in which case they are reconstructed one after the other.

    ``log`` receives progress lines (:class:`tomoctfrefine.progress.Progress`: particle images per second
    and the time left, at most every few seconds) and one line per finished phase; ``labels`` name the
    sets in them; ``show_bar`` draws a bar on a terminal (default: when stderr is one).
    """
    box = int(box_size_px)
    labels = list(labels) if labels is not None else [f"set {i + 1}" for i in range(len(opts))] if len(opts) > 1 else [""]
    problems = [p for opt in opts for p in _request_problems(opt, box, box_size_px, crop_size_px)]
    if problems:
        raise InputError(problems)
    if len(opts) > 1 and len(opts) * accumulator_bytes(box) > SHARED_ACCUMULATOR_LIMIT_BYTES:
        return [reconstruct_sets([opt], box, crop_size_px, snr, log, regularisation, [label], show_bar)[0]
                for opt, label in zip(opts, labels)]
    say = log or (lambda message: None)
    sources = [_Source.read(opt) for opt in opts]
    names = list(dict.fromkeys(n for source in sources for n in tomogram_names(source.tomograms)))
    # A first pass over the geometry only: how many particle images there are to insert.
    total = 0
    for name in names:
        for source in sources:
            found = source.groups(name)
            if found is not None:
                tomo, parts = found
                for rows, _, _, shifts in parts:
                    positions = particle_positions_px(source.particles, rows, tomo)
                    total += int(forward.visibility(tomo, forward.image_positions_px(tomo, positions, shifts), box).sum())
    which = ", ".join(label for label in labels if label)
    step = f"back-projection ({which})" if which else "back-projection"
    say(f"{step}: {total} particle images (a particle in one tilt) of {len(names)} tomogram(s), box {box} px")
    started = time.monotonic()
    with Progress(step, total, len(names), enabled=show_bar, unit="particle images", log=log) as bar:
        for name in names:
            insertions = {}
            for source in sources:
                found = source.groups(name)
                if found is None:
                    continue
                tomo, parts = found
                accumulators = source.accumulators_for(tomo, box)
                for rows, even, odd, shifts in parts:
                    insertion = _Insertion(accumulators, tomo, particle_positions_px(source.particles, rows, tomo),
                                           particle_rotations(source.particles, rows), particle_half_sets(source.particles, rows),
                                           even, odd, shifts)
                    insertions.setdefault(_images_key(tomo), (tomo, []))[1].append(insertion)
            for tomo, group in insertions.values():
                _backproject_together(load_tilt_images(tomo), group, advance=lambda n, name=name: bar.advance(n, name))
    elapsed = time.monotonic() - started
    say(f"{step}: {bar.done} particle images of {len(names)} tomogram(s) in {format_duration(elapsed)}"
        + (f" ({format_rate(bar.done / elapsed)})" if elapsed > 0 and bar.done else ""))
    results = []
    for source, label in zip(sources, labels):
        if source.accumulators is None:
            raise InputError([Problem(str(source.opt.resolved("particles_path")), "no particle belongs to a tomogram of the tomogram set",
                                      "check rlnTomoName in both files", "rlnTomoName")])
        step = f"CTF correction ({label})" if label else "CTF correction"
        started = time.monotonic()
        with Progress(step, FINALISE_STEPS, enabled=show_bar, unit="steps", log=log) as bar:
            results.append(finalise(source.accumulators, crop_size_px, snr, regularisation, progress=bar.advance))
        say(f"{step}: {sum(results[-1].particle_count)} particles, maps of {results[-1].merged.shape[0]} px in "
            f"{format_duration(time.monotonic() - started)}")
        source.accumulators = None  # the next set's maps need the memory
    return results


def reconstruct(
    opt: OptimisationSet,
    box_size_px: int,
    crop_size_px: int | None = None,
    snr: float | None = None,
    log=None,
    regularisation: str = "relion",
) -> Reconstruction:
    """Reconstruct the particles of an optimisation set (``relion_tomo_reconstruct_particle --b --crop``).

    Parameters
    ----------
    opt : OptimisationSet
        Needs particles and tomograms (trajectories are used when given).
    box_size_px : int
        Even box size for extraction and reconstruction (RELION's ``--b``).
    crop_size_px : int, optional
        Size of the written maps (RELION's ``--crop``); the full box when None.
    snr : float, optional
        Wiener constant ``1/SNR`` (RELION's ``--SNR``); overrides ``regularisation``.
    log : callable, optional
        Called with progress lines (see :func:`reconstruct_sets`).
    regularisation : {"relion", "wiener"}
        See :func:`finalise`.
    """
    return reconstruct_sets([opt], box_size_px, crop_size_px, snr, log, regularisation)[0]


def write_reconstruction(reconstruction: Reconstruction, out_dir) -> dict[str, Path]:
    """Write ``half1.mrc``, ``half2.mrc`` and ``merged.mrc`` (atomically) at the tilt-series pixel size."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for tag in ("half1", "half2", "merged"):
        paths[tag] = write_map(out / f"{tag}.mrc", getattr(reconstruction, tag), reconstruction.pixel_size_angstrom)
    return paths
