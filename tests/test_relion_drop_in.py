"""tomoctfrefine as a drop-in for relion_tomo_refine_ctf: RELION's flags do what RELION's help says (each test
fails if its flag is ignored), and RELION's pipeliner runs us through the launchers of ``relion-shims``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from tomoctfrefine.io.star import read_star, write_star
from tomoctfrefine.io.tomograms import read_tomogram_set, tomogram
from tomoctfrefine.simulate import SimulationParameters, load_truth, simulate_dataset
from tomoctfrefine.statistics import TiltStatistics

BIN = Path(sys.executable).parent
SMALL = SimulationParameters(n_tilts=9, particles_per_tomogram=12, image_size_px=256, seed=4)
QUICK = ["--b", "128", "--j", "1"]


def refine(*arguments, cwd, program=None, launcher=(), timeout=300):
    command = [*launcher, *([str(program)] if program else [str(BIN / "tomoctfrefine"), "refine"]), *arguments]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dropin") / "data"
    simulate_dataset(folder, SMALL)
    return folder


def true_mean_defocus(data: Path) -> np.ndarray:
    return np.array([(t["dfu"] + t["dfv"]) / 2 for t in load_truth(data)["tomograms"]["TS_01"]])


def written_mean_defocus(out: Path) -> np.ndarray:
    tomo = tomogram(read_tomogram_set(out / "tomograms.star"), "TS_01", image_size=(256, 256))
    return (tomo.defocus_u_angstrom + tomo.defocus_v_angstrom) / 2


# ------------------------------------------------------------------------------ flags


def test_diag_writes_relions_diagnostic_files(dataset, tmp_path):
    out = tmp_path / "out"
    result = refine("--i", "optimisation_set.star", "--o", str(out), *QUICK, "--do_defocus", "--do_scale",
                    "--per_frame_scale", "--ds", "21", "--diag", cwd=dataset)
    assert result.returncode == 0, result.stderr
    with mrcfile.open(out / "temp" / "defocus" / "TS_01_dataTerm.mrc") as mrc:
        assert mrc.data.shape == (SMALL.n_tilts, 21)  # RELION's fc x ds image of the scan's cost
        cost = mrc.data
    assert np.all(np.isfinite(cost)) and np.ptp(cost, axis=1).min() > 0
    raw = np.loadtxt(out / "temp" / "scale" / "TS_01_raw_scale.dat")
    fitted = np.loadtxt(out / "temp" / "scale" / "TS_01_fitted_scale.dat")
    summary = json.loads((out / "summary.json").read_text())["tomograms"]["TS_01"]
    np.testing.assert_allclose(raw[:, 1], summary["scale_per_tilt"], rtol=1e-5)
    np.testing.assert_allclose(fitted[:, 1], summary["scale_after"], rtol=1e-5)
    without = tmp_path / "without"
    assert refine("--i", "optimisation_set.star", "--o", str(without), *QUICK, "--do_defocus", "--ds", "21",
                  cwd=dataset).returncode == 0
    assert not list((without / "temp").rglob("*_dataTerm.mrc"))


def test_reset_to_common_starts_every_tilt_from_the_lowest_dose_tilt(dataset, tmp_path):
    """All tilts but the lowest-dose one start 15000 Å off, far outside a ±1200 Å scan: only a scan around the
    lowest-dose tilt's CTF (RELION's --reset_to_common) reaches their true defocus."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    star = data / "tilt_series" / "TS_01.star"
    doc = read_star(star)
    table = doc.blocks["TS_01"]
    truth = load_truth(data)["tomograms"]["TS_01"]
    lowest = int(np.argmin(table["rlnMicrographPreExposure"].astype(float)))
    offset = np.where(np.arange(len(table)) == lowest, 0.0, 15000.0)
    table["rlnDefocusU"] = [t["dfu"] + o for t, o in zip(truth, offset)]
    table["rlnDefocusV"] = [t["dfv"] + o for t, o in zip(truth, offset)]
    table["rlnDefocusAngle"] = [t["dfang"] for t in truth]
    write_star(doc, star)
    flags = [*QUICK, "--do_defocus", "--d0", "-1200", "--d1", "1200", "--do_reg_defocus", "--lambda", "0.1"]
    errors = {}
    for label, extra in (("reset", ["--reset_to_common"]), ("input", [])):
        out = tmp_path / label
        result = refine("--i", "optimisation_set.star", "--o", str(out), *flags, *extra, cwd=data)
        assert result.returncode == 0, result.stderr
        errors[label] = written_mean_defocus(out) - true_mean_defocus(data)
    assert np.sqrt(np.mean(errors["reset"] ** 2)) < 150
    assert np.sqrt(np.mean(np.delete(errors["input"], lowest) ** 2)) > 1000


