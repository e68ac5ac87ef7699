"""Tomographic geometry in RELION's conventions (``tomogram.cpp``, ``particle_set.cpp``).

Arrays are indexed (x, y, z) with x first in coordinate vectors; images are numpy arrays indexed
``[y, x]``. All positions are in tilt-series pixels unless a name says otherwise.
Each convention is pinned by ``tests/test_geometry.py``.
"""
from __future__ import annotations

import numpy as np


def rotation_x(angle_deg: float) -> np.ndarray:
    """Right-handed rotation about x, ``[[1,0,0],[0,c,-s],[0,s,c]]``."""
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rotation_y(angle_deg: float) -> np.ndarray:
    """Right-handed rotation about y, ``[[c,0,s],[0,1,0],[-s,0,c]]``."""
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rotation_z(angle_deg: float) -> np.ndarray:
    """Right-handed rotation about z, ``[[c,-s,0],[s,c,0],[0,0,1]]``."""
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def translation(vector) -> np.ndarray:
    """4x4 homogeneous translation."""
    matrix = np.eye(4)
    matrix[:3, 3] = vector
    return matrix


def homogeneous(rotation: np.ndarray) -> np.ndarray:
    """4x4 homogeneous matrix of a 3x3 rotation."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    return matrix


def projection_matrix(
    x_tilt_deg: float,
    y_tilt_deg: float,
    z_rot_deg: float,
    x_shift_angstrom: float,
    y_shift_angstrom: float,
    pixel_size_angstrom: float,
    tomogram_size_px: tuple[int, int, int],
    image_size_px: tuple[int, int],
) -> np.ndarray:
    """RELION 5's projection matrix of one tilt (4x4, tomogram voxel -> image pixel and depth).

    ``P = T(ci + shift) Rz(zrot) Ry(ytilt) Rx(xtilt) T(-cs)`` with integer half sizes
    ``cs = (W0//2, H0//2, D0//2)`` and ``ci = (Wi//2, Hi//2, 0)``; shifts are divided by the pixel size.
    """
    width, height, depth = tomogram_size_px
    centre_tomogram = np.array([width // 2, height // 2, depth // 2], dtype=float)
    centre_image = np.array([image_size_px[0] // 2, image_size_px[1] // 2, 0], dtype=float)
    shift = np.array([x_shift_angstrom / pixel_size_angstrom, y_shift_angstrom / pixel_size_angstrom, 0.0])
    rotation = rotation_z(z_rot_deg) @ rotation_y(y_tilt_deg) @ rotation_x(x_tilt_deg)
    return translation(centre_image + shift) @ homogeneous(rotation) @ translation(-centre_tomogram)


def euler_zyz_matrix(rot_deg: float, tilt_deg: float, psi_deg: float) -> np.ndarray:
    """RELION's ``Euler_angles2matrix(rot, tilt, psi)`` (ZYZ), mapping reference coordinates to
    particle (tomogram) coordinates as RELION's tomography code uses it."""
    a, b, g = np.deg2rad([rot_deg, tilt_deg, psi_deg])
    ca, cb, cg = np.cos(a), np.cos(b), np.cos(g)
    sa, sb, sg = np.sin(a), np.sin(b), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array(
        [
            [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb],
        ]
    )


def euler_zyz_matrices(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """Vectorised :func:`euler_zyz_matrix`, shape ``(n, 3, 3)``."""
    return np.stack([euler_zyz_matrix(r, t, p) for r, t, p in zip(np.atleast_1d(rot_deg), np.atleast_1d(tilt_deg), np.atleast_1d(psi_deg))])


def tomogram_centre_px(tomogram_size_px: tuple[int, int, int]) -> np.ndarray:
    """RELION's tomogram centre ``C = size / 2.0`` (real halves; used for centred coordinates and depth)."""
    return np.asarray(tomogram_size_px, dtype=float) / 2.0


def project(projection_matrices: np.ndarray, positions_px: np.ndarray) -> np.ndarray:
    """Apply projection matrices ``(n_tilts, 4, 4)`` to positions ``(n_particles, 3)``.

    Returns ``(n_particles, n_tilts, 3)``: image x, image y (pixels) and depth z (pixels).
    """
    positions = np.asarray(positions_px, dtype=float)
    homogeneous_positions = np.concatenate([positions, np.ones((len(positions), 1))], axis=1)
    return np.einsum("fij,pj->pfi", projection_matrices[:, :3, :], homogeneous_positions)


def depth_defocus_offset_angstrom(
    projection_matrices: np.ndarray,
    positions_px: np.ndarray,
    tomogram_size_px: tuple[int, int, int],
    hand: float,
    pixel_size_angstrom: float,
    defocus_slope: float = 1.0,
) -> np.ndarray:
    """Per-particle, per-tilt defocus offset ``hand * p * slope * (z(pos) - z(C))`` in Å,
    shape ``(n_particles, n_tilts)``; added to both U and V of the tilt's central CTF."""
    depth = project(projection_matrices, positions_px)[..., 2]
    centre_depth = project(projection_matrices, tomogram_centre_px(tomogram_size_px)[None, :])[0, :, 2]
    return hand * pixel_size_angstrom * defocus_slope * (depth - centre_depth[None, :])


def visible(image_xy_px: np.ndarray, box_size_px: int, image_size_px: tuple[int, int]) -> np.ndarray:
    """RELION's visibility test: the box lies strictly inside the image,
    ``s/2 < x < W - s/2`` and ``s/2 < y < H - s/2``."""
    half = box_size_px / 2.0
    x, y = image_xy_px[..., 0], image_xy_px[..., 1]
    return (x > half) & (x < image_size_px[0] - half) & (y > half) & (y < image_size_px[1] - half)


def fourier_grid_per_angstrom(box_size_px: int, pixel_size_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (1/Å) of numpy's ``rfft2`` grid of an ``s x s`` image, each of shape ``(s, s//2+1)``
    indexed ``[y, x]``; the Nyquist row is negative (RELION's jaz convention)."""
    freq_y = np.fft.fftfreq(box_size_px)[:, None] / pixel_size_angstrom
    freq_x = np.fft.rfftfreq(box_size_px)[None, :] / pixel_size_angstrom
    return np.broadcast_to(freq_x, (box_size_px, box_size_px // 2 + 1)).copy(), np.broadcast_to(
        freq_y, (box_size_px, box_size_px // 2 + 1)
    ).copy()
