"""RELION's CTF and dose conventions (spec section 4, Appendix B/C.1; oracles_and_data.md section 3)."""
import numpy as np
import pytest

from tomoctfrefine.physics.ctf import (
    Optics,
    amplitude_contrast_phase,
    ctf_2d,
    ctf_gamma,
    defocus_from_quadratic_form,
    electron_wavelength_angstrom,
    quadratic_form_from_defocus,
)
from tomoctfrefine.physics.dose import dose_weight
from tomoctfrefine.physics.geometry import fourier_grid_per_angstrom

OPTICS = Optics(voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.07)


def test_wavelength_is_relions_formula():
    # Appendix B: 0.019688 Å at 300 kV, 0.025079 Å at 200 kV; the fixture's truth.json has 0.01968761530923358
    assert electron_wavelength_angstrom(300.0) == pytest.approx(0.01968761530923358, rel=1e-12)
    assert electron_wavelength_angstrom(200.0) == pytest.approx(0.025079, abs=5e-7)
    assert np.pi * electron_wavelength_angstrom(300.0) == pytest.approx(0.061850, abs=5e-7)


def test_ctf_at_origin_is_plus_amplitude_contrast():
    for q0 in (0.07, 0.1, 0.3):
        optics = Optics(300.0, 2.7, q0)
        assert ctf_2d(20000.0, 18000.0, 30.0, optics, np.array(0.0), np.array(0.0)) == pytest.approx(q0, abs=1e-12)
    assert amplitude_contrast_phase(0.07) == pytest.approx(np.arcsin(0.07), abs=1e-12)


def test_ctf_is_positive_just_after_origin_and_rises_with_defocus():
    k = 1.0 / (256 * 1.35)
    values = [ctf_2d(d, d, 0.0, OPTICS, np.array(k), np.array(0.0)) for d in (10000.0, 20000.0, 40000.0)]
    assert all(v > 0.07 for v in values)
    assert values[0] < values[1] < values[2]


def test_zeros_match_closed_form():
    # gamma(k) = -pi lambda df k^2 + pi/2 Cs lambda^3 k^4 - K3 = -n pi  ->  quadratic in k^2
    defocus = 20000.0
    lam = electron_wavelength_angstrom(300.0)
    k2 = 0.5 * np.pi * 2.7e7 * lam**3
    k1 = np.pi * lam * defocus
    k3 = amplitude_contrast_phase(0.07)
    zeros = []
    for n in range(1, 6):
        # k2 u^2 - k1 u + (n pi - k3) = 0, smaller root
        u = (k1 - np.sqrt(k1 * k1 - 4 * k2 * (n * np.pi - k3))) / (2 * k2)
        zeros.append(np.sqrt(u))
    zeros = np.array(zeros)
    # oracle (torch-ctf and RELION on a 256 px, 1.35 Å/px grid): the first zero follows pixel 17,
    # 17/345.6 = 0.0492 1/Å, for 2 µm, 300 kV, Cs 2.7, Q0 0.07
    assert 17 < zeros[0] * 256 * 1.35 < 18
    assert zeros[0] == pytest.approx(0.049846, abs=1e-6)
    values = ctf_2d(defocus, defocus, 0.0, OPTICS, zeros, np.zeros_like(zeros))
    assert np.max(np.abs(values)) < 1e-9
    before = ctf_2d(defocus, defocus, 0.0, OPTICS, zeros * (1 - 1e-3), np.zeros_like(zeros))
    after = ctf_2d(defocus, defocus, 0.0, OPTICS, zeros * (1 + 1e-3), np.zeros_like(zeros))
    assert np.all(np.sign(before) == -np.sign(after))
    assert np.sign(before[0]) > 0  # positive lobe before the first zero


def test_defocus_u_acts_along_x_at_angle_zero():
    k = np.linspace(0.01, 0.2, 50)
    zero = np.zeros_like(k)
    along_x = ctf_gamma(22000.0, 18000.0, 0.0, OPTICS, k, zero)
    along_y = ctf_gamma(22000.0, 18000.0, 0.0, OPTICS, zero, k)
    np.testing.assert_allclose(along_x, ctf_gamma(22000.0, 22000.0, 0.0, OPTICS, k, zero), rtol=1e-13)
    np.testing.assert_allclose(along_y, ctf_gamma(18000.0, 18000.0, 0.0, OPTICS, zero, k), rtol=1e-13)
    # angle 30 deg: U acts along (cos 30, sin 30), V along (-sin 30, cos 30)
    a = np.deg2rad(30.0)
    np.testing.assert_allclose(
        ctf_gamma(22000.0, 18000.0, 30.0, OPTICS, k * np.cos(a), k * np.sin(a)),
        ctf_gamma(22000.0, 22000.0, 0.0, OPTICS, k, zero), rtol=1e-12)
    np.testing.assert_allclose(
        ctf_gamma(22000.0, 18000.0, 30.0, OPTICS, -k * np.sin(a), k * np.cos(a)),
        ctf_gamma(18000.0, 18000.0, 0.0, OPTICS, k, zero), rtol=1e-12)


