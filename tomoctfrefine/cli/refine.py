"""``tomoctfrefine refine``: a drop-in for ``relion_tomo_refine_ctf`` (same flags, same meaning).

Differences from RELION, all deliberate:

* unknown flags are errors (RELION only warns, so a typo silently changes the job);
* ``--per_tomo_scale`` (what RELION's GUI and Scipion's wrapper emit, and RELION ignores) is read as
  ``--per_tomogram_scale``, with a notice;
* contradictory flags are errors: both scale modes; ``--d0 >= --d1`` (the collapsed scan that
  Scipion's RELION wrapper produces); an odd or non-positive ``--b``;
* ``--no_neighbour_model`` (ours): fit the scale with the neighbouring particles' signal counted as
  noise, as RELION does, instead of modelling it.
* ``--keep_hand`` (ours): when the data decisively prefer the opposite defocus hand, keep the input hand
  and only report it (RELION has no hand check). By default that hand is adopted: the refinement uses it,
  writes it as ``rlnTomoHand`` and says so in the log, ``summary.json`` and ``logfile.pdf``.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import InputError, Problem

GROUPS = {
    "I/O": [
        ("--i", dict(default="", help="Input optimisation set (its entries are overridden by the flags below)")),
        ("--p", dict(default="", help="Input particle set (STAR)")),
        ("--t", dict(default="", help="Input tomogram set (STAR)")),
        ("--mot", dict(default="", help="Input particle trajectories (STAR)")),
        ("--o", dict(default="", help="Output directory (required)")),
    ],
    "Reference map": [
        ("--ref1", dict(default="", help="Reference map, half 1")),
        ("--ref2", dict(default="", help="Reference map, half 2")),
        ("--mask", dict(default="", help="Reference mask")),
        ("--fsc", dict(default="", help="Postprocess STAR file with the FSC (table fsc)")),
        ("--freq_cutoff", dict(type=float, default=-1.0, help="Explicit cutoff frequency (in Å; negative to turn off)")),
        ("--fsc_thresh_width", dict(type=float, default=5.0, help="Width of the frequency cutoff fall-off (Fourier pixels)")),
        ("--use_SNR_weight", dict(action="store_true", help="Weight each shell proportionally to its reference-map confidence")),
    ],
    "Defocus refinement options": [
        ("--do_defocus", dict(action="store_true", help="Refine the (astigmatic) defocus")),
        ("--lambda", dict(type=float, default=0.001, dest="lambda_", help="Defocus regularisation strength (box- and particle-count-independent here)")),
        ("--d0", dict(type=float, default=-3000.0, help="Minimal defocus offset to scan (Å)")),
        ("--d1", dict(type=float, default=3000.0, help="Maximal defocus offset to scan (Å)")),
        ("--ds", dict(type=int, default=100, help="Number of defocus samples to scan")),
        ("--do_reg_defocus", dict(action="store_true", help="Regularise the defocus across the tilts of a tomogram")),
        ("--keep_hand", dict(action="store_true", help="Keep the input defocus hand even when the data decisively prefer "
                             "the opposite one (default: adopt it, write it as rlnTomoHand and say so)")),
        ("--reset_to_common", dict(action="store_true", help="Start all tilts from the lowest-dose tilt's CTF (with --do_reg_defocus)")),
        ("--kmin", dict(type=float, default=30.0, help="Lowest spatial frequency used (Å)")),
    ],
    "Scale estimation options": [
        ("--do_scale", dict(action="store_true", help="Refine the contrast scale")),
        ("--per_frame_scale", dict(action="store_true", help="Estimate the scale per tilt (no Beer-Lambert model)")),
        ("--per_tomogram_scale", dict(action="store_true", help="Fit a Beer-Lambert model per tomogram, with its own luminance")),
        ("--per_tomo_scale", dict(action="store_true", help=argparse.SUPPRESS)),
        ("--no_neighbour_model", dict(action="store_true", help="Fit the scale without modelling the neighbouring particles "
                                      "in each box (faster, as RELION; their signal then counts as noise)")),
    ],
    "Aberration refinement options": [
        ("--do_even_aberrations", dict(action="store_true", help="Refine the symmetric (even) aberrations")),
        ("--do_odd_aberrations", dict(action="store_true", help="Refine the antisymmetric (odd) aberrations")),
        ("--ne", dict(type=int, default=4, help="Maximal even N-L order (2, 4, 6 or 8)")),
        ("--no", dict(type=int, default=3, help="Maximal odd N-L order (1, 3, 5 or 7)")),
    ],
    "Computational options": [
        ("--b", dict(type=int, default=None, help="Box size to be used for the estimation (required)")),
        ("--j", dict(type=int, default=6, help="Number of threads (per MPI rank)")),
        ("--only_do_unfinished", dict(action="store_true", help="Skip tomograms that were finished by an earlier run")),
        ("--per_frame_noise", dict(action="store_true", help="Estimate the noise spectrum per tilt")),
        ("--min_frame", dict(type=int, default=0, help="First tilt index to refine (table order)")),
        ("--max_frame", dict(type=int, default=-1, help="Last tilt index to refine (table order; <= 0: all)")),
        ("--cutoff_fract", dict(type=float, default=0.02, help="Ignore shells with a weight below this fraction")),
        ("--diag", dict(action="store_true", help="Write diagnostic files")),
        ("--assess", dict(action="store_true", help="Reconstruct the particle before and after refinement and report the FSC gain")),
        ("--theme", dict(default="", help=argparse.SUPPRESS)),
        ("--list_themes", dict(action="store_true", help=argparse.SUPPRESS)),
        ("--pipeline_control", dict(default="", help=argparse.SUPPRESS)),
    ],
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "refine",
        help="refine per-tilt defocus, contrast scale and aberrations (relion_tomo_refine_ctf flags)",
        description="Refine the per-tilt CTF of cryo-ET tilt series; flags as relion_tomo_refine_ctf. "
        "Under MPI (mpirun -np N tomoctfrefine refine ...) tomograms are spread over the ranks.",
        allow_abbrev=False,
    )
    for title, flags in GROUPS.items():
        group = parser.add_argument_group(title)
        for flag, keywords in flags:
            group.add_argument(flag, **keywords)
    parser.set_defaults(run=run)
    return parser


def check_flags(args: argparse.Namespace) -> list[Problem]:
    """Problems with the flags themselves (contradictions, missing required flags)."""
    problems = []
    if args.b is None:
        problems.append(Problem("--b", "the estimation box size is required", "give --b, e.g. --b 256"))
    elif args.b <= 0 or args.b % 2:
        problems.append(Problem("--b", f"the box size must be a positive even number, got {args.b}", "use an even --b such as 128, 256 or 512"))
    if not args.o:
        problems.append(Problem("--o", "the output directory is required", "give --o DIR"))
    if not args.i and not (args.p and args.t):
        problems.append(Problem("--i", "no input: give an optimisation set with --i, or --p, --t, --ref1 and --ref2", "add --i optimisation_set.star"))
    if args.per_frame_scale and args.per_tomogram_scale:
        problems.append(Problem("--per_frame_scale/--per_tomogram_scale", "the two scale models contradict each other", "choose one scale model"))
    if args.do_defocus and args.d0 >= args.d1:
        problems.append(Problem("--d0/--d1", f"the defocus scan is empty: --d0 {args.d0:g} is not below --d1 {args.d1:g}", "scan a range such as --d0 -3000 --d1 3000"))
    if args.do_defocus and args.ds < 2:
        problems.append(Problem("--ds", f"the defocus scan needs at least 2 samples, got {args.ds}", "use e.g. --ds 100"))
    if args.ne not in (2, 4, 6, 8) and args.do_even_aberrations:
        problems.append(Problem("--ne", f"the even aberration order must be 2, 4, 6 or 8, got {args.ne}", "use --ne 4"))
    if args.no not in (1, 3, 5, 7) and args.do_odd_aberrations:
        problems.append(Problem("--no", f"the odd aberration order must be 1, 3, 5 or 7, got {args.no}", "use --no 3"))
    if args.j < 1:
        problems.append(Problem("--j", f"the thread count must be at least 1, got {args.j}", "use --j 1 or more"))
    if args.lambda_ < 0:
        problems.append(Problem("--lambda", f"the regularisation strength cannot be negative, got {args.lambda_:g}", "use --lambda 0.1"))
    return problems


def options_from_args(args: argparse.Namespace):
    """Translate RELION's flags into :class:`tomoctfrefine.pipeline.RefineOptions`."""
    from ..pipeline import RefineOptions

    if args.per_frame_scale:
        scale_mode = "per_frame"
    elif args.per_tomogram_scale:
        scale_mode = "per_tomogram"
    else:
        scale_mode = "global"
    return RefineOptions(
        box_size_px=args.b,
        do_defocus=args.do_defocus,
        defocus_scan_min_angstrom=args.d0,
        defocus_scan_max_angstrom=args.d1,
        defocus_scan_steps=args.ds,
        regularise_defocus=args.do_reg_defocus,
        regularisation_lambda=args.lambda_,
        reset_to_common=args.reset_to_common,
        kmin_angstrom=args.kmin,
        do_scale=args.do_scale,
        scale_mode=scale_mode,
        do_even_aberrations=args.do_even_aberrations,
        even_order=args.ne,
        do_odd_aberrations=args.do_odd_aberrations,
        odd_order=args.no,
        freq_cutoff_angstrom=args.freq_cutoff,
        fsc_threshold_width_px=args.fsc_thresh_width,
        use_snr_weight=args.use_SNR_weight,
        per_frame_noise=args.per_frame_noise,
        min_frame=args.min_frame,
        max_frame=args.max_frame,
        cutoff_fraction=args.cutoff_fract,
        threads=args.j,
        only_do_unfinished=args.only_do_unfinished,
        diagnostics=args.diag,
        assess=args.assess,
        model_neighbours=not args.no_neighbour_model,
        adopt_hand=not args.keep_hand,
    )


def run(args: argparse.Namespace) -> int:
    if args.per_tomo_scale:
        print("notice: --per_tomo_scale is read as --per_tomogram_scale (RELION ignores the short spelling "
              "and silently runs the global fit instead)", file=sys.stderr)
        args.per_tomogram_scale = True
    problems = check_flags(args)
    if problems:
        raise InputError(problems)
    from ..io.optimisation_set import read_optimisation_set
    from ..pipeline import run_refinement

    optimisation_set = read_optimisation_set(
        args.i or None, particles=args.p or None, tomograms=args.t or None, trajectories=args.mot or None,
        ref1=args.ref1 or None, ref2=args.ref2 or None, mask=args.mask or None, fsc=args.fsc or None,
    )
    command_line = "tomoctfrefine refine " + " ".join(sys.argv[2:])
    run_refinement(optimisation_set, options_from_args(args), args.o, command_line=command_line)
    return 0
