"""Run one step of the engine's pipeline in its own process (under ``mpirun`` for MPI).

The protocol launches this module with ``runJob`` so that Scipion's ``hosts.conf`` decides how MPI
processes start, the engine's numba threads never share a process with Scipion, and a crash of one
step leaves the previous steps' files for "continue"::

    python .../tomoctfrefine/protocols/engine_step.py prepare OUT_DIR --optimisation-set F --options F.json
    python .../tomoctfrefine/protocols/engine_step.py refine_defocus OUT_DIR
    (refine_scale, refine_aberrations, write_outputs, assess_refinement likewise)

It is run as a script (not ``python -m``) so that the package ``tomoctfrefine.protocols``, which
imports Scipion, is not imported: this file imports only the engine.
Exit code 2 with one line per problem for bad input (``InputError``), as the CLI does.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

STEPS = ("prepare", "refine_defocus", "refine_scale", "refine_aberrations", "write_outputs", "assess_refinement")


def refine_options(values: dict):
    """``tomoctfrefine.pipeline.RefineOptions`` from the protocol's JSON, refusing names it lacks."""
    from tomoctfrefine.pipeline import RefineOptions

    known = {f.name for f in dataclasses.fields(RefineOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"RefineOptions has no field(s) {unknown}: the protocol and the engine disagree")
    return RefineOptions(**values)


def run_step(step: str, out_dir: str, optimisation_set: str | None = None, options_json: str | None = None):
    """Call ``tomoctfrefine.pipeline.<step>``; ``prepare`` also reads the optimisation set and options."""
    from tomoctfrefine import pipeline

    if step == "prepare":
        from tomoctfrefine.io.optimisation_set import read_optimisation_set

        with open(options_json) as handle:
            options = refine_options(json.load(handle))
        return pipeline.prepare(read_optimisation_set(optimisation_set), options, out_dir)
    return getattr(pipeline, step)(out_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="engine_step.py")
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("out_dir")
    parser.add_argument("--optimisation-set")
    parser.add_argument("--options")
    args = parser.parse_args(argv)
    if args.step == "prepare" and not (args.optimisation_set and args.options):
        parser.error("prepare needs --optimisation-set and --options")
    from tomoctfrefine.errors import InputError

    try:
        run_step(args.step, args.out_dir, args.optimisation_set, args.options)
    except InputError as error:
        print(str(error), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
