"""Input validation: each problem the validator catches, with its exact message, on broken copies of
the fixture built in tmp_path (the fixture itself is never written)."""
from __future__ import annotations

import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from tomoctfrefine.errors import Problem
from tomoctfrefine.io.maps import read_map, write_map
from tomoctfrefine.io.optimisation_set import read_optimisation_set
from tomoctfrefine.io.star import read_star, write_star
from tomoctfrefine.io.trajectories import write_trajectories
from tomoctfrefine.validate import inspect_inputs, validate_inputs

READ_FIX = "correct the path (relative paths are read from the working directory)"


@pytest.fixture
def data(tmp_path, monkeypatch, relion5_small):
    """A writable copy of the fixture's inputs; the working directory is its root (RELION's rule), so
    files found there are named as written."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("optimisation_set.star", "tomograms.star", "particles.star"):
        shutil.copy(relion5_small / name, root / name)
    shutil.copytree(relion5_small / "tilt_series", root / "tilt_series")
    shutil.copytree(relion5_small / "ref", root / "ref", ignore=shutil.ignore_patterns("map_true.mrc"))
    for path in root.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    monkeypatch.chdir(root)
    return root


def problems_of(root: Path, **overrides) -> list[Problem]:
    return validate_inputs(read_optimisation_set(root / "optimisation_set.star", **overrides))


def messages(problems) -> list[str]:
    return [str(p) for p in problems]


def edit_star(path: Path, block: str, edit) -> None:
    doc = read_star(path)
    doc.blocks[block] = edit(doc.blocks[block].copy())
    write_star(doc, path)


def edit_map(path: Path, edit=None, voxel=None) -> None:
    data, size = read_map(path)
    write_map(path, edit(data) if edit else data, voxel if voxel is not None else size)


def test_fixture_has_no_problem_and_the_right_summary(relion5_small):
    opt = read_optimisation_set(relion5_small / "optimisation_set.star")
    report = inspect_inputs(opt, box_size_px=128)
    assert report.problems == []
    assert [(t.name, t.tilt_count, t.dose_min_e_per_angstrom2, t.dose_max_e_per_angstrom2, t.pixel_size_angstrom, t.particle_count, t.half_set_counts)
            for t in report.tomograms] == [("TS_01", 13, 0.0, 36.0, 2.0, 30, (15, 15))]
    assert report.particle_count == 30 and report.half_set_counts == (15, 15)
    assert report.optics_groups == [(1, "optics1", 2.0)]
    assert (report.reference_box_px, report.reference_pixel_size_angstrom) == (64, 2.0)
    assert report.mask_present and not report.fsc_present and not report.trajectories_present


def test_missing_file_names_the_key(data):
    (data / "ref" / "mask.mrc").unlink()
    assert messages(problems_of(data)) == [
        f"{data / 'optimisation_set.star'} [rlnTomoReferenceMaskFile]: reference mask not found: ref/mask.mrc; {READ_FIX}"
    ]


def test_missing_override_names_the_flag(data):
    problems = validate_inputs(read_optimisation_set(data / "optimisation_set.star", ref2="nowhere.mrc"), flag_names={"ref2_path": "--ref2"})
    assert messages(problems) == [f"command line [--ref2]: reference half map 2 not found: nowhere.mrc; {READ_FIX}"]


def test_missing_entry(data):
    (data / "optimisation_set.star").write_text((data / "optimisation_set.star").read_text().replace("_rlnTomoReferenceMap1File  ref/half1.mrc\n", ""))
    assert messages(problems_of(data)) == [
        f"{data / 'optimisation_set.star'} [rlnTomoReferenceMap1File]: no reference half map 1 given; "
        "add rlnTomoReferenceMap1File to the optimisation set"
    ]


def test_missing_tilt_series_file(data):
    (data / "tilt_series" / "TS_01.star").unlink()
    assert messages(problems_of(data)) == [
        f"tomograms.star [rlnTomoTiltSeriesStarFile]: tilt-series file of TS_01 not found: tilt_series/TS_01.star; {READ_FIX}"
    ]


def test_missing_stack(data):
    (data / "tilt_series" / "TS_01.mrc").unlink()
    assert messages(problems_of(data)) == [
        f"tomograms.star [rlnTomoTiltSeriesName]: tilt stack of TS_01 not found: tilt_series/TS_01.mrc; {READ_FIX}"
    ]


def test_unreadable_mrc(data):
    (data / "ref" / "half2.mrc").write_bytes(b"not an MRC file at all" * 10)
    [problem] = problems_of(data)
    assert problem.file == "ref/half2.mrc" and problem.key == "rlnTomoReferenceMap2File"
    assert problem.message.startswith("not a readable MRC file (")
    assert problem.fix == "check the file is a complete MRC file"


def test_malformed_star(data):
    text = (data / "particles.star").read_text()
    (data / "particles.star").write_text(text.replace(" 0.000000 0.000000 0.000000 1\n", " 0.000000 0.000000 0.000000 1 7\n", 1))
    assert messages(problems_of(data)) == [
        f"particles.star [rlnTomoParticlesFile]: malformed STAR file: block data_particles: a row has 14 values for 13 columns "
        "('TS_01 TS_01/1 1 77.299576 28.353621 -47.439286 -121.968728 5'); "
        "check the file was written completely by RELION or tomoctfrefine"
    ]


def test_missing_required_columns(data):
    edit_star(data / "particles.star", "particles", lambda t: t.drop(columns=["rlnRandomSubset"]))
    edit_star(data / "tilt_series" / "TS_01.star", "TS_01", lambda t: t.drop(columns=["rlnMicrographPreExposure", "rlnTomoZRot"]))
    assert messages(problems_of(data)) == [
        f"tilt_series/TS_01.star [rlnMicrographPreExposure]: data_TS_01 lacks required column rlnMicrographPreExposure; add it",
        f"tilt_series/TS_01.star [rlnTomoZRot]: data_TS_01 lacks required column rlnTomoZRot (or rlnTomoProjX..W); add the tilt-series alignment",
        f"particles.star [rlnRandomSubset]: data_particles lacks required column rlnRandomSubset; add it (RELION's particles.star has it)",
    ]


def test_tilt_count_differs_from_stack(data):
    edit_star(data / "tilt_series" / "TS_01.star", "TS_01", lambda t: t.iloc[:12])
    assert messages(problems_of(data)) == [
        f"tomograms.star [rlnTomoFrameCount]: tomogram TS_01: rlnTomoFrameCount says 13 tilts but its table has 12; make them agree",
        f"tilt_series/TS_01.mrc [rlnTomoTiltSeriesName]: tilt stack of TS_01 has 13 slices but its tilt table has 12 rows; "
        "give the stack that matches the tilt table",
    ]


def test_truncated_stack(data):
    stack = data / "tilt_series" / "TS_01.mrc"
    with open(stack, "r+b") as handle:
        handle.truncate(1024 + 12 * 256 * 256 * 4)
    assert messages(problems_of(data)) == [
        f"tilt_series/TS_01.mrc [rlnTomoTiltSeriesName]: tilt stack of TS_01 is shorter than its header says (3146752 < 3408896 bytes); the file is truncated: copy it again"
    ]


def test_reference_pixel_size_differs_from_tilt_series(data):
    for name in ("half1.mrc", "half2.mrc", "mask.mrc"):
        edit_map(data / "ref" / name, voxel=4.0)
    assert messages(problems_of(data)) == [
        f"{data / 'optimisation_set.star'} [rlnTomoReferenceMap1File]: reference pixel size 4 Å differs from the tilt-series pixel size 2 Å (factor 2); "
        "the reference must be at bin 1: rescale it to 2 Å/px (a box 2 times larger)"
    ]


def test_half_maps_of_different_shape_or_pixel_size(data, relion5_small):
    edit_map(data / "ref" / "half2.mrc", edit=lambda d: d[16:48, 16:48, 16:48])
    assert messages(problems_of(data)) == [
        f"{data / 'optimisation_set.star'} [rlnTomoReferenceMap2File]: half maps differ in shape (64 px vs 32 px box); give the two half maps of one refinement"
    ]
    shutil.copy(relion5_small / "ref" / "half2.mrc", data / "ref" / "half2.mrc")
    (data / "ref" / "half2.mrc").chmod(0o644)
    edit_map(data / "ref" / "half2.mrc", voxel=2.5)
    assert messages(problems_of(data)) == [
        f"{data / 'optimisation_set.star'} [rlnTomoReferenceMap2File]: half maps differ in pixel size (2 Å vs 2.5 Å); give the two half maps of one refinement"
    ]


def test_mask_of_another_box_and_reference_larger_than_box(data):
    edit_map(data / "ref" / "mask.mrc", edit=lambda d: d[:, :, :48])
    problems = validate_inputs(read_optimisation_set(data / "optimisation_set.star"), box_size_px=48)
    assert messages(problems) == [
        f"{data / 'optimisation_set.star'} [rlnTomoReferenceMaskFile]: reference mask is not a cube (48 x 64 x 64 px); give a cubic map",
        f"{data / 'optimisation_set.star'} [rlnTomoReferenceMaskFile]: mask box 48 px differs from the reference box 64 px; give a mask made for these half maps",
        f"{data / 'optimisation_set.star'} [rlnTomoReferenceMap1File]: reference box 64 px is larger than the refinement box 48 px; use a refinement box at least as large as the reference",
    ]


@pytest.mark.parametrize(
    "column, value, label, shown",
    [
        ("rlnVoltage", 200.0, "voltage 200 kV differs from tomogram TS_01's 300 kV", "rlnVoltage"),
        ("rlnSphericalAberration", 2.702, "spherical aberration 2.702 mm differs from tomogram TS_01's 2.7 mm", "rlnSphericalAberration"),
        ("rlnAmplitudeContrast", 0.07, "amplitude contrast 0.07 differs from tomogram TS_01's 0.1", "rlnAmplitudeContrast"),
    ],
)
def test_particle_optics_differ_from_tomogram(data, column, value, label, shown):
    def edit(table):
        table[column] = value
        return table

    edit_star(data / "particles.star", "optics", edit)
    assert messages(problems_of(data)) == [f"particles.star [{shown}]: optics group 1 {label}; make the particle and tomogram optics agree"]


def test_optics_within_tolerance_pass(data):
    def edit(table):
        table["rlnSphericalAberration"] = 2.7009
        return table

    edit_star(data / "particles.star", "optics", edit)
    assert problems_of(data) == []


def test_particles_naming_unknown_tomograms(data):
    def edit(table):
        table.loc[table.index[:3], "rlnTomoName"] = "TS_99"
        return table

    edit_star(data / "particles.star", "particles", edit)
    assert messages(problems_of(data)) == [
        f"particles.star [rlnTomoName]: 3 particles name tomogram TS_99, which is not in tomograms.star; remove them or add the tomogram"
    ]


def test_particles_outside_their_tomogram(data):
    def edit(table):
        table.loc[table.index[4], "rlnCenteredCoordinateZAngst"] = 120.0
        table.loc[table.index[7], "rlnCenteredCoordinateXAngst"] = -300.0
        return table

    edit_star(data / "particles.star", "particles", edit)
    assert messages(problems_of(data)) == [
        f"particles.star [rlnCenteredCoordinateXAngst]: 2 particles of TS_01 lie outside the tomogram (256 x 256 x 100 px); "
        "first at row 5, (215.8, 79.4, 110.0) px; check the coordinates, the pixel size and the tomogram size"
    ]


def test_empty_half_set(data):
    def edit(table):
        table["rlnRandomSubset"] = 1
        return table

    edit_star(data / "particles.star", "particles", edit)
    assert messages(problems_of(data)) == [f"particles.star [rlnRandomSubset]: half set 2 is empty; assign particles to both half sets"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile warns when the test writes NaN
def test_nan_and_inf_values(data):
    def edit_particles(table):
        table.loc[table.index[2], "rlnAngleTilt"] = np.nan
        table.loc[table.index[3], "rlnAngleTilt"] = np.inf
        return table

    def edit_tilts(table):
        table.loc[table.index[5], "rlnDefocusU"] = np.nan
        return table

    def nan_voxel(d):
        d[3, 4, 5] = np.nan
        return d

    def nan_tilt(stack):
        stack[2, 10, 10] = np.inf
        return stack

    edit_star(data / "particles.star", "particles", edit_particles)
    edit_star(data / "tilt_series" / "TS_01.star", "TS_01", edit_tilts)
    edit_map(data / "ref" / "half1.mrc", edit=nan_voxel)
    edit_map(data / "tilt_series" / "TS_01.mrc", edit=nan_tilt)
    assert messages(problems_of(data)) == [
        f"tilt_series/TS_01.star [rlnDefocusU]: data_TS_01 has 1 NaN or infinite value in rlnDefocusU; repair or remove those rows",
        f"tilt_series/TS_01.mrc [rlnTomoTiltSeriesName]: tilt stack of TS_01 has NaN or infinite pixels in tilt 3; repair or exclude those tilts",
        f"particles.star [rlnAngleTilt]: data_particles has 2 NaN or infinite values in rlnAngleTilt; repair or remove those rows",
        f"{data / 'optimisation_set.star'} [rlnTomoReferenceMap1File]: reference half map 1 ref/half1.mrc has 1 NaN or infinite voxel; repair the map",
    ]


def test_trajectories_of_the_wrong_length(data):
    trajectories = {f"TS_01/{i}": np.zeros((13, 3)) for i in range(1, 31)}
    trajectories["TS_01/4"] = np.zeros((12, 3))
    del trajectories["TS_01/30"]
    write_trajectories(data / "motion.star", trajectories)
    problems = problems_of(data, trajectories="motion.star")
    assert messages(problems) == [
        f"motion.star: trajectory of TS_01/4 has 12 tilts, tomogram TS_01 has 13; give the trajectories made for this tilt series",
        f"motion.star: 1 particle has no trajectory (first: TS_01/30); give the trajectories made for these particles",
    ]


def test_fsc_file_without_fsc_table(data):
    write_star(read_star(data / "tomograms.star"), data / "post.star")
    assert messages(problems_of(data, fsc="post.star")) == [
        f"post.star [data_fsc]: no data_fsc table; give RELION's postprocess.star (it holds data_fsc)"
    ]


def test_every_problem_is_reported_at_once(data):
    (data / "ref" / "mask.mrc").unlink()
    edit_map(data / "ref" / "half2.mrc", voxel=2.5)

    def edit(table):
        table["rlnRandomSubset"] = 2
        table["rlnVoltage"] = 300.0
        return table

    edit_star(data / "particles.star", "particles", edit)
    edit_star(data / "tilt_series" / "TS_01.star", "TS_01", lambda t: t.iloc[:11])
    problems = problems_of(data)
    assert [p.key for p in problems] == [
        "rlnTomoFrameCount", "rlnTomoTiltSeriesName", "rlnRandomSubset", "rlnTomoReferenceMaskFile", "rlnTomoReferenceMap2File",
    ]


def test_validation_is_fast(relion5_small):
    import time

    opt = read_optimisation_set(relion5_small / "optimisation_set.star")
    validate_inputs(opt)
    start = time.perf_counter()
    validate_inputs(opt)
    assert time.perf_counter() - start < 1.0
