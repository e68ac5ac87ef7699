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


def test_resume_with_other_settings_is_refused(dataset, serial_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(serial_run, out)
    result = refine_cli("--i", "optimisation_set.star", "--o", str(out), *TUTORIAL_FLAGS[:-2], "--j", "1", "--b", "96",
                        "--only_do_unfinished", cwd=dataset)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("--only_do_unfinished: this folder holds a run with other inputs or settings; "
                                          "resume with the same inputs and flags, or use a new --o")


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
    assert "the output folder holds input files that the outputs would overwrite; choose another output folder with --o" in result.stderr
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
