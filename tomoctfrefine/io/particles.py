"""RELION particle sets, v4 and v5 (``particle_set.cpp``).

* **v5**: ``data_general`` (``rlnTomoSubTomosAre2DStacks``), ``data_optics``, ``data_particles`` with
  centred coordinates ``rlnCenteredCoordinateX/Y/ZAngst`` (Å from the tomogram centre ``C = size/2.0``).
* **v4**: ``data_optics``, ``data_particles`` with ``rlnCoordinateX/Y/Z`` in tilt-series pixels, to
  which RELION 4 adds 1 (``v4:particle_set.cpp L246-259``); v5 reading the same columns does not.

The format is detected from the file (``data_general`` or centred coordinates or a ``# version 5xxxx``
line: v5; otherwise v4) and kept on writing. Unlike RELION 5, which drops ``rlnCoordinateX/Y/Z`` when
it writes, every column is written back untouched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd

from ..errors import InputError, Problem
from ..physics.geometry import euler_zyz_matrices, tomogram_centre_px
from .star import StarDocument, format_vector, parse_vector, read_star, write_star

PathLike = Union[str, os.PathLike]

GENERAL, OPTICS, PARTICLES = "general", "optics", "particles"
TOMO_NAME = "rlnTomoName"
PARTICLE_NAME = "rlnTomoParticleName"
OPTICS_GROUP = "rlnOpticsGroup"
OPTICS_GROUP_NAME = "rlnOpticsGroupName"
PIXEL_SIZE = "rlnTomoTiltSeriesPixelSize"
VOLTAGE, CS, Q0 = "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"
EVEN_ZERNIKE, ODD_ZERNIKE = "rlnEvenZernike", "rlnOddZernike"
HALF_SET = "rlnRandomSubset"
CENTRED = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")
COORDINATES = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
ORIGIN = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
SUBTOMO_ANGLES = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")


@dataclass(frozen=True, eq=False)
class ParticleSet:
    """A RELION particle set, as its tables.

    Attributes
    ----------
    general : dict or None
        ``data_general`` (v5).
    optics : pandas.DataFrame
        ``data_optics``, one row per optics group.
    particles : pandas.DataFrame
        ``data_particles``, one row per particle.
    format_version : int
        4 or 5 (decides the +1 of pixel coordinates and what is written).
    path : Path or None
    version : str or None
        The ``# version`` number.
    extra_blocks : dict
        Other blocks, carried through.
    """

    general: dict | None
    optics: pd.DataFrame
    particles: pd.DataFrame
    format_version: int
    path: Path | None = None
    version: str | None = None
    extra_blocks: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OpticsGroup:
    """One row of ``data_optics`` (None where the file does not say)."""

    number: int
    name: str
    pixel_size_angstrom: float | None
    voltage_kv: float | None
    spherical_aberration_mm: float | None
    amplitude_contrast: float | None
    even_zernike: tuple
    odd_zernike: tuple


def read_particle_set(path: PathLike) -> ParticleSet:
    """Read a RELION 4 or 5 particle set (``data_optics`` and ``data_particles`` required).

    Raises
    ------
    InputError
        If a required table is missing or the file is malformed.
    """
    path = Path(path)
    doc = read_star(path)
    problems = []
    for block in (OPTICS, PARTICLES):
        if block not in doc.blocks:
            problems.append(Problem(str(path), f"no data_{block} table", "give a RELION particles.star", f"data_{block}"))
    if problems:
        raise InputError(problems)

    def table(block):
        value = doc.blocks[block]
        return value if isinstance(value, pd.DataFrame) else pd.DataFrame([value])

    optics, particles = table(OPTICS), table(PARTICLES)
    general = doc.blocks.get(GENERAL)
    if isinstance(general, pd.DataFrame):
        general = {k: general[k].iloc[0] for k in general.columns} if len(general) else {}
    if general is not None or set(CENTRED) <= set(particles.columns) or (doc.version or "").startswith("5"):
        format_version = 5
    else:
        format_version = 4
    extra = {k: v for k, v in doc.blocks.items() if k not in (GENERAL, OPTICS, PARTICLES)}
    return ParticleSet(general, optics, particles, format_version, path, doc.version, extra)


def write_particle_set(pset: ParticleSet, path: PathLike) -> Path:
    """Write a particle set as it was read (v5: general if it had one, optics, particles; v4: optics,
    particles), every column and table kept, atomically."""
    blocks: dict = {}
    if pset.general is not None:
        blocks[GENERAL] = pset.general
    blocks[OPTICS] = pset.optics
    blocks[PARTICLES] = pset.particles
    blocks.update(pset.extra_blocks)
    return write_star(StarDocument(blocks, version=pset.version), path)


def missing_columns(pset: ParticleSet) -> list[Problem]:
    """Required columns absent from ``data_optics`` or ``data_particles`` (one problem each)."""
    where = str(pset.path)
    problems = []
    if PIXEL_SIZE not in pset.optics.columns:
        problems.append(Problem(where, f"data_optics lacks required column {PIXEL_SIZE}", "add the tilt-series pixel size of each optics group", PIXEL_SIZE))
    for column in (TOMO_NAME, HALF_SET):
        if column not in pset.particles.columns:
            problems.append(Problem(where, f"data_particles lacks required column {column}", "add it (RELION's particles.star has it)", column))
    if not (set(CENTRED) <= set(pset.particles.columns) or set(COORDINATES) <= set(pset.particles.columns)):
        problems.append(Problem(where, "data_particles has no coordinates (rlnCenteredCoordinateX/Y/ZAngst or rlnCoordinateX/Y/Z)", "add the particle positions", CENTRED[0]))
    return problems


def optics_groups(pset: ParticleSet) -> dict[int, OpticsGroup]:
    """Optics groups by number (``rlnOpticsGroup``, 1-based; row order + 1 if the column is absent)."""
    groups = {}
    table = pset.optics

    def get(row, column):
        return float(row[column]) if column in row.index else None

    for position, (_, row) in enumerate(table.iterrows()):
        number = int(row[OPTICS_GROUP]) if OPTICS_GROUP in row.index else position + 1
        groups[number] = OpticsGroup(
            number=number,
            name=str(row[OPTICS_GROUP_NAME]) if OPTICS_GROUP_NAME in row.index else f"opticsGroup{number}",
            pixel_size_angstrom=get(row, PIXEL_SIZE),
            voltage_kv=get(row, VOLTAGE),
            spherical_aberration_mm=get(row, CS),
            amplitude_contrast=get(row, Q0),
            even_zernike=tuple(parse_vector(row[EVEN_ZERNIKE])) if EVEN_ZERNIKE in row.index else (),
            odd_zernike=tuple(parse_vector(row[ODD_ZERNIKE])) if ODD_ZERNIKE in row.index else (),
        )
    return groups


def tomogram_names_of_particles(pset: ParticleSet) -> list[str]:
    """Distinct ``rlnTomoName`` values in order of first appearance."""
    return list(dict.fromkeys(str(n) for n in pset.particles[TOMO_NAME]))


def particles_of(pset: ParticleSet, tomogram_name: str) -> np.ndarray:
    """Row indices (positional, int) of the particles of one tomogram."""
    return np.flatnonzero(pset.particles[TOMO_NAME].astype(str).to_numpy() == str(tomogram_name))


def optics_group_numbers(pset: ParticleSet, rows) -> np.ndarray:
    """``rlnOpticsGroup`` of the given rows (1 when absent)."""
    rows = np.asarray(rows, dtype=int)
    if OPTICS_GROUP not in pset.particles.columns:
        return np.ones(len(rows), dtype=int)
    return pset.particles[OPTICS_GROUP].to_numpy()[rows].astype(int)


def _columns(table: pd.DataFrame, columns, rows, default: float = 0.0) -> np.ndarray:
    if all(c in table.columns for c in columns):
        return table[list(columns)].to_numpy(dtype=float)[rows]
    return np.full((len(rows), len(columns)), default)


def subtomogram_rotations(pset: ParticleSet, rows) -> np.ndarray:
    """``A_sub`` (n, 3, 3): RELION ZYZ matrices of ``rlnTomoSubtomogramRot/Tilt/Psi`` (identity if absent)."""
    rows = np.asarray(rows, dtype=int)
    if not set(SUBTOMO_ANGLES) <= set(pset.particles.columns):
        return np.repeat(np.eye(3)[None], len(rows), axis=0)
    angles = _columns(pset.particles, SUBTOMO_ANGLES, rows)
    return euler_zyz_matrices(angles[:, 0], angles[:, 1], angles[:, 2]) if len(rows) else np.zeros((0, 3, 3))


def particle_rotations(pset: ParticleSet, rows) -> np.ndarray:
    """``A = A_sub @ A_part`` (n, 3, 3), mapping reference coordinates to tomogram coordinates."""
    rows = np.asarray(rows, dtype=int)
    if len(rows) == 0:
        return np.zeros((0, 3, 3))
    angles = _columns(pset.particles, ANGLES, rows)
    return subtomogram_rotations(pset, rows) @ euler_zyz_matrices(angles[:, 0], angles[:, 1], angles[:, 2])


def _pixel_sizes(pset: ParticleSet, rows, tomogram) -> np.ndarray:
    groups = optics_groups(pset)
    numbers = optics_group_numbers(pset, rows)
    return np.array([
        groups[n].pixel_size_angstrom if n in groups and groups[n].pixel_size_angstrom else tomogram.pixel_size_angstrom
        for n in numbers
    ], dtype=float)


def particle_positions_px(pset: ParticleSet, rows, tomogram) -> np.ndarray:
    """Particle positions (n, 3) in tomogram pixels, RELION's convention.

    ``pos = c_px - A_sub o / p`` with ``c_px = centred_angstrom / p + size / 2.0`` (v5) or the pixel
    coordinates ``rlnCoordinate*`` (+1 for a v4 file); ``o`` = ``rlnOriginX/Y/ZAngst``; ``p`` = the
    optics group's ``rlnTomoTiltSeriesPixelSize``.
    """
    rows = np.asarray(rows, dtype=int)
    table = pset.particles
    pixel = _pixel_sizes(pset, rows, tomogram)[:, None]
    if set(CENTRED) <= set(table.columns):
        centre = tomogram_centre_px(tomogram.size_px)
        coordinates = table[list(CENTRED)].to_numpy(dtype=float)[rows] / pixel + centre[None, :]
    else:
        coordinates = table[list(COORDINATES)].to_numpy(dtype=float)[rows]
        if pset.format_version == 4:
            coordinates = coordinates + 1.0
    origin = _columns(table, ORIGIN, rows) / pixel
    return coordinates - np.einsum("nij,nj->ni", subtomogram_rotations(pset, rows), origin)


def half_sets(pset: ParticleSet, rows) -> np.ndarray:
    """``rlnRandomSubset`` of the rows, (n,) int in {1, 2}."""
    return pset.particles[HALF_SET].to_numpy()[np.asarray(rows, dtype=int)].astype(int)


def particle_names(pset: ParticleSet, rows) -> list[str]:
    """``rlnTomoParticleName`` of the rows, or RELION's automatic ``<tomo>/<n>`` (n counted from 1
    within the tomogram, in file order) when the column is absent."""
    rows = np.asarray(rows, dtype=int)
    table = pset.particles
    if PARTICLE_NAME in table.columns:
        return [str(v) for v in table[PARTICLE_NAME].to_numpy()[rows]]
    names = table[TOMO_NAME].astype(str).to_numpy()
    counters: dict = {}
    generated = []
    for name in names:
        counters[name] = counters.get(name, 0) + 1
        generated.append(f"{name}/{counters[name]}")
    return [generated[r] for r in rows]


def _group_row(pset: ParticleSet, group: int) -> int:
    if OPTICS_GROUP in pset.optics.columns:
        matches = np.flatnonzero(pset.optics[OPTICS_GROUP].to_numpy().astype(int) == int(group))
        if len(matches) == 0:
            raise KeyError(f"no optics group {group}")
        return int(matches[0])
    return int(group) - 1


def optics_zernike(pset: ParticleSet, group: int) -> tuple[list[float], list[float]]:
    """Current even and odd Zernike coefficients (rad, RELION's index order) of an optics group."""
    row = pset.optics.iloc[_group_row(pset, group)]
    even = parse_vector(row[EVEN_ZERNIKE]) if EVEN_ZERNIKE in row.index else []
    odd = parse_vector(row[ODD_ZERNIKE]) if ODD_ZERNIKE in row.index else []
    return even, odd


def with_zernike(pset: ParticleSet, group: int, even=None, odd=None) -> ParticleSet:
    """A new set whose optics group ``group`` has the given even/odd Zernike coefficients, written as
    ``[a,b,c]`` (None leaves a list unchanged; the columns are added if needed)."""
    optics = pset.optics.copy()
    index = _group_row(pset, group)
    for column, values in ((EVEN_ZERNIKE, even), (ODD_ZERNIKE, odd)):
        if values is None:
            continue
        if column not in optics.columns:
            optics[column] = pd.Series(["[]"] * len(optics), index=optics.index, dtype=object)
        else:
            optics[column] = optics[column].astype(object)
        optics.iat[index, optics.columns.get_loc(column)] = format_vector(values)
    return replace(pset, optics=optics)
