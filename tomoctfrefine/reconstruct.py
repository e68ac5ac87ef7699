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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import forward
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
    """
    s = accumulators.box_size_px
    sh = s // 2 + 1
    pixel = float(tomogram.pixel_size_angstrom)
    positions = np.asarray(positions_px, dtype=float).reshape(-1, 3)
    if len(positions) == 0:
        return
    halves = np.asarray(half_sets, dtype=np.int64) - 1
    image_positions = forward.image_positions_px(tomogram, positions, trajectories_angstrom)
    seen = forward.visibility(tomogram, image_positions, s)
    depth = forward.depth_defocus_angstrom(tomogram, positions)
    fx, fy = fourier_grid_per_angstrom(s, pixel)
    freq2 = fx**2 + fy**2
    even = list(even_zernike) if even_zernike is not None else []
    gamma = forward.tilt_gamma(tomogram, s, even)
    damping = forward.tilt_damping(tomogram, s)
    # RELION's findDoseXRanges: per row, pixels inside radius s/2 whose dose weight exceeds the cut-off;
    # the 3D sphere a slice fills has the radius of its row-0 range.
    per_dose = float(getattr(tomogram, "bfactor_per_electron_dose_angstrom2", 0.0) or 0.0)
    dose = np.stack([dose_weight(n, np.sqrt(freq2), per_dose) for n in tomogram.pre_exposure_e_per_angstrom2])
    kept = (dose > dose_cutoff_fraction) & (np.sqrt(freq2) * s * pixel <= s / 2.0)[None]
    max_radius = kept[:, 0, :].sum(axis=1).astype(np.float64)
    scale = np.broadcast_to(np.asarray(getattr(tomogram, "ctf_scale", 1.0), dtype=float), (len(gamma),))
    odd_factor = np.exp(-1j * odd_phase_rad(list(odd_zernike), fx, fy)) if odd_zernike is not None and len(odd_zernike) else None
    matrices = forward.particle_matrices(tomogram, rotations)
    inverse_transposed = np.swapaxes(np.linalg.inv(matrices), -1, -2)
    depth_phase = np.pi * tomogram.optics.wavelength_angstrom * freq2
    chunk = max(1, int(chunk_bytes // (s * sh * 16)))
    for f in range(len(gamma)):
        envelope = np.where(kept[f], damping[f] * scale[f], 0.0)
        rows = np.flatnonzero(seen[:, f])
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            spectra = forward.observe(tilt_images[f], image_positions[part, f], s)
            modulation = np.sin(gamma[f][None] - depth[part, f][:, None, None] * depth_phase[None]) * envelope[None]
            slices = spectra * modulation
            if odd_factor is not None:
                slices *= odd_factor[None]
            backproject_slices(
                np.ascontiguousarray(slices, dtype=np.complex128),
                np.ascontiguousarray(modulation * modulation, dtype=np.float64),
                np.ascontiguousarray(inverse_transposed[part, f], dtype=np.float64),
                np.ascontiguousarray(halves[part]),
                np.full(len(part), max_radius[f]),
                accumulators.data_fs,
                accumulators.weight_fs,
            )
    inserted = seen.any(axis=1)
    for half in (0, 1):
        accumulators.particle_count[half] += int(np.count_nonzero(inserted & (halves == half)))


def _radius_3d(s: int) -> np.ndarray:
    """Signed-frequency radius (pixels) on the ``rfftn`` grid of an ``s^3`` volume."""
    k = np.fft.fftfreq(s) * s
    kx = np.fft.rfftfreq(s) * s
    return np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)


def gridding_correct(data_fs: np.ndarray) -> np.ndarray:
    """Real-space map of an accumulated transform, divided by ``sinc^2(r/s)`` (RELION's
    ``griddingCorrect3D_sinc2``: radial, floored at 0.01), centre at voxel ``s/2``."""
    s = data_fs.shape[0]
    volume = np.fft.fftshift(np.fft.irfftn(data_fs, s=(s, s, s), norm="ortho"))
    coordinate = np.arange(s) - s // 2
    radius = np.sqrt(coordinate[:, None, None] ** 2 + coordinate[None, :, None] ** 2 + coordinate[None, None, :] ** 2)
    sinc2 = np.sinc(radius / s) ** 2
    return volume / np.maximum(sinc2, 1e-2)


def shell_average_linear(values_fs: np.ndarray) -> np.ndarray:
    """Radial average over the half grid with linear binning (RELION's ``fftwHalf_3D_lin``), ``s//2+1`` bins."""
    s = values_fs.shape[0]
    bins = s // 2 + 1
    radius = _radius_3d(s).ravel()
    lower = np.floor(radius).astype(np.int64)
    t = radius - lower
    total = np.zeros(bins + 1)
    weight = np.zeros(bins + 1)
    keep = lower < bins
    np.add.at(total, lower[keep], (1 - t[keep]) * values_fs.ravel()[keep])
    np.add.at(weight, lower[keep], 1 - t[keep])
    np.add.at(total, lower[keep] + 1, t[keep] * values_fs.ravel()[keep])
    np.add.at(weight, lower[keep] + 1, t[keep])
    return np.where(weight[:bins] > 0, total[:bins] / np.where(weight[:bins] > 0, weight[:bins], 1), 0.0)


def divide_by_weight(
    volume: np.ndarray,
    weight_fs: np.ndarray,
    snr: float | None = None,
    regulariser_fs: np.ndarray | None = None,
    unit_shell_gain: bool = False,
) -> np.ndarray:
    """CTF correction of a gridding-corrected map.

    ``F / (W + 1/SNR)`` when ``snr`` is given (RELION's ``--SNR``); ``F / (W + R)`` with a per-voxel
    regulariser ``R`` (e.g. :func:`wiener_regulariser`; ``inf`` zeroes a voxel); else RELION's heuristic
    ``F / max(W, 0.001 <W>_shell)``. Shells at radius ``>= s/2`` are zeroed in every case.
    With ``unit_shell_gain`` (regulariser only), each shell is divided by its mean gain
    ``<W / (W + R)>``: the per-voxel inverse-variance weighting is kept but the shell is not damped, as
    unfiltered half maps must be for an FSC (a damped shell's masked FSC is mask leakage from its
    neighbours) and for use as references.
    """
    s = volume.shape[0]
    transform = np.fft.rfftn(volume, norm="ortho")
    radius = _radius_3d(s)
    inside = np.floor(radius) + 1 < s // 2 + 1
    if snr is not None and snr > 0:
        divisor = weight_fs + 1.0 / snr
    elif regulariser_fs is not None:
        divisor = weight_fs + regulariser_fs
    else:
        average = shell_average_linear(weight_fs)
        lower = np.minimum(np.floor(radius).astype(np.int64), len(average) - 2)
        frac = radius - lower
        shell = (1 - frac) * average[lower] + frac * average[lower + 1]
        divisor = np.maximum(weight_fs, HEURISTIC_WEIGHT_FRACTION * shell)
    usable = inside & (divisor > 0) & np.isfinite(divisor)
    transform = np.where(usable, transform / np.where(usable, divisor, 1.0), 0.0)
    if unit_shell_gain and regulariser_fs is not None and not (snr is not None and snr > 0):
        shells = np.rint(radius).astype(np.int64).ravel()
        gain = np.where(usable, weight_fs / np.where(usable, divisor, 1.0), 0.0).ravel()
        total = np.bincount(shells, weights=gain, minlength=s + 1)
        count = np.bincount(shells, weights=usable.ravel().astype(float), minlength=s + 1)
        mean_gain = np.where(count > 0, total / np.maximum(count, 1), 0.0)
        shell_gain = mean_gain[shells].reshape(transform.shape)
        transform = np.where(shell_gain > 0, transform / np.where(shell_gain > 0, shell_gain, 1.0), 0.0)
    return np.fft.irfftn(transform, s=volume.shape, norm="ortho")


def wiener_regulariser(data_fs: np.ndarray, weight_fs: np.ndarray, well_sampled_fraction: float = 0.1) -> np.ndarray:
    """Per-voxel Wiener term ``sigma^2 / tau^2`` estimated per shell from the two half sets.

    With ``D_h = W_h V + n_h`` (noise variance ``sigma^2 W_h``), the unregularised half estimates
    ``V_h = D_h / W_h`` give ``tau^2 = <Re V_1 conj V_2>`` (signal power) and
    ``sigma^2 = <|V_1 - V_2|^2 / (1/W_1 + 1/W_2)>`` (noise power of one observation), averaged over the
    shell's voxels whose weights both exceed ``well_sampled_fraction`` of the shell average. Dividing by
    ``W + sigma^2/tau^2`` is then the Wiener (MAP) estimate. From the first shell without measurable signal
    (``tau^2 <= 0``) on, the term is at least that of the last shell with signal (finite, so no shell is
    zeroed and the FSC stays defined there); ``inf`` beyond Nyquist.
    """
    s = weight_fs.shape[1]
    shells = np.rint(_radius_3d(s)).astype(np.int64)
    count = s // 2 + 1
    w1, w2 = weight_fs[0], weight_fs[1]
    mean_weight = np.bincount(shells.ravel(), weights=(w1 + w2).ravel(), minlength=count + s)[:count] / np.maximum(
        np.bincount(shells.ravel(), minlength=count + s)[:count], 1
    )
    threshold = np.concatenate([well_sampled_fraction * 0.5 * mean_weight, np.full(s, np.inf)])[shells]
    good = (w1 > threshold) & (w2 > threshold)
    v1 = np.where(good, data_fs[0] / np.where(good, w1, 1.0), 0.0)
    v2 = np.where(good, data_fs[1] / np.where(good, w2, 1.0), 0.0)
    cross = np.where(good, np.real(v1 * np.conj(v2)), 0.0)
    noise = np.where(good, np.abs(v1 - v2) ** 2 / (1.0 / np.where(good, w1, 1.0) + 1.0 / np.where(good, w2, 1.0)), 0.0)
    n = np.bincount(shells[good], minlength=count + s)[:count]
    tau2 = np.bincount(shells[good], weights=cross[good], minlength=count + s)[:count] / np.maximum(n, 1)
    sigma2 = np.bincount(shells[good], weights=noise[good], minlength=count + s)[:count] / np.maximum(n, 1)
    valid = (tau2 > 0) & (n > 0)
    ratio = np.where(valid, sigma2 / np.where(valid, tau2, 1.0), np.inf)
    # Beyond the first shell without measurable signal, keep damping at least as strongly as there, but
    # never zero a shell: a zeroed shell has no FSC, and its masked FSC is only leakage from its neighbours.
    first_invalid = next((k for k in range(1, count) if not valid[k]), count)
    if 1 < first_invalid < count:
        floor = ratio[first_invalid - 1]
        tail = ratio[first_invalid:]
        ratio[first_invalid:] = np.where(np.isfinite(tail), np.maximum(tail, floor), floor)
    return np.concatenate([ratio, np.full(s, np.inf)])[shells]


def taper_sphere(volume: np.ndarray, taper_px: float = TAPER_PX) -> np.ndarray:
    """RELION's ``Reconstruction::taper`` (centred): subtract the taper-weighted mean inside radius
    ``s/2``, multiply by a raised cosine over the last ``taper_px`` pixels, zero outside."""
    s = volume.shape[0]
    half = s / 2.0
    coordinate = np.arange(s) - half
    radius = np.sqrt(coordinate[:, None, None] ** 2 + coordinate[None, :, None] ** 2 + coordinate[None, None, :] ** 2)
    weight = np.where(radius < half - taper_px, 1.0, 0.5 - 0.5 * np.cos(np.pi * (half - radius) / taper_px))
    weight = np.where(radius < half, weight, 0.0)
    mean = (weight * volume).sum() / weight.sum()
    return weight * (volume - mean)


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
    regulariser_fs: np.ndarray | None = None,
    unit_shell_gain: bool = False,
) -> np.ndarray:
    """Gridding correction, CTF correction, crop and taper of one accumulated half (or their sum)."""
    volume = divide_by_weight(gridding_correct(data_fs), weight_fs, snr, regulariser_fs, unit_shell_gain)
    if crop_size_px is not None and 0 < crop_size_px < volume.shape[0]:
        volume = crop_centre(volume, crop_size_px)
    return taper_sphere(volume, taper_px).astype(np.float32)


