"""``tomoctfrefine simulate --out DIR``: write a synthetic RELION-5 dataset with known truth.

Every field of :class:`tomoctfrefine.simulate.SimulationParameters` is a flag of the same name
(``--n_tilts 41``, ``--even_zernike 0,0,0,0,0,0,0,0,600``, ``--write_noiseless``/``--no-write_noiseless``);
``--preset`` starts from a named parameter set and the other flags override it.
"""
from __future__ import annotations

import argparse
import time
import typing
from dataclasses import fields
from pathlib import Path

from ..errors import InputError, Problem
from ..simulate import PRESETS, TRUTH_JSON, SimulationParameters, load_truth, simulate_dataset

_DOC = typing.get_type_hints(SimulationParameters)


def _float_list(text: str) -> tuple:
    body = text.strip().strip("[]")
    try:
        return tuple(float(v) for v in body.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _argument_type(name: str):
    hint = _DOC[name]
    args = typing.get_args(hint)
    if hint is tuple:
        return dict(type=_float_list, metavar="C0,C1,...")
    if hint is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if args and type(None) in args:
        kind = next(a for a in args if a is not type(None))
        return dict(type=_optional(kind), metavar=kind.__name__.upper() + "|none")
    return dict(type=hint, metavar=hint.__name__.upper())


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate",
        help="write a synthetic RELION-5 dataset with known truth",
        description="Simulate tilt series of Gaussian pseudo-atom particles (RELION-5 files, truth in truth/truth.json).",
    )
    parser.add_argument("--out", required=True, help="output folder (created; files inside are replaced)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="named parameter set to start from (default: small)")
    parser.add_argument("--quiet", action="store_true", help="print only the optimisation set path")
    defaults = SimulationParameters()
    group = parser.add_argument_group("simulation parameters (default: the preset's value)")
    for f in fields(SimulationParameters):
        group.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=f"(small preset: {getattr(defaults, f.name)})",
                           **_argument_type(f.name))
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    names = {f.name for f in fields(SimulationParameters)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    params = SimulationParameters.from_preset(args.preset, **overrides)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError([Problem("--out", f"{out} exists and is not a folder", "give a folder path")])
    started = time.perf_counter()
    opt = simulate_dataset(out, params, verbose=not args.quiet)
    if args.quiet:
        print(opt)
        return 0
    truth = load_truth(out)
    n_particles = sum(truth["n_particles"])
    print(f"wrote {opt} in {time.perf_counter() - started:.1f} s:")
    print(f"  {params.n_tomograms} tilt series x {params.n_tilts} tilts of {params.image_size_px}² px at "
          f"{params.pixel_size_angstrom} Å (tilt_series/*.mrc, tomograms.star, tilt_series/*.star: starting CTF, "
          f"defocus {params.start_defocus_rms_angstrom:g} Å RMS off, scale {params.start_scale:g})")
    print(f"  {n_particles} particles (particles.star), {params.voltage_kv:g} kV, hand {params.hand:+d} "
          f"(written {truth['written_hand']:+d}), SNR {params.snr:g} (noise sigma {truth['noise_sigma']:.4g})")
    print(f"  references: ref/half1.mrc, ref/half2.mrc, ref/mask.mrc, ref/map_true.mrc, ref/postprocess.star "
          f"({params.box_size_px}³ px; half-map FSC 0.143 at {truth['half_map_fsc_resolution_angstrom']:.2f} Å)")
    print(f"  truth: {out / TRUTH_JSON}, truth/optimisation_set_true.star (true CTF, scale, Zernike)"
          + (", truth/tilt_series/*_noiseless.mrc" if params.write_noiseless else ""))
    print(f"  run tools from {out} (paths inside the STAR files are relative to it)")
    return 0
