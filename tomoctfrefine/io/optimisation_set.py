"""RELION's optimisation set: the list of files a refinement works on (``optimisation_set.cpp``).

Paths are kept as written (strings); :func:`resolved` finds them on disk (see :mod:`.paths`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

import pandas as pd

from ..errors import InputError, Problem
from .paths import resolve_path
from .star import StarDocument, read_star, write_star

PathLike = Union[str, os.PathLike]

#: Field of :class:`OptimisationSet` -> RELION key.
KEYS = {
    "particles_path": "rlnTomoParticlesFile",
    "tomograms_path": "rlnTomoTomogramsFile",
    "trajectories_path": "rlnTomoTrajectoriesFile",
    "ref1_path": "rlnTomoReferenceMap1File",
    "ref2_path": "rlnTomoReferenceMap2File",
    "mask_path": "rlnTomoReferenceMaskFile",
    "fsc_path": "rlnTomoReferenceFscFile",
}


@dataclass(frozen=True)
class OptimisationSet:
    """The inputs of a refinement.

    Attributes
    ----------
    particles_path, tomograms_path, trajectories_path, ref1_path, ref2_path, mask_path, fsc_path : str or None
        Paths as written in the file or given as overrides (None when absent).
    extra : dict
        Other keys of the file (e.g. ``rlnTomoManifoldsFile``), written back untouched.
    source_path : Path or None
        The optimisation-set file, if one was read.
    overridden : frozenset of str
        Fields that came from arguments rather than the file.
    version : str or None
        The file's ``# version``.
    """

    particles_path: str | None = None
    tomograms_path: str | None = None
    trajectories_path: str | None = None
    ref1_path: str | None = None
    ref2_path: str | None = None
    mask_path: str | None = None
    fsc_path: str | None = None
    extra: dict = field(default_factory=dict)
    source_path: Path | None = None
    overridden: frozenset = frozenset()
    version: str | None = None

    def resolved(self, field_name: str) -> Path | None:
        """The file a field names, found on disk: as written (relative to the working directory),
        else relative to the optimisation set's folder (see :func:`.paths.resolve_path`)."""
        value = getattr(self, field_name)
        if value is None:
            return None
        base = None if self.source_path is None else Path(self.source_path).parent
        return resolve_path(value, [base])


def read_optimisation_set(
    path: PathLike | None = None,
    *,
    particles: PathLike | None = None,
    tomograms: PathLike | None = None,
    trajectories: PathLike | None = None,
    ref1: PathLike | None = None,
    ref2: PathLike | None = None,
    mask: PathLike | None = None,
    fsc: PathLike | None = None,
) -> OptimisationSet:
    """Read an optimisation set; the keyword arguments (RELION's ``--p --t --mot --ref1 --ref2 --mask
    --fsc``) override its entries, and are enough on their own when ``path`` is None.

    Raises
    ------
    InputError
        If the file is missing or malformed (missing entries are reported by the validator).
    """
    values: dict = {name: None for name in KEYS}
    extra: dict = {}
    version = None
    source = None
    if path is not None:
        source = Path(path)
        doc = read_star(source)
        version = doc.version
        block = next(iter(doc.blocks.values()))
        if isinstance(block, pd.DataFrame):
            if len(block) != 1:
                raise InputError([Problem(str(source), "an optimisation set is a list of key/value pairs, not a table", "write one '_rlnKey value' line per file")])
            block = {k: block[k].iloc[0] for k in block.columns}
        by_key = {key: name for name, key in KEYS.items()}
        for key, value in block.items():
            if key in by_key:
                values[by_key[key]] = str(value)
            else:
                extra[key] = value
    overrides = dict(particles_path=particles, tomograms_path=tomograms, trajectories_path=trajectories,
                     ref1_path=ref1, ref2_path=ref2, mask_path=mask, fsc_path=fsc)
    overridden = set()
    for name, value in overrides.items():
        if value is not None and str(value) != "":
            values[name] = str(value)
            overridden.add(name)
    return OptimisationSet(**values, extra=extra, source_path=source, overridden=frozenset(overridden), version=version)


def write_optimisation_set(opt: OptimisationSet, path: PathLike) -> Path:
    """Write ``opt`` as a RELION key/value optimisation set (only the entries that are set), atomically."""
    block = {key: getattr(opt, name) for name, key in KEYS.items() if getattr(opt, name) is not None}
    block.update(opt.extra)
    return write_star(StarDocument({"": block}, version=opt.version), path)


def with_paths(opt: OptimisationSet, **paths) -> OptimisationSet:
    """A copy with some paths replaced (``particles_path=...``; None removes an entry)."""
    return replace(opt, **paths)
