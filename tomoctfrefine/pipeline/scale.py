"""Step 4: the contrast scale. Every rank computes the per-tilt scale evidence of its tomograms at the latest
CTF (with the neighbouring particles modelled, polishing the defocus on the same statistics); rank 0 fits the
scale model: per frame, Beer-Lambert per tomogram, or Beer-Lambert with one luminance for all."""
from __future__ import annotations

import time

import numpy as np

from ..distribute import World
from ..image_model import neighbour_removed_statistics
from ..io import particles as particles_io
from ..io import tomograms as tomograms_io
from ..io.trajectories import read_trajectories
from ..physics.geometry import fourier_grid_per_angstrom
from ..physics.zernike import even_phase_rad, odd_phase_rad
from ..refine import defocus as defocus_mod
from ..refine import scale as scale_mod
from ..statistics import TiltStatistics
from .artefacts import ScaleEvidence, ScaleResult
from .inputs import RunInputs
from .latest import evidence_path, latest_ctf
from .prepare import progress
from .references import neighbour_references
from .workspace import Workspace, finished, log


def latest_phase_change(workspace: Workspace, data: RunInputs, name: str, statistics: TiltStatistics):
    """Phase ``delta`` ``(n_tilts, s, s//2+1)`` of the latest CTF relative to the statistics' (input) CTF, and
    the latest odd-aberration phase (or None)."""
    before = data.tomogram(name)
    after, (even, _), (new_even, new_odd) = latest_ctf(workspace, data, name)
    s, pixel, n = statistics.box_size_px, statistics.pixel_size_angstrom, statistics.n_tilts
    ctf = lambda t: (t.defocus_u_angstrom, t.defocus_v_angstrom, t.defocus_angle_deg)  # noqa: E731
    change = defocus_mod.absolute_parameters(*ctf(after), n) - defocus_mod.absolute_parameters(*ctf(before), n)
    delta = defocus_mod.defocus_phase_change_rad(change, before.optics.wavelength_angstrom, s, pixel)
    fx, fy = fourier_grid_per_angstrom(s, pixel)
    if any(even) or any(new_even):
        delta = delta + (even_phase_rad(new_even, fx, fy) - even_phase_rad(even, fx, fy))[None]
    return delta, (odd_phase_rad(new_odd, fx, fy) if any(new_odd) else None)


def first_evidence(statistics: TiltStatistics, delta, odd_phase):
    """Per-tilt scale estimate and its information from the accumulated statistics taken to the latest CTF, over
    the scale band (:func:`~tomoctfrefine.refine.scale.scale_band`)."""
    return scale_mod.scale_evidence(statistics, defocus_change_phase_rad=delta, odd_phase_rad=odd_phase,
                                    band=scale_mod.scale_band(statistics.box_size_px, statistics.pixel_size_angstrom))


def neighbour_free_evidence(workspace: Workspace, data: RunInputs, name: str, references, accumulated: TiltStatistics,
                            delta, odd_phase, first_estimate):
    """Per-tilt scale estimate and information with the neighbouring particles modelled, and (when the defocus is
    refined) the defocus polished on the same statistics.

    The statistics come from :func:`tomoctfrefine.image_model.neighbour_removed_statistics` (every particle
    rendered at the latest CTF and the first scale estimate, subtracted, each particle's own model added back).
    The defocus is then refitted locally from the latest CTF (no scan, over the scale's band: from
    ``MODELLED_SCALE_LOWEST_RADIUS_PX``, not from ``--kmin``), and the scale taken at that defocus.

    Returns
    -------
    (estimate, information, polished) : the scale evidence and a DefocusFit (or None).
    """
    options = workspace.options
    cropped, cutoff, model_radius = references
    tomo, _, (even, _) = latest_ctf(workspace, data, name)
    rows = data.rows(name)
    trajectories = read_trajectories(workspace.inputs["trajectories_path"]) if workspace.inputs.get("trajectories_path") else None
    scale = np.where(first_estimate[1] > 0, first_estimate[0], tomo.ctf_scale)
    selected = np.nonzero(data.frame_range(tomo.tilt_count))[0]
    statistics = neighbour_removed_statistics(
        tomo, tomograms_io.load_tilt_images(tomo), particles_io.particle_positions_px(data.particle_set, rows, tomo),
        particles_io.particle_rotations(data.particle_set, rows), particles_io.half_sets(data.particle_set, rows),
        data.trajectory_shifts(name, trajectories), scale, selected, cropped, cutoff, model_radius, even, odd_phase,
        accumulated.with_phase_change(delta), per_frame_noise=options.per_frame_noise,
        cutoff_fraction=options.cutoff_fraction,
        scratch_path=workspace.artefact("refine_scale", f".{name}", ".residual.npy"))
    band = scale_mod.scale_band(options.box_size_px, tomo.pixel_size_angstrom,
                                lowest_radius_px=scale_mod.MODELLED_SCALE_LOWEST_RADIUS_PX)
    if not options.do_defocus:
        estimate, information = scale_mod.scale_evidence(statistics, odd_phase_rad=odd_phase, band=band)
        return estimate, information, None
    ctf = (tomo.defocus_u_angstrom, tomo.defocus_v_angstrom, tomo.defocus_angle_deg)
    # the band of the scale: with the neighbours modelled the low frequencies are clean, and for the middle-dose
    # tilts they hold much of the defocus information (accuracy set, 40-100 e/Å²: 1.18 -> 1.08x the Cramér-Rao
    # bound against --kmin 30)
    polished = defocus_mod.refine_defocus(
        statistics, tomo.optics.wavelength_angstrom, *ctf, scan_steps=1, band=band,
        regularisation_lambda=options.regularisation_lambda if options.regularise_defocus else 0.0,
        regularised_components=options.regularised_components,
        odd_phase_rad=odd_phase, input_scale=scale, tilt_mask=data.frame_range(tomo.tilt_count))
    estimate, information = scale_mod.scale_evidence(
        statistics, odd_phase_rad=odd_phase, band=band,
        defocus_change_phase_rad=defocus_mod.defocus_phase_change_rad(
            polished.defocus_change_angstrom, tomo.optics.wavelength_angstrom, options.box_size_px, tomo.pixel_size_angstrom))
    return estimate, information, polished


