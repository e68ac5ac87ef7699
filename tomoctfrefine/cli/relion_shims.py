"""``tomoctfrefine relion-shims DIR``: launchers named as RELION's programs, so that RELION 5's own GUI and
scheduler run tomoctfrefine unchanged.

It writes ``DIR/relion_tomo_refine_ctf`` and ``DIR/relion_tomo_refine_ctf_mpi``, each starting
``tomoctfrefine refine`` with the arguments RELION passes (this Python, this installation). Put ``DIR`` before
RELION's own folder on ``PATH`` where RELION's GUI is started; its "Tomo CTF refinement" jobs then run
tomoctfrefine, with ``--pipeline_control`` telling the pipeliner when the job succeeded, failed or was aborted.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

PROGRAMS = ("relion_tomo_refine_ctf", "relion_tomo_refine_ctf_mpi")


def launcher_text(python: str) -> str:
    return ("#!/bin/sh\n"
            "# Written by 'tomoctfrefine relion-shims': RELION's pipeliner runs tomoctfrefine in place of\n"
            "# relion_tomo_refine_ctf (same flags). Remove this file to run RELION's program again.\n"
            f"exec {shlex.quote(python)} -m tomoctfrefine refine \"$@\"\n")


def write_shims(folder: Path, python: str | None = None) -> list[Path]:
    """Write the launchers into ``folder`` (created if needed); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PROGRAMS:
        path = folder / name
        tmp = folder / f".{name}.tmp"
        tmp.write_text(launcher_text(python or sys.executable))
        tmp.chmod(0o755)
        os.replace(tmp, path)
        written.append(path)
    return written


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "relion-shims", help="write relion_tomo_refine_ctf(_mpi) launchers so RELION's GUI and scheduler run tomoctfrefine",
        description=__doc__.split("\n\n")[1].replace("\n", " "), allow_abbrev=False)
    parser.add_argument("folder", help="folder for the launchers (put it first on PATH where RELION runs)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder).resolve()
    for path in write_shims(folder):
        print(f"wrote {path}")
    print(f"run RELION with: export PATH={shlex.quote(str(folder))}:$PATH")
    return 0
