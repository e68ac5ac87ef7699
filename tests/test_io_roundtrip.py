"""Data model and I/O on the real fixture: optimisation sets, tomogram sets v4/v5 (options A and B),
particles v4/v5, trajectories, maps and FSC tables; every write then read is identical."""
from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from tomoctfrefine.io import particles as P
from tomoctfrefine.io import tomograms as T
from tomoctfrefine.io.fsc import FscCurve, read_fsc, write_fsc
from tomoctfrefine.io.maps import memmap_stack, read_map, read_map_header, write_map
from tomoctfrefine.io.optimisation_set import read_optimisation_set, write_optimisation_set
from tomoctfrefine.io.paths import resolve_path
from tomoctfrefine.io.star import read_star, write_star
from tomoctfrefine.io.trajectories import read_trajectories, write_trajectories
from tomoctfrefine.physics.geometry import euler_zyz_matrix, project

EXPECTED_MRC = {
    "half1.mrc": ((64, 64, 64), 2.0),
    "half2.mrc": ((64, 64, 64), 2.0),
    "mask.mrc": ((64, 64, 64), 2.0),
    "map_true.mrc": ((64, 64, 64), 2.0),
    "merged.mrc": ((64, 64, 64), 2.0),
    "TS_01.mrc": ((13, 256, 256), 2.0),
}


def frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)


# ---------------------------------------------------------------- maps


def test_every_fixture_mrc_file_reads(relion5_small_mrc):
    path = relion5_small_mrc
    header = read_map_header(path)
    data, voxel = read_map(path)
    assert header.size_matches
    assert data.dtype == np.float32 and np.all(np.isfinite(data))
    if path.name in EXPECTED_MRC:
        shape, pixel = EXPECTED_MRC[path.name]
        assert data.shape == shape and header.shape == shape and voxel == pixel
    else:  # RELION's aberration phase images: one 128 x 128 section
        assert header.shape == (1, 128, 128)


def test_map_round_trip_is_exact(tmp_path, relion5_small):
    data, voxel = read_map(relion5_small / "ref" / "half1.mrc")
    write_map(tmp_path / "copy.mrc", data, voxel)
    again, voxel_again = read_map(tmp_path / "copy.mrc")
    assert voxel_again == 2.0
    np.testing.assert_array_equal(again, data)
    assert [p.name for p in tmp_path.iterdir()] == ["copy.mrc"]


def test_stack_is_memory_mapped_and_equals_the_data(relion5_small):
    stack = memmap_stack(relion5_small / "tilt_series" / "TS_01.mrc")
    assert isinstance(stack, np.memmap) and stack.shape == (13, 256, 256)
    np.testing.assert_array_equal(np.asarray(stack), read_map(relion5_small / "tilt_series" / "TS_01.mrc")[0])


# ---------------------------------------------------------------- optimisation set


def test_optimisation_set_reads_all_keys_and_overrides(relion5_small):
    opt = read_optimisation_set(relion5_small / "optimisation_set.star")
    assert (opt.particles_path, opt.tomograms_path, opt.ref1_path, opt.ref2_path, opt.mask_path) == (
        "particles.star", "tomograms.star", "ref/half1.mrc", "ref/half2.mrc", "ref/mask.mrc")
    assert opt.trajectories_path is None and opt.fsc_path is None
    assert opt.resolved("ref1_path") == relion5_small / "ref" / "half1.mrc"
    over = read_optimisation_set(relion5_small / "optimisation_set.star", particles="other.star", fsc="post.star", trajectories="m.star")
    assert over.particles_path == "other.star" and over.fsc_path == "post.star" and over.trajectories_path == "m.star"
    assert over.tomograms_path == "tomograms.star"
    assert over.overridden == {"particles_path", "fsc_path", "trajectories_path"}
    flags_only = read_optimisation_set(particles="p.star", tomograms="t.star")
    assert flags_only.source_path is None and flags_only.ref1_path is None


