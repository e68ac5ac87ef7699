"""Sufficient statistics: the accumulator identity (spec Appendix C.4) against brute force, determinism
across thread counts, file round trip, and box-independent scales on the RELION-5 fixture."""
import json

import numba
import numpy as np
import pytest

from tomoctfrefine import forward, reference
from tomoctfrefine.io.maps import read_map
from tomoctfrefine.io.particles import half_sets, optics_zernike, particle_positions_px, particle_rotations, particles_of, read_particle_set
from tomoctfrefine.io.tomograms import Tomogram, load_tilt_images, read_tomogram_set, tomogram
from tomoctfrefine.physics.ctf import Optics, ctf_gamma
from tomoctfrefine.physics.geometry import euler_zyz_matrices, fourier_grid_per_angstrom, projection_matrix
from tomoctfrefine.physics.zernike import even_phase_rad
from tomoctfrefine.statistics import TiltStatistics, compute_statistics

EVEN = [0.0, 3.0, -20.0, 5.0, 0.0, 0.0, 0.0, 0.0, 400.0]


def synthetic_case(seed=0, s=32):
    rng = np.random.default_rng(seed)
    size, image = (120, 110, 50), (120, 110)
    tilts = [-30.0, 0.0, 27.0]
    n = len(tilts)
    tomo = Tomogram(
        name="synthetic", optics=Optics(300.0, 2.7, 0.1), pixel_size_angstrom=1.7, size_px=size, image_size_px=image,
        hand=-1.0, defocus_slope=1.3, fractional_dose_e_per_angstrom2=3.0, bfactor_per_electron_dose_angstrom2=0.0,
        projection_matrices=np.stack([projection_matrix(0.2, t, 3.0, 5.0, -7.0, 1.7, size, image) for t in tilts]),
        defocus_u_angstrom=np.array([21000.0, 20500.0, 22000.0]), defocus_v_angstrom=np.array([20000.0, 20700.0, 21000.0]),
        defocus_angle_deg=np.array([10.0, -40.0, 95.0]), ctf_scale=np.ones(n), ctf_bfactor_angstrom2=np.array([0.0, 50.0, 0.0]),
        phase_shift_deg=np.array([0.0, 0.0, 10.0]), pre_exposure_e_per_angstrom2=np.array([6.0, 0.0, 3.0]))
    positions = np.array([[60.0, 55.0, 10.0], [40.3, 70.2, 40.9], [80.7, 30.1, 25.0], [100.0, 90.0, 20.0], [2.0, 2.0, 25.0]])
    rotations = euler_zyz_matrices(*rng.uniform(-180, 180, (3, len(positions))))
    halves = np.array([1, 2, 2, 1, 1])
    maps = [rng.normal(size=(24, 24, 24)) for _ in range(2)]
    refs = reference.prepare_references(maps[0], maps[1], None, s)
    images = rng.normal(size=(n, image[1], image[0])).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, size=(n, s, s // 2 + 1))
    return tomo, images, positions, rotations, halves, refs, weights


def brute_force(tomo, images, positions, rotations, halves, refs, weights, hand_sign=1.0):
    s = refs.box_size_px
    observed = forward.extract_observations(images, tomo, positions, s)
    q = -forward.predict(refs, tomo, rotations, halves).astype(np.complex128)
    fx, fy = fourier_grid_per_angstrom(s, tomo.pixel_size_angstrom)
    even = even_phase_rad(EVEN, fx, fy)
    depth = hand_sign * forward.depth_defocus_angstrom(tomo, positions)
    w = weights.copy()
    w[:, 0, 0] = 0.0
    terms = []
    for f in range(tomo.tilt_count):
        for i in np.nonzero(observed.visible[:, f])[0]:
            gamma = ctf_gamma(tomo.defocus_u_angstrom[f] + depth[i, f], tomo.defocus_v_angstrom[f] + depth[i, f],
                              tomo.defocus_angle_deg[f], tomo.optics, fx, fy, tomo.phase_shift_deg[f], even)
            terms.append((f, observed.spectra[i, f].astype(np.complex128), q[i, f], gamma, w[f]))
    return terms, observed.visible


def test_statistics_reproduce_the_brute_force_residual():
    tomo, images, positions, rotations, halves, refs, weights = synthetic_case()
    # the periodic model (the windowed one, used where the CTF delocalises into the taper, is checked
    # against its own brute force in test_delocalisation.py)
    stats = compute_statistics(tomo, images, positions, rotations, halves, refs, weights, EVEN, with_flipped_hand=True,
                               windowed=False)
    rng = np.random.default_rng(1)
    for flipped, hand_sign in ((False, 1.0), (True, -1.0)):
        st = stats.flipped_hand if flipped else stats
        terms, visible = brute_force(tomo, images, positions, rotations, halves, refs, weights, hand_sign)
        assert st.particle_count.tolist() == visible.sum(axis=0).tolist() == [4, 4, 4]
        assert not visible[4].any()  # the particle in the corner never fits a box
        # the arrays themselves
        a_ss = np.zeros_like(st.a_ss)
        b_c = np.zeros_like(st.b_c)
        for f, o, q, gamma, w in terms:
            a_ss[f] += w * np.abs(q) ** 2 * np.sin(gamma) ** 2
            b_c[f] += w * o * np.conj(q) * np.cos(gamma)
        np.testing.assert_allclose(st.a_ss, a_ss, rtol=1e-5, atol=1e-9 * a_ss.max())
        np.testing.assert_allclose(st.b_c, b_c, rtol=1e-4, atol=1e-6 * np.abs(b_c).max())
        # the residual identity for random delta(k), psi(k) and c
        for _ in range(3):
            delta = rng.uniform(-np.pi, np.pi, st.a_ss.shape)
            psi = rng.uniform(-np.pi, np.pi, st.a_ss.shape)
            c = rng.uniform(0.2, 3.0, st.n_tilts)
            direct = sum(np.sum(w * np.abs(o + c[f] * np.exp(1j * psi[f]) * np.sin(gamma + delta[f]) * q) ** 2)
                         for f, o, q, gamma, w in terms)
            e_a_e = np.cos(delta) ** 2 * st.a_ss + 2 * np.cos(delta) * np.sin(delta) * st.a_sc + np.sin(delta) ** 2 * st.a_cc
            e_b = np.cos(delta) * st.b_s + np.sin(delta) * st.b_c
            from_statistics = np.sum(st.oo + c[:, None, None] ** 2 * e_a_e
                                     + 2 * c[:, None, None] * np.real(np.exp(-1j * psi) * e_b))
            assert from_statistics == pytest.approx(direct, rel=1e-6)


def test_statistics_do_not_depend_on_thread_count_or_chunking():
    case = synthetic_case(seed=2)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = compute_statistics(*case, EVEN)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = compute_statistics(*case, EVEN, chunk_megabytes=0.01)  # one particle per chunk
    finally:
        numba.set_num_threads(threads)
    for name in ("a_ss", "a_sc", "a_cc", "b_s", "b_c", "oo"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))


