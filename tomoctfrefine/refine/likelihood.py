"""The likelihood of the per-tilt CTF parameters, evaluated from :class:`TiltStatistics` alone.

For tilt ``f`` and Fourier pixel ``k`` the statistics give the weighted squared residual of the model
``o = -c exp(i psi) sin(gamma + delta) q`` exactly (see :mod:`tomoctfrefine.statistics`)::

    r_fk = oo + c^2 e^T A e + 2 c Re(exp(-i psi) e^T b),      e = (cos delta, sin delta)

Cost convention used throughout :mod:`tomoctfrefine.refine`::

    J_f = 1/2 sum_k m_k r_fk

with the half-plane multiplicity ``m_k`` (2 for pixels whose conjugate partner is not stored, 1 on the
``kx = 0`` and ``kx = Nyquist`` columns, which hold both partners). For white real-space noise of
variance ``sigma^2`` and a unitary FFT, ``E|N_k|^2 = sigma^2 = 1/w``, so ``J`` equals ``-log L`` up to
a constant: its curvature is the Fisher information, and ``1/sqrt(curvature)`` is a standard error.
Everything is therefore independent of the box size (more pixels, each with proportionally less
signal) and of how the noise weights are normalised only through ``w``.

The scale ``c_f`` is profiled out exactly and constrained to ``c >= 0``::

    c*_f = max(0, -S_R / S_P),    J_f = 1/2 sum m oo - 1/2 c*^2 S_P,
    S_P = sum m e^T A e,          S_R = sum m Re(exp(-i psi) e^T b)

so a fit never depends on the input scale. The Gauss-Newton (expected Fisher) curvature per pixel is
``c^2 e'^T A e'`` for ``delta``, ``c^2 e^T A e`` for ``psi`` and ``c e^T A e'`` for the cross term with
``c``, with ``e' = (-sin delta, cos delta)``; ``psi`` is orthogonal to both ``delta`` and ``c``.

:func:`fit` minimises the sum of ``J`` over tilts (and tomograms) with respect to per-tilt parameters
(``delta`` linear in them) and shared parameters (even phase added to every tilt's ``delta``, odd phase
``psi``, and the common values of a regularised fit) by Levenberg-Marquardt on that Fisher matrix,
solving the arrow-shaped normal equations through the Schur complement of the shared block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..physics.geometry import fourier_grid_per_angstrom
from ..statistics import TiltStatistics


def half_plane_multiplicity(box_size_px: int) -> np.ndarray:
    """How many full-plane pixels each ``rfft2`` pixel stands for, shape ``(s, s//2+1)``.

    2 everywhere except the ``kx = 0`` column and, for even ``s``, the ``kx = Nyquist`` column (1),
    whose conjugate partners are stored in the same column.
    """
    s = int(box_size_px)
    multiplicity = np.full((s, s // 2 + 1), 2.0)
    multiplicity[:, 0] = 1.0
    if s % 2 == 0:
        multiplicity[:, -1] = 1.0
    return multiplicity


@dataclass(frozen=True)
class FrequencyBand:
    """Frequencies used by a fit.

    Attributes
    ----------
    kmin_angstrom : float or None
        Lowest resolution used (Å): pixels with ``|k| >= 1/kmin_angstrom`` (RELION's ``--kmin``,
        default 30 Å). None: every pixel but the DC one.
    kmax_angstrom : float or None
        Highest resolution used (Å). None: every pixel of the box, the corners beyond Nyquist
        included (they are real, correctly sampled frequencies of the image; the frequency weights of
        the statistics decide what carries signal).
    """

    kmin_angstrom: float | None = 30.0
    kmax_angstrom: float | None = None

    def mask(self, box_size_px: int, pixel_size_angstrom: float) -> np.ndarray:
        fx, fy = fourier_grid_per_angstrom(box_size_px, pixel_size_angstrom)
        radius = np.hypot(fx, fy)
        keep = radius > 0
        if self.kmin_angstrom:
            keep &= radius >= 1.0 / self.kmin_angstrom * (1 - 1e-12)
        if self.kmax_angstrom:
            keep &= radius <= 1.0 / self.kmax_angstrom * (1 + 1e-12)
        return keep


def _carries_data(statistics: TiltStatistics) -> np.ndarray:
    """``(s, s//2+1)`` bool: some tilt has ``oo != 0`` or ``a_ss + a_cc != 0`` there (``a_ss + a_cc = sum w
    |q|^2``: where it and ``oo`` vanish, so do ``a_sc``, ``b_s`` and ``b_c``)."""
    out = np.zeros(np.shape(statistics.oo)[1:], dtype=bool)
    for f in range(statistics.n_tilts):
        out |= (np.asarray(statistics.oo[f]) != 0) | (np.asarray(statistics.a_ss[f]) + np.asarray(statistics.a_cc[f]) != 0)
    return out


@dataclass
class BandStatistics:
    """The statistics of one tomogram on the pixels of a band, multiplicity folded in, flattened.

    Arrays ``a_*``, ``b_*`` have shape ``(n_tilts, n_pixels)``; ``oo`` is summed over the band.
    """

    a_ss: np.ndarray
    a_sc: np.ndarray
    a_cc: np.ndarray
    b_s: np.ndarray
    b_c: np.ndarray
    oo: np.ndarray
    freq_x: np.ndarray
    freq_y: np.ndarray
    pixel_y: np.ndarray
    pixel_x: np.ndarray
    active: np.ndarray
    box_size_px: int
    pixel_size_angstrom: float

    @classmethod
    def from_statistics(cls, statistics: TiltStatistics, band: FrequencyBand) -> "BandStatistics":
        s, p = statistics.box_size_px, statistics.pixel_size_angstrom
        # pixels whose statistics are exactly zero in every tilt (zero weight: the corners beyond the
        # weights' support, the DC pixel) add nothing to any sum; leaving them out saves a fifth of
        # every fit's time and memory
        keep = band.mask(s, p)
        carrying = keep & _carries_data(statistics)
        if carrying.any():  # (statistics without any data keep the band's pixels)
            keep = carrying
        pixel_y, pixel_x = np.nonzero(keep)
        m = half_plane_multiplicity(s)[keep]
        fx, fy = fourier_grid_per_angstrom(s, p)
        pick = lambda a: np.ascontiguousarray(np.asarray(a)[:, keep] * m)  # noqa: E731
        a_ss, a_sc, a_cc = pick(statistics.a_ss), pick(statistics.a_sc), pick(statistics.a_cc)
        b_s, b_c = pick(statistics.b_s).astype(np.complex128), pick(statistics.b_c).astype(np.complex128)
        oo = pick(statistics.oo).sum(axis=1)
        finite = np.isfinite(a_ss.sum(1) + a_sc.sum(1) + a_cc.sum(1) + oo) & np.isfinite(b_s.sum(1) + b_c.sum(1))
        information = np.where(finite, (a_ss + a_cc).sum(axis=1), 0.0)
        active = (np.asarray(statistics.particle_count) > 0) & (information > 0) & finite
        if not finite.all():  # a tilt with a non-finite value is treated as empty, never propagated
            for array in (a_ss, a_sc, a_cc, b_s, b_c):
                array[~finite] = 0.0
            oo = np.where(finite, oo, 0.0)
        return cls(
            a_ss=a_ss, a_sc=a_sc, a_cc=a_cc, b_s=b_s, b_c=b_c, oo=oo,
            freq_x=fx[keep], freq_y=fy[keep], pixel_y=pixel_y, pixel_x=pixel_x,
            active=active, box_size_px=s, pixel_size_angstrom=p,
        )

    @property
    def n_tilts(self) -> int:
        return self.a_ss.shape[0]

    @property
    def freq2(self) -> np.ndarray:
        return self.freq_x**2 + self.freq_y**2

    def subset(self, keep: np.ndarray) -> "BandStatistics":
        """The same statistics on a subset of the pixels (``oo`` kept: it is a constant of the fits)."""
        return BandStatistics(
            a_ss=np.ascontiguousarray(self.a_ss[:, keep]), a_sc=np.ascontiguousarray(self.a_sc[:, keep]),
            a_cc=np.ascontiguousarray(self.a_cc[:, keep]), b_s=np.ascontiguousarray(self.b_s[:, keep]),
            b_c=np.ascontiguousarray(self.b_c[:, keep]), oo=self.oo,
            freq_x=self.freq_x[keep], freq_y=self.freq_y[keep],
            pixel_y=self.pixel_y[keep], pixel_x=self.pixel_x[keep],
            active=self.active, box_size_px=self.box_size_px, pixel_size_angstrom=self.pixel_size_angstrom,
        )

    def quadratic_basis(self) -> np.ndarray:
        """``(|k|^2, kx^2 - ky^2, 2 kx ky)`` per pixel, shape ``(3, n_pixels)`` (1/Å^2)."""
        fx, fy = self.freq_x, self.freq_y
        return np.stack([fx * fx + fy * fy, fx * fx - fy * fy, 2 * fx * fy])


@dataclass
class Evaluation:
    """Profiled cost of each tilt and, optionally, its per-pixel derivatives (Gauss-Newton)."""

    cost: np.ndarray
    scale: np.ndarray
    s_p: np.ndarray
    s_r: np.ndarray
    grad_delta: np.ndarray | None = None
    fisher_delta: np.ndarray | None = None
    fisher_delta_scale: np.ndarray | None = None
    grad_psi: np.ndarray | None = None
    fisher_psi: np.ndarray | None = None


def evaluate(data: BandStatistics, delta, psi=None, derivatives: bool = False, fixed_scale=None, psi_derivatives: bool = True) -> Evaluation:
    """Evaluate the profiled cost ``J_f`` of every tilt at extra phase ``delta`` and odd phase ``psi``.

    Parameters
    ----------
    data : BandStatistics
    delta : ndarray, broadcastable to ``(n_tilts, n_pixels)``
        Extra CTF phase (rad) added to the current gamma.
    psi : ndarray (n_pixels,) or None
        Odd phase (rad) multiplying the prediction as ``exp(i psi)``.
    derivatives : bool
        Also return per-pixel gradients and Gauss-Newton curvatures.
    fixed_scale : ndarray (n_tilts,) or None
        Use these scales instead of profiling them out.
    psi_derivatives : bool
        With ``derivatives``, also the odd-phase gradient and curvature.
    """
    from ..kernels import profiled_likelihood_terms

    shape = data.a_ss.shape
    n = shape[0]
    delta = np.ascontiguousarray(np.broadcast_to(np.asarray(delta, dtype=np.float64), shape))
    n_pix = shape[1]
    if psi is None:
        psi_cos, psi_sin = np.ones(n_pix), np.zeros(n_pix)
    else:
        psi = np.broadcast_to(np.asarray(psi, dtype=np.float64), (n_pix,))
        psi_cos, psi_sin = np.cos(psi), np.sin(psi)
    use_fixed = fixed_scale is not None
    fixed = np.broadcast_to(np.asarray(fixed_scale if use_fixed else 0.0, dtype=np.float64), (n,)).copy()
    s_p, s_r, scale = np.empty(n), np.empty(n), np.empty(n)
    big = (lambda: np.empty(shape)) if derivatives else (lambda: np.empty((1, 1)))  # noqa: E731
    grad_delta, fisher_delta, fisher_delta_scale = big(), big(), big()
    want_psi = derivatives and psi_derivatives
    grad_psi, fisher_psi = (np.empty(shape), np.empty(shape)) if want_psi else (np.empty((1, 1)), np.empty((1, 1)))
    profiled_likelihood_terms(
        data.a_ss, data.a_sc, data.a_cc, data.b_s, data.b_c, delta, psi_cos, psi_sin, fixed, use_fixed, derivatives,
        want_psi, s_p, s_r, scale, grad_delta, fisher_delta, fisher_delta_scale, grad_psi, fisher_psi,
    )
    if use_fixed:
        cost = 0.5 * data.oo + 0.5 * scale * scale * s_p + scale * s_r
    else:
        cost = 0.5 * data.oo - 0.5 * scale * scale * s_p
    result = Evaluation(cost=cost, scale=scale, s_p=s_p, s_r=s_r)
    if derivatives:
        result.grad_delta, result.fisher_delta, result.fisher_delta_scale = grad_delta, fisher_delta, fisher_delta_scale
        if want_psi:
            result.grad_psi, result.fisher_psi = grad_psi, fisher_psi
    return result


# ----------------------------------------------------------------------------------------------
# Joint Levenberg-Marquardt fit


@dataclass
class TomogramTerm:
    """One tomogram's part of a joint fit.

    Attributes
    ----------
    data : BandStatistics
    tilt_basis : ndarray (m, n_pixels)
        ``d delta / d x`` for the per-tilt parameters ``x`` (e.g. ``-pi lambda (|k|^2, ...)`` for
        defocus changes in Å).
    x : ndarray (n_tilts, m)
        Starting per-tilt parameters (changed in place by :func:`fit`).
    fixed_delta : ndarray or float
        Extra phase not fitted (rad), broadcastable to ``(n_tilts, n_pixels)``.
    regularisation_metric : ndarray (m, m) or None
        If set, ``1/2 sum_f (x_f + o_f - x_g)^T M (x_f + o_f - x_g)`` is added with a free common
        ``x_g``: the tilts' *absolute* values ``x_f + o_f`` are pulled together.
    common : ndarray (m,) or None
        Starting common value ``x_g``.
    regularisation_offset : ndarray (n_tilts, m) or None
        ``o_f``: each tilt's starting value in the same parametrisation (0 if None).
    """

    data: BandStatistics
    tilt_basis: np.ndarray
    x: np.ndarray
    fixed_delta: np.ndarray | float = 0.0
    regularisation_metric: np.ndarray | None = None
    common: np.ndarray | None = None
    fixed: bool = False
    regularisation_offset: np.ndarray | None = None

    def absolute(self, x: np.ndarray) -> np.ndarray:
        return x if self.regularisation_offset is None else x + self.regularisation_offset


@dataclass
class SharedPhase:
    """Phases shared by every tomogram of a joint fit (pixel sets must be identical).

    ``delta += even_basis^T alpha``, ``psi = psi0 + odd_basis^T beta``.
    """

    even_basis: np.ndarray  # (n_even, n_pixels)
    odd_basis: np.ndarray  # (n_odd, n_pixels)
    psi0: np.ndarray | float = 0.0
    alpha: np.ndarray = field(default_factory=lambda: np.zeros(0))
    beta: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class FitResult:
    """Outcome of :func:`fit`: covariances from the final (undamped) Fisher matrix."""

    costs: list  # per tomogram (n_tilts,)
    scales: list  # per tomogram (n_tilts,)
    scale_information: list  # per tomogram (n_tilts,), S_P
    tilt_covariance: list  # per tomogram (n_tilts, m, m)
    scale_variance: list  # per tomogram (n_tilts,)
    shared_covariance: np.ndarray
    iterations: int
    converged: bool


def weighted_gram(weights: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``sum_k weights[f, k] left[a, k] right[b, k]`` for every ``f``, shape ``(n, a, b)`` (BLAS)."""
    # one matmul against the a*b products (3x faster than weighting left per tilt, no (n, a, k) temporary)
    products = (left[:, None, :] * right[None, :, :]).reshape(left.shape[0] * right.shape[0], left.shape[1])
    return (weights @ products.T).reshape(len(weights), left.shape[0], right.shape[0])


def _layout(terms, shared):
    n_even = 0 if shared is None else len(shared.even_basis)
    n_odd = 0 if shared is None else len(shared.odd_basis)
    offsets, n_global = [], n_even + n_odd
    for term in terms:
        if term.regularisation_metric is not None:
            offsets.append(n_global)
            n_global += term.tilt_basis.shape[0]
        else:
            offsets.append(None)
    return n_even, n_odd, offsets, n_global


def _phases(term, shared, x):
    delta = x @ term.tilt_basis + term.fixed_delta
    psi = None
    if shared is not None:
        if len(shared.alpha):
            delta = delta + shared.alpha @ shared.even_basis
        psi = shared.psi0 + (shared.beta @ shared.odd_basis if len(shared.beta) else 0.0)
        if np.isscalar(psi) and psi == 0.0:
            psi = None
    return np.broadcast_to(delta, term.data.a_ss.shape), psi


def _penalty(term, x, common):
    if term.regularisation_metric is None:
        return np.zeros(len(x))
    d = np.where(term.data.active[:, None], term.absolute(x) - common, 0.0)
    return 0.5 * np.einsum("fa,ab,fb->f", d, term.regularisation_metric, d)


def _costs(terms, shared, xs, commons):
    out = []
    for term, x, common in zip(terms, xs, commons):
        delta, psi = _phases(term, shared, x)
        out.append(evaluate(term.data, delta, psi).cost + _penalty(term, x, common))
    return out


def _system(terms, shared, xs, commons, layout):
    """Gradient and Fisher matrix (arrow-shaped) at the current parameters."""
    n_even, n_odd, offsets, n_global = layout
    blocks, cross, grads = [], [], []
    g_global = np.zeros(n_global)
    h_global = np.zeros((n_global, n_global))
    evaluations = []
    for term, x, common, offset in zip(terms, xs, commons, offsets):
        delta, psi = _phases(term, shared, x)
        ev = evaluate(term.data, delta, psi, derivatives=True, psi_derivatives=n_odd > 0)
        evaluations.append(ev)
        basis = term.tilt_basis
        m = basis.shape[0]
        safe_sp = np.where(ev.s_p > 0, ev.s_p, 1.0)
        u_x = ev.fisher_delta_scale @ basis.T
        h_ff = weighted_gram(ev.fisher_delta, basis, basis) - u_x[:, :, None] * u_x[:, None, :] / safe_sp[:, None, None]
        g_f = ev.grad_delta @ basis.T
        h_fg = np.zeros((term.data.n_tilts, m, n_global))
        if n_even:
            even = shared.even_basis
            u_e = ev.fisher_delta_scale @ even.T
            h_fg[:, :, :n_even] = weighted_gram(ev.fisher_delta, basis, even) - u_x[:, :, None] * u_e[:, None, :] / safe_sp[:, None, None]
            h_global[:n_even, :n_even] += (even * ev.fisher_delta.sum(axis=0)) @ even.T - (u_e / safe_sp[:, None]).T @ u_e
            g_global[:n_even] += even @ ev.grad_delta.sum(axis=0)
        if n_odd:
            odd = shared.odd_basis
            sl = slice(n_even, n_even + n_odd)
            h_global[sl, sl] += (odd * ev.fisher_psi.sum(axis=0)) @ odd.T
            g_global[sl] += odd @ ev.grad_psi.sum(axis=0)
        if offset is not None:
            metric = term.regularisation_metric
            active = term.data.active
            d = np.where(active[:, None], term.absolute(x) - common, 0.0)
            g_f = g_f + d @ metric
            h_ff = h_ff + active[:, None, None] * metric
            sl = slice(offset, offset + m)
            h_fg[:, :, sl] -= active[:, None, None] * metric
            g_global[sl] -= d.sum(axis=0) @ metric
            h_global[sl, sl] += active.sum() * metric
        blocks.append(h_ff)
        cross.append(h_fg)
        grads.append(g_f)
    return blocks, cross, grads, h_global, g_global, evaluations


def _frozen(term, ev):
    if term.fixed:
        return np.ones(term.data.n_tilts, dtype=bool)
    return ~term.data.active | (ev.scale <= 0)


def _solve(blocks, cross, grads, h_global, g_global, frozen, mu_tilt, mu_global, want_covariance=False):
    """Damped Gauss-Newton step through the Schur complement of the shared block."""
    inverses, steps = [], []
    n_global = len(g_global)
    schur = h_global + mu_global * np.diag(np.diag(h_global)) + 1e-12 * np.eye(n_global) * max(1.0, np.abs(np.diag(h_global)).max(initial=0.0))
    rhs = -g_global.copy()
    for h_ff, h_fg, g_f, fz, mu in zip(blocks, cross, grads, frozen, mu_tilt):
        m = h_ff.shape[1]
        diag = np.einsum("faa->fa", h_ff)
        damped = h_ff + (mu[:, None, None] if np.ndim(mu) else mu) * np.einsum("fa,ab->fab", diag, np.eye(m))
        damped = damped + 1e-12 * np.eye(m) * np.maximum(np.abs(diag).max(axis=1), 1e-300)[:, None, None]
        damped[fz] = np.eye(m)
        inv = np.linalg.inv(damped)
        h_fg = np.where(fz[:, None, None], 0.0, h_fg)
        g_f = np.where(fz[:, None], 0.0, g_f)
        if n_global:
            schur -= np.einsum("fag,fab,fbh->gh", h_fg, inv, h_fg)
            rhs += np.einsum("fag,fab,fb->g", h_fg, inv, g_f)
        inverses.append((inv, h_fg, g_f))
    d_global = np.linalg.solve(schur, rhs) if n_global else np.zeros(0)
    schur_inverse = np.linalg.inv(schur) if (n_global and want_covariance) else np.zeros((n_global, n_global))
    covariances = []
    for inv, h_fg, g_f in inverses:
        step = -np.einsum("fab,fb->fa", inv, g_f + (h_fg @ d_global if n_global else 0.0))
        steps.append(step)
        if want_covariance:
            if n_global:
                t = np.einsum("fab,fbg->fag", inv, h_fg)
                covariances.append(inv + np.einsum("fag,gh,fbh->fab", t, schur_inverse, t))
            else:
                covariances.append(inv)
    return steps, d_global, covariances, schur_inverse


def _extrapolate_separable(terms, xs, steps, trial_xs, trial, current, frozen):
    """Per tilt, replace an improving step by 2, 4 or 8 times it while that keeps improving (in place)."""
    for i, term in enumerate(terms):
        improving = (trial[i] < current[i]) & ~frozen[i]
        for factor in (2.0, 4.0, 8.0):
            if not improving.any():
                break
            longer = xs[i] + factor * steps[i]
            cost = _costs([term], None, [longer], [term.common])[0]
            improving = improving & (cost < trial[i])
            trial_xs[i][improving] = longer[improving]
            trial[i][improving] = cost[improving]


def fit(terms: list[TomogramTerm], shared: SharedPhase | None = None, max_iterations: int = 60, tolerance: float = 1e-6) -> FitResult:
    """Minimise ``sum_t sum_f J_tf`` (+ penalties) by Levenberg-Marquardt on the Fisher matrix.

    Per-tilt parameters are updated in ``terms[i].x``, shared ones in ``shared.alpha/beta`` and
    ``terms[i].common``. Without shared parameters every tilt is damped and accepted on its own.
    Stops when the Gauss-Newton step is below ``tolerance`` standard errors (``d^T H d``).
    """
    layout = _layout(terms, shared)
    n_even, n_odd, offsets, n_global = layout
    if shared is not None:
        if len(shared.alpha) != n_even:
            shared.alpha = np.zeros(n_even)
        if len(shared.beta) != n_odd:
            shared.beta = np.zeros(n_odd)
    for term in terms:
        if term.regularisation_metric is not None and term.common is None:
            active = term.data.active
            term.common = term.absolute(term.x)[active].mean(axis=0) if active.any() else np.zeros(term.x.shape[1])
    separable = n_global == 0
    xs = [t.x for t in terms]
    commons = [t.common for t in terms]
    # Start as plain Gauss-Newton (the starts are close); damping grows only when a step fails, and a
    # small step only counts as convergence when it was not held back by damping.
    mu_tilt = [np.full(t.data.n_tilts, 1e-8) for t in terms]
    mu_global = 1e-8
    undamped = 1e-6
    converged = False
    iteration = 0
    for iteration in range(1, max_iterations + 1):
        blocks, cross, grads, h_global, g_global, evs = _system(terms, shared, xs, commons, layout)
        current = [ev.cost + _penalty(t, x, c) for ev, t, x, c in zip(evs, terms, xs, commons)]
        frozen = [_frozen(t, ev) for t, ev in zip(terms, evs)]
        accepted_any = False
        for _attempt in range(12):
            steps, d_global, _, _ = _solve(blocks, cross, grads, h_global, g_global, frozen, mu_tilt, mu_global)
            trial_xs = [x + d for x, d in zip(xs, steps)]
            alpha, beta = (shared.alpha, shared.beta) if shared is not None else (None, None)
            if shared is not None:
                shared.alpha, shared.beta = alpha + d_global[:n_even], beta + d_global[n_even:n_even + n_odd]
            trial_commons = [c if o is None else c + d_global[o:o + len(c)] for c, o in zip(commons, offsets)]
            trial = _costs(terms, shared, trial_xs, trial_commons)
            if separable:
                size = [np.einsum("fa,fab,fb->f", d, h, d) for d, h in zip(steps, blocks)]
                _extrapolate_separable(terms, xs, steps, trial_xs, trial, current, frozen)
                for i in range(len(terms)):
                    better = (trial[i] <= current[i] + 1e-9 * np.abs(current[i])) & ~frozen[i]
                    xs[i][better] = trial_xs[i][better]
                    mu_tilt[i] = np.where(better, np.maximum(mu_tilt[i] * 0.3, 1e-9), np.where(frozen[i], mu_tilt[i], mu_tilt[i] * 10))
                    # nats: a change of ~0.01 standard error, statistically nothing
                    predicted = -np.einsum("fa,fa->f", grads[i], steps[i])
                    negligible = (better & (current[i] - trial[i] < 1e-4)) | (predicted < 1e-4)
                    size[i] = np.where((better & (mu_tilt[i] <= undamped)) | frozen[i], size[i], np.inf)
                    size[i] = np.where(negligible, 0.0, size[i])
                accepted_any = True
                done = all(np.all(np.where(fz, 0.0, sz) < tolerance) for sz, fz in zip(size, frozen))
                break
            total_new = sum(c.sum() for c in trial)
            total_old = sum(c.sum() for c in current)
            if total_new < total_old:
                # Where the model misfits the data the expected Fisher matrix overestimates the
                # curvature (slow, linear convergence): try longer steps along the same direction.
                best = 1.0
                for factor in (2.0, 4.0, 8.0):
                    longer_xs = [x + factor * d for x, d in zip(xs, steps)]
                    longer_commons = [c if o is None else c + factor * d_global[o:o + len(c)] for c, o in zip(commons, offsets)]
                    if shared is not None:
                        shared.alpha, shared.beta = alpha + factor * d_global[:n_even], beta + factor * d_global[n_even:n_even + n_odd]
                    longer = _costs(terms, shared, longer_xs, longer_commons)
                    longer_total = sum(c.sum() for c in longer)
                    if longer_total >= total_new:
                        break
                    best, trial_xs, trial_commons, trial, total_new = factor, longer_xs, longer_commons, longer, longer_total
                steps = [best * d for d in steps]
                d_global = best * d_global
                if shared is not None:
                    shared.alpha, shared.beta = alpha + d_global[:n_even], beta + d_global[n_even:n_even + n_odd]
            if total_new <= total_old + 1e-12 * abs(total_old):
                for i in range(len(terms)):
                    xs[i][...] = trial_xs[i]
                    if offsets[i] is not None:
                        commons[i] = trial_commons[i]
                        terms[i].common = commons[i]
                mu_global = max(mu_global * 0.3, 1e-9)
                accepted_any = True
                size = sum(np.einsum("fa,fab,fb->", d, h, d) for d, h in zip(steps, blocks))
                if n_global:
                    size += d_global @ h_global @ d_global
                done = (size < tolerance and mu_global <= undamped) or total_old - total_new < 1e-4
                break
            if shared is not None:
                shared.alpha, shared.beta = alpha, beta
            mu_global *= 10
        if not accepted_any:
            converged = True
            break
        if done:
            converged = True
            break
    blocks, cross, grads, h_global, g_global, evs = _system(terms, shared, xs, commons, layout)
    frozen = [_frozen(t, ev) for t, ev in zip(terms, evs)]
    _, _, covariances, shared_cov = _solve(blocks, cross, grads, h_global, g_global, frozen, [0.0] * len(terms), 0.0, want_covariance=True)
    scale_variance = []
    for term, ev, fz, x, cov in zip(terms, evs, frozen, xs, covariances):
        cov[fz] = np.inf
        raw = weighted_gram(ev.fisher_delta, term.tilt_basis, term.tilt_basis)
        u_x = ev.fisher_delta_scale @ term.tilt_basis.T
        m = raw.shape[1]
        full = np.zeros((term.data.n_tilts, m + 1, m + 1))
        full[:, :m, :m] = raw + 1e-12 * np.eye(m) * np.maximum(np.abs(np.einsum("faa->fa", raw)).max(axis=1), 1e-300)[:, None, None]
        full[:, :m, m] = full[:, m, :m] = u_x
        full[:, m, m] = ev.s_p
        variance = np.full(term.data.n_tilts, np.inf)
        ok = ~fz & (ev.s_p > 0)
        if ok.any():
            variance[ok] = np.linalg.inv(full[ok])[:, m, m]
        if term.fixed:
            known = term.data.active & (ev.s_p > 0) & (ev.scale > 0)
            variance[known] = 1.0 / ev.s_p[known]
        scale_variance.append(variance)
    return FitResult(
        costs=[ev.cost + _penalty(t, x, c) for ev, t, x, c in zip(evs, terms, xs, commons)],
        scales=[ev.scale for ev in evs],
        scale_information=[ev.s_p for ev in evs],
        tilt_covariance=covariances,
        scale_variance=scale_variance,
        shared_covariance=shared_cov,
        iterations=iteration,
        converged=converged,
    )


def _subset_term(term: TomogramTerm, keep: np.ndarray) -> TomogramTerm:
    fixed = term.fixed_delta
    if np.ndim(fixed) and np.shape(fixed)[-1] == keep.size:
        fixed = np.asarray(fixed)[..., keep]
    return TomogramTerm(
        data=term.data.subset(keep), tilt_basis=term.tilt_basis[:, keep], x=term.x, fixed_delta=fixed,
        regularisation_metric=term.regularisation_metric, common=term.common, fixed=term.fixed,
        regularisation_offset=term.regularisation_offset,
    )


def _subset_shared(shared: SharedPhase | None, keep: np.ndarray) -> SharedPhase | None:
    if shared is None:
        return None
    psi0 = shared.psi0
    if np.ndim(psi0) and np.shape(psi0)[-1] == keep.size:
        psi0 = np.asarray(psi0)[..., keep]
    return SharedPhase(even_basis=shared.even_basis[:, keep], odd_basis=shared.odd_basis[:, keep], psi0=psi0, alpha=shared.alpha, beta=shared.beta)


def _reliable_radius(shared: SharedPhase, covariance: np.ndarray, freq2: np.ndarray, budget_rad: float = 0.5) -> float:
    """Largest radius up to which three standard errors of the shared phases stay below the budget."""
    n_even = len(shared.even_basis)
    variance = np.zeros(freq2.shape)
    if n_even:
        cov = covariance[:n_even, :n_even]
        variance = np.maximum(variance, np.einsum("ik,ij,jk->k", shared.even_basis, cov, shared.even_basis))
    if len(shared.odd_basis):
        cov = covariance[n_even:n_even + len(shared.odd_basis), n_even:n_even + len(shared.odd_basis)]
        variance = np.maximum(variance, np.einsum("ik,ij,jk->k", shared.odd_basis, cov, shared.odd_basis))
    order = np.argsort(freq2)
    bad = 3 * np.sqrt(np.abs(variance[order])) > budget_rad
    if not bad.any():
        return float(np.sqrt(freq2.max()))
    first_bad = int(np.argmax(bad))
    return float(np.sqrt(freq2[order][max(first_bad - 1, 0)]))


def fit_with_continuation(
    terms: list[TomogramTerm],
    shared: SharedPhase | None,
    wavelength_angstrom: float,
    capture_angstrom: float = 1000.0,
    max_iterations: int = 60,
) -> FitResult:
    """:func:`fit` on growing bands, so that large starting errors fall inside the basin of attraction.

    The first band ends where a defocus-like error of ``capture_angstrom`` makes a phase error of
    1 rad (``pi lambda capture k^2 = 1``); each next band ends where three standard errors of the
    previous stage make 0.5 rad (and grows by at least 25 %), up to the full band of the data.
    Without shared parameters, in the first stage every tilt is fitted on its own.
    """
    freq2 = terms[0].data.freq2
    k_full = float(np.sqrt(freq2.max()))
    k = min(k_full, float(np.sqrt(1.0 / (np.pi * wavelength_angstrom * capture_angstrom))))
    for _stage in range(12):
        if k >= k_full * (1 - 1e-9):
            break
        keep = freq2 <= k * k
        if keep.sum() < 8:
            k *= 1.25
            continue
        sub_terms = [_subset_term(t, keep) for t in terms]
        sub_shared = _subset_shared(shared, keep)
        result = fit(sub_terms, sub_shared, max_iterations=max_iterations, tolerance=1e-4)
        for term, sub in zip(terms, sub_terms):
            term.common = sub.common
        if shared is not None:
            shared.alpha, shared.beta = sub_shared.alpha, sub_shared.beta
        sigmas = []
        for term, cov in zip(terms, result.tilt_covariance):
            ok = term.data.active & np.all(np.isfinite(cov.reshape(len(cov), -1)), axis=1)
            if ok.any():
                sigmas.append(np.sqrt(np.abs(np.einsum("faa->fa", cov[ok])).max(axis=1)))
        sigma = float(np.median(np.concatenate(sigmas))) if sigmas else 0.0
        k_next = np.sqrt(0.5 / (np.pi * wavelength_angstrom * 3 * sigma)) if np.isfinite(sigma) and sigma > 0 else k_full
        if shared is not None and len(result.shared_covariance):
            k_next = min(k_next, _reliable_radius(shared, result.shared_covariance, freq2))
        k = min(k_full, max(1.25 * k, k_next))
    return fit(terms, shared, max_iterations=max_iterations)
