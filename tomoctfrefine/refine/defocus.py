"""Per-tilt defocus and astigmatism of one tomogram, from its :class:`TiltStatistics`.

Parametrisation. The change of tilt ``f`` is ``x_f = (dz, a_c, a_s)`` in Å: ``dz`` is added to both
U and V (positive = more underfocus; the tilt's mean defocus changes by exactly ``dz``), and the
astigmatism change adds ``-[[a_c, a_s], [a_s, -a_c]]`` to RELION's quadratic form ``A`` (spec §8.6).
The extra CTF phase common to all particles of the tilt is::

    delta(k) = -pi lambda (dz |k|^2 + a_c (kx^2 - ky^2) + a_s 2 kx ky)

Algorithm (cost and conventions in :mod:`tomoctfrefine.refine.likelihood`; the scale is profiled out,
so the result does not depend on the input scale):

1. RELION's scan: ``dz`` over ``scan_steps`` values from ``scan_min`` to ``scan_max`` (both included),
   astigmatism unchanged, per tilt (or, regularised, penalised towards the best common offset).
2. Local astigmatic fit (Levenberg-Marquardt on the Fisher matrix) on growing frequency bands
   (:func:`~tomoctfrefine.refine.likelihood.fit_with_continuation`), ending on the whole band.
3. Standard errors from the Fisher information at the optimum (scale profiled out).

Regularisation (optional): ``1/2 lambda sum_f (X_f - X_g)^T I_mean (X_f - X_g)`` on the tilts' *absolute*
values ``X_f = X_f,start + x_f`` (mean defocus, ``a_c``, ``a_s`` of the whole quadratic form, so that
per-tilt errors of the starting values are not carried into the common value), with a free common ``X_g``
and ``I_mean`` the mean Fisher matrix of the tilts with data. ``lambda`` is therefore
dimensionless and means the same whatever the box size, particle count or noise normalisation: a tilt
with information ``I_f`` ends at ``(I_f x_own + lambda I_mean x_g) / (I_f + lambda I_mean)``;
``lambda = 1`` pulls every tilt towards the common value as strongly as the data of an average tilt pull
it towards its own optimum. ``lambda = 0`` (default) fits every tilt independently. By default only the
astigmatism ``(a_c, a_s)`` is regularised (``regularised_components="astigmatism"``; the metric is then
the astigmatism block of ``I_mean``): the mean defocus of a tilt really varies along a series (hundreds
of Å) and pulling it together biases it, which is RELION's behaviour (``"all"``).

Tilts without visible particles (or without signal) keep their input values, scale and defocus.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..physics.ctf import defocus_from_quadratic_form, quadratic_form_from_defocus
from ..physics.geometry import fourier_grid_per_angstrom
from ..statistics import TiltStatistics
from .likelihood import BandStatistics, FrequencyBand, TomogramTerm, evaluate, fit_with_continuation, weighted_gram


@dataclass
class DefocusFit:
    """Refined defocus of the tilts of one tomogram (arrays of length ``n_tilts``).

    Attributes
    ----------
    defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg : ndarray
        New central CTF in RELION's convention after refinement (``U <= V``, angle in (-180, 180]);
        unrefined tilts keep their input values unchanged.
    defocus_change_angstrom : ndarray (n_tilts, 3)
        ``(dz, a_c, a_s)`` (module docstring).
    uncertainty_angstrom : ndarray
        Standard error of the mean defocus change ``dz`` (inf for unrefined tilts).
    covariance_angstrom2 : ndarray (n_tilts, 3, 3)
        Covariance of ``(dz, a_c, a_s)`` (the Fisher inverse, scale profiled out).
    scale : ndarray
        Per-tilt contrast scale at the new defocus (maximum-likelihood, ``>= 0``; the input scale, or 1,
        for unrefined tilts). It multiplies the box-independent prediction ``q``.
    scale_uncertainty : ndarray
        Standard error of ``scale`` (defocus unknown; inf for unrefined tilts).
    scale_information : ndarray
        Fisher information of the scale with everything else known, ``sum m e^T A e``: the weight of
        each tilt in a scale model fit.
    refined : ndarray of bool
    cost : ndarray
        Profiled cost ``J_f`` (= -log L + constant) at the result.
    scan_offsets_angstrom : ndarray (scan_steps,)
    scan_cost : ndarray (n_tilts, scan_steps)
        Profiled cost of the scan relative to ``1/2 sum m oo`` (lower is better).
    common_angstrom : ndarray (3,) or None
        The common absolute value ``X_g`` = (mean defocus, ``a_c``, ``a_s``) of a regularised fit
        (``A = -[[D + a_c, a_s], [a_s, D - a_c]]``; astigmatism ``hypot(a_c, a_s)``).
    """

    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    defocus_angle_deg: np.ndarray
    defocus_change_angstrom: np.ndarray
    uncertainty_angstrom: np.ndarray
    covariance_angstrom2: np.ndarray
    scale: np.ndarray
    scale_uncertainty: np.ndarray
    scale_information: np.ndarray
    refined: np.ndarray
    cost: np.ndarray
    scan_offsets_angstrom: np.ndarray
    scan_cost: np.ndarray
    common_angstrom: np.ndarray | None = None


def phase_basis_per_angstrom(wavelength_angstrom: float, freq_x, freq_y) -> np.ndarray:
    """``d delta / d (dz, a_c, a_s)`` in rad/Å, shape ``(3, *freq.shape)``."""
    k1 = np.pi * wavelength_angstrom
    return -k1 * np.stack([freq_x**2 + freq_y**2, freq_x**2 - freq_y**2, 2 * freq_x * freq_y])


def defocus_phase_change_rad(change_angstrom, wavelength_angstrom: float, box_size_px: int, pixel_size_angstrom: float) -> np.ndarray:
    """CTF phase change ``delta`` of each tilt on the full ``rfft2`` grid, ``(n_tilts, s, s//2+1)``, for
    changes ``(dz, a_c, a_s)`` ``(n_tilts, 3)`` (Å), e.g. ``DefocusFit.defocus_change_angstrom`` or a
    difference of :func:`absolute_parameters`."""
    fx, fy = fourier_grid_per_angstrom(box_size_px, pixel_size_angstrom)
    return np.einsum("fc,cyx->fyx", np.asarray(change_angstrom, dtype=float), phase_basis_per_angstrom(wavelength_angstrom, fx, fy))


def absolute_parameters(defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, n_tilts: int) -> np.ndarray:
    """``(D, a_c, a_s)`` of each tilt's CTF, ``A = -[[D + a_c, a_s], [a_s, D - a_c]]`` (Å), shape (n, 3);
    a change ``(dz, a_c, a_s)`` adds to them linearly."""
    out = np.empty((n_tilts, 3))
    u, v, a = (np.broadcast_to(np.asarray(x, dtype=float), (n_tilts,)) for x in (defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg))
    for f in range(n_tilts):
        a_xx, a_xy, a_yy = quadratic_form_from_defocus(u[f], v[f], a[f])
        out[f] = (-(a_xx + a_yy) / 2, -(a_xx - a_yy) / 2, -a_xy)
    return out


def apply_defocus_change(defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, change_angstrom):
    """New ``(U, V, angle)`` arrays after adding ``(dz, a_c, a_s)`` per tilt (RELION's eigen convention)."""
    change = np.atleast_2d(np.asarray(change_angstrom, dtype=float))
    n = len(change)
    u_in, v_in, a_in = (np.broadcast_to(np.asarray(v, dtype=float), (n,)) for v in (defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg))
    out = np.empty((3, n))
    for f in range(n):
        a_xx, a_xy, a_yy = quadratic_form_from_defocus(u_in[f], v_in[f], a_in[f])
        dz, a_c, a_s = change[f]
        out[:, f] = defocus_from_quadratic_form(a_xx - dz - a_c, a_xy - a_s, a_yy - dz + a_c)
    return out[0], out[1], out[2]


def defocus_scan(data: BandStatistics, wavelength_angstrom: float, offsets_angstrom: np.ndarray, psi=None) -> np.ndarray:
    """Profiled cost ``-1/2 c*^2 S_P`` of every tilt at every isotropic offset, shape ``(n_tilts, n_offsets)``."""
    phase = -np.pi * wavelength_angstrom * np.outer(data.freq2, np.asarray(offsets_angstrom, dtype=float))
    cos, sin = np.cos(phase), np.sin(phase)
    if psi is None:
        bs, bc = data.b_s.real, data.b_c.real
    else:
        rotation = np.exp(-1j * np.asarray(psi))
        bs, bc = (rotation * data.b_s).real, (rotation * data.b_c).real
    s_p = data.a_ss @ (cos * cos) + 2 * data.a_sc @ (cos * sin) + data.a_cc @ (sin * sin)
    # contiguous copies: numpy's matmul falls back to a slow loop on the strided .real views (0.5 s)
    s_r = np.ascontiguousarray(bs) @ cos + np.ascontiguousarray(bc) @ sin
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where((s_p > 0) & (s_r < 0), s_r * s_r / np.where(s_p > 0, s_p, 1.0), 0.0)
    return -0.5 * gain


def mean_fisher_metric(data: BandStatistics, basis: np.ndarray, change: np.ndarray, psi=None) -> np.ndarray:
    """Mean (over tilts with signal) Fisher matrix of the per-tilt parameters, scale profiled out."""
    ev = evaluate(data, change @ basis, psi, derivatives=True)
    u = ev.fisher_delta_scale @ basis.T
    safe = np.where(ev.s_p > 0, ev.s_p, 1.0)
    h = weighted_gram(ev.fisher_delta, basis, basis) - u[:, :, None] * u[:, None, :] / safe[:, None, None]
    ok = data.active & (ev.scale > 0)
    if not ok.any():
        return np.zeros((basis.shape[0],) * 2)
    return h[ok].mean(axis=0)


def regularisation_metric(data: BandStatistics, basis: np.ndarray, change: np.ndarray, components: str = "astigmatism") -> np.ndarray:
    """The penalty metric for ``lambda = 1``: the mean Fisher matrix, restricted to the astigmatism
    block (mean defocus free, and uncorrelated with it) when ``components == "astigmatism"``."""
    metric = mean_fisher_metric(data, basis, change)
    if components == "astigmatism":
        metric = metric.copy()
        metric[0, :] = 0.0
        metric[:, 0] = 0.0
    return metric


def refine_defocus(
    statistics: TiltStatistics,
    wavelength_angstrom: float,
    defocus_u_angstrom,
    defocus_v_angstrom,
    defocus_angle_deg,
    *,
    scan_min_angstrom: float = -3000.0,
    scan_max_angstrom: float = 3000.0,
    scan_steps: int = 100,
    band: FrequencyBand = FrequencyBand(),
    fit_astigmatism: bool = True,
    regularisation_lambda: float = 0.0,
    odd_phase_rad: np.ndarray | None = None,
    input_scale=None,
    astigmatism_capture_angstrom: float = 1000.0,
    regularised_components: str = "astigmatism",
    tilt_mask=None,
) -> DefocusFit:
    """Refine the central defocus (and astigmatism) of every tilt of one tomogram.

    Parameters
    ----------
    statistics : TiltStatistics
        Accumulated at the current CTF (``defocus_*`` below, current even aberrations).
    wavelength_angstrom : float
        Electron wavelength (``Optics.wavelength_angstrom``).
    defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg : array_like (n_tilts,)
        The current central CTF of each tilt (the one the statistics were computed with).
    scan_min_angstrom, scan_max_angstrom, scan_steps :
        RELION's ``--d0``, ``--d1``, ``--ds``: the isotropic scan grid (``scan_steps < 2``: no scan).
    band : FrequencyBand
        Frequencies used (default 30 Å to the box corners).
    fit_astigmatism : bool
        Fit ``(dz, a_c, a_s)``; otherwise only ``dz``.
    regularisation_lambda : float
        Dimensionless strength of the pull towards a common change (module docstring); 0 = none.
    regularised_components : {"astigmatism", "all"}
        What the regularisation pulls together: only the astigmatism (default: a property of the
        microscope, common to the tilts, while the mean defocus of a tilt really varies along the series)
        or, as RELION does, the mean defocus as well.
    tilt_mask : array_like of bool (n_tilts,) or None
        Only these tilts are refined (RELION's ``--min_frame/--max_frame``); the others keep their
        input values exactly as tilts without particles do.
    odd_phase_rad : ndarray (s, s//2+1) or None
        Current odd aberration phase (the statistics hold raw observations).
    input_scale : array_like (n_tilts,) or None
        Scale reported for tilts that cannot be refined (default 1).
    astigmatism_capture_angstrom : float
        Size of starting errors the local fit must capture (sets its first band).

    Returns
    -------
    DefocusFit
    """
    n = statistics.n_tilts
    data = BandStatistics.from_statistics(statistics, band)
    if tilt_mask is not None:
        data.active &= np.asarray(tilt_mask, dtype=bool)
    if odd_phase_rad is not None:
        # psi is not refined here: fold exp(-i psi) into b once.
        rotation = np.exp(-1j * np.asarray(odd_phase_rad)[data.pixel_y, data.pixel_x])
        data.b_s, data.b_c = rotation * data.b_s, rotation * data.b_c
    basis_full = phase_basis_per_angstrom(wavelength_angstrom, data.freq_x, data.freq_y)
    m = 3 if fit_astigmatism else 1
    basis = basis_full[:m]

    if scan_steps >= 2:
        offsets = np.linspace(scan_min_angstrom, scan_max_angstrom, int(scan_steps))
    else:
        offsets = np.array([0.0])
    scan = defocus_scan(data, wavelength_angstrom, offsets)
    x = np.zeros((n, m))
    metric = None
    if regularised_components not in ("astigmatism", "all"):
        raise ValueError(f"regularised_components must be 'astigmatism' or 'all', got {regularised_components!r}")
    x[:, 0] = offsets[np.argmin(scan, axis=1)]
    x[~data.active] = 0.0
    start = absolute_parameters(defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, n)[:, :m]
    if regularisation_lambda > 0 and (regularised_components == "all" or m == 3):
        metric = regularisation_lambda * regularisation_metric(data, basis, x, regularised_components)
        if metric[0, 0] > 0 and data.active.any():
            common_defocus = np.median((start[:, 0] + x[:, 0])[data.active])
            penalised = scan + 0.5 * metric[0, 0] * (start[:, :1] + offsets[None, :] - common_defocus) ** 2
            x[data.active, 0] = offsets[np.argmin(penalised, axis=1)][data.active]
    term = TomogramTerm(data=data, tilt_basis=basis, x=x, regularisation_metric=metric, regularisation_offset=start)
    result = fit_with_continuation([term], None, wavelength_angstrom, astigmatism_capture_angstrom)

    return assemble_defocus_fit(
        term, result, 0, defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, input_scale, offsets, scan
    )


def assemble_defocus_fit(term, result, index, defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, input_scale,
                         offsets=None, scan=None) -> DefocusFit:
    """Build the :class:`DefocusFit` of tomogram ``index`` of a likelihood fit (shared with aberrations)."""
    data = term.data
    n = data.n_tilts
    m = term.tilt_basis.shape[0]
    refined = data.active & (result.scales[index] > 0) & (not term.fixed)
    change = np.zeros((n, 3))
    change[:, :m] = np.where(refined[:, None], term.x, 0.0)
    covariance = np.full((n, 3, 3), np.inf)
    if not term.fixed:
        covariance[:, :m, :m] = result.tilt_covariance[index]
    covariance[~refined] = np.inf
    if m < 3:
        covariance[refined, m:, :] = 0.0
        covariance[refined, :, m:] = 0.0
    fallback_scale = np.ones(n) if input_scale is None else np.asarray(input_scale, dtype=float)
    has_scale = data.active & (result.scales[index] > 0)
    scale = np.where(has_scale, result.scales[index], fallback_scale)
    u_in, v_in, a_in = (np.broadcast_to(np.asarray(a, dtype=float), (n,)).copy() for a in (defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg))
    u, v, angle = apply_defocus_change(u_in, v_in, a_in, change)
    u[~refined], v[~refined], angle[~refined] = u_in[~refined], v_in[~refined], a_in[~refined]
    common = None
    if term.common is not None and term.regularisation_metric is not None:
        common = np.zeros(3)
        common[:m] = term.common
        if m < 3:  # unregularised components: the mean of the tilts' absolute values
            common[m:] = absolute_parameters(u, v, angle, n)[refined][:, m:].mean(axis=0) if refined.any() else 0.0
    return DefocusFit(
        defocus_u_angstrom=u,
        defocus_v_angstrom=v,
        defocus_angle_deg=angle,
        defocus_change_angstrom=change,
        uncertainty_angstrom=np.where(refined, np.sqrt(np.abs(covariance[:, 0, 0])), np.inf),
        covariance_angstrom2=covariance,
        scale=scale,
        scale_uncertainty=np.where(has_scale, np.sqrt(np.abs(result.scale_variance[index])), np.inf),
        scale_information=np.where(data.active, result.scale_information[index], 0.0),
        refined=refined,
        cost=result.costs[index],
        scan_offsets_angstrom=np.zeros(0) if offsets is None else offsets,
        scan_cost=np.zeros((n, 0)) if scan is None else scan,
        common_angstrom=common,
    )
