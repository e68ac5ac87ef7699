"""Shared helpers of the accuracy benchmarks (``accuracy.py``, ``map_accuracy.py``) and their small CI
versions (``tests/test_benchmarks_small.py``): cached simulated datasets, one refinement in a child
process (wall time, peak memory), the Cramér-Rao bounds from statistics at the true CTF, error measures
against the truth (defocus, astigmatism and even aberrations compared as one total quadratic form),
and reconstructions compared with the true map.

Error conventions
-----------------
* Defocus: the mean defocus ``(U + V)/2`` of each tilt *plus* the ``rho^2`` part of the even Zernike
  phase (``Z(0,2)`` and the ``rho^2`` parts of ``Z(0,4)``, ...), i.e. the whole ``|k|^2`` coefficient of
  the CTF phase, refined minus true.
* Astigmatism: the complex ``(U - V)/2 e^{2 i angle}`` of the total quadratic form (``Z(+-2, n)`` terms
  included), RMS of the refined-minus-true difference.
* Scale: per-tilt ``c`` divided by one global factor (least squares on ``c_refined / c_true``), RMS of the
  relative error. The factor itself is printed (``tomoctfrefine``'s scale is box-independent: ~1).
* Even / odd phase: RMS over the Fourier pixels of a band of the refined-minus-true Zernike phase, the even
  one with its ``rho^2`` part removed (that part is in the defocus error).
* Bounds: :func:`tomoctfrefine.refine.bounds.cramer_rao_bounds` from ``compute_statistics`` run by
  ``pipeline.prepare`` on the *true* optimisation set (true CTF, scale and aberrations; same box, noise
  weights and FSC weights as the refinement), with the true scale; "everything else known". A band's
  bound is the RMS of its tilts' bounds (the RMSE an efficient unbiased estimator reaches).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"

#: Dose band of the issues' targets (pre-exposure below this, e/Å²).
LOW_DOSE_E_PER_ANGSTROM2 = 40.0


# ----------------------------------------------------------------------------------------------
# Datasets


def accuracy_datasets(quick: bool = False) -> dict:
    """name -> (label, preset, overrides) of the accuracy benchmark (issue 5 (a)-(d))."""
    from tomoctfrefine.simulate import coma_trefoil_odd_zernike, isotropic_rho4_even_zernike

    even = isotropic_rho4_even_zernike(1.0, 6.0)
    even[8] = 0.5 * 6.0**4  # Z(4,4): 0.5 rad at 6 Å
    odd = coma_trefoil_odd_zernike(0.2, 0.5, 6.0)
    sets = {
        "a": ("300 kV, no aberrations", "accuracy", {}),
        "b": ("200 kV, astigmatism 1000 Å", "accuracy", dict(seed=1, voltage_kv=200.0, astigmatism_angstrom=1000.0)),
        "c": ("even (rho^4 1 rad, Z(4,4) 0.5 rad at 6 Å) + odd (trefoil 0.5, coma 0.2 rad at 6 Å)", "accuracy",
              dict(seed=2, even_zernike=tuple(even), odd_zernike=tuple(odd))),
        "d": ("wrong hand written (rlnTomoHand = -true hand)", "accuracy", dict(seed=3, written_hand=1)),
    }
    if quick:
        smaller = dict(n_tomograms=1, n_tilts=21, image_size_px=640, particles_per_tomogram=60, placement_margin_px=160)
        sets = {k: (label, preset, {**smaller, **overrides}) for k, (label, preset, overrides) in sets.items()}
    return sets


def dataset_folder(name: str) -> Path:
    return CACHE / name


def dataset(name: str, preset: str, overrides: dict | None = None, log=print) -> Path:
    """The cached dataset ``CACHE/name`` (simulated once; re-simulated if its parameters changed)."""
    from tomoctfrefine.simulate import SimulationParameters, load_truth, simulate_dataset

    params = SimulationParameters.from_preset(preset, **(overrides or {}))
    folder = dataset_folder(name)
    if (folder / "optimisation_set.star").exists() and (folder / "truth" / "truth.json").exists():
        if load_truth(folder)["params"] == json.loads(json.dumps(params.to_dict())):
            return folder
        log(f"  {folder}: parameters changed, simulating again")
    log(f"simulating dataset '{name}' (preset {preset}) into {folder} ...")
    started = time.time()
    simulate_dataset(folder, params)
    log(f"  done in {time.time() - started:.0f} s")
    return folder


def machine_header() -> str:
    """Load, cores and time: the numbers depend on them."""
    load = os.getloadavg()
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores, load average "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min; the machine is shared, times are slower than idle)")


# ----------------------------------------------------------------------------------------------
# Refinement in a child process (wall time and peak memory of the refinement alone)


def tutorial_options(box: int, everything: bool = False, threads: int = 2, **extra):
    """RELION tutorial settings (defocus ±3000 Å in 100 steps, regularised, lambda 0.1, per-frame scale) with the
    regularisation on the astigmatism only (``--reg_astigmatism_only``, the recommended setting: RELION's meaning of
    ``--do_reg_defocus`` also pulls each tilt's mean defocus towards the common value, which biases the tilts with
    little information); ``everything`` adds even (order 4) and odd (order 3) aberrations."""
    from tomoctfrefine.pipeline import RefineOptions

    values = dict(box_size_px=box, do_defocus=True, defocus_scan_min_angstrom=-3000.0, defocus_scan_max_angstrom=3000.0,
                  defocus_scan_steps=100, regularise_defocus=True, regularisation_lambda=0.1,
                  regularise_astigmatism_only=True, do_scale=True, scale_mode="per_frame", threads=threads, check_hand=True)
    if everything:
        values.update(do_even_aberrations=True, even_order=4, do_odd_aberrations=True, odd_order=3)
    values.update(extra)
    return RefineOptions(**values)


def _child_main(argv: list[str]) -> None:
    """``python common.py --refine <optimisation set> <out dir> <options json>``."""
    from tomoctfrefine.io.optimisation_set import read_optimisation_set
    from tomoctfrefine.pipeline import RefineOptions, prepare, run_refinement

    opt_path, out_dir, options_json, mode = argv
    options = RefineOptions(**json.loads(options_json))
    opt = read_optimisation_set(opt_path)
    started = time.time()
    if mode == "prepare":
        prepare(opt, options, out_dir)
    else:
        run_refinement(opt, options, out_dir)
    wall = time.time() - started
    print("RESULT " + json.dumps({"wall_s": wall, "peak_mb": peak_resident_mb()}), flush=True)


def peak_resident_mb() -> float:
    """This process's peak resident set (MB) since it was started. Not ``ru_maxrss``: Linux carries it
    over from the parent through fork and exec, so a child of a large parent reported the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(opt_path: Path, out_dir: Path, options, mode: str = "refine", cwd: Path | None = None, in_process: bool = False) -> dict:
    """Run the refinement (or only ``prepare``) in a fresh process; returns wall time and peak memory.
    ``in_process``: run it here instead (tests; the peak memory is then this process's)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if in_process:
        from tomoctfrefine.io.optimisation_set import read_optimisation_set
        from tomoctfrefine.pipeline import prepare, run_refinement

        previous = Path.cwd()
        started = time.time()
        try:
            os.chdir(cwd or Path(opt_path).parent)
            opt = read_optimisation_set(Path(opt_path).resolve())
            (prepare if mode == "prepare" else run_refinement)(opt, options, out_dir.resolve())
        finally:
            os.chdir(previous)
        return {"wall_s": time.time() - started, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(Path(opt_path).resolve()), str(out_dir.resolve()),
               json.dumps(asdict(options)), mode]
    result = subprocess.run(command, cwd=cwd or Path(opt_path).parent, capture_output=True, text=True)
    (out_dir / f"{mode}.out").write_text(result.stdout[-20000:] + result.stderr[-20000:])
    rows = [json.loads(line[7:]) for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not rows:
        raise RuntimeError(f"refinement of {opt_path} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return rows[-1]


def refine_once(data: Path, out_dir: Path, options, log=print, in_process: bool = False, cached_only: bool = False) -> dict | None:
    """Refine ``data/optimisation_set.star`` into ``out_dir`` unless an identical run is there; returns
    ``{"wall_s", "peak_mb"}`` (cached in ``out_dir/benchmark.json``)."""
    record = Path(out_dir) / "benchmark.json"
    key = json.dumps(asdict(options), sort_keys=True)
    if record.exists() and (Path(out_dir) / "optimisation_set.star").exists():
        saved = json.loads(record.read_text())
        if saved.get("options") == key:
            return saved["measure"]
    if cached_only:
        return None
    log(f"  refining {data.name} at box {options.box_size_px} -> {out_dir} ...")
    measure = run_child(data / "optimisation_set.star", out_dir, options, in_process=in_process)
    record.write_text(json.dumps({"options": key, "measure": measure}))
    return measure


# ----------------------------------------------------------------------------------------------
# Truth, refined values, bounds


def truth_table(data: Path) -> dict:
    """Per tomogram: arrays of the true and starting CTF values (truth.json)."""
    from tomoctfrefine.simulate import load_truth

    truth = load_truth(data)
    tables = {}
    for name, tilts in truth["tomograms"].items():
        tables[name] = {key: np.array([t[key] for t in tilts], dtype=float) for key in tilts[0]}
    return {"json": truth, "tomograms": tables}


@contextlib.contextmanager
def in_folder(folder: Path):
    """Work in ``folder`` (the written files name their inputs relative to the dataset folder, as RELION)."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def refined_table(out_dir: Path, data: Path) -> dict:
    """Per tomogram: refined U, V, angle, scale (from the written files) and the Zernike coefficients."""
    from tomoctfrefine.io.optimisation_set import read_optimisation_set

    with in_folder(data):
        return ctf_table(read_optimisation_set((Path(out_dir) / "optimisation_set.star").resolve()))


