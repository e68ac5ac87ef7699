"""Per-tilt defocus from synthetic pixel-level statistics: unbiased whatever the scale, at the bound."""
import numpy as np
import pytest
from synthetic_tilt_statistics import change_between, simulate_statistics

from tomoctfrefine.physics.ctf import Optics
from tomoctfrefine.refine.bounds import cramer_rao_bounds
from tomoctfrefine.refine.defocus import apply_defocus_change, refine_defocus
from tomoctfrefine.refine.likelihood import FrequencyBand

OPTICS = Optics(300.0, 2.7, 0.1)
WAVELENGTH = OPTICS.wavelength_angstrom


def _series(rng, n, astigmatism=400.0, start_sd=600.0):
    true_u = rng.uniform(9000, 12000, n)
    true_v = true_u + astigmatism
    true_angle = np.full(n, 30.0)
    start_u = true_u + rng.normal(0, start_sd, n)
    return true_u, true_v, true_angle, start_u, start_u.copy(), np.zeros(n)


@pytest.mark.parametrize("true_scale", [0.3, 3.0])
def test_one_pass_recovers_defocus_astigmatism_and_scale_whatever_the_scale(true_scale):
    rng = np.random.default_rng(11)
    n = 30
    tu, tv, ta, su, sv, sa = _series(rng, n)
    stats, _ = simulate_statistics(
        rng, optics=OPTICS, box_size_px=48, pixel_size_angstrom=3.0, particles_per_tilt=20,
        true_u=tu, true_v=tv, true_angle=ta, start_u=su, start_v=sv, start_angle=sa,
        scale=np.full(n, true_scale), noise_sigma=3.0 * true_scale,
    )
    fit = refine_defocus(stats, WAVELENGTH, su, sv, sa)  # the statistics carry no scale: start "1"
    truth = change_between(su, sv, sa, tu, tv, ta)
    error = fit.defocus_change_angstrom - truth
    sd = np.sqrt(np.einsum("faa->fa", fit.covariance_angstrom2))
    assert np.all(np.abs(error) < 4 * sd)
    assert fit.uncertainty_angstrom.max() < 40  # the test has signal: ~20 Å per tilt
    assert abs(error[:, 0].mean()) < 4 * np.sqrt(np.mean(sd[:, 0] ** 2) / n)  # no bias
    assert np.all(np.abs(fit.scale - true_scale) < 4 * fit.scale_uncertainty)
    # RELION's convention: U <= V, and the new CTF is the true one (angle modulo 180 degrees)
    assert np.all(fit.defocus_u_angstrom <= fit.defocus_v_angstrom)
    assert np.all(np.abs(fit.defocus_u_angstrom - tu) < 4 * np.hypot(sd[:, 0], sd[:, 1]) + 1)
    angle_error = (fit.defocus_angle_deg - ta + 90) % 180 - 90
    assert np.all(np.abs(angle_error) < 15)


def test_error_over_many_tilts_is_at_the_cramer_rao_bound():
    rng = np.random.default_rng(5)
    n = 160
    tu, tv, ta, su, sv, sa = _series(rng, n)
    scale = rng.uniform(0.5, 1.5, n)
    stats, _ = simulate_statistics(
        rng, optics=OPTICS, box_size_px=48, pixel_size_angstrom=3.0, particles_per_tilt=15,
        true_u=tu, true_v=tv, true_angle=ta, start_u=su, start_v=sv, start_angle=sa,
        scale=scale, noise_sigma=2.5,
    )
    fit = refine_defocus(stats, WAVELENGTH, su, sv, sa)
    truth = change_between(su, sv, sa, tu, tv, ta)
    bound = cramer_rao_bounds(stats, WAVELENGTH, scale, defocus_change_angstrom=truth, band=FrequencyBand(30.0))
    error = fit.defocus_change_angstrom[:, 0] - truth[:, 0]
    ratio = np.sqrt(np.mean(error**2)) / np.sqrt(np.mean(bound.defocus_angstrom**2))
    assert 0.85 < ratio < 1.12
    scale_ratio = np.sqrt(np.mean(((fit.scale - scale) / bound.scale) ** 2))
    assert 0.85 < scale_ratio < 1.12
    # the reported uncertainty is the joint bound evaluated at the estimate (estimated scale)
    np.testing.assert_allclose(fit.uncertainty_angstrom, bound.defocus_joint_angstrom, rtol=0.15)
    rms = lambda a: np.sqrt(np.mean(a**2))  # noqa: E731
    assert rms(fit.uncertainty_angstrom) / rms(bound.defocus_joint_angstrom) == pytest.approx(1.0, abs=0.03)