def test_phase_shift_and_even_phase_add_to_gamma_with_relions_signs():
    k = np.array([0.05, 0.1])
    base = ctf_gamma(20000.0, 20000.0, 0.0, OPTICS, k, 0 * k)
    np.testing.assert_allclose(ctf_gamma(20000.0, 20000.0, 0.0, OPTICS, k, 0 * k, phase_shift_deg=90.0), base - np.pi / 2)
    np.testing.assert_allclose(ctf_gamma(20000.0, 20000.0, 0.0, OPTICS, k, 0 * k, even_phase_rad=0.3), base + 0.3)
    # B-factor envelope and scale multiply -sin(gamma)
    np.testing.assert_allclose(
        ctf_2d(20000.0, 20000.0, 0.0, OPTICS, k, 0 * k, bfactor_angstrom2=100.0, scale=0.5),
        -np.sin(base) * np.exp(-25.0 * k**2) * 0.5)


@pytest.mark.parametrize("u,v,angle", [(22000.0, 18000.0, 30.0), (18000.0, 22000.0, 30.0), (25000.0, 24000.0, -150.0),
                                       (20000.0, 20500.0, 200.0), (30000.0, 29000.0, 95.0)])
def test_eigen_round_trip_gives_u_le_v_and_the_same_ctf(u, v, angle):
    axx, axy, ayy = quadratic_form_from_defocus(u, v, angle)
    u2, v2, angle2 = defocus_from_quadratic_form(axx, axy, ayy)
    assert u2 <= v2
    assert (u2, v2) == pytest.approx((min(u, v), max(u, v)), abs=1e-6)
    assert -180.0 < angle2 <= 180.0
    fx, fy = fourier_grid_per_angstrom(64, 1.35)
    np.testing.assert_allclose(ctf_gamma(u2, v2, angle2, OPTICS, fx, fy), ctf_gamma(u, v, angle, OPTICS, fx, fy), atol=1e-9)


def test_dose_weight_grant_grigorieff_and_bfactor():
    k = np.array([0.0, 0.05, 0.1, 0.25])
    expected = np.exp(-30.0 / (2.0 * (0.245 * k[1:] ** -1.665 + 2.81)))
    weights = dose_weight(30.0, k)
    assert weights[0] == 1.0
    np.testing.assert_allclose(weights[1:], expected, rtol=1e-12)
    assert weights[1] > weights[2] > weights[3]
    np.testing.assert_allclose(dose_weight(30.0, k, bfactor_per_electron_dose_angstrom2=4.0), np.exp(-4.0 * 30.0 * k**2 / 4.0))
    np.testing.assert_allclose(dose_weight(0.0, k), 1.0)


def test_eigen_decomposition_follows_relions_dsyev2_sign_convention():
    # A = diag(-U, -V): RELION's dsyev2 returns the U axis as (-1, 0) when U < V, (0, 1) when U > V
    u, v, angle = defocus_from_quadratic_form(*quadratic_form_from_defocus(20000.0, 21000.0, 0.0))
    assert (u, v, abs(angle)) == pytest.approx((20000.0, 21000.0, 180.0))  # sign of a zero A_xy picks -180 as in C
    assert defocus_from_quadratic_form(*quadratic_form_from_defocus(21000.0, 20000.0, 0.0)) == pytest.approx((20000.0, 21000.0, 90.0))
    assert defocus_from_quadratic_form(*quadratic_form_from_defocus(5578.467, 33464.458, 297.184)) == pytest.approx((5578.467, 33464.458, 117.184))
    assert defocus_from_quadratic_form(-20000.0, 0.0, -20000.0) == (20000.0, 20000.0, 0.0)


def test_relion_written_defocus_triples_are_fixed_points(relion5_small):
    """RELION 5.0.1's refined (U, V, angle) of the fixture come out of dsyev2, so they map to themselves."""
    from tomoctfrefine.io.star import read_star

    path = relion5_small / "runs" / "defocus_scale_aberr" / "tilt_series" / "TS_01.star"
    table = read_star(path).blocks["TS_01"]
    for u, v, angle in zip(table["rlnDefocusU"], table["rlnDefocusV"], table["rlnDefocusAngle"]):
        assert defocus_from_quadratic_form(*quadratic_form_from_defocus(u, v, angle)) == pytest.approx((u, v, angle), abs=1e-6)
