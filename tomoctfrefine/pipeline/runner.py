"""Running the plan: every step in order, under MPI, with RELION's job control, signals and a full disk turned
into one-line, resumable endings."""
from __future__ import annotations

import errno
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from ..distribute import World
from ..errors import Problem
from ..options import RefineOptions
from .aberrations import refine_aberrations
from .assessment import assess_refinement
from .defocus import refine_defocus
from .outputs import write_outputs
from .plan import STEPS, plan
from .prepare import prepare
from .scale import refine_scale
from .workspace import JobAborted, log

_STEP_FUNCTIONS = {"refine_defocus": refine_defocus, "refine_aberrations": refine_aberrations,
                   "refine_scale": refine_scale, "write_outputs": write_outputs}
EXIT_FILES = ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE", "RELION_JOB_EXIT_ABORTED")


class Terminated(Exception):
    """The process received SIGTERM (a queue's time limit, ``kill``, ``scancel``)."""


def run_step(step: str, out_dir, world: World | None = None):
    """Run one step of the plan after ``prepare`` (which needs the inputs: call :func:`prepare`)."""
    if step not in STEPS or step == "prepare":
        raise ValueError(f"unknown step {step!r}: expected one of {', '.join(STEPS[1:])}")
    world = world or World()
    if step == "assess_refinement":
        return assess_refinement(out_dir) if world.is_leader else None
    return _STEP_FUNCTIONS[step](out_dir, world)


@contextmanager
def terminate_on_sigterm():
    """Turn SIGTERM into :class:`Terminated` (raised between Python statements), so that the run ends with its
    files complete and a message, as after Ctrl-C."""
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def job_control(folder: str | None, world: World | None = None):
    """RELION's pipeline control (``--pipeline_control DIR``): the exit files of an earlier run are removed, then
    ``RELION_JOB_EXIT_SUCCESS``, ``_FAILURE`` or ``_ABORTED`` is written in ``DIR`` when the job ends (by rank 0)."""
    leader = world is None or world.is_leader
    if not folder:
        yield
        return
    directory = Path(folder)
    if leader:
        directory.mkdir(parents=True, exist_ok=True)
        for name in EXIT_FILES:
            (directory / name).unlink(missing_ok=True)
    outcome = "RELION_JOB_EXIT_FAILURE"
    try:
        yield
        outcome = "RELION_JOB_EXIT_SUCCESS"
    except JobAborted:
        outcome = "RELION_JOB_EXIT_ABORTED"
        raise
    finally:
        if leader:
            (directory / outcome).touch()


def run_refinement(opt, options: RefineOptions, out_dir, command_line: str = "", pipeline_control: str | None = None,
                   flag_names: dict | None = None) -> Path:
    """Run every step of :func:`~.plan.plan` (the CLI's ``refine``) and return the output optimisation set.

    ``pipeline_control`` (RELION's job folder) is checked for an abort request between tomograms; the exit files
    are written by :func:`job_control` around the whole command (the CLI's)."""
    world = World()
    with world.guard(), terminate_on_sigterm():
        started = time.time()
        workspace = prepare(opt, options, out_dir, command_line, world, pipeline_control, flag_names)
        for step in plan(options)[1:]:
            run_step(step, out_dir, world)
        if world.is_leader:
            log(Path(out_dir), f"finished in {time.time() - started:.1f} s")
            workspace.unlock()
        return Path(out_dir) / "optimisation_set.star"


def disk_full_problem(error: OSError) -> Problem | None:
    """A full disk or quota as one line that says how to go on (None for other errors)."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = error.filename or "the output folder"
    what = "no space left on the device" if error.errno == errno.ENOSPC else "the disk quota is exceeded"
    return Problem(str(where), what,
                   "free some space (or give another --o), then rerun with --only_do_unfinished: finished tomograms are kept")
