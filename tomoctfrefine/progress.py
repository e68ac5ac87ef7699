"""Progress of a long phase: a bar on a terminal, periodic lines in a log, with rate and ETA.

On a terminal (stderr), :class:`Progress` redraws one line::

    assess before [#########.....................] 150/480 particle images, TS_01 (1/2), 12 s, 12.5/s, ETA 26 s

and, when it is given a ``log`` callable (the pipeline's ``run.log`` writer, ``print`` in a Scipion
step), it also writes a plain line at most every :data:`LOG_INTERVAL_S` seconds while the phase runs::

    assess before: 150/480 particle images (31 %), 12.5/s, ETA 26 s, TS_01 (1/2)

so a log is never silent for long, whether or not a terminal is attached. The bar is drawn on rank 0's
terminal only (``enabled=False`` elsewhere); the log lines go wherever ``log`` writes.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

#: Seconds between two progress lines in a log (a phase shorter than this writes none).
LOG_INTERVAL_S = 5.0
#: Seconds between two redraws of the terminal bar.
DRAW_INTERVAL_S = 0.2


def format_duration(seconds: float) -> str:
    """``"4.2 s"``, ``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``."""
    seconds = max(0.0, float(seconds))
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        minutes, rest = divmod(int(round(seconds)), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min"


def format_rate(per_second: float) -> str:
    """Three significant digits, no exponent: ``"0.125/s"``, ``"12.5/s"``, ``"1250/s"``."""
    if per_second >= 100:
        return f"{per_second:.0f}/s"
    return f"{per_second:.3g}/s"


class Progress:
    """``with Progress("prepare", total, tomograms, log=...) as bar: ... bar.advance(amount, name)``.

    Parameters
    ----------
    step : str
        Name of the phase (starts every line).
    total : int
        Units of work in the phase (particles, tilts, particle images, ...).
    tomograms : int
        Number of tomograms (shown as ``name (i/n)``; 0 to leave it out).
    enabled : bool, optional
        Draw the bar; default: when stderr is a terminal.
    width : int
        Characters of the bar.
    unit : str
        Name of the units of ``total``.
    log : callable, optional
        Receives a line (no newline) at most every ``log_interval_s`` seconds while the phase runs.
    log_interval_s : float, optional
        Default :data:`LOG_INTERVAL_S` (read when the phase starts).
    clock : callable
        Seconds (monotonic); tests pass their own.

    ``advance`` may be called per tomogram or more often (per tilt, per chunk of particles): the
    tomogram counter moves when ``name`` changes. The rate is the work done over the time since the phase
    started, and the ETA the remaining work at that rate.
    """

    def __init__(self, step: str, total: int, tomograms: int = 0, enabled: bool | None = None, width: int = 30, *,
                 unit: str = "particles", log: Callable[[str], None] | None = None,
                 log_interval_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.step, self.total, self.tomograms, self.width, self.unit = step, max(int(total), 1), int(tomograms), width, unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.log = log
        self.log_interval_s = LOG_INTERVAL_S if log_interval_s is None else float(log_interval_s)
        self.clock = clock
        self.done, self.count, self.name = 0, 0, ""
        self.started = self.last_logged = self.last_drawn = clock()

    # what is shown -----------------------------------------------------------------------------

    @property
    def elapsed_s(self) -> float:
        return self.clock() - self.started

    @property
    def rate_per_s(self) -> float | None:
        """Units per second so far (None before any work or time)."""
        elapsed = self.elapsed_s
        return self.done / elapsed if self.done > 0 and elapsed > 0 else None

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far (None while it is unknown)."""
        rate = self.rate_per_s
        return max(self.total - self.done, 0) / rate if rate else None

    def _where(self) -> str:
        if not self.name:
            return ""
        return f"{self.name} ({self.count}/{self.tomograms})" if self.tomograms else self.name

    def _speed(self) -> str:
        rate, eta = self.rate_per_s, self.eta_s
        if rate is None:
            return ""
        return f"{format_rate(rate)}, ETA {format_duration(eta)}"

    def bar_line(self) -> str:
        """The terminal line (without the carriage return)."""
        filled = int(self.width * min(self.done / self.total, 1.0))
        parts = [f"{self.step} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {self.unit}"]
        parts += [text for text in (self._where(), f"{self.elapsed_s:.0f} s", self._speed()) if text]
        return ", ".join(parts)

    def log_line(self) -> str:
        """The periodic log line."""
        parts = [f"{self.step}: {self.done}/{self.total} {self.unit} ({100 * min(self.done / self.total, 1.0):.0f} %)"]
        parts += [text for text in (self._speed(), self._where()) if text]
        return ", ".join(parts)

    # updates -----------------------------------------------------------------------------------

    def __enter__(self) -> "Progress":
        self._draw(force=True)
        return self

    def advance(self, amount: int = 1, name: str = "") -> None:
        """``amount`` more units done (of tomogram ``name``, if given)."""
        self.done += int(amount)
        if name and name != self.name:
            self.name = name
            self.count += 1
        now = self.clock()
        if self.log is not None and now - self.last_logged >= self.log_interval_s and self.done < self.total:
            self.last_logged = now
            self.log(self.log_line())
            self._draw(force=True)  # the log line went over the bar
        else:
            self._draw(force=self.done >= self.total)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not force and now - self.last_drawn < DRAW_INTERVAL_S:
            return
        self.last_drawn = now
        sys.stderr.write("\r" + self.bar_line() + "\x1b[K")
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._draw(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


def print_line(message: str) -> None:
    """Print a line on stdout over a progress bar drawn on the same terminal (clears the bar first)."""
    print(("\r\x1b[K" if sys.stdout.isatty() else "") + message, flush=True)
