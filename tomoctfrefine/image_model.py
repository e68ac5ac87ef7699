"""The model of a whole tilt image: every particle's prediction at the current CTF and scale, in place.

An observed box holds its particle, the noise, and the parts of its neighbours that reach into it. At low
and middle frequencies, where a tilt's contrast scale gets most of its information, the neighbours'
signal is far stronger than the noise: treated as noise it triples the scatter of the per-tilt scale
beyond what the data allow (the Cramér-Rao bound with the neighbours known). Subtracting the model of the
whole tilt image and adding back each particle's own model (analytically, :func:`with_own_particles`)
gives statistics whose residual is the noise and the model's error only.

Conventions are those of :mod:`tomoctfrefine.statistics`: a particle's observation, centred on it, is
``o = -c exp(i psi) sin(gamma_i) q`` with ``q = -1.02 sqrt(s) D F_h(M^T k)``.
"""
from __future__ import annotations

import numpy as np
import scipy.fft

from .statistics import TiltStatistics

#: Finest detail the neighbour model renders (Å): beyond it the particles' signal in a box is far below
#: the noise (at the true CTF of the accuracy set, the scale fitted on 12 Å to Nyquist scatters as the
#: noise alone predicts, z 0.92, with or without the model), and the statistics accumulated at the
#: input CTF are used there, taken to the refined CTF (:meth:`TiltStatistics.with_phase_change`).
NEIGHBOUR_MODEL_RESOLUTION_ANGSTROM = 10.0


def render_tilt_model(
    tomogram,
    tilt: int,
    image_positions: np.ndarray,
    slices: np.ndarray,
    depth_phase: np.ndarray,
    scale: float,
    even_zernike=(),
    odd_phase_rad: np.ndarray | None = None,
    image_shape: tuple[int, int] | None = None,
    workers: int = -1,
    max_radius_px: float | None = None,
) -> np.ndarray:
    """The noiseless model of one tilt image, ``(H, W)`` float32.

    Parameters
    ----------
    tomogram : Tomogram
        Geometry and the CTF to render with.
    tilt : int
    image_positions : ndarray (m, 2+)
        Projected particle centres in this tilt (px), e.g. ``forward.image_positions_px(...)[:, tilt]``.
    slices : ndarray (m, s, s//2+1) complex
        Central slices ``F_h(M^T k)`` of the particles' half maps (``kernels.central_slices``).
    depth_phase : ndarray (m,)
        ``pi lambda dz_i`` of each particle's depth defocus (rad Å²), e.g.
        ``pi * wavelength * forward.depth_defocus_angstrom(tomogram, positions)[:, tilt]``.
    scale : float
        The tilt's contrast scale ``c``.
    even_zernike : sequence of float
        Even aberration coefficients (in gamma).
    odd_phase_rad : ndarray (s, s//2+1) or None
    image_shape : (H, W) or None
        Default: the tomogram's image size.
    workers : int
        FFT threads.
    max_radius_px : float or None
        The radius beyond which ``slices`` are 0 (``central_slices``' ``sqrt(max_radius2)``): the
        spectra are then made, and transformed along y, only up to that column (the same image, bit
        for bit, at a fraction of the cost when the model stops well below Nyquist).
    """
    from . import forward, kernels

    s = slices.shape[1]
    sh = s // 2 + 1
    height, width = image_shape if image_shape is not None else tuple(tomogram.image_size_px)[::-1]
    out = np.zeros((height, width), dtype=np.float32)
    if not len(slices):
        return out
    gamma = forward.tilt_gamma(tomogram, s, even_zernike, [tilt])[0]
    damping = forward.tilt_damping(tomogram, s, [tilt])[0]
    common = -scale * -forward.prediction_normalisation(s) * damping
    common = common * np.exp(1j * odd_phase_rad) if odd_phase_rad is not None else common.astype(np.complex128)
    origins, shifts = forward.box_origins_and_shifts(image_positions, s)
    freq_unit2 = 1.0 / (s * tomogram.pixel_size_angstrom) ** 2
    columns = sh if max_radius_px is None else max(1, min(sh, int(np.floor(max_radius_px)) + 1))
    pruned = columns < 0.8 * sh
    if not pruned:
        columns = sh
    phasor = np.ascontiguousarray(np.exp(1j * gamma)[:, :columns])
    common = np.ascontiguousarray(common[:, :columns])
    chunk = 64
    spectra = np.empty((min(chunk, len(slices)), s, columns), dtype=np.complex64)
    # beyond the slices' radius the spectra are 0: only the first columns go through the y pass
    full = np.zeros((min(chunk, len(slices)), s, sh), dtype=np.complex64) if pruned else None
    for start in range(0, len(slices), chunk):
        rows = slice(start, min(start + chunk, len(slices)))
        n = rows.stop - rows.start
        kernels.model_spectra(slices[rows, :, :columns], np.ascontiguousarray(shifts[rows], dtype=np.float64),
                              np.ascontiguousarray(depth_phase[rows], dtype=np.float64), phasor, freq_unit2,
                              common, spectra[:n])
        if pruned:
            full[:n, :, :columns] = scipy.fft.ifft(spectra[:n], axis=1, norm="ortho", workers=workers)
            patches = scipy.fft.irfft(full[:n], n=s, axis=2, norm="ortho", workers=workers)
        else:
            patches = scipy.fft.irfft2(spectra[:n], s=(s, s), norm="ortho", workers=workers)
        kernels.add_patches(out, patches, np.ascontiguousarray(origins[rows]))
    return out


