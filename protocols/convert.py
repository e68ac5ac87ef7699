"""Scipion tomo objects <-> RELION-5 files (the optimisation set the engine reads, and back).

This is the bridge between Scipion's object model and RELION's files, so, like the engine's ``io``
package, it is a place where RELION's column names appear; the engine itself never sees Scipion.

Conventions:

* Defocus in Å, positive underfocus, angle in degrees: identical in ``CTFTomo`` and RELION.
* Tilt images are matched to CTFs and to RELION rows by acquisition order; disabled (excluded) views
  are skipped. The mapping row -> acquisition order written at conversion time is kept in
  ``tilt_order.json`` next to the converted files so that refined values go back to the right
  ``CTFTomo`` (when it is missing, e.g. an optimisation set made outside Scipion, rows are matched
  by nominal tilt angle).
* Tilt-image alignment: a Scipion 3x3 matrix ``M`` has ``rlnTomoZRot = atan2(M[0,1], M[0,0])`` and
  ``(rlnTomoXShiftAngst, rlnTomoYShiftAngst) = inv(M)[0:2, 2] * pixel size`` (scipion-em-reliontomo's
  writer); :func:`alignment_matrix` is its exact inverse. ``rlnTomoYTilt`` is the tilt image's tilt
  angle. RELION's ``rlnTomoXTilt``, which Scipion cannot express, and the nominal stage tilt are kept
  as the extra tilt-image attributes ``_tomoXTilt`` and ``_tomoNominalTilt`` when present.
* Particle orientation: Scipion's ``TR_RELION`` matrix ``M`` is ``inv(T)`` with
  ``T = [A | -origin/pixel]``, ``A = euler_zyz(rot, tilt, psi)`` RELION's rotation (reliontomo's
  ``genTransformMatrix``). :func:`relion_angles_and_origin` inverts it exactly (reliontomo's own
  reverse function mixes the rotation into the shifts; we do not copy that).
  Tilt-image matrices are IMOD's ``.xf`` rows as scipion-em-imod reads them (``[[A11, A12, DX],
  [A21, A22, DY], [0, 0, 1]]``, shifts in tilt-series pixels; scipion-em-aretomo builds the same form
  from an ``.aln``: ``A = R(-ROT)``, ``D = -A (TX, TY)``), so ``rlnTomoZRot`` is AreTomo's ROT and the
  RELION shifts are its (TX, TY) in Å.
* Positions: RELION 5 centred Å = (bin-1 px from the tomogram corner - size/2) * pixel size, with the
  corner position ``coordinate.getX(BOTTOM_LEFT_CORNER) * coordinates_px / tilt_series_px`` (tomograms
  and coordinates at any binning). A subtomogram's coordinate is in pixels of its coordinate set, its
  transform's shifts in pixels of the subtomogram set (scipion-em-tomo's ``SubTomogram``).
* Optics groups: a particle's ``_rlnOpticsGroup`` (scipion-em-relion's attribute; scipion-em-reliontomo's
  ``_opticsGroupId``), else one group per distinct tilt-series optics; the group names and Zernike
  coefficients come from the set's optics table, kept as STAR text in ``opticsGroupInfo`` (the
  acquisition's, as scipion-em-relion does; a coordinate set's ``_opticsGroupInfo``). The output
  particles carry the refined table the same way, and their ``_rlnOpticsGroup``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tomoctfrefine.io.star import StarDocument, parse_vector, read_star, write_star
from tomoctfrefine.io.paths import resolve_path

TILT_ORDER_FILE = "tilt_order.json"
OPTICS_GROUPS_FILE = "optics_groups.json"
#: Extra attributes we add to Scipion objects (names start with ``_`` as Scipion's do).
ATTR_XTILT = "_tomoXTilt"
ATTR_NOMINAL_TILT = "_tomoNominalTilt"
ATTR_CTF_SCALE = "_ctfScale"
ATTR_DEFOCUS_SIGMA = "_defocusUncertainty"
ATTR_HALF_SET = "_rlnRandomSubset"
#: A particle's optics group: scipion-em-relion's attribute, then scipion-em-reliontomo's.
ATTR_OPTICS_GROUP = "_rlnOpticsGroup"
OPTICS_GROUP_ATTRIBUTES = (ATTR_OPTICS_GROUP, "_opticsGroupId")
#: The optics table (STAR text) of a coordinate set, which has no acquisition to hold scipion-em-relion's
#: ``opticsGroupInfo``.
ATTR_OPTICS_INFO = "_opticsGroupInfo"


# ----------------------------------------------------------------------------------------- geometry
def alignment_zrot_and_shifts(matrix: np.ndarray, pixel_size_angstrom: float) -> tuple[float, float, float]:
    """(rlnTomoZRot in degrees, x shift Å, y shift Å) of a Scipion 3x3 tilt-image alignment matrix."""
    matrix = np.asarray(matrix, dtype=float)
    zrot_deg = math.degrees(math.atan2(matrix[0, 1], matrix[0, 0]))
    shifts = np.linalg.inv(matrix)[0:2, 2] * pixel_size_angstrom
    return zrot_deg, float(shifts[0]), float(shifts[1])


def alignment_matrix(zrot_deg: float, x_shift_angstrom: float, y_shift_angstrom: float,
                     pixel_size_angstrom: float) -> np.ndarray:
    """Scipion 3x3 tilt-image alignment matrix of RELION's ZRot and shifts (inverse of the above)."""
    c, s = math.cos(math.radians(zrot_deg)), math.sin(math.radians(zrot_deg))
    inverse = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]]).T
    inverse[0:2, 2] = np.array([x_shift_angstrom, y_shift_angstrom]) / pixel_size_angstrom
    return np.linalg.inv(inverse)