def test_statistics_file_round_trip(tmp_path):
    stats = compute_statistics(*synthetic_case(seed=3), EVEN, with_flipped_hand=True, tilts=[0, 2])
    assert stats.particle_count[1] == 0 and np.all(stats.a_ss[1] == 0) and stats.a_ss[0].sum() > 0
    stats.save(tmp_path / "TS.stats.npz")
    loaded = TiltStatistics.load(tmp_path / "TS.stats.npz")
    for name in ("a_ss", "a_sc", "a_cc", "b_s", "b_c", "oo"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))
        np.testing.assert_array_equal(getattr(loaded.flipped_hand, name), getattr(stats.flipped_hand, name))
    assert loaded.box_size_px == 32 and loaded.pixel_size_angstrom == 1.7


@pytest.fixture(scope="module")
def fixture_inputs(relion5_small):
    tomo = tomogram(read_tomogram_set(relion5_small / "truth" / "tomograms_true.star"), "TS_01")
    pset = read_particle_set(relion5_small / "truth" / "particles_true.star")
    rows = particles_of(pset, "TS_01")
    maps = [read_map(relion5_small / "ref" / name)[0] for name in ("half1.mrc", "half2.mrc", "mask.mrc")]
    truth = json.loads((relion5_small / "truth" / "truth.json").read_text())
    return dict(tomo=tomo, images=load_tilt_images(tomo), positions=particle_positions_px(pset, rows, tomo),
                rotations=particle_rotations(pset, rows), halves=half_sets(pset, rows), even=optics_zernike(pset, 1)[0],
                maps=maps, pixel=read_map(relion5_small / "ref" / "half1.mrc")[1],
                scale=np.array([t["scale"] for t in truth["tomograms"]["TS_01"]]))


@pytest.mark.parametrize("box", [96, 128])
def test_fixture_scale_at_the_true_ctf_matches_the_truth_without_a_box_factor(fixture_inputs, box):
    d = fixture_inputs
    refs = reference.prepare_references(*d["maps"], box, d["pixel"])
    weights = reference.noise_weights(d["images"], box) * reference.frequency_cutoff_weight(refs)
    stats = compute_statistics(d["tomo"], d["images"], d["positions"], d["rotations"], d["halves"], refs, weights, d["even"])
    scale = -stats.b_s.real.sum(axis=(1, 2)) / stats.a_ss.sum(axis=(1, 2))
    factor = np.sum(scale * d["scale"]) / np.sum(d["scale"] ** 2)
    rms = np.sqrt(np.mean((scale / factor / d["scale"] - 1) ** 2))
    # measured: box 96 factor 0.975, rms 2.6 %; box 128 factor 0.984, rms 3.0 % (RELION 5: factor sqrt(128), rms 4.3 %).
    # The fixture's external simulator normalises its projections ~2 % differently from ours (our own
    # simulator gives 1.000, test below); the point here is the absence of a box factor.
    assert 0.95 < factor < 1.03
    assert rms < 0.045


