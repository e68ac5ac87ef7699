"""Throughput and memory of the forward model (box extraction + FFT + central slice + statistics).

Prints a table: particle-tilt pairs per second of :func:`tomoctfrefine.statistics.compute_statistics`
at each box size and numba thread count (the FFTs use the same thread count), and the peak memory
of the process. Each box size runs in its own process (clean peak memory); numba compiles first
(a one-tilt warm-up run, not timed), then the full tomogram is timed.

Synthetic tomogram: 41 tilts (-60..60 deg), random half maps of size s/2, Gaussian-noise tilt images
of size max(512, 2s), weights up to Nyquist (the most expensive case).

    python benchmarks/forward_model.py                      # box 128 and 256, 1 and 2 threads
    python benchmarks/forward_model.py --boxes 512 --particles 150 --threads 2   # memory at box 512
    python benchmarks/forward_model.py --boxes 128 256 512 --json benchmarks/forward_model_results.json \
        | tee benchmarks/forward_model_results.txt           # the table README.rst shows (benchmarks/readme.py)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc


def run_child(box: int, threads: list[int], particles: int, tilts: int, flipped: bool, crop: float | None) -> dict:
    import numba
    import numpy as np

    from tomoctfrefine import reference
    from tomoctfrefine.io.tomograms import Tomogram
    from tomoctfrefine.physics.ctf import Optics
    from tomoctfrefine.physics.geometry import euler_zyz_matrices, projection_matrix
    from tomoctfrefine.statistics import compute_statistics

    load = os.getloadavg()[0]  # the machine may be shared: the wall times depend on it, the CPU times less
    rng = np.random.default_rng(0)
    image = max(512, 2 * box)
    size = (image, image, 200)
    angles = np.linspace(-60, 60, tilts)
    tomo = Tomogram(
        name="bench", optics=Optics(300.0, 2.7, 0.1), pixel_size_angstrom=1.5, size_px=size, image_size_px=(image, image),
        hand=-1.0, defocus_slope=1.0, fractional_dose_e_per_angstrom2=3.0, bfactor_per_electron_dose_angstrom2=0.0,
        projection_matrices=np.stack([projection_matrix(0.0, a, 3.0, 0.0, 0.0, 1.5, size, (image, image)) for a in angles]),
        defocus_u_angstrom=np.full(tilts, 30000.0), defocus_v_angstrom=np.full(tilts, 29000.0), defocus_angle_deg=np.full(tilts, 40.0),
        ctf_scale=np.ones(tilts), ctf_bfactor_angstrom2=np.zeros(tilts), phase_shift_deg=np.zeros(tilts),
        pre_exposure_e_per_angstrom2=np.arange(tilts) * 3.0)
    # particles near the centre (visible in every tilt)
    half_width = max(1.0, (image / 2 - box / 2) * 0.45)
    positions = np.array(size, float)[None] / 2 + rng.uniform(-1, 1, (particles, 3)) * [half_width, half_width, 40.0]
    rotations = euler_zyz_matrices(*rng.uniform(-180, 180, (3, particles)))
    halves = 1 + (np.arange(particles) % 2)
    maps = rng.normal(size=(2, box // 2, box // 2, box // 2)).astype(np.float32)
    images = rng.normal(size=(tilts, image, image)).astype(np.float32)

    tracemalloc.start()
    t0 = time.perf_counter()
    refs = reference.prepare_references(maps[0], maps[1], None, box)
    prepare_seconds = time.perf_counter() - t0
    del maps
    fsc = np.ones(box // 2 + 1)
    weights = reference.noise_weights(images[:3], box)[:1] * reference.frequency_cutoff_weight(refs, fsc=fsc)
    if crop:
        refs = refs.cropped(crop * box / 2)
        weights = weights * (reference.radius_px(box) <= crop * box / 2)
    _, prep_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    rows = []
    compute_statistics(tomo, images, positions[:2], rotations[:2], halves[:2], refs, weights, with_flipped_hand=flipped, tilts=[0])
    for n in threads:
        numba.set_num_threads(n)
        tracemalloc.reset_peak()
        baseline, _ = tracemalloc.get_traced_memory()
        t0, c0 = time.perf_counter(), time.process_time()
        stats = compute_statistics(tomo, images, positions, rotations, halves, refs, weights, with_flipped_hand=flipped)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        _, peak = tracemalloc.get_traced_memory()
        pairs = int(stats.particle_count.sum())
        rows.append(dict(box=box, threads=n, pairs=pairs, seconds=seconds, pairs_per_second=pairs / seconds,
                         cpu_seconds=cpu_seconds, statistics_peak_mb=(peak - baseline) / 2**20))
        del stats
    return dict(rows=rows, prepare_seconds=prepare_seconds, prepare_peak_mb=prep_peak / 2**20,
                references_mb=refs.nbytes / 2**20, stack_mb=images.nbytes / 2**20,
                max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, load=load)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--particles", type=int, default=60)
    parser.add_argument("--tilts", type=int, default=41)
    parser.add_argument("--flipped-hand", action="store_true", help="also accumulate the opposite-hand statistics")
    parser.add_argument("--crop", type=float, default=None, help="weights and references cut at this fraction of Nyquist")
    parser.add_argument("--json", help="also write the measurements to this file (read by benchmarks/readme.py)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.boxes[0], args.threads, args.particles, args.tilts, args.flipped_hand, args.crop)))
        return 0
    print(f"compute_statistics on a synthetic tomogram: {args.tilts} tilts, {args.particles} particles, weights to "
          f"{'Nyquist' if not args.crop else f'{args.crop:g} x Nyquist'}, flipped hand {'on' if args.flipped_hand else 'off'}; "
          "numba compiled before timing")
    header = (f"{'box':>5} {'threads':>7} {'pairs':>6} {'seconds':>8} {'pairs/s':>8} {'CPU s':>7} {'stats peak MB':>13} "
              f"{'refs MB':>8} {'stack MB':>8} {'prep s':>7} {'prep peak MB':>12} {'max RSS MB':>10}")
    print(header)
    print("-" * len(header))
    record = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cores=os.cpu_count(), tilts=args.tilts,
                  particles=args.particles, flipped_hand=args.flipped_hand, crop=args.crop, boxes=[])
    for box in args.boxes:
        command = [sys.executable, __file__, "--child", "--boxes", str(box), "--particles", str(args.particles),
                   "--tilts", str(args.tilts), "--threads", *map(str, args.threads)]
        if args.flipped_hand:
            command.append("--flipped-hand")
        if args.crop:
            command += ["--crop", str(args.crop)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        record["boxes"].append(dict(box=box, **result))
        for row in result["rows"]:
            print(f"{row['box']:>5} {row['threads']:>7} {row['pairs']:>6} {row['seconds']:>8.2f} {row['pairs_per_second']:>8.0f} "
                  f"{row['cpu_seconds']:>7.2f} "
                  f"{row['statistics_peak_mb']:>13.0f} {result['references_mb']:>8.0f} {result['stack_mb']:>8.0f} "
                  f"{result['prepare_seconds']:>7.2f} {result['prepare_peak_mb']:>12.0f} {result['max_rss_mb']:>10.0f}")
    print("seconds: wall clock (pairs/s from it); CPU s: process CPU time (all threads), a load-independent cost")
    print("stats peak MB: tracemalloc peak of the numpy allocations made by compute_statistics (statistics arrays, "
          "one chunk of boxes, spectra and slices, per-tilt arrays; not the stack or references); max RSS: whole process incl. tilt stack, references and numba")
    loads = [entry["load"] for entry in record["boxes"]]
    print(f"{record['date']}; {record['cores']} cores; load average (1 min) at the start of each box {min(loads):.1f}-{max(loads):.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=1)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