def test_optimisation_set_round_trip_keeps_unknown_keys(tmp_path, relion5_small):
    path = tmp_path / "opt.star"
    path.write_text((relion5_small / "optimisation_set.star").read_text() + "_rlnTomoManifoldsFile  manifolds.star\n"
                    "_rlnTomoTrajectoriesFile  motion.star\n_rlnTomoReferenceFscFile  post.star\n")
    opt = read_optimisation_set(path)
    assert opt.extra == {"rlnTomoManifoldsFile": "manifolds.star"}
    again = read_optimisation_set(write_optimisation_set(opt, tmp_path / "out.star"))
    for name in ("particles_path", "tomograms_path", "trajectories_path", "ref1_path", "ref2_path", "mask_path", "fsc_path"):
        assert getattr(again, name) == getattr(opt, name)
    assert again.extra == opt.extra and again.version == "50001"


def test_relion_output_optimisation_set_holds_two_entries(relion5_small):
    opt = read_optimisation_set(relion5_small / "runs" / "defocus_scale_aberr" / "optimisation_set.star")
    assert opt.particles_path == "runs/defocus_scale_aberr/particles.star"
    assert opt.ref1_path is None
    # written relative to RELION's working directory: found through the parents of its folder
    assert opt.resolved("tomograms_path") == relion5_small / "runs" / "defocus_scale_aberr" / "tomograms.star"


def test_resolve_path_prefers_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.star").write_text("")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "a").mkdir()
    (tmp_path / "b" / "a" / "x.star").write_text("")
    monkeypatch.chdir(tmp_path)
    assert resolve_path("a/x.star", [tmp_path / "b"]) == Path("a/x.star")
    monkeypatch.chdir(tmp_path / "a")
    assert resolve_path("a/x.star", [tmp_path / "b"]) == tmp_path / "b" / "a" / "x.star"
    assert resolve_path("missing.star", [tmp_path / "b"]) == Path("missing.star")


# ---------------------------------------------------------------- tomogram sets


@pytest.fixture(scope="module")
def tset(relion5_small):
    return T.read_tomogram_set(relion5_small / "tomograms.star")


def test_v5_tomogram_reads(tset, relion5_small):
    assert tset.format_version == 5 and T.tomogram_names(tset) == ["TS_01"]
    tomo = T.tomogram(tset, "TS_01")
    assert tomo.image_size_px == (256, 256) and tomo.size_px == (256, 256, 100)
    assert tomo.pixel_size_angstrom == 2.0 and tomo.hand == -1.0 and tomo.defocus_slope == 1.0
    assert (tomo.optics.voltage_kv, tomo.optics.spherical_aberration_mm, tomo.optics.amplitude_contrast) == (300.0, 2.7, 0.1)
    assert tomo.fractional_dose_e_per_angstrom2 == 3.0 and tomo.bfactor_per_electron_dose_angstrom2 == 0.0
    assert tomo.tilt_count == 13 and tomo.projection_matrices.shape == (13, 4, 4)
    assert tomo.defocus_u_angstrom[0] == 33570.994053 and tomo.defocus_angle_deg[-1] == 61.389434
    np.testing.assert_array_equal(tomo.pre_exposure_e_per_angstrom2, [36, 33, 24, 21, 12, 9, 0, 3, 6, 15, 18, 27, 30])
    np.testing.assert_array_equal(tomo.ctf_scale, np.ones(13))
    np.testing.assert_array_equal(tomo.phase_shift_deg, np.zeros(13))
    assert tomo.stack_path == relion5_small / "tilt_series" / "TS_01.mrc" and tomo.micrograph_paths is None


def test_v5_matrices_map_the_integer_centre_to_image_centre_plus_shift(tset):
    tomo = T.tomogram(tset, "TS_01")
    table = tset.tilt_tables["TS_01"]
    image = project(tomo.projection_matrices, np.array([[128.0, 128.0, 50.0]]))[0]
    np.testing.assert_allclose(image[:, 0], 128 + table["rlnTomoXShiftAngst"] / 2.0, atol=1e-9)
    np.testing.assert_allclose(image[:, 1], 128 + table["rlnTomoYShiftAngst"] / 2.0, atol=1e-9)
    np.testing.assert_allclose(image[:, 2], 0.0, atol=1e-9)


