"""Scale models: per frame, Beer-Lambert per tomogram and with a global luminance."""
import numpy as np
import pytest
from synthetic_tilt_statistics import simulate_statistics

from tomoctfrefine.physics.ctf import Optics
from tomoctfrefine.physics.geometry import projection_matrix
from tomoctfrefine.refine.defocus import refine_defocus
from tomoctfrefine.refine.scale import (
    fit_beer_lambert,
    fit_global_beer_lambert,
    fit_per_frame_scale,
    scale_evidence,
    tilt_geometry,
)

TILTS = np.arange(-60.0, 61.0, 3.0)


def _matrices(tilts=TILTS, z_rot=85.0):
    return np.stack([projection_matrix(0.0, t, z_rot, 0.0, 0.0, 2.0, (1000, 1000, 400), (1024, 1024)) for t in tilts])


def _beer_lambert(geometry, luminance, thickness, angle_deg):
    return luminance * np.exp(-thickness * geometry.inverse_cosines(np.deg2rad(angle_deg)))


def test_tilt_geometry_follows_the_projection_matrices():
    geometry = tilt_geometry(_matrices(z_rot=0.0))
    # tilting about y: the axis is y, the untilted beam is z, the beams rotate in the x-z plane
    assert abs(geometry.tilt_axis @ [0, 1, 0]) == pytest.approx(1.0)
    np.testing.assert_allclose(np.abs(geometry.beam_directions[len(TILTS) // 2]), [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(np.abs(geometry.beam_directions @ [0, 0, 1]), np.cos(np.deg2rad(TILTS)), atol=1e-12)
    assert abs(geometry.q_hat @ [0, 0, 1]) == pytest.approx(1.0)


def test_beer_lambert_recovers_luminance_thickness_and_normal():
    rng = np.random.default_rng(2)
    matrices = _matrices()
    geometry = tilt_geometry(matrices)
    truth = _beer_lambert(geometry, 0.9, 0.4, 12.0)
    information = rng.uniform(2e3, 2e4, len(TILTS))
    estimate = truth + rng.normal(size=len(TILTS)) / np.sqrt(information)
    fit = fit_beer_lambert(estimate, information, matrices)
    assert fit.success and fit.model == "beer_lambert"
    # tolerances: a few standard errors of a 41-tilt fit with ~1 % per-tilt noise
    assert fit.luminance == pytest.approx(0.9, rel=0.03)
    assert fit.relative_ice_thickness == pytest.approx(0.4, abs=0.03)
    angle = np.rad2deg(np.arctan2(fit.ice_normal @ geometry.p_hat, fit.ice_normal @ geometry.q_hat))
    assert (angle - 12.0 + 90) % 180 - 90 == pytest.approx(0.0, abs=2.0)
    residual = (fit.scale - truth) * np.sqrt(information)
    assert np.sqrt(np.mean(residual**2)) < 0.5  # the model is far better than the per-tilt noise


def test_global_luminance_is_shared_and_each_tomogram_keeps_its_ice():
    rng = np.random.default_rng(4)
    names = ["TS_01", "TS_02", "TS_03"]
    truths = {"TS_01": (0.3, -8.0), "TS_02": (0.7, 20.0), "TS_03": (0.5, 0.0)}
    matrices, estimates, informations = {}, {}, {}
    for name in names:
        matrices[name] = _matrices(z_rot=rng.uniform(-90, 90))
        geometry = tilt_geometry(matrices[name])
        truth = _beer_lambert(geometry, 1.7, *truths[name])
        informations[name] = rng.uniform(500, 5000, len(TILTS))
        estimates[name] = truth + rng.normal(size=len(TILTS)) / np.sqrt(informations[name])
    estimates["TS_03"][:] = np.nan  # a tomogram without data is reported, not fitted
    informations["TS_03"][:] = 0.0
    fits = fit_global_beer_lambert(estimates, informations, matrices, input_scales={"TS_03": np.full(len(TILTS), 0.5)})
    assert list(fits) == names
    assert fits["TS_01"].luminance == fits["TS_02"].luminance == pytest.approx(1.7, rel=0.05)
    assert fits["TS_01"].relative_ice_thickness == pytest.approx(0.3, abs=0.05)
    assert fits["TS_02"].relative_ice_thickness == pytest.approx(0.7, abs=0.05)
    assert not fits["TS_03"].success
    assert fits["TS_03"].message.startswith("Beer-Lambert fit impossible (0 tilt(s)")
    np.testing.assert_array_equal(fits["TS_03"].scale, 0.5)
    for fit in fits.values():
        assert np.all(np.isfinite(fit.scale))


def test_per_frame_scale_keeps_input_for_tilts_without_information():
    fit = fit_per_frame_scale([0.5, np.nan, -0.1, 0.8], [10.0, 0.0, 5.0, 0.0], input_scale=[1, 0.6, 1, 0.9])
    np.testing.assert_array_equal(fit.scale, [0.5, 0.6, 0.0, 0.9])
    assert fit.message == "per-frame scale; 2 tilt(s) without information keep their input scale"


def test_scales_from_statistics_follow_beer_lambert():
    """End to end: per-frame scale at the refined defocus, then the Beer-Lambert model."""
    rng = np.random.default_rng(9)
    tilts = np.arange(-60.0, 61.0, 6.0)
    matrices = _matrices(tilts)
    geometry = tilt_geometry(matrices)
    truth = _beer_lambert(geometry, 2.0, 0.5, 5.0)
    n = len(tilts)
    optics = Optics(300.0, 2.7, 0.1)
    true_u = rng.uniform(20000, 24000, n)
    start_u = true_u + rng.normal(0, 500, n)
    stats, _ = simulate_statistics(
        rng, optics=optics, box_size_px=32, pixel_size_angstrom=4.0, particles_per_tilt=20,
        true_u=true_u, true_v=true_u, true_angle=np.zeros(n), start_u=start_u, start_v=start_u, start_angle=np.zeros(n),
        scale=truth, noise_sigma=2.0,
    )
    defocus = refine_defocus(stats, optics.wavelength_angstrom, start_u, start_u, np.zeros(n))
    assert np.all(np.abs(defocus.scale - truth) < 4 * defocus.scale_uncertainty)
    fit = fit_beer_lambert(defocus.scale, defocus.scale_information, matrices)
    assert fit.luminance == pytest.approx(2.0, rel=0.05)
    assert fit.relative_ice_thickness == pytest.approx(0.5, abs=0.05)
    assert np.all(np.abs(fit.scale - truth) < 2 * defocus.scale_uncertainty)


def test_scale_evidence_at_the_true_ctf_recovers_the_scale_and_marks_empty_tilts():
    rng = np.random.default_rng(12)
    n = 5
    optics = Optics(300.0, 2.7, 0.1)
    u = rng.uniform(20000, 24000, n)
    truth = np.array([0.5, 1.0, 2.0, 1.0, 0.3])
    stats, _ = simulate_statistics(
        rng, optics=optics, box_size_px=32, pixel_size_angstrom=4.0, particles_per_tilt=[20, 20, 20, 0, 20],
        true_u=u, true_v=u, true_angle=np.zeros(n), start_u=u, start_v=u, start_angle=np.zeros(n),
        scale=truth, noise_sigma=1.0,
    )
    estimate, information = scale_evidence(stats)
    assert information[3] == 0.0 and estimate[3] == 0.0
    sd = 1 / np.sqrt(information[[0, 1, 2, 4]])
    assert np.all(np.abs(estimate[[0, 1, 2, 4]] - truth[[0, 1, 2, 4]]) < 4 * sd)
    assert np.all(sd < 0.05 * truth[[0, 1, 2, 4]])
