"""The refinement as separate, resumable steps over tomograms (the CLI, the Python API and the
Scipion protocol all call these functions).

::

    prepare(opt, options, out_dir)     validate, then per tomogram: sufficient statistics (the only
                                       step that reads images; spread over MPI ranks)
    refine_defocus(out_dir)            per tomogram: defocus, astigmatism, per-tilt scale estimate
    refine_aberrations(out_dir)        per optics group: even/odd Zernike, jointly with defocus and scale
    refine_scale(out_dir)              scale model (per frame, Beer-Lambert per tomogram or global)
    write_outputs(out_dir)             RELION files, summary.json, plots, logfile.pdf

:func:`plan` says which of them a run needs, in this order.

Every step reads what the previous steps saved under ``out_dir/temp`` and saves its own results
atomically, so a run killed at any moment and resumed (``--only_do_unfinished``) writes exactly what an
uninterrupted run writes: the fits depend only on the saved statistics, never on what happened to be
in memory (RELION's resumed scale step instead sees the defocus of the earlier run, up to 12 % off).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .distribute import World
from .progress import Progress
from .errors import InputError, Problem
from .statistics import TiltStatistics

RUN_FILE = "run.json"


@dataclass(frozen=True)
class RefineOptions:
    """What to refine and how (RELION's flags, named for their meaning; defaults are RELION's).

    The tutorial settings are ``box_size_px=512, do_defocus=True, regularise_defocus=True,
    regularisation_lambda=0.1, do_scale=True, scale_mode="per_frame"``.
    ``regularisation_lambda`` is dimensionless here: 1 pulls a tilt towards the tomogram's common
    defocus as strongly as an average tilt's own data pull it (it does not depend on the box size or
    the particle count, unlike RELION's).
    ``adopt_hand``: when the hand check decisively prefers the opposite defocus hand, refine with it and
    write it (``rlnTomoHand``), saying so; False keeps the input hand and only reports (RELION's way).
    """

    box_size_px: int
    do_defocus: bool = False
    defocus_scan_min_angstrom: float = -3000.0
    defocus_scan_max_angstrom: float = 3000.0
    defocus_scan_steps: int = 100
    regularise_defocus: bool = False
    regularisation_lambda: float = 0.001
    reset_to_common: bool = False
    kmin_angstrom: float = 30.0
    do_scale: bool = False
    scale_mode: str = "global"
    do_even_aberrations: bool = False
    even_order: int = 4
    do_odd_aberrations: bool = False
    odd_order: int = 3
    freq_cutoff_angstrom: float = -1.0
    fsc_threshold_width_px: float = 5.0
    use_snr_weight: bool = False
    per_frame_noise: bool = False
    min_frame: int = 0
    max_frame: int = -1
    cutoff_fraction: float = 0.02
    threads: int = 1
    only_do_unfinished: bool = False
    diagnostics: bool = False
    assess: bool = False
    check_hand: bool = True
    adopt_hand: bool = True
    model_neighbours: bool = True

    @property
    def do_aberrations(self) -> bool:
        return self.do_even_aberrations or self.do_odd_aberrations

    def fingerprint(self) -> str:
        """Hash of everything that changes the statistics (resuming with other values is refused)."""
        relevant = {k: v for k, v in asdict(self).items() if k in _STATISTICS_FIELDS}
        return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


_STATISTICS_FIELDS = ("box_size_px", "freq_cutoff_angstrom", "fsc_threshold_width_px", "use_snr_weight",
                      "per_frame_noise", "check_hand", "adopt_hand", "model_neighbours")


# ----------------------------------------------------------------------------------------------
# Run state


@dataclass
class Run:
    """What every step needs: the options, the inputs (as absolute paths) and the output folder."""

    out_dir: Path
    options: RefineOptions
    inputs: dict
    command_line: str = ""

    @property
    def temp(self) -> Path:
        return self.out_dir / "temp"

    def optimisation_set(self):
        from .io.optimisation_set import OptimisationSet

        paths = {k: v for k, v in self.inputs.items() if k.endswith("_path")}
        return OptimisationSet(**paths, extra=dict(self.inputs.get("extra", {})))

    def save(self) -> None:
        state = {"options": asdict(self.options), "inputs": self.inputs, "command_line": self.command_line,
                 "fingerprint": self.options.fingerprint()}
        _write_json(self.temp / RUN_FILE, state)

    @classmethod
    def load(cls, out_dir) -> "Run":
        out_dir = Path(out_dir)
        path = out_dir / "temp" / RUN_FILE
        if not path.exists():
            raise InputError(Problem(str(out_dir), "no prepared refinement in this folder",
                                     "run the prepare step (tomoctfrefine refine) first"))
        state = json.loads(path.read_text())
        known = {f.name for f in fields(RefineOptions)}
        options = RefineOptions(**{k: v for k, v in state["options"].items() if k in known})
        return cls(out_dir, options, state["inputs"], state.get("command_line", ""))


def _write_json(path: Path, data) -> None:
    from .report import write_summary

    write_summary(data, path)


def _save_arrays(path: Path, **arrays) -> None:
    """Save arrays atomically (``.npz``); None values are skipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items() if v is not None})
    os.replace(tmp, path)


def _finished(path: Path) -> bool:
    """True when ``path`` is a complete ``.npz``. A damaged one (truncated by a copy, or by a crash on a
    file system without atomic rename) is removed, so that a resumed run redoes it instead of failing."""
    if not path.exists():
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is None:
                return True
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        pass
    path.unlink(missing_ok=True)
    return False


