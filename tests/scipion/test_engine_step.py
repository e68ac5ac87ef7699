"""protocols/engine_step.py, the process each engine step of the protocol runs in.

* It runs exactly the engine's steps (``pipeline.STEPS``).
* ``note.txt`` holds a ``tomoctfrefine refine`` command that gives back the run's options exactly.
* Failures end as the CLI's do: the same ``error:`` lines and exit code for an input problem; under
  ``mpirun`` a rank that fails stops the whole job at once with its message, in any step (real MPI
  processes; the share by particle count gives TS_01 to rank 0 and TS_02 to rank 1).
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tomoctfrefine import pipeline
from tomoctfrefine.cli import build_parser
from tomoctfrefine.cli.refine import check_flags, options_from_args
from tomoctfrefine.io.star import read_star, write_star
from tomoctfrefine.simulate import SimulationParameters, simulate_dataset

ROOT = Path(__file__).resolve().parents[2]
ENGINE_STEP = ROOT / "protocols" / "engine_step.py"
BIN = Path(sys.executable).parent


def _load_script(path: Path):
    """engine_step.py as the protocol runs it: a script, not through the package (which imports Scipion)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("engine_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


engine_step = _load_script(ENGINE_STEP)

OPTIONS = dict(box_size_px=64, do_defocus=True, do_scale=True, scale_mode="per_frame", threads=1)


def test_steps_are_the_engines():
    assert engine_step.STEPS == pipeline.STEPS


def _parsed(command: str) -> pipeline.RefineOptions:
    words = shlex.split(command)
    if words[0] == "mpirun":
        words = words[3:]
    assert words[:2] == ["tomoctfrefine", "refine"]
    args = build_parser().parse_args(words[1:])
    assert check_flags(args) == []
    return options_from_args(args)


def _valid(options: dict) -> dict:
    """The option values made consistent (resetting to the common CTF needs a regularised defocus fit)."""
    if not (options["do_defocus"] and options["regularise_defocus"]):
        options["reset_to_common"] = False
    return options


OPTION_STRATEGIES = dict(
    box_size_px=st.integers(8, 512).map(lambda n: 2 * n), do_defocus=st.booleans(),
    defocus_scan_min_angstrom=st.floats(-9000, -1, allow_nan=False), defocus_scan_max_angstrom=st.floats(1, 9000, allow_nan=False),
    defocus_scan_steps=st.integers(2, 400), regularise_defocus=st.booleans(),
    regularisation_lambda=st.sampled_from([0.001, 0.1, 0.0, 2.5]), regularise_astigmatism_only=st.booleans(),
    reset_to_common=st.booleans(), kmin_angstrom=st.sampled_from([30.0, 20.0, 45.5]), do_scale=st.booleans(),
    scale_mode=st.sampled_from(["per_frame", "per_tomogram", "global"]), model_neighbours=st.booleans(),
    do_even_aberrations=st.booleans(), even_order=st.sampled_from([2, 4, 6, 8]), do_odd_aberrations=st.booleans(),
    odd_order=st.sampled_from([1, 3, 5, 7]), freq_cutoff_angstrom=st.sampled_from([-1.0, 8.5]),
    fsc_threshold_width_px=st.sampled_from([5.0, 3.0]), use_snr_weight=st.booleans(), per_frame_noise=st.booleans(),
    min_frame=st.sampled_from([0, 2]), max_frame=st.sampled_from([-1, 9]), cutoff_fraction=st.sampled_from([0.02, 0.05]),
    threads=st.integers(1, 64), only_do_unfinished=st.booleans(), diagnostics=st.booleans(), assess=st.booleans(),
    check_hand=st.booleans(), adopt_hand=st.booleans(),
)
OPTION_VALUES = st.fixed_dictionaries(OPTION_STRATEGIES).map(_valid)


def test_the_generated_options_cover_every_field():
    """A field added to RefineOptions must be added to OPTION_VALUES (and so to the round trip below)."""
    assert set(OPTION_STRATEGIES) == {f.name for f in dataclasses.fields(pipeline.RefineOptions)}


@settings(max_examples=200, deadline=None)
@given(values=OPTION_VALUES, ranks=st.integers(1, 8))
def test_command_line_gives_back_the_options(values, ranks):
    """tomoctfrefine refine, given note.txt's flags, runs the options the protocol ran (every field)."""
    options = pipeline.RefineOptions(**values)
    command = engine_step.command_line(options, "Runs/000002_Prot/extra/input/optimisation_set.star",
                                       "Runs/000002_Prot/extra", ranks)
    assert command.startswith(f"mpirun -np {ranks} tomoctfrefine refine" if ranks > 1 else "tomoctfrefine refine")
    parsed = _parsed(command)
    assert parsed == options
    args = build_parser().parse_args(shlex.split(command)[(3 if ranks > 1 else 0) + 1:])
    assert (args.i, args.o) == ("Runs/000002_Prot/extra/input/optimisation_set.star", "Runs/000002_Prot/extra")


def test_command_line_of_the_tutorial_settings():
    options = pipeline.RefineOptions(box_size_px=512, do_defocus=True, regularise_defocus=True, regularisation_lambda=0.1,
                                     do_scale=True, scale_mode="per_frame", threads=12)
    assert engine_step.command_line(options, "in dir/opt.star", "out") == (
        "tomoctfrefine refine --i 'in dir/opt.star' --o out --b 512 --do_defocus --d0 -3000 --d1 3000 --do_reg_defocus "
        "--lambda 0.1 --do_scale --per_frame_scale --j 12")


# ------------------------------------------------------------------------------------ real processes
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("engine_step") / "data"
    simulate_dataset(folder, SimulationParameters(n_tomograms=2, n_tilts=9, particles_per_tomogram=12, seed=5))
    return folder


def _copy(dataset: Path, tmp_path: Path, **option_changes) -> Path:
    root = tmp_path / "data"
    shutil.copytree(dataset, root, ignore=shutil.ignore_patterns("truth"))
    (root / "options.json").write_text(json.dumps(dict(OPTIONS, **option_changes)))
    return root


def _engine(root: Path, step: str, ranks: int = 1, timeout_s: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    """Run engine_step.py as the protocol does (under mpirun for ranks > 1), from the data folder."""
    command = [sys.executable, str(ENGINE_STEP), step, "out"]
    if step == "prepare":
        command += ["--optimisation-set", "optimisation_set.star", "--options", "options.json"]
    if ranks > 1:
        mpirun = BIN / "mpirun"
        if not mpirun.exists():
            pytest.fail("mpirun is missing: install the 'mpich' wheel (pip install -e .[all])")
        command = [str(mpirun), "-np", str(ranks)] + command
    started = time.monotonic()
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout_s)
    return result, time.monotonic() - started


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_input_problem_ends_as_the_cli_does(dataset, tmp_path):
    """A box larger than the tilt images: the same error lines and exit code 2 as tomoctfrefine refine."""
    root = _copy(dataset, tmp_path, box_size_px=400)
    result, _ = _engine(root, "prepare")
    cli = subprocess.run([str(BIN / "tomoctfrefine"), "refine", "--i", "optimisation_set.star", "--o", "out_cli",
                          "--b", "400", "--do_defocus", "--j", "1"], cwd=root, capture_output=True, text=True, timeout=90)
    assert result.returncode == cli.returncode == 2
    assert "Traceback" not in result.stderr
    assert _errors(result) == _errors(cli) != []
    assert any("refinement box 400 px is larger than the tilt images" in line for line in _errors(result))


def test_steps_in_order_write_note_and_outputs(dataset, tmp_path):
    """prepare, refine_defocus, refine_scale, write_outputs one process each: the run's files, and
    note.txt with a command that gives back the options."""
    root = _copy(dataset, tmp_path)
    options = engine_step.refine_options(OPTIONS)
    assert pipeline.plan(options) == ["prepare", "refine_defocus", "refine_scale", "write_outputs"]
    for step in pipeline.plan(options):
        result, _ = _engine(root, step)
        assert result.returncode == 0, result.stderr
    note = (root / "out" / "note.txt").read_text().strip()
    assert note == engine_step.command_line(options, "optimisation_set.star", "out")
    assert _parsed(note) == options
    assert (root / "out" / "optimisation_set.star").exists() and (root / "out" / "tilt_series" / "TS_02.star").exists()


def test_mpi_input_problem_on_one_rank_stops_the_job(dataset, tmp_path):
    """Three particles of TS_02 are in a second optics group: rank 1 finds it while preparing its share
    (rank 0 then waits at a barrier); the job stops with rank 1's message and the CLI's exit code 2."""
    root = _copy(dataset, tmp_path)
    doc = read_star(root / "particles.star")
    second = doc.blocks["optics"].copy()
    second["rlnOpticsGroup"], second["rlnOpticsGroupName"] = 2, "optics2"
    doc.blocks["optics"] = pd.concat([doc.blocks["optics"], second], ignore_index=True)
    particles = doc.blocks["particles"]
    particles.loc[particles.index[particles["rlnTomoName"] == "TS_02"][:3], "rlnOpticsGroup"] = 2
    write_star(doc, root / "particles.star")
    result, seconds = _engine(root, "prepare", ranks=2)
    assert seconds < 45
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert _errors(result) == [
        f"error: rank 1: {root / 'particles.star'} [rlnOpticsGroup]: the particles of tomogram TS_02 belong to several "
        "optics groups [1, 2]; give each tomogram's particles one optics group"]


def test_mpi_failure_in_a_later_step_stops_the_job(dataset, tmp_path):
    """After a good prepare, rank 1 cannot write TS_02's defocus (a folder stands where the file goes, as a
    full or read-only disk would refuse it): refine_defocus stops at once with rank 1's message."""
    root = _copy(dataset, tmp_path)
    result, _ = _engine(root, "prepare", ranks=2)
    assert result.returncode == 0, result.stderr
    from tomoctfrefine.pipeline.workspace import STEP_FOLDERS

    folder = f"out/temp/{STEP_FOLDERS['refine_defocus']}"
    (root / folder / "TS_02.npz").mkdir(parents=True)
    result, seconds = _engine(root, "refine_defocus", ranks=2)
    assert seconds < 45
    assert result.returncode != 0
    errors = _errors(result)
    assert len(errors) == 1 and errors[0].startswith("error: rank 1 failed: IsADirectoryError: "), result.stderr
    assert f"{folder}/TS_02.npz" in errors[0] and "Traceback" not in result.stderr
    assert (root / "out" / "note.txt").read_text().startswith("mpirun -np 2 tomoctfrefine refine --i optimisation_set.star")