def with_own_particles(residual: TiltStatistics, scale, odd_phase_rad: np.ndarray | None = None) -> TiltStatistics:
    """Statistics of ``residual + own model`` from the statistics of the residual images.

    ``residual`` was accumulated on the tilt images minus :func:`render_tilt_model` (every particle at
    the statistics' CTF and the per-tilt ``scale``). Adding each particle's own model
    ``-c exp(i psi) sin(gamma) q`` back to its observation changes, exactly,
    ``b_s -> b_s - c exp(i psi) a_ss``, ``b_c -> b_c - c exp(i psi) a_sc`` and
    ``oo -> oo + c^2 a_ss - 2 c Re(exp(-i psi) b_s)``; the ``a`` terms do not involve the observations.
    """
    c = np.asarray(scale, dtype=float)[:, None, None]
    phasor = 1.0 if odd_phase_rad is None else np.exp(1j * np.asarray(odd_phase_rad))[None]
    b_s = residual.b_s - c * phasor * residual.a_ss
    b_c = residual.b_c - c * phasor * residual.a_sc
    oo = residual.oo + c**2 * residual.a_ss - 2 * c * np.real(np.conj(phasor) * residual.b_s)
    return TiltStatistics(residual.a_ss, residual.a_sc, residual.a_cc, b_s, b_c, oo, residual.particle_count,
                          residual.box_size_px, residual.pixel_size_angstrom)


def merged_statistics(inner: TiltStatistics, outer: TiltStatistics, radius_px: float) -> TiltStatistics:
    """``inner``'s sums at the pixels within ``radius_px`` of the origin, ``outer``'s beyond (both at the
    same CTF): the neighbour model is needed only where the particles' signal competes with the noise."""
    from .reference import radius_px as pixel_radius

    inside = pixel_radius(inner.box_size_px) <= radius_px
    pick = lambda a, b: np.where(inside[None], a, b)  # noqa: E731
    return TiltStatistics(*(pick(getattr(inner, n), getattr(outer, n)) for n in ("a_ss", "a_sc", "a_cc", "b_s", "b_c", "oo")),
                          particle_count=inner.particle_count, box_size_px=inner.box_size_px,
                          pixel_size_angstrom=inner.pixel_size_angstrom)