def _load_arrays(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _show_progress(world: World) -> bool | None:
    """A bar on rank 0's terminal only (None: decided by whether stderr is a terminal)."""
    return None if world.is_leader and world.size == 1 else False


def _log(run_or_dir, message: str) -> None:
    """Print a progress line and append it to ``out_dir/run.log``."""
    out_dir = run_or_dir.out_dir if isinstance(run_or_dir, Run) else Path(run_or_dir)
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(("\r\x1b[K" if sys.stdout.isatty() else "") + line, flush=True)  # over a progress bar
    with open(out_dir / "run.log", "a") as log:
        log.write(line + "\n")


# ----------------------------------------------------------------------------------------------
# Inputs


def _absolute_inputs(opt) -> dict:
    from .io.optimisation_set import KEYS

    inputs = {}
    for name in KEYS:
        resolved = opt.resolved(name) if getattr(opt, name) is not None else None
        inputs[name] = None if resolved is None else str(Path(resolved).resolve())
    inputs["extra"] = {k: v for k, v in opt.extra.items()}
    return inputs


def _check_output_folder(out_dir: Path, inputs: dict) -> list[Problem]:
    problems = []
    input_dirs = {str(Path(p).parent) for k, p in inputs.items() if k.endswith("_path") and p}
    if str(out_dir.resolve()) in input_dirs:
        problems.append(Problem(str(out_dir), "the output folder holds input files that the outputs would overwrite",
                                "choose another output folder with --o"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_test.{os.getpid()}"  # one per MPI rank: a shared name raced (one rank unlinked the other's)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        problems.append(Problem(str(out_dir), f"the output folder is not writable ({error.strerror})",
                                "choose a writable output folder with --o"))
    return problems


class _Inputs:
    """The inputs of a run, read once per process."""

    def __init__(self, run: Run):
        from .io import particles as particles_io
        from .io import tomograms as tomograms_io

        self.run = run
        self.tomogram_set = tomograms_io.read_tomogram_set(run.inputs["tomograms_path"])
        self.particle_set = particles_io.read_particle_set(run.inputs["particles_path"])
        self.names = tomograms_io.tomogram_names(self.tomogram_set)
        self._tomograms = {}
        self._adopted = {}

    def tomogram(self, name: str, adopted_hand: bool = True):
        """The tomogram as written in the input, with the hand the defocus step adopted (unless
        ``adopted_hand=False``: the input's, which the statistics' own arrays use)."""
        import dataclasses

        from .io import tomograms as tomograms_io

        if name not in self._tomograms:
            self._tomograms[name] = tomograms_io.tomogram(self.tomogram_set, name)
        tomo = self._tomograms[name]
        if adopted_hand and self.hand_adopted(name):
            tomo = dataclasses.replace(tomo, hand=-tomo.hand)
        return tomo

    def hand_adopted(self, name: str) -> bool:
        """Did the defocus step adopt the opposite hand for this tomogram (``RefineOptions.adopt_hand``)?"""
        if name not in self._adopted:
            path = self.run.temp / "defocus" / f"{name}.npz"
            if not _finished(path):
                return False  # not decided yet
            self._adopted[name] = bool(_load_arrays(path).get("hand_adopted", False))
        return self._adopted[name]

    def rows(self, name: str) -> np.ndarray:
        from .io.particles import particles_of

        return particles_of(self.particle_set, name)

    def optics_group(self, name: str) -> int:
        from .io.particles import optics_group_numbers

        groups = np.unique(optics_group_numbers(self.particle_set, self.rows(name)))
        if len(groups) > 1:
            raise InputError(Problem(self.run.inputs["particles_path"],
                                     f"the particles of tomogram {name} belong to several optics groups {groups.tolist()}",
                                     "give each tomogram's particles one optics group", "rlnOpticsGroup"))
        return int(groups[0]) if len(groups) else 1

    def zernike(self, group: int) -> tuple[list, list]:
        from .io.particles import optics_zernike

        return optics_zernike(self.particle_set, group)

    def with_statistics(self) -> list[str]:
        return [n for n in self.names if _finished(self.run.temp / "statistics" / f"{n}.npz")]

    def statistics(self, name: str, with_flipped_hand: bool = False, adopted_hand: bool = True) -> TiltStatistics:
        """The tomogram's statistics under the adopted hand (see :meth:`tomogram`); ``flipped_hand``
        (when asked for) is then the other one."""
        path = self.run.temp / "statistics" / f"{name}.npz"
        if not (adopted_hand and self.hand_adopted(name)):
            return TiltStatistics.load(path, with_flipped_hand)
        import dataclasses

        both = TiltStatistics.load(path, with_flipped_hand=True)
        own = dataclasses.replace(both, flipped_hand=None)
        return dataclasses.replace(both.flipped_hand, flipped_hand=own if with_flipped_hand else None)

    def frame_range(self, n_tilts: int) -> np.ndarray:
        """Tilts selected by ``--min_frame``/``--max_frame`` (table order; max <= 0 means all)."""
        first = max(0, self.run.options.min_frame)
        last = self.run.options.max_frame if self.run.options.max_frame > 0 else n_tilts - 1
        selected = np.zeros(n_tilts, dtype=bool)
        selected[first:min(last, n_tilts - 1) + 1] = True
        return selected


# ----------------------------------------------------------------------------------------------
# Step 1: statistics


def option_problems(options: RefineOptions) -> list[Problem]:
    """Contradictory or impossible :class:`RefineOptions` (the CLI checks its flags first, naming them;
    this catches the same mistakes made through the Python API)."""
    problems = []

    def add(name, message, fix):
        problems.append(Problem("RefineOptions", message, fix, name))

    if options.scale_mode not in ("per_frame", "per_tomogram", "global"):
        add("scale_mode", f"unknown scale mode {options.scale_mode!r}", "use 'per_frame', 'per_tomogram' or 'global'")
    if options.do_defocus and not options.defocus_scan_min_angstrom < options.defocus_scan_max_angstrom:
        add("defocus_scan_min_angstrom", f"the defocus scan is empty: {options.defocus_scan_min_angstrom:g} Å is not below "
            f"{options.defocus_scan_max_angstrom:g} Å", "scan a range such as -3000 to 3000 Å")
    if options.do_defocus and options.defocus_scan_steps < 2:
        add("defocus_scan_steps", f"the defocus scan needs at least 2 samples, got {options.defocus_scan_steps}", "use e.g. 100")
    if options.do_even_aberrations and options.even_order not in (2, 4, 6, 8):
        add("even_order", f"the even aberration order must be 2, 4, 6 or 8, got {options.even_order}", "use 4")
    if options.do_odd_aberrations and options.odd_order not in (1, 3, 5, 7):
        add("odd_order", f"the odd aberration order must be 1, 3, 5 or 7, got {options.odd_order}", "use 3")
    if options.threads < 1:
        add("threads", f"the thread count must be at least 1, got {options.threads}", "use 1 or more")
    if not options.regularisation_lambda >= 0:
        add("regularisation_lambda", f"the regularisation strength must be a non-negative number, got {options.regularisation_lambda:g}", "use e.g. 0.1")
    return problems


def prepare(opt, options: RefineOptions, out_dir, command_line: str = "", world: World | None = None) -> Run:
    """Validate the inputs, then accumulate every tomogram's sufficient statistics.

    Raises
    ------
    InputError
        With every problem of the inputs or the output folder, before any heavy work.
    """
    import numba

    from . import reference as reference_mod
    from .io import particles as particles_io
    from .io import tomograms as tomograms_io
    from .io.trajectories import read_trajectories
    from .statistics import compute_statistics
    from .validate import validate_inputs

    world = world or World()
    out_dir = Path(out_dir)
    problems = option_problems(options) + validate_inputs(opt, box_size_px=options.box_size_px)
    inputs = _absolute_inputs(opt) if not problems else {}
    if not problems:
        problems += _check_output_folder(out_dir, inputs)
    if problems:
        raise InputError(problems)
    run = Run(out_dir, options, inputs, command_line)
    run_file = run.temp / RUN_FILE
    if world.is_leader:
        if options.only_do_unfinished and run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous.get("fingerprint") != options.fingerprint() or previous.get("inputs") != inputs:
                raise InputError(Problem(str(out_dir), "--only_do_unfinished: this folder holds a run with other inputs or settings",
                                         "resume with the same inputs and flags, or use a new --o"))
        elif not options.only_do_unfinished:
            for stale in sorted(run.temp.glob("*/*")) if run.temp.exists() else []:
                stale.unlink()
        run.save()
        (out_dir / "note.txt").write_text((command_line or "tomoctfrefine refine") + "\n")
    world.barrier()

    numba.set_num_threads(max(1, min(options.threads, numba.config.NUMBA_NUM_THREADS)))
    data = _Inputs(run)
    counts = {n: len(data.rows(n)) for n in data.names}
    mine = world.share([n for n in data.names if counts[n] > 0], [counts[n] for n in data.names if counts[n] > 0])
    todo = [n for n in mine if not (options.only_do_unfinished and _finished(run.temp / "statistics" / f"{n}.npz"))]
    if len(todo) < len(mine):
        _log(run, f"prepare: {len(mine) - len(todo)} tomogram(s) already done, skipped (--only_do_unfinished)")
    if not todo:
        world.barrier()
        return run

    references, cutoff = _references_and_cutoff(run)
    trajectories = read_trajectories(inputs["trajectories_path"]) if inputs.get("trajectories_path") else None

    with Progress("prepare", sum(counts[n] for n in todo), len(todo), enabled=_show_progress(world)) as bar:
        for index, name in enumerate(todo, 1):
            started = time.time()
            tomo = data.tomogram(name, adopted_hand=False)
            rows = data.rows(name)
            images = tomograms_io.load_tilt_images(tomo)
            weights = reference_mod.noise_weights(images, options.box_size_px, per_frame=options.per_frame_noise) * cutoff[None]
            shifts = None
            if trajectories is not None:
                names = particles_io.particle_names(data.particle_set, rows)
                shifts = np.stack([trajectories[n] for n in names])
            even, _ = data.zernike(data.optics_group(name))
            selected = data.frame_range(tomo.tilt_count)
            statistics = compute_statistics(
                tomo, images,
                particles_io.particle_positions_px(data.particle_set, rows, tomo),
                particles_io.particle_rotations(data.particle_set, rows),
                particles_io.half_sets(data.particle_set, rows),
                references, weights, even,
                with_flipped_hand=options.check_hand,
                trajectory_shifts_angstrom=shifts,
                tilts=np.nonzero(selected)[0].tolist(),
            )
            statistics.save(run.temp / "statistics" / f"{name}.npz")
            _log(run, f"prepare: {name} ({index}/{len(todo)} on rank {world.rank}): {len(rows)} particles, "
                      f"{tomo.tilt_count} tilts, {int(statistics.particle_count.sum())} particle-tilt pairs, "
                      f"{time.time() - started:.1f} s")
            bar.advance(len(rows), name)
            del statistics, images, weights  # not alive while the next tomogram's are made
    world.barrier()
    return run


def _references_and_cutoff(run: Run):
    """The prepared half maps (cropped to the weights' support) and the FSC-based frequency weight."""
    from . import reference as reference_mod
    from .io.fsc import read_fsc
    from .io.maps import read_map

    inputs, options = run.inputs, run.options
    half1, voxel = read_map(inputs["ref1_path"])
    half2, _ = read_map(inputs["ref2_path"])
    mask = read_map(inputs["mask_path"])[0] if inputs.get("mask_path") else None
    references = reference_mod.prepare_references(half1, half2, mask, options.box_size_px, voxel,
                                                  map_paths=(inputs["ref1_path"], inputs["ref2_path"]))
    if inputs.get("fsc_path"):
        fsc = read_fsc(inputs["fsc_path"])
    elif (run.temp / "half_map_fsc.star").exists():
        fsc = read_fsc(run.temp / "half_map_fsc.star")
    else:
        fsc = _half_map_fsc(run, half1, half2, mask, voxel)
    cutoff = reference_mod.frequency_cutoff_weight(
        references, fsc=fsc, freq_cutoff_angstrom=options.freq_cutoff_angstrom,
        fsc_thresh_width_px=options.fsc_threshold_width_px, use_snr_weight=options.use_snr_weight)
    return references.cropped(reference_mod.weight_support_radius_px(cutoff)), cutoff


def _half_map_fsc(run: Run, half1, half2, mask, voxel_size_angstrom: float):
    """Without ``--fsc``: the mask-corrected FSC of the half maps (phase randomisation), not RELION's
    optimistic estimate from the unrandomised half maps."""
    from .fsc import mask_corrected_fsc, write_fsc_star

    result = mask_corrected_fsc(np.asarray(half1, float), np.asarray(half2, float),
                                None if mask is None else np.asarray(mask, float), voxel_size_angstrom)
    write_fsc_star(result, run.temp / "half_map_fsc.star")
    _log(run, f"no --fsc given: using the mask-corrected FSC of the half maps (0.143 at {result.resolution(0.143):.2f} Å, "
              f"written to {run.temp / 'half_map_fsc.star'}) instead of an estimate without phase randomisation")
    return result.as_curve()


# ----------------------------------------------------------------------------------------------
# Step 2: defocus


def _band(run: Run, statistics: TiltStatistics):
    from .refine.likelihood import FrequencyBand

    return FrequencyBand(kmin_angstrom=run.options.kmin_angstrom if run.options.kmin_angstrom > 0 else None)


def _odd_phase(data: _Inputs, name: str, statistics: TiltStatistics):
    from .physics.geometry import fourier_grid_per_angstrom
    from .physics.zernike import odd_phase_rad

    _, odd = data.zernike(data.optics_group(name))
    if not any(odd):
        return None
    fx, fy = fourier_grid_per_angstrom(statistics.box_size_px, statistics.pixel_size_angstrom)
    return odd_phase_rad(odd, fx, fy)


def _defocus_arrays(fit) -> dict:
    return {f.name: getattr(fit, f.name) for f in fields(fit)}


def refine_defocus(out_dir, world: World | None = None) -> None:
    """Refine every tomogram's per-tilt defocus and astigmatism (scale profiled out); also the hand check."""
    from .refine import defocus as defocus_mod
    from .refine.handedness import check_handedness

    world = world or World()
    run = Run.load(out_dir)
    data = _Inputs(run)
    names = data.with_statistics()
    mine = world.share(names, [len(data.rows(n)) for n in names])
    with Progress("defocus", sum(len(data.rows(n)) for n in mine), len(mine), enabled=_show_progress(world)) as bar:
        for name in mine:
            target = run.temp / "defocus" / f"{name}.npz"
            if run.options.only_do_unfinished and _finished(target):
                continue
            started = time.time()
            statistics = data.statistics(name, with_flipped_hand=True, adopted_hand=False)
            tomo = data.tomogram(name, adopted_hand=False)
            selected = data.frame_range(tomo.tilt_count)
            kwargs = dict(
                scan_min_angstrom=run.options.defocus_scan_min_angstrom,
                scan_max_angstrom=run.options.defocus_scan_max_angstrom,
                scan_steps=run.options.defocus_scan_steps,
                band=_band(run, statistics),
                regularisation_lambda=run.options.regularisation_lambda if run.options.regularise_defocus else 0.0,
                odd_phase_rad=_odd_phase(data, name, statistics),
                input_scale=tomo.ctf_scale,
                tilt_mask=selected,
            )
            ctf = (tomo.defocus_u_angstrom, tomo.defocus_v_angstrom, tomo.defocus_angle_deg)
            fit = defocus_mod.refine_defocus(statistics, tomo.optics.wavelength_angstrom, *ctf, **kwargs)
            hand = {}
            if statistics.flipped_hand is not None:
                options_for_hand = {k: v for k, v in kwargs.items() if k != "band"}
                verdict = check_handedness(statistics, tomo.optics.wavelength_angstrom, *ctf, input_fit=fit,
                                           band=kwargs["band"], **options_for_hand)
                adopted = verdict.verdict == "opposite hand" and run.options.adopt_hand
                message = verdict.message
                if adopted:
                    fit = verdict.opposite_fit
                    message += (f" Refined with the opposite hand and written as rlnTomoHand {-tomo.hand:+g} (input "
                                f"{tomo.hand:+g}); --keep_hand keeps the input hand.")
                elif verdict.verdict == "opposite hand":
                    message += " The hand was not changed (--keep_hand): flip rlnTomoHand and rerun."
                hand = {"hand_log_likelihood_gain": np.array(verdict.log_likelihood_ratio),
                        "hand_z_score": np.array(verdict.z_score), "hand_verdict": np.array(verdict.verdict),
                        "hand_message": np.array(message), "hand_adopted": np.array(adopted)}
                _log(run, f"hand: {name}: {message}")
            _save_arrays(target, **{k: v for k, v in _defocus_arrays(fit).items() if v is not None}, **hand)
            _log(run, f"defocus: {name}: {int(fit.refined.sum())}/{tomo.tilt_count} tilts refined, median "
                      f"uncertainty {np.median(fit.uncertainty_angstrom[fit.refined]) if fit.refined.any() else float('nan'):.0f} Å, "
                      f"{time.time() - started:.1f} s")
            bar.advance(len(data.rows(name)), name)
            del statistics  # not alive while the next tomogram's are read
    world.barrier()


# ----------------------------------------------------------------------------------------------
# Step 3: scale


def _latest_phase_change(run: Run, data: _Inputs, name: str, statistics: TiltStatistics):
    """Phase ``delta`` ``(n_tilts, s, s//2+1)`` of the latest CTF relative to the statistics' (input)
    CTF, and the latest odd-aberration phase (or None)."""
    from .physics.geometry import fourier_grid_per_angstrom
    from .physics.zernike import even_phase_rad, odd_phase_rad
    from .refine.defocus import absolute_parameters, defocus_phase_change_rad

    before = data.tomogram(name)
    after, (even, _), (new_even, new_odd) = _latest_ctf(run, data, name)
    s, pixel, n = statistics.box_size_px, statistics.pixel_size_angstrom, statistics.n_tilts
    ctf = lambda t: (t.defocus_u_angstrom, t.defocus_v_angstrom, t.defocus_angle_deg)  # noqa: E731
    change = absolute_parameters(*ctf(after), n) - absolute_parameters(*ctf(before), n)
    delta = defocus_phase_change_rad(change, before.optics.wavelength_angstrom, s, pixel)
    fx, fy = fourier_grid_per_angstrom(s, pixel)
    if any(even) or any(new_even):
        delta = delta + (even_phase_rad(new_even, fx, fy) - even_phase_rad(even, fx, fy))[None]
    return delta, (odd_phase_rad(new_odd, fx, fy) if any(new_odd) else None)


def _scale_evidence(statistics: TiltStatistics, delta, odd_phase):
    """Per-tilt scale estimate and its information from the accumulated statistics taken to the latest
    CTF (``delta``, ``odd_phase`` from :func:`_latest_phase_change`), over the scale band
    (:func:`~tomoctfrefine.refine.scale.scale_band`)."""
    from .refine.scale import scale_band, scale_evidence

    return scale_evidence(statistics, defocus_change_phase_rad=delta, odd_phase_rad=odd_phase,
                          band=scale_band(statistics.box_size_px, statistics.pixel_size_angstrom))


def _latest_ctf(run: Run, data: _Inputs, name: str):
    """The tomogram at its latest CTF (refined defocus, else the input) and the latest even and odd
    Zernike coefficients of its optics group, plus the input ones."""
    import dataclasses

    tomo = data.tomogram(name)
    latest = _latest_defocus(run, name) if run.options.do_defocus else None
    if latest is not None:
        tomo = dataclasses.replace(tomo, defocus_u_angstrom=latest["defocus_u_angstrom"],
                                   defocus_v_angstrom=latest["defocus_v_angstrom"],
                                   defocus_angle_deg=latest["defocus_angle_deg"])
    group = data.optics_group(name)
    even, odd = data.zernike(group)
    new_even, new_odd = list(even), list(odd)
    group_file = run.temp / "aberrations" / f"group_{group}.npz"
    if run.options.do_aberrations and _finished(group_file):
        arrays = _load_arrays(group_file)
        if arrays.get("even_coefficients") is not None:
            new_even = list(arrays["even_coefficients"])
        if arrays.get("odd_coefficients") is not None:
            new_odd = list(arrays["odd_coefficients"])
    return tomo, (list(even), list(odd)), (new_even, new_odd)


def _ctf_stage(run: Run, name: str) -> str:
    """Which step's CTF the scale evidence of a tomogram is computed at (names its evidence file)."""
    if run.options.do_aberrations and _finished(run.temp / "aberrations" / f"{name}.npz"):
        return "aberrations"
    if run.options.do_defocus and _finished(run.temp / "defocus" / f"{name}.npz"):
        return "defocus"
    return "input"


def _neighbour_references(run: Run):
    """The references cropped to the neighbour model's resolution (the full ones are let go at once:
    at box 384 they are most of the scale step's memory), the frequency weight, and that resolution as a
    radius in pixels (the model only where the particles' signal competes with the noise)."""
    from .image_model import NEIGHBOUR_MODEL_RESOLUTION_ANGSTROM

    references, cutoff = _references_and_cutoff(run)
    radius = min(float(references.max_radius_px),
                 run.options.box_size_px * references.pixel_size_angstrom / NEIGHBOUR_MODEL_RESOLUTION_ANGSTROM)
    return (references.cropped(radius) if radius < references.max_radius_px else references), cutoff, radius


def _evidence_path(run: Run, name: str) -> Path:
    return run.temp / "scale" / f"{name}.evidence_{_ctf_stage(run, name)}.npz"


def _neighbour_scale_evidence(run: Run, data: _Inputs, name: str, neighbour_references, accumulated: TiltStatistics,
                              delta, odd_phase, first_estimate):
    """Per-tilt scale estimate and information with the neighbouring particles modelled, and (when the
    defocus is refined) the defocus polished on the same statistics.

    Every particle is rendered at the latest CTF and the first scale estimate
    (:func:`tomoctfrefine.image_model.render_tilt_model`), the tilt images minus that model are
    accumulated at the latest CTF with their own noise weights, and each particle's own model is added
    back to its statistics (:func:`tomoctfrefine.image_model.with_own_particles`): what remains in a box
    besides its particle is the noise and the model's error, not the neighbours' signal. The defocus is
    then refitted locally from the latest CTF (no scan, over the scale's band: from
    ``MODELLED_SCALE_LOWEST_RADIUS_PX``, not from ``--kmin``), and the scale taken at that defocus.

    ``neighbour_references`` is :func:`_neighbour_references`' result; ``accumulated``, ``delta`` and
    ``odd_phase`` are the tomogram's statistics and the latest CTF's phases relative to them (used beyond
    the model's resolution).

    Returns
    -------
    (estimate, information, polished) : the scale evidence and a DefocusFit (or None).
    """
    from .image_model import neighbour_removed_statistics
    from .io import particles as particles_io
    from .io import tomograms as tomograms_io
    from .io.trajectories import read_trajectories
    from .refine import defocus as defocus_mod
    from .refine.scale import MODELLED_SCALE_LOWEST_RADIUS_PX, scale_band, scale_evidence

    options = run.options
    references, cutoff, model_radius = neighbour_references
    tomo, _, (even, _) = _latest_ctf(run, data, name)
    rows = data.rows(name)
    positions = particles_io.particle_positions_px(data.particle_set, rows, tomo)
    rotations = particles_io.particle_rotations(data.particle_set, rows)
    halves = particles_io.half_sets(data.particle_set, rows)
    shifts = None
    if run.inputs.get("trajectories_path"):
        trajectories = read_trajectories(run.inputs["trajectories_path"])
        shifts = np.stack([trajectories[n] for n in particles_io.particle_names(data.particle_set, rows)])
    s = options.box_size_px
    scale = np.where(first_estimate[1] > 0, first_estimate[0], tomo.ctf_scale)
    selected = np.nonzero(data.frame_range(tomo.tilt_count))[0]
    statistics = neighbour_removed_statistics(
        tomo, tomograms_io.load_tilt_images(tomo), positions, rotations, halves, shifts, scale, selected, references,
        cutoff, model_radius, even, odd_phase, accumulated.with_phase_change(delta),
        per_frame_noise=options.per_frame_noise, scratch_path=run.temp / "scale" / f".{name}.residual.npy")
    band = scale_band(s, tomo.pixel_size_angstrom, lowest_radius_px=MODELLED_SCALE_LOWEST_RADIUS_PX)
    if not options.do_defocus:
        estimate, information = scale_evidence(statistics, odd_phase_rad=odd_phase, band=band)
        return estimate, information, None
    ctf = (tomo.defocus_u_angstrom, tomo.defocus_v_angstrom, tomo.defocus_angle_deg)
    # the band of the scale: with the neighbours modelled the low frequencies are clean, and for the
    # middle-dose tilts they hold much of the defocus information (accuracy set, 40-100 e/Å²: 1.18 ->
    # 1.08x the Cramér-Rao bound against --kmin 30)
    polished = defocus_mod.refine_defocus(
        statistics, tomo.optics.wavelength_angstrom, *ctf, scan_steps=1, band=band,
        regularisation_lambda=options.regularisation_lambda if options.regularise_defocus else 0.0,
        odd_phase_rad=odd_phase, input_scale=scale, tilt_mask=data.frame_range(tomo.tilt_count))
    estimate, information = scale_evidence(
        statistics, odd_phase_rad=odd_phase, band=band,
        defocus_change_phase_rad=defocus_mod.defocus_phase_change_rad(
            polished.defocus_change_angstrom, tomo.optics.wavelength_angstrom, s, tomo.pixel_size_angstrom))
    return estimate, information, polished


def _scale_evidence_step(run: Run, data: _Inputs, world: World) -> dict:
    """Every rank computes the scale evidence of its share of the tomograms (saved per CTF stage, so a
    resumed run reuses it); returns the paths of all tomograms' evidence files."""
    names = data.with_statistics()
    paths = {n: _evidence_path(run, n) for n in names}
    mine = world.share(names, [len(data.rows(n)) for n in names])
    todo = [n for n in mine if not _finished(paths[n])]
    if todo:
        neighbour_references = None
        with Progress("scale", sum(len(data.rows(n)) for n in todo), len(todo), enabled=_show_progress(world)) as bar:
            for name in todo:
                started = time.time()
                statistics = data.statistics(name)
                delta, odd_phase = _latest_phase_change(run, data, name, statistics)
                estimate, information = _scale_evidence(statistics, delta, odd_phase)
                first, polished = (estimate, information), None
                if run.options.model_neighbours:
                    if neighbour_references is None:
                        neighbour_references = _neighbour_references(run)
                    estimate, information, polished = _neighbour_scale_evidence(
                        run, data, name, neighbour_references, statistics, delta, odd_phase, first)
                del statistics, delta
                extra = {} if polished is None else {k: v for k, v in _defocus_arrays(polished).items() if v is not None}
                _save_arrays(paths[name], **extra, estimate=estimate, information=information, first_estimate=first[0],
                             first_information=first[1])
                if run.options.model_neighbours:
                    _log(run, f"scale: {name}: neighbouring particles modelled ({time.time() - started:.1f} s)")
                bar.advance(len(data.rows(name)), name)
    world.barrier()
    return paths


def refine_scale(out_dir, world: World | None = None) -> None:
    """Fit the scale model: per frame, Beer-Lambert per tomogram, or Beer-Lambert with one luminance."""
    from .refine import scale as scale_mod

    world = world or World()
    run = Run.load(out_dir)
    data = _Inputs(run)
    paths = _scale_evidence_step(run, data, world)
    if not world.is_leader:
        world.barrier()
        return
    names = data.with_statistics()
    evidence = {}
    for n in names:
        arrays = _load_arrays(paths[n])
        evidence[n] = (arrays["estimate"], arrays["information"])
    tomos = {n: data.tomogram(n) for n in names}
    for n in names:
        selected = data.frame_range(tomos[n].tilt_count)
        evidence[n] = (evidence[n][0], np.where(selected, evidence[n][1], 0.0))
    mode = run.options.scale_mode
    if mode == "global":
        dose = {n: _dose_factor(tomos[n]) for n in names}
        fits = scale_mod.fit_global_beer_lambert(
            {n: evidence[n][0] for n in names}, {n: evidence[n][1] for n in names},
            {n: tomos[n].projection_matrices for n in names},
            input_scales={n: tomos[n].ctf_scale for n in names}, dose_factors=dose)
    elif mode == "per_tomogram":
        fits = {n: scale_mod.fit_beer_lambert(evidence[n][0], evidence[n][1], tomos[n].projection_matrices,
                                              input_scale=tomos[n].ctf_scale) for n in names}
    else:
        fits = {n: scale_mod.fit_per_frame_scale(evidence[n][0], evidence[n][1], tomos[n].ctf_scale) for n in names}
    for n, fit in fits.items():
        scale = np.where(data.frame_range(tomos[n].tilt_count), fit.scale, tomos[n].ctf_scale)
        _save_arrays(run.temp / "scale" / f"{n}.npz", scale=scale, estimate=evidence[n][0], information=evidence[n][1],
                     luminance=fit.luminance, relative_ice_thickness=fit.relative_ice_thickness,
                     ice_normal=fit.ice_normal)
        _write_json(run.temp / "scale" / f"{n}.json", {"model": fit.model, "success": bool(fit.success), "message": fit.message})
        _log(run, f"scale: {n}: {fit.message}")
    world.barrier()


def _dose_factor(tomo) -> float:
    """RELION's ``d_t``: the fractional dose, else the difference of the two smallest pre-exposures."""
    if tomo.fractional_dose_e_per_angstrom2 and tomo.fractional_dose_e_per_angstrom2 > 0:
        return float(tomo.fractional_dose_e_per_angstrom2)
    doses = np.unique(tomo.pre_exposure_e_per_angstrom2)
    return float(doses[1] - doses[0]) if len(doses) > 1 else 1.0


# ----------------------------------------------------------------------------------------------
# Step 4: aberrations


def refine_aberrations(out_dir, world: World | None = None) -> None:
    """Fit even/odd Zernike aberrations per optics group, jointly with every tilt's defocus and scale."""
    from .refine import aberrations as aberrations_mod
    from .refine.defocus import DefocusFit

    world = world or World()
    run = Run.load(out_dir)
    if not world.is_leader:
        world.barrier()
        return
    options = run.options
    data = _Inputs(run)
    names = data.with_statistics()
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(data.optics_group(n), []).append(n)
    for group, members in sorted(groups.items()):
        started = time.time()
        statistics = {n: data.statistics(n) for n in members}
        tomos = {n: data.tomogram(n) for n in members}
        starts = {}
        for n in members:
            path = run.temp / "defocus" / f"{n}.npz"
            if options.do_defocus and _finished(path):
                arrays = _load_arrays(path)
                starts[n] = DefocusFit(**{f.name: arrays.get(f.name) for f in fields(DefocusFit)})
        even, odd = data.zernike(group)
        fit = aberrations_mod.refine_aberrations(
            statistics,
            {n: tomos[n].optics.wavelength_angstrom for n in members},
            {n: (tomos[n].defocus_u_angstrom, tomos[n].defocus_v_angstrom, tomos[n].defocus_angle_deg) for n in members},
            defocus_start=starts or None,
            even_order=options.even_order if options.do_even_aberrations else None,
            odd_order=options.odd_order if options.do_odd_aberrations else None,
            existing_even=even, existing_odd=odd,
            refine_defocus=options.do_defocus,
            regularisation_lambda=options.regularisation_lambda if options.regularise_defocus else 0.0,
            band=_band(run, statistics[members[0]]),
            input_scales={n: tomos[n].ctf_scale for n in members},
            tilt_masks={n: data.frame_range(tomos[n].tilt_count) for n in members},
        )
        for n in members:
            _save_arrays(run.temp / "aberrations" / f"{n}.npz", **_defocus_arrays(fit.defocus[n]))
        _save_arrays(run.temp / "aberrations" / f"group_{group}.npz",
                     even_coefficients=fit.even_coefficients if options.do_even_aberrations else None,
                     odd_coefficients=fit.odd_coefficients if options.do_odd_aberrations else None,
                     even_uncertainty=fit.even_uncertainty, odd_uncertainty=fit.odd_uncertainty,
                     even_phase_per_pixel=fit.even_phase_per_pixel, even_phase_fit=fit.even_phase_fit,
                     odd_phase_per_pixel=fit.odd_phase_per_pixel, odd_phase_fit=fit.odd_phase_fit)
        _log(run, f"aberrations: optics group {group}: even {np.round(fit.even_coefficients, 2).tolist()}, "
                  f"odd {np.round(fit.odd_coefficients, 2).tolist()}, {time.time() - started:.1f} s")
        del statistics, fit  # not alive during the next group or the scale step
    world.barrier()


# ----------------------------------------------------------------------------------------------
# Step 5: outputs


def _latest_defocus(run: Run, name: str) -> dict | None:
    """The latest defocus fit: polished with the neighbours modelled (scale step), else the aberration
    step's, else the defocus step's."""
    evidence = _evidence_path(run, name)
    if _finished(evidence):
        arrays = _load_arrays(evidence)
        if "defocus_u_angstrom" in arrays:
            return arrays
    for step in ("aberrations", "defocus"):
        path = run.temp / step / f"{name}.npz"
        if _finished(path):
            return _load_arrays(path)
    return None


def write_outputs(out_dir, world: World | None = None) -> Path:
    """Write RELION's files (tomograms.star, tilt_series/*.star, particles.star when aberrations were
    refined, optimisation_set.star), the aberration phase maps, summary.json, the plots and logfile.pdf.

    Returns the path of the output optimisation set.
    """
    from .io import particles as particles_io
    from .io import tomograms as tomograms_io
    from .io.maps import write_map
    from .io.optimisation_set import OptimisationSet, write_optimisation_set
    from .refine.aberrations import full_centred_image
    from .report import scale_uncertainty, write_report, write_summary

    world = world or World()
    run = Run.load(out_dir)
    out = run.out_dir / "optimisation_set.star"
    if not world.is_leader:
        return out
    options = run.options
    data = _Inputs(run)
    tset, pset = data.tomogram_set, data.particle_set
    summary = {"tomograms": {}, "options": asdict(options), "command_line": run.command_line}
    for name in data.names:
        tomo = data.tomogram(name)
        entry = {
            "tilt_angle_deg": _tilt_angles(tomo),
            "pre_exposure_e_per_angstrom2": tomo.pre_exposure_e_per_angstrom2,
            "defocus_u_before_angstrom": tomo.defocus_u_angstrom,
            "defocus_v_before_angstrom": tomo.defocus_v_angstrom,
            "defocus_angle_before_deg": tomo.defocus_angle_deg,
            "scale_before": tomo.ctf_scale,
            "particle_count": len(data.rows(name)),
        }
        u, v, angle, scale = tomo.defocus_u_angstrom, tomo.defocus_v_angstrom, tomo.defocus_angle_deg, tomo.ctf_scale
        latest = _latest_defocus(run, name)
        if options.do_defocus and latest is not None:
            u, v, angle = latest["defocus_u_angstrom"], latest["defocus_v_angstrom"], latest["defocus_angle_deg"]
            entry.update(defocus_u_after_angstrom=u, defocus_v_after_angstrom=v, defocus_angle_after_deg=angle,
                         defocus_uncertainty_angstrom=np.where(np.isfinite(latest["uncertainty_angstrom"]), latest["uncertainty_angstrom"], -1.0),
                         refined=latest["refined"])
        defocus_file = run.temp / "defocus" / f"{name}.npz"
        if defocus_file.exists():
            arrays = _load_arrays(defocus_file)
            if "hand_verdict" in arrays:
                entry["hand"] = {"log_likelihood_gain": float(arrays["hand_log_likelihood_gain"]),
                                 "z_score": float(arrays["hand_z_score"]), "verdict": str(arrays["hand_verdict"]),
                                 "message": str(arrays["hand_message"]), "adopted": data.hand_adopted(name),
                                 "input": float(data.tomogram(name, adopted_hand=False).hand), "written": float(tomo.hand)}
        if data.hand_adopted(name):
            tset = tomograms_io.with_hand(tset, name, tomo.hand)
        scale_file = run.temp / "scale" / f"{name}.npz"
        if options.do_scale and scale_file.exists():
            scale_arrays = _load_arrays(scale_file)
            scale = scale_arrays["scale"]
            model = json.loads((run.temp / "scale" / f"{name}.json").read_text())
            entry.update(scale_after=scale, scale_per_tilt=scale_arrays["estimate"], scale_model=model["model"],
                         scale_message=model["message"], scale_uncertainty=scale_uncertainty(scale_arrays["information"]))
            if "luminance" in scale_arrays:
                normal = scale_arrays["ice_normal"]
                tset = tomograms_io.with_global_values(
                    tset, name, relative_luminance=float(scale_arrays["luminance"]),
                    relative_ice_thickness=float(scale_arrays["relative_ice_thickness"]),
                    ice_normal_x=float(normal[0]), ice_normal_y=float(normal[1]), ice_normal_z=float(normal[2]))
        for label, values in (("defocus U", u), ("defocus V", v), ("defocus angle", angle), ("scale", scale)):
            if not np.all(np.isfinite(values)):
                raise RuntimeError(f"{name}: refusing to write non-finite {label} values")
        tset = tomograms_io.with_tilt_ctf(tset, name, u, v, angle, ctf_scale=scale)
        summary["tomograms"][name] = entry

    particles_path = run.inputs["particles_path"]
    if options.do_aberrations:
        voxel = data.tomogram(data.names[0]).pixel_size_angstrom
        for path in sorted((run.temp / "aberrations").glob("group_*.npz")):
            group = int(path.stem.split("_")[1])
            arrays = _load_arrays(path)
            even = arrays.get("even_coefficients")
            odd = arrays.get("odd_coefficients")
            for label, values in (("even aberration", even), ("odd aberration", odd)):
                if values is not None and not np.all(np.isfinite(values)):
                    raise RuntimeError(f"optics group {group}: refusing to write non-finite {label} coefficients")
            pset = particles_io.with_zernike(pset, group, None if even is None else even.tolist(),
                                             None if odd is None else odd.tolist())
            summary.setdefault("aberrations", {})[str(group)] = {
                "even": [] if even is None else even, "odd": [] if odd is None else odd}
            for kind, antisymmetric in (("even", False), ("odd", True)):
                if arrays.get(f"{kind}_coefficients") is None:
                    continue
                for suffix, key in (("per-pixel", f"{kind}_phase_per_pixel"), ("nonlinear-fit", f"{kind}_phase_fit")):
                    image = full_centred_image(arrays[key], antisymmetric=antisymmetric)
                    write_map(run.out_dir / f"group_{group}_{kind}_phase_{suffix}.mrc", image.astype(np.float32)[None], voxel)
        particles_path = str(particles_io.write_particle_set(pset, run.out_dir / "particles.star"))
    tomograms_path = str(tomograms_io.write_tomogram_set(tset, run.out_dir))
    inputs = run.inputs
    written = OptimisationSet(
        particles_path=_portable(particles_path), tomograms_path=_portable(tomograms_path),
        trajectories_path=_portable(inputs.get("trajectories_path")), ref1_path=_portable(inputs.get("ref1_path")),
        ref2_path=_portable(inputs.get("ref2_path")), mask_path=_portable(inputs.get("mask_path")),
        fsc_path=_portable(inputs.get("fsc_path")), extra=dict(inputs.get("extra", {})), version="50001")
    # optimisation_set.star last: it marks the run as finished, so it must not exist if anything failed
    write_report(summary, run.out_dir, _phase_maps(run.out_dir))
    write_summary(summary, run.out_dir / "summary.json")
    write_optimisation_set(written, out)
    _log(run, f"wrote {out}")
    return out


def _phase_maps(out_dir: Path) -> dict:
    """The aberration phase maps written in ``out_dir`` (``group_<g>_<kind>_phase_<fit>.mrc``), by group."""
    from .io.maps import read_map

    maps: dict = {}
    for path in sorted(Path(out_dir).glob("group_*_phase_*.mrc")):
        group, kind, _, fit = path.stem.split("_", 1)[1].split("_")
        maps.setdefault(f"phase_group_{group}", {})[f"{kind} {fit}"] = np.squeeze(read_map(path)[0])
    return maps


def _portable(path: str | None) -> str | None:
    """A path relative to the working directory when it lies below it (RELION's convention), else absolute."""
    if path is None:
        return None
    absolute = Path(path).resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(absolute)


def _tilt_angles(tomo) -> np.ndarray:
    """Tilt angle of each image (degrees) from its projection matrix (sign from the beam direction)."""
    beams = tomo.projection_matrices[:, 2, :3]
    beams = beams / np.linalg.norm(beams, axis=1, keepdims=True)
    return np.rad2deg(np.arctan2(-beams[:, 0], beams[:, 2]))


# ----------------------------------------------------------------------------------------------
# Everything


#: Every step, in the order they run. :func:`plan` picks the ones a run needs.
STEPS = ("prepare", "refine_defocus", "refine_aberrations", "refine_scale", "write_outputs", "assess_refinement")


def plan(options: RefineOptions) -> list[str]:
    """The steps a refinement with ``options`` runs, in order (names of this module's step functions).

    The CLI, the Python API (:func:`run_refinement`) and the Scipion protocol all follow this plan.
    The defocus step also runs the hand check, so it runs whenever the hand is checked. The scale step
    comes last of the fits: it fits the scale model at the final CTF (after the aberrations' joint fit).
    """
    wanted = {
        "prepare": True,
        "refine_defocus": options.do_defocus or options.check_hand,
        "refine_aberrations": options.do_aberrations,
        "refine_scale": options.do_scale,
        "write_outputs": True,
        "assess_refinement": options.assess,
    }
    return [step for step in STEPS if wanted[step]]


def run_step(step: str, out_dir, world: World | None = None):
    """Run one step of the plan after ``prepare`` (which needs the inputs: call :func:`prepare`)."""
    if step not in STEPS or step == "prepare":
        raise ValueError(f"unknown step {step!r}: expected one of {STEPS[1:]}")
    world = world or World()
    if step == "assess_refinement":
        return assess_refinement(out_dir) if world.is_leader else None
    return globals()[step](out_dir, world)


def run_refinement(opt, options: RefineOptions, out_dir, command_line: str = "") -> Path:
    """Run every step of :func:`plan` (the CLI's ``refine``) and return the output optimisation set."""
    world = World()
    with world.guard():
        started = time.time()
        prepare(opt, options, out_dir, command_line, world)
        for step in plan(options)[1:]:
            run_step(step, out_dir, world)
        if world.is_leader:
            _log(Path(out_dir), f"finished in {time.time() - started:.1f} s")
        return Path(out_dir) / "optimisation_set.star"


def assess_refinement(out_dir) -> dict:
    """Reconstruct the particle with the input and with the refined CTF, and report the FSC gain
    (``assess.json``, ``plots/fsc_before_after.png``, a section in summary.json and logfile.pdf)."""
    from .assess import assess, summary_lines
    from .io.maps import read_map_header
    from .io.optimisation_set import read_optimisation_set
    from .report import write_report, write_summary

    run = Run.load(out_dir)
    before = run.optimisation_set()
    after = read_optimisation_set(run.out_dir / "optimisation_set.star")
    crop = read_map_header(run.inputs["ref1_path"]).shape[0]
    result = assess(before, after, run.out_dir / "assess", box_size_px=run.options.box_size_px, crop_size_px=crop,
                    log=lambda message: _log(run, f"assess: {message}"))
    for line in summary_lines(result):
        _log(run, f"assess: {line}")
    summary = json.loads((run.out_dir / "summary.json").read_text())
    summary["assessment"] = result
    write_summary(summary, run.out_dir / "summary.json")
    figure = run.out_dir / "assess" / "fsc.png"
    write_report(summary, run.out_dir, _phase_maps(run.out_dir), extra_images=[figure] if figure.exists() else [])
    return result
