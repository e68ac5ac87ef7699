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

#: ``tomoctfrefine refine``'s defaults for the flags :func:`command_line` writes only when they differ.
_CLI_DEFAULTS = dict(defocus_scan_steps=100, kmin_angstrom=30.0, freq_cutoff_angstrom=-1.0, fsc_threshold_width_px=5.0,
                     min_frame=0, max_frame=-1, cutoff_fraction=0.02)


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

    Parsed by ``tomoctfrefine refine`` it gives back ``options`` exactly (tested). Flags whose value is
    the CLI's default are left out, except ``--d0``/``--d1`` (always written with ``--do_defocus``, as
    RELION's GUI does) and ``--j``. ``options.check_hand`` has no flag (the CLI always checks the hand).
    With ``ranks > 1`` the command starts with ``mpirun -np <ranks>``.
    """
    o = options
    flags = ["--i", optimisation_set, "--o", out_dir, "--b", str(o.box_size_px)]
    if o.do_defocus:
        flags += ["--do_defocus"]
    if o.do_defocus or (o.defocus_scan_min_angstrom, o.defocus_scan_max_angstrom) != (-3000.0, 3000.0):
        flags += ["--d0", _number(o.defocus_scan_min_angstrom), "--d1", _number(o.defocus_scan_max_angstrom)]
    if o.defocus_scan_steps != _CLI_DEFAULTS["defocus_scan_steps"]:
        flags += ["--ds", str(o.defocus_scan_steps)]
    if o.regularise_defocus:
        flags += ["--do_reg_defocus"]
    if o.regularisation_lambda != 0.001:
        flags += ["--lambda", _number(o.regularisation_lambda)]
    if o.reset_to_common:
        flags += ["--reset_to_common"]
    if o.kmin_angstrom != _CLI_DEFAULTS["kmin_angstrom"]:
        flags += ["--kmin", _number(o.kmin_angstrom)]
    if not o.adopt_hand:
        flags += ["--keep_hand"]
    if o.do_scale:
        flags += ["--do_scale"]
    # The scale model is written whether or not the scale is refined: it is an option of its own.
    flags += {"per_frame": ["--per_frame_scale"], "per_tomogram": ["--per_tomogram_scale"]}.get(o.scale_mode, [])
    if not o.model_neighbours:
        flags += ["--no_neighbour_model"]
    if o.do_even_aberrations:
        flags += ["--do_even_aberrations"]
    if o.even_order != 4:
        flags += ["--ne", str(o.even_order)]
    if o.do_odd_aberrations:
        flags += ["--do_odd_aberrations"]
    if o.odd_order != 3:
        flags += ["--no", str(o.odd_order)]
    for field, flag in (("freq_cutoff_angstrom", "--freq_cutoff"), ("fsc_threshold_width_px", "--fsc_thresh_width"),
                        ("min_frame", "--min_frame"), ("max_frame", "--max_frame"), ("cutoff_fraction", "--cutoff_fract")):
        if getattr(o, field) != _CLI_DEFAULTS[field]:
            flags += [flag, _number(getattr(o, field))]
    for field, flag in (("use_snr_weight", "--use_SNR_weight"), ("per_frame_noise", "--per_frame_noise"),
                        ("only_do_unfinished", "--only_do_unfinished"), ("diagnostics", "--diag"), ("assess", "--assess")):
        if getattr(o, field):
            flags += [flag]
    flags += ["--j", str(o.threads)]
    prefix = ["mpirun", "-np", str(ranks)] if ranks > 1 else []
    return " ".join(shlex.quote(word) for word in prefix + ["tomoctfrefine", "refine"] + flags)


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

    world = World()
    try:
        # Under MPI a rank that fails aborts every rank (code 2 for an input problem, 1 otherwise),
        # printing its message first; the other ranks would otherwise wait for it at a barrier.
        with world.guard():
            run_step(args.step, args.out_dir, args.optimisation_set, args.options, world)
    except InputError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