def _evidence(workspace: Workspace, data: RunInputs, world: World) -> dict:
    """Every rank computes the scale evidence of its share of the tomograms (saved per CTF stage, so a resumed run
    reuses it); returns the paths of all tomograms' evidence files."""
    names = data.with_statistics()
    paths = {n: evidence_path(workspace, n) for n in names}
    mine = world.share(names, [data.particle_count(n) for n in names])
    todo = [n for n in mine if not finished(paths[n])]
    if todo:
        references = None
        with progress("scale", workspace, world, sum(data.particle_count(n) for n in todo), len(todo)) as bar:
            for name in todo:
                workspace.check_abort()
                started = time.time()
                statistics = data.statistics(name)
                delta, odd_phase = latest_phase_change(workspace, data, name, statistics)
                first = first_evidence(statistics, delta, odd_phase)
                estimate, information, polished = first[0], first[1], None
                if workspace.options.model_neighbours:
                    if references is None:
                        references = neighbour_references(workspace)
                    estimate, information, polished = neighbour_free_evidence(
                        workspace, data, name, references, statistics, delta, odd_phase, first)
                del statistics, delta
                ScaleEvidence(estimate, information, first[0], first[1], polished).save(paths[name])
                if workspace.options.model_neighbours:
                    log(workspace, f"scale: {name}: neighbouring particles modelled ({time.time() - started:.1f} s)")
                bar.advance(data.particle_count(name), name)
    world.barrier()
    return paths


def dose_factor(tomo) -> float:
    """RELION's ``d_t``: the fractional dose, else the difference of the two smallest pre-exposures."""
    if tomo.fractional_dose_e_per_angstrom2 and tomo.fractional_dose_e_per_angstrom2 > 0:
        return float(tomo.fractional_dose_e_per_angstrom2)
    doses = np.unique(tomo.pre_exposure_e_per_angstrom2)
    return float(doses[1] - doses[0]) if len(doses) > 1 else 1.0


def refine_scale(out_dir, world: World | None = None) -> None:
    """Fit the scale model: per frame, Beer-Lambert per tomogram, or Beer-Lambert with one luminance."""
    world = world or World()
    workspace = Workspace.load(out_dir)
    if world.is_leader:
        workspace.lock()
        workspace.open_step("refine_scale")
    world.barrier()
    data = RunInputs(workspace)
    paths = _evidence(workspace, data, world)
    if not world.is_leader:
        world.barrier()
        return
    names = data.with_statistics()
    tomos = {n: data.tomogram(n) for n in names}
    evidence = {}
    for n in names:
        loaded = ScaleEvidence.load(paths[n])
        evidence[n] = (loaded.estimate, np.where(data.frame_range(tomos[n].tilt_count), loaded.information, 0.0))
    mode = workspace.options.scale_mode
    if mode == "global":
        fits = scale_mod.fit_global_beer_lambert(
            {n: evidence[n][0] for n in names}, {n: evidence[n][1] for n in names},
            {n: tomos[n].projection_matrices for n in names},
            input_scales={n: tomos[n].ctf_scale for n in names}, dose_factors={n: dose_factor(tomos[n]) for n in names})
    elif mode == "per_tomogram":
        fits = {n: scale_mod.fit_beer_lambert(evidence[n][0], evidence[n][1], tomos[n].projection_matrices,
                                              input_scale=tomos[n].ctf_scale) for n in names}
    else:
        fits = {n: scale_mod.fit_per_frame_scale(evidence[n][0], evidence[n][1], tomos[n].ctf_scale) for n in names}
    for n, fit in fits.items():
        scale = np.where(data.frame_range(tomos[n].tilt_count), fit.scale, tomos[n].ctf_scale)
        ScaleResult(scale, evidence[n][0], evidence[n][1], fit.model, bool(fit.success), fit.message, fit.luminance,
                    fit.relative_ice_thickness, fit.ice_normal).save(workspace.artefact("refine_scale", n))
        if workspace.options.diagnostics:
            _write_scale_diagnostics(workspace, n, evidence[n], scale)
        log(workspace, f"scale: {n}: {fit.message}")
    world.barrier()


def _write_scale_diagnostics(workspace: Workspace, name: str, evidence, scale) -> None:
    """RELION's ``--diag`` files: ``<tomo>_raw_scale.dat`` (per tilt: index, estimate, its standard error) and
    ``<tomo>_fitted_scale.dat`` (index, the scale written)."""
    from .workspace import write_text

    estimate, information = evidence
    error = np.where(information > 0, 1.0 / np.sqrt(np.where(information > 0, information, 1.0)), np.inf)
    write_text(workspace.artefact("refine_scale", f"{name}_raw_scale", ".dat"),
               "".join(f"{f} {e:.6f} {s:.6f}\n" for f, (e, s) in enumerate(zip(estimate, error))))
    write_text(workspace.artefact("refine_scale", f"{name}_fitted_scale", ".dat"),
               "".join(f"{f} {v:.6f}\n" for f, v in enumerate(scale)))