def ctf_table_of(opt_path: Path, data: Path) -> dict:
    """:func:`ctf_table` of the optimisation set at ``opt_path`` (paths resolved from the dataset folder)."""
    from tomoctfrefine.io.optimisation_set import read_optimisation_set

    with in_folder(data):
        return ctf_table(read_optimisation_set(Path(opt_path).resolve()))


def ctf_table(opt) -> dict:
    """Per tomogram CTF arrays and the optics group's Zernike coefficients of an optimisation set."""
    from tomoctfrefine.io import particles as particles_io
    from tomoctfrefine.io import tomograms as tomograms_io

    tset = tomograms_io.read_tomogram_set(opt.resolved("tomograms_path"))
    pset = particles_io.read_particle_set(opt.resolved("particles_path"))
    even, odd = particles_io.optics_zernike(pset, 1)
    tables = {}
    for name in tomograms_io.tomogram_names(tset):
        tomo = tomograms_io.tomogram(tset, name)
        tables[name] = dict(dfu=np.asarray(tomo.defocus_u_angstrom, float), dfv=np.asarray(tomo.defocus_v_angstrom, float),
                            dfang=np.asarray(tomo.defocus_angle_deg, float), scale=np.asarray(tomo.ctf_scale, float),
                            pre_exposure=np.asarray(tomo.pre_exposure_e_per_angstrom2, float),
                            wavelength=tomo.optics.wavelength_angstrom)
    return {"tomograms": tables, "even": list(even or []), "odd": list(odd or [])}


