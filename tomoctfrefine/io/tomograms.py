"""RELION tomogram sets, v4 and v5 (``tomogram_set.cpp``, ``tomogram.cpp``).

* **v5**: ``tomograms.star`` holds ``data_global`` (one row per tomogram); each row's
  ``rlnTomoTiltSeriesStarFile`` names a STAR file whose table ``data_<rlnTomoName>`` has one row per
  tilt (angles ``rlnTomoXTilt/YTilt/ZRot``, shifts ``rlnTomoX/YShiftAngst``, CTF, pre-exposure). Tilt
  images come from a stack ``rlnTomoTiltSeriesName`` ("option A", slices in table order) or one 2D MRC
  per tilt ``rlnMicrographName`` ("option B").
* **v4**: one file: ``data_global`` then one table ``data_<rlnTomoName>`` per tomogram with the rows of
  the projection matrices ``rlnTomoProjX/Y/Z/W`` written as ``[a,b,c,d]``.

A set read as v4 is written as v4, v5 as v5; every column and table the module does not know is
carried through untouched (unlike RELION 5, which drops ``rlnTomoProjX..W`` when writing v5). Relative paths are resolved as :mod:`.paths` documents (working directory
first, RELION's rule; then the folder of the STAR file naming them and its parents).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd

from ..errors import InputError, Problem
from ..physics.ctf import Optics
from ..physics.geometry import projection_matrix
from .maps import memmap_stack, read_map_header
from .paths import resolve_path
from .star import StarDocument, format_vector, parse_vector, read_star, write_star

PathLike = Union[str, os.PathLike]

GLOBAL_BLOCK = "global"
NAME = "rlnTomoName"
TILT_SERIES_STAR = "rlnTomoTiltSeriesStarFile"
STACK = "rlnTomoTiltSeriesName"
FRAME_COUNT = "rlnTomoFrameCount"
MICROGRAPH = "rlnMicrographName"
SIZE = ("rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ")
HAND = "rlnTomoHand"
PIXEL_SIZE = "rlnTomoTiltSeriesPixelSize"
VOLTAGE = "rlnVoltage"
CS = "rlnSphericalAberration"
Q0 = "rlnAmplitudeContrast"
FRACTIONAL_DOSE = "rlnTomoImportFractionalDose"
DOSE_BFACTOR = "rlnCtfBfactorPerElectronDose"
DEFOCUS_SLOPE = "rlnTomoDefocusSlope"
PROJECTION = ("rlnTomoProjX", "rlnTomoProjY", "rlnTomoProjZ", "rlnTomoProjW")
ANGLES = ("rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot")
SHIFTS = ("rlnTomoXShiftAngst", "rlnTomoYShiftAngst")
DEFOCUS_U, DEFOCUS_V, DEFOCUS_ANGLE = "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"
SCALE = "rlnCtfScalefactor"
BFACTOR = "rlnCtfBfactor"
PHASE_SHIFT = "rlnPhaseShift"
PRE_EXPOSURE = "rlnMicrographPreExposure"

REQUIRED_GLOBAL = (NAME, *SIZE, HAND, PIXEL_SIZE, VOLTAGE, CS, Q0)
REQUIRED_TILT = (DEFOCUS_U, DEFOCUS_V, DEFOCUS_ANGLE, PRE_EXPOSURE)
#: Meaningful names accepted by :func:`with_global_values` -> RELION columns (Beer-Lambert outputs).
GLOBAL_VALUE_COLUMNS = {
    "relative_luminance": "rlnTomoRelativeLuminance",
    "relative_ice_thickness": "rlnTomoRelativeIceThickness",
    "ice_normal_x": "rlnTomoIceNormalX",
    "ice_normal_y": "rlnTomoIceNormalY",
    "ice_normal_z": "rlnTomoIceNormalZ",
}


@dataclass(frozen=True, eq=False)
class TomogramSet:
    """A RELION tomogram set, as its tables.

    Attributes
    ----------
    global_table : pandas.DataFrame
        ``data_global``, one row per tomogram, columns in file order.
    tilt_tables : dict
        Tomogram name -> per-tilt table (rows in stack order).
    format_version : int
        4 (one file, projection matrices) or 5 (per-tilt-series files).
    path : Path or None
        The ``tomograms.star`` read.
    version : str or None
        The ``# version`` line's number.
    tilt_paths : dict
        v5: tomogram name -> the per-tilt-series STAR file found on disk.
    extra_blocks : dict
        Other blocks of ``tomograms.star`` (carried through).
    """

    global_table: pd.DataFrame
    tilt_tables: dict
    format_version: int
    path: Path | None = None
    version: str | None = None
    tilt_paths: dict = field(default_factory=dict)
    extra_blocks: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Tomogram:
    """One tilt series, ready for the physics (units in names; arrays have one entry per tilt).

    ``projection_matrices[f]`` maps a tomogram position (px) to image x, y (px) and depth (px).
    ``stack_path`` is set for option A (and v4), ``micrograph_paths`` for option B.
    """

    name: str
    optics: Optics
    pixel_size_angstrom: float
    size_px: tuple
    image_size_px: tuple
    hand: float
    defocus_slope: float
    fractional_dose_e_per_angstrom2: float
    bfactor_per_electron_dose_angstrom2: float
    projection_matrices: np.ndarray
    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    defocus_angle_deg: np.ndarray
    ctf_scale: np.ndarray
    ctf_bfactor_angstrom2: np.ndarray
    phase_shift_deg: np.ndarray
    pre_exposure_e_per_angstrom2: np.ndarray
    stack_path: Path | None = None
    micrograph_paths: tuple | None = None

    @property
    def tilt_count(self) -> int:
        return len(self.defocus_u_angstrom)


def _problem(path, message, fix="", key="") -> Problem:
    return Problem(str(path), message, fix, key)


def _as_table(block) -> pd.DataFrame:
    return block if isinstance(block, pd.DataFrame) else pd.DataFrame([block])


def read_tomogram_set(path: PathLike) -> TomogramSet:
    """Read a RELION 4 or 5 tomogram set (the version is detected from the file).

    A ``data_global`` with ``rlnTomoTiltSeriesStarFile`` is v5 (per-tilt tables in the files it names);
    otherwise the per-tilt tables are read from the same file (v4).

    Raises
    ------
    InputError
        With every structural problem at once: missing/malformed files, missing ``data_global`` or
        ``rlnTomoName``, missing per-tilt tables.
    """
    path = Path(path)
    doc = read_star(path)
    if GLOBAL_BLOCK not in doc.blocks:
        raise InputError([_problem(path, "no data_global table", "give a RELION tomograms.star", "data_global")])
    global_table = _as_table(doc.blocks[GLOBAL_BLOCK])
    if NAME not in global_table.columns:
        raise InputError([_problem(path, f"data_global lacks column {NAME}", "give a RELION tomograms.star", NAME)])
    names = [str(n) for n in global_table[NAME]]
    problems: list[Problem] = []
    tilt_tables: dict = {}
    tilt_paths: dict = {}
    if TILT_SERIES_STAR in global_table.columns:
        format_version = 5
        extra = {k: v for k, v in doc.blocks.items() if k != GLOBAL_BLOCK}
        for name, written in zip(names, global_table[TILT_SERIES_STAR]):
            found = resolve_path(str(written), [path.parent])
            if not found.exists():
                problems.append(_problem(path, f"tilt-series file of {name} not found: {written}", "correct the path (relative paths are read from the working directory)", TILT_SERIES_STAR))
                continue
            try:
                tilt_doc = read_star(found)
            except InputError as error:
                problems.extend(Problem(p.file, p.message, p.fix, p.key or TILT_SERIES_STAR) for p in error.problems)
                continue
            tilt_paths[name] = found
            if name in tilt_doc.blocks:
                tilt_tables[name] = _as_table(tilt_doc.blocks[name])
            elif len(tilt_doc.blocks) == 1:
                tilt_tables[name] = _as_table(next(iter(tilt_doc.blocks.values())))
            else:
                problems.append(_problem(found, f"no table data_{name}", f"name the per-tilt table data_{name}", f"data_{name}"))
    else:
        format_version = 4
        extra = {k: v for k, v in doc.blocks.items() if k != GLOBAL_BLOCK and k not in names}
        for name in names:
            if name in doc.blocks:
                tilt_tables[name] = _as_table(doc.blocks[name])
            else:
                problems.append(_problem(path, f"no table data_{name} (and no {TILT_SERIES_STAR} column)", f"add the per-tilt table data_{name} or a {TILT_SERIES_STAR} column", f"data_{name}"))
    if problems:
        raise InputError(problems)
    return TomogramSet(global_table, tilt_tables, format_version, path, doc.version, tilt_paths, extra)


def tomogram_names(tset: TomogramSet) -> list[str]:
    """Tomogram names in table order."""
    return [str(n) for n in tset.global_table[NAME]]


def _row(tset: TomogramSet, name: str) -> pd.Series:
    rows = tset.global_table[tset.global_table[NAME].astype(str) == str(name)]
    if len(rows) == 0:
        raise KeyError(f"no tomogram named {name!r}")
    return rows.iloc[0]


def image_paths(tset: TomogramSet, name: str) -> tuple[Path | None, tuple | None]:
    """``(stack_path, micrograph_paths)`` of a tomogram, resolved on disk where possible
    (option A: stack, option B: one file per tilt in table order)."""
    row = _row(tset, name)
    bases = [tset.path.parent if tset.path else None]
    if STACK in row.index and str(row[STACK]) not in ("", "nan"):
        return resolve_path(str(row[STACK]).split(":")[0], bases), None
    table = tset.tilt_tables[name]
    if MICROGRAPH in table.columns:
        tilt_base = [tset.tilt_paths[name].parent] if name in tset.tilt_paths else []
        return None, tuple(resolve_path(str(m), tilt_base + bases) for m in table[MICROGRAPH])
    return None, None


def declared_frame_count(tset: TomogramSet, name: str) -> int | None:
    """``rlnTomoFrameCount`` of a tomogram, None if the column is absent."""
    row = _row(tset, name)
    return int(row[FRAME_COUNT]) if FRAME_COUNT in row.index and np.isfinite(float(row[FRAME_COUNT])) else None


def missing_columns(tset: TomogramSet) -> list[Problem]:
    """Every required column absent from the global or per-tilt tables (one problem each)."""
    problems = []
    for column in REQUIRED_GLOBAL:
        if column not in tset.global_table.columns:
            problems.append(_problem(tset.path, f"data_global lacks required column {column}", "add it (RELION's tomograms.star has it)", column))
    has_stack = STACK in tset.global_table.columns
    for name, table in tset.tilt_tables.items():
        where = tset.tilt_paths.get(name, tset.path)
        for column in REQUIRED_TILT:
            if column not in table.columns:
                problems.append(_problem(where, f"data_{name} lacks required column {column}", "add it", column))
        if not set(PROJECTION) <= set(table.columns):
            for column in ANGLES[1:] + SHIFTS:
                if column not in table.columns:
                    problems.append(_problem(where, f"data_{name} lacks required column {column} (or rlnTomoProjX..W)", "add the tilt-series alignment", column))
        if not has_stack and MICROGRAPH not in table.columns:
            problems.append(_problem(where, f"data_{name} names no images: neither {STACK} in data_global nor {MICROGRAPH} per tilt", "add the tilt stack or the per-tilt micrographs", STACK))
    return problems


def _column(table: pd.DataFrame, column: str, default: float) -> np.ndarray:
    if column in table.columns:
        return table[column].to_numpy(dtype=float)
    return np.full(len(table), float(default))


def _value(row: pd.Series, column: str, default: float) -> float:
    return float(row[column]) if column in row.index else float(default)


def image_size_px(tset: TomogramSet, name: str) -> tuple[int, int]:
    """``(W, H)`` of the tilt images, from the MRC header of the stack or first micrograph."""
    stack, micrographs = image_paths(tset, name)
    target = stack if stack is not None else (micrographs[0] if micrographs else None)
    if target is None:
        raise InputError([_problem(tset.path, f"tomogram {name} names no tilt images", "add rlnTomoTiltSeriesName or rlnMicrographName", STACK)])
    header = read_map_header(target)
    return header.shape[2], header.shape[1]


def projection_matrices(tset: TomogramSet, name: str, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The ``(n_tilts, 4, 4)`` projection matrices of a tomogram: RELION 5's matrices from angles, shifts
    and sizes when the table has them, else ``rlnTomoProjX..W`` verbatim (v4), as RELION 5 reads them."""
    table = tset.tilt_tables[name]
    if not set(ANGLES[1:] + SHIFTS) <= set(table.columns) and set(PROJECTION) <= set(table.columns):
        return np.stack([np.array([parse_vector(table[c].iloc[f]) for c in PROJECTION]) for f in range(len(table))]) if len(table) else np.zeros((0, 4, 4))
    row = _row(tset, name)
    size = tuple(int(row[c]) for c in SIZE)
    pixel = float(row[PIXEL_SIZE])
    image_size = image_size if image_size is not None else image_size_px(tset, name)
    x_tilt = _column(table, ANGLES[0], 0.0)
    return np.stack(
        [
            projection_matrix(x_tilt[f], float(table[ANGLES[1]].iloc[f]), float(table[ANGLES[2]].iloc[f]),
                              float(table[SHIFTS[0]].iloc[f]), float(table[SHIFTS[1]].iloc[f]), pixel, size, image_size)
            for f in range(len(table))
        ]
    ) if len(table) else np.zeros((0, 4, 4))


