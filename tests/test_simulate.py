"""The simulator: complete RELION-5 datasets whose files, truth and images agree with each other and with
the physics, independently of the project's forward model."""
import filecmp
import json
import os
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import starfile

from tomoctfrefine.errors import InputError
from tomoctfrefine.io.fsc import read_fsc
from tomoctfrefine.io.maps import read_map
from tomoctfrefine.io.optimisation_set import read_optimisation_set
from tomoctfrefine.io.particles import half_sets, optics_zernike, particle_positions_px, particle_rotations, particles_of, read_particle_set
from tomoctfrefine.io.tomograms import load_tilt_images, read_tomogram_set, tomogram, tomogram_names
from tomoctfrefine.physics import geometry
from tomoctfrefine.physics.ctf import ctf_2d
from tomoctfrefine.physics.dose import dose_weight
from tomoctfrefine.physics.zernike import even_phase_rad, odd_phase_rad
from tomoctfrefine.simulate import (
    PRESETS,
    TRUTH_JSON,
    SimulationParameters,
    acquisition_order,
    load_truth,
    make_pseudo_atoms,
    noise_realisation,
    parameters_from_truth,
    render_map,
    render_projection,
    simulate_dataset,
    viewing_directions,
)
from tomoctfrefine.validate import validate_inputs

