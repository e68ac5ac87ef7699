"""The latest CTF of a tomogram: what the steps so far made of its defocus and its optics group's aberrations."""
from __future__ import annotations

import dataclasses

from ..refine.defocus import DefocusFit
from .artefacts import DefocusResult, ScaleEvidence
from .inputs import RunInputs
from .workspace import Workspace, finished


def ctf_stage(workspace: Workspace, name: str) -> str:
    """Which step's CTF the scale evidence of a tomogram is computed at (names its evidence file)."""
    options = workspace.options
    if options.do_aberrations and finished(workspace.artefact("refine_aberrations", name)):
        return "aberrations"
    if options.do_defocus and finished(workspace.artefact("refine_defocus", name)):
        return "defocus"
    return "input"


def evidence_path(workspace: Workspace, name: str):
    return workspace.artefact("refine_scale", name, f".evidence_{ctf_stage(workspace, name)}.npz")


def latest_defocus(workspace: Workspace, name: str) -> DefocusFit | None:
    """The latest defocus fit: polished with the neighbours modelled (scale step), else the aberration step's,
    else the defocus step's."""
    evidence = evidence_path(workspace, name)
    if finished(evidence):
        polished = ScaleEvidence.load(evidence).polished
        if polished is not None:
            return polished
    for step in ("refine_aberrations", "refine_defocus"):
        path = workspace.artefact(step, name)
        if finished(path):
            result = DefocusResult.load(path)
            if result is not None:
                return result.fit
    return None


def latest_ctf(workspace: Workspace, data: RunInputs, name: str):
    """The tomogram at its latest CTF (refined defocus, else the input) and the latest even and odd Zernike
    coefficients of its optics group, plus the input ones: ``(tomogram, (even, odd), (new_even, new_odd))``."""
    from .aberrations import group_results

    tomo = data.tomogram(name)
    latest = latest_defocus(workspace, name) if workspace.options.do_defocus else None
    if latest is not None:
        tomo = dataclasses.replace(tomo, defocus_u_angstrom=latest.defocus_u_angstrom,
                                   defocus_v_angstrom=latest.defocus_v_angstrom,
                                   defocus_angle_deg=latest.defocus_angle_deg)
    group = data.optics_group(name)
    even, odd = data.zernike(group)
    new_even, new_odd = list(even), list(odd)
    result = group_results(workspace).get(group) if workspace.options.do_aberrations else None
    if result is not None:
        if result.even_coefficients is not None:
            new_even = list(result.even_coefficients)
        if result.odd_coefficients is not None:
            new_odd = list(result.odd_coefficients)
    return tomo, (list(even), list(odd)), (new_even, new_odd)