def test_load_tilt_images_option_a(tset):
    images = T.load_tilt_images(T.tomogram(tset, "TS_01"))
    assert isinstance(images, np.memmap) and images.shape == (13, 256, 256) and images.dtype == np.float32


def test_v5_write_then_read_is_identical(tset, tmp_path, relion5_small):
    path = T.write_tomogram_set(tset, tmp_path / "out")
    assert path == tmp_path / "out" / "tomograms.star"
    assert (tmp_path / "out" / "tilt_series" / "TS_01.star").exists()
    again = T.read_tomogram_set(path)
    assert again.format_version == 5 and again.version == "50001"
    assert again.global_table["rlnTomoTiltSeriesStarFile"].iloc[0] == str(tmp_path / "out" / "tilt_series" / "TS_01.star")
    frames_equal(again.global_table.drop(columns=["rlnTomoTiltSeriesStarFile", "rlnTomoTiltSeriesName"]),
                 tset.global_table.drop(columns=["rlnTomoTiltSeriesStarFile", "rlnTomoTiltSeriesName"]))
    frames_equal(again.tilt_tables["TS_01"], tset.tilt_tables["TS_01"])
    np.testing.assert_array_equal(T.tomogram(again, "TS_01").projection_matrices, T.tomogram(tset, "TS_01").projection_matrices)
    # the stack path is rewritten only because it does not resolve from the working directory
    assert T.tomogram(again, "TS_01").stack_path.resolve() == (relion5_small / "tilt_series" / "TS_01.mrc")


def _written_tilt_series_files(tset, tmp_path, input_path: str) -> list[str]:
    """The per-tilt-series files written (relative to the output folder) for an input set whose
    ``rlnTomoTiltSeriesStarFile`` is ``input_path``, and check tomograms.star names exactly those."""
    table = tset.global_table.copy()
    table["rlnTomoTiltSeriesStarFile"] = [input_path]
    moved = T.TomogramSet(table, tset.tilt_tables, 5, tset.path, tset.version, tset.tilt_paths)
    out = tmp_path / "out"
    written = T.read_tomogram_set(T.write_tomogram_set(moved, out))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.star") if p.name != "tomograms.star")
    assert [Path(p).relative_to(out).as_posix() for p in written.global_table["rlnTomoTiltSeriesStarFile"]] == files
    return files


@pytest.mark.parametrize("input_path, expected", [
    ("CtfRefine/job012/tilt_series/TS_01.star", "tilt_series/TS_01.star"),
    ("AlignTiltSeries/job005/ts/nested/TS_01.star", "ts/nested/TS_01.star"),   # RELION keeps the rest
    ("Tomograms/job003/TS_01.star", "TS_01.star"),
])
def test_relion_job_prefix_is_removed_from_tilt_series_paths(tset, tmp_path, input_path, expected):
    assert _written_tilt_series_files(tset, tmp_path, input_path) == [expected]


@pytest.mark.parametrize("input_path", [
    "Runs/000123_ProtTomoCtfRefine/extra/input/tilt_series/TS_01.star",  # a Scipion run: no X/jobNNN/
    "my_dataset/ts/TS_01.star",
    "TS_01.star",
    "/data/project/tilt_series/TS_01.star",
    "../elsewhere/TS_01.star",
    "CtfRefine/job012/../TS_01.star",
])
def test_tilt_series_paths_outside_relion_layout_go_to_tilt_series_folder(tset, tmp_path, input_path):
    """A path not in RELION's X/jobNNN/ layout would nest the outputs under the input's folders
    (extra/Runs/<run>/extra/... for a Scipion input): it is written as tilt_series/<name>.star."""
    assert _written_tilt_series_files(tset, tmp_path, input_path) == ["tilt_series/TS_01.star"]


def test_relion_written_tomogram_set_reads(tset, relion5_small):
    refined = T.read_tomogram_set(relion5_small / "runs" / "defocus_scale_aberr" / "tomograms.star")
    tomo = T.tomogram(refined, "TS_01")
    assert tomo.stack_path == relion5_small / "tilt_series" / "TS_01.mrc"
    assert tomo.defocus_u_angstrom[0] != T.tomogram(tset, "TS_01").defocus_u_angstrom[0]
    # RELION 5.0.1 rewrites the angles and shifts with 5 decimals when negative (%12.5f)
    np.testing.assert_allclose(tomo.projection_matrices, T.tomogram(tset, "TS_01").projection_matrices, rtol=0, atol=5e-5)


