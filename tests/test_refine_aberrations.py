"""Even and odd Zernike aberrations fitted jointly with per-tilt defocus and scale."""
import numpy as np
import pytest
from synthetic_tilt_statistics import change_between, simulate_statistics

from tomoctfrefine.physics import zernike
from tomoctfrefine.physics.ctf import Optics
from tomoctfrefine.physics.geometry import fourier_grid_per_angstrom
from tomoctfrefine.refine.aberrations import (
    add_coefficients,
    even_fit_design,
    full_centred_image,
    refine_aberrations,
)
from tomoctfrefine.refine.defocus import refine_defocus
from tomoctfrefine.refine.likelihood import FrequencyBand

OPTICS = Optics(300.0, 2.7, 0.1)
BOX, PIXEL = 48, 2.0


def test_defocus_free_basis_has_no_defocus_or_constant_part():
    indices, design = even_fit_design(4, defocus_free=True)
    assert indices == [4, 5, 6, 7, 8]
    assert even_fit_design(4, defocus_free=True, fit_constant_phase=True)[0] == [0, 4, 5, 6, 7, 8]
    rho = np.linspace(0.0, 0.3, 7)
    for phi in (0.0, 0.4):
        fx, fy = rho * np.cos(phi), rho * np.sin(phi)
        basis = design @ zernike.even_basis(4, fx, fy)
        np.testing.assert_allclose(basis[indices.index(6)], 6 * rho**4, atol=1e-12)  # Z(0,4) -> 6 rho^4
        np.testing.assert_allclose(basis[indices.index(7)], 4 * rho**4 * np.cos(2 * phi), atol=1e-12)
        np.testing.assert_allclose(basis[indices.index(5)], 4 * rho**4 * np.sin(2 * phi), atol=1e-12)
    assert even_fit_design(4, defocus_free=False)[0] == list(range(9))


def test_new_coefficients_are_added_to_existing_ones_as_relion_does():
    np.testing.assert_array_equal(add_coefficients([1.0, 2.0], [0.5, 0.5, 0.5]), [1.5, 2.5, 0.5])
    np.testing.assert_array_equal(add_coefficients([1.0, 2.0, 3.0, 4.0], [0.5, 0.5]), [1.5, 2.5])


def test_full_centred_image_completes_the_conjugate_half():
    rng = np.random.default_rng(0)
    fx, fy = fourier_grid_per_angstrom(8, 1.0)
    odd_c, even_c = rng.normal(size=6), rng.normal(size=9)
    odd = zernike.odd_phase_rad(odd_c, fx, fy)
    even = zernike.even_phase_rad(even_c, fx, fy)
    full_fx = (np.arange(8) - 4)[None, :] / 8.0 * np.ones((8, 1))
    full_fy = (np.arange(8) - 4)[:, None] / 8.0 * np.ones((1, 8))
    # away from the Nyquist row and column, each pixel holds the polynomial at its own frequency
    inside = (np.abs(full_fx) < 0.5) & (np.abs(full_fy) < 0.5)
    np.testing.assert_allclose(full_centred_image(even, antisymmetric=False)[inside], zernike.even_phase_rad(even_c, full_fx, full_fy)[inside], atol=1e-12)
    np.testing.assert_allclose(full_centred_image(odd, antisymmetric=True)[inside], zernike.odd_phase_rad(odd_c, full_fx, full_fy)[inside], atol=1e-12)
    assert full_centred_image(even, antisymmetric=False)[4, 4] == even[0, 0]  # origin at (s/2, s/2)


def _dataset(rng, even_true_coefficients, odd_true_coefficients, n_tomograms=2, n_tilts=20):
    fx, fy = fourier_grid_per_angstrom(BOX, PIXEL)
    even_true = zernike.even_phase_rad(even_true_coefficients, fx, fy)
    odd_true = zernike.odd_phase_rad(odd_true_coefficients, fx, fy)
    stats, ctf, truths = {}, {}, {}
    for t in range(n_tomograms):
        name = f"TS_{t}"
        tu = rng.uniform(5000, 7000, n_tilts)
        tv, ta = tu + 300, np.full(n_tilts, 30.0)
        su = tu + rng.normal(0, 500, n_tilts)
        stats[name], _ = simulate_statistics(
            rng, optics=OPTICS, box_size_px=BOX, pixel_size_angstrom=PIXEL, particles_per_tilt=15,
            true_u=tu, true_v=tv, true_angle=ta, start_u=su, start_v=su, start_angle=np.zeros(n_tilts),
            scale=rng.uniform(0.7, 1.3, n_tilts), noise_sigma=2.0, true_even_phase=even_true, true_odd_phase=odd_true,
        )
        ctf[name] = (su, su.copy(), np.zeros(n_tilts))
        truths[name] = change_between(su, su, np.zeros(n_tilts), tu, tv, ta)
    return stats, ctf, truths, even_true, odd_true


