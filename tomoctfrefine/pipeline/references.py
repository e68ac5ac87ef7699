"""The references every step that predicts particles uses: the prepared half maps and the frequency weight."""
from __future__ import annotations

import numpy as np

from .. import reference as reference_mod
from ..fsc import mask_corrected_fsc, write_fsc_star
from ..io.fsc import read_fsc
from ..io.maps import read_map
from .workspace import Workspace, log


def references_and_cutoff(workspace: Workspace):
    """The prepared half maps (cropped to the weights' support) and the FSC-based frequency weight."""
    inputs, options = workspace.inputs, workspace.options
    half1, voxel = read_map(inputs["ref1_path"])
    half2, _ = read_map(inputs["ref2_path"])
    mask = read_map(inputs["mask_path"])[0] if inputs.get("mask_path") else None
    references = reference_mod.prepare_references(half1, half2, mask, options.box_size_px, voxel,
                                                  map_paths=(inputs["ref1_path"], inputs["ref2_path"]))
    if inputs.get("fsc_path"):
        fsc = read_fsc(inputs["fsc_path"])
    elif (workspace.temp / "half_map_fsc.star").exists():
        fsc = read_fsc(workspace.temp / "half_map_fsc.star")
    else:
        fsc = _half_map_fsc(workspace, half1, half2, mask, voxel)
    cutoff = reference_mod.frequency_cutoff_weight(
        references, fsc=fsc, freq_cutoff_angstrom=options.freq_cutoff_angstrom,
        fsc_thresh_width_px=options.fsc_threshold_width_px, use_snr_weight=options.use_snr_weight)
    return references.cropped(reference_mod.weight_support_radius_px(cutoff)), cutoff


def _half_map_fsc(workspace: Workspace, half1, half2, mask, voxel_size_angstrom: float):
    """Without ``--fsc``: the mask-corrected FSC of the half maps (phase randomisation), not RELION's optimistic
    estimate from the unrandomised half maps."""
    result = mask_corrected_fsc(np.asarray(half1, float), np.asarray(half2, float),
                                None if mask is None else np.asarray(mask, float), voxel_size_angstrom)
    write_fsc_star(result, workspace.temp / "half_map_fsc.star")
    log(workspace, f"no --fsc given: using the mask-corrected FSC of the half maps (0.143 at {result.resolution(0.143):.2f} Å, "
                   f"written to {workspace.temp / 'half_map_fsc.star'}) instead of an estimate without phase randomisation")
    return result.as_curve()


def neighbour_references(workspace: Workspace):
    """The references cropped to the neighbour model's resolution (the full ones are let go at once: at box 384
    they are most of the scale step's memory), the frequency weight, and that resolution as a radius in pixels
    (the model only where the particles' signal competes with the noise)."""
    from ..image_model import NEIGHBOUR_MODEL_RESOLUTION_ANGSTROM

    references, cutoff = references_and_cutoff(workspace)
    radius = min(float(references.max_radius_px),
                 workspace.options.box_size_px * references.pixel_size_angstrom / NEIGHBOUR_MODEL_RESOLUTION_ANGSTROM)
    return (references.cropped(radius) if radius < references.max_radius_px else references), cutoff, radius