def tomogram(tset: TomogramSet, name: str, image_size: tuple[int, int] | None = None) -> Tomogram:
    """The physics-ready :class:`Tomogram` of one tilt series (reads only MRC headers).

    ``image_size`` ``(W, H)`` skips reading the image header (the validator uses it when the images
    are missing; v5 projection matrices depend on it).
    """
    row = _row(tset, name)
    table = tset.tilt_tables[name]
    stack, micrographs = image_paths(tset, name)
    image_size = tuple(image_size) if image_size is not None else image_size_px(tset, name)
    return Tomogram(
        name=str(name),
        optics=Optics(float(row[VOLTAGE]), float(row[CS]), float(row[Q0])),
        pixel_size_angstrom=float(row[PIXEL_SIZE]),
        size_px=tuple(int(row[c]) for c in SIZE),
        image_size_px=image_size,
        hand=_value(row, HAND, 1.0),
        defocus_slope=_value(row, DEFOCUS_SLOPE, 1.0),
        fractional_dose_e_per_angstrom2=_value(row, FRACTIONAL_DOSE, 0.0),
        bfactor_per_electron_dose_angstrom2=_value(row, DOSE_BFACTOR, 0.0),
        projection_matrices=projection_matrices(tset, name, image_size),
        defocus_u_angstrom=table[DEFOCUS_U].to_numpy(dtype=float),
        defocus_v_angstrom=table[DEFOCUS_V].to_numpy(dtype=float),
        defocus_angle_deg=table[DEFOCUS_ANGLE].to_numpy(dtype=float),
        ctf_scale=_column(table, SCALE, 1.0),
        ctf_bfactor_angstrom2=_column(table, BFACTOR, 0.0),
        phase_shift_deg=_column(table, PHASE_SHIFT, 0.0),
        pre_exposure_e_per_angstrom2=table[PRE_EXPOSURE].to_numpy(dtype=float),
        stack_path=stack,
        micrograph_paths=micrographs,
    )


