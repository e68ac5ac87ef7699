"""A progress bar over tomograms x particles on a terminal; nothing extra in logs (they get plain lines)."""
from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress("prepare", total_particles) as bar: ... bar.advance(particles, name)``.

    Draws ``prepare [#########.........] 150/300 particles, TS_01 (1/2), 12 s`` on a terminal (stderr),
    and stays silent when stderr is not a terminal (log files, MPI ranks other than 0, Scipion).
    """

    def __init__(self, step: str, total_particles: int, tomograms: int, enabled: bool | None = None, width: int = 30):
        self.step, self.total, self.tomograms, self.width = step, max(int(total_particles), 1), tomograms, width
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.done, self.count, self.started = 0, 0, time.time()

    def __enter__(self) -> "Progress":
        self._draw("")
        return self

    def advance(self, particles: int, name: str) -> None:
        self.done += int(particles)
        self.count += 1
        self._draw(name)

    def _draw(self, name: str) -> None:
        if not self.enabled:
            return
        filled = int(self.width * min(self.done / self.total, 1.0))
        where = f", {name} ({self.count}/{self.tomograms})" if name else ""
        sys.stderr.write(f"\r{self.step} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} particles"
                         f"{where}, {time.time() - self.started:.0f} s\x1b[K")
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
