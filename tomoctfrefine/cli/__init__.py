"""The ``tomoctfrefine`` command: ``check``, ``refine``, ``simulate``, ``demo``, ``assess``.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``.
Input problems are printed one per line and exit with code 2, without a traceback unless ``--debug``.
``--version`` (on the command and on every subcommand) prints ``tomoctfrefine <version>`` and exits 0.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import InputError

SUBCOMMANDS = ("check", "refine", "simulate", "demo", "assess", "relion_shims")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that say where to look (exit code 2, no usage dump)."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message}; see '{self.prog} --help'", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tomoctfrefine",
        description="Per-tilt CTF refinement for cryo-ET subtomogram averaging (RELION-compatible).",
    )
    version = f"tomoctfrefine {__version__}"
    parser.add_argument("--version", action="version", version=version, help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            continue
        module.add_parser(subparsers)
    for subparser in subparsers.choices.values():  # `tomoctfrefine refine --version` too
        subparser.add_argument("--version", action="version", version=version, help="print the version and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        where = f"{parser.prog} {args.command}" if args.command else parser.prog
        print(f"error: {where}: unknown flag(s) {' '.join(unknown)}; see '{where} --help'", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    args.debug = debug
    from ..pipeline import JobAborted, Terminated
    from ..pipeline.runner import disk_full_problem

    try:
        return int(args.run(args) or 0)
    except InputError as error:
        if debug:
            raise
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except JobAborted as error:
        print(f"aborted: RELION_JOB_ABORT_NOW found in {error}; finished tomograms are kept "
              "(continue the job, or rerun with --only_do_unfinished)", file=sys.stderr)
        return 2  # RELION's exit code for an aborted job
    except (KeyboardInterrupt, Terminated) as error:
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else "terminated (SIGTERM)"
        print(f"{what}: finished tomograms are kept; rerun with --only_do_unfinished to resume", file=sys.stderr)
        return 130 if isinstance(error, KeyboardInterrupt) else 143
    except OSError as error:
        problem = disk_full_problem(error)
        if problem is None or debug:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            raise
        print("error: out of memory; use a smaller --b, fewer --j, or a machine with more memory, then rerun with "
              "--only_do_unfinished", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