def load_tilt_images(tomo: Tomogram) -> np.ndarray:
    """The tilt images ``(n_tilts, H, W)`` float32, in table order: the memory-mapped stack itself when
    it is float32 (option A), else a float32 copy; option B stacks the per-tilt files."""
    if tomo.stack_path is not None:
        stack = memmap_stack(tomo.stack_path)
        return stack if stack.dtype == np.dtype(np.float32) else np.asarray(stack, dtype=np.float32)
    if tomo.micrograph_paths:
        return np.stack([np.asarray(memmap_stack(p), dtype=np.float32).reshape(tomo.image_size_px[1], tomo.image_size_px[0]) for p in tomo.micrograph_paths])
    raise InputError([Problem(tomo.name, "no tilt images", "add rlnTomoTiltSeriesName or rlnMicrographName", STACK)])


def _copy(tset: TomogramSet, **changes) -> TomogramSet:
    return replace(tset, **changes)


def with_tilt_ctf(tset: TomogramSet, name: str, defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, ctf_scale=None) -> TomogramSet:
    """A new set in which tomogram ``name`` has new per-tilt defoci (and scales, if given)."""
    tables = dict(tset.tilt_tables)
    table = tables[name].copy()
    table[DEFOCUS_U] = np.asarray(defocus_u_angstrom, dtype=float)
    table[DEFOCUS_V] = np.asarray(defocus_v_angstrom, dtype=float)
    table[DEFOCUS_ANGLE] = np.asarray(defocus_angle_deg, dtype=float)
    if ctf_scale is not None:
        table[SCALE] = np.asarray(ctf_scale, dtype=float)
    tables[name] = table
    return _copy(tset, tilt_tables=tables)


