"""Failures in the middle of a run: one MPI rank failing stops the whole job within seconds (with that
rank's message and a non-zero exit code, never a hang), and files left half-written by an interrupted
run are never taken for finished ones when the run is resumed.

Data: two simulated tomograms of 12 particles each. Under ``mpirun -np 2`` the share by particle count
gives TS_01 to rank 0 and TS_02 to rank 1, so breaking TS_02 makes rank 1 fail while rank 0 is already
waiting for it at a barrier (the situation that used to hang).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tomoctfrefine.io.star import read_star, write_star
from tomoctfrefine.simulate import SimulationParameters, simulate_dataset

BIN = Path(sys.executable).parent
FLAGS = ["--b", "64", "--do_defocus", "--do_scale", "--per_frame_scale", "--j", "1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mpi") / "data"
    simulate_dataset(folder, SimulationParameters(n_tomograms=2, n_tilts=9, particles_per_tomogram=12, seed=5))
    return folder


def copy_of(dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(dataset, root, ignore=shutil.ignore_patterns("truth"))
    return root


def mpirun(root: Path, *extra) -> tuple[subprocess.CompletedProcess, float]:
    mpirun = BIN / "mpirun"
    if not mpirun.exists():
        pytest.fail("mpirun is missing: install the 'mpich' wheel (pip install -e .[all])")
    started = time.monotonic()
    result = subprocess.run([str(mpirun), "-np", "2", str(BIN / "tomoctfrefine"), "refine", "--i", "optimisation_set.star",
                             "--o", "out", *FLAGS, *extra], cwd=root, capture_output=True, text=True, timeout=90)
    return result, time.monotonic() - started


def test_input_problem_found_by_one_rank_stops_the_job(dataset, tmp_path):
    """Three particles of TS_02 are in a second optics group: the validator passes (each group is
    consistent), and rank 1 finds it while preparing its share; rank 0 is then waiting at a barrier."""
    root = copy_of(dataset, tmp_path)
    doc = read_star(root / "particles.star")
    second = doc.blocks["optics"].copy()
    second["rlnOpticsGroup"], second["rlnOpticsGroupName"] = 2, "optics2"
    doc.blocks["optics"] = pd.concat([doc.blocks["optics"], second], ignore_index=True)
    particles = doc.blocks["particles"]
    particles.loc[particles.index[particles["rlnTomoName"] == "TS_02"][:3], "rlnOpticsGroup"] = 2
    write_star(doc, root / "particles.star")

    result, seconds = mpirun(root)
    assert seconds < 30
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: rank 1: {root / 'particles.star'} [rlnOpticsGroup]: the particles of tomogram TS_02 belong to several "
        "optics groups [1, 2]; give each tomogram's particles one optics group"]
    assert not (root / "out" / "optimisation_set.star").exists() and not (root / "out" / "summary.json").exists()


def test_failed_write_on_one_rank_stops_the_job(dataset, tmp_path):
    """Rank 1 cannot write its statistics (their name is taken by a folder, as a full or read-only node-local
    disk would refuse the write): the job stops at once with its message."""
    root = copy_of(dataset, tmp_path)
    blocked = root / "out" / "temp" / "statistics" / "TS_02.npz"
    blocked.mkdir(parents=True)
    result, seconds = mpirun(root, "--only_do_unfinished")
    assert seconds < 30
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1 failed: IsADirectoryError: [Errno 21] Is a directory: ")
    assert errors[0].endswith("TS_02.npz'")
    assert not (root / "out" / "optimisation_set.star").exists() and not (root / "out" / "summary.json").exists()


def test_mpirun_with_aberrations_and_scale_finishes(dataset, tmp_path):
    """The aberration step refits the scale on the leader: every rank must meet its barrier (this hung)."""
    root = copy_of(dataset, tmp_path)
    result, seconds = mpirun(root, "--do_even_aberrations", "--ne", "2")
    assert result.returncode == 0, result.stderr
    assert seconds < 60
    assert (root / "out" / "optimisation_set.star").exists() and (root / "out" / "particles.star").exists()


def test_partly_written_files_are_not_taken_for_finished_ones(dataset, tmp_path):
    """An interrupted run leaves a temporary file of an unfinished write (``*.part.npz``) and, on a
    file system without atomic rename, truncated result files: resuming redoes exactly those and writes
    what an uninterrupted run writes."""
    root = copy_of(dataset, tmp_path)
    run = [str(BIN / "tomoctfrefine"), "refine", "--i", "optimisation_set.star", *FLAGS]
    result = subprocess.run([*run, "--o", "whole"], cwd=root, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr

    shutil.copytree(root / "whole", root / "resumed")
    temp = root / "resumed" / "temp"
    for name in ("optimisation_set.star", "summary.json"):
        (root / "resumed" / name).unlink()
    statistics = temp / "statistics" / "TS_01.npz"
    size = statistics.stat().st_size
    os.truncate(statistics, size // 2)
    os.truncate(temp / "defocus" / "TS_02.npz", 300)
    (temp / "statistics" / "TS_02.npz.part.npz").write_bytes((temp / "statistics" / "TS_02.npz").read_bytes()[:1000])
    before = (temp / "statistics" / "TS_02.npz").read_bytes()

    result = subprocess.run([*run, "--o", "resumed", "--only_do_unfinished"], cwd=root, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "prepare: TS_01 (1/1 on rank 0)" in result.stdout  # the truncated statistics were redone ...
    assert "prepare: 1 tomogram(s) already done, skipped" in result.stdout  # ... the complete ones kept
    assert "defocus: TS_02:" in result.stdout  # the truncated defocus result was redone
    assert (temp / "statistics" / "TS_02.npz").read_bytes() == before
    assert statistics.stat().st_size == size
    for name in ("tilt_series/TS_01.star", "tilt_series/TS_02.star"):
        assert (root / "resumed" / name).read_text() == (root / "whole" / name).read_text(), name
    assert (root / "resumed" / "tomograms.star").read_text().replace("resumed/", "whole/") == (root / "whole" / "tomograms.star").read_text()
