"""RELION's Zernike conventions (spec 10.1): index order, counts, unnormalised polynomials in 1/Å."""
import numpy as np
import pytest

from tomoctfrefine.physics.zernike import (
    even_basis,
    even_count,
    even_index_to_mn,
    even_phase_rad,
    odd_basis,
    odd_count,
    odd_index_to_mn,
    odd_phase_rad,
    radial_polynomial,
    zernike,
)


def test_even_index_map():
    expected = [(0, 0), (-2, 2), (0, 2), (2, 2), (-4, 4), (-2, 4), (0, 4), (2, 4), (4, 4),
                (-6, 6), (-4, 6), (-2, 6), (0, 6), (2, 6), (4, 6), (6, 6)]
    assert [even_index_to_mn(i) for i in range(16)] == expected


def test_odd_index_map():
    expected = [(-1, 1), (1, 1), (-3, 3), (-1, 3), (1, 3), (3, 3), (-5, 5), (-3, 5), (-1, 5), (1, 5), (3, 5), (5, 5)]
    assert [odd_index_to_mn(i) for i in range(12)] == expected


def test_counts():
    assert [even_count(n) for n in (0, 2, 4, 6)] == [1, 4, 9, 16]
    assert [odd_count(n) for n in (1, 3, 5)] == [2, 6, 12]


def test_polynomials_in_inverse_angstrom_not_unit_disk():
    kx, ky = np.array([0.1, 0.0, 0.2]), np.array([0.0, 0.3, 0.2])
    rho, phi = np.hypot(kx, ky), np.arctan2(ky, kx)
    np.testing.assert_allclose(zernike(0, 2, kx, ky), 2 * rho**2 - 1)
    np.testing.assert_allclose(zernike(-2, 2, kx, ky), rho**2 * np.sin(2 * phi), atol=1e-15)
    np.testing.assert_allclose(zernike(2, 2, kx, ky), rho**2 * np.cos(2 * phi), atol=1e-15)
    np.testing.assert_allclose(zernike(0, 4, kx, ky), 6 * rho**4 - 6 * rho**2 + 1)
    np.testing.assert_allclose(zernike(4, 4, kx, ky), rho**4 * np.cos(4 * phi), atol=1e-15)
    np.testing.assert_allclose(zernike(-1, 3, kx, ky), (3 * rho**3 - 2 * rho) * np.sin(phi), atol=1e-15)
    np.testing.assert_allclose(zernike(3, 3, kx, ky), rho**3 * np.cos(3 * phi), atol=1e-15)
    assert np.all(radial_polynomial(1, 4, rho) == 0)


def test_orthogonality_on_the_unit_disk():
    # Gauss-Legendre in r (exact for these polynomial degrees), uniform in phi
    nodes, weights = np.polynomial.legendre.leggauss(20)
    r = 0.5 * (nodes + 1)
    wr = 0.5 * weights * r
    phi = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    rr, pp = np.meshgrid(r, phi, indexing="ij")
    area = wr[:, None] * (2 * np.pi / len(phi))
    kx, ky = rr * np.cos(pp), rr * np.sin(pp)
    for basis, index_to_mn in ((even_basis(6, kx, ky), even_index_to_mn), (odd_basis(5, kx, ky), odd_index_to_mn)):
        gram = np.einsum("iab,jab,ab->ij", basis, basis, area)
        mn = [index_to_mn(i) for i in range(len(basis))]
        expected = np.diag([np.pi * (2 if m == 0 else 1) / (2 * n + 2) for m, n in mn])
        np.testing.assert_allclose(gram, expected, atol=1e-12)


def test_phases_are_linear_combinations_and_have_the_right_symmetry():
    rng = np.random.default_rng(0)
    kx, ky = rng.normal(0, 0.1, 20), rng.normal(0, 0.1, 20)
    even, odd = rng.normal(size=9), rng.normal(size=6)
    np.testing.assert_allclose(even_phase_rad(even, kx, ky), np.tensordot(even, even_basis(4, kx, ky), 1))
    np.testing.assert_allclose(odd_phase_rad(odd, kx, ky), np.tensordot(odd, odd_basis(3, kx, ky), 1))
    np.testing.assert_allclose(even_phase_rad(even, -kx, -ky), even_phase_rad(even, kx, ky))
    np.testing.assert_allclose(odd_phase_rad(odd, -kx, -ky), -odd_phase_rad(odd, kx, ky))
    # the fixture's truth: even index 8 = 600 rad is Z(4,4) = 600 rho^4 cos(4 phi)
    coefficients = [0, 0, 0, 0, 0, 0, 0, 0, 600.0]
    assert even_phase_rad(coefficients, np.array(0.2), np.array(0.0)) == pytest.approx(600 * 0.2**4)
