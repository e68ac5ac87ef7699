"""Per-tilt contrast scale: per frame, Beer-Lambert per tomogram, Beer-Lambert with a global luminance.

Normalisation. The scale ``c_f`` multiplies the CTF-free prediction ``q`` of the statistics, which is
normalised so that a noiseless, unit-contrast projection of the reference has scale 1
(:mod:`tomoctfrefine.statistics`). ``c_f`` is therefore the contrast of tilt ``f`` relative to the
reference, independent of the box size (RELION's values are about ``sqrt(box)`` times larger because
its projections are not normalised).

Evidence. For fixed phases the cost is exactly quadratic in ``c``:
``J_f(c) = J_f(c_hat) + 1/2 I_f (c - c_hat)^2`` with ``c_hat`` the per-frame estimate and
``I_f = sum m e^T A e`` its Fisher information (:class:`~tomoctfrefine.refine.defocus.DefocusFit`
gives both). Every model is fitted by minimising ``1/2 sum_f I_f (c_model_f - c_hat_f)^2``, i.e. the
likelihood itself, each tilt weighted by its information (RELION weights ``(S2 c - S1)^2`` by the
square of the information, which lets a few strong tilts dominate).

Beer-Lambert: ``c_f = L d exp(-t / |n . v_f|)`` with luminance ``L``, optional dose factor ``d`` (1, or
RELION's fractional dose), relative ice thickness ``t = -ln kappa >= 0``, ice normal ``n`` in the plane
orthogonal to the tilt axis and beam direction ``v_f`` of tilt ``f`` (spec §9.2). The fits start from a
grid over the normal's angle and the thickness (the luminance is linear and solved exactly on the grid),
so they cannot fail for lack of a starting point; parameters are bounded; when a fit is impossible
(fewer than three tilts with information) it says why and keeps the per-frame values. NaN is never
returned.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

MIN_COSINE = 1e-3
MAX_THICKNESS = 20.0


@dataclass
class TiltGeometry:
    """Beam direction of each tilt in the tomogram frame and the tilt-plane axes (spec §9.2)."""

    beam_directions: np.ndarray  # (n_tilts, 3), unit
    tilt_axis: np.ndarray  # (3,)
    p_hat: np.ndarray  # (3,)
    q_hat: np.ndarray  # (3,)

    def normal(self, angle_rad: float) -> np.ndarray:
        n = np.cos(angle_rad) * self.q_hat + np.sin(angle_rad) * self.p_hat
        return n / np.linalg.norm(n)

    def inverse_cosines(self, angle_rad: float) -> np.ndarray:
        """``1 / |n . v_f|`` (path length through a slab of unit thickness)."""
        return 1.0 / np.maximum(np.abs(self.beam_directions @ self.normal(angle_rad)), MIN_COSINE)


@dataclass
class ScaleFit:
    """Per-tilt scales of one tomogram from a scale model (never NaN).

    Attributes
    ----------
    scale : ndarray (n_tilts,)
    model : str
        ``"per_frame"``, ``"beer_lambert"`` or ``"global_beer_lambert"`` (what was actually used).
    luminance : float or None
        ``L`` (without the dose factor, as RELION writes ``rlnTomoRelativeLuminance``).
    relative_ice_thickness : float or None
        ``t = -ln kappa`` (RELION's ``rlnTomoRelativeIceThickness``).
    ice_normal : ndarray (3,) or None
        RELION's ``rlnTomoIceNormalX/Y/Z``.
    success : bool
        False when the requested model could not be fitted and a fallback was used.
    message : str
        What was done, and why if it was not the requested model.
    """

    scale: np.ndarray
    model: str
    luminance: float | None = None
    relative_ice_thickness: float | None = None
    ice_normal: np.ndarray | None = None
    success: bool = True
    message: str = ""


def tilt_geometry(projection_matrices: np.ndarray) -> TiltGeometry:
    """RELION's tilt geometry from the projection matrices ``(n_tilts, 4, 4)``.

    ``v_f`` = normalised third row of ``P_f[:3, :3]``; the tilt axis is the eigenvector of the smallest
    eigenvalue of ``sum_f z_f z_f^T`` (``z_f`` unnormalised rows); ``m = normalise(sum z_f)``,
    ``p = normalise(m x a)``, ``q = normalise(a x p)``.
    """
    rows = np.asarray(projection_matrices, dtype=float)[:, 2, :3]
    beams = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    _, vectors = np.linalg.eigh(rows.T @ rows)
    axis = vectors[:, 0]
    mean = rows.sum(axis=0)
    mean /= np.linalg.norm(mean)
    p_hat = np.cross(mean, axis)
    p_hat /= np.linalg.norm(p_hat)
    q_hat = np.cross(axis, p_hat)
    q_hat /= np.linalg.norm(q_hat)
    return TiltGeometry(beams, axis, p_hat, q_hat)


def scale_evidence(
    statistics,
    *,
    defocus_change_phase_rad=None,
    odd_phase_rad=None,
    band=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame scale estimates and their information at fixed phases (no defocus refinement).

    Use this when the defocus is not refined; otherwise take ``DefocusFit.scale`` and
    ``DefocusFit.scale_information``.

    Parameters
    ----------
    statistics : TiltStatistics
    defocus_change_phase_rad : ndarray (n_tilts, s, s//2+1) or None
        Extra phase ``delta`` of each tilt relative to the statistics' CTF (None: the current CTF).
    odd_phase_rad : ndarray (s, s//2+1) or None
        Odd aberration phase (the statistics hold raw observations).
    band : FrequencyBand or None
        Default: 30 Å to the box corners.

    Returns
    -------
    (estimate, information) : ndarrays (n_tilts,)
        ``max(0, -S_R/S_P)`` and ``S_P`` (0 for tilts without particles; never NaN).
    """
    from .likelihood import BandStatistics, FrequencyBand, evaluate

    data = BandStatistics.from_statistics(statistics, band or FrequencyBand())
    delta = 0.0 if defocus_change_phase_rad is None else np.asarray(defocus_change_phase_rad)[:, data.pixel_y, data.pixel_x]
    psi = None if odd_phase_rad is None else np.asarray(odd_phase_rad)[data.pixel_y, data.pixel_x]
    ev = evaluate(data, delta, psi)
    information = np.where(data.active, ev.s_p, 0.0)
    return np.where(data.active, ev.scale, 0.0), information


#: The scale is fitted on every frequency from this radius (px of the estimation box) to the corners.
#: Below it, the observed boxes carry the disk-shaped pedestal left by the cropCircle's corner-mean
#: subtraction (its transform lives within ~1.2 px of the origin), which no prediction has: with the
#: neighbours' signal in the corners it is large.
SCALE_LOWEST_RADIUS_PX = 3

#: The same once the neighbouring particles are modelled (``pipeline``'s scale step): the corners then
#: hold noise only, the pedestal is small, and the 1-3 px pixels add 4-9 % of a tilt's scale information
#: (more at high dose). At the true CTF of the accuracy sets, from 3 px / from 1 px: 1.28 / 1.16x the
#: Cramér-Rao bound (set d), 1.19 / 1.17x (c), 1.10 / 1.11x (a).
MODELLED_SCALE_LOWEST_RADIUS_PX = 1


def scale_band(box_size_px: int, pixel_size_angstrom: float, lowest_radius_px: float | None = None):
    """The frequencies of the scale fit: ``lowest_radius_px`` (default ``SCALE_LOWEST_RADIUS_PX``) px
    to the box corners.

    Wider than the defocus band (``--kmin``, 30 Å): most of a tilt's scale information is at low
    frequency (at box 256 and 2 Å, 30 Å to the corners holds about a third of it), and the defocus
    no longer matters there once it is refined.
    """
    from .likelihood import FrequencyBand

    lowest = SCALE_LOWEST_RADIUS_PX if lowest_radius_px is None else lowest_radius_px
    return FrequencyBand(kmin_angstrom=box_size_px * pixel_size_angstrom / lowest, kmax_angstrom=None)


def _fallback(scale_estimate, scale_information, input_scale):
    n = len(scale_estimate)
    fallback = np.ones(n) if input_scale is None else np.asarray(input_scale, dtype=float).copy()
    fallback[~np.isfinite(fallback)] = 1.0
    estimate = np.asarray(scale_estimate, dtype=float)
    information = np.asarray(scale_information, dtype=float)
    valid = (information > 0) & np.isfinite(information) & np.isfinite(estimate)
    return fallback, estimate, np.where(valid, information, 0.0), valid


def fit_per_frame_scale(scale_estimate, scale_information, input_scale=None) -> ScaleFit:
    """Per-tilt scale: the estimate where the tilt has information, the input scale (or 1) elsewhere."""
    fallback, estimate, _, valid = _fallback(scale_estimate, scale_information, input_scale)
    scale = np.where(valid, np.maximum(estimate, 0.0), fallback)
    kept = int((~valid).sum())
    message = "per-frame scale" + (f"; {kept} tilt(s) without information keep their input scale" if kept else "")
    return ScaleFit(scale=scale, model="per_frame", message=message)


def _profile_luminance(target, information, design):
    """Best ``L`` for ``c = L * design`` (weighted least squares, kept positive)."""
    denominator = np.sum(information * design * design)
    if denominator <= 0:
        return 0.0
    return max(float(np.sum(information * target * design) / denominator), 1e-12)


def _grid_start(geometry, estimate, information, dose, valid):
    """Best (cost, angle, thickness, luminance) on a grid, the luminance solved exactly."""
    thicknesses = np.linspace(0.0, 5.0, 101)[:, None]
    target, weight = estimate[valid], information[valid]
    best = (np.inf, 0.0, 0.0, 1.0)
    for angle in np.deg2rad(np.arange(-90.0, 90.0, 2.5)):
        design = dose * np.exp(-thicknesses * geometry.inverse_cosines(angle)[valid][None, :])
        lum = np.maximum((design * weight * target).sum(1) / np.maximum((design * design * weight).sum(1), 1e-300), 1e-12)
        cost = (weight * (lum[:, None] * design - target) ** 2).sum(1)
        j = int(np.argmin(cost))
        if cost[j] < best[0]:
            best = (float(cost[j]), float(angle), float(thicknesses[j, 0]), float(lum[j]))
    return best


def fit_beer_lambert(
    scale_estimate,
    scale_information,
    projection_matrices: np.ndarray,
    *,
    input_scale=None,
    dose_factor: float = 1.0,
) -> ScaleFit:
    """Beer-Lambert scale model of one tomogram (module docstring), weighted by information.

    Parameters
    ----------
    scale_estimate, scale_information : array_like (n_tilts,)
        Per-frame estimates and their Fisher information (``DefocusFit.scale`` and
        ``DefocusFit.scale_information``; information 0 marks tilts without data).
    projection_matrices : ndarray (n_tilts, 4, 4)
    input_scale : array_like or None
        Kept (with a message) when no fit is possible.
    dose_factor : float
        ``d`` in ``c = L d exp(-t/|n.v|)``.
    """
    fallback, estimate, information, valid = _fallback(scale_estimate, scale_information, input_scale)
    if valid.sum() < 3 or np.sum(information * np.maximum(estimate, 0)) <= 0:
        per_frame = fit_per_frame_scale(scale_estimate, scale_information, input_scale)
        per_frame.success = False
        per_frame.message = f"Beer-Lambert fit impossible ({int(valid.sum())} tilt(s) with a positive scale estimate, 3 needed): per-frame scales kept"
        return per_frame
    geometry = tilt_geometry(projection_matrices)
    _, angle, t, lum = _grid_start(geometry, estimate, information, dose_factor, valid)
    weights = np.sqrt(information[valid])

    def residuals(params):
        log_lum, thickness, phi = params
        model = np.exp(log_lum) * dose_factor * np.exp(-thickness * geometry.inverse_cosines(phi)[valid])
        return weights * (model - estimate[valid])

    start = np.array([np.log(lum), t, angle])
    start_cost = np.sum(residuals(start) ** 2)
    try:
        solution = least_squares(
            residuals, start, bounds=([-60.0, 0.0, -np.pi], [60.0, MAX_THICKNESS, np.pi]), x_scale="jac", method="trf"
        )
        params = solution.x if np.all(np.isfinite(solution.x)) and 2 * solution.cost <= start_cost else start
    except (ValueError, np.linalg.LinAlgError):
        params = start
    log_lum, thickness, phi = params
    scale = np.exp(log_lum) * dose_factor * np.exp(-thickness * geometry.inverse_cosines(phi))
    return ScaleFit(
        scale=scale, model="beer_lambert", luminance=float(np.exp(log_lum)), relative_ice_thickness=float(thickness),
        ice_normal=geometry.normal(phi), success=True,
        message=f"Beer-Lambert fit: luminance {np.exp(log_lum):.4g}, relative ice thickness {thickness:.4g}",
    )


def fit_global_beer_lambert(
    scale_estimates: dict,
    scale_informations: dict,
    projection_matrices: dict,
    *,
    input_scales: dict | None = None,
    dose_factors: dict | None = None,
) -> dict:
    """Beer-Lambert with one luminance shared by all tomograms (RELION's default scale model).

    Parameters are dictionaries keyed by tomogram name (same meaning as in :func:`fit_beer_lambert`).
    Each tomogram is first fitted alone; the shared luminance then starts at the information-weighted
    best value for those thicknesses and normals, and everything is refined jointly (bounded).
    Tomograms that cannot be fitted keep their per-frame scales and say why.

    Returns
    -------
    dict[str, ScaleFit]
    """
    names = list(scale_estimates)
    input_scales = input_scales or {}
    dose_factors = dose_factors or {}
    singles = {
        name: fit_beer_lambert(scale_estimates[name], scale_informations[name], projection_matrices[name],
                               input_scale=input_scales.get(name), dose_factor=dose_factors.get(name, 1.0))
        for name in names
    }
    fitted = [name for name in names if singles[name].success]
    results = {name: singles[name] for name in names if name not in fitted}
    if not fitted:
        return results
    geometries = {name: tilt_geometry(projection_matrices[name]) for name in fitted}
    data = {name: _fallback(scale_estimates[name], scale_informations[name], input_scales.get(name)) for name in fitted}

    def designs(thickness_angles):
        out = {}
        for i, name in enumerate(fitted):
            t, phi = thickness_angles[2 * i], thickness_angles[2 * i + 1]
            out[name] = dose_factors.get(name, 1.0) * np.exp(-t * geometries[name].inverse_cosines(phi))
        return out

    start_shape = np.concatenate([[singles[n].relative_ice_thickness, np.arctan2(singles[n].ice_normal @ geometries[n].p_hat, singles[n].ice_normal @ geometries[n].q_hat)] for n in fitted])
    d = designs(start_shape)
    target = np.concatenate([data[n][1][data[n][3]] for n in fitted])
    information = np.concatenate([data[n][2][data[n][3]] for n in fitted])
    design = np.concatenate([d[n][data[n][3]] for n in fitted])
    lum = _profile_luminance(target, information, design)
    weights = np.sqrt(information)

    def residuals(params):
        dd = designs(params[1:])
        model = np.exp(params[0]) * np.concatenate([dd[n][data[n][3]] for n in fitted])
        return weights * (model - target)

    start = np.concatenate([[np.log(lum)], start_shape])
    lower = np.concatenate([[-60.0], np.tile([0.0, -np.pi], len(fitted))])
    upper = np.concatenate([[60.0], np.tile([MAX_THICKNESS, np.pi], len(fitted))])
    start = np.clip(start, lower, upper)
    start_cost = np.sum(residuals(start) ** 2)
    try:
        solution = least_squares(residuals, start, bounds=(lower, upper), x_scale="jac", method="trf")
        params = solution.x if np.all(np.isfinite(solution.x)) and 2 * solution.cost <= start_cost else start
    except (ValueError, np.linalg.LinAlgError):
        params = start
    luminance = float(np.exp(params[0]))
    dd = designs(params[1:])
    for i, name in enumerate(fitted):
        t, phi = params[1 + 2 * i], params[2 + 2 * i]
        results[name] = ScaleFit(
            scale=luminance * dd[name], model="global_beer_lambert", luminance=luminance,
            relative_ice_thickness=float(t), ice_normal=geometries[name].normal(phi), success=True,
            message=f"global Beer-Lambert fit over {len(fitted)} tomogram(s): luminance {luminance:.4g}, relative ice thickness {t:.4g}",
        )
    return {name: results[name] for name in names}
