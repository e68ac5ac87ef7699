"""Step 1: validate everything, claim the output folder, then accumulate every tomogram's sufficient
statistics (the only step that reads images; spread over MPI ranks)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numba
import numpy as np

from .. import forward
from .. import reference as reference_mod
from ..distribute import World
from ..errors import InputError, Problem
from ..io import particles as particles_io
from ..io import tomograms as tomograms_io
from ..io.optimisation_set import KEYS
from ..io.trajectories import read_trajectories
from ..options import RefineOptions, option_problems
from ..progress import Progress
from ..statistics import compute_statistics
from ..validate import validate_inputs
from .inputs import RunInputs
from .references import references_and_cutoff
from .workspace import (RUN_FILE, STEP_FOLDERS, Workspace, clear_folder, describe_changes, finished, input_fingerprint,
                        log, write_text)

#: What a run writes in ``--o`` besides ``temp/`` and the tilt-series STAR files (a fresh run removes them first,
#: so that nothing of an earlier run is left beside the new one's; ``optimisation_set.star`` goes first: it marks
#: a finished run).
OUTPUT_FILES = ("optimisation_set.star", "tomograms.star", "particles.star", "summary.json", "logfile.pdf", "note.txt")
OUTPUT_GLOBS = ("group_*_phase_*.mrc",)
OUTPUT_FOLDERS = ("temp", "plots", "assess")


def show_progress(world: World) -> bool | None:
    """A bar on rank 0's terminal only (None: decided by whether stderr is a terminal)."""
    return None if world.is_leader and world.size == 1 else False


def progress(step: str, workspace: Workspace, world: World, total_particles: int, tomograms: int) -> Progress:
    """A step's progress: a bar on rank 0's terminal, and rate/ETA lines in run.log at least every few seconds."""
    return Progress(step, total_particles, tomograms, enabled=show_progress(world), unit="particles",
                    log=(lambda message: log(workspace, message)) if world.is_leader else None)


def absolute_inputs(opt) -> dict:
    inputs: dict = {}
    for name in KEYS:
        resolved = opt.resolved(name) if getattr(opt, name) is not None else None
        inputs[name] = None if resolved is None else str(Path(resolved).resolve())
    inputs["extra"] = dict(opt.extra)
    return inputs


def input_files(inputs: dict, tomogram_set, source: Path | None = None) -> list[Path]:
    """Every file a run reads: the optimisation set, the files it names, the per-tilt-series STAR files and the
    tilt images (resolved, absolute, symbolic links followed)."""
    paths = [Path(source)] if source is not None else []
    paths += [Path(p) for k, p in inputs.items() if k.endswith("_path") and p]
    if tomogram_set is not None:
        paths += list(tomogram_set.tilt_paths.values())
        for name in tomograms_io.tomogram_names(tomogram_set):
            stack, micrographs = tomograms_io.image_paths(tomogram_set, name)
            paths += [stack] if stack is not None else list(micrographs or ())
    return list(dict.fromkeys(Path(os.path.realpath(p)) for p in paths))


def planned_outputs(out_dir: Path, tomogram_set) -> tuple[list[Path], list[Path]]:
    """``(files, folders)`` a run may write in ``out_dir`` (real paths)."""
    out = Path(os.path.realpath(out_dir))
    files = [out / name for name in OUTPUT_FILES + ("run.log", ".tomoctfrefine.lock")]
    if tomogram_set is not None:
        files += [Path(os.path.realpath(p)) for p in tomograms_io.tilt_series_output_paths(tomogram_set, out).values()]
    folders = [out / name for name in OUTPUT_FOLDERS]
    return files, folders


