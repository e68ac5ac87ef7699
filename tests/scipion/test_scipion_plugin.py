"""The plugin is found by Scipion after ``pip install``: Plugin, protocols, wizards, viewer, GUI tree.

Scipion swallows import errors of a plugin's submodules (the plugin then silently lacks them), so
each submodule is also imported directly here, where an error fails the test.
"""
import importlib
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
