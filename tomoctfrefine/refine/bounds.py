"""Cramér-Rao bounds of each tilt's mean defocus and contrast scale, from the statistics.

The Fisher information of a parameter ``t`` is the sum over visible particles and pixels of
``|d(noiseless image)/dt|^2 / noise variance`` (real space), i.e. ``sum_half m w |dM/dt|^2`` on the
``rfft2`` half plane (multiplicity ``m``, see :mod:`tomoctfrefine.refine.likelihood`). With
``M = -c exp(i psi) sin(gamma + delta) q`` and ``e = (cos delta, sin delta)``, ``e' = (-sin, cos)``:

    I(dz, dz)  = c^2 sum m (pi lambda |k|^2)^2 e'^T A e'
    I(c, c)    = sum m e^T A e
    I(dz, c)   = -c sum m (pi lambda |k|^2) e^T A e'

(and the same with ``kx^2 - ky^2`` and ``2 kx ky`` for the astigmatism components). Only the ``A``
terms enter, so noisy statistics computed with the true particles give the exact information too;
evaluate them at the true CTF (``delta`` = true change from the CTF they were computed at).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..statistics import TiltStatistics
from .defocus import phase_basis_per_angstrom
from .likelihood import BandStatistics, FrequencyBand, evaluate, weighted_gram


@dataclass
class CramerRaoBounds:
    """Per-tilt bounds (standard deviations; inf for tilts without information).

    Attributes
    ----------
    defocus_angstrom : ndarray (n_tilts,)
        Bound of the mean defocus with everything else known, ``1/sqrt(I_dz,dz)``.
    scale : ndarray (n_tilts,)
        Bound of the scale with everything else known, ``1/sqrt(I_cc)``.
    defocus_joint_angstrom, scale_joint : ndarray (n_tilts,)
        Bounds when ``(dz, a_c, a_s, c)`` are all unknown, ``sqrt((I^-1)_jj)``.
    fisher : ndarray (n_tilts, 4, 4)
        Fisher matrix of ``(dz, a_c, a_s, c)`` (Å and scale units).
    """

    defocus_angstrom: np.ndarray
    scale: np.ndarray
    defocus_joint_angstrom: np.ndarray
    scale_joint: np.ndarray
    fisher: np.ndarray


def fisher_information(
    statistics: TiltStatistics,
    wavelength_angstrom: float,
    scale,
    *,
    defocus_change_angstrom=None,
    band: FrequencyBand = FrequencyBand(kmin_angstrom=None),
) -> np.ndarray:
    """Fisher matrix of ``(dz, a_c, a_s, c)`` of every tilt, shape ``(n_tilts, 4, 4)``.

    Parameters
    ----------
    statistics : TiltStatistics
    wavelength_angstrom : float
    scale : array_like (n_tilts,)
        The true scale of each tilt.
    defocus_change_angstrom : array_like (n_tilts, 3) or None
        ``(dz, a_c, a_s)`` from the CTF of the statistics to the true one (None: they are at the truth).
    band : FrequencyBand
        Pixels counted (default: all but DC, corners included).
    """
    data = BandStatistics.from_statistics(statistics, band)
    n = statistics.n_tilts
    basis = phase_basis_per_angstrom(wavelength_angstrom, data.freq_x, data.freq_y)
    change = np.zeros((n, 3)) if defocus_change_angstrom is None else np.asarray(defocus_change_angstrom, dtype=float)
    c = np.broadcast_to(np.asarray(scale, dtype=float), (n,))
    ev = evaluate(data, change @ basis, None, derivatives=True, fixed_scale=c)
    fisher = np.zeros((n, 4, 4))
    fisher[:, :3, :3] = weighted_gram(ev.fisher_delta, basis, basis)
    cross = ev.fisher_delta_scale @ basis.T
    fisher[:, :3, 3] = fisher[:, 3, :3] = cross
    fisher[:, 3, 3] = ev.s_p
    return fisher


def cramer_rao_bounds(
    statistics: TiltStatistics,
    wavelength_angstrom: float,
    scale,
    *,
    defocus_change_angstrom=None,
    band: FrequencyBand = FrequencyBand(kmin_angstrom=None),
) -> CramerRaoBounds:
    """Cramér-Rao bounds of each tilt's mean defocus and scale (see :func:`fisher_information`)."""
    fisher = fisher_information(statistics, wavelength_angstrom, scale, defocus_change_angstrom=defocus_change_angstrom, band=band)
    n = len(fisher)
    diag = np.einsum("faa->fa", fisher)
    with np.errstate(divide="ignore"):
        known = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), np.inf)
    joint = np.full((n, 4), np.inf)
    for f in range(n):
        if np.all(diag[f] > 0):
            try:
                joint[f] = np.sqrt(np.abs(np.diag(np.linalg.inv(fisher[f]))))
            except np.linalg.LinAlgError:
                pass
    return CramerRaoBounds(
        defocus_angstrom=known[:, 0], scale=known[:, 3],
        defocus_joint_angstrom=joint[:, 0], scale_joint=joint[:, 3], fisher=fisher,
    )
