"""``tomoctfrefine check``: read and validate every input of a refinement, print a summary and every
problem (one line each); exit code 2 when there is any problem.

Takes ``relion_tomo_refine_ctf``'s input flags: ``--i`` and the overriding ``--p --t --mot --ref1 --ref2
--mask --fsc``, and optionally ``--b`` (to check the reference fits the estimation box).
"""
from __future__ import annotations

import argparse

from ..errors import InputError, Problem
from ..io.optimisation_set import read_optimisation_set
from ..validate import inspect_inputs

#: OptimisationSet field -> flag, so problems in overridden paths name the flag.
FLAG_NAMES = {
    "particles_path": "--p",
    "tomograms_path": "--t",
    "trajectories_path": "--mot",
    "ref1_path": "--ref1",
    "ref2_path": "--ref2",
    "mask_path": "--mask",
    "fsc_path": "--fsc",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check",
        help="validate the inputs of a refinement and summarise them",
        description="Read every file an optimisation set names, print a summary and every problem found "
        "(exit code 2 if any).",
        allow_abbrev=False,
    )
    parser.add_argument("--i", default="", help="Input optimisation set")
    parser.add_argument("--p", default="", help="Input particle set (overrides the optimisation set)")
    parser.add_argument("--t", default="", help="Input tomogram set (overrides the optimisation set)")
    parser.add_argument("--mot", default="", help="Input particle trajectories")
    parser.add_argument("--ref1", default="", help="Reference map, half 1")
    parser.add_argument("--ref2", default="", help="Reference map, half 2")
    parser.add_argument("--mask", default="", help="Reference mask")
    parser.add_argument("--fsc", default="", help="Postprocess STAR file with the FSC")
    parser.add_argument("--b", type=int, default=None, help="Box size to be used for the estimation (optional)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if not args.i and not (args.p or args.t):
        raise InputError([Problem("--i", "no input given", "give --i optimisation_set.star (or --p, --t, --ref1, --ref2)")])
    opt = read_optimisation_set(
        args.i or None, particles=args.p or None, tomograms=args.t or None, trajectories=args.mot or None,
        ref1=args.ref1 or None, ref2=args.ref2 or None, mask=args.mask or None, fsc=args.fsc or None,
    )
    report = inspect_inputs(opt, box_size_px=args.b, flag_names=FLAG_NAMES)
    for line in report.summary_lines():
        print(line)
    if report.problems:
        print(f"{len(report.problems)} problem{'s' if len(report.problems) > 1 else ''} found")
        raise InputError(report.problems)
    print("no problem found")
    return 0
