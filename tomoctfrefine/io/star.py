"""RELION STAR files: read with ``starfile``, keep what it drops, write in RELION's layout.

``starfile`` parses the data blocks; this module adds what RELION needs and ``starfile`` loses:
the ``# version NNNNN`` line, a check that every loop row has as many fields as there are labels
(``starfile``/pandas silently pad short rows with NaN), and a writer that produces RELION's layout
(version line before every block, ``loop_``, ``_rlnX #n`` labels, right-aligned columns, a line with a
single space after every block) with floats that round-trip (six decimals when exact, else 12
significant digits). Writes are atomic.
"""
from __future__ import annotations

import os
import re
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd
import starfile

from .atomic import write_atomically
from ..errors import InputError, Problem

PathLike = Union[str, os.PathLike]
Block = Union[pd.DataFrame, dict]

#: Columns that are names, never numbers (a tomogram called ``1`` stays the string ``"1"``).
STRING_COLUMNS = [
    "rlnTomoName",
    "rlnTomoParticleName",
    "rlnTomoTiltSeriesName",
    "rlnTomoTiltSeriesStarFile",
    "rlnMicrographName",
    "rlnMicrographMovieName",
    "rlnOpticsGroupName",
    "rlnImageName",
    "rlnCtfImage",
    "rlnTomoImportCtfFindFile",
    "rlnTomoImportImodDir",
    "rlnTomoFiducialsStarFile",
    "rlnTomoParticlesFile",
    "rlnTomoTomogramsFile",
    "rlnTomoTrajectoriesFile",
    "rlnTomoManifoldsFile",
    "rlnTomoReferenceMap1File",
    "rlnTomoReferenceMap2File",
    "rlnTomoReferenceMaskFile",
    "rlnTomoReferenceFscFile",
    "rlnEvenZernike",
    "rlnOddZernike",
]

DEFAULT_VERSION = "50001"
_VERSION_LINE = re.compile(r"^#\s*version\s+(\S+)")


@dataclass
class StarDocument:
    """The data blocks of one STAR file, in file order.

    Attributes
    ----------
    blocks : dict
        Block name (without ``data_``; ``""`` for an unnamed block) -> ``pandas.DataFrame`` for a
        ``loop_`` block or ``dict`` for a key/value block. Column order is the file's.
    version : str or None
        The number of RELION's ``# version`` line (``"50001"``, ``"30001"``), None if absent.
    path : Path or None
        Where the document was read from.
    """

    blocks: dict = field(default_factory=dict)
    version: str | None = None
    path: Path | None = None


def _malformed(path: PathLike, detail: str) -> InputError:
    return InputError(
        [Problem(str(path), f"malformed STAR file: {detail}", "check the file was written completely by RELION or tomoctfrefine")]
    )


def _scan_structure(text: str) -> tuple[str | None, list[tuple[str, int, int, list[str]]]]:
    """Version and, for each loop block, (name, number of labels, first line, data lines)."""
    version = None
    loops = []
    lines = text.splitlines()
    i = 0
    block = None
    while i < len(lines):
        stripped = lines[i].strip()
        match = _VERSION_LINE.match(stripped)
        if match and version is None:
            version = match.group(1)
        if stripped.startswith("data_"):
            block = stripped[5:]
        elif stripped.startswith("loop_"):
            i += 1
            labels = 0
            while i < len(lines) and lines[i].strip().startswith("_"):
                labels += 1
                i += 1
            first = i + 1
            rows = []
            while i < len(lines) and not lines[i].strip().startswith("data_"):
                row = lines[i].strip()
                if row and not row.startswith("#"):
                    rows.append(row)
                i += 1
            loops.append((block, labels, first, rows))
            continue
        i += 1
    return version, loops


def _field_count(row: str) -> int:
    if '"' in row or "'" in row:
        return len(shlex.split(row))
    return len(row.split())


def _read_with_empty_loops(text: str) -> dict:
    """``starfile`` mistakes the comment lines after an empty loop for its rows: parse a copy without
    comment lines."""
    cleaned = "\n".join(line for line in text.splitlines() if not line.strip().startswith("#")) + "\n"
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "copy.star"
        copy.write_text(cleaned)
        return starfile.read(copy, always_dict=True, parse_as_string=STRING_COLUMNS)


