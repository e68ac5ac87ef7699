"""Radiation-damage (dose) weights, RELION's ``damage.cpp``."""
from __future__ import annotations

import numpy as np


def critical_exposure_e_per_angstrom2(freq_per_angstrom: np.ndarray) -> np.ndarray:
    """Grant & Grigorieff (2015) critical exposure ``0.245 k^-1.665 + 2.81`` (e/Å²); infinite at k = 0."""
    k = np.asarray(freq_per_angstrom, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(k > 0, 0.245 * np.power(np.where(k > 0, k, 1.0), -1.665) + 2.81, np.inf)


def dose_weight(
    pre_exposure_e_per_angstrom2: float,
    freq_per_angstrom: np.ndarray,
    bfactor_per_electron_dose_angstrom2: float = 0.0,
) -> np.ndarray:
    """Dose weight of a tilt with cumulative pre-exposure ``N``.

    ``exp(-N / (2 Ne(k)))`` with Grant & Grigorieff's critical exposure, or, when a positive
    per-electron B-factor ``b`` is given (RELION 5's ``rlnCtfBfactorPerElectronDose``),
    ``exp(-b N k^2 / 4)``. Equals 1 at k = 0.
    """
    k = np.asarray(freq_per_angstrom, dtype=float)
    if bfactor_per_electron_dose_angstrom2 > 0:
        return np.exp(-0.25 * bfactor_per_electron_dose_angstrom2 * pre_exposure_e_per_angstrom2 * k**2)
    return np.exp(-pre_exposure_e_per_angstrom2 / (2.0 * critical_exposure_e_per_angstrom2(k)))