def output_folder_problems(out_dir: Path, reads: list[Path], tomogram_set) -> list[Problem]:
    """Refuse an ``--o`` whose outputs could replace an input, or that cannot be written."""
    problems = []
    files, folders = planned_outputs(out_dir, tomogram_set)
    written = set(files)
    clashes = [p for p in reads if p in written or any(p.is_relative_to(folder) for folder in folders)
               or p.name.startswith("group_") and p.parent == Path(os.path.realpath(out_dir)) and p.suffix == ".mrc"]
    if clashes:
        shown = ", ".join(str(p) for p in clashes[:3]) + (f" and {len(clashes) - 3} more" if len(clashes) > 3 else "")
        problems.append(Problem(str(out_dir), f"the outputs would overwrite input files ({shown})",
                                "give an output folder that holds none of the inputs, e.g. a new job folder, with --o"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_test.{os.getpid()}"  # one per MPI rank: a shared name raced
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        problems.append(Problem(str(out_dir), f"the output folder is not writable ({error.strerror})",
                                "choose a writable output folder with --o"))
    return problems


def clear_previous_outputs(out_dir: Path, tomogram_set, keep_temp: bool) -> None:
    """Remove what an earlier run of this program wrote in ``out_dir`` (its finished marker first), never anything
    else: nothing is removed from a folder without this program's run state (``temp/run.json``)."""
    if not (out_dir / "temp" / RUN_FILE).exists():
        return
    (out_dir / "optimisation_set.star").unlink(missing_ok=True)
    if keep_temp:
        return
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for pattern in OUTPUT_GLOBS:
        for path in out_dir.glob(pattern):
            path.unlink()
    for name in OUTPUT_FOLDERS:
        clear_folder(out_dir / name)
    if tomogram_set is not None:
        for path in tomograms_io.tilt_series_output_paths(tomogram_set, out_dir).values():
            path.unlink(missing_ok=True)


def prepare(opt, options: RefineOptions, out_dir, command_line: str = "", world: World | None = None,
            pipeline_control: str | None = None, flag_names: dict | None = None) -> Workspace:
    """Validate the inputs and the options, claim the output folder, then accumulate every tomogram's
    sufficient statistics.

    Parameters
    ----------
    opt : OptimisationSet
    options : RefineOptions
    out_dir : path
    command_line : str
        Written to note.txt and summary.json.
    world : World, optional
    pipeline_control : str, optional
        RELION's job folder (``--pipeline_control``).
    flag_names : dict, optional
        OptimisationSet field -> flag, so that problems in paths given on the command line name their flag.

    Raises
    ------
    InputError
        With every problem of the options, the inputs or the output folder, before any heavy work.
    """
    world = world or World()
    out_dir = Path(out_dir)
    problems = option_problems(options, naming="field")
    if problems:
        raise InputError(problems)
    problems = validate_inputs(opt, box_size_px=options.box_size_px, flag_names=flag_names)
    if problems:
        raise InputError(problems)
    inputs = absolute_inputs(opt)
    tomogram_set = tomograms_io.read_tomogram_set(inputs["tomograms_path"])
    reads = input_files(inputs, tomogram_set, opt.source_path)
    problems = output_folder_problems(out_dir, reads, tomogram_set)
    if problems:
        raise InputError(problems)
    if world.is_leader:
        workspace = Workspace(out_dir, options, inputs, command_line, input_fingerprint(reads), pipeline_control)
        workspace.lock()
        _claim(workspace, tomogram_set)
    world.barrier()
    workspace = Workspace.load(out_dir)
    _accumulate(workspace, world)
    return workspace


def _claim(workspace: Workspace, tomogram_set) -> None:
    """Make the folder this run's: keep an earlier run's step results only when resuming under the same keys."""
    options, out_dir = workspace.options, workspace.out_dir
    run_file = workspace.temp / RUN_FILE
    previous = json.loads(run_file.read_text()) if run_file.exists() else None
    if workspace.taken_over:
        log(workspace, f"the previous run in this folder ({workspace.taken_over}) ended without finishing")
    if options.only_do_unfinished and previous is not None:
        clear_previous_outputs(out_dir, tomogram_set, keep_temp=True)
        stale = workspace.stale_steps(previous)
        if stale:
            changes = describe_changes(previous, options, workspace.inputs, workspace.input_hash)
            log(workspace, f"--only_do_unfinished: {', '.join(changes) or 'other settings'} since the earlier run: "
                           f"its results from the {stale[0].replace('refine_', '').replace('prepare', 'statistics')} step "
                           "on are redone")
            for step in stale:
                clear_folder(workspace.step_dir(step))
        kept = [STEP_FOLDERS[s] for s in STEP_FOLDERS if s not in stale and workspace.step_dir(s).exists()]
        if kept:
            log(workspace, f"--only_do_unfinished: keeping the finished {', '.join(kept)} results of the earlier run")
    else:
        clear_previous_outputs(out_dir, tomogram_set, keep_temp=False)
    workspace.save()
    if not workspace.pipeline_control:  # under RELION's pipeliner, note.txt is the pipeliner's
        write_text(out_dir / "note.txt", (workspace.command_line or "tomoctfrefine refine") + "\n")


def frequency_weights(tomo, images: np.ndarray, cutoff: np.ndarray, options: RefineOptions) -> np.ndarray:
    """Per-tilt weights ``(n_tilts, s, s//2+1)``: inverse noise power times the reference's frequency weight, each
    row cut where RELION's ``--cutoff_fract`` cuts it (beyond the last frequency whose weight, relative to the
    tilt's mean, and dose weight both exceed the fraction)."""
    weights = reference_mod.noise_weights(images, options.box_size_px, per_frame=options.per_frame_noise) * cutoff[None]
    if options.cutoff_fraction > 0:
        weights = weights * forward.row_range_mask(weights, forward.tilt_damping(tomo, options.box_size_px),
                                                   options.cutoff_fraction)
    return weights


def _accumulate(workspace: Workspace, world: World) -> None:
    options = workspace.options
    numba.set_num_threads(max(1, min(options.threads, numba.config.NUMBA_NUM_THREADS)))
    folder = workspace.open_step("prepare") if world.is_leader else workspace.step_dir("prepare")
    world.barrier()
    data = RunInputs(workspace)
    counts = {n: data.particle_count(n) for n in data.names}
    mine = world.share([n for n in data.names if counts[n] > 0], [counts[n] for n in data.names if counts[n] > 0])
    todo = [n for n in mine if not finished(workspace.artefact("prepare", n))]
    if len(todo) < len(mine):
        log(workspace, f"prepare: {len(mine) - len(todo)} tomogram(s) already done, skipped (--only_do_unfinished)")
    if todo:
        references, cutoff = references_and_cutoff(workspace)
        trajectories = read_trajectories(workspace.inputs["trajectories_path"]) if workspace.inputs.get("trajectories_path") else None
        with progress("prepare", workspace, world, sum(counts[n] for n in todo), len(todo)) as bar:
            for index, name in enumerate(todo, 1):
                workspace.check_abort()
                started = time.time()
                tomo = data.tomogram(name, adopted_hand=False)
                rows = data.rows(name)
                images = tomograms_io.load_tilt_images(tomo)
                weights = frequency_weights(tomo, images, cutoff, options)
                selected = data.frame_range(tomo.tilt_count)
                even, _ = data.zernike(data.optics_group(name))
                statistics = compute_statistics(
                    tomo, images,
                    particles_io.particle_positions_px(data.particle_set, rows, tomo),
                    particles_io.particle_rotations(data.particle_set, rows),
                    particles_io.half_sets(data.particle_set, rows),
                    references, weights, even,
                    with_flipped_hand=options.check_hand,
                    trajectory_shifts_angstrom=data.trajectory_shifts(name, trajectories),
                    tilts=np.nonzero(selected)[0].tolist(),
                )
                statistics.save(workspace.artefact("prepare", name))
                log(workspace, f"prepare: {name} ({index}/{len(todo)} on rank {world.rank}): {len(rows)} particles, "
                               f"{tomo.tilt_count} tilts, {int(statistics.particle_count.sum())} particle-tilt pairs, "
                               f"{time.time() - started:.1f} s")
                bar.advance(len(rows), name)
                del statistics, images, weights  # not alive while the next tomogram's are made
    del folder
    world.barrier()
