"""Inputs are never modified: every command that reads user files (``check``, ``refine`` with every
option on, a resumed ``refine``, ``refine`` under ``mpirun``, ``assess``) leaves every byte and every
permission bit of its inputs as they were, and writes nothing outside its output folder.

The project is a copy of the RELION-5 fixture plus a trajectories file and an FSC table, so that
every kind of input is read; inputs get distinct modes (some read-only) so that a changed mode shows.
"""
from __future__ import annotations

import hashlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tomoctfrefine.io.fsc import FscCurve, write_fsc
from tomoctfrefine.io.trajectories import write_trajectories

BIN = Path(sys.executable).parent
EVERYTHING = ["--mot", "motion.star", "--fsc", "postprocess.star", "--b", "64", "--do_defocus", "--do_reg_defocus", "--lambda", "0.1",
              "--do_scale", "--per_tomogram_scale", "--do_even_aberrations", "--do_odd_aberrations", "--diag", "--j", "1"]


def snapshot(root: Path, skip: tuple = ()) -> dict:
    """sha256 and mode of every file below ``root`` (outside the folders in ``skip``)."""
    state = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts and relative.parts[0] in skip:
            continue
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[str(relative)] = (digest, stat.S_IMODE(info.st_mode))
    return state


@pytest.fixture(scope="module")
def project(tmp_path_factory, relion5_small) -> Path:
    root = tmp_path_factory.mktemp("inputs") / "project"
    shutil.copytree(relion5_small, root, ignore=shutil.ignore_patterns("runs", "truth", "map_true.mrc"))
    write_trajectories(root / "motion.star", {f"TS_01/{i}": np.full((13, 3), 0.25 * (i % 3)) for i in range(1, 31)})
    index = np.arange(33)
    write_fsc(root / "postprocess.star", FscCurve(index, np.where(index > 0, 128.0 / np.maximum(index, 1), np.inf),
                                                  1.0 / (1.0 + np.exp((index - 20.0) / 2.0))))
    for number, path in enumerate(sorted(p for p in root.rglob("*") if p.is_file())):
        path.chmod((0o444, 0o640, 0o600, 0o664)[number % 4])
    return root


def run(root: Path, *command, launcher=()) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(BIN / "tomoctfrefine"), *command], cwd=root, capture_output=True, text=True, timeout=180)


def assert_untouched(before: dict, root: Path, output: str) -> None:
    after = snapshot(root, skip=(output,))
    changed = sorted(name for name in before if before[name] != after.get(name))
    added = sorted(set(after) - set(before))
    assert changed == [] and added == [], (changed, added)


def test_check_leaves_inputs_untouched(project):
    before = snapshot(project)
    result = run(project, "check", "--i", "optimisation_set.star", "--mot", "motion.star", "--fsc", "postprocess.star", "--b", "64")
    assert result.returncode == 0, result.stderr
    assert "trajectories: present" in result.stdout and "FSC: present" in result.stdout
    assert snapshot(project) == before


def test_refine_with_everything_then_resume_and_assess_leave_inputs_untouched(project):
    before = snapshot(project, skip=("out", "assessed"))
    result = run(project, "refine", "--i", "optimisation_set.star", "--o", "out", *EVERYTHING, "--assess")
    assert result.returncode == 0, result.stderr
    assert (project / "out" / "particles.star").exists() and (project / "out" / "assess" / "assess.json").exists()
    assert_untouched(before, project, "out")

    # resumed on a finished folder: reads the inputs again and rewrites only its own outputs
    result = run(project, "refine", "--i", "optimisation_set.star", "--o", "out", *EVERYTHING, "--only_do_unfinished")
    assert result.returncode == 0, result.stderr
    assert_untouched(before, project, "out")

    # assess reads both optimisation sets and everything they name, the refinement's outputs included
    before_assess = snapshot(project, skip=("assessed",))
    result = run(project, "assess", "--before", "optimisation_set.star", "--after", "out/optimisation_set.star", "--o", "assessed",
                 "--b", "64", "--j", "1")
    assert result.returncode == 0, result.stderr
    assert_untouched(before_assess, project, "assessed")


def test_refine_under_mpirun_leaves_inputs_untouched(project):
    before = snapshot(project, skip=("out_mpi", "out", "assessed"))
    result = run(project, "refine", "--i", "optimisation_set.star", "--o", "out_mpi", *EVERYTHING,
                 launcher=(str(BIN / "mpirun"), "-np", "2"))
    assert result.returncode == 0, result.stderr
    after = snapshot(project, skip=("out_mpi", "out", "assessed"))
    assert after == before
