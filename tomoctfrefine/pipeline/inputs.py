"""The inputs of a run as the steps see them: read once per process, with the hand the defocus step adopted."""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import InputError, Problem
from ..io import particles as particles_io
from ..io import tomograms as tomograms_io
from ..statistics import TiltStatistics
from .artefacts import DefocusResult
from .workspace import Workspace, finished


class RunInputs:
    """The tomogram and particle sets of a :class:`~.workspace.Workspace`, and per-tomogram views of them."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.tomogram_set = tomograms_io.read_tomogram_set(workspace.inputs["tomograms_path"])
        self.particle_set = particles_io.read_particle_set(workspace.inputs["particles_path"])
        self.names = tomograms_io.tomogram_names(self.tomogram_set)
        self._tomograms: dict = {}
        self._adopted: dict = {}

    def tomogram(self, name: str, adopted_hand: bool = True):
        """The tomogram as written in the input, with the hand the defocus step adopted (unless
        ``adopted_hand=False``: the input's, which the statistics' own arrays use)."""
        if name not in self._tomograms:
            self._tomograms[name] = tomograms_io.tomogram(self.tomogram_set, name)
        tomo = self._tomograms[name]
        if adopted_hand and self.hand_adopted(name):
            tomo = dataclasses.replace(tomo, hand=-tomo.hand)
        return tomo

    def hand_adopted(self, name: str) -> bool:
        """Did the defocus step adopt the opposite hand for this tomogram (``RefineOptions.adopt_hand``)?"""
        if name not in self._adopted:
            path = self.workspace.artefact("refine_defocus", name)
            if not finished(path):
                return False  # not decided yet
            result = DefocusResult.load(path)
            self._adopted[name] = bool(result is not None and result.hand is not None and result.hand.adopted)
        return self._adopted[name]

    def rows(self, name: str) -> np.ndarray:
        return particles_io.particles_of(self.particle_set, name)

    def particle_count(self, name: str) -> int:
        return len(self.rows(name))

    def optics_group(self, name: str) -> int:
        groups = np.unique(particles_io.optics_group_numbers(self.particle_set, self.rows(name)))
        if len(groups) > 1:
            raise InputError(Problem(self.workspace.inputs["particles_path"],
                                     f"the particles of tomogram {name} belong to several optics groups {groups.tolist()}",
                                     "give each tomogram's particles one optics group", "rlnOpticsGroup"))
        return int(groups[0]) if len(groups) else 1

    def zernike(self, group: int) -> tuple[list, list]:
        return particles_io.optics_zernike(self.particle_set, group)

    def with_statistics(self) -> list[str]:
        return [n for n in self.names if finished(self.workspace.artefact("prepare", n))]

    def statistics(self, name: str, with_flipped_hand: bool = False, adopted_hand: bool = True) -> TiltStatistics:
        """The tomogram's statistics under the adopted hand (see :meth:`tomogram`); ``flipped_hand`` (when asked
        for) is then the other one."""
        path = self.workspace.artefact("prepare", name)
        if not (adopted_hand and self.hand_adopted(name)):
            return TiltStatistics.load(path, with_flipped_hand)
        both = TiltStatistics.load(path, with_flipped_hand=True)
        own = dataclasses.replace(both, flipped_hand=None)
        return dataclasses.replace(both.flipped_hand, flipped_hand=own if with_flipped_hand else None)

    def frame_range(self, n_tilts: int) -> np.ndarray:
        """Tilts selected by ``--min_frame``/``--max_frame`` (table order; max <= 0 means all)."""
        options = self.workspace.options
        first = max(0, options.min_frame)
        last = options.max_frame if options.max_frame > 0 else n_tilts - 1
        selected = np.zeros(n_tilts, dtype=bool)
        selected[first:min(last, n_tilts - 1) + 1] = True
        return selected

    def trajectory_shifts(self, name: str, trajectories: dict | None) -> np.ndarray | None:
        """Per-particle, per-tilt shifts (Å) of the tomogram's particles, or None without trajectories."""
        if trajectories is None:
            return None
        names = particles_io.particle_names(self.particle_set, self.rows(name))
        return np.stack([trajectories[n] for n in names])