def test_joint_fit_recovers_even_and_odd_aberrations_and_unbiased_defocus():
    rng = np.random.default_rng(1)
    indices, design = even_fit_design(4, defocus_free=True)
    alpha = np.zeros(len(indices))
    alpha[indices.index(6)], alpha[indices.index(4)] = 50.0, 20.0  # ~1.1 rad RMS, 4.7 rad at Nyquist
    even_coefficients = alpha @ design
    odd_coefficients = np.array([0.0, 0.0, 40.0, 0.3, -0.2, 30.0])  # trefoil and coma, 0.45 rad RMS
    stats, ctf, truths, even_true, odd_true = _dataset(rng, even_coefficients, odd_coefficients)
    wavelengths = {name: OPTICS.wavelength_angstrom for name in stats}
    starts = {name: refine_defocus(stats[name], OPTICS.wavelength_angstrom, *ctf[name]) for name in stats}
    fit = refine_aberrations(stats, wavelengths, ctf, defocus_start=starts, existing_even=[0.1] * 9)
    assert np.all(np.abs(fit.even_change - even_coefficients) < 4 * fit.even_uncertainty + 1e-9)
    assert np.all(np.abs(fit.odd_change - odd_coefficients) < 4 * fit.odd_uncertainty)
    np.testing.assert_allclose(fit.even_coefficients, fit.even_change + 0.1)
    band = FrequencyBand(30.0).mask(BOX, PIXEL)
    fx, fy = fourier_grid_per_angstrom(BOX, PIXEL)
    even_error = zernike.even_phase_rad(fit.even_change, fx, fy) - even_true
    odd_error = zernike.odd_phase_rad(fit.odd_change, fx, fy) - odd_true
    assert np.sqrt(np.mean(even_error[band] ** 2)) < 0.08  # 1.1 rad of aberration to < 0.08 rad
    assert np.sqrt(np.mean(odd_error[band] ** 2)) < 0.03
    np.testing.assert_allclose(fit.even_phase_fit, np.where(band, zernike.even_phase_rad(fit.even_change, fx, fy), 0), atol=1e-9)
    # per-pixel maps agree with the truth where they carry information
    weight = fit.even_weight_per_pixel[band]
    wrapped = np.abs(np.angle(np.exp(1j * (fit.even_phase_per_pixel[band] - even_true[band]))))
    assert np.sum(weight * wrapped) / weight.sum() < 0.2
    for name in stats:
        d = fit.defocus[name]
        error = d.defocus_change_angstrom - truths[name]
        sd = np.sqrt(np.einsum("faa->fa", d.covariance_angstrom2))
        assert np.all(np.abs(error) < 4 * sd)
        # the same defocus refined while ignoring the aberrations is off by hundreds of Å
        assert np.sqrt(np.mean((starts[name].defocus_change_angstrom[:, 0] - truths[name][:, 0]) ** 2)) > 10 * np.sqrt(np.mean(sd[:, 0] ** 2))


def test_without_defocus_refinement_the_zernike_terms_absorb_a_common_defocus():
    """RELION's way: defocus kept, all even polynomials free (Z(0,2) takes a common defocus error)."""
    rng = np.random.default_rng(2)
    stats, ctf, truths, _, _ = _dataset(rng, np.zeros(9), np.zeros(6), n_tomograms=1, n_tilts=12)
    name = "TS_0"
    # start every tilt at its true CTF plus a common defocus error of 150 Å
    tu_true = ctf[name][0] + truths[name][:, 0]
    stats2, _ = simulate_statistics(
        rng, optics=OPTICS, box_size_px=BOX, pixel_size_angstrom=PIXEL, particles_per_tilt=15,
        true_u=tu_true, true_v=tu_true, true_angle=np.zeros(12), start_u=tu_true - 150, start_v=tu_true - 150,
        start_angle=np.zeros(12), scale=np.ones(12), noise_sigma=2.0,
    )
    fit = refine_aberrations({name: stats2}, {name: OPTICS.wavelength_angstrom}, {name: (tu_true - 150, tu_true - 150, np.zeros(12))},
                             refine_defocus=False, odd_order=None)
    assert fit.fitted_even_indices == list(range(9))
    # delta = -pi lambda 150 |k|^2 = c02 Z(0,2) + c00 Z(0,0) with c02 = -pi lambda 150 / 2
    expected = -np.pi * OPTICS.wavelength_angstrom * 150 / 2
    assert fit.even_change[2] == pytest.approx(expected, abs=4 * fit.even_uncertainty[2])
    assert fit.even_change[0] == pytest.approx(expected, abs=4 * fit.even_uncertainty[0])
    np.testing.assert_array_equal(fit.defocus[name].defocus_u_angstrom, tu_true - 150)
    assert fit.odd_coefficients.size == 0
