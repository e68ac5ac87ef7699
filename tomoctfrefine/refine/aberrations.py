"""Even and odd Zernike aberrations of an optics group, fitted jointly with every tilt's defocus and scale.

The statistics of all tomograms of the group are pooled. The cost is the sum of every tilt's profiled
likelihood (:mod:`tomoctfrefine.refine.likelihood`) with

    delta_f(k) = x_f . (d delta/d x)(k) + sum_j alpha_j E_j(k),      psi(k) = psi_0(k) + sum_j beta_j O_j(k)

(``x_f`` the tilt's defocus change, ``E_j`` even and ``O_j`` odd Zernike polynomials in RELION's
convention, frequencies in 1/Å, ``psi_0`` the existing odd phase: the statistics hold raw observations).
Defocus, astigmatism, scale and aberrations are fitted together over the whole band (growing bands
for the basin of attraction), because the even aberrations matter most where RELION's fit is weakest,
beyond ~6.7 Å.

Degeneracy. ``Z(0,2) = 2 rho^2 - 1`` and ``Z(+-2,2) = rho^2 (cos, sin) 2 phi`` are exactly the defocus and
astigmatism of every tilt, and the higher polynomials contain ``rho^2`` parts too. When the defocus is
refined per tilt, the even aberrations are fitted in a *defocus-free* basis: for every ``n >= 4``, ``Z(m,n)`` with its ``rho^2`` and constant parts removed (expressed in
RELION's coefficients as ``Z(m,n)`` plus compensating ``Z(0,2)``, ``Z(+-2,2)``, ``Z(0,0)`` terms), and
optionally ``Z(0,0)`` itself. So the refined defocus is the whole ``|k|^2`` coefficient of the CTF phase
and the aberrations carry none (as the simulator's "pure rho^4" truths).
Without per-tilt defocus refinement every even polynomial is fitted as it is (RELION's way).

The new coefficients are *added* to the existing ones (RELION: the output list has the length of the new
order; existing entries beyond it are dropped).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import factorial

import numpy as np

from ..physics import zernike
from .defocus import DefocusFit, absolute_parameters, assemble_defocus_fit, phase_basis_per_angstrom, regularisation_metric
from .likelihood import BandStatistics, FrequencyBand, SharedPhase, TomogramTerm, fit_with_continuation


@dataclass
class AberrationFit:
    """Result of :func:`refine_aberrations` for one optics group.

    Attributes
    ----------
    even_change, odd_change : ndarray
        Fitted change of the coefficients in RELION's index order (length ``even_count(ne)`` /
        ``odd_count(no)``; empty if that fit was not requested).
    even_coefficients, odd_coefficients : ndarray
        New coefficients to write (``existing + change``, RELION's rule).
    even_uncertainty, odd_uncertainty : ndarray
        Standard errors of the changes (RELION order).
    fitted_even_indices : list of int
        Even polynomials fitted as free parameters (the others only compensate, see module docstring).
    defocus : dict[str, DefocusFit]
        Per-tomogram defocus and scale refined jointly with the aberrations (the defocus is left as it
        started, but reported, when ``refine_defocus`` is False).
    even_phase_per_pixel, even_phase_fit, odd_phase_per_pixel, odd_phase_fit : ndarray (s, s//2+1)
        Phase maps of the change (rad; 0 outside the band), RELION's diagnostics: per pixel, the even
        phase is ``atan2`` of the unconstrained per-pixel optimum of ``(cos, sin)`` and the odd one the
        argument of the per-pixel optimum, both pooled over all tilts at the refined defocus and scale.
    even_weight_per_pixel, odd_weight_per_pixel : ndarray (s, s//2+1)
        Fisher information of the per-pixel phases (to mask the maps where they mean nothing).
    """

    even_change: np.ndarray
    odd_change: np.ndarray
    even_coefficients: np.ndarray
    odd_coefficients: np.ndarray
    even_uncertainty: np.ndarray
    odd_uncertainty: np.ndarray
    fitted_even_indices: list
    defocus: dict
    even_phase_per_pixel: np.ndarray
    even_phase_fit: np.ndarray
    odd_phase_per_pixel: np.ndarray
    odd_phase_fit: np.ndarray
    even_weight_per_pixel: np.ndarray
    odd_weight_per_pixel: np.ndarray


def even_index(m: int, n: int) -> int:
    """RELION's even index of ``Z(m, n)`` (inverse of :func:`zernike.even_index_to_mn`)."""
    k = n // 2
    return k * k + k + m // 2


def _radial_coefficient(m: int, n: int, power: int) -> float:
    m = abs(m)
    for k in range((n - m) // 2 + 1):
        if n - 2 * k == power:
            return (-1) ** k * factorial(n - k) / (factorial(k) * factorial((n + m) // 2 - k) * factorial((n - m) // 2 - k))
    return 0.0


def even_fit_design(even_order: int, defocus_free: bool, fit_constant_phase: bool = False) -> tuple[list, np.ndarray]:
    """Fitted even polynomials and the matrix taking their coefficients to RELION's coefficients.

    Returns ``(indices, design)`` with ``design`` of shape ``(len(indices), even_count(even_order))``:
    RELION coefficients = ``alpha @ design``. With ``defocus_free`` the basis is the one of the module
    docstring; otherwise the identity on every index.
    """
    count = zernike.even_count(even_order)
    if not defocus_free:
        return list(range(count)), np.eye(count)
    indices, rows = [], []
    for i in range(count):
        m, n = zernike.even_index_to_mn(i)
        if n == 0:
            if fit_constant_phase:
                indices.append(i)
                row = np.zeros(count)
                row[i] = 1.0
                rows.append(row)
            continue
        if n == 2:
            continue
        row = np.zeros(count)
        row[i] = 1.0
        r2 = _radial_coefficient(m, n, 2)
        if m == 0:
            r0 = _radial_coefficient(m, n, 0)
            row[even_index(0, 2)] -= r2 / 2
            row[even_index(0, 0)] -= r2 / 2 + r0
        elif abs(m) == 2:
            row[even_index(m, 2)] -= r2
        indices.append(i)
        rows.append(row)
    return indices, np.array(rows).reshape(len(rows), count)


def add_coefficients(existing, change) -> np.ndarray:
    """RELION's update: ``change`` plus the existing coefficient of the same index (missing = 0)."""
    change = np.asarray(change, dtype=float)
    existing = np.asarray(existing, dtype=float)[: len(change)]
    out = change.copy()
    out[: len(existing)] += existing
    return out


def full_centred_image(half: np.ndarray, antisymmetric: bool) -> np.ndarray:
    """An ``rfft2`` half-plane map ``(s, s//2+1)`` as a full ``s x s`` image with the origin at
    ``(s//2, s//2)`` (RELION's diagnostic MRC layout); the missing half is ``f(-k) = f(k)`` (even
    phases) or ``-f(k)`` (odd phases)."""
    s = half.shape[0]
    sign = -1.0 if antisymmetric else 1.0
    full = np.zeros((s, s))
    ky = np.fft.fftfreq(s) * s
    kx = np.arange(half.shape[1])
    yy, xx = np.meshgrid(ky.astype(int), kx, indexing="ij")
    full[(yy + s // 2) % s, (xx + s // 2) % s] = half
    # the conjugate half, never overwriting a stored pixel
    neg_y, neg_x = (-yy + s // 2) % s, (-xx + s // 2) % s
    stored = np.zeros((s, s), dtype=bool)
    stored[(yy + s // 2) % s, (xx + s // 2) % s] = True
    free = ~stored[neg_y, neg_x]
    full[neg_y[free], neg_x[free]] = sign * half[free]
    return full


def _rotated(data: BandStatistics, delta):
    """``R^T A R`` and ``R^T b`` with ``R`` the rotation by ``delta`` (so ``e(delta + chi) = R e(chi)``)."""
    c, s = np.cos(delta), np.sin(delta)
    a00 = c * c * data.a_ss + 2 * c * s * data.a_sc + s * s * data.a_cc
    a01 = -c * s * data.a_ss + (c * c - s * s) * data.a_sc + c * s * data.a_cc
    a11 = s * s * data.a_ss - 2 * c * s * data.a_sc + c * c * data.a_cc
    return a00, a01, a11, c * data.b_s + s * data.b_c, -s * data.b_s + c * data.b_c


def refine_aberrations(
    statistics: dict,
    wavelength_angstrom: dict,
    current_ctf: dict,
    *,
    defocus_start: dict | None = None,
    even_order: int | None = 4,
    odd_order: int | None = 3,
    existing_even=(),
    existing_odd=(),
    refine_defocus: bool = True,
    fit_astigmatism: bool = True,
    regularisation_lambda: float = 0.0,
    regularised_components: str = "astigmatism",
    band: FrequencyBand = FrequencyBand(),
    input_scales: dict | None = None,
    fit_constant_phase: bool = False,
    capture_angstrom: float = 1000.0,
    tilt_masks: dict | None = None,
) -> AberrationFit:
    """Fit even (order ``even_order``) and odd (order ``odd_order``) Zernike aberrations of one optics
    group jointly with each tilt's defocus and scale.

    Parameters
    ----------
    statistics : dict[str, TiltStatistics]
        The group's tomograms (same box and pixel size), accumulated at ``current_ctf`` and the
        existing even aberrations.
    wavelength_angstrom : dict[str, float]
    current_ctf : dict[str, tuple]
        ``(defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg)`` arrays of each tomogram.
    defocus_start : dict[str, DefocusFit] or None
        Starting per-tilt changes (normally :func:`~tomoctfrefine.refine.defocus.refine_defocus`'s
        result); None starts from the current CTF.
    even_order, odd_order : int or None
        RELION's ``--ne`` / ``--no``; None: that kind is not fitted.
    existing_even, existing_odd : sequence of float
        Current coefficients of the group (RELION order).
    refine_defocus : bool
        Refine each tilt's defocus (and astigmatism if ``fit_astigmatism``) with the aberrations.
    regularisation_lambda, regularised_components :
        As in :func:`~tomoctfrefine.refine.defocus.refine_defocus`.
    band : FrequencyBand
    input_scales : dict[str, ndarray] or None
        Scales kept by tilts without data.
    fit_constant_phase : bool
        Also fit ``Z(0,0)`` (a constant phase) in the defocus-free basis. Off by default: a constant phase
        trades with the amplitude contrast and, at low frequency, with every tilt's defocus, so fitting it
        adds variance (and a common defocus error) unless the data really have one (phase plate).
    capture_angstrom : float
        Sets the first band of the continuation (see :func:`likelihood.fit_with_continuation`).
    tilt_masks : dict[str, array of bool] or None
        Tilts used per tomogram (RELION's frame range); the others are left out of the fit and keep
        their input values.
    """
    names = list(statistics)
    boxes = {(statistics[n].box_size_px, round(float(statistics[n].pixel_size_angstrom), 6)) for n in names}
    if len(boxes) != 1:
        raise ValueError(f"all tomograms of an optics group must share box and pixel size, got {sorted(boxes)}")
    first = statistics[names[0]]
    s, sh = first.box_size_px, first.box_size_px // 2 + 1
    datas = {n: BandStatistics.from_statistics(statistics[n], band) for n in names}
    for n in names:
        if tilt_masks is not None and n in tilt_masks:
            datas[n].active &= np.asarray(tilt_masks[n], dtype=bool)
    ref = datas[names[0]]
    fx, fy = ref.freq_x, ref.freq_y

    psi0 = zernike.odd_phase_rad(list(existing_odd), fx, fy) if len(existing_odd) else np.zeros(fx.shape)
    if even_order is not None:
        fitted_even, design = even_fit_design(even_order, defocus_free=refine_defocus, fit_constant_phase=fit_constant_phase)
        even_pixels = design @ zernike.even_basis(even_order, fx, fy)
    else:
        fitted_even, design, even_pixels = [], np.zeros((0, 0)), np.zeros((0, fx.size))
    odd_pixels = zernike.odd_basis(odd_order, fx, fy) if odd_order is not None else np.zeros((0, fx.size))
    shared = SharedPhase(even_basis=even_pixels, odd_basis=odd_pixels, psi0=psi0)

    m = 3 if fit_astigmatism else 1
    terms = []
    for name in names:
        data = datas[name]
        basis = phase_basis_per_angstrom(wavelength_angstrom[name], data.freq_x, data.freq_y)[:m]
        x = np.zeros((data.n_tilts, m))
        if defocus_start is not None and name in defocus_start:
            x[:] = defocus_start[name].defocus_change_angstrom[:, :m]
        x[~data.active] = 0.0
        metric = None
        if refine_defocus and regularisation_lambda > 0:
            rotation = np.exp(-1j * psi0)
            rotated = BandStatistics(**{**data.__dict__, "b_s": rotation * data.b_s, "b_c": rotation * data.b_c})
            metric = regularisation_lambda * regularisation_metric(rotated, basis, x, regularised_components)
        start = absolute_parameters(*current_ctf[name], data.n_tilts)[:, :m]
        terms.append(TomogramTerm(data=data, tilt_basis=basis, x=x, regularisation_metric=metric, fixed=not refine_defocus,
                                  regularisation_offset=start))

    wavelength = min(wavelength_angstrom[n] for n in names)
    result = fit_with_continuation(terms, shared, wavelength, capture_angstrom)

    n_even = len(fitted_even)
    covariance = result.shared_covariance
    if n_even:
        even_change = shared.alpha @ design
        even_sd = np.sqrt(np.abs(np.einsum("ji,jk,ki->i", design, covariance[:n_even, :n_even], design)))
    else:
        even_change, even_sd = np.zeros(0), np.zeros(0)
    n_odd = len(odd_pixels)
    odd_change = shared.beta.copy() if n_odd else np.zeros(0)
    odd_sd = np.sqrt(np.abs(np.diag(covariance[n_even:n_even + n_odd, n_even:n_even + n_odd]))) if n_odd else np.zeros(0)

    defocus = {}
    for i, (name, term) in enumerate(zip(names, terms)):
        u, v, a = current_ctf[name]
        start = defocus_start.get(name) if defocus_start else None
        defocus[name] = assemble_defocus_fit(
            term, result, i, u, v, a, (input_scales or {}).get(name),
            None if start is None else start.scan_offsets_angstrom, None if start is None else start.scan_cost,
        )

    maps = _phase_maps(terms, result, shared, psi0, s, sh)
    return AberrationFit(
        even_change=even_change,
        odd_change=odd_change,
        even_coefficients=add_coefficients(existing_even, even_change) if even_order is not None else np.asarray(existing_even, dtype=float),
        odd_coefficients=add_coefficients(existing_odd, odd_change) if odd_order is not None else np.asarray(existing_odd, dtype=float),
        even_uncertainty=even_sd,
        odd_uncertainty=odd_sd,
        fitted_even_indices=fitted_even,
        defocus=defocus,
        **maps,
    )


def _phase_maps(terms, result, shared, psi0, s, sh):
    """Per-pixel and fitted phase maps of the change, pooled over all tilts (module docstring)."""
    ref = terms[0].data
    n_pix = ref.freq_x.size
    a00, a01, a11 = np.zeros(n_pix), np.zeros(n_pix), np.zeros(n_pix)
    r0, r1 = np.zeros(n_pix), np.zeros(n_pix)
    z = np.zeros(n_pix, dtype=complex)
    chi = shared.alpha @ shared.even_basis if len(shared.alpha) else np.zeros(n_pix)
    psi = psi0 + (shared.beta @ shared.odd_basis if len(shared.beta) else 0.0)
    rotation = np.exp(-1j * psi)
    odd_weight = np.zeros(n_pix)
    for term, scale in zip(terms, result.scales):
        data = term.data
        c = np.where(data.active, scale, 0.0)[:, None]
        delta = term.x @ term.tilt_basis
        t00, t01, t11, tb0, tb1 = _rotated(data, delta)
        a00 += (c * c * t00).sum(0)
        a01 += (c * c * t01).sum(0)
        a11 += (c * c * t11).sum(0)
        r0 += (c * (rotation * tb0).real).sum(0)
        r1 += (c * (rotation * tb1).real).sum(0)
        full = delta + chi
        cos, sin = np.cos(full), np.sin(full)
        z += (c * (cos * data.b_s + sin * data.b_c)).sum(0)
        odd_weight += (c * c * (data.a_ss * cos * cos + 2 * data.a_sc * cos * sin + data.a_cc * sin * sin)).sum(0)
    det = a00 * a11 - a01 * a01
    ok = np.abs(det) > 1e-30 * np.maximum(a00 * a11, 1e-300)
    safe = np.where(ok, det, 1.0)
    v0 = -(a11 * r0 - a01 * r1) / safe
    v1 = -(-a01 * r0 + a00 * r1) / safe
    even_pixel = np.where(ok, np.arctan2(v1, v0), 0.0)
    odd_pixel = np.where(np.abs(z) > 0, np.angle(-z * np.exp(-1j * psi0)), 0.0)

    def place(values):
        out = np.zeros((s, sh))
        out[ref.pixel_y, ref.pixel_x] = values
        return out

    return dict(
        even_phase_per_pixel=place(even_pixel),
        even_phase_fit=place(chi),
        odd_phase_per_pixel=place(odd_pixel),
        odd_phase_fit=place(psi - psi0),
        even_weight_per_pixel=place(np.where(ok, a11 - a01 * a01 / np.where(a00 > 0, a00, 1.0), 0.0)),
        odd_weight_per_pixel=place(odd_weight),
    )
