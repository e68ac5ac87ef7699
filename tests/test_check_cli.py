"""``tomoctfrefine check`` on the fixture and on broken copies of it."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tomoctfrefine.cli import main
from tomoctfrefine.errors import InputError

CONSOLE = Path(sys.executable).parent / "tomoctfrefine"

SUMMARY = """tomograms: 1
  TS_01: 13 tilts, dose 0-36 e/Å², pixel 2 Å, 30 particles (half sets 15/15)
tilts per tomogram: 13
dose range: 0-36 e/Å²
tilt-series pixel size: 2 Å
particles: 30
half sets: 15/15
optics groups: 1 (optics1, 2 Å)
reference: 64 px, 2 Å/px
mask: present
FSC: none
trajectories: none
"""


def test_console_script_on_the_fixture(relion5_small):
    result = subprocess.run([str(CONSOLE), "check", "--i", str(relion5_small / "optimisation_set.star")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == SUMMARY + "no problem found\n"
    assert result.stderr == ""


def test_check_from_the_project_directory(monkeypatch, capsys, relion5_small):
    monkeypatch.chdir(relion5_small)
    assert main(["check", "--i", "optimisation_set.star", "--b", "128"]) == 0
    assert capsys.readouterr().out == SUMMARY + "no problem found\n"


@pytest.fixture
def broken(tmp_path, monkeypatch, relion5_small):
    root = tmp_path / "project"
    shutil.copytree(relion5_small, root, ignore=shutil.ignore_patterns("runs", "truth", "map_true.mrc"))
    for path in root.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    monkeypatch.chdir(root)
    return root


def test_broken_copy_prints_summary_then_problems_and_exits_2(broken, capsys):
    (broken / "ref" / "mask.mrc").unlink()
    text = (broken / "particles.star").read_text()
    (broken / "particles.star").write_text(text.replace("300.000000 2.000000 0.100000", "200.000000 2.000000 0.100000"))
    assert main(["check", "--i", "optimisation_set.star"]) == 2
    out, err = capsys.readouterr()
    assert out == SUMMARY.replace("mask: present", "mask: none") + "2 problems found\n"
    assert err.splitlines() == [
        "error: particles.star [rlnVoltage]: optics group 1 voltage 200 kV differs from tomogram TS_01's 300 kV; make the particle and tomogram optics agree",
        "error: optimisation_set.star [rlnTomoReferenceMaskFile]: reference mask not found: ref/mask.mrc; "
        "correct the path (relative paths are read from the working directory)",
    ]
    assert "Traceback" not in err


def test_overriding_flags_are_named(broken, capsys):
    assert main(["check", "--i", "optimisation_set.star", "--ref1", "ref/other.mrc", "--fsc", "post.star"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: command line [--ref1]: reference half map 1 not found: ref/other.mrc; correct the path (relative paths are read from the working directory)",
        "error: command line [--fsc]: FSC file not found: post.star; correct the path (relative paths are read from the working directory)",
    ]


def test_flags_without_optimisation_set(broken, capsys):
    assert main(["check", "--p", "particles.star", "--t", "tomograms.star", "--ref1", "ref/half1.mrc", "--ref2", "ref/half2.mrc"]) == 0
    assert "mask: none" in capsys.readouterr().out


def test_missing_optimisation_set(broken, capsys):
    assert main(["check", "--i", "nothing.star"]) == 2
    assert capsys.readouterr().err == "error: nothing.star: file not found; check the path\n"


def test_no_input(capsys):
    assert main(["check"]) == 2
    assert capsys.readouterr().err == "error: --i: no input given; give --i optimisation_set.star (or --p, --t, --ref1, --ref2)\n"


def test_debug_shows_the_traceback(broken):
    (broken / "ref" / "half1.mrc").unlink()
    with pytest.raises(InputError):
        main(["check", "--debug", "--i", "optimisation_set.star"])
