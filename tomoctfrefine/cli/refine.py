"""``tomoctfrefine refine``: a drop-in for ``relion_tomo_refine_ctf`` (same flags, same meaning).

The option flags, their help, defaults and validation come from :mod:`tomoctfrefine.options`; this module adds
the input/output flags and RELION's job-control flags. Differences from RELION, all deliberate:

* unknown flags are errors (RELION only warns, so a typo silently changes the job);
* ``--per_tomo_scale`` (what RELION's GUI and Scipion's wrapper emit, and RELION ignores) is read as
  ``--per_tomogram_scale``, with a notice;
* contradictory or impossible values are errors (both scale models; ``--d0 >= --d1``, the collapsed scan
  Scipion's RELION wrapper produces; an odd box; non-finite numbers);
* our own options: ``--no_neighbour_model``, ``--keep_hand``, ``--no_hand_check``, ``--reg_astigmatism_only``,
  ``--assess`` (``--help`` lists them under "tomoctfrefine's own options").
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .. import options as schema
from ..errors import InputError, Problem

#: The flags that name files, as RELION's: optimisation-set entries they override, and the output.
IO_FLAGS = (
    ("--i", "Input optimisation set (the flags below override its entries)"),
    ("--p", "Input particle set (STAR)"),
    ("--t", "Input tomogram set (STAR)"),
    ("--mot", "Input particle trajectories (STAR)"),
    ("--o", "Output directory (required)"),
)
REFERENCE_FLAGS = (
    ("--ref1", "Reference map, half 1"),
    ("--ref2", "Reference map, half 2"),
    ("--mask", "Reference mask"),
    ("--fsc", "Postprocess STAR file with the FSC (table fsc)"),
)
#: OptimisationSet field -> flag, so problems in overridden paths name the flag.
PATH_FLAGS = {"particles_path": "--p", "tomograms_path": "--t", "trajectories_path": "--mot", "ref1_path": "--ref1",
              "ref2_path": "--ref2", "mask_path": "--mask", "fsc_path": "--fsc"}
THEMES = ("classic",)


def _dest(field) -> str:
    return f"option_{field.name}"


def add_option_arguments(parser: argparse.ArgumentParser, groups: dict | None = None) -> None:
    """Add every :class:`~tomoctfrefine.options.RefineOptions` flag, with its default in its help."""
    groups = groups if groups is not None else {}
    for field in schema.fields():
        meta = field.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        if meta["kind"] == "choice":
            for value, flag in meta["values"].items():
                group.add_argument(flag, action="store_true", dest=f"choice_{field.name}_{value}",
                                   help=f"{meta['help']}: {value.replace('_', ' ')}")
            continue
        if meta["flag"] is None:
            continue
        if meta["kind"] in ("switch", "inverted_switch"):
            group.add_argument(meta["flag"], action="store_true", dest=_dest(field), help=meta["help"])
            continue
        default = field.default
        shown = "required" if default is None else f"default: {default:g}" if isinstance(default, float) else f"default: {default}"
        group.add_argument(meta["flag"], type=_number(type(default) if default is not None else int), default=default,
                           dest=_dest(field), help=f"{meta['help']} ({shown})")


def _number(kind: type):
    """argparse type for a number flag: a one-line error naming the value, nothing else accepted."""
    def parse(text: str):
        try:
            return int(text) if kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
    parse.__name__ = "whole number" if kind is int else "number"
    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "refine",
        help="refine per-tilt defocus, contrast scale and aberrations (relion_tomo_refine_ctf flags)",
        description="Refine the per-tilt CTF of cryo-ET tilt series; flags as relion_tomo_refine_ctf. "
        "Under MPI (mpirun -np N tomoctfrefine refine ...) tomograms are spread over the ranks.",
        allow_abbrev=False,
    )
    io = parser.add_argument_group("I/O")
    for flag, text in IO_FLAGS:
        io.add_argument(flag, default="", help=text)
    reference = parser.add_argument_group(schema.REFERENCE)
    for flag, text in REFERENCE_FLAGS:
        reference.add_argument(flag, default="", help=text)
    groups = {"I/O": io, schema.REFERENCE: reference}
    for title in (schema.DEFOCUS, schema.SCALE, schema.ABERRATIONS, schema.COMPUTE, schema.OURS):
        groups[title] = parser.add_argument_group(title)
    add_option_arguments(parser, groups)
    groups[schema.SCALE].add_argument("--per_tomo_scale", action="store_true", help=argparse.SUPPRESS)
    control = parser.add_argument_group("RELION job control")
    control.add_argument("--pipeline_control", default="", metavar="DIR",
                         help="Job folder of RELION's pipeliner: write RELION_JOB_EXIT_SUCCESS / FAILURE / ABORTED there "
                              "and stop between tomograms when RELION_JOB_ABORT_NOW appears")
    control.add_argument("--theme", default="", help="Console colours (RELION's GUI passes one; this program prints "
                                                     "without colours, so every theme looks the same)")
    control.add_argument("--list_themes", action="store_true", help="List the console themes and exit")
    parser.set_defaults(run=run)
    return parser


def options_from_args(args: argparse.Namespace) -> schema.RefineOptions:
    """Translate the parsed flags into :class:`~tomoctfrefine.options.RefineOptions` (no validation)."""
    values = {}
    for field in schema.fields():
        meta = field.metadata
        if meta["kind"] == "choice":
            chosen = [value for value in meta["values"] if getattr(args, f"choice_{field.name}_{value}")]
            values[field.name] = chosen[0] if len(chosen) == 1 else "both" if chosen else field.default
        elif meta["flag"] is None:
            continue
        elif meta["kind"] == "switch":
            values[field.name] = bool(getattr(args, _dest(field)))
        elif meta["kind"] == "inverted_switch":
            values[field.name] = not getattr(args, _dest(field))
        else:
            values[field.name] = getattr(args, _dest(field))
    return schema.RefineOptions(**values)


def check_flags(args: argparse.Namespace) -> list[Problem]:
    """Problems with the flags themselves (contradictions, missing required flags, impossible values)."""
    problems = schema.option_problems(options_from_args(args), naming="flag")
    if not args.o:
        problems.append(Problem("--o", "the output directory is required", "give --o DIR"))
    if not args.i and not (args.p and args.t):
        problems.append(Problem("--i", "no input: give an optimisation set with --i, or --p, --t, --ref1 and --ref2",
                                "add --i optimisation_set.star"))
    if args.theme and args.theme not in THEMES:
        problems.append(Problem("--theme", f"unknown theme {args.theme!r}", f"use one of {', '.join(THEMES)} (--list_themes)"))
    return problems


def read_inputs(args: argparse.Namespace):
    """The optimisation set named by ``--i`` with the ``--p --t --mot --ref1 --ref2 --mask --fsc`` overrides."""
    from ..io.optimisation_set import read_optimisation_set

    return read_optimisation_set(
        args.i or None, particles=args.p or None, tomograms=args.t or None, trajectories=args.mot or None,
        ref1=args.ref1 or None, ref2=args.ref2 or None, mask=args.mask or None, fsc=args.fsc or None,
    )


def command_line(argv: list[str] | None = None) -> str:
    """This process's command line as ``tomoctfrefine refine ...`` (quoted for a shell)."""
    argv = sys.argv[1:] if argv is None else argv
    tail = argv[1:] if argv and argv[0] == "refine" else argv
    return "tomoctfrefine refine " + " ".join(shlex.quote(a) for a in tail)


def run(args: argparse.Namespace) -> int:
    if args.list_themes:
        print("\n".join(THEMES))
        return 0
    from ..distribute import World
    from ..pipeline import run_refinement
    from ..pipeline.runner import job_control

    with job_control(args.pipeline_control or None, World()):
        if args.per_tomo_scale:
            print("notice: --per_tomo_scale is read as --per_tomogram_scale (RELION ignores the short spelling "
                  "and silently runs the global fit instead)", file=sys.stderr)
            setattr(args, "choice_scale_mode_per_tomogram", True)
        problems = check_flags(args)
        if problems:
            raise InputError(problems)
        run_refinement(read_inputs(args), options_from_args(args), args.o, command_line=command_line(),
                       pipeline_control=args.pipeline_control or None, flag_names=PATH_FLAGS)
    return 0
