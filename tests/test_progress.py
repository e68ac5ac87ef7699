"""The progress bar draws tomograms x particles on a terminal and nothing in logs."""
from tomoctfrefine.progress import Progress


def test_bar_counts_particles_and_tomograms(capsys):
    with Progress("prepare", 300, 2, enabled=True) as bar:
        bar.advance(150, "TS_01")
    err = capsys.readouterr().err
    last = err.split("\r")[-1]
    assert last.startswith("prepare [###############...............] 150/300 particles, TS_01 (1/2), ")
    assert err.endswith("\n")


def test_silent_when_not_a_terminal(capsys):
    with Progress("defocus", 10, 1) as bar:  # pytest's stderr is not a terminal
        bar.advance(10, "TS_01")
    assert capsys.readouterr().err == ""
