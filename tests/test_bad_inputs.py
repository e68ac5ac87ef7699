"""A catalogue of bad inputs through every entry point: the console script (``tomoctfrefine refine`` and
``check``, run as the user runs them), the Python API (``pipeline.prepare`` / ``run_refinement`` and the
separate steps) and the Scipion protocol's ``_validate``.

Each case breaks a copy of the RELION-5 fixture (made in tmp_path; the fixture itself is read-only) in
one way, and must give: exit code 2 (or :class:`InputError` in Python), exactly the expected one-line
message naming the file or flag and what to do, no traceback, and no output claimed as finished
(neither ``optimisation_set.star`` nor ``summary.json`` in the output folder). The per-problem
validator messages are pinned in tests/test_validate.py; here every case also goes end to end.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from tomoctfrefine import pipeline
from tomoctfrefine.errors import InputError
from tomoctfrefine.io.maps import read_map, write_map
from tomoctfrefine.io.optimisation_set import read_optimisation_set
from tomoctfrefine.io.star import read_star, write_star

CONSOLE = Path(sys.executable).parent / "tomoctfrefine"
CONFTEST = Path(__file__).resolve().parent / "scipion" / "conftest.py"
PATH_FIX = "correct the path (relative paths are read from the working directory)"
STAR_FIX = "check the file was written completely by RELION or tomoctfrefine"
QUICK = ["--b", "64", "--do_defocus", "--do_scale", "--j", "1"]


@pytest.fixture
def project(tmp_path, relion5_small) -> Path:
    """A writable copy of the fixture's inputs; tests run with it as working directory (RELION's rule)."""
    return make_project(relion5_small, tmp_path / "project")


def edit_star(path: Path, block: str, edit) -> None:
    doc = read_star(path)
    doc.blocks[block] = edit(doc.blocks[block].copy())
    write_star(doc, path)


def set_value(column, value, row=None):
    def edit(table):
        if row is None:
            table[column] = value
        else:
            if isinstance(value, str):
                table[column] = table[column].astype(object)
            table.loc[table.index[row], column] = value
        return table

    return edit


def replace_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def edit_map(path: Path, edit=None, voxel=None) -> None:
    data, size = read_map(path)
    write_map(path, edit(data) if edit else data, voxel if voxel is not None else size)


def run_console(root: Path, command: str, *arguments, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([str(CONSOLE), command, *arguments], cwd=root, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """The error lines (mrcfile's own RuntimeWarnings on a corrupt header are not ours)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------ CLI
# Each case: id, how to break the copy, the command line (after the subcommand), the exact messages.
# The console processes of all cases run concurrently (module fixture): each is a separate process,
# the machine is shared, and waiting for 35 interpreters one after the other would take minutes.

REFINE = ["--i", "optimisation_set.star", "--o", "out"]
CASES = {}


def case(name, *, args=(), command="refine", flags=QUICK):
    """Register ``function(root)`` (breaks the copy, returns the expected messages) as a CLI case."""
    def register(function):
        CASES[name] = (function, command, list(REFINE if command == "refine" and not args else []) + list(args)
                       + (list(flags) if command == "refine" else []))
        return function
    return register


@case("missing particles file")
def _(root):
    (root / "particles.star").unlink()
    return [f"optimisation_set.star [rlnTomoParticlesFile]: particles file not found: particles.star; {PATH_FIX}"]


@case("missing optimisation set", args=["--i", "nothing.star", "--o", "out"])
def _(root):
    return ["nothing.star: file not found; check the path"]


@case("empty particles file")
def _(root):
    (root / "particles.star").write_text("")
    return [f"particles.star [rlnTomoParticlesFile]: malformed STAR file: no data_ block; {STAR_FIX}"]


@case("truncated tilt-series file")
def _(root):
    path = root / "tilt_series" / "TS_01.star"
    text = path.read_text()
    path.write_text(text[: text.index("31424.838401") + 8])  # cut mid-row, as a full disk leaves it
    return ["tilt_series/TS_01.star [rlnTomoTiltSeriesStarFile]: malformed STAR file: block data_TS_01: a row has 3 values "
            f"for 11 columns ('-6.000000 9.000000 31424.83'); {STAR_FIX}"]


@case("binary tomograms file")
def _(root):
    (root / "tomograms.star").write_bytes(bytes(range(256)) * 20)
    return ["tomograms.star [rlnTomoTomogramsFile]: cannot read the file ('utf-8' codec can't decode byte 0x80 in position 128: "
            "invalid start byte); check the file and its permissions"]


@case("particles path is a folder")
def _(root):
    replace_text(root / "optimisation_set.star", "particles.star", "ref")
    return ["ref [rlnTomoParticlesFile]: cannot read the file ([Errno 21] Is a directory: 'ref'); check the file and its permissions"]


@case("particles without data_optics")
def _(root):
    doc = read_star(root / "particles.star")
    del doc.blocks["optics"]
    write_star(doc, root / "particles.star")
    return ["particles.star [data_optics]: no data_optics table; give a RELION particles.star"]


@case("tilt table without a required column")
def _(root):
    edit_star(root / "tilt_series" / "TS_01.star", "TS_01", lambda t: t.drop(columns=["rlnDefocusV"]))
    return ["tilt_series/TS_01.star [rlnDefocusV]: data_TS_01 lacks required column rlnDefocusV; add it"]


@case("non-numeric defocus")
def _(root):
    replace_text(root / "tilt_series" / "TS_01.star", "33719.311334", "33719,311334")  # a decimal comma
    return ["tilt_series/TS_01.star [rlnDefocusU]: data_TS_01 has a non-numeric value in rlnDefocusU (row 2: '33719,311334'); "
            "write a number there"]


@case("non-numeric half set (check)", command="check", args=["--i", "optimisation_set.star"])
def _(root):
    edit_star(root / "particles.star", "particles", set_value("rlnRandomSubset", "one", 0))
    return ["particles.star [rlnRandomSubset]: data_particles has a non-numeric value in rlnRandomSubset (row 1: 'one'); "
            "write a number there"]


@case("empty particle table")
def _(root):
    edit_star(root / "particles.star", "particles", lambda t: t.iloc[:0])
    return ["particles.star [data_particles]: data_particles has no particles; "
            "give the particles of the refinement (a RELION particles.star with rows)"]


@case("NaN defocus angle")
def _(root):
    edit_star(root / "tilt_series" / "TS_01.star", "TS_01", set_value("rlnDefocusAngle", np.nan, 4))
    return ["tilt_series/TS_01.star [rlnDefocusAngle]: data_TS_01 has 1 NaN or infinite value in rlnDefocusAngle; "
            "repair or remove those rows"]


@case("infinite particle coordinate")
def _(root):
    edit_star(root / "particles.star", "particles", set_value("rlnCenteredCoordinateYAngst", -np.inf, 6))
    return ["particles.star [rlnCenteredCoordinateYAngst]: data_particles has 1 NaN or infinite value in "
            "rlnCenteredCoordinateYAngst; repair or remove those rows"]


@case("zero pixel size")
def _(root):
    edit_star(root / "tomograms.star", "global", set_value("rlnTomoTiltSeriesPixelSize", 0.0))
    return ["tomograms.star [rlnTomoTiltSeriesPixelSize]: tomogram TS_01 has pixel size 0 Å; give the tilt-series pixel size in Å"]


@case("duplicated tomogram names")
def _(root):
    edit_star(root / "tomograms.star", "global", lambda t: pd.concat([t, t], ignore_index=True))
    return ["tomograms.star [rlnTomoName]: tomogram name TS_01 appears 2 times; give each tomogram a unique name"]


@case("particle optics contradict the tomogram")
def _(root):
    edit_star(root / "particles.star", "optics", set_value("rlnTomoTiltSeriesPixelSize", 2.2))
    return ["particles.star [rlnTomoTiltSeriesPixelSize]: optics group 1 pixel size 2.2 Å differs from tomogram TS_01's 2 Å; "
            "make the particle and tomogram pixel sizes agree"]


@case("particles of an unknown tomogram")
def _(root):
    edit_star(root / "particles.star", "particles", set_value("rlnTomoName", "TS_1", 0))
    return ["particles.star [rlnTomoName]: 1 particle names tomogram TS_1, which is not in tomograms.star; remove them or add the tomogram"]


@case("particle outside the tomogram")
def _(root):
    edit_star(root / "particles.star", "particles", set_value("rlnCenteredCoordinateXAngst", 260.0, 2))
    return ["particles.star [rlnCenteredCoordinateXAngst]: 1 particle of TS_01 lies outside the tomogram (256 x 256 x 100 px); "
            "first at row 3, (258.0, 208.7, 58.4) px; check the coordinates, the pixel size and the tomogram size"]


@case("empty half set")
def _(root):
    edit_star(root / "particles.star", "particles", set_value("rlnRandomSubset", 2))
    return ["particles.star [rlnRandomSubset]: half set 1 is empty; assign particles to both half sets"]


@case("stack with one slice too few")
def _(root):
    edit_map(root / "tilt_series" / "TS_01.mrc", edit=lambda d: d[:12])
    return ["tilt_series/TS_01.mrc [rlnTomoTiltSeriesName]: tilt stack of TS_01 has 12 slices but its tilt table has 13 rows; "
            "give the stack that matches the tilt table"]


@case("complex stack")
def _(root):
    data, voxel = read_map(root / "tilt_series" / "TS_01.mrc")
    with mrcfile.new(root / "tilt_series" / "TS_01.mrc", overwrite=True) as mrc:
        mrc.set_data(data.astype(np.complex64))  # MRC mode 4: a Fourier-space stack given by mistake
        mrc.voxel_size = voxel
    return ["tilt_series/TS_01.mrc [rlnTomoTiltSeriesName]: tilt stack of TS_01 holds complex numbers (complex64), not real "
            "pixel values; give real-valued images (MRC mode 0, 1, 2, 6 or 12)"]


@case("truncated stack (check)", command="check", args=["--i", "optimisation_set.star"])
def _(root):
    with open(root / "tilt_series" / "TS_01.mrc", "r+b") as handle:
        handle.truncate(1024 + 13 * 256 * 256 * 4 - 1)
    return ["tilt_series/TS_01.mrc [rlnTomoTiltSeriesName]: tilt stack of TS_01 is shorter than its header says "
            "(3408895 < 3408896 bytes); the file is truncated: copy it again"]


@case("half maps of different pixel size")
def _(root):
    edit_map(root / "ref" / "half2.mrc", voxel=2.02)
    return ["optimisation_set.star [rlnTomoReferenceMap2File]: half maps differ in pixel size (2 Å vs 2.02 Å); "
            "give the two half maps of one refinement"]


@case("reference not at bin 1")
def _(root):
    for name in ("half1.mrc", "half2.mrc", "mask.mrc"):
        edit_map(root / "ref" / name, voxel=8.0)
    return ["optimisation_set.star [rlnTomoReferenceMap1File]: reference pixel size 8 Å differs from the tilt-series pixel size "
            "2 Å (factor 4); the reference must be at bin 1: rescale it to 2 Å/px (a box 4 times larger)"]


@case("mask of another box")
def _(root):
    edit_map(root / "ref" / "mask.mrc", edit=lambda d: d[8:56, 8:56, 8:56])
    return ["optimisation_set.star [rlnTomoReferenceMaskFile]: mask box 48 px differs from the reference box 64 px; "
            "give a mask made for these half maps"]


@case("FSC file without its table", args=[*REFINE, "--fsc", "postprocess.star"])
def _(root):
    shutil.copy(root / "tomograms.star", root / "postprocess.star")
    return ["postprocess.star [data_fsc]: no data_fsc table; give RELION's postprocess.star (it holds data_fsc)"]


@case("FSC with text in a number column", args=[*REFINE, "--fsc", "postprocess.star"])
def _(root):
    (root / "postprocess.star").write_text(
        "data_fsc\n\nloop_\n_rlnSpectralIndex #1\n_rlnFourierShellCorrelationCorrected #2\n0 1.000\n1 0.998\n2 n/a\n")
    return ["postprocess.star [rlnFourierShellCorrelationCorrected]: data_fsc has a non-numeric value in "
            "rlnFourierShellCorrelationCorrected (row 3: 'n/a'); give RELION's postprocess.star of the reference"]


@case("box larger than the tilt images", flags=["--b", "320", "--do_defocus", "--j", "1"])
def _(root):
    return ["command line [--b]: refinement box 320 px is larger than the tilt images of TS_01 (256 x 256 px); "
            "give a box of at most 256 px (--b)"]


@case("odd box", flags=["--b", "95", "--do_defocus"])
def _(root):
    return ["--b: the box size must be an even number of pixels, at least 16, got 95; use an even box such as 128, 256 or 512"]


@case("reversed defocus scan", flags=[*QUICK, "--d0", "2000", "--d1", "-2000"])
def _(root):
    return ["--d0/--d1: the defocus scan is empty: 2000 Å is not below -2000 Å; scan a range such as -3000 to 3000 Å"]


@case("both scale modes", flags=[*QUICK, "--per_frame_scale", "--per_tomo_scale"])
def _(root):
    return ["--per_frame_scale/--per_tomogram_scale: the per-frame and per-tomogram scale models exclude each other; "
            "choose one of them"]


@case("misspelt flag", flags=[*QUICK, "--do_defocuss"])
def _(root):
    return ["tomoctfrefine refine: unknown flag(s) --do_defocuss; see 'tomoctfrefine refine --help'"]


@case("output folder cannot be created", args=["--i", "optimisation_set.star", "--o", "particles.star/out"])
def _(root):
    return ["particles.star/out: the output folder is not writable (Not a directory); choose a writable output folder with --o"]


@case("output folder is the input folder, absolute", args=["--i", "optimisation_set.star", "--o", "{root}"])
def _(root):
    return [f"{root}: the outputs would overwrite input files ({root}/optimisation_set.star, {root}/particles.star, "
            f"{root}/tomograms.star and 1 more); give an output folder that holds none of the inputs, e.g. a new job folder, with --o"]


def make_project(fixture: Path, root: Path) -> Path:
    """A writable copy of the RELION-5 fixture's inputs (``fixture``) at ``root``."""
    shutil.copytree(fixture, root, ignore=shutil.ignore_patterns("runs", "truth", "map_true.mrc", "README.md"))
    for path in root.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return root


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, relion5_small) -> dict:
    """Break one copy per case, then run every case's console command concurrently."""
    prepared = {}
    for index, (name, (setup, command, arguments)) in enumerate(CASES.items()):
        root = make_project(relion5_small, tmp_path_factory.mktemp(f"case{index}") / "project")
        messages = setup(root)
        arguments = [a.replace("{root}", str(root)) for a in arguments]
        prepared[name] = (root, messages, command, arguments, (root / "optimisation_set.star").read_bytes())
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = {name: pool.submit(run_console, root, command, *arguments) for name, (root, _, command, arguments, _) in prepared.items()}
        return {name: (prepared[name][0], prepared[name][1], future.result(), prepared[name][4]) for name, future in futures.items()}