def bounds_at_truth(data: Path, box: int, work: Path, log=print, in_process: bool = False) -> dict:
    """Per tomogram: Cramér-Rao bounds of the mean defocus and the scale (Å, absolute scale units), from
    tomoctfrefine's statistics computed at the true CTF (``prepare`` on the true optimisation set)."""
    from tomoctfrefine.refine.bounds import cramer_rao_bounds
    from tomoctfrefine.statistics import TiltStatistics as Statistics

    folder = Path(work)
    cached = _cached_bounds(folder)
    if cached is not None:
        return cached
    log(f"  statistics at the true CTF ({data.name}, box {box}) for the Cramér-Rao bounds ...")
    options = tutorial_options(box, check_hand=False)
    run_child(data / "truth" / "optimisation_set_true.star", folder, options, mode="prepare", cwd=data, in_process=in_process)
    truth = truth_table(data)
    bounds = {}
    for name, table in truth["tomograms"].items():
        stats = Statistics.load(folder / "temp" / "statistics" / f"{name}.npz")
        result = cramer_rao_bounds(stats, truth["json"]["wavelength_A"], table["scale"])
        bounds[name] = {"defocus": result.defocus_angstrom, "scale": result.scale,
                        "defocus_joint": result.defocus_joint_angstrom, "scale_joint": result.scale_joint}
    _save_bounds(folder, bounds)
    for stale in (folder / "temp" / "statistics").glob("*.npz"):
        stale.unlink()  # large; the bounds are cached
    return bounds