def test_v4_made_from_v5_gives_the_same_matrices(tset, tmp_path):
    v4 = T.to_v4(tset)
    path = T.write_tomogram_set(v4, tmp_path)
    text = path.read_text()
    assert text.startswith("\n# version 30001\n") and "data_TS_01" in text and "rlnTomoProjX #1" in text
    assert "rlnTomoTiltSeriesStarFile" not in text and "rlnTomoYTilt" not in text
    again = T.read_tomogram_set(path)
    assert again.format_version == 4 and list(again.tilt_tables) == ["TS_01"]
    v4_tomo, v5_tomo = T.tomogram(again, "TS_01"), T.tomogram(tset, "TS_01")
    np.testing.assert_array_equal(v4_tomo.projection_matrices, v5_tomo.projection_matrices)
    np.testing.assert_array_equal(v4_tomo.defocus_v_angstrom, v5_tomo.defocus_v_angstrom)
    # v4 in, v4 out: a second write is the same file
    second = T.write_tomogram_set(again, tmp_path / "second")
    assert second.read_text() == text


def test_option_b_per_tilt_micrographs(tset, tmp_path, relion5_small):
    stack = read_map(relion5_small / "tilt_series" / "TS_01.mrc")[0]
    (tmp_path / "frames").mkdir()
    names = []
    for f in range(len(stack)):
        write_map(tmp_path / "frames" / f"tilt_{f:02d}.mrc", stack[f][None], 2.0)
        names.append(f"frames/tilt_{f:02d}.mrc")
    table = tset.tilt_tables["TS_01"].copy()
    table.insert(0, "rlnMicrographName", names)
    write_star(read_star(relion5_small / "tilt_series" / "TS_01.star").__class__({"TS_01": table}), tmp_path / "ts" / "TS_01.star")
    global_table = tset.global_table.drop(columns=["rlnTomoTiltSeriesName", "rlnTomoFrameCount"]).copy()
    global_table["rlnTomoTiltSeriesStarFile"] = ["ts/TS_01.star"]
    write_star(read_star(relion5_small / "tomograms.star").__class__({"global": global_table}), tmp_path / "tomograms.star")
    option_b = T.read_tomogram_set(tmp_path / "tomograms.star")
    tomo = T.tomogram(option_b, "TS_01")
    assert tomo.stack_path is None and len(tomo.micrograph_paths) == 13 and tomo.image_size_px == (256, 256)
    np.testing.assert_array_equal(T.load_tilt_images(tomo), stack)
    np.testing.assert_array_equal(tomo.projection_matrices, T.tomogram(tset, "TS_01").projection_matrices)
    assert T.missing_columns(option_b) == []


def test_with_tilt_ctf_and_global_values(tset, tmp_path):
    n = 13
    changed = T.with_tilt_ctf(tset, "TS_01", np.full(n, 30000.5), np.full(n, 31000.25), np.full(n, -12.0), ctf_scale=np.linspace(0.5, 1.5, n))
    changed = T.with_global_values(changed, "TS_01", relative_luminance=0.8, ice_normal_z=1.0)
    assert tset.tilt_tables["TS_01"]["rlnDefocusU"].iloc[0] == 33570.994053  # the original is unchanged
    again = T.read_tomogram_set(T.write_tomogram_set(changed, tmp_path))
    tomo = T.tomogram(again, "TS_01")
    np.testing.assert_array_equal(tomo.defocus_u_angstrom, np.full(n, 30000.5))
    np.testing.assert_array_equal(tomo.defocus_angle_deg, np.full(n, -12.0))
    np.testing.assert_allclose(tomo.ctf_scale, np.linspace(0.5, 1.5, n), rtol=1e-11)
    assert again.global_table["rlnTomoRelativeLuminance"].iloc[0] == 0.8
    assert list(again.global_table.columns)[-2:] == ["rlnTomoRelativeLuminance", "rlnTomoIceNormalZ"]