def read_star(path: PathLike) -> StarDocument:
    """Read a STAR file into a :class:`StarDocument`.

    Parameters
    ----------
    path : path-like
        The STAR file.

    Returns
    -------
    StarDocument
        Blocks in file order; loop blocks as DataFrames, key/value blocks as dicts.

    Raises
    ------
    InputError
        If the file is missing, unreadable, has no data block or a loop row of the wrong length.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError([Problem(str(path), "file not found", "check the path")]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError([Problem(str(path), f"cannot read the file ({error})", "check the file and its permissions")]) from None
    version, loops = _scan_structure(text)
    for block, labels, first, rows in loops:
        for offset, row in enumerate(rows):
            try:
                count = _field_count(row)
            except ValueError:
                count = -1
            if count != labels:
                raise _malformed(path, f"block data_{block}: a row has {count} values for {labels} columns ({row[:60]!r})")
    try:
        if any(not rows for _, _, _, rows in loops):
            blocks = _read_with_empty_loops(text)
        else:
            blocks = starfile.read(path, always_dict=True, parse_as_string=STRING_COLUMNS)
    except Exception as error:  # starfile/pandas raise many types on bad input
        raise _malformed(path, str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    if not blocks:
        raise _malformed(path, "no data_ block")
    for name, block in blocks.items():
        if block is None:
            raise _malformed(path, f"block data_{name} is empty")
    return StarDocument(blocks=dict(blocks), version=version, path=path)


def format_value(value) -> str:
    """Format one value as RELION-readable text that reads back to the same value.

    Floats use six decimals (RELION's ``%12.6f``) when that is exact, else 12 significant digits
    (with a decimal point, so the column stays a float column on reading); integers as integers;
    strings as they are, quoted if they contain white space or are empty.
    """
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not np.isfinite(value):
            return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")
        text = f"{value:.6f}"
        if float(text) == value:
            return text
        text = f"{value:.12g}"
        if "." not in text and "e" not in text and "n" not in text:
            text += ".0"
        return text
    text = str(value)
    if text == "" or any(c.isspace() for c in text):
        return '"' + text.replace('"', "'") + '"'
    return text


def _format_column(series: pd.Series) -> list[str]:
    return [format_value(v) for v in series.tolist()] if not pd.api.types.is_float_dtype(series.dtype) else [
        format_value(float(v)) for v in series.to_numpy(dtype=float)
    ]


def _block_text(name: str, block: Block, version: str) -> str:
    out = [f"\n# version {version}\n\ndata_{name}\n\n"]
    if isinstance(block, dict):
        width = max((len(k) for k in block), default=0) + 1
        for key, value in block.items():
            out.append(f"_{key:<{width}} {format_value(value)}\n")
    else:
        out.append("loop_ \n")
        for index, column in enumerate(block.columns, start=1):
            out.append(f"_{column} #{index} \n")
        if len(block) > 0:
            columns = []
            for column in block.columns:
                texts = _format_column(block[column])
                width = max(12, max(len(t) for t in texts))
                columns.append([t.rjust(width) for t in texts])
            for row in zip(*columns):
                out.append(" ".join(row) + " \n")
    out.append(" \n")
    return "".join(out)


def star_text(doc: StarDocument) -> str:
    """The text :func:`write_star` writes for ``doc``."""
    version = doc.version or DEFAULT_VERSION
    return "".join(_block_text(name, block, version) for name, block in doc.blocks.items())


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def write_star(doc: StarDocument, path: PathLike) -> Path:
    """Write ``doc`` to ``path`` atomically in RELION's layout.

    Parameters
    ----------
    doc : StarDocument
        Blocks in the order to write; ``doc.version`` (default ``50001``) is written before each block.
    path : path-like
        Destination; parent folders are created.

    Returns
    -------
    Path
        ``path``.
    """
    return write_text_atomic(path, star_text(doc))


def parse_vector(text) -> list[float]:
    """Parse RELION's vector syntax ``[a,b,c]`` (also accepts ``a,b,c`` and an empty ``[]``)."""
    if isinstance(text, (list, tuple, np.ndarray)):
        return [float(v) for v in text]
    body = str(text).strip().strip('"').strip("[]").strip()
    return [float(v) for v in body.split(",")] if body else []


def format_vector(values) -> str:
    """RELION's vector syntax ``[a,b,c]``, no spaces, each number in its shortest exact form."""
    return "[" + ",".join(repr(float(v)) for v in values) + "]"


def non_finite_columns(table: pd.DataFrame) -> list[tuple[str, int]]:
    """Columns holding NaN or infinite numbers, with how many rows do (vector columns ``[a,b]`` are
    parsed; other text columns are ignored)."""
    found = []
    for column in table.columns:
        series = table[column]
        if pd.api.types.is_numeric_dtype(series.dtype):
            count = int((~np.isfinite(series.to_numpy(dtype=float))).sum())
        else:
            count = 0
            for value in series.tolist():
                if isinstance(value, (float, np.floating)) and not np.isfinite(value):
                    count += 1
                elif isinstance(value, str) and value.startswith("["):
                    try:
                        if not np.all(np.isfinite(parse_vector(value))):
                            count += 1
                    except ValueError:
                        pass
        if count:
            found.append((str(column), count))
    return found
