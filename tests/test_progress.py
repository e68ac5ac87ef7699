"""The progress bar draws tomograms x particles with rate and ETA on a terminal, and writes periodic plain
lines to a log while a phase runs."""
import pytest

from tomoctfrefine.progress import Progress, format_duration, format_rate


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


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_rate_and_eta_on_the_bar(capsys):
    clock = Clock()
    with Progress("assess", 480, 2, enabled=True, unit="particle images", clock=clock) as bar:
        clock.now += 12.0
        bar.advance(150, "TS_01")
        # 150 in 12 s: 12.5/s; 330 left: 26.4 s
        assert bar.rate_per_s == 12.5 and bar.eta_s == pytest.approx(26.4)
        assert bar.bar_line() == ("assess [#########.....................] 150/480 particle images, TS_01 (1/2), 12 s, "
                                  "12.5/s, ETA 26 s")
        clock.now += 1.0
        bar.advance(10, "TS_01")  # same tomogram: the counter stays
        assert bar.count == 1
    assert capsys.readouterr().err.endswith("\n")


def test_log_lines_every_interval_while_the_phase_runs():
    clock, lines = Clock(), []
    with Progress("back-projection", 100, 2, enabled=False, unit="particle images", log=lines.append,
                  log_interval_s=5.0, clock=clock) as bar:
        for _ in range(9):
            clock.now += 2.0
            bar.advance(10, "TS_01" if bar.done < 50 else "TS_02")
        clock.now += 2.0
        bar.advance(10, "TS_02")  # the end of the phase is not a progress line
    # at 6 s (30 done), 12 s (60) and 18 s (90): never more than 5 s without a line
    assert lines == [
        "back-projection: 30/100 particle images (30 %), 5/s, ETA 14 s, TS_01 (1/2)",
        "back-projection: 60/100 particle images (60 %), 5/s, ETA 8.0 s, TS_02 (2/2)",
        "back-projection: 90/100 particle images (90 %), 5/s, ETA 2.0 s, TS_02 (2/2)",
    ]


def test_no_log_line_for_a_short_phase_and_no_rate_before_any_work():
    clock, lines = Clock(), []
    with Progress("CTF correction", 4, unit="steps", enabled=False, log=lines.append, clock=clock) as bar:
        assert bar.rate_per_s is None and bar.eta_s is None and bar.log_line() == "CTF correction: 0/4 steps (0 %)"
        for _ in range(4):
            clock.now += 1.0
            bar.advance(1)
    assert lines == []


@pytest.mark.parametrize("seconds, text", [(0.04, "0.0 s"), (4.25, "4.2 s"), (9.96, "10 s"), (42.4, "42 s"),
                                           (59.6, "1 min 00 s"), (185, "3 min 05 s"), (7620, "2 h 07 min")])
def test_durations_read_as_a_person_would_write_them(seconds, text):
    assert format_duration(seconds) == text


def test_rates_have_three_significant_digits():
    assert [format_rate(r) for r in (0.125, 12.54, 211.4, 1250.0)] == ["0.125/s", "12.5/s", "211/s", "1250/s"]
