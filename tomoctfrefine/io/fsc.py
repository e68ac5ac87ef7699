"""Fourier shell correlation tables (RELION ``postprocess.star``, table ``data_fsc``)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd

from ..errors import InputError, Problem
from .star import StarDocument, read_star, write_star

PathLike = Union[str, os.PathLike]

FSC_BLOCK = "fsc"
INDEX_COLUMN = "rlnSpectralIndex"
FSC_COLUMN = "rlnFourierShellCorrelationCorrected"
RESOLUTION_COLUMN = "rlnAngstromResolution"
FREQUENCY_COLUMN = "rlnResolution"


@dataclass(frozen=True)
class FscCurve:
    """A gold-standard FSC curve.

    Attributes
    ----------
    spectral_index : numpy.ndarray
        Shell index (int; 0 is the origin). RELION maps it to the refinement box by index.
    resolution_angstrom : numpy.ndarray
        Shell resolution (Å; ``inf`` at index 0, NaN where the file does not say).
    fsc : numpy.ndarray
        The (mask-corrected) FSC of each shell.
    """

    spectral_index: np.ndarray
    resolution_angstrom: np.ndarray
    fsc: np.ndarray


def read_fsc(path: PathLike) -> FscCurve:
    """Read ``data_fsc`` (``rlnSpectralIndex``, ``rlnFourierShellCorrelationCorrected``) of a STAR file.

    Rows are sorted by spectral index. Raises :class:`InputError` naming the missing block or column.
    """
    doc = read_star(path)
    table = doc.blocks.get(FSC_BLOCK)
    if not isinstance(table, pd.DataFrame):
        raise InputError([Problem(str(path), "no data_fsc table", "give RELION's postprocess.star (it holds data_fsc)", "data_fsc")])
    missing = [c for c in (INDEX_COLUMN, FSC_COLUMN) if c not in table.columns]
    if missing:
        raise InputError([Problem(str(path), f"data_fsc lacks column {c}", "give RELION's postprocess.star", c) for c in missing])
    if len(table) == 0:
        raise InputError([Problem(str(path), "data_fsc has no rows", "give RELION's postprocess.star of the reference", "data_fsc")])
    for column in (INDEX_COLUMN, FSC_COLUMN, RESOLUTION_COLUMN):
        if column in table.columns:
            values = pd.to_numeric(table[column], errors="coerce")
            if values.isna().any() and not table[column].isna().equals(values.isna()):
                row = int(np.flatnonzero(values.isna() & ~table[column].isna())[0])
                raise InputError([Problem(str(path), f"data_fsc has a non-numeric value in {column} (row {row + 1}: {str(table[column].iloc[row])!r})",
                                          "give RELION's postprocess.star of the reference", column)])
            table = table.assign(**{column: values})
    table = table.sort_values(INDEX_COLUMN, kind="stable")
    index = table[INDEX_COLUMN].to_numpy(dtype=float)
    if not np.all(np.isfinite(index)):
        raise InputError([Problem(str(path), f"data_fsc has NaN or infinite values in {INDEX_COLUMN}", "give RELION's postprocess.star of the reference", INDEX_COLUMN)])
    index = index.astype(int)
    if RESOLUTION_COLUMN in table.columns:
        resolution = table[RESOLUTION_COLUMN].to_numpy(dtype=float)
    else:
        resolution = np.full(len(index), np.nan)
    resolution = np.where(index == 0, np.inf, resolution)
    return FscCurve(index, resolution, table[FSC_COLUMN].to_numpy(dtype=float))


def write_fsc(path: PathLike, curve: FscCurve) -> Path:
    """Write ``curve`` as ``data_fsc`` (index, 1/Å, Å, corrected FSC), atomically."""
    resolution = np.asarray(curve.resolution_angstrom, dtype=float)
    with np.errstate(divide="ignore"):
        frequency = np.where(np.isfinite(resolution) & (resolution > 0), 1.0 / resolution, 0.0)
    table = pd.DataFrame(
        {
            INDEX_COLUMN: np.asarray(curve.spectral_index, dtype=int),
            FREQUENCY_COLUMN: frequency,
            RESOLUTION_COLUMN: np.where(np.isfinite(resolution), resolution, 999.0),
            FSC_COLUMN: np.asarray(curve.fsc, dtype=float),
        }
    )
    return write_star(StarDocument({FSC_BLOCK: table}), path)


#: Meaningful names of the curves of a RELION postprocess ``data_fsc`` table -> RELION columns.
POSTPROCESS_CURVES = {
    "corrected": FSC_COLUMN,
    "unmasked": "rlnFourierShellCorrelationUnmaskedMaps",
    "masked": "rlnFourierShellCorrelationMaskedMaps",
    "phase_randomised_masked": "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps",
}
#: Meaningful names of ``data_general`` entries -> RELION labels.
POSTPROCESS_GENERAL = {
    "final_resolution_angstrom": "rlnFinalResolution",
    "randomise_from_angstrom": "rlnRandomiseFrom",
    "half_map_1": "rlnUnfilteredMapHalf1",
    "half_map_2": "rlnUnfilteredMapHalf2",
    "mask": "rlnMaskName",
}


def write_postprocess_fsc(path: PathLike, spectral_index, resolution_angstrom, curves: dict, general: dict | None = None) -> Path:
    """Write a RELION postprocess-style STAR file (``data_general`` + ``data_fsc``), atomically.

    ``curves`` maps names of :data:`POSTPROCESS_CURVES` to arrays (``corrected`` is required: it is what
    ``--fsc`` reads); ``general`` maps names of :data:`POSTPROCESS_GENERAL` to values.
    """
    resolution = np.asarray(resolution_angstrom, dtype=float)
    with np.errstate(divide="ignore"):
        frequency = np.where(np.isfinite(resolution) & (resolution > 0), 1.0 / resolution, 0.0)
    table = {
        INDEX_COLUMN: np.asarray(spectral_index, dtype=int),
        FREQUENCY_COLUMN: frequency,
        RESOLUTION_COLUMN: np.where(np.isfinite(resolution), resolution, 999.0),
    }
    for name, column in POSTPROCESS_CURVES.items():
        if name in curves:
            table[column] = np.asarray(curves[name], dtype=float)
    blocks = {}
    if general:
        blocks["general"] = {POSTPROCESS_GENERAL[k]: v for k, v in general.items()}
    blocks[FSC_BLOCK] = pd.DataFrame(table)
    return write_star(StarDocument(blocks), path)
