"""Run one step of the engine's plan in its own process (under ``mpirun`` for MPI).

The protocol launches this module with ``runJob`` once per entry of ``tomoctfrefine.pipeline.plan``
(so that Scipion's ``hosts.conf`` decides how MPI processes start, the engine's numba threads never
share a process with Scipion, and a crash of one step leaves the previous steps' files for
"continue")::

    python .../tomoctfrefine/protocols/engine_step.py prepare OUT_DIR --optimisation-set F --options F.json
    python .../tomoctfrefine/protocols/engine_step.py refine_defocus OUT_DIR
    (every other step of pipeline.STEPS likewise)

Every step runs inside ``World().guard()``, as the CLI's ``refine`` does: under MPI a rank that fails
stops the whole job at once with its message (``error: rank N: ...`` and exit code 2 for an input
problem, ``error: rank N failed: ...`` and exit code 1 otherwise). Without MPI an input problem prints
``error: <problem>`` lines and exits with code 2, as the CLI does.

``prepare`` also writes ``note.txt``: the ``tomoctfrefine refine`` command line that does what the
protocol's steps do (:func:`command_line`).

It is run as a script (not ``python -m``) so that the package ``tomoctfrefine.protocols``, which
imports Scipion, is not imported: this file imports only the engine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

from tomoctfrefine import pipeline

#: The engine's steps, in the order a plan runs them.
STEPS = tuple(pipeline.STEPS)

#: Flags written even at their default: the required box, the thread count (the CLI's default is not the
#: protocol's) and, with --do_defocus, the scan range (as RELION's GUI writes it).
_ALWAYS_WRITTEN = ("box_size_px", "threads")
_WITH_DEFOCUS = ("defocus_scan_min_angstrom", "defocus_scan_max_angstrom")


def refine_options(values: dict) -> "pipeline.RefineOptions":
    """``tomoctfrefine.pipeline.RefineOptions`` from the protocol's JSON, refusing names it lacks."""
    known = {f.name for f in dataclasses.fields(pipeline.RefineOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"RefineOptions has no field(s) {unknown}: the protocol and the engine disagree")
    return pipeline.RefineOptions(**values)


def _number(value) -> str:
    """A flag value as the user would type it (``3000`` rather than ``3000.0``), exactly (repr's shortest
    round-trip digits otherwise)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def command_line(options, optimisation_set: str, out_dir: str, ranks: int = 1) -> str:
    """The ``tomoctfrefine refine`` command (RELION's flags) that runs the refinement ``options`` describe.

    Built from the flags :class:`tomoctfrefine.options.RefineOptions` declares, so that parsed by
    ``tomoctfrefine refine`` it gives back ``options`` exactly (tested). A flag at its default is left out,
    except ``--b``, ``--j`` and, with ``--do_defocus``, ``--d0``/``--d1``. Fields without a flag (options of the
    Python API only) are not written. With ``ranks > 1`` the command starts with ``mpirun -np <ranks>``.
    """
    words = ["--i", optimisation_set, "--o", out_dir]
    for field in dataclasses.fields(options):
        meta, value = field.metadata, getattr(options, field.name)
        kind, flag = meta.get("kind", "value"), meta.get("flag")
        if kind == "choice":
            words += [meta["values"][value]] if value in meta["values"] else []
        elif kind == "switch":
            words += [flag] if value else []
        elif kind == "inverted_switch":
            words += [] if value else [flag]
        elif flag is not None and (value != field.default or field.name in _ALWAYS_WRITTEN
                                   or (options.do_defocus and field.name in _WITH_DEFOCUS)):
            words += [flag, _number(value)]
    prefix = ["mpirun", "-np", str(ranks)] if ranks > 1 else []
    return " ".join(shlex.quote(word) for word in prefix + ["tomoctfrefine", "refine"] + words)


def run_step(step: str, out_dir: str, optimisation_set: str | None = None, options_json: str | None = None,
             world=None) -> None:
    """Run ``step`` of the plan; ``prepare`` also reads the optimisation set and the options (JSON)."""
    if step == "prepare":
        from tomoctfrefine.io.optimisation_set import read_optimisation_set

        with open(options_json) as handle:
            options = refine_options(json.load(handle))
        pipeline.prepare(read_optimisation_set(optimisation_set), options, out_dir,
                         command_line(options, optimisation_set, out_dir, world.size if world else 1), world)
    else:
        pipeline.run_step(step, out_dir, world)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="engine_step.py")
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("out_dir")
    parser.add_argument("--optimisation-set")
    parser.add_argument("--options")
    args = parser.parse_args(argv)
    if args.step == "prepare" and not (args.optimisation_set and args.options):
        parser.error("prepare needs --optimisation-set and --options")
    from tomoctfrefine.distribute import World
    from tomoctfrefine.errors import InputError
    from tomoctfrefine.pipeline.runner import Terminated, disk_full_problem, terminate_on_sigterm

    world = World()
    # The endings of ``tomoctfrefine refine`` (tomoctfrefine/cli/__init__.py), with the same messages and codes.
    try:
        # Under MPI a rank that fails aborts every rank (code 2 for an input problem, 1 otherwise),
        # printing its message first; the other ranks would otherwise wait for it at a barrier.
        with world.guard(), terminate_on_sigterm():
            run_step(args.step, args.out_dir, args.optimisation_set, args.options, world)
    except InputError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as error:
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else "terminated (SIGTERM)"
        print(f"{what}: finished tomograms are kept; continue the run to resume", file=sys.stderr)
        return 130 if isinstance(error, KeyboardInterrupt) else 143
    except OSError as error:
        problem = disk_full_problem(error)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory; use a smaller box, fewer threads, or a machine with more memory, then "
              "continue the run", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
