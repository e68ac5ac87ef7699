"""Step 2: every tomogram's per-tilt defocus and astigmatism (scale profiled out), and the hand check."""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..distribute import World
from ..io.maps import write_map
from ..physics.geometry import fourier_grid_per_angstrom
from ..physics.zernike import odd_phase_rad
from ..refine import defocus as defocus_mod
from ..refine.handedness import check_handedness
from ..refine.likelihood import FrequencyBand
from ..statistics import TiltStatistics
from .artefacts import DefocusResult, HandCheck
from .inputs import RunInputs
from .prepare import progress
from .workspace import Workspace, finished, log


def band(workspace: Workspace) -> FrequencyBand:
    """The defocus fit's frequencies: from ``--kmin`` to the box corners."""
    kmin = workspace.options.kmin_angstrom
    return FrequencyBand(kmin_angstrom=kmin if kmin > 0 else None)


def odd_phase(data: RunInputs, name: str, statistics: TiltStatistics) -> np.ndarray | None:
    """The input odd aberration phase of the tomogram's optics group (None without odd terms)."""
    _, odd = data.zernike(data.optics_group(name))
    if not any(odd):
        return None
    fx, fy = fourier_grid_per_angstrom(statistics.box_size_px, statistics.pixel_size_angstrom)
    return odd_phase_rad(odd, fx, fy)


def lowest_dose_ctf(tomo) -> tuple[float, float, float]:
    """The central CTF ``(U, V, angle)`` of the tilt with the lowest pre-exposure (``--reset_to_common``)."""
    first = int(np.argmin(tomo.pre_exposure_e_per_angstrom2))
    return (float(tomo.defocus_u_angstrom[first]), float(tomo.defocus_v_angstrom[first]),
            float(tomo.defocus_angle_deg[first]))


def _at_common_ctf(statistics: TiltStatistics, tomo, common) -> TiltStatistics:
    """The statistics taken from each tilt's input CTF to the common one (both hands)."""
    n = statistics.n_tilts
    change = (defocus_mod.absolute_parameters(*common, n)
              - defocus_mod.absolute_parameters(tomo.defocus_u_angstrom, tomo.defocus_v_angstrom, tomo.defocus_angle_deg, n))
    delta = defocus_mod.defocus_phase_change_rad(change, tomo.optics.wavelength_angstrom, statistics.box_size_px,
                                                 statistics.pixel_size_angstrom)
    flipped = None if statistics.flipped_hand is None else statistics.flipped_hand.with_phase_change(delta)
    return dataclasses.replace(statistics.with_phase_change(delta), flipped_hand=flipped)


def _relative_to_input(fit, tomo):
    """A fit made from the common CTF, expressed as a change from each tilt's input CTF; tilts it did not refine
    keep their input values."""
    n = tomo.tilt_count
    before = (tomo.defocus_u_angstrom, tomo.defocus_v_angstrom, tomo.defocus_angle_deg)
    u, v, angle = (np.where(fit.refined, new, old) for new, old in zip(
        (fit.defocus_u_angstrom, fit.defocus_v_angstrom, fit.defocus_angle_deg), before))
    change = defocus_mod.absolute_parameters(u, v, angle, n) - defocus_mod.absolute_parameters(*before, n)
    return dataclasses.replace(fit, defocus_u_angstrom=u, defocus_v_angstrom=v, defocus_angle_deg=angle,
                               defocus_change_angstrom=change)


def refine_defocus(out_dir, world: World | None = None) -> None:
    """Refine every tomogram's per-tilt defocus and astigmatism (scale profiled out); also the hand check."""
    world = world or World()
    workspace = Workspace.load(out_dir)
    if world.is_leader:
        workspace.lock()
        workspace.open_step("refine_defocus")
    world.barrier()
    options = workspace.options
    data = RunInputs(workspace)
    names = data.with_statistics()
    mine = world.share(names, [data.particle_count(n) for n in names])
    with progress("defocus", workspace, world, sum(data.particle_count(n) for n in mine), len(mine)) as bar:
        for name in mine:
            target = workspace.artefact("refine_defocus", name)
            if finished(target):
                continue
            workspace.check_abort()
            started = time.time()
            statistics = data.statistics(name, with_flipped_hand=True, adopted_hand=False)
            tomo = data.tomogram(name, adopted_hand=False)
            ctf = (tomo.defocus_u_angstrom, tomo.defocus_v_angstrom, tomo.defocus_angle_deg)
            reset = options.reset_to_common and options.do_defocus and options.regularise_defocus
            if reset:
                common = lowest_dose_ctf(tomo)
                statistics = _at_common_ctf(statistics, tomo, common)
                ctf = tuple(np.full(tomo.tilt_count, value) for value in common)
            kwargs = dict(
                scan_min_angstrom=options.defocus_scan_min_angstrom,
                scan_max_angstrom=options.defocus_scan_max_angstrom,
                scan_steps=options.defocus_scan_steps,
                regularisation_lambda=options.regularisation_lambda if options.regularise_defocus else 0.0,
                regularised_components=options.regularised_components,
                odd_phase_rad=odd_phase(data, name, statistics),
                input_scale=tomo.ctf_scale,
                tilt_mask=data.frame_range(tomo.tilt_count),
            )
            fit = defocus_mod.refine_defocus(statistics, tomo.optics.wavelength_angstrom, *ctf, band=band(workspace), **kwargs)
            hand = None
            if statistics.flipped_hand is not None:
                verdict = check_handedness(statistics, tomo.optics.wavelength_angstrom, *ctf, input_fit=fit,
                                           band=band(workspace), **kwargs)
                adopted = verdict.verdict == "opposite hand" and options.adopt_hand
                message = verdict.message
                if adopted:
                    fit = verdict.opposite_fit
                    message += (f" Refined with the opposite hand and written as rlnTomoHand {-tomo.hand:+g} (input "
                                f"{tomo.hand:+g}); --keep_hand keeps the input hand.")
                elif verdict.verdict == "opposite hand":
                    message += " The hand was not changed (--keep_hand): flip rlnTomoHand and rerun."
                hand = HandCheck(float(verdict.log_likelihood_ratio), float(verdict.z_score), verdict.verdict, message, adopted)
                log(workspace, f"hand: {name}: {message}")
            if reset:
                fit = _relative_to_input(fit, tomo)
            DefocusResult(fit, hand).save(target)
            if options.diagnostics:
                write_map(workspace.artefact("refine_defocus", f"{name}_dataTerm", ".mrc"),
                          np.asarray(fit.scan_cost, dtype=np.float32)[None], 1.0)
            refined = fit.refined
            log(workspace, f"defocus: {name}: {int(refined.sum())}/{tomo.tilt_count} tilts refined, median uncertainty "
                           f"{np.median(fit.uncertainty_angstrom[refined]) if refined.any() else float('nan'):.0f} Å"
                           f"{', started from the lowest-dose tilt' if reset else ''}, {time.time() - started:.1f} s")
            bar.advance(data.particle_count(name), name)
            del statistics  # not alive while the next tomogram's are read
    world.barrier()
