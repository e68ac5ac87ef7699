"""The forward model windows the CTF-filtered prediction like the observed boxes (statistics.py, Notes).

At 30 000 Å defocus and 2 Å pixels the CTF moves the signal near Nyquist ``lambda dz |k| / p`` ~ 74 px
from the particle: far beyond a 96-px box, whose cropCircle taper cuts it off. The periodic model
``sin(gamma) q`` on the box's grid then misses what the box lost: at the true CTF the fits find a fake
isotropic ``rho^4`` aberration and a scale that is too low. Data: the project's simulator (independent
rendering of pseudo-atoms), noiseless stack, one tilt series, one particle (no neighbour's delocalised
signal in its boxes).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tomoctfrefine import forward, reference
from tomoctfrefine.io.maps import memmap_stack, read_map
from tomoctfrefine.io.particles import half_sets, optics_zernike, particle_positions_px, particle_rotations, particles_of, read_particle_set
from tomoctfrefine.io.tomograms import load_tilt_images, read_tomogram_set, tomogram
from tomoctfrefine.refine import refine_aberrations
from tomoctfrefine.refine.aberrations import _radial_coefficient
from tomoctfrefine.physics.zernike import even_index_to_mn
from tomoctfrefine.statistics import compute_statistics

BOX = 96


@pytest.fixture(scope="module")
def noiseless(tmp_path_factory):
    from tomoctfrefine.simulate import SimulationParameters, simulate_dataset

    out = tmp_path_factory.mktemp("delocalised")
    simulate_dataset(out, SimulationParameters(seed=5, particles_per_tomogram=1, write_noiseless=True, snr=0.5,
                                               defocus_tomogram_sd_angstrom=0.0))
    tomo = tomogram(read_tomogram_set(out / "truth" / "tomograms_true.star"), "TS_01")
    pset = read_particle_set(out / "truth" / "particles_true.star")
    rows = particles_of(pset, "TS_01")
    maps = [read_map(out / "ref" / name)[0] for name in ("half1.mrc", "half2.mrc", "mask.mrc")]
    truth = json.loads((out / "truth" / "truth.json").read_text())
    clean = np.asarray(memmap_stack(out / "truth" / "tilt_series" / "TS_01_noiseless.mrc"), dtype=np.float32)
    refs = reference.prepare_references(*maps, BOX, read_map(out / "ref" / "half1.mrc")[1])
    weights = reference.noise_weights(load_tilt_images(tomo), BOX) * reference.frequency_cutoff_weight(refs)
    args = (tomo, clean, particle_positions_px(pset, rows, tomo), particle_rotations(pset, rows), half_sets(pset, rows), refs,
            weights, optics_zernike(pset, 1)[0])
    return dict(
        tomo=tomo,
        windowed=compute_statistics(*args),
        periodic=compute_statistics(*args, windowed=False),
        scale=np.array([t["scale"] for t in truth["tomograms"]["TS_01"]]),
    )


def rho4(even_change) -> float:
    """Coefficient of ``|k|^4`` (rad Å^4) of an even Zernike change."""
    return float(sum(c * _radial_coefficient(0, even_index_to_mn(i)[1], 4)
                     for i, c in enumerate(even_change) if even_index_to_mn(i)[0] == 0 and even_index_to_mn(i)[1] >= 4))


def test_delocalisation_reaches_beyond_the_box(noiseless):
    tomo = noiseless["tomo"]
    gamma = forward.tilt_gamma(tomo, BOX, None, [0])[0]
    reach = forward.delocalisation_px(gamma, reference.radius_px(BOX) <= BOX // 2)
    # lambda dz k_nyquist / p = 0.0197 * 30000 * 0.25 / 2 = 74 px (+ Cs, astigmatism)
    assert reach == pytest.approx(0.0197 * 30000 * 0.25 / 2, rel=0.1)
    assert forward.window_padding_px(BOX, 20.0, reach) >= BOX // 2 + 20 + reach
    assert forward.window_padding_px(256, 20.0, reach) == 0  # fits inside the flat part of the taper


def test_windowed_scale_at_the_true_ctf_is_the_true_scale(noiseless):
    ratio = {}
    for kind in ("windowed", "periodic"):
        st = noiseless[kind]
        ratio[kind] = -st.b_s.real.sum(axis=(1, 2)) / st.a_ss.sum(axis=(1, 2)) / noiseless["scale"]
    # noiseless: the windowed model is the observation (measured 0.989-0.999: interpolation)
    np.testing.assert_allclose(ratio["windowed"], 1.0, atol=0.015)
    # the periodic model predicts signal the box has lost: the scale comes out too low (measured
    # 0.944-0.988, mean 0.968)
    assert np.mean(ratio["periodic"]) < 0.98
    assert np.mean(ratio["windowed"]) - np.mean(ratio["periodic"]) > 0.015


def test_no_fake_rho4_aberration_at_the_true_ctf(noiseless):
    tomo = noiseless["tomo"]
    ctf = (np.asarray(tomo.defocus_u_angstrom), np.asarray(tomo.defocus_v_angstrom), np.asarray(tomo.defocus_angle_deg))
    wavelength = tomo.optics.wavelength_angstrom
    phase_at_nyquist, defocus = {}, {}
    for kind in ("windowed", "periodic"):
        fit = refine_aberrations({"TS_01": noiseless[kind]}, {"TS_01": wavelength}, {"TS_01": ctf}, even_order=4, odd_order=None)
        phase_at_nyquist[kind] = rho4(fit.even_change) * (0.5 / tomo.pixel_size_angstrom) ** 4
        defocus[kind] = fit.defocus["TS_01"].defocus_change_angstrom[:, 0]
    # noiseless data at the true CTF: nothing to fit. Measured: windowed rho^4 = 1.9 rad Å^4 (0.007 rad
    # at Nyquist), defocus changes within ±9 Å; periodic rho^4 = 596 rad Å^4 (2.3 rad at Nyquist) and the
    # defocus +71..+105 Å
    assert abs(phase_at_nyquist["windowed"]) < 0.05
    assert np.max(np.abs(defocus["windowed"])) < 20.0
    assert abs(phase_at_nyquist["periodic"]) > 0.5
    assert np.mean(defocus["periodic"]) > 40.0