def relion_angles_and_origin(matrix_relion: np.ndarray, pixel_size_angstrom: float):
    """(rot, tilt, psi) in degrees and origin (x, y, z) in Å of a Scipion ``TR_RELION`` 4x4 matrix."""
    from pwem.convert.transformations import euler_from_matrix

    forward = np.linalg.inv(np.asarray(matrix_relion, dtype=float))
    angles_deg = -np.rad2deg(euler_from_matrix(forward, axes="szyz"))
    origin_angstrom = -forward[0:3, 3] * pixel_size_angstrom
    return angles_deg, origin_angstrom


def relion_matrix(angles_deg, origin_angstrom, pixel_size_angstrom: float) -> np.ndarray:
    """Scipion ``TR_RELION`` 4x4 matrix of RELION angles and origin (inverse of the above)."""
    from pwem.convert.transformations import euler_matrix

    forward = euler_matrix(*(-np.deg2rad(np.asarray(angles_deg, dtype=float))), axes="szyz")
    forward[0:3, 3] = -np.asarray(origin_angstrom, dtype=float) / pixel_size_angstrom
    return np.linalg.inv(forward)


def acquisition_order_by_dose(pre_exposure_e_per_angstrom2) -> list[int]:
    """1-based acquisition order of tilts from their pre-exposure (ties keep table order)."""
    order = np.argsort(np.asarray(pre_exposure_e_per_angstrom2, dtype=float), kind="stable")
    ranks = np.empty(len(order), dtype=int)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks.tolist()


# ------------------------------------------------------------------------ Scipion -> RELION files
@dataclass
class ConvertedInputs:
    """Where :func:`write_optimisation_set_from_scipion` wrote things, and what it skipped."""

    optimisation_set: Path
    tomograms: Path
    particles: Path
    tilt_order: dict = field(default_factory=dict)
    skipped_particles: int = 0
    optics_groups: dict = field(default_factory=dict)


def _relpath(path: str | os.PathLike) -> str:
    """Paths inside STAR files are relative to the project (RELION's rule; the CWD of every step)."""
    path = str(path)
    return os.path.relpath(path) if os.path.isabs(path) else path


def ctf_values_by_order(ctf_series) -> dict:
    """Acquisition order -> (U Å, V Å, angle deg, phase shift deg or None, scale or None) of the
    enabled CTFs of one ``CTFTomoSeries``."""
    values = {}
    for ctf in ctf_series.iterItems():
        if not ctf.isEnabled():
            continue
        scale = getattr(ctf, ATTR_CTF_SCALE, None)
        values[ctf.getAcquisitionOrder()] = (
            ctf.getDefocusU(), ctf.getDefocusV(), ctf.getDefocusAngle(),
            ctf.getPhaseShift() if ctf.hasPhaseShift() else None,
            None if scale is None else scale.get())
    return values