def test_at_least_25_cli_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_cli_refuses_with_one_exact_line(cli_results, name):
    root, messages, result, optimisation_set = cli_results[name]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [f"error: {m}" for m in messages]
    assert not (root / "out" / "optimisation_set.star").exists()
    assert not (root / "out" / "summary.json").exists() and not (root / "summary.json").exists()
    assert (root / "optimisation_set.star").read_bytes() == optimisation_set


def test_cli_check_prints_the_problem_count(cli_results):
    assert cli_results["non-numeric half set (check)"][2].stdout.endswith("\n1 problem found\n")


def test_cli_half_map_that_is_not_mrc(project):
    (project / "ref" / "half1.mrc").write_text("this is a text file, not a map\n" * 100)
    result = run_console(project, "refine", *REFINE, *QUICK)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith("error: ref/half1.mrc [rlnTomoReferenceMap1File]: not a readable MRC file (")
    assert line.endswith("); check the file is a complete MRC file")
    assert not (project / "out" / "optimisation_set.star").exists()


# ------------------------------------------------------------------------------------ Python API


def api_problems(root: Path, options: pipeline.RefineOptions, out_name="out", **overrides) -> list[str]:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with pytest.raises(InputError) as caught:
            pipeline.run_refinement(read_optimisation_set("optimisation_set.star", **overrides), options, out_name)
    finally:
        os.chdir(cwd)
    out = root / out_name
    assert not (out / "summary.json").exists()
    assert out.resolve() == root.resolve() or not (out / "optimisation_set.star").exists()
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize("changes, message", [
    (dict(scale_mode="per_tomo"),
     "RefineOptions [scale_mode]: the scale model must be one of per_frame, per_tomogram, global, got 'per_tomo'; "
     "use per_frame, per_tomogram or global"),
    (dict(do_defocus=True, defocus_scan_min_angstrom=1000.0, defocus_scan_max_angstrom=1000.0),
     "RefineOptions [defocus_scan_min_angstrom/defocus_scan_max_angstrom]: the defocus scan is empty: 1000 Å is not "
     "below 1000 Å; scan a range such as -3000 to 3000 Å"),
    (dict(do_even_aberrations=True, even_order=5), "RefineOptions [even_order]: the even aberration order must be one of 2, 4, 6, 8, got 5; use 4"),
    (dict(threads=0), "RefineOptions [threads]: the thread count must be at least 1, got 0; use 1 or more"),
    (dict(regularise_defocus=True, regularisation_lambda=float("nan")),
     "RefineOptions [regularisation_lambda]: the regularisation strength must be a finite number, got nan; use e.g. 0.1"),
    (dict(box_size_px=65),
     "RefineOptions [box_size_px]: the box size must be an even number of pixels, at least 16, got 65; use an even box "
     "such as 128, 256 or 512"),
])
def test_api_refuses_bad_options(project, changes, message):
    options = pipeline.RefineOptions(**{"box_size_px": 64, "do_defocus": True, "threads": 1, **changes})
    assert api_problems(project, options) == [message]