# ---------------------------------------------------------------- particles


@pytest.fixture(scope="module")
def pset(relion5_small):
    return P.read_particle_set(relion5_small / "particles.star")


def test_v5_particles_read(pset):
    assert pset.format_version == 5 and pset.general == {"rlnTomoSubTomosAre2DStacks": 1}
    assert len(pset.particles) == 30
    rows = P.particles_of(pset, "TS_01")
    np.testing.assert_array_equal(rows, np.arange(30))
    np.testing.assert_array_equal(np.bincount(P.half_sets(pset, rows)), [0, 15, 15])
    assert P.particle_names(pset, rows[:2]) == ["TS_01/1", "TS_01/2"]
    group = P.optics_groups(pset)[1]
    assert (group.pixel_size_angstrom, group.voltage_kv, group.spherical_aberration_mm, group.amplitude_contrast) == (2.0, 300.0, 2.7, 0.1)


def test_fixture_particle_positions_in_pixels(pset, tset):
    tomo = T.tomogram(tset, "TS_01")
    positions = P.particle_positions_px(pset, np.arange(30), tomo)
    # centred Å / 2 Å/px + (256/2, 256/2, 100/2)
    np.testing.assert_allclose(positions[0], [77.299576 / 2 + 128, 28.353621 / 2 + 128, -47.439286 / 2 + 50], rtol=0, atol=1e-12)
    np.testing.assert_allclose(positions[1], [148.2739285, 193.591868, 58.941682], rtol=0, atol=1e-12)
    assert np.all((positions >= 0) & (positions < [256, 256, 100]))


def test_rotations_are_relion_zyz(pset):
    rotations = P.particle_rotations(pset, np.arange(3))
    np.testing.assert_allclose(rotations[0], euler_zyz_matrix(-121.968728, 5.056925, -71.613860), atol=1e-15)


def test_origins_and_subtomogram_angles(pset, tset):
    tomo = T.tomogram(tset, "TS_01")
    particles = pset.particles.copy()
    particles["rlnOriginXAngst"] = 4.0
    particles["rlnOriginZAngst"] = -2.0
    for column, value in zip(P.SUBTOMO_ANGLES, (30.0, 40.0, 50.0)):
        particles[column] = value
    shifted = P.ParticleSet(pset.general, pset.optics, particles, 5, pset.path, pset.version)
    a_sub = euler_zyz_matrix(30.0, 40.0, 50.0)
    base = P.particle_positions_px(pset, [0], tomo)[0]
    np.testing.assert_allclose(P.particle_positions_px(shifted, [0], tomo)[0], base - a_sub @ np.array([2.0, 0.0, -1.0]), atol=1e-12)
    np.testing.assert_allclose(P.particle_rotations(shifted, [0])[0], a_sub @ P.particle_rotations(pset, [0])[0], atol=1e-14)


def test_v4_particles_add_one(pset, tset, tmp_path):
    tomo = T.tomogram(tset, "TS_01")
    v5_positions = P.particle_positions_px(pset, np.arange(30), tomo)
    particles = pset.particles.drop(columns=list(P.CENTRED)).copy()
    for i, column in enumerate(P.COORDINATES):
        particles[column] = v5_positions[:, i] - 1.0
    v4 = P.ParticleSet(None, pset.optics, particles, 4, None, "30001")
    path = P.write_particle_set(v4, tmp_path / "p4.star")
    text = path.read_text()
    assert "data_general" not in text and text.startswith("\n# version 30001\n")
    again = P.read_particle_set(path)
    assert again.format_version == 4
    np.testing.assert_allclose(P.particle_positions_px(again, np.arange(30), tomo), v5_positions, atol=1e-9)
    # v5 reading pixel coordinates (no centred columns) does not add 1
    v5_fallback = P.ParticleSet({"rlnTomoSubTomosAre2DStacks": 1}, pset.optics, particles, 5)
    np.testing.assert_allclose(P.particle_positions_px(v5_fallback, np.arange(30), tomo), v5_positions - 1.0, atol=1e-9)


