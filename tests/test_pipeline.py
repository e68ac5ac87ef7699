"""The refinement end to end: recovered values against the simulator's truth, RELION's output layout,
the Python API's separate steps, kill-and-resume, and ``mpirun -np 2`` equal to the serial run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tomoctfrefine import pipeline
from tomoctfrefine.io.optimisation_set import read_optimisation_set
from tomoctfrefine.io.star import read_star
from tomoctfrefine.io.tomograms import read_tomogram_set, tomogram, tomogram_names
from tomoctfrefine.simulate import SimulationParameters, load_truth, simulate_dataset

BIN = Path(sys.executable).parent
TUTORIAL_FLAGS = ["--b", "128", "--do_defocus", "--do_reg_defocus", "--lambda", "0.1", "--do_scale", "--per_frame_scale", "--j", "1"]


def same_outputs(ours: Path, reference: Path) -> None:
    """The RELION files of two runs are identical (up to the output folder's own path)."""
    for name in ("tomograms.star", "tilt_series/TS_01.star", "tilt_series/TS_02.star"):
        text = (ours / name).read_text().replace(str(ours.resolve()), "OUT")
        assert text == (reference / name).read_text().replace(str(reference.resolve()), "OUT"), name


def refine_cli(*arguments, cwd=None, launcher=(), **kwargs):
    command = [*launcher, str(BIN / "tomoctfrefine"), "refine", *arguments]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, **kwargs)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two small tomograms with known truth (simulated once for the module)."""
    folder = tmp_path_factory.mktemp("sim") / "data"
    simulate_dataset(folder, SimulationParameters(n_tomograms=2, n_tilts=11, particles_per_tomogram=20, seed=3))
    return folder


@pytest.fixture(scope="module")
def serial_run(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "out"
    result = refine_cli("--i", "optimisation_set.star", "--o", str(out), *TUTORIAL_FLAGS, cwd=dataset)
    assert result.returncode == 0, result.stderr
    return out


def mean_defocus_errors(truth: dict, tomograms_star: Path):
    tset = read_tomogram_set(Path(tomograms_star).resolve())
    errors, sigmas = [], []
    for name in tomogram_names(tset):
        t = tomogram(tset, name)
        true = truth["tomograms"][name]
        mean_true = np.array([(x["dfu"] + x["dfv"]) / 2 for x in true])
        errors.append((t.defocus_u_angstrom + t.defocus_v_angstrom) / 2 - mean_true)
    return np.concatenate(errors)


def test_one_pass_recovers_defocus_and_scale(dataset, serial_run, monkeypatch):
    monkeypatch.chdir(dataset)  # paths in the outputs are relative to where the run was started (RELION's rule)
    truth = load_truth(dataset)
    errors = mean_defocus_errors(truth, serial_run / "tomograms.star")
    start = mean_defocus_errors(truth, dataset / "tomograms.star")
    summary = json.loads((serial_run / "summary.json").read_text())
    sigma = np.concatenate([t["defocus_uncertainty_angstrom"] for t in summary["tomograms"].values()])
    assert np.sqrt(np.mean(start**2)) > 800
    # the error is of the size the Fisher information predicts, far below the 900 Å start
    assert np.sqrt(np.mean(errors**2)) < 2.0 * np.sqrt(np.mean(sigma**2)) + 10
    assert abs(errors.mean()) < 3 * np.sqrt(np.mean(sigma**2) / len(sigma)) + 10
    tset = read_tomogram_set(serial_run / "tomograms.star")
    refined = np.concatenate([tomogram(tset, n).ctf_scale for n in tomogram_names(tset)])
    true_scale = np.concatenate([[x["scale"] for x in truth["tomograms"][n]] for n in tomogram_names(tset)])
    # box-independent scale: the truth itself (within a few %), not sqrt(box) x truth as RELION writes
    assert np.all(np.abs(refined / true_scale - 1) < 0.08)
    for entry in summary["tomograms"].values():
        assert entry["hand"]["log_likelihood_gain"] > 0


def test_outputs_have_relions_layout(dataset, serial_run, monkeypatch):
    monkeypatch.chdir(dataset)
    files = sorted(str(p.relative_to(serial_run)) for p in serial_run.rglob("*") if p.is_file() and "temp" not in p.parts)
    for expected in ("optimisation_set.star", "tomograms.star", "tilt_series/TS_01.star", "tilt_series/TS_02.star",
                     "logfile.pdf", "note.txt", "summary.json", "plots/defocus_TS_01.png", "plots/scale_TS_02.png"):
        assert expected in files
    assert "particles.star" not in files  # written only when aberrations are refined, as RELION does
    text = (serial_run / "tilt_series" / "TS_01.star").read_text()
    assert text.startswith("\n# version 50001\n") or text.startswith("# version 50001\n")
    before = read_star(dataset / "tilt_series" / "TS_01.star").blocks["TS_01"]
    after = read_star(serial_run / "tilt_series" / "TS_01.star").blocks["TS_01"]
    assert list(after.columns) == list(before.columns)
    unchanged = [c for c in before.columns if c not in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfScalefactor")]
    assert after[unchanged].equals(before[unchanged])
    opt = read_optimisation_set(serial_run / "optimisation_set.star")
    assert Path(opt.resolved("tomograms_path")).resolve() == (serial_run / "tomograms.star").resolve()
    assert Path(opt.resolved("particles_path")).resolve() == (dataset / "particles.star").resolve()
    tomograms = read_star(serial_run / "tomograms.star").blocks["global"]
    assert [Path(p).resolve() for p in tomograms["rlnTomoTiltSeriesStarFile"]] == [
        (serial_run / "tilt_series" / f"TS_0{i}.star").resolve() for i in (1, 2)]


def test_python_api_steps_equal_the_cli(dataset, serial_run, tmp_path):
    options = pipeline.RefineOptions(box_size_px=128, do_defocus=True, regularise_defocus=True, regularisation_lambda=0.1,
                                     do_scale=True, scale_mode="per_frame", threads=1)
    cwd = os.getcwd()
    os.chdir(dataset)
    try:
        pipeline.prepare(read_optimisation_set("optimisation_set.star"), options, tmp_path / "out")
        pipeline.refine_defocus(tmp_path / "out")
        pipeline.refine_scale(tmp_path / "out")
        pipeline.write_outputs(tmp_path / "out")
    finally:
        os.chdir(cwd)
    for name in ("TS_01", "TS_02"):
        assert (tmp_path / "out" / "tilt_series" / f"{name}.star").read_text() == (serial_run / "tilt_series" / f"{name}.star").read_text()


@pytest.mark.parametrize("moment", ["statistics/TS_01.npz", "statistics/TS_02.npz", "defocus/TS_01.npz", 0.3, 1.5])
def test_killed_and_resumed_equals_uninterrupted(dataset, serial_run, tmp_path, moment):
    out = tmp_path / "out"
    process = subprocess.Popen([str(BIN / "tomoctfrefine"), "refine", "--i", "optimisation_set.star", "--o", str(out), *TUTORIAL_FLAGS],
                               cwd=dataset, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    if isinstance(moment, str):
        while not (out / "temp" / moment).exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
    else:
        time.sleep(moment)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists() or process.returncode == 0
    result = refine_cli("--i", "optimisation_set.star", "--o", str(out), *TUTORIAL_FLAGS, "--only_do_unfinished", cwd=dataset)
    assert result.returncode == 0, result.stderr
    same_outputs(out, serial_run)


def test_resume_with_other_settings_redoes_what_they_change(dataset, serial_run, tmp_path):
    """A resumed run is the run the user asked for: --lambda changed, the statistics are kept, the defocus and the
    steps after it are redone, and the result equals a fresh run with the new --lambda."""
    flags = [f if f != "0.1" else "0.3" for f in TUTORIAL_FLAGS]
    fresh = tmp_path / "fresh"
    assert refine_cli("--i", "optimisation_set.star", "--o", str(fresh), *flags, cwd=dataset).returncode == 0
    out = tmp_path / "out"
    shutil.copytree(serial_run, out)
    statistics = (out / "temp" / "statistics" / "TS_01.npz").stat().st_mtime_ns
    result = refine_cli("--i", "optimisation_set.star", "--o", str(out), *flags, "--only_do_unfinished", cwd=dataset)
    assert result.returncode == 0, result.stderr
    assert "--only_do_unfinished: --lambda 0.1 -> 0.3 since the earlier run: its results from the defocus step on are redone" in result.stdout
    assert (out / "temp" / "statistics" / "TS_01.npz").stat().st_mtime_ns == statistics
    same_outputs(out, fresh)
    assert "--lambda 0.3" in (out / "note.txt").read_text()


def test_resume_after_the_inputs_changed_starts_again(dataset, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(dataset, data)
    assert refine_cli("--i", "optimisation_set.star", "--o", str(out), *TUTORIAL_FLAGS, cwd=data).returncode == 0
    star = data / "tilt_series" / "TS_02.star"
    star.write_text(star.read_text().replace(" 1.000000 ", " 0.900000 "))
    result = refine_cli("--i", "optimisation_set.star", "--o", str(out), *TUTORIAL_FLAGS, "--only_do_unfinished", cwd=data)
    assert result.returncode == 0, result.stderr
    assert ("--only_do_unfinished: the input files' contents since the earlier run: its results from the statistics "
            "step on are redone") in result.stdout
    assert "prepare: TS_01 (1/2" in result.stdout  # redone, not skipped
    assert "ended without finishing" not in result.stdout


def test_a_second_run_on_a_busy_folder_is_refused(dataset, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([str(BIN / "tomoctfrefine"), "refine", "--i", "optimisation_set.star", "--o", str(out), *TUTORIAL_FLAGS],
                             cwd=dataset, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "temp" / "run.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    second = refine_cli("--i", "optimisation_set.star", "--o", str(out), *TUTORIAL_FLAGS, cwd=dataset)
    first.send_signal(signal.SIGTERM)
    _, first_err = first.communicate(timeout=60)
    assert second.returncode == 2
    assert f"error: {out}: another tomoctfrefine run is writing to this folder (pid {first.pid} on " in second.stderr
    assert first.returncode == 143
    assert first_err.strip().splitlines()[-1] == "terminated (SIGTERM): finished tomograms are kept; rerun with --only_do_unfinished to resume"
    assert "Traceback" not in first_err + second.stderr
    # the lock of a dead run is taken over
    third = refine_cli("--i", "optimisation_set.star", "--o", str(out), *TUTORIAL_FLAGS, "--only_do_unfinished", cwd=dataset)
    assert third.returncode == 0, third.stderr


def test_mpirun_two_ranks_equals_serial(dataset, serial_run, tmp_path):
    mpirun = BIN / "mpirun"
    if not mpirun.exists():
        pytest.fail("mpirun is missing: install the 'mpich' wheel (pip install -e .[all])")
    out = tmp_path / "out"
    result = refine_cli("--i", "optimisation_set.star", "--o", str(out), *TUTORIAL_FLAGS, cwd=dataset,
                        launcher=(str(mpirun), "-np", "2"), timeout=300)
    assert result.returncode == 0, result.stderr
    log = (out / "run.log").read_text()
    assert "on rank 0" in log and "on rank 1" in log
    same_outputs(out, serial_run)


def test_output_folder_equal_to_input_folder_is_refused(dataset):
    result = refine_cli("--i", "optimisation_set.star", "--o", ".", *TUTORIAL_FLAGS, cwd=dataset)
    assert result.returncode == 2
    assert result.stderr.startswith("error: .: the outputs would overwrite input files (")
    assert result.stderr.rstrip().endswith("; give an output folder that holds none of the inputs, e.g. a new job folder, with --o")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_refining_the_relion_fixture_writes_what_relion_wrote(tmp_path, relion5_small):
    """Same files and columns as RELION 5.0.1's run (a) of the fixture (defocus, scale, aberrations)."""
    out = tmp_path / "out"
    result = refine_cli("--i", "optimisation_set.star", "--o", str(out), "--b", "128", "--do_defocus", "--do_reg_defocus",
                        "--lambda", "0.1", "--do_scale", "--per_frame_scale", "--do_odd_aberrations", "--no", "3",
                        "--do_even_aberrations", "--ne", "4", "--j", "2", cwd=relion5_small)
    assert result.returncode == 0, result.stderr
    relion = relion5_small / "runs" / "defocus_scale_aberr"
    for name in ("optimisation_set.star", "tomograms.star", "tilt_series/TS_01.star", "particles.star",
                 "group_1_even_phase_per-pixel.mrc", "group_1_even_phase_nonlinear-fit.mrc",
                 "group_1_odd_phase_per-pixel.mrc", "group_1_odd_phase_nonlinear-fit.mrc"):
        assert (out / name).exists(), name
    ours, theirs = read_star(out / "tilt_series" / "TS_01.star"), read_star(relion / "tilt_series" / "TS_01.star")
    assert list(ours.blocks["TS_01"].columns) == list(theirs.blocks["TS_01"].columns)
    ours_p, theirs_p = read_star(out / "particles.star"), read_star(relion / "particles.star")
    assert list(ours_p.blocks) == list(theirs_p.blocks)
    assert set(theirs_p.blocks["optics"].columns) <= set(ours_p.blocks["optics"].columns)
    even = ours_p.blocks["optics"]["rlnEvenZernike"].iloc[0]
    assert even.startswith("[") and len(even.strip("[]").split(",")) == 9


@pytest.mark.parametrize("flags, steps", [
    (dict(do_defocus=True), ["prepare", "refine_defocus", "write_outputs"]),
    (dict(do_scale=True, check_hand=False), ["prepare", "refine_scale", "write_outputs"]),
    (dict(do_scale=True), ["prepare", "refine_defocus", "refine_scale", "write_outputs"]),
    (dict(do_defocus=True, do_scale=True, do_even_aberrations=True, assess=True),
     ["prepare", "refine_defocus", "refine_aberrations", "refine_scale", "write_outputs", "assess_refinement"]),
    (dict(do_odd_aberrations=True, check_hand=False), ["prepare", "refine_aberrations", "write_outputs"]),
])
def test_plan_orders_the_steps_once(flags, steps):
    """The hand check runs in the defocus step even without --do_defocus; the scale is fitted once, last."""
    assert pipeline.plan(pipeline.RefineOptions(box_size_px=64, **flags)) == steps
