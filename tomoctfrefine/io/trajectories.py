"""Particle trajectories (``--mot``, RELION ``motion.star``; ``motion/trajectory.cpp``).

``data_general`` holds ``rlnParticleNumber``; then one table per particle, named by its
``rlnTomoParticleName``, with one row per tilt: ``rlnOriginX/Y/ZAngst``, the 3D shift (Å) added to the
particle's position in that tilt.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd

from ..errors import InputError, Problem
from .star import StarDocument, read_star, write_star

PathLike = Union[str, os.PathLike]

SHIFT_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")


def read_trajectories(path: PathLike) -> dict[str, np.ndarray]:
    """Read trajectories: particle name -> ``(n_tilts, 3)`` shifts (Å, x y z), in file order."""
    doc = read_star(path)
    result: dict[str, np.ndarray] = {}
    problems = []
    for name, block in doc.blocks.items():
        if name == "general":
            continue
        if not isinstance(block, pd.DataFrame):
            block = pd.DataFrame([block])
        missing = [c for c in SHIFT_COLUMNS if c not in block.columns]
        if missing:
            problems.append(Problem(str(path), f"trajectory table data_{name} lacks {', '.join(missing)}", "give a RELION motion.star", missing[0]))
            continue
        result[str(name)] = block[list(SHIFT_COLUMNS)].to_numpy(dtype=float)
    if problems:
        raise InputError(problems)
    return result


def write_trajectories(path: PathLike, trajectories: dict[str, np.ndarray]) -> Path:
    """Write trajectories in RELION's layout (``data_general`` then one table per particle), atomically."""
    blocks: dict = {"general": {"rlnParticleNumber": len(trajectories)}}
    for name, shifts in trajectories.items():
        shifts = np.asarray(shifts, dtype=float).reshape(-1, 3)
        blocks[str(name)] = pd.DataFrame({c: shifts[:, i] for i, c in enumerate(SHIFT_COLUMNS)})
    return write_star(StarDocument(blocks), path)