def test_empty_tilts_keep_their_input_values_and_nothing_is_nan():
    rng = np.random.default_rng(3)
    n = 6
    tu, tv, ta, su, sv, sa = _series(rng, n)
    counts = np.array([20, 0, 20, 0, 20, 20])
    stats, _ = simulate_statistics(
        rng, optics=OPTICS, box_size_px=32, pixel_size_angstrom=3.0, particles_per_tilt=counts,
        true_u=tu, true_v=tv, true_angle=ta, start_u=su, start_v=sv, start_angle=sa,
        scale=np.ones(n), noise_sigma=3.0,
    )
    stats.b_s[5, 3, 2] = np.nan  # a corrupt tilt is treated as empty
    counts = np.array([20, 0, 20, 0, 20, 0])
    input_scale = np.array([1.0, 0.7, 1.0, 0.4, 1.0, 1.0])
    for lam in (0.0, 1.0):
        fit = refine_defocus(stats, WAVELENGTH, su, sv, sa, input_scale=input_scale, regularisation_lambda=lam)
        empty = counts == 0
        assert list(fit.refined) == list(~empty)
        np.testing.assert_array_equal(fit.defocus_u_angstrom[empty], su[empty])
        np.testing.assert_array_equal(fit.defocus_v_angstrom[empty], sv[empty])
        np.testing.assert_array_equal(fit.defocus_angle_deg[empty], sa[empty])
        np.testing.assert_array_equal(fit.scale[empty], input_scale[empty])
        for value in (fit.defocus_u_angstrom, fit.defocus_v_angstrom, fit.defocus_angle_deg, fit.scale, fit.scan_cost, fit.cost):
            assert not np.any(np.isnan(value))
    # a frame range: tilts outside it keep their input values like empty ones
    mask = np.array([True, True, False, True, True, True])
    fit = refine_defocus(stats, WAVELENGTH, su, sv, sa, input_scale=input_scale, tilt_mask=mask)
    assert list(fit.refined) == [True, False, False, False, True, False]
    assert (fit.defocus_u_angstrom[2], fit.defocus_v_angstrom[2], fit.defocus_angle_deg[2], fit.scale[2]) == (su[2], sv[2], sa[2], 1.0)


def test_results_do_not_depend_on_the_box_size():
    """Same particles (a 24-px object), same physical band, boxes of 32 and 48 px."""
    n = 24
    results = {}
    for box in (32, 48):
        rng = np.random.default_rng(8)
        tu, tv, ta, su, sv, sa = _series(rng, n)
        stats, _ = simulate_statistics(
            rng, optics=OPTICS, box_size_px=box, pixel_size_angstrom=3.0, particles_per_tilt=20,
            true_u=tu, true_v=tv, true_angle=ta, start_u=su, start_v=sv, start_angle=sa,
            scale=np.full(n, 0.8), noise_sigma=1.0, object_px=24,
        )
        fit = refine_defocus(stats, WAVELENGTH, su, sv, sa, band=FrequencyBand(30.0, 6.5))
        truth = change_between(su, sv, sa, tu, tv, ta)
        assert np.all(np.abs(fit.defocus_change_angstrom[:, 0] - truth[:, 0]) < 4 * fit.uncertainty_angstrom)
        assert np.all(np.abs(fit.scale - 0.8) < 4 * fit.scale_uncertainty)
        results[box] = fit
    # same information whatever the box: uncertainties agree (discretisation and particles' draws)
    rms = lambda a: np.sqrt(np.mean(a**2))  # noqa: E731
    assert rms(results[48].uncertainty_angstrom) / rms(results[32].uncertainty_angstrom) == pytest.approx(1.0, abs=0.05)
    assert rms(results[48].scale_uncertainty) / rms(results[32].scale_uncertainty) == pytest.approx(1.0, abs=0.05)
    assert np.mean(results[48].scale) == pytest.approx(np.mean(results[32].scale), abs=4 * rms(results[32].scale_uncertainty) / np.sqrt(n))