def with_global_values(tset: TomogramSet, name: str, **columns) -> TomogramSet:
    """A new set with values set in tomogram ``name``'s ``data_global`` row.

    Keys are meaningful names (``relative_luminance``, ``relative_ice_thickness``, ``ice_normal_x/y/z``)
    or RELION column names (``rln...``). New columns are appended (NaN for the other tomograms).
    """
    table = tset.global_table.copy()
    mask = table[NAME].astype(str) == str(name)
    for key, value in columns.items():
        column = GLOBAL_VALUE_COLUMNS.get(key, key)
        if not column.startswith("rln"):
            raise KeyError(f"unknown global value {key!r}")
        if column not in table.columns:
            table[column] = np.nan
        table.loc[mask, column] = value
    return _copy(tset, global_table=table)


def with_hand(tset: TomogramSet, name: str, hand: float) -> TomogramSet:
    """A new set with tomogram ``name``'s defocus hand (``rlnTomoHand``) set; a missing column is added
    with RELION's default (+1) for the other tomograms."""
    if HAND not in tset.global_table.columns:
        table = tset.global_table.copy()
        table[HAND] = 1.0
        tset = _copy(tset, global_table=table)
    return with_global_values(tset, name, **{HAND: float(hand)})


_JOB_PREFIX = re.compile(r"^[^/]+/job\d+/")