#: Regularisations of the CTF division: RELION's heuristic (its maps, bit for bit up to rounding) or a
#: Wiener filter with the signal and noise powers estimated from the two half sets.
REGULARISATIONS = ("relion", "wiener")


def finalise(
    accumulators: FourierAccumulators,
    crop_size_px: int | None = None,
    snr: float | None = None,
    regularisation: str = "relion",
) -> Reconstruction:
    """Half maps and the map of both halves together (``(D1 + D2) / (W1 + W2 [+ R])``, as RELION's merged).

    ``regularisation`` is ``"relion"`` (RELION's heuristic; the default, so the maps equal
    ``relion_tomo_reconstruct_particle``'s) or ``"wiener"`` (:func:`wiener_regulariser`, better maps when
    the Fourier space is sparsely sampled); a positive ``snr`` overrides both with a constant ``1/SNR``.
    With ``"wiener"`` the merged map is the Wiener (MAP) estimate and the half maps keep unit gain per
    shell (unfiltered, as an FSC and the refinement's references need them).
    """
    if regularisation not in REGULARISATIONS:
        raise ValueError(f"regularisation must be one of {REGULARISATIONS}, not {regularisation!r}")
    data, weight = accumulators.data_fs, accumulators.weight_fs
    regulariser = wiener_regulariser(data, weight) if regularisation == "wiener" and not snr else None
    half1 = finalise_map(data[0], weight[0], crop_size_px, snr, regulariser_fs=regulariser, unit_shell_gain=True)
    half2 = finalise_map(data[1], weight[1], crop_size_px, snr, regulariser_fs=regulariser, unit_shell_gain=True)
    merged = finalise_map(data[0] + data[1], weight[0] + weight[1], crop_size_px, snr, regulariser_fs=regulariser)
    return Reconstruction(
        half1, half2, merged, accumulators.pixel_size_angstrom, accumulators.box_size_px,
        (int(accumulators.particle_count[0]), int(accumulators.particle_count[1])),
    )


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
        Called with one progress line per tomogram.
    regularisation : {"relion", "wiener"}
        See :func:`finalise`.
    """
    box = int(box_size_px)
    problems = []
    if box < 8 or box % 2:
        problems.append(Problem("--b", f"box size {box_size_px} must be even and at least 8", "give an even box size such as 128", "--b"))
    if crop_size_px is not None and crop_size_px > box:
        problems.append(Problem("--crop", f"crop size {crop_size_px} is larger than the box {box}", "give --crop <= --b", "--crop"))
    for name in ("particles_path", "tomograms_path"):
        if getattr(opt, name) is None:
            problems.append(Problem(str(opt.source_path or "optimisation set"), f"no {name.split('_')[0]} file", f"give --{name[0]} or an optimisation set that names it"))
    if problems:
        raise InputError(problems)
    tset = read_tomogram_set(opt.resolved("tomograms_path"))
    pset = read_particle_set(opt.resolved("particles_path"))
    trajectories = read_trajectories(opt.resolved("trajectories_path")) if opt.trajectories_path else None
    accumulators = None
    for name in tomogram_names(tset):
        rows = particles_of(pset, name)
        if len(rows) == 0:
            continue
        tomo = tomogram(tset, name)
        if accumulators is None:
            accumulators = FourierAccumulators.empty(box, tomo.pixel_size_angstrom)
        elif abs(tomo.pixel_size_angstrom - accumulators.pixel_size_angstrom) > 1e-6 * accumulators.pixel_size_angstrom:
            raise InputError([Problem(
                str(opt.resolved("tomograms_path")),
                f"tomogram {name} has pixel size {tomo.pixel_size_angstrom} Å, others {accumulators.pixel_size_angstrom} Å",
                "reconstruct tomograms of one pixel size together", "rlnTomoTiltSeriesPixelSize")])
        images = load_tilt_images(tomo)
        groups = optics_group_numbers(pset, rows)
        for group in np.unique(groups):
            selected = rows[groups == group]
            even, odd = optics_zernike(pset, int(group))
            shifts = None
            if trajectories is not None:
                shifts = np.stack([trajectories.get(n, np.zeros((tomo.tilt_count, 3))) for n in particle_names(pset, selected)])
            backproject_tomogram(
                accumulators,
                images,
                tomo,
                particle_positions_px(pset, selected, tomo),
                particle_rotations(pset, selected),
                particle_half_sets(pset, selected),
                even,
                odd,
                shifts,
            )
        if log is not None:
            log(f"{name}: {len(rows)} particles back-projected")
    if accumulators is None:
        raise InputError([Problem(str(opt.resolved("particles_path")), "no particle belongs to a tomogram of the tomogram set", "check rlnTomoName in both files", "rlnTomoName")])
    return finalise(accumulators, crop_size_px, snr, regularisation)


def write_reconstruction(reconstruction: Reconstruction, out_dir) -> dict[str, Path]:
    """Write ``half1.mrc``, ``half2.mrc`` and ``merged.mrc`` (atomically) at the tilt-series pixel size."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for tag in ("half1", "half2", "merged"):
        paths[tag] = write_map(out / f"{tag}.mrc", getattr(reconstruction, tag), reconstruction.pixel_size_angstrom)
    return paths