def test_regularisation_lambda_is_a_ratio_of_informations():
    """A tilt ends at (I_f x_own + lambda I_mean x_g) / (I_f + lambda I_mean)."""
    rng = np.random.default_rng(21)
    n = 20
    tu = tv = su = sv = np.full(n, 10500.0)
    ta = sa = np.zeros(n)
    offset = rng.normal(0, 80, n)  # true per-tilt deviations from a common defocus
    stats, _ = simulate_statistics(
        rng, optics=OPTICS, box_size_px=32, pixel_size_angstrom=3.0, particles_per_tilt=rng.integers(5, 40, n),
        true_u=tu + offset, true_v=tv + offset, true_angle=ta, start_u=su, start_v=sv, start_angle=sa,
        scale=np.ones(n), noise_sigma=3.0,
    )
    free = refine_defocus(stats, WAVELENGTH, su, sv, sa, fit_astigmatism=False)
    lam = 1.0
    pulled = refine_defocus(stats, WAVELENGTH, su, sv, sa, fit_astigmatism=False, regularisation_lambda=lam, regularised_components="all")
    information = 1 / free.uncertainty_angstrom**2
    mean_information = information.mean()
    common = pulled.common_angstrom[0]  # a common absolute mean defocus
    own = (free.defocus_u_angstrom + free.defocus_v_angstrom) / 2
    expected = (information * own + lam * mean_information * common) / (information + lam * mean_information)
    sd = 1 / np.sqrt(information + lam * mean_information)
    assert np.all(np.abs((pulled.defocus_u_angstrom + pulled.defocus_v_angstrom) / 2 - expected) < 0.25 * sd)  # quadratic approximation
    assert np.sqrt(np.mean((expected - own) ** 2)) > 1.5 * np.sqrt(np.mean(sd**2))  # and the pull is large
    rigid = refine_defocus(stats, WAVELENGTH, su, sv, sa, fit_astigmatism=False, regularisation_lambda=1e6, regularised_components="all")
    assert np.ptp(rigid.defocus_u_angstrom + rigid.defocus_v_angstrom) / 2 < 1.0


def test_default_regularisation_pulls_the_astigmatism_together_and_leaves_the_mean_defocus_free():
    rng = np.random.default_rng(22)
    n = 16
    tu, tv, ta, su, sv, sa = _series(rng, n, astigmatism=300.0)
    offset = rng.normal(0, 300, n)  # the mean defocus really varies from tilt to tilt
    stats, _ = simulate_statistics(
        rng, optics=OPTICS, box_size_px=32, pixel_size_angstrom=3.0, particles_per_tilt=rng.integers(3, 30, n),
        true_u=tu + offset, true_v=tv + offset, true_angle=ta, start_u=su, start_v=sv, start_angle=sa,
        scale=np.ones(n), noise_sigma=3.0,
    )
    truth = change_between(su, sv, sa, tu + offset, tv + offset, ta)
    free = refine_defocus(stats, WAVELENGTH, su, sv, sa)
    pulled = refine_defocus(stats, WAVELENGTH, su, sv, sa, regularisation_lambda=1e6)
    # astigmatism: one common value, closer to the truth than the per-tilt fits
    assert np.ptp(pulled.defocus_change_angstrom[:, 1:], axis=0).max() < 1.0
    free_error = np.sqrt(np.mean((free.defocus_change_angstrom[:, 1:] - truth[:, 1:]) ** 2))
    pulled_error = np.sqrt(np.mean((pulled.defocus_change_angstrom[:, 1:] - truth[:, 1:]) ** 2))
    assert pulled_error < 0.5 * free_error
    # mean defocus: still per tilt and unbiased
    error = pulled.defocus_change_angstrom[:, 0] - truth[:, 0]
    assert np.all(np.abs(error) < 4 * pulled.uncertainty_angstrom)
    with pytest.raises(ValueError, match="regularised_components must be 'astigmatism' or 'all', got 'defocus'"):
        refine_defocus(stats, WAVELENGTH, su, sv, sa, regularisation_lambda=1.0, regularised_components="defocus")


def test_defocus_change_follows_relion_eigen_convention():
    u, v, angle = apply_defocus_change([12000.0], [11000.0], [10.0], [[100.0, 0.0, 0.0]])
    assert u[0] == pytest.approx(11100.0) and v[0] == pytest.approx(12100.0)
    assert (angle[0] - 100.0 + 90) % 180 - 90 == pytest.approx(0.0, abs=1e-9)
    # a_c > 0 adds defocus along x and removes it along y: U (the smaller) lies along y
    u, v, angle = apply_defocus_change([10000.0], [10000.0], [0.0], [[0.0, 50.0, 0.0]])
    assert (u[0], v[0]) == pytest.approx((9950.0, 10050.0))
    assert abs(np.cos(np.deg2rad(angle[0]))) == pytest.approx(0.0, abs=1e-9)