def tilt_series_table(ts, ctf_by_order: dict) -> tuple[pd.DataFrame, list[int], str | None, int | None]:
    """Per-tilt RELION table of one tilt series (enabled views that also have an enabled CTF;
    ``ctf_by_order`` from :func:`ctf_values_by_order`).

    Returns the table, the acquisition order of each row, and the stack file and its frame count when
    the rows are its frames 1..n in order (else None, None, and the rows name their frame in
    ``rlnMicrographName``).
    """
    pixel_size = ts.getSamplingRate()
    tilt_axis_deg = ts.getAcquisition().getTiltAxisAngle() or 0.0
    rows, orders, frames = [], [], []
    for ti in ts.iterItems(orderBy="_index"):
        if not ti.isEnabled() or ti.getAcquisitionOrder() not in ctf_by_order:
            continue
        defocus_u, defocus_v, angle, phase_shift, scale = ctf_by_order[ti.getAcquisitionOrder()]
        transform = ti.getTransform()
        matrix = transform.getMatrix() if transform is not None else np.eye(3)
        zrot_deg, x_shift, y_shift = alignment_zrot_and_shifts(matrix, pixel_size)
        xtilt = getattr(ti, ATTR_XTILT, None)
        nominal = getattr(ti, ATTR_NOMINAL_TILT, None)
        row = {
            "rlnTomoNominalStageTiltAngle": ti.getTiltAngle() if nominal is None or nominal.get() is None else nominal.get(),
            "rlnTomoNominalTiltAxisAngle": tilt_axis_deg,
            "rlnMicrographPreExposure": ti.getAcquisition().getDoseInitial(),
            "rlnDefocusU": defocus_u,
            "rlnDefocusV": defocus_v,
            "rlnDefocusAngle": angle,
            "rlnCtfScalefactor": 1.0 if scale is None or not np.isfinite(scale) else scale,
            "rlnTomoXTilt": 0.0 if xtilt is None or xtilt.get() is None else xtilt.get(),
            "rlnTomoYTilt": ti.getTiltAngle(),
            "rlnTomoZRot": zrot_deg,
            "rlnTomoXShiftAngst": x_shift,
            "rlnTomoYShiftAngst": y_shift,
        }
        if phase_shift is not None:
            row["rlnPhaseShift"] = phase_shift
        rows.append(row)
        orders.append(ti.getAcquisitionOrder())
        frames.append((ti.getIndex(), ti.getFileName()))
    files = {f for _, f in frames}
    in_order = len(files) == 1 and [i for i, _ in frames] == list(range(1, len(frames) + 1))
    stack = files.pop() if in_order else None
    table = pd.DataFrame(rows)
    if not in_order:
        table.insert(0, "rlnMicrographName", [f"{i}@{_relpath(f)}" for i, f in frames])
    return table, orders, stack, len(frames) if in_order else None


def tomogram_size_bin1_px(tomogram, tilt_series_pixel_angstrom: float) -> tuple[int, int, int]:
    """RELION's ``rlnTomoSizeX/Y/Z``: the tomogram's size in tilt-series (bin-1) pixels."""
    factor = tomogram.getSamplingRate() / tilt_series_pixel_angstrom
    return tuple(int(round(d * factor)) for d in tomogram.getDim())


@dataclass
class ParticleItem:
    """One Scipion particle, as the conversion needs it (plain values: Scipion's set iterators reuse
    one object, so nothing of it is kept).

    ``corner_px`` is the position from the tomogram's corner (scipion-em-tomo's ``BOTTOM_LEFT_CORNER``)
    in pixels of ``coordinate_px``, the coordinate set's sampling rate (a subtomogram's coordinate is not
    rescaled when it is extracted); ``shift_px`` is the pixel size of the transform's shifts (the
    subtomogram set's sampling rate for subtomograms, the coordinates' for coordinates).
    ``half_set`` and ``optics_group`` are None when the particle carries none.
    """

    ts_id: str
    corner_px: np.ndarray
    matrix_relion: np.ndarray
    coordinate_px: float
    shift_px: float
    half_set: int | None
    optics_group: int | None


def _attribute_int(objects, names) -> int | None:
    """The first of the attributes ``names`` found on any of ``objects``, as an int (None if absent)."""
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if value is not None and hasattr(value, "get") and value.get() is not None:
                return int(value.get())
    return None


def _corner_px(coord) -> np.ndarray:
    from tomo.constants import BOTTOM_LEFT_CORNER

    return np.array([coord.getX(BOTTOM_LEFT_CORNER), coord.getY(BOTTOM_LEFT_CORNER), coord.getZ(BOTTOM_LEFT_CORNER)],
                    dtype=float)


def _particle_items(particles):
    """A :class:`ParticleItem` per particle (coordinates or subtomograms)."""
    from tomo.constants import TR_RELION
    from tomo.objects import SetOfSubTomograms

    if isinstance(particles, SetOfSubTomograms):
        coords_px = particles.getCoordinates3D().getSamplingRate()
        # The transform's shifts are in pixels of the subtomograms (scipion-em-tomo's SubTomogram:
        # "the coordinate is not scaled"; scipion-em-reliontomo multiplies them by the set's rate).
        shift_px = particles.getSamplingRate()
        # iterSubtomos plugs each coordinate's tomogram back (positions need its size and origin)
        for subtomo in particles.iterSubtomos():
            coord = subtomo.getCoordinate3D()
            yield ParticleItem(str(coord.getTomoId()), _corner_px(coord),
                               np.array(subtomo.getTransform(convention=TR_RELION).getMatrix(), dtype=float), coords_px,
                               shift_px, _attribute_int((subtomo, coord), (ATTR_HALF_SET,)),
                               _attribute_int((subtomo, coord), OPTICS_GROUP_ATTRIBUTES))
    else:
        coords_px = particles.getSamplingRate()
        # The tomograms are listed first: iterating the coordinates of one tomogram inside an iteration
        # over the tomograms ends the outer one after the first tomogram (seen with scipion-em-tomo
        # 3.12.4: only the first tomogram's particles were converted).
        tomograms = [tomogram.clone() for tomogram in particles.getPrecedents().iterItems()]
        for tomogram in tomograms:
            for coord in particles.iterCoordinates(volume=tomogram):
                yield ParticleItem(str(coord.getTomoId()), _corner_px(coord),
                                   np.array(coord.getMatrix(convention=TR_RELION), dtype=float), coords_px, coords_px,
                                   _attribute_int((coord,), (ATTR_HALF_SET,)), _attribute_int((coord,), OPTICS_GROUP_ATTRIBUTES))


