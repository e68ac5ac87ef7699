"""``tomoctfrefine --version`` and ``tomoctfrefine <command> --version`` (real subprocesses)."""
import subprocess
import sys

import pytest

import tomoctfrefine


@pytest.mark.parametrize("arguments", [["--version"], ["refine", "--version"], ["assess", "--version"], ["check", "--version"]])
def test_version_is_printed_exactly(arguments):
    result = subprocess.run([sys.executable, "-m", "tomoctfrefine", *arguments], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tomoctfrefine {tomoctfrefine.__version__}\n"
    assert result.stderr == ""


def test_version_is_the_package_version():
    from importlib.metadata import version

    assert tomoctfrefine.__version__ == version("tomoctfrefine")
