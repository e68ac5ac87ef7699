"""RELION's contrast transfer function (``src/ctf.cpp``), as pure functions.

Conventions (pinned by ``tests/test_ctf.py``):

* frequencies in 1/Å; positive defocus is underfocus;
* the astigmatism angle is measured from the x axis: at angle 0 the U defocus acts along x;
* ``CTF = -sin(gamma)`` so that the CTF is ``+sin(pi*lambda*defocus*k^2 + K3) > 0`` at low frequency,
  and ``CTF(0) = +Q0`` (amplitude contrast);
* the even aberration phase ``chi_even`` is added to gamma; odd aberrations are a separate phase
  factor ``exp(i chi_odd)`` applied to the prediction (see :mod:`tomoctfrefine.physics.zernike`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Optics:
    """Microscope optics shared by all tilts of a tomogram.

    Attributes
    ----------
    voltage_kv : float
        Acceleration voltage in kV.
    spherical_aberration_mm : float
        Spherical aberration Cs in mm.
    amplitude_contrast : float
        Amplitude contrast Q0 (fraction, 0..1).
    """

    voltage_kv: float
    spherical_aberration_mm: float
    amplitude_contrast: float

    @property
    def wavelength_angstrom(self) -> float:
        return electron_wavelength_angstrom(self.voltage_kv)


def electron_wavelength_angstrom(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å, RELION's formula (0.019688 Å at 300 kV)."""
    volts = voltage_kv * 1e3
    return float(12.2643247 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts)))


def amplitude_contrast_phase(amplitude_contrast: float) -> float:
    """RELION's K3 = atan(Q0 / sqrt(1 - Q0^2)), in radians."""
    return float(np.arctan(amplitude_contrast / np.sqrt(1.0 - amplitude_contrast**2)))


def astigmatic_defocus_angstrom(
    defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, freq_x_per_angstrom, freq_y_per_angstrom
) -> np.ndarray:
    """Defocus seen along the direction of each frequency, ``(U kU^2 + V kV^2) / |k|^2`` times ``|k|^2``.

    Returns ``U kU^2 + V kV^2`` (Å⁻¹, i.e. defocus times squared frequency), with
    ``kU = cos(a) kx + sin(a) ky`` and ``kV = -sin(a) kx + cos(a) ky``: the U axis is ``(cos a, sin a)``.
    """
    angle = np.deg2rad(defocus_angle_deg)
    k_u = np.cos(angle) * freq_x_per_angstrom + np.sin(angle) * freq_y_per_angstrom
    k_v = -np.sin(angle) * freq_x_per_angstrom + np.cos(angle) * freq_y_per_angstrom
    return defocus_u_angstrom * k_u**2 + defocus_v_angstrom * k_v**2


def ctf_gamma(
    defocus_u_angstrom,
    defocus_v_angstrom,
    defocus_angle_deg,
    optics: Optics,
    freq_x_per_angstrom: np.ndarray,
    freq_y_per_angstrom: np.ndarray,
    phase_shift_deg: float = 0.0,
    even_phase_rad: np.ndarray | float = 0.0,
) -> np.ndarray:
    """RELION's CTF phase ``gamma(k) = K1 k^T A k + K2 |k|^4 - K5 - K3 + chi_even(k)``.

    ``A = Q^T diag(-U, -V) Q``, ``K1 = pi lambda``, ``K2 = pi/2 Cs lambda^3``, ``K3`` the amplitude
    contrast phase, ``K5`` the phase shift. Arguments broadcast against each other.
    """
    wavelength = optics.wavelength_angstrom
    k1 = np.pi * wavelength
    k2 = 0.5 * np.pi * optics.spherical_aberration_mm * 1e7 * wavelength**3
    k3 = amplitude_contrast_phase(optics.amplitude_contrast)
    k5 = np.deg2rad(phase_shift_deg)
    freq2 = freq_x_per_angstrom**2 + freq_y_per_angstrom**2
    quadratic = -astigmatic_defocus_angstrom(
        defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, freq_x_per_angstrom, freq_y_per_angstrom
    )
    return k1 * quadratic + k2 * freq2**2 - k5 - k3 + even_phase_rad