def tomograms_of(particles) -> dict:
    """tsId -> Tomogram (clone) of the tomograms the particles were picked in."""
    from tomo.objects import SetOfSubTomograms

    coords = particles.getCoordinates3D() if isinstance(particles, SetOfSubTomograms) else particles
    return {tomo.getTsId(): tomo.clone() for tomo in coords.getPrecedents().iterItems()}


def particles_table(items, tomogram_sizes: dict, tilt_series_pixel_angstrom: float, optics_groups: dict) -> tuple[pd.DataFrame, int]:
    """RELION-5 ``data_particles`` of :class:`ParticleItem`s, and the number skipped (particles of
    tomograms without tilt series or CTF, i.e. not in ``tomogram_sizes``). Half sets alternate when the
    particles carry none (``_rlnRandomSubset``); ``optics_groups`` maps tsId -> optics group."""
    rows, skipped, counters = [], 0, {}
    for item in items:
        ts_id = item.ts_id
        if ts_id not in tomogram_sizes:
            skipped += 1
            continue
        size = np.asarray(tomogram_sizes[ts_id], dtype=float)
        corner_px = item.corner_px * item.coordinate_px / tilt_series_pixel_angstrom
        centred_angstrom = (corner_px - size / 2.0) * tilt_series_pixel_angstrom
        angles, origin = relion_angles_and_origin(item.matrix_relion, item.shift_px)
        counters[ts_id] = counters.get(ts_id, 0) + 1
        number = counters[ts_id]
        half_value = item.half_set if item.half_set in (1, 2) else 2 - number % 2
        rows.append({
            "rlnTomoName": ts_id,
            "rlnTomoParticleName": f"{ts_id}/{number}",
            "rlnOpticsGroup": int(optics_groups[ts_id]),
            "rlnCenteredCoordinateXAngst": centred_angstrom[0],
            "rlnCenteredCoordinateYAngst": centred_angstrom[1],
            "rlnCenteredCoordinateZAngst": centred_angstrom[2],
            "rlnAngleRot": angles[0], "rlnAngleTilt": angles[1], "rlnAnglePsi": angles[2],
            "rlnOriginXAngst": origin[0], "rlnOriginYAngst": origin[1], "rlnOriginZAngst": origin[2],
            "rlnRandomSubset": half_value,
        })
    return pd.DataFrame(rows), skipped


# ---------------------------------------------------------------------------------- optics groups
def _acquisition_key(acquisition) -> tuple:
    """What makes two tilt series' optics differ for RELION (voltage kV, Cs mm, amplitude contrast)."""
    return (round(float(acquisition.getVoltage()), 6), round(float(acquisition.getSphericalAberration()), 6),
            round(float(acquisition.getAmplitudeContrast()), 6))


def assign_optics_groups(particle_groups: dict, acquisition_keys: dict) -> dict:
    """tsId -> RELION optics group of each tomogram (every tomogram's particles share one group).

    ``particle_groups`` maps tsId -> the set of optics groups its particles carry (``_rlnOpticsGroup``,
    None for a particle without one); ``acquisition_keys`` tsId -> :func:`_acquisition_key` of its tilt
    series, in the order the tomograms are written. When some particle carries a group, those groups
    are used (RELION's and scipion-em-relion's default 1 for the others); when none does, tilt series
    with the same optics share a group, numbered from 1 in tsId order (RELION refuses one group for
    two voltages).

    Raises
    ------
    ValueError
        When the particles of one tomogram carry several groups.
    """
    explicit = any(g is not None for groups in particle_groups.values() for g in groups)
    result = {}
    if explicit:
        for ts_id in acquisition_keys:
            groups = sorted({1 if g is None else int(g) for g in particle_groups.get(ts_id, {None})})
            if len(groups) > 1:
                raise ValueError(f"the particles of tomogram {ts_id} belong to several optics groups {groups} "
                                 f"(attribute _rlnOpticsGroup): give each tomogram's particles one optics group")
            result[ts_id] = groups[0]
        return result
    numbers: dict = {}
    for ts_id, key in acquisition_keys.items():
        result[ts_id] = numbers.setdefault(key, len(numbers) + 1)
    return result


def optics_group_info(particles) -> str | None:
    """The optics table (STAR text, scipion-em-relion's ``opticsGroupInfo``) a particle set carries:
    its acquisition's ``opticsGroupInfo`` (subtomograms) or its ``_opticsGroupInfo`` (coordinates)."""
    acquisition = particles.getAcquisition() if hasattr(particles, "getAcquisition") else None
    info = getattr(acquisition, "opticsGroupInfo", None) if acquisition is not None else None
    if info is None or not info.get():
        info = getattr(particles, ATTR_OPTICS_INFO, None)
    return info.get() if info is not None and info.get() else None