def test_api_names_the_overridden_path(project):
    options = pipeline.RefineOptions(box_size_px=64, do_defocus=True, threads=1)
    assert api_problems(project, options, mask="ref/missing_mask.mrc") == [
        f"command line [rlnTomoReferenceMaskFile]: reference mask not found: ref/missing_mask.mrc; {PATH_FIX}"]


def test_api_output_folder_is_the_input_folder(project):
    options = pipeline.RefineOptions(box_size_px=64, do_defocus=True, threads=1)
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    assert api_problems(project, options, out_name="tilt_series/..") == [
        f"tilt_series/..: the outputs would overwrite input files ({project}/optimisation_set.star, {project}/particles.star, "
        f"{project}/tomograms.star and 1 more); give an output folder that holds none of the inputs, e.g. a new job folder, with --o"]
    assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file()} == before


def test_api_step_without_prepare(tmp_path):
    with pytest.raises(InputError) as caught:
        pipeline.refine_defocus(tmp_path)
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path}: no prepared refinement in this folder; run the prepare step (tomoctfrefine refine) first"]


# ---------------------------------------------------------------------------- Scipion protocol


def test_scipion_protocol_validate_reports_engine_problems(project):
    """Two broken optimisation sets through ProtTomoCtfRefine._validate, in a child process with the
    headless Scipion environment of tests/scipion/conftest.py (pyworkflow must not be imported here)."""
    second = project.parent / "second"
    shutil.copytree(project, second)
    edit_map(project / "ref" / "mask.mrc", edit=lambda d: d[8:56, 8:56, 8:56])
    edit_star(second / "particles.star", "particles", lambda t: t.iloc[:0])
    script = textwrap.dedent(f"""
        import os, runpy
        runpy.run_path({str(CONFTEST)!r})
        from tomoctfrefine.protocols import ProtTomoCtfRefine
        for folder in ({str(project)!r}, {str(second)!r}):
            os.chdir(folder)
            protocol = ProtTomoCtfRefine(inputFrom=1, optimisationSet="optimisation_set.star", boxSize=128, refineDefocus=True)
            print(repr(protocol._validate()))
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    first, other = [eval(line) for line in result.stdout.splitlines()[-2:]]  # noqa: S307 - our own repr output
    assert first == ["optimisation_set.star [rlnTomoReferenceMaskFile]: mask box 48 px differs from the reference box 64 px; "
                     "give a mask made for these half maps"]
    assert other == ["particles.star [data_particles]: data_particles has no particles; "
                     "give the particles of the refinement (a RELION particles.star with rows)"]
