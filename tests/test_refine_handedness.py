"""Handedness check: the likelihood of both defocus hands."""
import numpy as np
import pytest
from synthetic_tilt_statistics import simulate_statistics

from tomoctfrefine.physics.ctf import Optics
from tomoctfrefine.refine.defocus import refine_defocus
from tomoctfrefine.refine.handedness import check_handedness

OPTICS = Optics(300.0, 2.7, 0.1)


def _true_u(seed, n):
    return np.random.default_rng(seed).uniform(9000, 12000, n)


def _stats(true_hand, depth_sd, seed=6, n=12):
    rng = np.random.default_rng(seed)
    tu = rng.uniform(9000, 12000, n)
    su = tu + rng.normal(0, 400, n)
    stats, _ = simulate_statistics(
        rng, optics=OPTICS, box_size_px=40, pixel_size_angstrom=3.0, particles_per_tilt=20,
        true_u=tu, true_v=tu, true_angle=np.zeros(n), start_u=su, start_v=su, start_angle=np.zeros(n),
        scale=np.ones(n), noise_sigma=3.0, depth_sd_angstrom=depth_sd, with_flipped_hand=True, true_hand=true_hand,
    )
    return stats, su


@pytest.mark.parametrize("true_hand, verdict", [(1.0, "input hand"), (-1.0, "opposite hand")])
def test_the_hand_of_the_data_is_named(true_hand, verdict):
    stats, su = _stats(true_hand, depth_sd=600.0)
    result = check_handedness(stats, OPTICS.wavelength_angstrom, su, su, np.zeros(len(su)))
    fit = refine_defocus(stats, OPTICS.wavelength_angstrom, su, su, np.zeros(len(su)))
    reused = check_handedness(stats, OPTICS.wavelength_angstrom, su, su, np.zeros(len(su)), input_fit=fit)
    assert reused.log_likelihood_ratio == pytest.approx(result.log_likelihood_ratio, rel=1e-9)
    assert result.verdict == verdict
    assert abs(result.z_score) > 3 and abs(result.log_likelihood_ratio) > 10
    assert np.sign(result.log_likelihood_ratio) == true_hand
    # the opposite hand's fit is returned (a run that adopts that hand keeps it): under the data's true
    # hand the defocus is found again
    kept = fit if true_hand == 1.0 else result.opposite_fit
    other = result.opposite_fit if true_hand == 1.0 else fit
    tu = _true_u(seed=6, n=len(su))
    assert np.sqrt(np.mean((kept.defocus_u_angstrom - tu) ** 2)) < 0.5 * np.sqrt(np.mean((other.defocus_u_angstrom - tu) ** 2))


def test_particles_at_one_depth_leave_the_hand_undecided():
    stats, su = _stats(1.0, depth_sd=0.0)
    result = check_handedness(stats, OPTICS.wavelength_angstrom, su, su, np.zeros(len(su)))
    assert result.verdict == "undecided"
    assert result.log_likelihood_ratio == pytest.approx(0.0, abs=1e-6)


def test_statistics_without_the_opposite_hand_are_refused():
    stats, su = _stats(1.0, depth_sd=100.0, n=2)
    stats.flipped_hand = None
    with pytest.raises(ValueError, match="without the opposite hand"):
        check_handedness(stats, OPTICS.wavelength_angstrom, su, su, np.zeros(2))