def set_optics_group_info(particles, text: str) -> None:
    """Store an optics table (STAR text) where :func:`optics_group_info` finds it."""
    from pyworkflow.object import String

    acquisition = particles.getAcquisition() if hasattr(particles, "getAcquisition") else None
    if acquisition is not None and hasattr(acquisition, "opticsGroupInfo"):
        acquisition.opticsGroupInfo.set(text)
    else:
        setattr(particles, ATTR_OPTICS_INFO, String(text))


def optics_table_from_text(text: str | None) -> pd.DataFrame | None:
    """The ``data_optics`` table of STAR text (None when there is none)."""
    import tempfile

    if not text:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "optics.star"
        path.write_text(text)
        table = read_star(path).blocks.get("optics")
    return table if isinstance(table, pd.DataFrame) else (pd.DataFrame([table]) if table else None)


def optics_table_text(particles_star) -> str:
    """STAR text of the ``data_optics`` table of a RELION particles file (every optics group, with its
    Zernike coefficients when it has them): what ``opticsGroupInfo`` holds."""
    from tomoctfrefine.io.star import star_text

    optics = read_star(particles_star).blocks["optics"]
    return star_text(StarDocument({"optics": optics}))


def _optics_rows(groups: dict, acquisitions: dict, pixel_size: float, box_size_px, input_optics) -> pd.DataFrame:
    """``data_optics``: one row per group used, its optics from its first tomogram's tilt series, its
    name and Zernike coefficients from the particles' own optics table (``input_optics``) when given."""
    rows = []
    for group in sorted(set(groups.values())):
        ts_id = next(t for t, g in groups.items() if g == group)
        acquisition = acquisitions[ts_id]
        row = {"rlnOpticsGroup": group, "rlnOpticsGroupName": f"optics{group}",
               "rlnSphericalAberration": acquisition.getSphericalAberration(), "rlnVoltage": acquisition.getVoltage(),
               "rlnTomoTiltSeriesPixelSize": pixel_size, "rlnAmplitudeContrast": acquisition.getAmplitudeContrast()}
        if box_size_px:
            row["rlnImageSize"] = int(box_size_px)
            row["rlnImagePixelSize"] = pixel_size
        if input_optics is not None and "rlnOpticsGroup" in input_optics:
            match = input_optics[input_optics["rlnOpticsGroup"].astype(int) == group]
            if len(match):
                for column in ("rlnOpticsGroupName", "rlnEvenZernike", "rlnOddZernike"):
                    if column in match:
                        row[column] = match[column].iloc[0]
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in ("rlnEvenZernike", "rlnOddZernike"):  # a group without coefficients has none
        if column in table:
            table[column] = table[column].fillna("[]").astype(str)
    return table


