"""Which defocus hand do the data prefer? A likelihood comparison; the hand is never changed here
(the pipeline decides what to do with the verdict and says so).

The per-particle defocus offset ``hand * p * slope * depth`` enters the statistics. The statistics of the
opposite hand (``TiltStatistics.flipped_hand``) are fitted exactly like the input ones (defocus scan,
astigmatic fit, scale profiled out) and the minimised costs ``J`` (= -log L + constant, see
:mod:`tomoctfrefine.refine.likelihood`) are compared tilt by tilt: ``d_f = J_f(opposite) - J_f(input)``,
positive when the input hand explains tilt ``f`` better. Both hands have the same number of parameters,
so ``sum d_f`` is a log-likelihood ratio (nats); its consistency across tilts gives a z-score
``mean(d) / (sd(d) / sqrt(n))``. A verdict needs both: ``|sum d| >= threshold_nats`` and
``|z| >= z_threshold`` with the same sign; otherwise it is "undecided" (e.g. particles all at one depth).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..statistics import TiltStatistics
from .defocus import DefocusFit, refine_defocus
from .likelihood import FrequencyBand, half_plane_multiplicity


@dataclass
class HandednessVerdict:
    """Outcome of :func:`check_handedness`.

    Attributes
    ----------
    verdict : str
        ``"input hand"``, ``"opposite hand"`` or ``"undecided"``.
    log_likelihood_ratio : float
        ``sum_f d_f`` in nats (positive favours the input hand).
    z_score : float
    per_tilt_difference : ndarray (n_tilts,)
        ``d_f`` (0 for tilts not refined under both hands).
    message : str
        One line for the log and the report (the verdict and its evidence).
    opposite_fit : DefocusFit
        The defocus refined under the opposite hand (what a run that adopts that hand keeps).
    """

    verdict: str
    log_likelihood_ratio: float
    z_score: float
    per_tilt_difference: np.ndarray
    message: str
    opposite_fit: DefocusFit


def check_handedness(
    statistics: TiltStatistics,
    wavelength_angstrom: float,
    defocus_u_angstrom,
    defocus_v_angstrom,
    defocus_angle_deg,
    *,
    threshold_nats: float = 10.0,
    z_threshold: float = 3.0,
    band: FrequencyBand = FrequencyBand(),
    input_fit: DefocusFit | None = None,
    **refine_options,
) -> HandednessVerdict:
    """Compare the fit of the input hand with the fit of the opposite hand (module docstring).

    ``refine_options`` are passed to :func:`~tomoctfrefine.refine.defocus.refine_defocus` for both;
    ``input_fit``, the input hand's fit made with the same options and band, saves one of the two fits.
    Raises ValueError if the statistics have no ``flipped_hand``.
    """
    if statistics.flipped_hand is None:
        raise ValueError("the statistics were computed without the opposite hand (with_flipped_hand=False)")
    costs, refined, fits = [], [], []
    for stats in (statistics, statistics.flipped_hand):
        if stats is statistics and input_fit is not None:
            fit = input_fit
        else:
            fit = refine_defocus(stats, wavelength_angstrom, defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, band=band, **refine_options)
        constant = 0.5 * _band_oo(stats, band)
        costs.append(fit.cost - constant)
        refined.append(fit.refined)
        fits.append(fit)
    both = refined[0] & refined[1]
    difference = np.where(both, costs[1] - costs[0], 0.0)
    total = float(difference.sum())
    n = int(both.sum())
    if n >= 2:
        sd = float(np.std(difference[both], ddof=1))
        z = float(np.mean(difference[both]) / (sd / np.sqrt(n))) if sd > 0 else (np.inf * np.sign(total) if total else 0.0)
    else:
        z = 0.0
    if total >= threshold_nats and z >= z_threshold:
        verdict = "input hand"
    elif total <= -threshold_nats and z <= -z_threshold:
        verdict = "opposite hand"
    else:
        verdict = "undecided"
    detail = f"log-likelihood ratio {total:.1f} nats over {n} tilts, z = {z:.1f}"
    if verdict == "input hand":
        message = f"The input defocus hand is confirmed ({detail})."
    elif verdict == "opposite hand":
        message = f"The data prefer the OPPOSITE defocus hand ({detail})."
    else:
        message = f"The defocus hand cannot be decided from these data ({detail}); the hand was not changed."
    return HandednessVerdict(verdict, total, z, difference, message, fits[1])


def _band_oo(statistics: TiltStatistics, band: FrequencyBand) -> np.ndarray:
    """``BandStatistics.from_statistics(statistics, band).oo`` (the same sums) without copying every
    array of the band."""
    keep = band.mask(statistics.box_size_px, statistics.pixel_size_angstrom)
    m = half_plane_multiplicity(statistics.box_size_px)[keep]
    return np.ascontiguousarray(np.asarray(statistics.oo)[:, keep] * m).sum(axis=1)
