"""Resolving the relative paths written inside STAR files.

RELION resolves every path in a STAR file against its *working directory* (the project directory),
whatever the folder of the STAR file. Users also run tools from elsewhere, so tomoctfrefine tries, in
order: the path as written (absolute, or relative to the current working directory: RELION's rule);
then relative to each folder in ``base_dirs`` (normally the folder of the STAR file that names the
path, then the folder of the optimisation set); then relative to up to ``MAX_PARENT_LEVELS`` parents of
the first base folder (so ``CtfRefine/job012/tomograms.star`` naming ``tilt_series/TS_01.star``
finds the project directory two levels up). The first existing candidate wins; if none exists the path
is returned as written, so error messages quote what the file says.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Union

PathLike = Union[str, os.PathLike]

MAX_PARENT_LEVELS = 3


def resolve_path(name: PathLike, base_dirs: Iterable[PathLike | None] = ()) -> Path:
    """Find the file a STAR entry names (see the module docstring for the search order).

    Parameters
    ----------
    name : path-like
        The path as written in the STAR file or given on the command line.
    base_dirs : iterable of path-like
        Folders to try after the current working directory, in order.

    Returns
    -------
    Path
        The first candidate that exists, else ``Path(name)`` unchanged.
    """
    path = Path(str(name))
    if path.is_absolute() or path.exists():
        return path
    bases = [Path(b) for b in base_dirs if b is not None]
    candidates = list(bases)
    if bases:
        parent = bases[0]
        for _ in range(MAX_PARENT_LEVELS):
            parent = parent.parent
            candidates.append(parent)
    for base in candidates:
        candidate = base / path
        if candidate.exists():
            return candidate
    return path
