"""Input problems: every problem names the file (and key or flag) and says how to fix it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem found in the inputs.

    Attributes
    ----------
    file : str
        The file (or flag, for command-line problems) the problem is in.
    message : str
        What is wrong, in words.
    fix : str
        What the user should do.
    key : str
        The STAR key, column or flag concerned, if any.
    """

    file: str
    message: str
    fix: str = ""
    key: str = ""

    def __str__(self) -> str:
        where = f"{self.file}" + (f" [{self.key}]" if self.key else "")
        return f"{where}: {self.message}" + (f"; {self.fix}" if self.fix else "")


class InputError(Exception):
    """Raised with every problem found, so the user sees them all at once (exit code 2)."""

    def __init__(self, problems: list[Problem] | Problem):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