def write_optimisation_set_from_scipion(out_dir, tilt_series_set, ctf_set, particles, half_maps, mask_path,
                                        hand: int, fsc_path=None, box_size_px=None) -> ConvertedInputs:
    """Write a RELION-5 optimisation set (tomograms, per-tilt-series tables, particles, references)
    for the tilt series that have a CTF and particles.

    ``out_dir`` gets ``optimisation_set.star``, ``tomograms.star``, ``tilt_series/<tsId>.star``,
    ``particles.star``, ``tilt_order.json`` and ``optics_groups.json``; the images, maps and mask are
    referenced, not copied. Optics groups: :func:`assign_optics_groups`; the particles' own optics
    table (``opticsGroupInfo``) gives the groups' names and Zernike coefficients.
    """
    out_dir = Path(out_dir)
    (out_dir / "tilt_series").mkdir(parents=True, exist_ok=True)
    pixel_size = tilt_series_set.getSamplingRate()
    set_acquisition = tilt_series_set.getAcquisition()
    tomograms = tomograms_of(particles)
    ctf_by_id = {s.getTsId(): ctf_values_by_order(s) for s in ctf_set.iterItems()}
    items = list(_particle_items(particles))
    particle_groups: dict = {}
    for item in items:
        particle_groups.setdefault(item.ts_id, set()).add(item.optics_group)
    tables, acquisitions = {}, {}
    for ts in tilt_series_set.iterItems(orderBy="_tsId"):
        ts_id = ts.getTsId()
        if ts_id not in ctf_by_id or ts_id not in tomograms:
            continue
        table, orders, stack, frame_count = tilt_series_table(ts, ctf_by_id[ts_id])
        if table.empty:
            continue
        own = ts.getAcquisition()
        acquisitions[ts_id] = own if own is not None and own.getVoltage() else set_acquisition
        tables[ts_id] = (table, orders, stack, frame_count, ts.getAcquisition().getDosePerFrame() or 0.0)
    groups = assign_optics_groups(particle_groups, {t: _acquisition_key(a) for t, a in acquisitions.items()})
    input_optics = optics_table_from_text(optics_group_info(particles))
    optics = _optics_rows(groups, acquisitions, pixel_size, box_size_px, input_optics)
    group_names = dict(zip(optics["rlnOpticsGroup"].astype(int), optics["rlnOpticsGroupName"].astype(str)))
    global_rows, tilt_order = [], {}
    for ts_id, (table, orders, stack, frame_count, dose) in tables.items():
        ts_star = out_dir / "tilt_series" / f"{ts_id}.star"
        write_star(StarDocument({ts_id: table}), ts_star)
        tilt_order[ts_id] = orders
        size = tomogram_size_bin1_px(tomograms[ts_id], pixel_size)
        acquisition = acquisitions[ts_id]
        row = {
            "rlnTomoName": ts_id,
            "rlnVoltage": acquisition.getVoltage(),
            "rlnSphericalAberration": acquisition.getSphericalAberration(),
            "rlnAmplitudeContrast": acquisition.getAmplitudeContrast(),
            "rlnMicrographOriginalPixelSize": pixel_size,
            "rlnTomoHand": float(hand),
            "rlnTomoTiltSeriesPixelSize": pixel_size,
            "rlnTomoTiltSeriesStarFile": _relpath(ts_star),
        }
        if stack is not None:
            row["rlnTomoTiltSeriesName"] = _relpath(stack)
            row["rlnTomoFrameCount"] = frame_count
        row.update({"rlnTomoSizeX": size[0], "rlnTomoSizeY": size[1], "rlnTomoSizeZ": size[2],
                    "rlnTomoImportFractionalDose": dose, "rlnOpticsGroupName": group_names[groups[ts_id]]})
        global_rows.append(row)
    global_table = pd.DataFrame(global_rows)
    # RELION needs one column set for all rows: option A (stack) and option B rows cannot mix.
    if "rlnTomoTiltSeriesName" in global_table and global_table["rlnTomoTiltSeriesName"].isna().any():
        raise ValueError("some tilt series are stacks in acquisition order and others are not; "
                         "re-stack them (e.g. with a 'tilt-series from tomograms' or an exclusion protocol)")
    tomograms_star = write_star(StarDocument({"global": global_table}), out_dir / "tomograms.star")
    sizes = {r["rlnTomoName"]: (r["rlnTomoSizeX"], r["rlnTomoSizeY"], r["rlnTomoSizeZ"]) for r in global_rows}
    table, skipped = particles_table(items, sizes, pixel_size, groups)
    particles_star = write_star(StarDocument({"general": {"rlnTomoSubTomosAre2DStacks": 1},
                                              "optics": optics, "particles": table}),
                                out_dir / "particles.star")
    entries = {
        "rlnTomoParticlesFile": _relpath(particles_star),
        "rlnTomoTomogramsFile": _relpath(tomograms_star),
        "rlnTomoReferenceMap1File": _relpath(half_maps[0]),
        "rlnTomoReferenceMap2File": _relpath(half_maps[1]),
        "rlnTomoReferenceMaskFile": _relpath(mask_path),
    }
    if fsc_path:
        entries["rlnTomoReferenceFscFile"] = _relpath(fsc_path)
    opt = write_star(StarDocument({"": entries}), out_dir / "optimisation_set.star")
    (out_dir / TILT_ORDER_FILE).write_text(json.dumps(tilt_order, indent=1))
    (out_dir / OPTICS_GROUPS_FILE).write_text(json.dumps(groups, indent=1))
    return ConvertedInputs(opt, tomograms_star, particles_star, tilt_order, skipped, groups)


def write_fsc_from_scipion(fsc, box_size_px: int, pixel_size_angstrom: float, path) -> Path:
    """RELION FSC table (``rlnSpectralIndex``, ``rlnResolution``, ``rlnFourierShellCorrelation``)
    from a Scipion ``FSC`` (frequencies in 1/Å)."""
    from tomoctfrefine.io.fsc import FscCurve, write_fsc

    frequency, values = fsc.getData()
    frequency = np.asarray(frequency, dtype=float)
    spectral_index = np.round(frequency * box_size_px * pixel_size_angstrom)
    with np.errstate(divide="ignore"):
        resolution = np.where(frequency > 0, 1.0 / np.where(frequency > 0, frequency, 1), 999.0)
    return write_fsc(path, FscCurve(spectral_index, resolution, np.asarray(values, dtype=float)))


# ------------------------------------------------------------------------- RELION files -> Scipion
@dataclass
class TiltSeriesCtf:
    """Per-tilt CTF of one tomogram as RELION wrote it, matched to Scipion acquisition orders."""

    ts_id: str
    acquisition_order: list[int]
    tilt_angle_deg: np.ndarray
    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    defocus_angle_deg: np.ndarray
    ctf_scale: np.ndarray
    defocus_sigma_angstrom: np.ndarray | None = None
    x_tilt_deg: np.ndarray | None = None
    y_tilt_deg: np.ndarray | None = None
    z_rot_deg: np.ndarray | None = None
    shift_angstrom: np.ndarray | None = None
    pre_exposure: np.ndarray | None = None


