"""Scipion protocol "import RELION tomo metadata": a RELION-5 tomogram set's alignment and CTF, and
its particles, onto Scipion tilt series and tomograms.

scipion-em-tomo imports tilt series, tomograms and plain coordinates, but has no reader for RELION's
``tomograms.star`` (alignment, per-tilt CTF) or for oriented RELION particles. This protocol fills
that gap, so that a RELION project (or a simulated dataset) can enter a Scipion workflow, and is the
inverse of the conversion the refinement protocol does.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path

import numpy as np
from pwem.objects import Transform
from pwem.protocols import EMProtocol
from pyworkflow import BETA
from pyworkflow.object import Float, Integer
from pyworkflow.protocol import params
from pyworkflow.utils import Message
from tomo.constants import BOTTOM_LEFT_CORNER, TR_RELION
from tomo.objects import (Coordinate3D, CTFTomo, CTFTomoSeries, SetOfCoordinates3D, SetOfCTFTomoSeries,
                          SetOfTiltSeries)

from . import convert


class ImportOutputs(Enum):
    tiltSeries = SetOfTiltSeries
    CTFs = SetOfCTFTomoSeries
    coordinates = SetOfCoordinates3D


class ProtTomoImportRelionMetadata(EMProtocol):
    """Give imported tilt series the alignment and per-tilt CTF of a RELION-5 tomograms.star, and
    (optionally) turn a RELION-5 particles.star into oriented 3D coordinates on imported tomograms.

    Tilts are matched by acquisition order (the rank of rlnMicrographPreExposure); views of the tilt
    series that RELION does not list are disabled. Tilt angles become RELION's rlnTomoYTilt (the
    imported angle is kept as _tomoNominalTilt), rlnTomoXTilt is kept as the tilt-image attribute
    _tomoXTilt, the half set and optics group as the coordinate attributes _rlnRandomSubset and
    _rlnOpticsGroup, the optics table (with any Zernike coefficients) as the coordinates'
    _opticsGroupInfo.
    """

    _label = "import RELION tomo metadata"
    _devStatus = BETA
    _possibleOutputs = ImportOutputs

    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("inputTiltSeries", params.PointerParam, pointerClass="SetOfTiltSeries", important=True,
                      label="Tilt series (bin 1)",
                      help="The tilt series RELION's tomograms.star describes (tsId = rlnTomoName).")
        form.addParam("tomogramsStar", params.FileParam, important=True, label="RELION tomograms.star",
                      help="RELION-5 tomogram set; its per-tilt-series files give ZRot, shifts (Å), XTilt "
                           "and the defocus U, V (Å) and angle (deg) of each tilt.")
        form.addParam("particlesStar", params.FileParam, allowsNull=True, label="RELION particles.star (optional)",
                      help="RELION-5 particles (centred coordinates in Å, angles in degrees, half sets).")
        form.addParam("inputTomograms", params.PointerParam, pointerClass="SetOfTomograms", allowsNull=True,
                      condition="particlesStar", label="Tomograms of the particles",
                      help="Tomograms (any binning) the coordinates refer to; tsId = rlnTomoName.")
        form.addParam("boxSize", params.IntParam, default=64, condition="particlesStar",
                      label="Particle box size (px of the tomograms)", help="Box size stored with the coordinates.")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.importStep, needsGPU=False)

    def importStep(self):
        in_ts = self.inputTiltSeries.get()
        pixel_size = in_ts.getSamplingRate()
        tomograms_star = Path(self.tomogramsStar.get())
        relion = convert.read_tilt_series_ctfs(tomograms_star)

        ts_out = SetOfTiltSeries.create(self._getPath(), template="tiltseries%s.sqlite")
        ts_out.copyInfo(in_ts)
        ctf_out = SetOfCTFTomoSeries.create(self._getPath(), template="CTFmodels%s.sqlite")
        ctf_out.setSetOfTiltSeries(ts_out)
        imported = []
        for ts in in_ts.iterItems(orderBy="_tsId"):
            if ts.getTsId() not in relion:
                continue
            images = [ti.clone() for ti in ts.iterItems(orderBy="_index")]
            new_ts = ts.clone()
            new_ts.setObjId(None)
            ts_out.append(new_ts)
            imported.append((new_ts, images))
            result = relion[ts.getTsId()]
            row_of = {order: i for i, order in enumerate(result.acquisition_order)}
            for ti in images:
                ti.setObjId(None)
                row = row_of.get(ti.getAcquisitionOrder())
                if row is None:
                    ti.setEnabled(False)
                    matrix = np.eye(3)
                    xtilt = 0.0
                    setattr(ti, convert.ATTR_NOMINAL_TILT, Float(ti.getTiltAngle()))
                else:
                    matrix = convert.alignment_matrix(result.z_rot_deg[row], *result.shift_angstrom[row], pixel_size)
                    xtilt = float(result.x_tilt_deg[row])
                    setattr(ti, convert.ATTR_NOMINAL_TILT, Float(ti.getTiltAngle()))
                    ti.setTiltAngle(float(result.y_tilt_deg[row]))
                transform = Transform()
                transform.setMatrix(matrix)
                ti.setTransform(transform)
                setattr(ti, convert.ATTR_XTILT, Float(xtilt))
                new_ts.append(ti)
            ts_out.update(new_ts)
        self._defineOutputs(**{ImportOutputs.tiltSeries.name: ts_out})
        self._defineSourceRelation(self.inputTiltSeries, ts_out)

        for ts in ts_out.iterItems(orderBy="_tsId"):
            result = relion[ts.getTsId()]
            row_of = {order: i for i, order in enumerate(result.acquisition_order)}
            images = [ti.clone() for ti in ts.iterItems(orderBy="_index")]
            series = CTFTomoSeries()
            series.copyInfo(ts)
            series.setTiltSeries(ts)
            series.setTsId(ts.getTsId())
            series.setObjId(None)
            ctf_out.append(series)
            for ti in images:
                ctf = CTFTomo()
                row = row_of.get(ti.getAcquisitionOrder())
                if row is None:
                    ctf.setWrongDefocus()
                    ctf.setEnabled(False)
                    scale = 1.0
                else:
                    ctf.setStandardDefocus(float(result.defocus_u_angstrom[row]), float(result.defocus_v_angstrom[row]),
                                           float(result.defocus_angle_deg[row]))
                    scale = float(result.ctf_scale[row])
                setattr(ctf, convert.ATTR_CTF_SCALE, Float(scale))
                ctf.setAcquisitionOrder(ti.getAcquisitionOrder())
                ctf.setIndex(ti.getIndex())
                series.append(ctf)
            ctf_out.update(series)
        self._defineOutputs(**{ImportOutputs.CTFs.name: ctf_out})
        self._defineSourceRelation(self.inputTiltSeries, ctf_out)

        if self.particlesStar.get():
            coords = self._importCoordinates(tomograms_star, pixel_size)
            self._defineOutputs(**{ImportOutputs.coordinates.name: coords})
            self._defineSourceRelation(self.inputTomograms, coords)

    def _importCoordinates(self, tomograms_star, ts_pixel_angstrom):
        from tomoctfrefine.io.star import read_star
        from tomoctfrefine.physics.geometry import euler_zyz_matrix
        from pwem.convert.transformations import euler_from_matrix

        tomograms = {t.getTsId(): t.clone() for t in self.inputTomograms.get().iterItems()}
        global_table = read_star(tomograms_star).blocks["global"]
        sizes = {str(r["rlnTomoName"]): np.array([r["rlnTomoSizeX"], r["rlnTomoSizeY"], r["rlnTomoSizeZ"]], dtype=float)
                 for _, r in global_table.iterrows()}
        table = read_star(self.particlesStar.get()).blocks["particles"]
        first = next(iter(tomograms.values()))
        coords_px = first.getSamplingRate()
        coords = SetOfCoordinates3D.create(self._getPath(), template="coordinates%s.sqlite")
        coords.setSamplingRate(coords_px)
        coords.setPrecedents(self.inputTomograms)
        coords.setBoxSize(self.boxSize.get())
        for _, row in table.iterrows():
            ts_id = str(row["rlnTomoName"])
            if ts_id not in tomograms or ts_id not in sizes:
                continue
            rotation = euler_zyz_matrix(row.get("rlnAngleRot", 0.0), row.get("rlnAngleTilt", 0.0), row.get("rlnAnglePsi", 0.0))
            origin = np.array([row.get("rlnOriginXAngst", 0.0), row.get("rlnOriginYAngst", 0.0), row.get("rlnOriginZAngst", 0.0)])
            if "rlnTomoSubtomogramRot" in row:
                subtomogram = euler_zyz_matrix(row["rlnTomoSubtomogramRot"], row["rlnTomoSubtomogramTilt"], row["rlnTomoSubtomogramPsi"])
                rotation = subtomogram @ rotation
                origin = subtomogram @ origin
            angles = -np.rad2deg(euler_from_matrix(rotation, axes="szyz"))
            centred = np.array([row["rlnCenteredCoordinateXAngst"], row["rlnCenteredCoordinateYAngst"],
                                row["rlnCenteredCoordinateZAngst"]], dtype=float)
            corner_bin1 = centred / ts_pixel_angstrom + sizes[ts_id] / 2.0
            corner = corner_bin1 * ts_pixel_angstrom / coords_px
            coord = Coordinate3D()
            coord.setVolume(tomograms[ts_id])
            coord.setPosition(*corner, BOTTOM_LEFT_CORNER)
            coord.setMatrix(convert.relion_matrix(angles, origin, coords_px), convention=TR_RELION)
            setattr(coord, convert.ATTR_HALF_SET, Integer(int(row.get("rlnRandomSubset", 1))))
            setattr(coord, convert.ATTR_OPTICS_GROUP, Integer(int(row.get("rlnOpticsGroup", 1))))
            coords.append(coord)
        convert.set_optics_group_info(coords, convert.optics_table_text(self.particlesStar.get()))
        return coords

    def _validate(self):
        errors = []
        if not Path(self.tomogramsStar.get() or "").is_file():
            errors.append(f"tomograms.star {self.tomogramsStar.get()!r} not found.")
        if self.particlesStar.get() and self.inputTomograms.get() is None:
            errors.append("Particles need the tomograms they were picked in.")
        return errors

    def _summary(self):
        if self.hasAttribute(ImportOutputs.CTFs.name):
            return [f"Alignment and CTF of {getattr(self, ImportOutputs.CTFs.name).getSize()} tilt series "
                    f"from {self.tomogramsStar.get()}"]
        return ["Outputs not ready yet."]