def ctf_envelope(bfactor_angstrom2: float, freq_x_per_angstrom, freq_y_per_angstrom) -> np.ndarray:
    """B-factor envelope ``exp(-B |k|^2 / 4)`` (RELION's K4 term)."""
    return np.exp(-0.25 * bfactor_angstrom2 * (freq_x_per_angstrom**2 + freq_y_per_angstrom**2))


def ctf_2d(
    defocus_u_angstrom,
    defocus_v_angstrom,
    defocus_angle_deg,
    optics: Optics,
    freq_x_per_angstrom: np.ndarray,
    freq_y_per_angstrom: np.ndarray,
    phase_shift_deg: float = 0.0,
    bfactor_angstrom2: float = 0.0,
    scale: float = 1.0,
    even_phase_rad: np.ndarray | float = 0.0,
) -> np.ndarray:
    """RELION's CTF ``-sin(gamma) * exp(-B k^2/4) * scale``; positive defocus is underfocus;
    angle 0 puts U along x. RELION's clamp of ``|CTF|`` to 1e-8 is not applied (it only matters
    for division)."""
    gamma = ctf_gamma(
        defocus_u_angstrom,
        defocus_v_angstrom,
        defocus_angle_deg,
        optics,
        freq_x_per_angstrom,
        freq_y_per_angstrom,
        phase_shift_deg,
        even_phase_rad,
    )
    envelope = ctf_envelope(bfactor_angstrom2, freq_x_per_angstrom, freq_y_per_angstrom) if bfactor_angstrom2 else 1.0
    return -np.sin(gamma) * envelope * scale


def defocus_from_quadratic_form(
    a_xx: float, a_xy: float, a_yy: float
) -> tuple[float, float, float]:
    """(U, V, angle_deg) from the symmetric matrix ``A = Q^T diag(-U,-V) Q``, RELION's way.

    RELION diagonalises with Kopp's closed-form ``dsyev2`` and takes the eigenvector ``(cs, sn)`` of
    the *largest* eigenvalue as the U axis, so after refinement ``U <= V`` and the angle
    ``atan2(sn, cs)`` lies in (-180, 180]. The eigenvector's sign follows ``dsyev2`` (a generic
    eigensolver returns the opposite sign, i.e. the angle +-180 deg, for about a third of inputs).
    """
    a, b, c = float(a_xx), float(a_xy), float(a_yy)
    total, difference = a + c, a - c
    root = float(np.sqrt(difference * difference + 4.0 * b * b))
    if total > 0.0:
        largest = 0.5 * (total + root)
        smallest = (a / largest) * c - (b / largest) * b
    elif total < 0.0:
        smallest = 0.5 * (total - root)
        largest = (a / smallest) * c - (b / smallest) * b
    else:
        largest, smallest = 0.5 * root, -0.5 * root
    cs = difference + root if difference > 0.0 else difference - root
    if abs(cs) > 2.0 * abs(b):
        ratio = -2.0 * b / cs
        sn = 1.0 / np.sqrt(1.0 + ratio * ratio)
        cs = ratio * sn
    elif b == 0.0:
        cs, sn = 1.0, 0.0
    else:
        ratio = -0.5 * cs / b
        cs = 1.0 / np.sqrt(1.0 + ratio * ratio)
        sn = ratio * cs
    if difference > 0.0:
        cs, sn = -sn, cs
    return float(-largest), float(-smallest), float(np.rad2deg(np.arctan2(sn, cs)))


def quadratic_form_from_defocus(
    defocus_u_angstrom: float, defocus_v_angstrom: float, defocus_angle_deg: float
) -> tuple[float, float, float]:
    """(A_xx, A_xy, A_yy) of ``A = Q^T diag(-U, -V) Q`` (inverse of :func:`defocus_from_quadratic_form`)."""
    angle = np.deg2rad(defocus_angle_deg)
    c, s = np.cos(angle), np.sin(angle)
    a_xx = -(defocus_u_angstrom * c * c + defocus_v_angstrom * s * s)
    a_xy = -(defocus_u_angstrom - defocus_v_angstrom) * c * s
    a_yy = -(defocus_u_angstrom * s * s + defocus_v_angstrom * c * c)
    return float(a_xx), float(a_xy), float(a_yy)