def _column(table: pd.DataFrame, name: str, default=None):
    if name in table:
        return table[name].to_numpy(dtype=float)
    return None if default is None else np.full(len(table), default, dtype=float)


def read_tilt_series_ctfs(tomograms_star, tilt_order: dict | None = None, summary: dict | None = None) -> dict[str, TiltSeriesCtf]:
    """tsId -> refined per-tilt CTF, read from a RELION-5 ``tomograms.star`` and its per-tilt files.

    Rows are matched to acquisition orders with ``tilt_order`` (written at conversion) when given,
    else by pre-exposure rank (the dose of a tilt grows with its acquisition order). The defocus
    uncertainty (1 sigma, Å) comes from the engine's ``summary.json`` (``summary["tomograms"][tsId]
    ["defocus_uncertainty_angstrom"]``, in table order) when given.
    """
    tomograms_star = Path(tomograms_star)
    global_table = read_star(tomograms_star).blocks["global"]
    result = {}
    for _, row in global_table.iterrows():
        ts_id = str(row["rlnTomoName"])
        if "rlnTomoTiltSeriesStarFile" in row:
            path = resolve_path(row["rlnTomoTiltSeriesStarFile"], [tomograms_star.parent])
            table = read_star(path).blocks[ts_id]
        else:
            table = read_star(tomograms_star).blocks[ts_id]
        pre = _column(table, "rlnMicrographPreExposure")
        if tilt_order and ts_id in tilt_order and len(tilt_order[ts_id]) == len(table):
            orders = list(tilt_order[ts_id])
        else:
            orders = acquisition_order_by_dose(pre)
        shifts = None
        if "rlnTomoXShiftAngst" in table:
            shifts = np.stack([_column(table, "rlnTomoXShiftAngst"), _column(table, "rlnTomoYShiftAngst")], axis=1)
        sigma = _column(table, "rlnDefocusUncertainty") if "rlnDefocusUncertainty" in table else None
        summary_sigma = ((summary or {}).get("tomograms", {}).get(ts_id, {}) or {}).get("defocus_uncertainty_angstrom")
        if summary_sigma is not None and len(summary_sigma) == len(table):
            sigma = np.asarray(summary_sigma, dtype=float)
        result[ts_id] = TiltSeriesCtf(
            ts_id=ts_id, acquisition_order=orders,
            tilt_angle_deg=_column(table, "rlnTomoNominalStageTiltAngle", np.nan) if "rlnTomoNominalStageTiltAngle" in table else _column(table, "rlnTomoYTilt", np.nan),
            defocus_u_angstrom=_column(table, "rlnDefocusU"), defocus_v_angstrom=_column(table, "rlnDefocusV"),
            defocus_angle_deg=_column(table, "rlnDefocusAngle"), ctf_scale=_column(table, "rlnCtfScalefactor", 1.0),
            defocus_sigma_angstrom=sigma,
            x_tilt_deg=_column(table, "rlnTomoXTilt", 0.0), y_tilt_deg=_column(table, "rlnTomoYTilt"), z_rot_deg=_column(table, "rlnTomoZRot"),
            shift_angstrom=shifts, pre_exposure=pre,
        )
    return result


def read_zernike(particles_star) -> dict[int, tuple[list[float], list[float]]]:
    """Optics group -> (even, odd) Zernike coefficients of a RELION particles file (empty lists when absent)."""
    optics = read_star(particles_star).blocks.get("optics")
    result = {}
    if optics is None:
        return result
    for _, row in optics.iterrows():
        even = parse_vector(row["rlnEvenZernike"]) if "rlnEvenZernike" in row else []
        odd = parse_vector(row["rlnOddZernike"]) if "rlnOddZernike" in row else []
        result[int(row["rlnOpticsGroup"])] = (list(even), list(odd))
    return result