def _tilt_series_relative_path(written: str, name: str) -> Path:
    """Where the per-tilt-series file of tomogram ``name`` goes, relative to the output folder.

    An input path in RELION's project layout, ``X/jobNNN/<rest>``, gives ``<rest>`` (RELION 5 strips
    the leading job folder, so ``AlignTiltSeries/job005/tilt_series/TS_01.star`` is written as
    ``tilt_series/TS_01.star``). Any other path (a Scipion run's ``Runs/000123_Prot.../extra/...``, a
    dataset outside a RELION project, an absolute path) gives ``tilt_series/<name>.star``: RELION
    would keep such a path whole and nest the outputs under the input's folders.
    """
    match = _JOB_PREFIX.match(str(written))
    if match is not None:
        rest = Path(str(written)[match.end():])
        if rest.parts and not rest.is_absolute() and ".." not in rest.parts:
            return rest
    return Path("tilt_series") / f"{name}.star"


def tilt_series_output_paths(tset: TomogramSet, out_dir: PathLike) -> dict[str, Path]:
    """Where :func:`write_tomogram_set` writes each tomogram's tilt-series STAR file (v5; empty for v4)."""
    if tset.format_version != 5:
        return {}
    return {name: Path(out_dir) / _tilt_series_relative_path(str(original), name)
            for name, original in zip(tomogram_names(tset), tset.global_table[TILT_SERIES_STAR])}


