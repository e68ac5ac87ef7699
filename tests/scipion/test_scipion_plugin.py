"""The plugin is found by Scipion after ``pip install``: Plugin, protocols, wizards, viewer, GUI tree.

Scipion swallows import errors of a plugin's submodules (the plugin then silently lacks them), so
each submodule is also imported directly here, where an error fails the test.
"""
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

import pwem
import tomoctfrefine
from pyworkflow.viewer import DESKTOP_TKINTER


def test_submodules_import_directly():
    for name in ("tomoctfrefine.plugin", "tomoctfrefine.protocols", "tomoctfrefine.wizards", "tomoctfrefine.viewers"):
        importlib.import_module(name)


def test_entry_point_registers_plugin():
    plugins = pwem.Domain.getPlugins()
    assert "tomoctfrefine" in plugins
    module = plugins["tomoctfrefine"]
    from tomoctfrefine.plugin import Plugin

    assert isinstance(module._pluginInstance, Plugin)
    assert isinstance(module._pluginInstance, pwem.Plugin)
    assert Plugin.validateInstallation() == []
    assert module._pluginInstance.getName() == "tomoctfrefine"
    assert module._pluginInstance.getPath() == str(Path(tomoctfrefine.__file__).parent)


def test_protocols_discovered_with_label_and_package():
    protocols = pwem.Domain.getProtocols()
    from tomoctfrefine.protocols import ProtTomoCtfRefine, ProtTomoImportRelionMetadata

    assert protocols["ProtTomoCtfRefine"] is ProtTomoCtfRefine
    assert protocols["ProtTomoImportRelionMetadata"] is ProtTomoImportRelionMetadata
    assert ProtTomoCtfRefine._label == "tomo CTF refinement"
    assert ProtTomoCtfRefine._package.__name__ == "tomoctfrefine"


def test_wizards_and_viewer_found():
    from pyworkflow.project import Manager
    from tomoctfrefine.protocols import ProtTomoCtfRefine
    from tomoctfrefine.viewers import TomoCtfRefineViewer
    from tomoctfrefine.wizards import TomoCtfRefineBoxSizeWizard, TomoCtfRefineDefocusRangeWizard

    project = Manager().createProject("discovery")
    protocol = project.newProtocol(ProtTomoCtfRefine)
    wizards = pwem.Domain.findWizards(protocol, DESKTOP_TKINTER)
    assert wizards["boxSize"] is TomoCtfRefineBoxSizeWizard
    assert wizards["defocusRange"] is TomoCtfRefineDefocusRangeWizard
    viewers = pwem.Domain.findViewers(protocol, DESKTOP_TKINTER)
    assert TomoCtfRefineViewer in viewers


def _path_to(node, value, path=()):
    """Section texts from ``node`` down to the tree node whose value is ``value`` (None if absent)."""
    if node.value == value:
        return path
    for child in node.childs:
        found = _path_to(child, value, path + (node.text,))
        if found is not None:
            return found
    return None


def test_gui_tree_places_protocols(tmp_path):
    from pyworkflow.gui.project.viewprotocols_extra import ProtocolTreeConfig

    tree = ProtocolTreeConfig.load(pwem.Domain, str(tmp_path / "no_base_protocols.conf"))
    assert "Subtomogram averaging" in _path_to(tree["Tomography"], "ProtTomoCtfRefine")
    assert "Imports" in _path_to(tree["Tomography"], "ProtTomoImportRelionMetadata")


# ------------------------------------------------------------------------------- wizards' helpers
def test_particle_diameter_from_fixture_mask_matches_simulated_radius(relion5_small):
    from tomoctfrefine.io.maps import read_map
    from tomoctfrefine.wizards.estimation import particle_diameter_angstrom

    truth = json.loads((relion5_small / "truth" / "truth.json").read_text())
    mask, pixel = read_map(relion5_small / "ref" / "mask.mrc")
    # The simulated mask is 1 inside radius r and falls to 0 over a 6 px soft edge: the 0.5 level
    # (the diameter used) lies between 2 r and 2 (r + 6) pixels; on the central line it is at 57 px.
    radius_px = truth["mask_radius_px"]
    diameter = particle_diameter_angstrom(mask, pixel)
    assert 2 * radius_px * pixel < diameter <= 2 * (radius_px + 6) * pixel
    assert diameter == 57 * pixel


def test_estimation_box_holds_particle_and_delocalisation():
    from tomoctfrefine.wizards.estimation import estimation_box_px, fft_friendly_size

    # 300 kV (0.019688 Å), 34000 Å defocus, Nyquist 4 Å: delocalisation 167.3 Å per side;
    # (102 + 2 x 167.3) / 2 = 218.3 -> 219 px -> next even 2,3,5-smooth size 240.
    assert estimation_box_px(102.0, 64, 2.0, 34000.0, 300.0) == 240
    assert fft_friendly_size(219) == 240 and fft_friendly_size(240) == 240 and fft_friendly_size(241) == 250
    # Never smaller than the reference box, never larger than the tilt images.
    assert estimation_box_px(10.0, 300, 2.0, 1000.0, 300.0) == 300
    assert estimation_box_px(102.0, 64, 2.0, 34000.0, 300.0, image_size_px=200) == 200
    # A 10 Å resolution limit shrinks the delocalisation term: (102 + 2 x 66.9) / 2 = 117.9 -> 120.
    assert estimation_box_px(102.0, 64, 2.0, 34000.0, 300.0, resolution_angstrom=10.0) == 120


def test_defocus_range_is_three_robust_sigmas_rounded_up():
    from tomoctfrefine.wizards.estimation import defocus_scan_range_angstrom

    series = np.array([30000.0, 30100.0, 29900.0, 30200.0, 29800.0])  # MAD 100 Å -> sigma 148.3 Å
    assert defocus_scan_range_angstrom({"a": series}) == 500.0       # 3 sigma = 444.8 -> 500
    assert defocus_scan_range_angstrom({"a": 30000 + 10 * (series - 30000)}) == 4500.0  # 4447.8 -> 4500
    assert defocus_scan_range_angstrom({"a": series, "b": series + 5000}) == 500.0     # per-series medians
    assert defocus_scan_range_angstrom({}) == 500.0


# ------------------------------------------------------------------------------------------ viewer
def test_viewer_lists_whichever_plots_exist_in_display_order(tmp_path):
    from tomoctfrefine.viewers import report_plots

    (tmp_path / "plots").mkdir()
    for name in ["plots/hand_check.png", "plots/scale_TS_01.png", "plots/defocus_TS_02.png", "plots/defocus_TS_01.png",
                 "group_1_even_phase.png", "plots/zz_extra.png", "plots/defocus_TS_03.part.png", "plots/notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in report_plots(tmp_path)] == [
        "plots/defocus_TS_01.png", "plots/defocus_TS_02.png", "plots/scale_TS_01.png", "group_1_even_phase.png",
        "plots/hand_check.png", "plots/zz_extra.png"]
    assert report_plots(tmp_path / "missing") == []
