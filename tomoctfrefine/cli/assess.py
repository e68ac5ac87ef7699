"""``tomoctfrefine assess``: reconstruct the particles with two optimisation sets (before and after a
CTF refinement) and compare their gold-standard, mask-corrected FSCs.

``tomoctfrefine assess --before <optimisation_set> --after <optimisation_set> --o DIR [--b 128] [--crop N]
[--mask mask.mrc] [--truth map.mrc] [--SNR x] [--j N]`` writes ``DIR/before/``, ``DIR/after/`` (half maps,
merged map, ``postprocess.star``, ``optimisation_set.star``), ``DIR/fsc.png`` and ``DIR/assess.json``.
"""
from __future__ import annotations

import argparse

from ..errors import InputError, Problem
from ..io.optimisation_set import read_optimisation_set


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "assess",
        help="reconstruct before and after a refinement and compare the FSCs",
        description="Reconstruct the particles with two optimisation sets (as relion_tomo_reconstruct_particle) "
        "and report both mask-corrected FSC curves, the resolution at FSC 0.143 and the gain per frequency band.",
        allow_abbrev=False,
    )
    parser.add_argument("--before", required=True, help="Optimisation set before the refinement (e.g. its input)")
    parser.add_argument("--after", required=True, help="Optimisation set after the refinement (e.g. its output)")
    parser.add_argument("--o", required=True, help="Output directory")
    parser.add_argument("--b", type=int, default=128, help="Box size of the reconstruction (px, even; default 128)")
    parser.add_argument("--crop", type=int, default=-1, help="Size of the written maps (px; default: the box size)")
    parser.add_argument("--mask", default="", help="Mask for the FSC (default: the optimisation sets' mask)")
    parser.add_argument("--truth", default="", help="True map of simulated data, to report the correlation with it")
    parser.add_argument("--SNR", type=float, default=-1.0, help="Wiener filter with this constant SNR (overrides --regularisation)")
    parser.add_argument("--regularisation", choices=("wiener", "relion"), default="wiener",
                        help="CTF division: 'wiener' (signal/noise per shell from the half sets; default) or 'relion' "
                        "(RELION's heuristic: the maps relion_tomo_reconstruct_particle writes)")
    parser.add_argument("--j", type=int, default=0, help="Number of threads (default: all cores)")
    parser.set_defaults(run=run)
    return parser


def _log(message: str) -> None:
    """A time-stamped line (over the progress bar on a terminal)."""
    import time

    from ..progress import print_line

    print_line(f"[{time.strftime('%H:%M:%S')}] {message}")


def run(args: argparse.Namespace) -> int:
    from ..assess import assess, summary_lines

    if args.j and args.j > 0:
        import numba

        numba.set_num_threads(min(args.j, numba.config.NUMBA_NUM_THREADS))
    problems = []
    if args.b < 8 or args.b % 2:
        problems.append(Problem("--b", f"box size {args.b} must be even and at least 8", "give an even box size such as 128", "--b"))
    if args.crop > 0 and args.crop > args.b:
        problems.append(Problem("--crop", f"crop size {args.crop} is larger than the box {args.b}", "give --crop <= --b", "--crop"))
    if problems:
        raise InputError(problems)
    before = read_optimisation_set(args.before)
    after = read_optimisation_set(args.after)
    summary = assess(
        before,
        after,
        args.o,
        args.b,
        args.crop if args.crop > 0 else None,
        mask_path=args.mask or None,
        truth_path=args.truth or None,
        snr=args.SNR if args.SNR > 0 else None,
        log=_log,
        regularisation=args.regularisation,
    )
    for line in summary_lines(summary):
        print(line)
    print(f"written: {args.o}/assess.json, {summary['plot']}")
    return 0
