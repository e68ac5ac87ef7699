"""Pure helpers behind the form's wizards (no Scipion import, so they are tested directly).

* Estimation box: the box must hold the particle plus the CTF's delocalisation on both sides,
  ``2 * wavelength * defocus / d`` for the finest detail ``d`` used (RELION-5's tutorial advice: the
  box size matters for speed, not for the values found).
* Defocus scan range: a scan of ± 3 robust standard deviations of the input per-tilt defocus around
  its tilt series' trend covers every plausible error of the input estimate.
"""
from __future__ import annotations

import math

import numpy as np

from tomoctfrefine.physics.ctf import electron_wavelength_angstrom

#: Sizes with small prime factors only (fast FFTs), even.
_FFT_FRIENDLY = sorted({2 ** a * 3 ** b * 5 ** c for a in range(1, 13) for b in range(0, 6) for c in range(0, 5)})


def fft_friendly_size(minimum_px: int) -> int:
    """Smallest even size >= ``minimum_px`` whose only prime factors are 2, 3 and 5."""
    return next(s for s in _FFT_FRIENDLY if s >= minimum_px)


def particle_diameter_angstrom(mask: np.ndarray, pixel_size_angstrom: float, threshold: float = 0.5) -> float:
    """Largest extent along x, y or z of the region where ``mask`` (a [z, y, x] map) exceeds ``threshold``."""
    inside = np.argwhere(np.asarray(mask) > threshold)
    if len(inside) == 0:
        return 0.0
    extent_px = inside.max(axis=0) - inside.min(axis=0) + 1
    return float(extent_px.max() * pixel_size_angstrom)


def estimation_box_px(particle_diameter_angstrom: float, reference_box_px: int, pixel_size_angstrom: float,
                      max_defocus_angstrom: float, voltage_kv: float, resolution_angstrom: float | None = None,
                      image_size_px: int | None = None) -> int:
    """Estimation box (px, bin 1): particle + 2 x CTF delocalisation at ``resolution_angstrom``
    (Nyquist if None), never smaller than the reference box, FFT-friendly, at most the tilt image."""
    resolution = resolution_angstrom or 2.0 * pixel_size_angstrom
    delocalisation_angstrom = electron_wavelength_angstrom(voltage_kv) * abs(max_defocus_angstrom) / resolution
    needed_px = math.ceil((particle_diameter_angstrom + 2.0 * delocalisation_angstrom) / pixel_size_angstrom)
    box = fft_friendly_size(max(needed_px, int(reference_box_px), 16))
    if image_size_px is not None and box > image_size_px:
        box = max(s for s in _FFT_FRIENDLY if s <= image_size_px)
    return box


def defocus_scan_range_angstrom(defocus_by_series: dict[str, np.ndarray], minimum_angstrom: float = 500.0,
                                step_angstrom: float = 100.0) -> float:
    """± range of the defocus scan from the input per-tilt mean defocus (Å) of each tilt series.

    Uses 3 x the robust standard deviation (1.4826 x MAD) of each tilt's deviation from its series'
    median, rounded up to ``step_angstrom``, at least ``minimum_angstrom``.
    """
    deviations = [np.asarray(v, dtype=float) - np.median(v) for v in defocus_by_series.values() if len(v)]
    if not deviations:
        return float(minimum_angstrom)
    deviations = np.concatenate(deviations)
    sigma = 1.4826 * np.median(np.abs(deviations - np.median(deviations)))
    return float(max(minimum_angstrom, math.ceil(3.0 * sigma / step_angstrom) * step_angstrom))