def refined_ctf_set(out_path, input_ctf_set, refined: dict[str, TiltSeriesCtf], tilt_series_pointer=None):
    """A new ``SetOfCTFTomoSeries`` with the refined per-tilt defocus (and ``_ctfScale``,
    ``_defocusUncertainty`` extra attributes), copied from ``input_ctf_set`` for the series and tilts
    RELION refined. Tilts RELION did not see (excluded views) keep their flags and values.

    Returns (set, number of CTFTomo updated).
    """
    from pyworkflow.object import Float
    from tomo.objects import SetOfCTFTomoSeries

    out = SetOfCTFTomoSeries.create(out_path, template="CTFmodels%s.sqlite")
    out.copyInfo(input_ctf_set)
    if tilt_series_pointer is not None:
        out.setSetOfTiltSeries(tilt_series_pointer)
    has_sigma = any(r.defocus_sigma_angstrom is not None for r in refined.values())
    updated = 0
    for series in input_ctf_set.iterItems(orderBy="_tsId"):
        if series.getTsId() not in refined:
            continue
        result = refined[series.getTsId()]
        by_order = {order: i for i, order in enumerate(result.acquisition_order)}
        items = [ctf.clone() for ctf in series.iterItems(orderBy="_acqOrder")]
        new_series = series.clone()
        out.append(new_series)
        for new_ctf in items:
            new_ctf.setObjId(None)
            row = by_order.get(new_ctf.getAcquisitionOrder())
            old_scale = getattr(new_ctf, ATTR_CTF_SCALE, None)
            scale = 1.0 if old_scale is None or old_scale.get() is None else old_scale.get()
            sigma = None
            if row is not None and new_ctf.isEnabled():
                new_ctf.setStandardDefocus(float(result.defocus_u_angstrom[row]), float(result.defocus_v_angstrom[row]),
                                           float(result.defocus_angle_deg[row]))
                scale = float(result.ctf_scale[row])
                if result.defocus_sigma_angstrom is not None:
                    sigma = float(result.defocus_sigma_angstrom[row])
                updated += 1
            setattr(new_ctf, ATTR_CTF_SCALE, Float(scale))
            if has_sigma:
                setattr(new_ctf, ATTR_DEFOCUS_SIGMA, Float(sigma))
            new_series.append(new_ctf)
        out.update(new_series)
    return out, updated


# ------------------------------------------------- RELION folder -> files Scipion's importers read
def stage_for_scipion_import(relion_dir, out_dir, tomogram_binning: int = 4) -> dict:
    """Files scipion-em-tomo's importers read, made from a RELION-5 dataset whose stacks are
    ``rlnTomoTiltSeriesName`` files (such as ``tomoctfrefine simulate`` writes):

    * ``out_dir/ts/<tsId>.mrcs`` (a symlink to the stack) and ``<tsId>.tlt`` with the nominal angle,
      the accumulated dose and the acquisition order of each frame (``ProtImportTs``, angles from tlt);
    * ``out_dir/tomo/<tsId>.mrc``: an empty tomogram binned by ``tomogram_binning`` with the size of
      ``rlnTomoSizeX/Y/Z`` (``ProtImportTomograms``; coordinates need a tomogram to refer to).

    Returns ``{"ts": folder, "tomo": folder, "pixel_angstrom", "tomogram_pixel_angstrom", "dose_per_tilt",
    "tilt_axis_deg"}`` (the last three of the last tomogram: the values ``ProtImportTs`` asks for).
    """
    import mrcfile

    relion_dir, out_dir = Path(relion_dir), Path(out_dir)
    (out_dir / "ts").mkdir(parents=True, exist_ok=True)
    (out_dir / "tomo").mkdir(parents=True, exist_ok=True)
    tomograms_star = relion_dir / "tomograms.star"
    global_table = read_star(tomograms_star).blocks["global"]
    info = {"ts": out_dir / "ts", "tomo": out_dir / "tomo"}
    for _, row in global_table.iterrows():
        ts_id = str(row["rlnTomoName"])
        table = read_star(resolve_path(row["rlnTomoTiltSeriesStarFile"], [relion_dir])).blocks[ts_id]
        stack = resolve_path(row["rlnTomoTiltSeriesName"], [relion_dir]).resolve()
        link = out_dir / "ts" / f"{ts_id}.mrcs"
        if not link.exists():
            link.symlink_to(stack)
        pre = table["rlnMicrographPreExposure"].to_numpy(dtype=float)
        dose = float(row.get("rlnTomoImportFractionalDose", np.nan))
        if not np.isfinite(dose):
            steps = np.diff(np.sort(pre))
            dose = float(np.median(steps[steps > 0])) if np.any(steps > 0) else 0.0
        nominal = table["rlnTomoNominalStageTiltAngle"] if "rlnTomoNominalStageTiltAngle" in table else table["rlnTomoYTilt"]
        lines = [f"{angle:.3f} {p + dose:.3f} {order}" for angle, p, order in
                 zip(nominal, pre, acquisition_order_by_dose(pre))]
        (out_dir / "ts" / f"{ts_id}.tlt").write_text("\n".join(lines) + "\n")
        pixel = float(row["rlnTomoTiltSeriesPixelSize"])
        shape = [int(round(float(row[f"rlnTomoSize{axis}"]) / tomogram_binning)) for axis in "ZYX"]
        with mrcfile.new(out_dir / "tomo" / f"{ts_id}.mrc", overwrite=True) as tomogram:
            tomogram.set_data(np.zeros(shape, dtype=np.float32))
            tomogram.voxel_size = pixel * tomogram_binning
        info["tomogram_pixel_angstrom"] = pixel * tomogram_binning
        info["dose_per_tilt"] = dose
        info["pixel_angstrom"] = pixel
        info["tilt_axis_deg"] = float(np.median(table["rlnTomoZRot"])) if "rlnTomoZRot" in table else 0.0
    return info