def test_do_reg_defocus_pulls_the_mean_defocus_as_relion_and_reg_astigmatism_only_does_not(dataset, tmp_path):
    """RELION's --do_reg_defocus pulls every tilt's defocus towards the tomogram's common value; with
    --reg_astigmatism_only each tilt keeps its own mean defocus (the truth varies by 300 Å between tilts)."""
    spread = {}
    for label, extra in (("relion", []), ("astigmatism", ["--reg_astigmatism_only"])):
        out = tmp_path / label
        result = refine("--i", "optimisation_set.star", "--o", str(out), *QUICK, "--do_defocus", "--do_reg_defocus",
                        "--lambda", "100", *extra, cwd=dataset)
        assert result.returncode == 0, result.stderr
        spread[label] = np.std(written_mean_defocus(out))
    true_spread = np.std(true_mean_defocus(dataset))
    assert true_spread > 150
    assert spread["relion"] < 0.2 * true_spread
    assert abs(spread["astigmatism"] - true_spread) < 0.3 * true_spread


def test_cutoff_fract_leaves_out_what_the_dose_has_erased(dataset, tmp_path):
    """RELION's row ranges: beyond the last frequency whose dose weight (and relative noise weight) exceeds
    --cutoff_fract, a row of a tilt adds nothing to the statistics."""
    from tomoctfrefine import forward

    sums = {}
    for fraction in ("0", "0.3"):
        out = tmp_path / f"cut{fraction}"
        result = refine("--i", "optimisation_set.star", "--o", str(out), *QUICK, "--do_defocus", "--cutoff_fract",
                        fraction, cwd=dataset)
        assert result.returncode == 0, result.stderr
        sums[fraction] = TiltStatistics.load(out / "temp" / "statistics" / "TS_01.npz").a_ss
    tomo = tomogram(read_tomogram_set(dataset / "tomograms.star"), "TS_01", image_size=(256, 256))
    damping = forward.tilt_damping(tomo, 128)
    last = int(np.argmax(tomo.pre_exposure_e_per_angstrom2))
    erased = damping[last] <= 0.3
    assert np.count_nonzero(sums["0"][last][erased]) > 1000
    assert np.all(sums["0.3"][last][erased] == 0)


# ------------------------------------------------------------------------------ RELION's pipeliner


