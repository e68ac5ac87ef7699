"""Zernike aberration basis in RELION's conventions (``src/jaz/math/Zernike.cpp``).

Polynomials are evaluated at frequencies in 1/Å (not normalised to a unit disk), with
``rho = |k|`` and ``phi = atan2(ky, kx)``. Even (symmetric) and odd (antisymmetric) terms have
separate index orders; ``Z(m, n) = R_n^|m|(rho) cos(m phi)`` for m >= 0 and ``sin(|m| phi)`` for m < 0.
"""
from __future__ import annotations

from math import factorial

import numpy as np


def even_index_to_mn(index: int) -> tuple[int, int]:
    """(m, n) of RELION's even Zernike index: 0:(0,0) 1:(-2,2) 2:(0,2) 3:(2,2) 4:(-4,4) ..."""
    k = int(np.floor(np.sqrt(index)))
    return 2 * (index - k * k - k), 2 * k


def odd_index_to_mn(index: int) -> tuple[int, int]:
    """(m, n) of RELION's odd Zernike index: 0:(-1,1) 1:(1,1) 2:(-3,3) 3:(-1,3) 4:(1,3) 5:(3,3) ..."""
    k = int(np.floor((np.sqrt(1 + 4 * index) - 1) / 2))
    n = 2 * k + 1
    return 2 * (index - k * k - k) - n, n


def even_count(max_order: int) -> int:
    """Number of even coefficients up to radial order ``max_order`` (9 for 4)."""
    half = max_order // 2
    return half * half + 2 * half + 1


def odd_count(max_order: int) -> int:
    """Number of odd coefficients up to radial order ``max_order`` (6 for 3)."""
    half = (max_order - 1) // 2 + 1
    return half * half + half


def radial_polynomial(m: int, n: int, rho: np.ndarray) -> np.ndarray:
    """Unnormalised Zernike radial polynomial ``R_n^|m|(rho)``."""
    m = abs(m)
    result = np.zeros_like(np.asarray(rho, dtype=float))
    if (n - m) % 2:
        return result
    for k in range((n - m) // 2 + 1):
        coefficient = (-1) ** k * factorial(n - k) / (
            factorial(k) * factorial((n + m) // 2 - k) * factorial((n - m) // 2 - k)
        )
        result = result + coefficient * np.power(rho, n - 2 * k)
    return result


def zernike(m: int, n: int, freq_x_per_angstrom: np.ndarray, freq_y_per_angstrom: np.ndarray) -> np.ndarray:
    """``Z(m, n)`` at the given frequencies (1/Å)."""
    rho = np.hypot(freq_x_per_angstrom, freq_y_per_angstrom)
    phi = np.arctan2(freq_y_per_angstrom, freq_x_per_angstrom)
    radial = radial_polynomial(m, n, rho)
    return radial * (np.cos(m * phi) if m >= 0 else np.sin(-m * phi))


def even_basis(max_order: int, freq_x_per_angstrom: np.ndarray, freq_y_per_angstrom: np.ndarray) -> np.ndarray:
    """Stack of even Zernike polynomials in RELION's index order, shape ``(count, *freq.shape)``."""
    return np.stack(
        [zernike(*even_index_to_mn(i), freq_x_per_angstrom, freq_y_per_angstrom) for i in range(even_count(max_order))]
    )


def odd_basis(max_order: int, freq_x_per_angstrom: np.ndarray, freq_y_per_angstrom: np.ndarray) -> np.ndarray:
    """Stack of odd Zernike polynomials in RELION's index order, shape ``(count, *freq.shape)``."""
    return np.stack(
        [zernike(*odd_index_to_mn(i), freq_x_per_angstrom, freq_y_per_angstrom) for i in range(odd_count(max_order))]
    )


def even_phase_rad(coefficients, freq_x_per_angstrom, freq_y_per_angstrom) -> np.ndarray:
    """Symmetric aberration phase ``chi_even = sum_i c_i Z_even_i`` (added to the CTF's gamma)."""
    total = np.zeros(np.broadcast(freq_x_per_angstrom, freq_y_per_angstrom).shape)
    for i, c in enumerate(coefficients):
        if c:
            total = total + c * zernike(*even_index_to_mn(i), freq_x_per_angstrom, freq_y_per_angstrom)
    return total


def odd_phase_rad(coefficients, freq_x_per_angstrom, freq_y_per_angstrom) -> np.ndarray:
    """Antisymmetric aberration phase ``chi_odd = sum_i c_i Z_odd_i`` (predictions get ``exp(i chi_odd)``)."""
    total = np.zeros(np.broadcast(freq_x_per_angstrom, freq_y_per_angstrom).shape)
    for i, c in enumerate(coefficients):
        if c:
            total = total + c * zernike(*odd_index_to_mn(i), freq_x_per_angstrom, freq_y_per_angstrom)
    return total