@contextlib.contextmanager
def true_inputs(data: Path, box: int):
    """Inside the dataset's folder (its relative image paths resolve): the true tomogram and particle
    sets and the true, unmasked map prepared at ``box`` as both half maps."""
    from tomoctfrefine.io import particles as particles_io
    from tomoctfrefine.io import tomograms as tomograms_io
    from tomoctfrefine.io.maps import read_map
    from tomoctfrefine.io.optimisation_set import read_optimisation_set
    from tomoctfrefine.reference import prepare_references

    with in_folder(data):
        opt = read_optimisation_set(Path("truth") / "optimisation_set_true.star")
        true_map, voxel = read_map(Path("ref") / "map_true.mrc")
        yield (tomograms_io.read_tomogram_set(opt.tomograms_path), particles_io.read_particle_set(opt.particles_path),
               prepare_references(true_map, true_map, None, box, voxel))


def white_noise_bounds(data: Path, box: int, work: Path, log=print) -> dict:
    """Per tomogram: the Cramér-Rao bounds of issue 5's definition, from the truth of a simulated dataset.

    Fisher information of tilt ``f``'s mean defocus and scale = sum over the visible particles and every
    pixel of the box of ``|d mu / d theta|^2 / sigma^2``, ``mu`` the noiseless particle (the projection of
    the true, unmasked map at the true CTF, dose and scale), ``sigma^2`` the simulator's white-noise
    variance, everything else known. Unlike the refinement's own statistics (:func:`bounds_at_truth`),
    nothing is weighted by the noise power measured in the images (which holds every particle's signal
    as well as the noise) or by the FSC: the neighbours' signal is known here, not noise, so this bound is
    lower (for the per-tilt scale about half) and reached only by a model of the whole tilt image.
    Cached in ``work/bounds.json``.
    """
    from tomoctfrefine.io import particles as particles_io
    from tomoctfrefine.io import tomograms as tomograms_io
    from tomoctfrefine.refine.bounds import cramer_rao_bounds
    from tomoctfrefine.statistics import compute_statistics

    work = Path(work)
    cached = _cached_bounds(work)
    if cached is not None:
        return cached
    log(f"  white-noise Cramér-Rao bounds at the truth ({data.name}, box {box}) ...")
    truth = truth_table(data)
    sigma2 = float(truth["json"]["noise_sigma"]) ** 2
    with true_inputs(data, box) as (tset, pset, references):
        bounds = {}
        for name, table in truth["tomograms"].items():
            tomo = tomograms_io.tomogram(tset, name)
            rows = particles_io.particles_of(pset, name)
            images = tomograms_io.load_tilt_images(tomo)
            weights = np.full((tomo.tilt_count, box, box // 2 + 1), 1.0 / sigma2)
            even, _ = particles_io.optics_zernike(pset, 1)
            stats = compute_statistics(tomo, images, particles_io.particle_positions_px(pset, rows, tomo),
                                       particles_io.particle_rotations(pset, rows), particles_io.half_sets(pset, rows),
                                       references, weights, even)
            result = cramer_rao_bounds(stats, truth["json"]["wavelength_A"], table["scale"])
            bounds[name] = {"defocus": result.defocus_angstrom, "scale": result.scale,
                            "defocus_joint": result.defocus_joint_angstrom, "scale_joint": result.scale_joint}
    _save_bounds(work, bounds)
    return bounds


def oracle_scale_errors(data: Path, box: int, work: Path, log=print, cached_only: bool = False) -> dict | None:
    """Per tomogram: each tilt's relative scale error of an *efficient* estimator on this dataset's very
    noise, ``<n, M> / (c <M, M>)`` with ``M`` the noiseless model of the whole tilt image at unit scale
    (true map, CTF, positions; rendered like the neighbour model, to Nyquist) and ``n`` the simulator's
    noise drawn again (:func:`tomoctfrefine.simulate.noise_realisation`). Its RMS over the Cramér-Rao
    bound is what knowing everything but the scale reaches on this noise: 1 on average, but an RMS over
    82 tilts scatters by ~8 % from one noise realisation to the next. Cached in ``work/oracle.json``
    (``cached_only``: None when it is not).
    """
    import numba

    from tomoctfrefine import forward, kernels
    from tomoctfrefine.image_model import render_tilt_model
    from tomoctfrefine.io import particles as particles_io
    from tomoctfrefine.io import tomograms as tomograms_io
    from tomoctfrefine.physics.geometry import fourier_grid_per_angstrom
    from tomoctfrefine.physics.zernike import odd_phase_rad
    from tomoctfrefine.simulate import noise_realisation, parameters_from_truth

    cache = Path(work) / "oracle.json"
    if cache.exists():
        return {n: np.array(v) for n, v in json.loads(cache.read_text()).items()}
    if cached_only:
        return None
    log(f"  efficient scale estimator on the dataset's own noise ({data.name}, box {box}) ...")
    truth = truth_table(data)
    params = parameters_from_truth(truth["json"])
    sigma = float(truth["json"]["noise_sigma"])
    workers = numba.get_num_threads()
    errors = {}
    with true_inputs(data, box) as (tset, pset, references):
        even, odd = particles_io.optics_zernike(pset, 1)
        fx, fy = fourier_grid_per_angstrom(box, references.pixel_size_angstrom)
        odd_phase = odd_phase_rad(odd, fx, fy) if any(odd) else None
        for index, (name, table) in enumerate(truth["tomograms"].items()):
            tomo = tomograms_io.tomogram(tset, name)
            rows = particles_io.particles_of(pset, name)
            positions = particles_io.particle_positions_px(pset, rows, tomo)
            halves = np.asarray(particles_io.half_sets(pset, rows), dtype=np.int64) - 1
            image_positions = forward.image_positions_px(tomo, positions, None)
            matrices = forward.particle_matrices(tomo, particles_io.particle_rotations(pset, rows))
            depth_phase = np.pi * tomo.optics.wavelength_angstrom * forward.depth_defocus_angstrom(tomo, positions)
            height, width = params.image_size_px, params.image_size_px
            tilt_errors = []
            for f, noise in enumerate(noise_realisation(params, index, sigma)):
                centres = image_positions[:, f, :2]
                near = np.nonzero(np.all((centres > -box / 2) & (centres < np.array([width, height]) + box / 2), axis=1))[0]
                slices = np.empty((len(near), box, box // 2 + 1), dtype=np.complex64)
                kernels.central_slices(references.bricks, references.grid_size, halves[near],
                                       np.ascontiguousarray(matrices[near, f]), (box / 2.0) ** 2, slices)
                model = render_tilt_model(tomo, f, image_positions[near, f], slices, depth_phase[near, f], 1.0, even, odd_phase,
                                          (height, width), workers=workers).astype(np.float64)
                model -= model.mean()
                noise = noise.astype(np.float64)
                tilt_errors.append(float(np.sum(noise * model) / np.sum(model * model) / table["scale"][f]))
            errors[name] = np.array(tilt_errors)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({n: v.tolist() for n, v in errors.items()}))
    return errors


def _cached_bounds(folder: Path) -> dict | None:
    cache = folder / "bounds.json"
    if not cache.exists():
        return None
    return {n: {k: np.array(v) for k, v in b.items()} for n, b in json.loads(cache.read_text()).items()}


def _save_bounds(folder: Path, bounds: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bounds.json").write_text(json.dumps({n: {k: v.tolist() for k, v in b.items()} for n, b in bounds.items()}))


def bounds_from_refinement(data: Path, out_dir: Path) -> dict:
    """Per tomogram: the same Cramér-Rao bounds as :func:`bounds_at_truth`, from the refinement's own
    statistics (``out_dir/temp/statistics``, accumulated at the *starting* CTF) rotated to the true CTF.

    The Fisher information only involves the ``A`` terms, and an extra phase ``delta(k)`` common to a
    tilt's particles turns ``A`` at the starting CTF into ``A`` at the true one
    (:mod:`tomoctfrefine.refine.bounds`); ``delta`` = true minus starting quadratic form plus true minus
    starting even Zernike phase. This is exact for the periodic prediction; where ``compute_statistics``
    windows the prediction (the CTF delocalises the particle beyond the box: small boxes, high defocus)
    the window does not commute with ``delta(k)`` and it is an approximation (2-5 % on the bound at box 96,
    2 Å, 30 000 Å; ``tests/test_benchmarks_small.py``); ``accuracy.py --bounds truth`` accumulates at the
    true CTF instead. Particles' depth offsets are in the statistics: when the input names the
    wrong hand, the statistics of the opposite hand (``flipped_hand``) are the ones of the true model.
    Saves the second pass over the images that :func:`bounds_at_truth` makes.
    """
    from tomoctfrefine.physics.zernike import even_phase_rad
    from tomoctfrefine.refine.defocus import absolute_parameters, phase_basis_per_angstrom
    from tomoctfrefine.refine.likelihood import BandStatistics, FrequencyBand, evaluate, weighted_gram
    from tomoctfrefine.statistics import TiltStatistics

    truth = truth_table(data)
    start = ctf_table_of(data / "optimisation_set.star", data)
    wrong_hand = truth["json"]["written_hand"] != truth["json"]["hand"]
    bounds = {}
    for name, t in truth["tomograms"].items():
        stats = TiltStatistics.load(Path(out_dir) / "temp" / "statistics" / f"{name}.npz")
        if wrong_hand:
            stats = stats.flipped_hand
        n = stats.n_tilts
        wavelength = truth["json"]["wavelength_A"]
        band = BandStatistics.from_statistics(stats, FrequencyBand(kmin_angstrom=None))
        basis = phase_basis_per_angstrom(wavelength, band.freq_x, band.freq_y)
        st = start["tomograms"][name]
        change = absolute_parameters(t["dfu"], t["dfv"], t["dfang"], n) - absolute_parameters(st["dfu"], st["dfv"], st["dfang"], n)
        delta = change @ basis + (even_phase_rad(truth["json"]["even"], band.freq_x, band.freq_y)
                                  - even_phase_rad(start["even"], band.freq_x, band.freq_y))[None]
        ev = evaluate(band, delta, None, derivatives=True, fixed_scale=t["scale"])
        i_dz = weighted_gram(ev.fisher_delta, basis, basis)[:, 0, 0]
        i_cc = np.asarray(ev.s_p, dtype=float)
        with np.errstate(divide="ignore"):
            bounds[name] = {"defocus": np.where(i_dz > 0, 1 / np.sqrt(np.maximum(i_dz, 1e-300)), np.inf),
                            "scale": np.where(i_cc > 0, 1 / np.sqrt(np.maximum(i_cc, 1e-300)), np.inf)}
    return bounds


def zernike_quadratic(even: list, wavelength_angstrom: float) -> tuple[float, float, float]:
    """The ``|k|^2`` part of an even Zernike phase as a defocus change ``(dz, a_c, a_s)`` in Å:
    phase ``= -pi lambda (dz |k|^2 + a_c (kx^2 - ky^2) + a_s 2 kx ky)``, so that the total defocus is
    ``(U+V)/2 + dz`` and the total astigmatism ``(U-V)/2 e^{2i angle} + a_c + i a_s``."""
    from tomoctfrefine.physics.zernike import even_index_to_mn
    from tomoctfrefine.refine.aberrations import _radial_coefficient

    iso = cos2 = sin2 = 0.0
    for index, c in enumerate(even):
        m, n = even_index_to_mn(index)
        if not c or n < 2:
            continue
        r2 = _radial_coefficient(m, n, 2)
        if m == 0:
            iso += c * r2
        elif m == 2:
            cos2 += c * r2
        elif m == -2:
            sin2 += c * r2
    k1 = math.pi * wavelength_angstrom
    return -iso / k1, -cos2 / k1, -sin2 / k1


def total_defocus(table: dict, even: list) -> tuple[np.ndarray, np.ndarray]:
    """Mean defocus and complex astigmatism of the total quadratic form of each tilt."""
    dz, ac, as_ = zernike_quadratic(even, table["wavelength"])
    mean = 0.5 * (table["dfu"] + table["dfv"]) + dz
    astig = 0.5 * (table["dfu"] - table["dfv"]) * np.exp(2j * np.deg2rad(table["dfang"])) + ac + 1j * as_
    return mean, astig


def phase_error_rad(refined: list, true: list, pixel_size_angstrom: float, low_per_angstrom: float, high_per_angstrom: float,
                    odd: bool, box: int = 256) -> float:
    """RMS over the Fourier pixels with ``low <= |k| <= high`` of the refined-minus-true Zernike phase (the
    even one without its ``rho^2`` part)."""
    from tomoctfrefine.physics.geometry import fourier_grid_per_angstrom
    from tomoctfrefine.physics.zernike import even_phase_rad, odd_phase_rad

    fx, fy = fourier_grid_per_angstrom(box, pixel_size_angstrom)
    k = np.hypot(fx, fy)
    inside = (k >= low_per_angstrom) & (k <= high_per_angstrom)
    n = max(len(refined), len(true))
    difference = np.zeros(n)
    difference[:len(refined)] += refined
    difference[:len(true)] -= true
    if odd:
        phase = odd_phase_rad(difference, fx, fy)
    else:
        phase = even_phase_rad(difference, fx, fy)
        dz, ac, as_ = zernike_quadratic(list(difference), 1.0 / math.pi)  # -(rho^2 parts) with k1 = 1
        phase = phase + (dz * k**2 + ac * (fx**2 - fy**2) + as_ * 2 * fx * fy)
    return float(np.sqrt(np.mean(phase[inside] ** 2))) if inside.any() else float("nan")


def rms(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.sqrt(np.mean(values**2))) if values.size else float("nan")


def ctf_errors(data: Path, refined: dict, bounds: dict | None, oracle: dict | None = None) -> dict:
    """Errors of ``refined`` (:func:`ctf_table`) against the truth, per dose band, with their bounds (and
    the efficient scale estimator's errors on the same noise, :func:`oracle_scale_errors`)."""
    truth = truth_table(data)
    true_even, true_odd = truth["json"]["even"], truth["json"]["odd"]
    columns = {k: [] for k in ("defocus", "astig", "ratio", "pre", "bound_dz", "bound_c", "c_true", "start_defocus", "oracle")}
    for name, t in truth["tomograms"].items():
        r = refined["tomograms"][name]
        wavelength = r["wavelength"]
        t_table = dict(dfu=t["dfu"], dfv=t["dfv"], dfang=t["dfang"], wavelength=wavelength)
        s_table = dict(dfu=t["start_dfu"], dfv=t["start_dfv"], dfang=t["start_dfang"], wavelength=wavelength)
        true_mean, true_astig = total_defocus(t_table, true_even)
        mean, astig = total_defocus(r, refined["even"])
        start_mean, _ = total_defocus(s_table, [])
        columns["defocus"].append(mean - true_mean)
        columns["start_defocus"].append(start_mean - true_mean)
        columns["astig"].append(np.abs(astig - true_astig))
        columns["ratio"].append(r["scale"] / t["scale"])
        columns["pre"].append(t["pre_exposure"])
        columns["c_true"].append(t["scale"])
        if bounds is not None:
            columns["bound_dz"].append(bounds[name]["defocus"])
            columns["bound_c"].append(bounds[name]["scale"] / t["scale"])
        if oracle is not None:
            columns["oracle"].append(oracle[name])
    c = {k: np.concatenate(v) if v else None for k, v in columns.items()}
    factor = float(np.sum(c["ratio"]) / np.sum(c["ratio"] ** 2))
    relative = c["ratio"] * factor - 1.0
    bands = {"all": np.ones_like(c["pre"], dtype=bool), "<40": c["pre"] < LOW_DOSE_E_PER_ANGSTROM2}
    result = {"global_scale_factor": 1.0 / factor, "bands": {}}
    for band, sel in bands.items():
        entry = {
            "tilts": int(sel.sum()),
            "start_rmse": rms(c["start_defocus"][sel]),
            "defocus_rmse": rms(c["defocus"][sel]), "defocus_bias": float(np.mean(c["defocus"][sel])),
            "defocus_max": float(np.max(np.abs(c["defocus"][sel]))),
            "astig_rms": rms(c["astig"][sel]), "scale_rel_rms": rms(relative[sel]),
        }
        if bounds is not None:
            entry["defocus_bound"] = rms(c["bound_dz"][sel])
            entry["scale_bound"] = rms(c["bound_c"][sel])
            # per-tilt errors in units of their own bound (1 for an efficient estimator, whatever the dose mix)
            entry["defocus_z_rms"] = rms(c["defocus"][sel] / c["bound_dz"][sel])
            entry["scale_z_rms"] = rms(relative[sel] / c["bound_c"][sel])
        if oracle is not None:
            entry["scale_oracle_rms"] = rms(c["oracle"][sel])
        result["bands"][band] = entry
    pixel = truth["json"]["params"]["pixel_size_angstrom"]
    nyquist = 0.5 / pixel
    result["phase"] = {
        "even_band": phase_error_rad(refined["even"], true_even, pixel, 1 / 30, min(0.15, nyquist), odd=False),
        "odd_band": phase_error_rad(refined["odd"], true_odd, pixel, 1 / 30, min(0.15, nyquist), odd=True),
        "even_nyquist": phase_error_rad(refined["even"], true_even, pixel, 1 / 30, nyquist, odd=False),
        "odd_nyquist": phase_error_rad(refined["odd"], true_odd, pixel, 1 / 30, nyquist, odd=True),
    }
    return result


def hand_verdicts(out_dir: Path) -> list[str]:
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    return [entry.get("hand", {}).get("verdict", "not checked") for entry in summary["tomograms"].values()]


# ----------------------------------------------------------------------------------------------
# Maps


def map_measures(opt_path: Path, data: Path, box: int, crop: int | None, work: Path, regularisation: str = "wiener", log=print,
                 cached_only: bool = False) -> dict | None:
    """Reconstruct the particle with the CTF of ``opt_path`` and compare with ``data/ref/map_true.mrc``
    inside ``data/ref/mask.mrc``: masked correlation, FSC 0.5 and 0.143 against the true map
    (cached in ``work/map.json``)."""
    from tomoctfrefine.io.optimisation_set import read_optimisation_set
    from tomoctfrefine.reconstruct import reconstruct

    work = Path(work)
    record = work / "map.json"
    key = f"{Path(opt_path).resolve()} {box} {crop} {regularisation} {Path(opt_path).stat().st_mtime}"
    saved = keyed_measures(record, key)
    if saved is not None or cached_only:
        return saved
    started = time.time()
    previous = Path.cwd()
    try:
        os.chdir(data)  # the files name the stacks relative to the dataset folder
        opt = read_optimisation_set(Path(opt_path).resolve())
        reconstruction = reconstruct(opt, box, crop, regularisation=regularisation)
    finally:
        os.chdir(previous)
    measures = against_true_map(reconstruction.merged, reconstruction.pixel_size_angstrom, data)
    measures["seconds"] = time.time() - started
    save_keyed_measures(record, key, measures)
    return measures


def against_true_map(volume: np.ndarray, pixel_size_angstrom: float, data: Path) -> dict:
    """Masked correlation, FSC 0.5 and 0.143 of ``volume`` against ``data/ref/map_true.mrc`` inside
    ``data/ref/mask.mrc`` (both fitted to the volume's box)."""
    from tomoctfrefine.assess import fit_to_box, truth_measures
    from tomoctfrefine.io.maps import read_map

    true_map = read_map(data / "ref" / "map_true.mrc")[0].astype(np.float64)
    mask = read_map(data / "ref" / "mask.mrc")[0].astype(np.float64)
    size = volume.shape[0]
    measures = truth_measures(np.asarray(volume, dtype=np.float64), fit_to_box(true_map, size), fit_to_box(mask, size),
                              pixel_size_angstrom)
    return {k: v for k, v in measures.items() if k != "fsc_curve"}


def keyed_measures(record: Path, key: str) -> dict | None:
    """The measures cached in ``record`` when they were made from ``key`` (the inputs), else None."""
    if not record.exists():
        return None
    saved = json.loads(record.read_text())
    return saved["measures"] if saved.get("key") == key else None


def save_keyed_measures(record: Path, key: str, measures: dict) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key, "measures": measures}))


def fmt(value, digits: int = 1, width: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        text = "-"
    else:
        text = f"{value:.{digits}f}"
    return text.rjust(width) if width else text


def verdict(value: float, target: float, unit: str = "", larger_is_better: bool = False, digits: int = 2) -> str:
    """``"ok"`` or ``"MISSED by x"``."""
    if value is None or not math.isfinite(value):
        return "n/a"
    missed = value < target if larger_is_better else value > target
    if not missed:
        return "ok"
    return f"MISSED by {abs(value - target):.{digits}f}{unit}"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(HERE.parent))
        _child_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--simulate":
        sys.path.insert(0, str(HERE))
        for spec in sys.argv[2:]:
            name, _, which = spec.partition("=")
            if which in ("map", "map_aberrations"):
                dataset(name, which)
            else:
                label, preset, overrides = accuracy_datasets(quick=name.startswith("quick_"))[which]
                dataset(name, preset, overrides)