@pytest.mark.parametrize("name", ["particles.star", "runs/defocus_scale_aberr/particles.star", "truth/particles_true.star"])
def test_particles_write_then_read_is_identical(name, tmp_path, relion5_small):
    original = P.read_particle_set(relion5_small / name)
    again = P.read_particle_set(P.write_particle_set(original, tmp_path / "p.star"))
    assert again.format_version == original.format_version and again.general == original.general
    frames_equal(again.optics, original.optics)
    frames_equal(again.particles, original.particles)


def test_zernike_lists(pset, tmp_path, relion5_small):
    refined = P.read_particle_set(relion5_small / "runs" / "defocus_scale_aberr" / "particles.star")
    even, odd = P.optics_zernike(refined, 1)
    assert len(even) == 9 and len(odd) == 6 and even[0] == 45.7087298722 and odd[5] == -119.180909584
    assert P.optics_zernike(pset, 1) == ([], [])
    updated = P.with_zernike(pset, 1, even=[1.5, -2.0, 1e-3], odd=[0.25])
    path = P.write_particle_set(updated, tmp_path / "z.star")
    optics_row = next(line for line in path.read_text().splitlines() if "optics1" in line)
    assert optics_row.split()[-2:] == ["[1.5,-2.0,0.001]", "[0.25]"]
    assert P.optics_zernike(P.read_particle_set(path), 1) == ([1.5, -2.0, 1e-3], [0.25])
    assert list(P.read_particle_set(path).optics.columns)[-2:] == ["rlnEvenZernike", "rlnOddZernike"]


def test_unknown_columns_and_tables_are_carried_through(pset, tmp_path):
    particles = pset.particles.copy()
    particles.insert(3, "rlnMyOwnScore", np.linspace(0, 1, 30))
    extended = P.ParticleSet(pset.general, pset.optics, particles, 5, None, "50001", {"notes": {"rlnComment": "kept"}})
    again = P.read_particle_set(P.write_particle_set(extended, tmp_path / "x.star"))
    assert list(again.particles.columns) == list(particles.columns)
    assert again.extra_blocks == {"notes": {"rlnComment": "kept"}}


# ---------------------------------------------------------------- trajectories and FSC


def test_trajectories_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    trajectories = {f"TS_01/{i}": rng.normal(size=(13, 3)) for i in range(1, 4)}
    path = write_trajectories(tmp_path / "motion.star", trajectories)
    doc = read_star(path)
    assert list(doc.blocks) == ["general", "TS_01/1", "TS_01/2", "TS_01/3"]
    assert doc.blocks["general"] == {"rlnParticleNumber": 3}
    again = read_trajectories(path)
    assert list(again) == list(trajectories)
    for name in trajectories:
        np.testing.assert_allclose(again[name], trajectories[name], rtol=1e-11, atol=1e-300)


def test_fsc_round_trip(tmp_path):
    index = np.arange(33)
    resolution = np.where(index == 0, np.inf, 64 * 2.0 / np.maximum(index, 1))
    curve = FscCurve(index, resolution, np.clip(1.2 - index / 25.0, -0.1, 1.0))
    again = read_fsc(write_fsc(tmp_path / "postprocess.star", curve))
    np.testing.assert_array_equal(again.spectral_index, index)
    np.testing.assert_allclose(again.fsc, curve.fsc, rtol=1e-12)
    assert again.resolution_angstrom[0] == np.inf
    np.testing.assert_allclose(again.resolution_angstrom[1:], resolution[1:], rtol=1e-11)


def test_angles_win_over_projection_columns_and_mrc_suffix_is_ignored(tset, relion5_small):
    table = tset.tilt_tables["TS_01"].copy()
    for column in T.PROJECTION:
        table[column] = "[1,0,0,0]"
    global_table = tset.global_table.copy()
    global_table["rlnTomoTiltSeriesName"] = ["tilt_series/TS_01.mrc:mrc"]
    both = T.TomogramSet(global_table, {"TS_01": table}, 5, tset.path, tset.version, tset.tilt_paths)
    tomo = T.tomogram(both, "TS_01")
    assert tomo.stack_path == relion5_small / "tilt_series" / "TS_01.mrc"
    np.testing.assert_array_equal(tomo.projection_matrices, T.tomogram(tset, "TS_01").projection_matrices)