def neighbour_removed_statistics(
    tomogram,
    images: np.ndarray,
    positions_px: np.ndarray,
    rotations: np.ndarray,
    half_sets: np.ndarray,
    trajectory_shifts_angstrom: np.ndarray | None,
    scale: np.ndarray,
    tilts: np.ndarray,
    references,
    cutoff_weight: np.ndarray,
    model_radius_px: float,
    even_zernike,
    odd_phase_rad: np.ndarray | None,
    outer: TiltStatistics,
    *,
    per_frame_noise: bool = False,
    cutoff_fraction: float = 0.0,
    scratch_path=None,
) -> TiltStatistics:
    """A tomogram's statistics with its particles' neighbours removed from every box.

    Every particle is rendered at ``tomogram``'s CTF and the per-tilt ``scale``
    (:func:`render_tilt_model`), the tilt images minus that model are accumulated with their own noise
    weights, and each particle's own model is added back (:func:`with_own_particles`); beyond
    ``model_radius_px`` the sums are ``outer``'s (the statistics accumulated at the input CTF, taken to
    ``tomogram``'s CTF).

    Parameters
    ----------
    tomogram : Tomogram
        At the CTF to render and accumulate with.
    images : ndarray (n_tilts, H, W)
        The tilt images (a memory-mapped stack is read one tilt at a time).
    positions_px, rotations, half_sets, trajectory_shifts_angstrom :
        The particles, as :func:`tomoctfrefine.statistics.compute_statistics` takes them.
    scale : ndarray (n_tilts,)
        Contrast scale of each tilt to render with.
    tilts : ndarray of int
        The tilts to model and accumulate (the others get empty sums).
    references : PreparedReferences
        Cropped to ``model_radius_px`` or beyond.
    cutoff_weight : ndarray (s, s//2+1)
        The reference's frequency weight (multiplies the residual's noise weights).
    model_radius_px : float
        The neighbour model's radius (Fourier pixels of the box).
    even_zernike, odd_phase_rad :
        The aberrations to render and accumulate with.
    outer : TiltStatistics
        Used beyond ``model_radius_px``.
    per_frame_noise : bool
        Noise spectrum per tilt (``--per_frame_noise``).
    cutoff_fraction : float
        RELION's ``--cutoff_fract`` row ranges (:func:`tomoctfrefine.forward.row_range_mask`); 0: none.
    scratch_path : path or None
        Where the residual stack is kept while it is accumulated (in memory if None). Its blocks are
        allocated before it is mapped, so that a full disk is an ``OSError`` here and not a ``SIGBUS``
        at the first write.
    """
    import os

    import numba

    from . import forward, kernels
    from . import reference as reference_mod
    from .io.maps import release_pages
    from .statistics import compute_statistics

    s = outer.box_size_px
    n_tilts, height, width = images.shape
    image_positions = forward.image_positions_px(tomogram, positions_px, trajectory_shifts_angstrom)
    matrices = forward.particle_matrices(tomogram, rotations)
    depth_phase = np.pi * tomogram.optics.wavelength_angstrom * forward.depth_defocus_angstrom(tomogram, positions_px)
    selected = set(np.asarray(tilts, dtype=int).tolist())
    if scratch_path is None:
        residual = np.empty(images.shape, dtype=np.float32)
    else:
        from pathlib import Path

        scratch_path = Path(scratch_path)
        scratch_path.parent.mkdir(parents=True, exist_ok=True)
        header_bytes = 128  # .npy v1 header of a 3-d float32 array; open_memmap extends the file as needed
        with open(scratch_path, "wb") as handle:
            os.posix_fallocate(handle.fileno(), 0, header_bytes + residual_bytes(images.shape))
        residual = np.lib.format.open_memmap(scratch_path, mode="w+", dtype=np.float32, shape=images.shape)
    try:
        workers = numba.get_num_threads()
        for f in range(n_tilts):
            image = np.array(images[f], dtype=np.float32)
            release_pages(images)
            centres = image_positions[:, f, :2]
            near = np.nonzero(np.all((centres > -s / 2) & (centres < np.array([width, height]) + s / 2), axis=1))[0]
            if f in selected and len(near):
                slices = np.empty((len(near), s, s // 2 + 1), dtype=np.complex64)
                kernels.central_slices(references.bricks, references.grid_size, np.asarray(half_sets[near], dtype=np.int64) - 1,
                                       np.ascontiguousarray(matrices[near, f]), model_radius_px**2, slices)
                image -= render_tilt_model(tomogram, f, image_positions[near, f], slices, depth_phase[near, f], float(scale[f]),
                                           even_zernike, odd_phase_rad, (height, width), workers=workers,
                                           max_radius_px=model_radius_px)
            residual[f] = image
            release_pages(residual)
        if scratch_path is not None:
            residual.flush()
        inside = reference_mod.radius_px(s) <= model_radius_px
        weights = reference_mod.noise_weights(residual, s, per_frame=per_frame_noise) * cutoff_weight[None]
        if cutoff_fraction > 0:  # the rows' ranges relative to the whole slice's mean weight, as in prepare
            weights = weights * forward.row_range_mask(weights, forward.tilt_damping(tomogram, s), cutoff_fraction)
        weights = weights * inside[None]
        statistics = compute_statistics(tomogram, residual, positions_px, rotations, half_sets, references, weights,
                                        even_zernike, trajectory_shifts_angstrom=trajectory_shifts_angstrom,
                                        tilts=sorted(selected))
    finally:
        del residual
        if scratch_path is not None:
            scratch_path.unlink(missing_ok=True)
    statistics = with_own_particles(statistics, scale, odd_phase_rad)
    return merged_statistics(statistics, outer, model_radius_px)


def residual_bytes(image_stack_shape: tuple[int, int, int]) -> int:
    """Bytes of the float32 residual stack :func:`neighbour_removed_statistics` keeps."""
    n, h, w = image_stack_shape
    return 4 * n * h * w
