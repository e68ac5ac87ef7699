"""Test inputs kept in the repository (``tests/data``), found through fixtures so that the suite runs
from a clone in any folder with nothing beside it.

``relion5_small`` is a small RELION-5 dataset with known truth and the files RELION 5.0.1 wrote when
refining and reconstructing it (``tests/data/relion5_small/README.md``). Treat it as read-only: copy it
(``shutil.copytree``) before writing next to it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
RELION5_SMALL = DATA / "relion5_small"


@pytest.fixture(scope="session")
def relion5_small() -> Path:
    """The RELION-5 fixture folder (read-only)."""
    return RELION5_SMALL


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``relion5_small_star`` / ``relion5_small_mrc``: one test per STAR / MRC file of the fixture."""
    for name, pattern in (("relion5_small_star", "*.star"), ("relion5_small_mrc", "*.mrc")):
        if name in metafunc.fixturenames:
            paths = sorted(RELION5_SMALL.rglob(pattern))
            metafunc.parametrize(name, paths, ids=[str(p.relative_to(RELION5_SMALL)) for p in paths])
