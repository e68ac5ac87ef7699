"""Tomographic geometry in RELION's conventions (spec section 3, Appendix C.2)."""
import numpy as np
import pytest

from tomoctfrefine.physics.geometry import (
    depth_defocus_offset_angstrom,
    euler_zyz_matrices,
    euler_zyz_matrix,
    fourier_grid_per_angstrom,
    project,
    projection_matrix,
    rotation_x,
    rotation_y,
    rotation_z,
    tomogram_centre_px,
    visible,
)


def test_rotations_are_right_handed():
    np.testing.assert_allclose(rotation_z(90.0) @ [1, 0, 0], [0, 1, 0], atol=1e-15)
    np.testing.assert_allclose(rotation_x(90.0) @ [0, 1, 0], [0, 0, 1], atol=1e-15)
    np.testing.assert_allclose(rotation_y(90.0) @ [0, 0, 1], [1, 0, 0], atol=1e-15)


@pytest.mark.parametrize("angles", [(10.0, 20.0, 30.0), (-121.97, 5.06, -71.61), (81.46, 59.93, 23.42), (0.0, 180.0, 0.0)])
def test_euler_matrix_is_relions_euler_angles2matrix(angles):
    rot, tilt, psi = angles
    matrix = euler_zyz_matrix(rot, tilt, psi)
    # Euler_angles2matrix = (Rz(rot) Ry(tilt) Rz(psi))^T (eulerangles' intrinsic right-handed ZYZ, transposed)
    np.testing.assert_allclose(matrix, (rotation_z(rot) @ rotation_y(tilt) @ rotation_z(psi)).T, atol=1e-14)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-14)
    assert np.linalg.det(matrix) == pytest.approx(1.0)
    # literal entries of RELION's formula: A(0,2) = -cos(psi) sin(tilt), A(2,0) = sin(tilt) cos(rot)
    r, t, p = np.deg2rad(angles)
    assert matrix[0, 2] == pytest.approx(-np.cos(p) * np.sin(t), abs=1e-15)
    assert matrix[2, 0] == pytest.approx(np.sin(t) * np.cos(r), abs=1e-15)
    assert matrix[2, 2] == pytest.approx(np.cos(t), abs=1e-15)
    np.testing.assert_allclose(euler_zyz_matrices([rot, 5.0], [tilt, 6.0], [psi, 7.0])[0], matrix)


@pytest.mark.parametrize("tomogram_size,image_size", [((256, 256, 100), (256, 256)), ((927, 1001, 301), (999, 1023))])
def test_v5_projection_matrix_maps_integer_centre_to_image_centre_plus_shift(tomogram_size, image_size):
    rng = np.random.default_rng(1)
    for _ in range(5):
        xtilt, ytilt, zrot = rng.uniform(-60, 60, 3)
        xshift, yshift = rng.uniform(-50, 50, 2)
        matrix = projection_matrix(xtilt, ytilt, zrot, xshift, yshift, 1.7, tomogram_size, image_size)
        centre = [tomogram_size[0] // 2, tomogram_size[1] // 2, tomogram_size[2] // 2, 1.0]
        np.testing.assert_allclose(matrix @ centre,
                                   [image_size[0] // 2 + xshift / 1.7, image_size[1] // 2 + yshift / 1.7, 0.0, 1.0],
                                   atol=1e-10)
        np.testing.assert_allclose(matrix[:3, :3], rotation_z(zrot) @ rotation_y(ytilt) @ rotation_x(xtilt), atol=1e-14)
        np.testing.assert_allclose(matrix[3], [0, 0, 0, 1])


def test_tomogram_centre_uses_real_halves():
    np.testing.assert_array_equal(tomogram_centre_px((256, 255, 101)), [128.0, 127.5, 50.5])
    # a particle at centred coordinate 0 of an odd tomogram projects 0.5 px off the integer centre
    matrix = projection_matrix(0, 0, 0, 0, 0, 1.0, (255, 255, 101), (255, 255))
    np.testing.assert_allclose(project(matrix[None], tomogram_centre_px((255, 255, 101))[None])[0, 0], [127.5, 127.5, 0.5])


def test_depth_defocus_offset_sign_and_scale():
    size = (200, 200, 101)
    matrices = np.stack([projection_matrix(0, t, 0, 0, 0, 2.0, size, (200, 200)) for t in (0.0, 30.0)])
    centre = tomogram_centre_px(size)
    positions = centre[None] + np.array([[0.0, 0.0, 10.0], [20.0, 0.0, 0.0]])
    offsets = depth_defocus_offset_angstrom(matrices, positions, size, hand=-1.0, pixel_size_angstrom=2.0, defocus_slope=1.0)
    # untilted: hand * p * slope * dz; a particle 10 px above the centre with hand -1 is 20 Å less underfocused
    assert offsets[0, 0] == pytest.approx(-20.0)
    assert offsets[1, 0] == pytest.approx(0.0, abs=1e-12)
    # tilted by +30 deg about y: depth = -sin(30) x + cos(30) z
    assert offsets[0, 1] == pytest.approx(-20.0 * np.cos(np.deg2rad(30)))
    assert offsets[1, 1] == pytest.approx(20.0)  # x = +20 px -> depth -10 px -> -1 * 2 Å * -10
    doubled = depth_defocus_offset_angstrom(matrices, positions, size, hand=1.0, pixel_size_angstrom=2.0, defocus_slope=2.0)
    np.testing.assert_allclose(doubled, -2.0 * offsets)


def test_visibility_is_strict():
    xy = np.array([[32.0, 100.0], [32.01, 100.0], [256 - 32.0, 100.0], [255 - 32.0, 31.99], [100.0, 224.0]])
    assert visible(xy, 64, (256, 256)).tolist() == [False, True, False, False, False]


def test_fourier_grid_is_numpy_rfft2_with_negative_nyquist_row():
    fx, fy = fourier_grid_per_angstrom(8, 2.0)
    assert fx.shape == fy.shape == (8, 5)
    np.testing.assert_allclose(fx[0], np.arange(5) / 16.0)
    np.testing.assert_allclose(fy[:, 0], [0, 1, 2, 3, -4, -3, -2, -1] / np.float64(16.0))
