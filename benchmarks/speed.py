"""Wall time and peak memory of ``tomoctfrefine refine`` next to RELION 5.0.1's on the same shape.

Dataset (the issue's shape): 2 tilt series x 41 tilts (±60°, 3° steps), 1024² px at 2 Å, 150 particles
per tomogram, 96³ reference (``tomoctfrefine simulate --preset accuracy``), made once and cached in
``benchmarks/cache/``. Each configuration runs in a fresh process (``--j 2``, or 2 MPI ranks with
``--j 1``); numba's compilation is cached (``cache=True``) and warmed by a first, untimed run whose
time is reported separately. Peak memory is the largest resident set of one process (per rank).
CPU time (user + system, all threads, summed over ranks) is printed too: on a loaded machine it is the
number to compare, and the load average at the start of each row says how loaded it was.

    python benchmarks/speed.py            # the whole table (~10 min on 2 cores)
    python benchmarks/speed.py --quick    # box 128 only
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
BIN = Path(sys.executable).parent

# RELION 5.0.1 (CPU) on this shape, this kind of 2-core machine (issue 6)
RELION = {
    ("defocus", 256, "threads"): (38.0, 620),
    ("defocus", 256, "mpi"): (30.0, None),
    ("everything", 256, "threads"): (82.0, None),
    ("everything", 384, "threads"): (185.0, 1400),
}
FLAGS = {
    "defocus": ["--do_defocus", "--do_reg_defocus", "--lambda", "0.1"],
    "everything": ["--do_defocus", "--do_reg_defocus", "--lambda", "0.1", "--do_scale", "--per_frame_scale",
                   "--do_even_aberrations", "--ne", "4", "--do_odd_aberrations", "--no", "3"],
}
# the same without the neighbour model of the scale step (RELION's way: the neighbours count as noise)
FLAGS["everything-nn"] = FLAGS["everything"] + ["--no_neighbour_model"]
RELION[("everything-nn", 256, "threads")] = RELION[("everything", 256, "threads")]
RELION[("everything-nn", 384, "threads")] = RELION[("everything", 384, "threads")]


def dataset(preset: str = "accuracy") -> Path:
    folder = CACHE / preset
    if not (folder / "optimisation_set.star").exists():
        from tomoctfrefine.simulate import SimulationParameters, simulate_dataset

        print(f"simulating the '{preset}' dataset once into {folder} ...", flush=True)
        simulate_dataset(folder, SimulationParameters.from_preset(preset))
    return folder


def child(arguments: list[str]) -> None:
    """Run one refinement in this process and print its wall time and peak memory as JSON."""
    from tomoctfrefine.cli import main

    started = time.time()
    code = main(["refine", *arguments])
    wall = time.time() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    from common import peak_resident_mb  # not ru_maxrss: Linux carries the parent's over into a child

    print("RESULT " + json.dumps({"code": code, "wall_s": wall, "peak_mb": peak_resident_mb(),
                                  "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)


def measure(data: Path, steps: str, box: int, mode: str, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    arguments = ["--i", "optimisation_set.star", "--o", str(out), "--b", str(box), *FLAGS[steps]]
    launcher = [str(BIN / "mpirun"), "-np", "2"] if mode == "mpi" else []
    arguments += ["--j", "1" if mode == "mpi" else "2"]
    load = os.getloadavg()[0]
    started = time.time()
    result = subprocess.run([*launcher, sys.executable, __file__, "--child", *arguments], cwd=data,
                            capture_output=True, text=True)
    wall = time.time() - started
    rows = [json.loads(line[7:]) for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not rows:
        raise RuntimeError(f"{steps} box {box} {mode} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return {"wall_s": wall, "peak_mb": max(r["peak_mb"] for r in rows), "cpu_s": sum(r["cpu_s"] for r in rows), "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", help="only these rows, e.g. defocus:256:threads,defocus:256:mpi")
    parser.add_argument("--out", type=Path, default=CACHE / "speed_out", help="scratch output folder (removed)")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false", help="numba's cache is already warm")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    data = dataset()
    out = args.out
    if args.warm_up:
        warm = measure(data, "everything", 64, "threads", out)
        print(f"warm-up run (numba compilation, cached afterwards): {warm['wall_s']:.1f} s")
    configurations = [("defocus", 128, "threads"), ("everything", 128, "threads")]
    if not args.quick:
        configurations += [("defocus", 256, "threads"), ("defocus", 256, "mpi"), ("everything", 256, "threads"),
                           ("everything-nn", 256, "threads"), ("defocus", 384, "threads"), ("everything", 384, "threads"),
                           ("everything-nn", 384, "threads")]
    if args.rows:
        configurations = [(steps, int(box), mode) for steps, box, mode in (row.split(":") for row in args.rows.split(","))]
    print(f"\n{'refinement':<11} {'box':>4} {'parallel':<10} | {'wall (s)':>8} {'peak MB':>8} {'CPU (s)':>8} {'load':>5} | "
          f"{'RELION s':>8} {'RELION MB':>9} | {'speed-up':>8}")
    for steps, box, mode in configurations:
        result = measure(data, steps, box, mode, out)
        relion_s, relion_mb = RELION.get((steps, box, mode), (None, None))
        speedup = f"{relion_s / result['wall_s']:.1f}x" if relion_s else ""
        parallel = "2 MPI" if mode == "mpi" else "2 threads"
        print(f"{steps:<11} {box:>4} {parallel:<10} | {result['wall_s']:8.1f} {result['peak_mb']:8.0f} {result['cpu_s']:8.1f} "
              f"{result['load']:5.2f} | {relion_s or '':>8} {relion_mb or '':>9} | {speedup:>8}", flush=True)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