SMALL = dict(n_tilts=7, tilt_max_deg=36.0, particles_per_tomogram=12, n_tomograms=2, write_noiseless=True,
             even_zernike=(0, 0, 0, 0, 0, 0, 0, 0, 600.0), odd_zernike=(0, 0, 150.0, 0, 0, -100.0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    params = SimulationParameters(**SMALL)
    opt = simulate_dataset(out, params)
    return out, opt, params, load_truth(out)


def _star(path):
    return starfile.read(path, always_dict=True)


def test_file_set_is_complete_and_readable_by_starfile_and_mrcfile(dataset):
    out, opt, params, truth = dataset
    assert opt == out / "optimisation_set.star"
    expected = ["optimisation_set.star", "tomograms.star", "particles.star", "ref/half1.mrc", "ref/half2.mrc", "ref/mask.mrc",
                "ref/map_true.mrc", "ref/postprocess.star", str(TRUTH_JSON), "truth/optimisation_set_true.star",
                "truth/tomograms_true.star", "truth/particles_true.star"]
    for name in ("TS_01", "TS_02"):
        expected += [f"tilt_series/{name}.star", f"tilt_series/{name}.mrc", f"truth/tilt_series/{name}.star",
                     f"truth/tilt_series/{name}_noiseless.mrc"]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(expected)  # no temporary files left behind
    for name in expected:
        if name.endswith(".star"):
            assert _star(out / name)
        elif name.endswith(".mrc"):
            with mrcfile.open(out / name, permissive=False) as mrc:
                assert mrc.data.dtype == np.float32
                assert mrc.voxel_size.x == pytest.approx(params.pixel_size_angstrom)
    with mrcfile.open(out / "tilt_series/TS_01.mrc") as mrc:
        assert mrc.data.shape == (params.n_tilts, params.image_size_px, params.image_size_px)
    with mrcfile.open(out / "ref/half1.mrc") as mrc:
        assert mrc.data.shape == (params.box_size_px,) * 3


def test_columns_and_blocks_match_the_fixture_layout(dataset, relion5_small):
    out, *_ = dataset
    pairs = [("tomograms.star", "tomograms.star"), ("tilt_series/TS_01.star", "tilt_series/TS_01.star"),
             ("particles.star", "particles.star"), ("truth/particles_true.star", "truth/particles_true.star"),
             ("optimisation_set.star", "optimisation_set.star")]
    for ours, theirs in pairs:
        a, b = _star(out / ours), _star(relion5_small / theirs)
        assert list(a) == list(b)
        for block in a:
            keys_a = list(a[block].columns) if hasattr(a[block], "columns") else list(a[block])
            keys_b = list(b[block].columns) if hasattr(b[block], "columns") else list(b[block])
            if ours == "optimisation_set.star":
                assert keys_a == keys_b + ["rlnTomoReferenceFscFile"]
            else:
                assert keys_a == keys_b, (ours, block)
    text = (out / "tomograms.star").read_text()
    assert text.lstrip().startswith("# version 50001")


def test_project_readers_and_validator_accept_the_dataset(dataset):
    out, opt, params, truth = dataset
    cwd = os.getcwd()
    os.chdir(out)  # paths inside the files are relative to the dataset folder, as RELION expects
    try:
        opt_set = read_optimisation_set("optimisation_set.star")
        assert validate_inputs(opt_set, box_size_px=2 * params.box_size_px) == []
        tset = read_tomogram_set("tomograms.star")
        assert tomogram_names(tset) == ["TS_01", "TS_02"]
        tomo = tomogram(tset, "TS_01")
        images = load_tilt_images(tomo)
        half1, voxel = read_map("ref/half1.mrc")
        fsc = read_fsc("ref/postprocess.star")
    finally:
        os.chdir(cwd)
    assert images.shape == (params.n_tilts, params.image_size_px, params.image_size_px)
    assert voxel == pytest.approx(params.pixel_size_angstrom)
    assert tomo.hand == params.hand and tomo.size_px == (320, 320, 120)
    assert fsc.fsc[0] == pytest.approx(1.0) and len(fsc.fsc) == params.box_size_px // 2 + 1
    assert truth["half_map_fsc_resolution_angstrom"] < 10.0  # half maps carry 5 % noise: FSC stays high


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    params = SimulationParameters(n_tilts=3, particles_per_tomogram=4, seed=3)
    simulate_dataset(tmp_path / "a", params)
    simulate_dataset(tmp_path / "b", params)
    simulate_dataset(tmp_path / "c", SimulationParameters(n_tilts=3, particles_per_tomogram=4, seed=4))
    files = [p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file() and p.name != "truth.json"]
    assert len(files) == 14
    stars = [str(f) for f in files if f.suffix == ".star"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", stars, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == 9
    for name in (f for f in files if f.suffix == ".mrc"):  # MRC headers carry a creation time: compare the data
        np.testing.assert_array_equal(mrcfile.read(tmp_path / "a" / name), mrcfile.read(tmp_path / "b" / name))
    ta, tb = load_truth(tmp_path / "a"), load_truth(tmp_path / "b")
    ta.pop("sim_seconds"), tb.pop("sim_seconds")
    assert ta == tb
    assert not np.array_equal(mrcfile.read(tmp_path / "a/tilt_series/TS_01.mrc"), mrcfile.read(tmp_path / "c/tilt_series/TS_01.mrc"))
    assert parameters_from_truth(load_truth(tmp_path / "a")) == params


def test_sum_of_the_map_along_z_equals_the_2d_rendering(dataset):
    out, _, params, _ = dataset
    atoms = make_pseudo_atoms(params)
    s, p = params.box_size_px, params.pixel_size_angstrom
    volume = render_map(atoms, s, p)
    xy = s // 2 + atoms.positions_angstrom[:, :2] / p
    image = render_projection(xy, atoms.sigma_angstrom / p, atoms.mass, (s, s))
    assert np.max(np.abs(volume.sum(axis=0) - image)) < 1e-6 * np.max(image)
    # mass is preserved: the map integrates to the total atom mass
    assert volume.sum() == pytest.approx(atoms.mass.sum(), rel=1e-4)
    written, _ = read_map(out / "ref" / "map_true.mrc")
    np.testing.assert_allclose(written, volume, atol=1e-6 * volume.max())
    # the map's x axis is numpy's last axis: an atom moved along +x moves the map along the last axis
    assert np.unravel_index(np.argmax(render_map(type(atoms)(np.array([[6.0, 0, 0]]), np.array([2.0]), np.array([1.0])), s, p)),
                            (s, s, s)) == (s // 2, s // 2, s // 2 + 3)


def test_noise_gives_the_requested_snr(dataset):
    out, _, params, truth = dataset
    sigma = truth["noise_sigma"]
    variances = []
    for name in ("TS_01", "TS_02"):
        clean = mrcfile.read(out / f"truth/tilt_series/{name}_noiseless.mrc")
        noisy = mrcfile.read(out / f"tilt_series/{name}.mrc")
        assert np.std(noisy - clean) == pytest.approx(sigma, rel=0.01)
        lowest = int(np.argmin([t["pre_exposure"] for t in truth["tomograms"][name]]))
        variances.append(np.var(clean[lowest].astype(np.float64)))
    assert np.mean(variances) / sigma**2 == pytest.approx(params.snr, rel=0.1)


def test_the_noise_can_be_drawn_again(dataset):
    """benchmarks compare a refinement with an efficient estimator on the very same noise"""
    out, _, params, truth = dataset
    for index, name in enumerate(("TS_01", "TS_02")):
        clean = mrcfile.read(out / f"truth/tilt_series/{name}_noiseless.mrc")
        noisy = mrcfile.read(out / f"tilt_series/{name}.mrc")
        drawn = np.stack(list(noise_realisation(params, index, truth["noise_sigma"])))
        assert drawn.shape == noisy.shape
        np.testing.assert_array_equal(clean + drawn, noisy)


def test_truth_json_equals_the_files(dataset):
    out, _, params, truth = dataset
    start_tomos, true_tomos = _star(out / "tomograms.star")["global"], _star(out / "truth/tomograms_true.star")["global"]
    assert list(start_tomos["rlnTomoHand"]) == [truth["written_hand"]] * 2 == [params.hand] * 2
    for name, tilts in truth["tomograms"].items():
        start = _star(out / f"tilt_series/{name}.star")[name]
        true = _star(out / f"truth/tilt_series/{name}.star")[name]
        for column, key in [("rlnDefocusU", "start_dfu"), ("rlnDefocusV", "start_dfv"), ("rlnDefocusAngle", "start_dfang"),
                            ("rlnCtfScalefactor", "start_scale")]:
            assert list(start[column]) == [t[key] for t in tilts]
        for column, key in [("rlnDefocusU", "dfu"), ("rlnDefocusV", "dfv"), ("rlnDefocusAngle", "dfang"), ("rlnCtfScalefactor", "scale"),
                            ("rlnTomoNominalStageTiltAngle", "nominal"), ("rlnTomoXTilt", "xtilt"), ("rlnTomoYTilt", "ytilt"),
                            ("rlnTomoZRot", "zrot"), ("rlnTomoXShiftAngst", "xsh"), ("rlnTomoYShiftAngst", "ysh"),
                            ("rlnMicrographPreExposure", "pre_exposure")]:
            assert list(true[column]) == [t[key] for t in tilts], column
            if column not in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfScalefactor"):
                assert list(start[column]) == list(true[column])
    true_particles = read_particle_set(out / "truth/particles_true.star")
    assert optics_zernike(true_particles, 1) == (list(params.even_zernike), list(params.odd_zernike))
    assert truth["even"] == list(params.even_zernike) and truth["odd"] == list(params.odd_zernike)
    assert optics_zernike(read_particle_set(out / "particles.star"), 1) == ([], [])
    # starting defocus is off by exactly the requested RMS
    offsets = [(t["start_dfu"] + t["start_dfv"] - t["dfu"] - t["dfv"]) / 2 for tilts in truth["tomograms"].values() for t in tilts]
    assert np.sqrt(np.mean(np.square(offsets))) == pytest.approx(params.start_defocus_rms_angstrom, abs=1e-3)


def test_dose_symmetric_order_matches_the_fixture(relion5_small):
    nominal = np.linspace(-36, 36, 13)
    fixture = _star(relion5_small / "tilt_series/TS_01.star")["TS_01"]
    np.testing.assert_array_equal(acquisition_order(nominal, "dose_symmetric", 2) * 3.0, fixture["rlnMicrographPreExposure"])
    np.testing.assert_array_equal(acquisition_order(nominal, "sequential"), np.arange(13))
    assert list(acquisition_order(np.linspace(-6, 6, 5), "bidirectional")) == [4, 3, 0, 1, 2]


def test_particles_are_visible_in_every_tilt_and_inside_the_slab(dataset):
    out, _, params, _ = dataset
    tset, pset = read_tomogram_set(out / "tomograms.star"), read_particle_set(out / "particles.star")
    for name in tomogram_names(tset):
        tomo = tomogram(tset, name)
        rows = particles_of(pset, name)
        assert len(rows) == params.particles_per_tomogram
        assert sorted(half_sets(pset, rows)) == [1] * 6 + [2] * 6
        positions = particle_positions_px(pset, rows, tomo)
        xy = geometry.project(tomo.projection_matrices, positions)[..., :2]
        # estimation boxes up to twice the reference box see every particle in every tilt
        assert geometry.visible(xy, 2 * params.box_size_px, tomo.image_size_px).all()
        radius_px = params.particle_radius_angstrom / params.pixel_size_angstrom
        assert np.all(np.abs(positions[:, 2] - tomo.size_px[2] / 2) <= tomo.size_px[2] / 2 - radius_px)
        distances = np.linalg.norm(positions[:, None] - positions[None], axis=-1) + np.eye(len(positions)) * 1e9
        assert distances.min() >= params.min_separation_fraction * 2 * radius_px - 1e-6


def test_scale_truth_is_relions_beer_lambert_model(tmp_path):
    params = SimulationParameters(n_tilts=9, tilt_max_deg=60, particles_per_tomogram=2, scale_jitter=0.0, ice_thickness_relative=0.4,
                                  ice_normal_tilt_deg=10.0)
    simulate_dataset(tmp_path, params)
    truth = load_truth(tmp_path)
    tset = read_tomogram_set(tmp_path / "truth/tomograms_true.star")
    tomo = tomogram(tset, "TS_01")
    normal = np.array(truth["tomogram_info"]["TS_01"]["ice_normal"])
    expected = np.exp(0.4) * np.exp(-0.4 / np.abs(viewing_directions(tomo.projection_matrices) @ normal))
    np.testing.assert_allclose(tomo.ctf_scale, expected, atol=1e-6)
    assert np.rad2deg(np.arccos(normal[2])) == pytest.approx(10.0)


def test_tilt_images_follow_the_image_model_computed_on_the_whole_image(tmp_path):
    """One particle, recomputed without patches: whole-image rendering, RELION's CTF with the depth offset,
    dose, scale, odd phase, inverted contrast. Pins the simulator's conventions and patch size."""
    params = SimulationParameters(n_tilts=5, tilt_max_deg=50, particles_per_tomogram=1, image_size_px=448, placement_margin_px=190,
                                  write_noiseless=True, tomogram_thickness_px=160, even_zernike=(0, 0, 0, 0, 0, 0, 0, 0, 600.0),
                                  odd_zernike=(0, 0, 150.0, 0, 0, -100.0), hand=1, defocus_slope=1.3)
    simulate_dataset(tmp_path, params)
    clean = mrcfile.read(tmp_path / "truth/tilt_series/TS_01_noiseless.mrc").astype(np.float64)
    tomo = tomogram(read_tomogram_set(tmp_path / "truth/tomograms_true.star"), "TS_01")
    pset = read_particle_set(tmp_path / "particles.star")
    position = particle_positions_px(pset, [0], tomo)
    rotation = particle_rotations(pset, [0])[0]
    atoms = make_pseudo_atoms(params)
    p, size = params.pixel_size_angstrom, params.image_size_px
    depth = geometry.depth_defocus_offset_angstrom(tomo.projection_matrices, position, tomo.size_px, params.hand, p, params.defocus_slope)[0]
    assert np.ptp(depth) > 10.0  # the particle is off-centre in depth: the offset matters
    fx, fy = np.meshgrid(np.fft.rfftfreq(size) / p, np.fft.fftfreq(size) / p)
    for f in range(params.n_tilts):
        atoms_tomo = position + (atoms.positions_angstrom / p) @ rotation.T
        xy = geometry.project(tomo.projection_matrices[f:f + 1], atoms_tomo)[:, 0, :2]
        projection = render_projection(xy, atoms.sigma_angstrom / p, atoms.mass, (size, size))
        ctf = ctf_2d(tomo.defocus_u_angstrom[f] + depth[f], tomo.defocus_v_angstrom[f] + depth[f], tomo.defocus_angle_deg[f],
                     tomo.optics, fx, fy, even_phase_rad=even_phase_rad(params.even_zernike, fx, fy))
        weight = dose_weight(tomo.pre_exposure_e_per_angstrom2[f], np.hypot(fx, fy))
        odd = np.exp(1j * odd_phase_rad(params.odd_zernike, fx, fy))
        expected = np.fft.irfft2(-tomo.ctf_scale[f] * ctf * weight * odd * np.fft.rfft2(projection), s=(size, size))
        assert np.max(np.abs(clean[f] - expected)) < 2e-3 * np.max(np.abs(expected)), f
        # contrast is inverted: the particle's integral is -scale * Q0 * mass (CTF(0) = +Q0, dose weight 1)
        q0_phase = np.sin(np.arctan(params.amplitude_contrast / np.sqrt(1 - params.amplitude_contrast**2)))
        even_at_zero = even_phase_rad(params.even_zernike, 0.0, 0.0)
        ctf0 = -np.sin(-np.arcsin(q0_phase) + even_at_zero)
        assert clean[f].sum() == pytest.approx(-tomo.ctf_scale[f] * ctf0 * atoms.mass.sum(), rel=1e-3)


def test_bad_parameters_are_reported_with_the_parameter_and_the_fix(tmp_path):
    with pytest.raises(InputError) as error:
        simulate_dataset(tmp_path, SimulationParameters(box_size_px=32, particle_radius_angstrom=40.0, snr=-1.0))
    assert [p.key for p in error.value.problems] == ["snr"]
    with pytest.raises(InputError) as error:
        simulate_dataset(tmp_path, SimulationParameters(box_size_px=32))
    assert str(error.value.problems[0]) == (
        "simulation parameters [box_size_px]: particle (radius 40.0 Å plus 3 atom sigmas = 23.9 px) does not fit in the "
        "32-px reference box; increase box_size_px or decrease particle_radius_angstrom")
    with pytest.raises(InputError) as error:
        simulate_dataset(tmp_path, SimulationParameters(particles_per_tomogram=400))
    assert error.value.problems[0].key == "particles_per_tomogram"
    assert not (tmp_path / "optimisation_set.star").exists()


def test_presets_fit_their_particles():
    """The benchmark presets place all their particles (placement only: rendering them takes minutes)."""
    from tomoctfrefine.simulate import check_parameters, make_tomogram_truths

    for name in PRESETS:
        params = SimulationParameters.from_preset(name)
        assert check_parameters(params) == []
        truths = make_tomogram_truths(params)
        assert [len(t.positions_px) for t in truths] == [params.particles_per_tomogram] * params.n_tomograms


def test_cli_writes_the_dataset_and_says_what_it_wrote(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "tomoctfrefine", "simulate", "--out", str(out), "--n_tilts", "3",
                             "--particles_per_tomogram", "4", "--odd_zernike", "0,0,50", "--written_hand", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out / 'optimisation_set.star'}" in result.stdout
    assert "1 tilt series x 3 tilts of 320² px" in result.stdout and "4 particles" in result.stdout
    truth = json.loads((out / TRUTH_JSON).read_text())
    assert truth["odd"] == [0.0, 0.0, 50.0] and truth["written_hand"] == 1 and truth["hand"] == -1
    # the refinement's input carries the written hand, the truth files the true one
    assert list(starfile.read(out / "tomograms.star", always_dict=True)["global"]["rlnTomoHand"]) == [1.0]
    assert list(starfile.read(out / "truth" / "tomograms_true.star", always_dict=True)["global"]["rlnTomoHand"]) == [-1.0]
    bad = subprocess.run([sys.executable, "-m", "tomoctfrefine", "simulate", "--out", str(tmp_path / "bad"), "--box_size_px", "32"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: simulation parameters [box_size_px]") and "Traceback" not in bad.stderr
