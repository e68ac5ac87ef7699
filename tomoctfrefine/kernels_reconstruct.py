"""numba kernels of the particle reconstruction (temporary home; to be appended to ``kernels.py``).

Fourier arrays use numpy's ``rfftn`` layout: a 3D volume is ``[kz, ky, kx]`` of shape ``(s, s, s//2+1)``,
a 2D slice ``[ky, kx]`` of shape ``(s, s//2+1)``; negative frequencies wrap (index ``k + s``).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _bilinear_half_complex(slice_fs, px, py):
    """Bilinear sample of a half-complex 2D transform at signed pixel frequency (px, py), using
    Hermitian symmetry ``F(-k) = conj F(k)`` for ``px < 0``."""
    s = slice_fs.shape[0]
    sh = slice_fs.shape[1]
    conjugate = False
    if px < 0.0:
        px = -px
        py = -py
        conjugate = True
    x0 = int(np.floor(px))
    fx = px - x0
    y0 = int(np.floor(py))
    fy = py - y0
    x1 = x0 + 1
    if x1 > sh - 1:
        x1 = sh - 1
    if x0 > sh - 1:
        x0 = sh - 1
    y0i = y0 % s
    y1i = (y0 + 1) % s
    v00 = slice_fs[y0i, x0]
    v01 = slice_fs[y0i, x1]
    v10 = slice_fs[y1i, x0]
    v11 = slice_fs[y1i, x1]
    value = (1.0 - fy) * ((1.0 - fx) * v00 + fx * v01) + fy * ((1.0 - fx) * v10 + fx * v11)
    if conjugate:
        return np.conj(value)
    return value


@njit(cache=True, inline="always")
def _bilinear_half_real(slice_w, px, py):
    """Bilinear sample of a real, point-symmetric half-grid 2D array (``W(-k) = W(k)``)."""
    s = slice_w.shape[0]
    sh = slice_w.shape[1]
    if px < 0.0:
        px = -px
        py = -py
    x0 = int(np.floor(px))
    fx = px - x0
    y0 = int(np.floor(py))
    fy = py - y0
    x1 = x0 + 1
    if x1 > sh - 1:
        x1 = sh - 1
    if x0 > sh - 1:
        x0 = sh - 1
    y0i = y0 % s
    y1i = (y0 + 1) % s
    return (1.0 - fy) * ((1.0 - fx) * slice_w[y0i, x0] + fx * slice_w[y0i, x1]) + fy * (
        (1.0 - fx) * slice_w[y1i, x0] + fx * slice_w[y1i, x1]
    )


@njit(parallel=True, cache=True)
def backproject_slices(slices_fs, slice_weights, inverse_transposed, half_index, max_radius_px, data_fs, weight_fs):
    """Insert central slices into 3D Fourier accumulators (gather form, as RELION's backward projector).

    Each 3D voxel ``w`` (signed pixel frequency, ``|w| <= max_radius_px[j]``) within one voxel of the plane of slice j
    receives ``(1 - |d|)`` times the bilinear interpolation of the slice at ``(kx, ky)``, where
    ``(kx, ky, d) = inverse_transposed[j] @ w``; the weights are accumulated the same way.

    Parameters
    ----------
    slices_fs : complex128 (n, s, s//2+1)
        CTF-multiplied 2D transforms (origin at the particle centre).
    slice_weights : float64 (n, s, s//2+1)
        Their weights (CTF^2 times dose^2).
    inverse_transposed : float64 (n, 3, 3)
        ``inv(M).T`` with ``M = P[:3,:3] @ A`` (for a rotation this is ``M`` itself).
    half_index : int64 (n,)
        0 or 1: the accumulator each slice goes into.
    max_radius_px : float64 (n,)
        Largest 3D frequency radius (pixels) a slice may fill (RELION's dose cut-off ``maxFreq``).
    data_fs : complex128 (2, s, s, s//2+1)   (modified in place)
    weight_fs : float64 (2, s, s, s//2+1)    (modified in place)
    """
    n = slices_fs.shape[0]
    s = data_fs.shape[1]
    sh = data_fs.shape[3]
    half = s // 2
    for z in prange(s):
        zz = z if z < half else z - s
        for j in range(n):
            h = half_index[j]
            m = inverse_transposed[j]
            nx, ny, nz = m[2, 0], m[2, 1], m[2, 2]
            max_r2 = max_radius_px[j] * max_radius_px[j]
            for y in range(s):
                yy = y if y < half else y - s
                if yy * yy + zz * zz > max_r2:
                    continue
                yz = ny * yy + nz * zz
                if nx == 0.0:
                    if yz > -1.0 and yz < 1.0:
                        x0 = 0
                        x1 = sh - 1
                    else:
                        continue
                else:
                    a0 = (-yz - 1.0) / nx
                    a1 = (-yz + 1.0) / nx
                    if a0 > a1:
                        a0, a1 = a1, a0
                    x0 = int(np.ceil(a0))
                    x1 = int(np.floor(a1))
                    if x0 < 0:
                        x0 = 0
                    if x1 > sh - 1:
                        x1 = sh - 1
                for x in range(x0, x1 + 1):
                    if x * x + yy * yy + zz * zz > max_r2:
                        continue
                    depth = nx * x + yz
                    if depth <= -1.0 or depth >= 1.0:
                        continue
                    px = m[0, 0] * x + m[0, 1] * yy + m[0, 2] * zz
                    py = m[1, 0] * x + m[1, 1] * yy + m[1, 2] * zz
                    if abs(px) >= sh or abs(py) >= half + 1:
                        continue
                    c = 1.0 - abs(depth)
                    data_fs[h, z, y, x] += c * _bilinear_half_complex(slices_fs[j], px, py)
                    weight_fs[h, z, y, x] += c * _bilinear_half_real(slice_weights[j], px, py)
