"""``tomoctfrefine demo``: simulate a small dataset, refine it with the RELION-5 tutorial settings,
and show start versus refined versus truth (then the map before and after)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="simulate, refine and assess a small dataset with known truth (about a minute)",
        description="Simulate a small RELION-5 dataset with known truth, refine it in one pass with the RELION-5 "
        "tutorial settings (regularised defocus with lambda 0.1, per-frame scale; box 128 because the demo's "
        "images are small), and compare with the truth.")
    parser.add_argument("--out", default="tomoctfrefine_demo", help="folder for the dataset and the results")
    parser.add_argument("--j", type=int, default=2, help="threads")
    parser.add_argument("--no_assess", action="store_true", help="skip the before/after reconstruction")
    parser.set_defaults(run=run)
    return parser


def _truth_arrays(truth: dict, name: str) -> dict:
    tilts = truth["tomograms"][name]
    return {key: np.array([t[key] for t in tilts]) for key in ("dfu", "dfv", "dfang", "scale", "nominal", "pre_exposure")}


def run(args: argparse.Namespace) -> int:
    from ..io.optimisation_set import read_optimisation_set
    from ..io.tomograms import read_tomogram_set, tomogram, tomogram_names
    from ..pipeline import RefineOptions, run_refinement
    from ..simulate import SimulationParameters, load_truth, simulate_dataset

    started = time.time()
    folder = Path(args.out)
    print(f"1. simulating a small dataset with known truth in {folder}/ ...")
    opt_path = simulate_dataset(folder / "data", SimulationParameters())
    truth = load_truth(folder / "data")
    print("2. refining in one pass with the RELION-5 tutorial settings ...")
    options = RefineOptions(box_size_px=128, do_defocus=True, regularise_defocus=True, regularisation_lambda=0.1,
                            regularise_astigmatism_only=True, do_scale=True, scale_mode="per_frame", threads=args.j)
    out = run_refinement(read_optimisation_set(opt_path), options, folder / "refined",
                         command_line=f"tomoctfrefine refine --i {opt_path} --o {folder / 'refined'} --b 128 "
                                      "--do_defocus --do_reg_defocus --lambda 0.1 --reg_astigmatism_only --do_scale --per_frame_scale")
    before = read_tomogram_set(read_optimisation_set(opt_path).resolved("tomograms_path"))
    after = read_tomogram_set(read_optimisation_set(out).resolved("tomograms_path"))
    import json

    summary = json.loads((folder / "refined" / "summary.json").read_text())
    print()
    truth_entries = {}  # drawn in the plots
    for name in tomogram_names(after):
        start, refined, true = tomogram(before, name), tomogram(after, name), _truth_arrays(truth, name)
        sigma = np.asarray(summary["tomograms"][name].get("defocus_uncertainty_angstrom", np.zeros(start.tilt_count)))
        mean_start = (start.defocus_u_angstrom + start.defocus_v_angstrom) / 2
        mean_refined = (refined.defocus_u_angstrom + refined.defocus_v_angstrom) / 2
        mean_true = (true["dfu"] + true["dfv"]) / 2
        factor = np.sum(refined.ctf_scale * true["scale"]) / np.sum(true["scale"] ** 2)
        print(f"{name}: mean defocus (Å) and contrast scale per tilt")
        print(f"{'tilt':>6} {'dose':>5} | {'start':>8} {'refined':>8} {'± 1σ':>5} {'truth':>8} | {'scale':>6} {'truth':>6}")
        for f in np.argsort(true["nominal"]):
            print(f"{true['nominal'][f]:6.1f} {true['pre_exposure'][f]:5.0f} | {mean_start[f]:8.0f} {mean_refined[f]:8.0f} "
                  f"{sigma[f]:5.0f} {mean_true[f]:8.0f} | {refined.ctf_scale[f]:6.3f} {true['scale'][f]:6.3f}")
        rms = lambda e: float(np.sqrt(np.mean(e**2)))  # noqa: E731
        print(f"defocus error RMS: start {rms(mean_start - mean_true):.0f} Å -> refined {rms(mean_refined - mean_true):.0f} Å "
              f"(median 1σ {np.median(sigma):.0f} Å); scale error after one global factor ({factor:.3f}): "
              f"{100 * rms(refined.ctf_scale / factor / true['scale'] - 1):.1f} %")
        hand = summary["tomograms"][name].get("hand")
        if hand:
            print(f"hand check: {hand['message']}")
        truth_entries[name] = {"defocus_true_angstrom": mean_true, "defocus_u_true_angstrom": true["dfu"],
                               "defocus_v_true_angstrom": true["dfv"], "defocus_angle_true_deg": true["dfang"],
                               "scale_true": true["scale"]}
    from ..report import extend_report

    result = None
    if not args.no_assess:
        from ..assess import assess, summary_lines
        from ..progress import print_line

        print("\n3. reconstructing the particle with the starting and the refined CTF ...")
        result = assess(read_optimisation_set(opt_path), read_optimisation_set(out), folder / "assess", box_size_px=128,
                        crop_size_px=64, truth_path=folder / "data" / "ref" / "map_true.mrc",
                        log=lambda message: print_line(f"   [{time.strftime('%H:%M:%S')}] {message}"))
        for line in summary_lines(result):
            print("   " + line)
    extend_report(folder / "refined", assessment=result, per_tomogram=truth_entries)  # truth and FSC in the plots
    print(f"\nplots: {folder / 'refined' / 'plots'}/*.png and {folder / 'refined' / 'logfile.pdf'}; "
          f"RELION files: {out}")
    print(f"demo finished in {time.time() - started:.0f} s")
    return 0