@pytest.fixture(scope="module")
def shims(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shims")
    result = subprocess.run([str(BIN / "tomoctfrefine"), "relion-shims", str(folder)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"run RELION with: export PATH={folder}:$PATH"
    return folder


def relion_job(dataset: Path, tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(dataset, project)
    (project / "CtfRefine" / "job041").mkdir(parents=True)
    return project


#: What RELION 5's GUI runs for a "Tomo CTF refinement" job (the misspelt --per_tomo_scale included).
GUI_FLAGS = ["--i", "optimisation_set.star", "--o", "CtfRefine/job041/", "--b", "128", "--do_defocus", "--d0", "-3000",
             "--d1", "3000", "--do_reg_defocus", "--lambda", "0.1", "--do_scale", "--per_tomo_scale", "--j", "1",
             "--pipeline_control", "CtfRefine/job041/"]


def exit_files(job: Path) -> list[str]:
    return sorted(p.name for p in job.glob("RELION_JOB_*"))


def test_relions_pipeliner_sees_our_job_succeed(dataset, tmp_path, shims):
    project = relion_job(dataset, tmp_path)
    job = project / "CtfRefine" / "job041"
    (job / "RELION_JOB_EXIT_FAILURE").touch()  # left by an earlier attempt: removed at the start, as RELION does
    result = refine(*GUI_FLAGS, cwd=project, program=shims / "relion_tomo_refine_ctf")
    assert result.returncode == 0, result.stderr
    assert exit_files(job) == ["RELION_JOB_EXIT_SUCCESS"]
    for node in ("optimisation_set.star", "tomograms.star", "logfile.pdf"):  # the job's output nodes
        assert (job / node).exists(), node
    assert not (job / "note.txt").exists()  # the pipeliner's own
    assert json.loads((job / "summary.json").read_text())["options"]["scale_mode"] == "per_tomogram"


def test_relions_pipeliner_runs_the_mpi_program(dataset, tmp_path, shims):
    project = relion_job(dataset, tmp_path)
    result = refine(*GUI_FLAGS, cwd=project, program=shims / "relion_tomo_refine_ctf_mpi",
                    launcher=(str(BIN / "mpirun"), "-np", "2"))
    assert result.returncode == 0, result.stderr
    assert exit_files(project / "CtfRefine" / "job041") == ["RELION_JOB_EXIT_SUCCESS"]


def test_a_failing_job_tells_the_pipeliner(dataset, tmp_path, shims):
    project = relion_job(dataset, tmp_path)
    (project / "ref" / "mask.mrc").unlink()
    result = refine(*GUI_FLAGS, cwd=project, program=shims / "relion_tomo_refine_ctf")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in result.stderr
    assert exit_files(project / "CtfRefine" / "job041") == ["RELION_JOB_EXIT_FAILURE"]


def test_the_pipeliner_can_abort_our_job_between_tomograms_and_continue_it(tmp_path, shims):
    data = tmp_path / "data"
    simulate_dataset(data, SimulationParameters(n_tomograms=3, n_tilts=9, particles_per_tomogram=12, image_size_px=256, seed=6))
    project = relion_job(data, tmp_path)
    job = project / "CtfRefine" / "job041"
    process = subprocess.Popen([str(shims / "relion_tomo_refine_ctf"), *GUI_FLAGS], cwd=project,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (job / "temp" / "statistics" / "TS_01.npz").exists() and time.time() < deadline:
        time.sleep(0.01)
    (job / "RELION_JOB_ABORT_NOW").touch()  # what the GUI's "Abort" button does
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert err.strip().splitlines()[-1].startswith("aborted: RELION_JOB_ABORT_NOW found in CtfRefine/job041/")
    assert exit_files(job) == ["RELION_JOB_ABORT_NOW", "RELION_JOB_EXIT_ABORTED"]
    assert not (job / "optimisation_set.star").exists()
    done = sorted(p.name for p in (job / "temp" / "statistics").glob("*.npz"))
    assert "TS_01.npz" in done and len(done) < 3
    # "Continue" in RELION's GUI: the abort request is gone, --only_do_unfinished added
    (job / "RELION_JOB_ABORT_NOW").unlink()
    result = refine(*GUI_FLAGS, "--only_do_unfinished", cwd=project, program=shims / "relion_tomo_refine_ctf")
    assert result.returncode == 0, result.stderr
    assert exit_files(job) == ["RELION_JOB_EXIT_SUCCESS"]
    assert f"prepare: {len(done)} tomogram(s) already done, skipped (--only_do_unfinished)" in result.stdout


# ------------------------------------------------------------------------------ a full disk


def _can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def test_a_full_disk_ends_with_one_line_and_resumes(dataset, tmp_path):
    """The output folder on a 2 MB file system: the run stops with one line naming the file and the fix; given
    room (the same folder copied to a roomy disk), --only_do_unfinished finishes it with the same result."""
    if not _can_mount_tmpfs():
        pytest.fail("this test needs 'unshare -rm' and tmpfs (Linux user namespaces) to make a small file system")
    small = tmp_path / "small"
    small.mkdir()
    roomy = tmp_path / "roomy"
    command = " ".join([
        "mount -t tmpfs -o size=2m tmpfs", str(small), "&&",
        str(BIN / "tomoctfrefine"), "refine", "--i", "optimisation_set.star", "--o", str(small / "out"), *QUICK,
        "--do_defocus", "--do_scale", "--per_frame_scale", ";", "status=$?;",
        "cp -a", str(small / "out"), str(roomy), "; exit $status"])
    result = subprocess.run(["unshare", "-rm", "sh", "-c", command], cwd=dataset, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = [l for l in result.stderr.splitlines() if l.strip()]
    assert line.startswith(f"error: {small / 'out'}/") and "no space left on the device" in line
    assert line.endswith("free some space (or give another --o), then rerun with --only_do_unfinished: finished "
                         "tomograms are kept")
    assert not list(roomy.rglob(".*.part"))  # no half-written file left behind
    resumed = refine("--i", "optimisation_set.star", "--o", str(roomy), *QUICK, "--do_defocus", "--do_scale",
                     "--per_frame_scale", "--only_do_unfinished", cwd=dataset)
    assert resumed.returncode == 0, resumed.stderr
    fresh = tmp_path / "fresh"
    assert refine("--i", "optimisation_set.star", "--o", str(fresh), *QUICK, "--do_defocus", "--do_scale",
                  "--per_frame_scale", cwd=dataset).returncode == 0
    assert ((roomy / "tilt_series" / "TS_01.star").read_text().replace(str(roomy), "OUT")
            == (fresh / "tilt_series" / "TS_01.star").read_text().replace(str(fresh), "OUT"))