@pytest.fixture(scope="module")
def single_particle_simulation(tmp_path_factory):
    """The project's simulator (independent rendering of pseudo-atoms into tilt images) with one particle,
    so that no neighbour shares its box; noisy and noiseless stacks."""
    from tomoctfrefine.io.maps import memmap_stack
    from tomoctfrefine.simulate import SimulationParameters, simulate_dataset

    out = tmp_path_factory.mktemp("simulated")
    simulate_dataset(out, SimulationParameters(seed=3, particles_per_tomogram=1, write_noiseless=True, snr=0.5,
                                               even_zernike=(0, 0, 0, 0, 0, 0, 0, 0, 300.0)))
    tomo = tomogram(read_tomogram_set(out / "truth" / "tomograms_true.star"), "TS_01")
    pset = read_particle_set(out / "truth" / "particles_true.star")
    rows = particles_of(pset, "TS_01")
    maps = [read_map(out / "ref" / name)[0] for name in ("half1.mrc", "half2.mrc", "mask.mrc")]
    truth = json.loads((out / "truth" / "truth.json").read_text())
    noisy = load_tilt_images(tomo)
    clean = np.asarray(memmap_stack(out / "truth" / "tilt_series" / "TS_01_noiseless.mrc"), dtype=np.float32)
    s = 160
    refs = reference.prepare_references(*maps, s, read_map(out / "ref" / "half1.mrc")[1])
    weights = reference.noise_weights(noisy, s) * reference.frequency_cutoff_weight(refs)
    args = (particle_positions_px(pset, rows, tomo), particle_rotations(pset, rows), half_sets(pset, rows), refs, weights,
            optics_zernike(pset, 1)[0])
    return dict(clean=compute_statistics(tomo, clean, *args), noisy=compute_statistics(tomo, noisy, *args),
                scale=np.array([t["scale"] for t in truth["tomograms"]["TS_01"]]), s=s, pixel=tomo.pixel_size_angstrom)


def test_simulated_noiseless_images_equal_the_prediction(single_particle_simulation):
    d = single_particle_simulation
    clean = d["clean"]
    scale = -clean.b_s.real.sum(axis=(1, 2)) / clean.a_ss.sum(axis=(1, 2))
    # measured 1.020 for every tilt before the prediction carried presharpening's 1.02; now 1.000
    np.testing.assert_allclose(scale / d["scale"], 1.0, atol=0.005)
    radius = reference.radius_px(d["s"]) / (d["s"] * d["pixel"])
    for low in np.arange(0.0, 0.2, 0.025):  # 1/Å; measured >= 0.987 in every shell up to 0.2
        band = (radius >= low) & (radius < low + 0.025)
        correlation = -clean.b_s.real[:, band].sum() / np.sqrt(clean.a_ss[:, band].sum() * clean.oo[:, band].sum())
        assert correlation > 0.98


def test_simulated_noisy_images_reach_the_correlation_the_noise_allows(single_particle_simulation):
    d = single_particle_simulation
    correlation = {k: -st.b_s.real.sum() / np.sqrt(st.a_ss.sum() * st.oo.sum()) for k, st in d.items() if k in ("clean", "noisy")}
    allowed = correlation["clean"] * np.sqrt(d["clean"].oo.sum() / d["noisy"].oo.sum())
    assert correlation["noisy"] == pytest.approx(allowed, abs=0.01)
    scale = -d["noisy"].b_s.real.sum(axis=(1, 2)) / d["noisy"].a_ss.sum(axis=(1, 2))
    assert np.sqrt(np.mean((scale / d["scale"] - 1) ** 2)) < 0.03


def test_box_transform_into_a_buffer_equals_scipys_rfft2():
    """compute_statistics writes the boxes' FFT into a reused buffer through scipy's pocketfft binding (a
    private module): if a scipy release changes its meaning, this catches it before any statistics do."""
    import scipy.fft

    from tomoctfrefine.statistics import _rfft2

    boxes = np.random.default_rng(4).standard_normal((3, 64, 64)).astype(np.float32)
    out = np.empty((3, 64, 33), dtype=np.complex64)
    np.testing.assert_array_equal(_rfft2(boxes, out, 2), scipy.fft.rfft2(boxes, norm="ortho", workers=2).astype(np.complex64))
