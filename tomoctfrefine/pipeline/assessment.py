"""Step 6 (``--assess``): reconstruct the particle with the input and with the refined CTF and report the FSC gain."""
from __future__ import annotations

from ..assess import assess, summary_lines
from ..io.maps import read_map_header
from ..io.optimisation_set import read_optimisation_set
from ..report import extend_report
from .workspace import Workspace, log


def assess_refinement(out_dir) -> dict:
    """Reconstruct the particle with the input and with the refined CTF, and report the FSC gain
    (``assess.json``, ``plots/fsc_before_after.png``, a section in summary.json and logfile.pdf)."""
    workspace = Workspace.load(out_dir)
    workspace.lock()
    before = workspace.optimisation_set()
    after = read_optimisation_set(workspace.out_dir / "optimisation_set.star")
    crop = read_map_header(workspace.inputs["ref1_path"]).shape[0]
    result = assess(before, after, workspace.out_dir / "assess", box_size_px=workspace.options.box_size_px,
                    crop_size_px=crop, log=lambda message: log(workspace, f"assess: {message}"))
    for line in summary_lines(result):
        log(workspace, f"assess: {line}")
    extend_report(workspace.out_dir, assessment=result)
    return result
