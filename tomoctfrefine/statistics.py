"""Per-tilt sufficient statistics: everything the defocus, scale and aberration fits need.

For one tomogram, tilt ``f`` and Fourier pixel ``k`` (numpy ``rfft2`` grid, shape ``(s, s//2+1)``,
indexed ``[y, x]``), summed over the particles ``i`` visible in that tilt:

* ``q_ik``: the CTF-free, dose-weighted prediction of particle i (central slice of its own half map,
  normalised so that a true projection has scale 1, i.e. box-independent) *with the contrast
  inversion of raw tilt images*: ``q = -1.02 sqrt(s) D F_h(M^T k) = -forward.predict(...)`` (RELION's
  accumulators use the same sign, ``q = -c_f D F_h``), so that the fitted scale ``c`` is positive;
  RELION's ``rlnCtfScalefactor`` for the same data is ``sqrt(s)/1.02`` times the fitted ``c``;
* ``gamma_ik``: the CTF phase of particle i at the *current* parameters (tilt's central defocus plus the
  particle's depth offset, current even aberrations, amplitude contrast, phase shift);
* ``o_ik``: the observed box (raw: odd aberrations are *not* removed, so that they can be fitted);
* ``w_k``: the noise weight (inverse noise power) of the tilt.

    a_ss = sum_i w |q|^2 sin^2 gamma      a_sc = sum_i w |q|^2 sin gamma cos gamma
    a_cc = sum_i w |q|^2 cos^2 gamma
    b_s  = sum_i w o conj(q) sin gamma    b_c  = sum_i w o conj(q) cos gamma       (complex)
    oo   = sum_i w |o|^2

Model: ``o = -c_f exp(i psi(k)) sin(gamma + delta(k)) q + noise``, with a per-tilt scale ``c_f``, an
extra CTF phase ``delta`` common to all particles (defocus change, astigmatism, even aberrations) and an
odd phase ``psi``. With ``e = (cos delta, sin delta)`` the weighted squared residual is *exactly*

    sum_k [ oo + c^2 e^T A e + 2 c Re(exp(-i psi) e^T b) ]

so every fit runs on these arrays, never on images. The statistics for the opposite defocus hand
(``*_flipped_hand``, optional) serve the handedness check.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.fft


@dataclass
class TiltStatistics:
    """Sufficient statistics of one tomogram (arrays have a leading tilt axis).

    Attributes
    ----------
    a_ss, a_sc, a_cc : ndarray, float32 or float64, shape (n_tilts, s, s//2+1)
    b_s, b_c : ndarray, complex64 or complex128, shape (n_tilts, s, s//2+1)
    oo : ndarray, float32 or float64, shape (n_tilts, s, s//2+1)
        :func:`compute_statistics` sums in double precision and stores single precision (half the
        memory and file size; a relative rounding of 6e-8 per pixel, far below the noise of any fit).
        The fits read them through ``refine.likelihood.BandStatistics``, which works in double precision.
    particle_count : ndarray, int, shape (n_tilts,)
        Number of visible particles accumulated per tilt.
    box_size_px : int
    pixel_size_angstrom : float
    flipped_hand : TiltStatistics or None
        The same statistics computed with the opposite defocus hand.
    """

    a_ss: np.ndarray
    a_sc: np.ndarray
    a_cc: np.ndarray
    b_s: np.ndarray
    b_c: np.ndarray
    oo: np.ndarray
    particle_count: np.ndarray
    box_size_px: int
    pixel_size_angstrom: float
    flipped_hand: "TiltStatistics | None" = field(default=None)

    @property
    def n_tilts(self) -> int:
        return self.a_ss.shape[0]

    def with_phase_change(self, delta_rad: np.ndarray) -> "TiltStatistics":
        """The statistics at the CTF phase ``gamma + delta`` (``delta`` ``(n_tilts, s, s//2+1)``, common
        to a tilt's particles, e.g. a defocus change): exact for the periodic prediction, since
        ``sin(gamma + delta) = sin(gamma) cos(delta) + cos(gamma) sin(delta)`` turns every sum into a
        rotation of the accumulated ones (first order where the prediction is windowed)."""
        c, s = np.cos(delta_rad), np.sin(delta_rad)
        a_ss, a_sc, a_cc = (np.asarray(x, dtype=np.float64) for x in (self.a_ss, self.a_sc, self.a_cc))
        return TiltStatistics(
            a_ss=c * c * a_ss + 2 * c * s * a_sc + s * s * a_cc,
            a_sc=(c * c - s * s) * a_sc + c * s * (a_cc - a_ss),
            a_cc=s * s * a_ss - 2 * c * s * a_sc + c * c * a_cc,
            b_s=c * self.b_s + s * self.b_c,
            b_c=c * self.b_c - s * self.b_s,
            oo=self.oo, particle_count=self.particle_count, box_size_px=self.box_size_px,
            pixel_size_angstrom=self.pixel_size_angstrom)

    def save(self, path) -> None:
        """Save as ``.npz`` (atomically: temporary name, then rename)."""
        from .io.atomic import save_npz

        arrays = {name: getattr(self, name) for name in ("a_ss", "a_sc", "a_cc", "b_s", "b_c", "oo", "particle_count")}
        arrays["meta"] = np.array([self.box_size_px, self.pixel_size_angstrom])
        if self.flipped_hand is not None:
            for name in ("a_ss", "a_sc", "a_cc", "b_s", "b_c", "oo"):
                arrays[f"flipped_{name}"] = getattr(self.flipped_hand, name)
        save_npz(path, **arrays)

    @classmethod
    def load(cls, path, with_flipped_hand: bool = True) -> "TiltStatistics":
        """Read :meth:`save`'s file; ``with_flipped_hand=False`` leaves the opposite hand's arrays on
        disk (only the hand check reads them: they are almost half of the memory)."""
        with np.load(path) as data:
            meta = data["meta"]
            common = dict(particle_count=data["particle_count"], box_size_px=int(meta[0]), pixel_size_angstrom=float(meta[1]))
            flipped = None
            if with_flipped_hand and "flipped_a_ss" in data:
                flipped = cls(**{n: data[f"flipped_{n}"] for n in ("a_ss", "a_sc", "a_cc", "b_s", "b_c", "oo")}, **common)
            return cls(**{n: data[n] for n in ("a_ss", "a_sc", "a_cc", "b_s", "b_c", "oo")}, **common, flipped_hand=flipped)


def _empty_like_statistics(n_tilts: int, box_size_px: int, with_oo: bool = True, single: bool = False) -> dict:
    shape = (n_tilts, box_size_px, box_size_px // 2 + 1)
    real, complex_ = (np.float32, np.complex64) if single else (np.float64, np.complex128)
    return {**{name: np.zeros(shape, dtype=real) for name in ("a_ss", "a_sc", "a_cc") + (("oo",) if with_oo else ())},
            **{name: np.zeros(shape, dtype=complex_) for name in ("b_s", "b_c")}}


def compute_statistics(
    tomogram,
    tilt_images: np.ndarray,
    positions_px: np.ndarray,
    rotations: np.ndarray,
    half_sets: np.ndarray,
    references,
    weights: np.ndarray,
    even_zernike=(),
    *,
    with_flipped_hand: bool = False,
    trajectory_shifts_angstrom: np.ndarray | None = None,
    tilts=None,
    chunk_megabytes: float = 32.0,
    windowed: bool = True,
) -> TiltStatistics:
    """Accumulate the sufficient statistics of one tomogram, streaming over tilts and particle chunks.

    Parameters
    ----------
    tomogram : Tomogram
        Geometry and the *current* CTF of every tilt (see :mod:`tomoctfrefine.forward`).
    tilt_images : ndarray (n_tilts, H, W)
        The tilt stack (may be memory-mapped; one tilt is read at a time).
    positions_px : ndarray (n_particles, 3)
        Particle positions in the tomogram frame (px), e.g. ``io.particle_positions_px``.
    rotations : ndarray (n_particles, 3, 3)
        Reference-to-tomogram rotations ``A = A_sub A_part``.
    half_sets : ndarray (n_particles,)
        RELION's ``rlnRandomSubset`` (1 or 2): each particle is predicted from its own half map.
    references : PreparedReferences
    weights : ndarray (n_tilts, s, s//2+1) or (s, s//2+1)
        Frequency weights (noise weight times cut-off weight, optionally times the row-range mask).
        The DC pixel is always excluded.
    even_zernike : sequence of float
        Current even Zernike coefficients (RELION order, rad), added to gamma.
    with_flipped_hand : bool
        Also accumulate the statistics with the opposite defocus hand (``flipped_hand``; shares ``oo``).
    trajectory_shifts_angstrom : ndarray (n_particles, n_tilts, 3) or None
        Per-tilt particle shifts (moves the boxes, not the depth defocus, as in RELION).
    tilts : sequence of int or None
        Only these tilts are accumulated (others stay zero); default all.
    chunk_megabytes : float
        Memory for the boxes of one chunk of particles.
    windowed : bool
        Window the prediction like the observed boxes in the tilts where the CTF delocalises the
        particle's signal (``lambda * defocus * |k|`` plus the particle radius) into the box's taper
        (see Notes). False: always the periodic product ``CTF x slice`` (biased there; for comparisons).

    Notes
    -----
    Threads: ``numba.set_num_threads(n)`` sets both the kernels' and the FFTs' thread count. The sums
    do not depend on it (the accumulation is parallel over image rows). Memory: the statistics
    (32 bytes per pixel and tilt, +20 with the flipped hand: stored in single precision, summed per
    tilt in double precision), one chunk of boxes, and the references
    (crop them with :meth:`PreparedReferences.cropped` to the weights' support).

    Delocalisation: an observed box is the tilt image cut out around the particle, minus the mean
    outside its circle, times RELION's cropCircle taper; at large defocus and small boxes the CTF moves
    part of the particle's signal into the taper or out of the box, where ``sin(gamma) q`` on the box's
    grid (a periodic image) does not model it: the fits then find a fake ``rho^4`` aberration and a
    defocus bias (at 30 000 Å, 2 Å pixels, box 96: -22 Å on the low-dose tilts at the true CTF). In
    those tilts (where particle radius + largest displacement ``|grad gamma|/2 pi`` over the weighted
    pixels exceeds ``s/2 - 6`` px) ``q_s = W[sin(gamma) q]`` and ``q_c = W[cos(gamma) q]`` are made on a
    zero-padded grid and cut and tapered like the boxes (:func:`forward.windowed_predictions`), and
    ``a_ss = sum w |q_s|^2``, ``a_sc = sum w Re(q_s conj q_c)``, ``a_cc = sum w |q_c|^2``, ``b_s = sum w o
    conj(q_s)``, ``b_c = sum w o conj(q_c)``: the same contract, exact at ``delta = 0`` and, for a smooth
    ``delta`` (a defocus change moves the delocalised signal by ``lambda dz |k|``, a few px), to first
    order. Elsewhere the cheaper periodic product is exact and used.

    Returns
    -------
    TiltStatistics
    """
    import numba

    from . import forward, kernels
    from .io.maps import release_pages
    from .reference import radius_px

    workers = numba.get_num_threads()  # one thread setting for the kernels and the FFTs

    s = references.box_size_px
    sh = s // 2 + 1
    n_tilts = len(tomogram.projection_matrices)
    if np.shape(weights)[-2:] != (s, sh):
        raise ValueError(f"weights have shape {np.shape(weights)}, the references' box {s} needs (..., {s}, {sh})")
    weights = np.broadcast_to(np.asarray(weights), (n_tilts, s, sh))
    positions_px = np.asarray(positions_px, dtype=float)
    image_positions = forward.image_positions_px(tomogram, positions_px, trajectory_shifts_angstrom)
    seen = forward.visibility(tomogram, image_positions, s)
    matrices = forward.particle_matrices(tomogram, np.asarray(rotations, dtype=float))
    halves = np.asarray(half_sets, dtype=np.int64) - 1
    if np.any((halves < 0) | (halves > 1)):
        raise ValueError("half sets must be 1 or 2")
    k1 = np.pi * tomogram.optics.wavelength_angstrom
    depth_phase = k1 * forward.depth_defocus_angstrom(tomogram, positions_px)
    freq_unit2 = 1.0 / (s * tomogram.pixel_size_angstrom) ** 2
    radius2 = radius_px(s) ** 2
    max_radius2 = float(references.max_radius_px) ** 2
    factor = -forward.prediction_normalisation(s)
    particle_radius = forward.particle_radius_px(references) if windowed else 0.0
    ky = np.fft.fftfreq(s, 1.0 / s)
    k2_grid = (ky[:, None] ** 2 + np.arange(sh)[None, :] ** 2) * freq_unit2

    stats = _empty_like_statistics(n_tilts, s, single=True)
    flipped = _empty_like_statistics(n_tilts, s, with_oo=False, single=True) if with_flipped_hand else None
    # one tilt's sums, in double precision (stored in single precision once the tilt is done)
    sums = _empty_like_statistics(1, s)
    flipped_sums = _empty_like_statistics(1, s, with_oo=False) if with_flipped_hand else None
    dummy_real = np.zeros((1, 1))
    dummy_complex = np.zeros((1, 1), dtype=np.complex128)
    chunk = max(1, int(chunk_megabytes * 2**20 / (s * s * 4 + 2 * s * sh * 8)))
    counts = np.zeros(n_tilts, dtype=np.int64)
    buffers: dict = {}  # the batches' arrays, reused
    for f in range(n_tilts) if tilts is None else tilts:
        rows = np.nonzero(seen[:, f])[0]
        counts[f] = len(rows)
        if not len(rows):
            continue
        for array in (*sums.values(), *(flipped_sums.values() if flipped_sums else ())):
            array.fill(0)
        image = np.array(tilt_images[f], dtype=np.float32)
        release_pages(tilt_images)  # a mapped stack would otherwise become resident whole
        gamma = forward.tilt_gamma(tomogram, s, even_zernike, [f])[0]
        damping = forward.tilt_damping(tomogram, s, [f])[0]
        weight = np.array(weights[f], dtype=np.float64)
        weight[0, 0] = 0.0
        support2 = float(radius2[weight != 0].max()) if np.any(weight != 0) else 0.0
        padded = 0
        if windowed:
            phases = depth_phase[rows, f]
            extremes = {phases.min(), phases.max()} | ({-phases.min(), -phases.max()} if flipped is not None else set())
            # only pixels the prediction reaches (the slice radius), and not where the dose has taken
            # the signal (< 1 %)
            signal = (weight != 0) & (damping > 0.01) & (radius2 <= min(max_radius2, support2))
            reach = max(forward.delocalisation_px(gamma - e * k2_grid, signal) for e in extremes)
            padded = forward.window_padding_px(s, particle_radius, reach)
        if padded:
            padded_gamma = forward.tilt_gamma(tomogram, padded, even_zernike, [f])[0]
            outputs = 4 if flipped is not None else 2
            step = max(1, int(chunk_megabytes * 2**20 / (padded * padded * 4 * (2 * outputs + 2))))
            for start in range(0, len(rows), step):
                batch = rows[start:start + step]
                shifts, spectra, slices = _observe_and_slice(image, image_positions[batch, f], references,
                                                             halves[batch], matrices[batch, f],
                                                             min(max_radius2, support2), workers, buffers)
                predictions = forward.windowed_predictions(
                    slices, shifts, damping, factor, padded_gamma, depth_phase[batch, f], tomogram.pixel_size_angstrom,
                    with_flipped=flipped is not None, workers=workers)
                del slices
                kernels.accumulate_windowed_statistics(
                    spectra, predictions, weight, flipped is not None,
                    *_tilt_sums(sums, flipped_sums, dummy_real, dummy_complex),
                )
            _store(stats, flipped, sums, flipped_sums, f)
            continue
        for start in range(0, len(rows), chunk):
            batch = rows[start:start + chunk]
            shifts, spectra, slices = _observe_and_slice(image, image_positions[batch, f], references, halves[batch],
                                                         matrices[batch, f], min(max_radius2, support2), workers, buffers)
            kernels.accumulate_tilt_statistics(
                spectra,
                np.ascontiguousarray(shifts, dtype=np.float64),
                slices,
                np.ascontiguousarray(depth_phase[batch, f]),
                np.exp(1j * gamma),
                freq_unit2,
                damping,
                weight,
                factor,
                flipped is not None,
                *_tilt_sums(sums, flipped_sums, dummy_real, dummy_complex),
            )
        _store(stats, flipped, sums, flipped_sums, f)
    common = dict(particle_count=counts, box_size_px=s, pixel_size_angstrom=float(tomogram.pixel_size_angstrom))
    flipped_stats = None
    if flipped is not None:
        flipped["oo"] = stats["oo"]
        flipped_stats = TiltStatistics(**flipped, **common)
    return TiltStatistics(**stats, **common, flipped_hand=flipped_stats)


def _tilt_sums(sums: dict, flipped_sums: dict | None, dummy_real, dummy_complex) -> tuple:
    """The accumulator arguments of the kernels: one tilt's sums (2D), then the flipped hand's (or dummies)."""
    own = tuple(sums[n][0] for n in ("a_ss", "a_sc", "a_cc", "b_s", "b_c", "oo"))
    if flipped_sums is None:
        return own + (dummy_real, dummy_real, dummy_real, dummy_complex, dummy_complex)
    return own + tuple(flipped_sums[n][0] for n in ("a_ss", "a_sc", "a_cc", "b_s", "b_c"))


def _store(stats: dict, flipped: dict | None, sums: dict, flipped_sums: dict | None, f: int) -> None:
    for name, array in sums.items():
        stats[name][f] = array[0]
    for name, array in (flipped_sums or {}).items():
        flipped[name][f] = array[0]


def _buffer(buffers: dict | None, name: str, shape: tuple, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)``, or a leading part of the array ``buffers[name]`` kept from an earlier
    batch: fresh arrays of tens of MB per batch cost a page fault per page (a sixth of prepare's time
    went to the kernel)."""
    if buffers is None:
        return np.empty(shape, dtype=dtype)
    kept = buffers.get(name)
    if kept is None or kept.dtype != dtype or kept.shape[1:] != tuple(shape[1:]) or kept.shape[0] < shape[0]:
        kept = buffers[name] = np.empty(shape, dtype=dtype)
    return kept[:shape[0]]


def _rfft2(boxes: np.ndarray, out: np.ndarray, workers: int) -> np.ndarray:
    """``scipy.fft.rfft2(boxes, norm="ortho")`` written into ``out`` (complex64, the same call scipy
    makes, so the same values) where scipy's pocketfft binding allows it; otherwise a new array."""
    try:
        from scipy.fft._pocketfft import pypocketfft

        return pypocketfft.r2c(boxes, (1, 2), True, 1, out, workers)
    except (ImportError, AttributeError, TypeError, ValueError, RuntimeError):
        return scipy.fft.rfft2(boxes, norm="ortho", workers=workers).astype(np.complex64, copy=False)


def _observe_and_slice(image, image_positions, references, halves, matrices, max_radius2: float, workers: int,
                       buffers: dict | None = None):
    """Observed spectra (boxes cut at the projected positions, unitary FFT), their sub-pixel shifts, and
    the CTF-free central slices of the particles' own half maps, for one batch of particles in one tilt.

    Only the columns ``kx <= sqrt(max_radius2)`` of the spectra are transformed along y (the rest are
    set to 0: the weights vanish there); those columns equal ``rfft2``'s bit for bit. With ``buffers``
    (a dict kept across batches) the arrays of the previous batch are reused: the results are only
    valid until the next call."""
    from . import forward, kernels

    s = references.box_size_px
    sh = s // 2 + 1
    m = len(image_positions)
    origins, shifts = forward.box_origins_and_shifts(image_positions, s)
    boxes = _buffer(buffers, "boxes", (m, s, s), np.float32)
    kernels.extract_boxes(image, origins, boxes)
    columns = min(sh, int(np.floor(np.sqrt(max_radius2))) + 1) if np.isfinite(max_radius2) else sh
    if columns < 0.8 * sh:
        spectra = scipy.fft.rfft(boxes, axis=2, norm="ortho", workers=workers).astype(np.complex64, copy=False)
        spectra[:, :, :columns] = scipy.fft.fft(spectra[:, :, :columns], axis=1, norm="ortho", workers=workers)
        spectra[:, :, columns:] = 0
    else:
        spectra = _rfft2(boxes, _buffer(buffers, "spectra", (m, s, sh), np.complex64), workers)
    slices = _buffer(buffers, "slices", (m, s, sh), np.complex64)
    kernels.central_slices(references.bricks, references.grid_size, halves, np.ascontiguousarray(matrices), max_radius2, slices)
    return shifts, spectra, slices
