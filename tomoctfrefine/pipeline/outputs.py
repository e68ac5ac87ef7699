"""Step 5: RELION's files (tomograms.star, tilt_series/*.star, particles.star when aberrations were refined,
optimisation_set.star), the aberration phase maps, summary.json, the plots and logfile.pdf (rank 0)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..distribute import World
from ..io import particles as particles_io
from ..io import tomograms as tomograms_io
from ..io.maps import write_map
from ..io.optimisation_set import OptimisationSet, write_optimisation_set
from ..refine.aberrations import full_centred_image
from ..report import read_phase_maps, scale_uncertainty, write_report
from .aberrations import group_results
from .artefacts import DefocusResult, ScaleResult
from .inputs import RunInputs
from .latest import latest_defocus
from .workspace import Workspace, finished, log, write_json


def tilt_angles_deg(tomo) -> np.ndarray:
    """Tilt angle of each image (degrees) from its projection matrix (sign from the beam direction)."""
    beams = tomo.projection_matrices[:, 2, :3]
    beams = beams / np.linalg.norm(beams, axis=1, keepdims=True)
    return np.rad2deg(np.arctan2(-beams[:, 0], beams[:, 2]))


def portable(path: str | None) -> str | None:
    """A path relative to the working directory when it lies below it (RELION's convention), else absolute."""
    if path is None:
        return None
    absolute = Path(path).resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(absolute)


def write_outputs(out_dir, world: World | None = None) -> Path:
    """Write RELION's files, the aberration phase maps, summary.json, the plots and logfile.pdf.

    Returns the path of the output optimisation set (written last: it marks the run as finished).
    """
    world = world or World()
    workspace = Workspace.load(out_dir)
    out = workspace.out_dir / "optimisation_set.star"
    if not world.is_leader:
        return out
    workspace.lock()
    options = workspace.options
    data = RunInputs(workspace)
    tset, pset = data.tomogram_set, data.particle_set
    summary: dict = {"tomograms": {}, "options": asdict(options), "command_line": workspace.command_line}
    for name in data.names:
        tomo = data.tomogram(name)
        entry = {
            "tilt_angle_deg": tilt_angles_deg(tomo),
            "pre_exposure_e_per_angstrom2": tomo.pre_exposure_e_per_angstrom2,
            "defocus_u_before_angstrom": tomo.defocus_u_angstrom,
            "defocus_v_before_angstrom": tomo.defocus_v_angstrom,
            "defocus_angle_before_deg": tomo.defocus_angle_deg,
            "scale_before": tomo.ctf_scale,
            "particle_count": data.particle_count(name),
        }
        u, v, angle, scale = tomo.defocus_u_angstrom, tomo.defocus_v_angstrom, tomo.defocus_angle_deg, tomo.ctf_scale
        latest = latest_defocus(workspace, name)
        if options.do_defocus and latest is not None:
            u, v, angle = latest.defocus_u_angstrom, latest.defocus_v_angstrom, latest.defocus_angle_deg
            entry.update(defocus_u_after_angstrom=u, defocus_v_after_angstrom=v, defocus_angle_after_deg=angle,
                         defocus_uncertainty_angstrom=np.where(np.isfinite(latest.uncertainty_angstrom),
                                                               latest.uncertainty_angstrom, -1.0),
                         refined=latest.refined)
        defocus_file = workspace.artefact("refine_defocus", name)
        result = DefocusResult.load(defocus_file) if finished(defocus_file) else None
        if result is not None and result.hand is not None:
            entry["hand"] = {"log_likelihood_gain": result.hand.log_likelihood_gain, "z_score": result.hand.z_score,
                             "verdict": result.hand.verdict, "message": result.hand.message,
                             "adopted": data.hand_adopted(name),
                             "input": float(data.tomogram(name, adopted_hand=False).hand), "written": float(tomo.hand)}
        if data.hand_adopted(name):
            tset = tomograms_io.with_hand(tset, name, tomo.hand)
        scale_file = workspace.artefact("refine_scale", name)
        if options.do_scale and finished(scale_file):
            fitted = ScaleResult.load(scale_file)
            scale = fitted.scale
            entry.update(scale_after=scale, scale_per_tilt=fitted.estimate,
                         scale_uncertainty=scale_uncertainty(fitted.information),
                         scale_model=fitted.model, scale_message=fitted.message)
            if fitted.luminance is not None:
                normal = fitted.ice_normal
                tset = tomograms_io.with_global_values(
                    tset, name, relative_luminance=float(fitted.luminance),
                    relative_ice_thickness=float(fitted.relative_ice_thickness),
                    ice_normal_x=float(normal[0]), ice_normal_y=float(normal[1]), ice_normal_z=float(normal[2]))
        for label, values in (("defocus U", u), ("defocus V", v), ("defocus angle", angle), ("scale", scale)):
            if not np.all(np.isfinite(values)):
                raise RuntimeError(f"{name}: refusing to write non-finite {label} values")
        tset = tomograms_io.with_tilt_ctf(tset, name, u, v, angle, ctf_scale=scale)
        summary["tomograms"][name] = entry

    particles_path = workspace.inputs["particles_path"]
    if options.do_aberrations:
        voxel = data.tomogram(data.names[0]).pixel_size_angstrom
        for group, fitted in group_results(workspace).items():
            even, odd = fitted.even_coefficients, fitted.odd_coefficients
            for label, values in (("even aberration", even), ("odd aberration", odd)):
                if values is not None and not np.all(np.isfinite(values)):
                    raise RuntimeError(f"optics group {group}: refusing to write non-finite {label} coefficients")
            pset = particles_io.with_zernike(pset, group, None if even is None else even.tolist(),
                                             None if odd is None else odd.tolist())
            summary.setdefault("aberrations", {})[str(group)] = {
                "even": [] if even is None else even, "odd": [] if odd is None else odd}
            for kind, antisymmetric in (("even", False), ("odd", True)):
                if getattr(fitted, f"{kind}_coefficients") is None:
                    continue
                for suffix, key in (("per-pixel", f"{kind}_phase_per_pixel"), ("nonlinear-fit", f"{kind}_phase_fit")):
                    image = full_centred_image(getattr(fitted, key), antisymmetric=antisymmetric)
                    write_map(workspace.out_dir / f"group_{group}_{kind}_phase_{suffix}.mrc", image.astype(np.float32)[None], voxel)
        particles_path = str(particles_io.write_particle_set(pset, workspace.out_dir / "particles.star"))
    tomograms_path = str(tomograms_io.write_tomogram_set(tset, workspace.out_dir))
    inputs = workspace.inputs
    written = OptimisationSet(
        particles_path=portable(particles_path), tomograms_path=portable(tomograms_path),
        trajectories_path=portable(inputs.get("trajectories_path")), ref1_path=portable(inputs.get("ref1_path")),
        ref2_path=portable(inputs.get("ref2_path")), mask_path=portable(inputs.get("mask_path")),
        fsc_path=portable(inputs.get("fsc_path")), extra=dict(inputs.get("extra", {})), version="50001")
    write_report(summary, workspace.out_dir, read_phase_maps(workspace.out_dir))
    write_json(workspace.out_dir / "summary.json", summary)
    write_optimisation_set(written, out)
    log(workspace, f"wrote {out}")
    return out
