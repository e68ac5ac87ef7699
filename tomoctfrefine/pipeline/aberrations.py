"""Step 3: even/odd Zernike aberrations per optics group, fitted jointly with every tilt's defocus and scale."""
from __future__ import annotations

import time

import numpy as np

from ..distribute import World
from ..refine import aberrations as aberrations_mod
from .artefacts import AberrationResult, DefocusResult
from .defocus import band
from .inputs import RunInputs
from .workspace import Workspace, finished, log


def group_path(workspace: Workspace, group: int):
    """The optics group's result (in a subfolder, so that no tomogram name can collide with it)."""
    return workspace.step_dir("refine_aberrations") / "optics_groups" / f"{int(group)}.npz"


def group_results(workspace: Workspace) -> dict[int, AberrationResult]:
    """Every optics group's finished result, by group number."""
    folder = workspace.step_dir("refine_aberrations") / "optics_groups"
    paths = sorted(folder.glob("*.npz"), key=lambda p: int(p.stem)) if folder.exists() else []
    return {int(p.stem): AberrationResult.load(p) for p in paths if finished(p)}


def refine_aberrations(out_dir, world: World | None = None) -> None:
    """Fit even/odd Zernike aberrations per optics group, jointly with every tilt's defocus and scale (rank 0)."""
    world = world or World()
    workspace = Workspace.load(out_dir)
    if not world.is_leader:
        world.barrier()
        return
    workspace.lock()
    workspace.open_step("refine_aberrations")
    options = workspace.options
    data = RunInputs(workspace)
    groups: dict[int, list[str]] = {}
    for n in data.with_statistics():
        groups.setdefault(data.optics_group(n), []).append(n)
    for group, members in sorted(groups.items()):
        target = group_path(workspace, group)
        if finished(target) and all(finished(workspace.artefact("refine_aberrations", n)) for n in members):
            continue
        workspace.check_abort()
        started = time.time()
        statistics = {n: data.statistics(n) for n in members}
        tomos = {n: data.tomogram(n) for n in members}
        starts = {}
        for n in members:
            path = workspace.artefact("refine_defocus", n)
            if options.do_defocus and finished(path):
                result = DefocusResult.load(path)
                if result is not None:
                    starts[n] = result.fit
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
            regularised_components=options.regularised_components,
            band=band(workspace),
            input_scales={n: tomos[n].ctf_scale for n in members},
            tilt_masks={n: data.frame_range(tomos[n].tilt_count) for n in members},
        )
        for n in members:
            DefocusResult(fit.defocus[n]).save(workspace.artefact("refine_aberrations", n))
        AberrationResult(
            even_coefficients=fit.even_coefficients if options.do_even_aberrations else None,
            odd_coefficients=fit.odd_coefficients if options.do_odd_aberrations else None,
            even_uncertainty=fit.even_uncertainty, odd_uncertainty=fit.odd_uncertainty,
            even_phase_per_pixel=fit.even_phase_per_pixel, even_phase_fit=fit.even_phase_fit,
            odd_phase_per_pixel=fit.odd_phase_per_pixel, odd_phase_fit=fit.odd_phase_fit,
        ).save(target)
        log(workspace, f"aberrations: optics group {group}: even {np.round(fit.even_coefficients, 2).tolist()}, "
                       f"odd {np.round(fit.odd_coefficients, 2).tolist()}, {time.time() - started:.1f} s")
        del statistics, fit  # not alive during the next group or the scale step
    world.barrier()