def _cwd_path(path: Path) -> str:
    """A path that works from the current working directory (relative when below it)."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def _portable_image_paths(tset: TomogramSet, table: pd.DataFrame, bases: list) -> pd.DataFrame:
    """Image paths that do not resolve from the working directory but were found elsewhere are
    rewritten so that the written file works from the working directory (RELION's rule); paths that
    already work are kept as written."""
    if STACK in table.columns:
        table = table.copy()
        table[STACK] = [
            str(v) if Path(str(v).split(":")[0]).exists() or not resolve_path(str(v).split(":")[0], bases).exists()
            else _cwd_path(resolve_path(str(v).split(":")[0], bases))
            for v in table[STACK]
        ]
    return table


def write_tomogram_set(tset: TomogramSet, out_dir: PathLike, file_name: str = "tomograms.star") -> Path:
    """Write a tomogram set into ``out_dir`` in its own format, atomically.

    v5: ``<out_dir>/<rel>`` per tilt series (``<rel>``: the input ``rlnTomoTiltSeriesStarFile``
    without its leading ``X/jobNNN/`` when it has one, as RELION does, else ``tilt_series/<name>.star``;
    see :func:`_tilt_series_relative_path`) and ``<out_dir>/tomograms.star`` whose
    ``rlnTomoTiltSeriesStarFile`` points at them (as ``out_dir``/``rel``). v4: one file.

    Returns
    -------
    Path
        The written ``tomograms.star``.
    """
    out_dir = Path(out_dir)
    bases = [tset.path.parent] if tset.path else []
    global_table = _portable_image_paths(tset, tset.global_table, bases)
    version = tset.version
    if tset.format_version == 5:
        written = []
        for name, original in zip(tomogram_names(tset), global_table[TILT_SERIES_STAR]):
            relative = _tilt_series_relative_path(str(original), name)
            table = tset.tilt_tables[name]
            if MICROGRAPH in table.columns:
                tilt_bases = ([tset.tilt_paths[name].parent] if name in tset.tilt_paths else []) + bases
                table = table.copy()
                table[MICROGRAPH] = [
                    str(m) if Path(str(m)).exists() or not resolve_path(str(m), tilt_bases).exists()
                    else _cwd_path(resolve_path(str(m), tilt_bases))
                    for m in table[MICROGRAPH]
                ]
            write_star(StarDocument({name: table}, version=version), out_dir / relative)
            written.append(str(out_dir / relative))
        global_table = global_table.copy()
        global_table[TILT_SERIES_STAR] = written
        blocks = {GLOBAL_BLOCK: global_table, **tset.extra_blocks}
    else:
        blocks = {GLOBAL_BLOCK: global_table, **tset.tilt_tables, **tset.extra_blocks}
    return write_star(StarDocument(blocks, version=version), out_dir / file_name)


def to_v4(tset: TomogramSet) -> TomogramSet:
    """Convert a v5 set (option A) to RELION 4's single-file form.

    Each tilt table gets ``rlnTomoProjX..W`` computed from its angles, shifts, the tomogram size and
    the stack size, and loses the angle and shift columns; ``data_global`` loses
    ``rlnTomoTiltSeriesStarFile`` and gains ``rlnTomoFrameCount`` if absent. Version becomes 30001.
    """
    problems = []
    tables = {}
    for name in tomogram_names(tset):
        stack, _ = image_paths(tset, name)
        if stack is None:
            problems.append(_problem(tset.path, f"tomogram {name} has per-tilt micrographs (option B), which RELION 4 cannot read", "make a tilt stack first", STACK))
            continue
        matrices = projection_matrices(tset, name)
        table = tset.tilt_tables[name].drop(columns=[c for c in ANGLES + SHIFTS if c in tset.tilt_tables[name].columns])
        rows = {column: [format_vector(matrices[f, i]) for f in range(len(matrices))] for i, column in enumerate(PROJECTION)}
        table = pd.concat([pd.DataFrame(rows, index=table.index), table.drop(columns=[c for c in PROJECTION if c in table.columns])], axis=1)
        tables[name] = table
    if problems:
        raise InputError(problems)
    global_table = tset.global_table.drop(columns=[TILT_SERIES_STAR], errors="ignore").copy()
    if FRAME_COUNT not in global_table.columns:
        global_table[FRAME_COUNT] = [len(tables[n]) for n in tomogram_names(tset)]
    return TomogramSet(global_table, tables, 4, tset.path, "30001", {}, dict(tset.extra_blocks))
