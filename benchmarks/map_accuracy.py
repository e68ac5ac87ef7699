"""Map-level accuracy at high resolution (issue 11): the particle reconstructed with our one-pass CTF
against the one reconstructed with the true CTF, at boxes 128, 256 and 512, with and without aberrations.

Datasets (``tomoctfrefine.simulate`` presets, simulated once and cached in ``benchmarks/cache/``):

    map              2 x 41 tilts ±60°, 3 e/Å² per tilt, 1024² px at 1.35 Å, 270 particles of a 128-px
                     reference of sharp pseudo-atoms (signal to ~4 Å), SNR 0.1, start ~950 Å RMS off, 300 kV
    map_aberrations  the same with even (rho^4 1.2 rad + Z(4,4) 1.5 rad at 3.5 Å) and odd (trefoil 1 rad,
                     coma 0.2 rad at 3.5 Å) aberrations

Each is refined in ONE pass with the tutorial settings (defocus ±3000 Å / 100 steps, regularised lambda 0.1,
per-frame scale; even order 4 and odd order 3 aberrations too for map_aberrations) at each box, and the
particle is reconstructed like the issue's ``relion_tomo_reconstruct_particle --b 256 --crop 128`` with the
starting, refined and true CTF; each map is compared with the true map inside the mask (masked
correlation, FSC 0.5 and 0.143 against it). The per-tilt defocus and scale errors are given per dose band
next to their Cramér-Rao bounds (the refinement's statistics taken to the true CTF, see
``common.bounds_from_refinement``), and the even/odd
phase errors from 30 Å to Nyquist (2.7 Å).

If ``RELION_BIN`` names the folder of RELION 5's binaries (a CPU build of RELION 5.0.1, commit
73f0a3c0: ``cmake <src> -DGUI=OFF -DCUDA=OFF -DALTCPU=OFF -DDoublePrec_CPU=ON -DFETCH_WEIGHTS=OFF``, then
``make refine_ctf reconstruct_particle``; the programs land in ``<build>/bin``), the true, starting and
our refined CTF are reconstructed by ``relion_tomo_reconstruct_particle --b 256 --crop 128`` too and
printed side by side with our reconstruction (issue 11, item 3), and ``relion_tomo_refine_ctf`` is run
with the same tutorial settings (``--relion-boxes``) and its result reconstructed by us (a row of the
main table) and by RELION. RELION's outputs are cached under ``cache/out/relion_*``; GNU ``time`` (on
``PATH``) measures RELION's peak memory.

    python benchmarks/map_accuracy.py                       # boxes 128, 256, 512
    python benchmarks/map_accuracy.py --boxes 128,256       # box 512 takes longest
    python benchmarks/map_accuracy.py --only map --regularisation relion
    RELION_BIN=<build>/bin python benchmarks/map_accuracy.py --boxes 256,512 --relion-boxes 256 --relion-only
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from common import fmt, verdict  # noqa: E402

#: Issue 11, item 2: the refined-CTF map within this masked correlation of the true-CTF map.
TARGET_CORRELATION_GAP = 0.003
RECONSTRUCTION_BOX, RECONSTRUCTION_CROP = 256, 128

#: RELION 5.0.1 on the issue's independent dataset (reconstructed by relion_tomo_reconstruct_particle).
RELION_ISSUE = {
    "map": [("starting values", 0.111, "6.6"), ("true CTF", 0.489, "4.0"), ("RELION box 256, one pass", 0.489, "4.0"),
            ("RELION box 512 (tutorial), one pass", 0.4749, "4.1"), ("RELION box 128, one pass", 0.4725, "4.0")],
    "map_aberrations": [("true CTF", 0.566, "3.76"), ("aberrations ignored", 0.463, "4.4"),
                        ("RELION everything, box 256, one pass", 0.542, "3.84"),
                        ("RELION everything, box 512 (tutorial), one pass", 0.528, "3.93")],
}


def relion_environment() -> dict:
    """Open MPI (RELION's programs link it) refuses to run as root without these."""
    return {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def relion_refine(data: Path, out: Path, box: int, everything: bool, relion_bin: Path, log) -> dict:
    """``relion_tomo_refine_ctf`` with the tutorial settings (skipped if its output exists)."""
    if (out / "optimisation_set.star").exists():
        return json.loads((out / "benchmark.json").read_text()) if (out / "benchmark.json").exists() else {}
    shutil.rmtree(out, ignore_errors=True)
    command = [str(relion_bin / "relion_tomo_refine_ctf"), "--i", "optimisation_set.star", "--o", str(out) + "/", "--b", str(box),
               "--do_defocus", "--d0", "-3000", "--d1", "3000", "--ds", "100", "--do_reg_defocus", "--lambda", "0.1",
               "--do_scale", "--per_frame_scale", "--j", "2"]
    if everything:
        command += ["--do_even_aberrations", "--ne", "4", "--do_odd_aberrations", "--no", "3"]
    log(f"  RELION: {' '.join(command)}")
    started = time.time()
    # GNU time (the program on PATH; no shell, so not the shell keyword) reports RELION's peak memory.
    result = subprocess.run(["time", "-f", "MAXRSS %M", *command], cwd=data, capture_output=True, text=True,
                            env=relion_environment())
    if result.returncode:
        raise RuntimeError(f"RELION failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    peak = [float(line.split()[1]) / 1024 for line in result.stderr.splitlines() if line.startswith("MAXRSS")]
    measure = {"wall_s": time.time() - started, "peak_mb": peak[-1] if peak else float("nan"), "load": os.getloadavg()[0]}
    (out / "relion.out").write_text(result.stdout[-20000:] + result.stderr[-20000:])
    (out / "benchmark.json").write_text(json.dumps(measure))
    return measure


def _inputs_key(data: Path, opt_path: Path) -> str:
    """The optimisation set and the particle and tomogram files it names, with their modification times
    (a refinement written again invalidates the cached reconstruction)."""
    from tomoctfrefine.io.optimisation_set import read_optimisation_set

    with common.in_folder(data):
        opt = read_optimisation_set(Path(opt_path).resolve())
        files = [Path(opt_path).resolve(), Path(opt.resolved("particles_path")).resolve(), Path(opt.resolved("tomograms_path")).resolve()]
    return " ".join(f"{f} {f.stat().st_mtime}" for f in files)


def relion_reconstruct(data: Path, opt_path: Path, out: Path, relion_bin: Path, log, cached_only: bool = False) -> dict | None:
    """``relion_tomo_reconstruct_particle --b 256 --crop 128`` of ``opt_path`` into ``out`` and its merged
    map against the true map (cached in ``out/relion_map.json``, keyed on the input files)."""
    from tomoctfrefine.io.maps import read_map

    record = out / "relion_map.json"
    key = _inputs_key(data, opt_path)
    saved = common.keyed_measures(record, key)
    if saved is not None or cached_only:
        return saved
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = [str(relion_bin / "relion_tomo_reconstruct_particle"), "--i", str(Path(opt_path).resolve()), "--o", str(out) + "/",
               "--b", str(RECONSTRUCTION_BOX), "--crop", str(RECONSTRUCTION_CROP), "--j", "2"]
    log(f"  RELION: {' '.join(command)}")
    started = time.time()
    result = subprocess.run(command, cwd=data, capture_output=True, text=True, env=relion_environment())
    (out / "relion.out").write_text(result.stdout[-20000:] + result.stderr[-20000:])
    if result.returncode:
        raise RuntimeError(f"RELION failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    measures = common.against_true_map(*read_map(out / "merged.mrc"), data)
    measures["seconds"] = time.time() - started
    common.save_keyed_measures(record, key, measures)
    return measures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", default="128,256,512", help="refinement boxes (comma-separated)")
    parser.add_argument("--report", action="store_true", help="only print the table of what is already cached (no new runs)")
    parser.add_argument("--only", default="map,map_aberrations", help="datasets: map, map_aberrations")
    parser.add_argument("--relion-boxes", default=None,
                        help="boxes of the RELION refinements (RELION_BIN set; default: --boxes)")
    parser.add_argument("--relion-only", action="store_true",
                        help="with RELION_BIN: no new tomoctfrefine refinements (cached ones, whatever options they were made "
                             "with), RELION runs as needed")
    parser.add_argument("--regularisation", choices=("wiener", "relion"), default="relion",
                        help="reconstruction regularisation (relion: the maps relion_tomo_reconstruct_particle writes, "
                             "as in the issue's measurements; wiener: per-shell Wiener from the half sets)")
    args = parser.parse_args(argv)
    boxes = [int(b) for b in args.boxes.split(",") if b.strip()]
    relion_boxes = [int(b) for b in args.relion_boxes.split(",") if b.strip()] if args.relion_boxes is not None else boxes
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    relion_bin = Path(os.environ["RELION_BIN"]) if os.environ.get("RELION_BIN") else None
    header = common.machine_header()
    started_all = time.time()

    def log(message):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    tables = []
    out_root = common.CACHE / "out"
    for name in names:
        if name not in ("map", "map_aberrations"):
            parser.error(f"--only: unknown dataset {name!r}")
        if args.report and not (common.dataset_folder(name) / "truth" / "truth.json").exists():
            continue
        data = common.dataset(name, name, log=log)
        everything = name == "map_aberrations"
        rows = []

        def map_of(path, tag):
            if not args.report:
                log(f"  reconstructing {name}: {tag} (box {RECONSTRUCTION_BOX}, crop {RECONSTRUCTION_CROP}, {args.regularisation}) ...")
            return common.map_measures(path, data, RECONSTRUCTION_BOX, RECONSTRUCTION_CROP,
                                       common.CACHE / "out" / f"{name}_map_{tag}_{args.regularisation}",
                                       regularisation=args.regularisation, log=log, cached_only=args.report)

        true_map = map_of(data / "truth" / "optimisation_set_true.star", "true")
        other = "wiener" if args.regularisation == "relion" else "relion"
        other_map = common.map_measures(data / "truth" / "optimisation_set_true.star", data, RECONSTRUCTION_BOX, RECONSTRUCTION_CROP,
                                        common.CACHE / "out" / f"{name}_map_true_{other}", regularisation=other, log=log,
                                        cached_only=args.report)
        if true_map is None or other_map is None:
            continue
        print(f"true-CTF map: correlation {true_map['masked_correlation']:.4f} ({args.regularisation}), "
              f"{other_map['masked_correlation']:.4f} ({other}); FSC 0.5 {fmt(true_map['fsc_0.5_angstrom'], 2)} / "
              f"{fmt(other_map['fsc_0.5_angstrom'], 2)} Å", flush=True)
        start_map = map_of(data / "optimisation_set.star", "start")
        start_row, bounds_by_box, refined_maps = len(rows), {}, {}
        rows.append(("true CTF", "-", true_map, None, None))
        for box in boxes:
            out = common.CACHE / "out" / f"{name}_b{box}"
            if args.relion_only and relion_bin is not None:
                measure = cached_refinement(out)
            else:
                measure = common.refine_once(data, out, common.tutorial_options(box, everything=everything), log=log,
                                             cached_only=args.report)
            if measure is None:
                continue
            bounds = bounds_by_box[box] = common.bounds_from_refinement(data, out)
            if start_map is not None and not any(r[0] == "starting CTF" for r in rows):
                start_errors = common.ctf_errors(data, common.ctf_table_of(data / "optimisation_set.star", data), bounds)
                rows.insert(start_row, ("starting CTF", "-", start_map, start_errors, None))
            errors = common.ctf_errors(data, common.refined_table(out, data), bounds)
            refined_map = map_of(out / "optimisation_set.star", f"b{box}")
            if refined_map is None:
                continue
            refined_maps[box] = refined_map
            rows.append(("tomoctfrefine, one pass", box, refined_map, errors, measure))
            if not args.report:
                print_table(name, rows, true_map, header, args, partial=True)
        side = []
        if relion_bin is not None:
            side = relion_rows(name, data, everything, rows, side, true_map, start_map, refined_maps, bounds_by_box, boxes,
                               relion_boxes, relion_bin, args, log, out_root)
        tables.append((name, rows, true_map, side))
    for name, rows, true_map, side in tables:
        print_table(name, rows, true_map, header, args)
        if side:
            print_side_by_side(name, side, header, args)
    print(f"\ntotal {time.time() - started_all:.0f} s; outputs in {common.CACHE / 'out'}")


def cached_refinement(out: Path) -> dict | None:
    """The measure of a finished refinement in ``out`` whatever options it was made with (``--relion-only``:
    compare RELION with what is there, never refine again)."""
    record = out / "benchmark.json"
    if not (record.exists() and (out / "optimisation_set.star").exists()):
        return None
    return json.loads(record.read_text())["measure"]


def relion_rows(name, data, everything, rows, side, true_map, start_map, refined_maps, bounds_by_box, boxes, relion_boxes,
                relion_bin, args, log, out_root) -> list:
    """RELION's side: ``relion_tomo_reconstruct_particle`` of the true, starting and our refined CTF (issue 11,
    item 3), and ``relion_tomo_refine_ctf`` with the tutorial settings, reconstructed by us (row of the main
    table) and by RELION (item 1). Returns the side-by-side rows ``(label, box, ours, RELION's)``."""
    cached_only = args.report

    def recon(opt_path, tag):
        if not cached_only:
            log(f"  RELION reconstruction of {name}: {tag} ...")
        return relion_reconstruct(data, opt_path, out_root / f"relion_{name}_recon_{tag}", relion_bin, log, cached_only=cached_only)

    side.append(("true CTF", "-", true_map, recon(data / "truth" / "optimisation_set_true.star", "true")))
    if start_map is not None:
        side.append(("starting CTF", "-", start_map, recon(data / "optimisation_set.star", "start")))
    for box in boxes:
        opt_path = out_root / f"{name}_b{box}" / "optimisation_set.star"
        if box in refined_maps and opt_path.exists():
            side.append(("tomoctfrefine, one pass", box, refined_maps[box], recon(opt_path, f"b{box}")))
    for box in relion_boxes:
        out = out_root / f"relion_{name}_refine_b{box}"
        if cached_only and not (out / "optimisation_set.star").exists():
            continue
        measure = relion_refine(data, out, box, everything, relion_bin, log)
        errors = common.ctf_errors(data, common.refined_table(out, data), bounds_by_box.get(box))
        if not cached_only:
            log(f"  our reconstruction of RELION's refinement ({name}, box {box}) ...")
        ours = common.map_measures(out / "optimisation_set.star", data, RECONSTRUCTION_BOX, RECONSTRUCTION_CROP,
                                   out_root / f"relion_{name}_refine_b{box}_ours_{args.regularisation}",
                                   regularisation=args.regularisation, log=log, cached_only=cached_only)
        theirs = recon(out / "optimisation_set.star", f"relion_b{box}")
        if ours is not None:
            rows.append(("RELION, one pass", box, ours, errors, measure))
        side.append(("RELION, one pass", box, ours, theirs))
    return side


def print_side_by_side(name: str, side: list, header: str, args) -> None:
    """Issue 11, item 3: each CTF reconstructed by us and by ``relion_tomo_reconstruct_particle``; the
    refined-minus-true correlation must agree to the target."""
    true_ours = next(r[2] for r in side if r[0] == "true CTF")
    true_relion = next(r[3] for r in side if r[0] == "true CTF")
    print()
    print(f"Side by side, dataset '{name}' -- {header}")
    print(f"Each CTF reconstructed by tomoctfrefine ({args.regularisation} regularisation) and by relion_tomo_reconstruct_particle "
          f"--b {RECONSTRUCTION_BOX} --crop {RECONSTRUCTION_CROP}; correlation with the true map inside the mask; target: "
          f"(RELION's - RELION's true) within {TARGET_CORRELATION_GAP} of (ours - our true).")
    print()
    head = (f"{'CTF':<26} {'box':>4} | {'ours':>6} {'- true':>7} {'FSC0.5':>6} | {'RELION':>6} {'- true':>7} {'FSC0.5':>6} | "
            f"{'RELION-ours':>11} {'of - true':>9} | verdict")
    print(head)
    print("-" * len(head))
    for label, box, ours, relion in side:
        text = f"{label:<26} {str(box):>4} | "
        if ours is not None and true_ours is not None:
            gap_ours = ours["masked_correlation"] - true_ours["masked_correlation"]
            text += f"{ours['masked_correlation']:6.4f} {gap_ours:+7.4f} {fmt(ours['fsc_0.5_angstrom'], 2, 6)} | "
        else:
            gap_ours = None
            text += f"{'-':>6} {'':>7} {'':>6} | "
        if relion is not None and true_relion is not None:
            gap_relion = relion["masked_correlation"] - true_relion["masked_correlation"]
            text += f"{relion['masked_correlation']:6.4f} {gap_relion:+7.4f} {fmt(relion['fsc_0.5_angstrom'], 2, 6)} | "
        else:
            gap_relion = None
            text += f"{'-':>6} {'':>7} {'':>6} | "
        if ours is not None and relion is not None:
            text += f"{relion['masked_correlation'] - ours['masked_correlation']:+11.4f} "
        else:
            text += f"{'':>11} "
        if gap_ours is not None and gap_relion is not None:
            text += f"{gap_relion - gap_ours:+9.4f} | "
            if label != "true CTF":
                text += verdict(abs(gap_relion - gap_ours), TARGET_CORRELATION_GAP, "", digits=4)
        else:
            text += f"{'':>9} | "
        print(text)
    sys.stdout.flush()


def print_table(name: str, rows: list, true_map: dict, header: str, args, partial: bool = False) -> None:
    print()
    print(f"{'(partial) ' if partial else ''}Map accuracy, dataset '{name}' -- {header}")
    print(f"Reconstruction: box {RECONSTRUCTION_BOX}, crop {RECONSTRUCTION_CROP}, {args.regularisation} regularisation; "
          f"correlation with the true map inside the mask; target: refined within {TARGET_CORRELATION_GAP} of the true CTF.")
    print("Per-tilt errors: defocus of the total quadratic form, RMSE (Å) and Cramér-Rao bound (the row's box; starting CTF: the first "
          "box's), from the refinement's statistics taken to the true CTF; scale: relative RMS error after one global factor and bound; "
          "phase: RMS 30 Å - Nyquist.")
    print()
    head = (f"{'CTF':<26} {'box':>4} | {'corr':>6} {'- true':>7} {'FSC0.5':>6} {'0.143':>6} | {'dz<40 RMSE':>10} {'CRB':>5} | "
            f"{'dz all':>7} {'CRB':>6} | {'scale% <40':>10} {'CRB':>5} | {'even rad':>8} {'odd rad':>7} | {'wall s':>6} {'MB':>6} | verdict")
    print(head)
    print("-" * len(head))
    for label, box, m, errors, measure in rows:
        gap = m["masked_correlation"] - true_map["masked_correlation"]
        text = f"{label:<26} {str(box):>4} | {fmt(m['masked_correlation'], 4, 6)} {gap:+7.4f} {fmt(m['fsc_0.5_angstrom'], 2, 6)} {fmt(m['fsc_0.143_angstrom'], 2, 6)} | "
        if errors is not None:
            low, every = errors["bands"]["<40"], errors["bands"]["all"]
            scale_bound = low.get("scale_bound")
            text += (f"{fmt(low['defocus_rmse'], 1, 10)} {fmt(low.get('defocus_bound'), 1, 5)} | {fmt(every['defocus_rmse'], 0, 7)} "
                     f"{fmt(every.get('defocus_bound'), 1, 6)} | {fmt(100 * low['scale_rel_rms'], 2, 10)} "
                     f"{fmt(None if scale_bound is None else 100 * scale_bound, 2, 5)} | "
                     f"{fmt(errors['phase']['even_nyquist'], 3, 8)} {fmt(errors['phase']['odd_nyquist'], 3, 7)} | ")
        else:
            text += f"{'':>10} {'':>5} | {'':>7} {'':>6} | {'':>10} {'':>5} | {'':>8} {'':>7} | "
        text += f"{fmt(measure['wall_s'], 0, 6)} {fmt(measure['peak_mb'], 0, 6)} | " if measure else f"{'':>6} {'':>6} | "
        if label.startswith("tomoctfrefine") or label.startswith("RELION"):
            text += verdict(abs(gap), TARGET_CORRELATION_GAP, " (correlation" + (", above the true-CTF map)" if gap > 0 else ")"), digits=4)
        print(text)
    if name in RELION_ISSUE:
        print()
        print("For reference, RELION 5.0.1 on the issue's independent dataset of this kind (relion_tomo_reconstruct_particle --b 256 --crop 128):")
        for label, corr, fsc in RELION_ISSUE[name]:
            print(f"  {label:<48} correlation {corr:.4f}, FSC 0.5 at {fsc} Å")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
