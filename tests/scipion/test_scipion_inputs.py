"""Every kind of Scipion input the protocol takes, refined in a real headless project against a
simulated truth (``tomoctfrefine.simulate``: 2 tomograms of 13 tilts, 10 particles each, 2 Å pixels).

One test per input kind; each checks the geometry the conversion hands to the engine (the particle
positions and orientations, the tilt images' projection, to 0.1 px of the truth) and that the refined
per-tilt defocus agrees with the truth within its own uncertainty (RMS of error / sigma below 2 over the
low-dose half of the tilts, from a start 900 Å RMS off):

* coordinates on tomograms binned 4x (SetOfCoordinates3D at 8 Å/px; tilt series at 2 Å/px);
* subtomograms at their own sampling rate (4 Å/px, bin 2) with shifts, on those coordinates;
* tilt series whose images carry IMOD .xf / AreTomo .aln alignment matrices, as scipion-em-imod and
  scipion-em-aretomo store them (built from the truth by IMOD's definition of an .xf);
* particles in two optics groups, refined with aberrations: every group's Zernike coefficients reach
  the output particles.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pyworkflow.project import Manager
from scipion_helpers import Carrier, launch, new_protocol

from tomoctfrefine.io import particles as particles_io
from tomoctfrefine.io import tomograms as tomograms_io
from tomoctfrefine.io.star import read_star, write_star
from tomoctfrefine.physics import geometry
from tomoctfrefine.simulate import SimulationParameters, simulate_dataset

#: Small: 2 tomograms x 10 particles, 256 px images, 64 px reference. No X tilt: an IMOD .xf (and
#: Scipion's tilt-image matrix) cannot hold one.
SIMULATION = SimulationParameters(seed=11, n_tomograms=2, n_tilts=13, image_size_px=256, tomogram_thickness_px=80,
                                  placement_margin_px=48, particles_per_tomogram=10, box_size_px=64,
                                  particle_radius_angstrom=36.0, x_tilt_sd_deg=0.0)
PIXEL = SIMULATION.pixel_size_angstrom
TOMOGRAM_BINNING, SUBTOMOGRAM_BINNING = 4, 2
REFINE = dict(boxSize=96, refineDefocus=True, doDefocusReg=False, refineContrast=False, numberOfThreads=1)
TIMEOUT_S = 240


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The simulated RELION-5 dataset, the files tomo's importers read, and a copy of its particles
    with TS_02's particles in a second optics group."""
    from tomoctfrefine.protocols.convert import stage_for_scipion_import

    root = tmp_path_factory.mktemp("scipion_inputs")
    relion = root / "relion"
    simulate_dataset(relion, SIMULATION)
    staged = stage_for_scipion_import(relion, root, tomogram_binning=TOMOGRAM_BINNING)
    doc = read_star(relion / "particles.star")
    second = doc.blocks["optics"].copy()
    second["rlnOpticsGroup"], second["rlnOpticsGroupName"] = 2, "optics2"
    doc.blocks["optics"] = pd.concat([doc.blocks["optics"], second], ignore_index=True)
    doc.blocks["particles"].loc[doc.blocks["particles"]["rlnTomoName"] == "TS_02", "rlnOpticsGroup"] = 2
    write_star(doc, root / "particles_two_groups.star")
    return dict(root=root, relion=relion, staged=staged, truth=json.loads((relion / "truth" / "truth.json").read_text()))


@pytest.fixture(scope="module")
def project(data, scipion_root):
    """Tilt series, tomograms (bin 4), RELION alignment + CTF + coordinates, half maps and mask, imported."""
    from pwem.protocols import ProtImportMask, ProtImportVolumes
    from tomo.protocols import ProtImportTomograms, ProtImportTs
    from tomoctfrefine.protocols import ProtTomoImportRelionMetadata

    cwd = os.getcwd()
    manager = Manager()
    proj = manager.createProject("tomoctfrefine_inputs")
    os.chdir(proj.getPath())
    relion, staged = data["relion"], data["staged"]
    run = lambda cls, **kw: launch(proj, new_protocol(proj, cls, **kw))  # noqa: E731
    ts = run(ProtImportTs, filesPath=str(staged["ts"]), filesPattern="{TS}.mrcs", anglesFrom=2, voltage=300,
             sphericalAberration=2.7, amplitudeContrast=0.1, magnification=50000, samplingRate=PIXEL,
             tiltAxisAngle=staged["tilt_axis_deg"], doseInitial=0.0, dosePerFrame=staged["dose_per_tilt"])
    tomograms = run(ProtImportTomograms, filesPath=str(staged["tomo"]), filesPattern="*.mrc",
                    samplingRate=staged["tomogram_pixel_angstrom"])
    meta = run(ProtTomoImportRelionMetadata, inputTiltSeries=(ts, "outputTiltSeries"),
               tomogramsStar=str(relion / "tomograms.star"), particlesStar=str(relion / "particles.star"),
               inputTomograms=(tomograms, "Tomograms"), boxSize=32)
    volume = run(ProtImportVolumes, filesPath=str(relion / "ref" / "map_true.mrc"), samplingRate=PIXEL,
                 setHalfMaps=True, half1map=str(relion / "ref" / "half1.mrc"), half2map=str(relion / "ref" / "half2.mrc"))
    mask = run(ProtImportMask, maskPath=str(relion / "ref" / "mask.mrc"), samplingRate=PIXEL)
    yield dict(project=proj, ts=ts, tomograms=tomograms, meta=meta, volume=volume, mask=mask)
    os.chdir(cwd)


def _refine(project, tilt_series=None, particles=None, **params):
    """Run the refinement on the imported CTFs, average and mask, with the given tilt series and
    particles (``(protocol, output name)``; the RELION-metadata import's by default)."""
    from tomoctfrefine.protocols import ProtTomoCtfRefine

    meta = project["meta"]
    label = params.pop("label", None)
    protocol = new_protocol(project["project"], ProtTomoCtfRefine, inputTiltSeries=tilt_series or (meta, "tiltSeries"),
                            inputCtfTomoSeries=(meta, "CTFs"), inReParticles=particles or (meta, "coordinates"),
                            recVolume=(project["volume"], "outputVolume"), inRefMask=(project["mask"], "outputMask"),
                            **dict(REFINE, **params))
    if label:
        protocol.setObjLabel(label)
    return launch(project["project"], protocol, timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def coordinates_run(project):
    """The refinement of the imported coordinates (on tomograms binned 4x)."""
    return _refine(project, label="coordinates at bin 4")


def _refined_defocus(protocol) -> dict:
    """(tsId, acquisition order) -> refined (U, V, angle) of the output CTFs."""
    return {(series.getTsId(), ctf.getAcquisitionOrder()): (ctf.getDefocusU(), ctf.getDefocusV(), ctf.getDefocusAngle())
            for series in protocol.CTFs.iterItems() for ctf in series.iterItems()}


def _assert_same_refinement(protocol, reference):
    """The same particles in the same images, entered another way: the same refined CTF (0.5 Å)."""
    got, expected = _refined_defocus(protocol), _refined_defocus(reference)
    assert sorted(got) == sorted(expected) and len(got) == 26
    difference = max(abs(got[key][i] - expected[key][i]) for key in expected for i in (0, 1))
    print(f"{protocol.getObjLabel()}: refined U, V within {difference:.3g} Å of the coordinates' run")
    for key in expected:
        np.testing.assert_allclose(got[key][:2], expected[key][:2], atol=0.5, err_msg=str(key))


# ------------------------------------------------------------------------------------------- checks
def _particle_geometry(tomograms_star, particles_star) -> dict:
    """tomogram -> (positions (n, 3) in bin-1 px, rotations (n, 3, 3)) as the engine reads them."""
    tset = tomograms_io.read_tomogram_set(tomograms_star)
    pset = particles_io.read_particle_set(particles_star)
    result = {}
    for name in tomograms_io.tomogram_names(tset):
        tomo = tomograms_io.tomogram(tset, name)
        rows = particles_io.particles_of(pset, name)
        result[name] = (particles_io.particle_positions_px(pset, rows, tomo), particles_io.particle_rotations(pset, rows))
    return result


def _assert_particles_match_truth(protocol, data) -> float:
    """The converted particles (positions and orientations, as the engine reads them) are the truth's,
    one for one; returns the largest position error (px)."""
    relion, converted = data["relion"], Path(protocol.inputDir())
    truth = _particle_geometry(relion / "truth" / "tomograms_true.star", relion / "truth" / "particles_true.star")
    found = _particle_geometry(converted / "tomograms.star", converted / "particles.star")
    assert sorted(found) == sorted(truth) == ["TS_01", "TS_02"]
    worst = 0.0
    for name, (positions, rotations) in truth.items():
        got_positions, got_rotations = found[name]
        assert len(got_positions) == len(positions) == 10
        distance = np.linalg.norm(got_positions[:, None, :] - positions[None, :, :], axis=2)
        match = distance.argmin(axis=1)
        assert sorted(match) == list(range(len(positions))), f"{name}: particles do not match one for one"
        errors = distance[np.arange(len(match)), match]
        worst = max(worst, float(errors.max()))
        assert errors.max() < 0.1, (name, errors)
        np.testing.assert_allclose(got_rotations, rotations[match], atol=1e-6, err_msg=name)
    return worst


def _defocus_z_scores(protocol, data) -> dict:
    """tomogram -> (pre-exposure, (refined - true) mean defocus / refined uncertainty) per tilt."""
    truth = data["truth"]["tomograms"]
    dose_of = {}
    for ts in protocol.inputTiltSeries.get().iterItems():
        for ti in ts.iterItems():
            dose_of[(ts.getTsId(), ti.getAcquisitionOrder())] = ti.getAcquisition().getDoseInitial()
    result = {}
    for series in protocol.CTFs.iterItems():
        name = series.getTsId()
        by_dose = {t["pre_exposure"]: t for t in truth[name]}
        rows = []
        for ctf in series.iterItems():
            tilt = by_dose[dose_of[(name, ctf.getAcquisitionOrder())]]
            sigma = ctf._defocusUncertainty.get()
            error = 0.5 * (ctf.getDefocusU() + ctf.getDefocusV()) - 0.5 * (tilt["dfu"] + tilt["dfv"])
            assert 0 < sigma < 500, (name, sigma)
            rows.append((tilt["pre_exposure"], error / sigma))
        result[name] = np.array(sorted(rows))
    return result


def _assert_defocus_within_uncertainty(protocol, data) -> float:
    """RMS of error/sigma over the low-dose half of the tilts below 2 (about 1 expected); returns it."""
    scores = _defocus_z_scores(protocol, data)
    assert sorted(scores) == ["TS_01", "TS_02"] and all(len(s) == 13 for s in scores.values())
    low = np.concatenate([s[: len(s) // 2 + 1, 1] for s in scores.values()])  # 7 lowest doses of each
    rms = float(np.sqrt(np.mean(low ** 2)))
    print(f"{protocol.getObjLabel()}: RMS(error/sigma) over {len(low)} low-dose tilts = {rms:.2f}")
    assert rms < 2.0, scores
    return rms


def _assert_relion_job_layout(protocol):
    """The outputs sit in extra/ as a RELION job folder (not below the converted inputs)."""
    extra = Path(protocol.outDir())
    assert extra == Path(protocol._getExtraPath())
    tomograms = read_star(extra / "tomograms.star").blocks["global"]
    assert [Path(p) for p in tomograms["rlnTomoTiltSeriesStarFile"]] == [extra / "tilt_series" / f"{n}.star"
                                                                         for n in tomograms["rlnTomoName"]]
    opt = read_star(extra / "optimisation_set.star").blocks[""]
    assert Path(opt["rlnTomoTomogramsFile"]) == extra / "tomograms.star"
    note = (extra / "note.txt").read_text()
    assert note.startswith(f"tomoctfrefine refine --i {protocol.inputDir()}/optimisation_set.star --o {extra} --b 96 "
                           "--do_defocus --d0 -3000 --d1 3000 ")
    assert not list(extra.glob("Runs")) and not list(extra.glob("out"))


# ------------------------------------------------------------------------------------------- tests
def test_coordinates_on_binned_tomograms(project, data, coordinates_run):
    meta = project["meta"]
    assert meta.coordinates.getSamplingRate() == PIXEL * TOMOGRAM_BINNING == project["tomograms"].Tomograms.getSamplingRate()
    assert meta.tiltSeries.getSamplingRate() == PIXEL
    protocol = coordinates_run
    _assert_particles_match_truth(protocol, data)
    _assert_defocus_within_uncertainty(protocol, data)
    _assert_relion_job_layout(protocol)
    coordinates = protocol.coordinates
    assert coordinates.getSize() == 20 and coordinates.getBoxSize() == 32
    assert {c._rlnOpticsGroup.get() for c in coordinates.iterItems()} == {1}


def _subtomograms(project, carrier: Carrier, offsets_angstrom: np.ndarray):
    """Subtomograms at bin 2 of the imported coordinates (bin 4), as after a subtomogram refinement that
    moved each particle: the coordinate sits ``offset`` (Å, tomogram frame) away from the particle and
    the transform's shift brings it back. Matrices as scipion-em-reliontomo builds them from RELION's
    angles and origin (``genTransformMatrix``: the inverse of [Euler ZYZ(-angles) | -origin / pixel],
    the origin in pixels of the subtomograms), stored with ``convention=TR_RELION``."""
    from pwem.convert.transformations import euler_from_matrix, euler_matrix
    from pwem.objects import Transform
    from pyworkflow.object import Integer
    from tomo.constants import SCIPION, TR_RELION
    from tomo.objects import SetOfSubTomograms, SubTomogram

    coordinates = project["meta"].coordinates
    coords_px, subtomo_px = coordinates.getSamplingRate(), PIXEL * SUBTOMOGRAM_BINNING
    subtomograms = SetOfSubTomograms.create(carrier.path, template="subtomograms%s.sqlite")
    subtomograms.setSamplingRate(subtomo_px)
    subtomograms.setCoordinates3D(coordinates)
    for index, coordinate in enumerate(coordinates.iterCoordinates()):
        moved = coordinate.clone()
        offset = offsets_angstrom[index]
        for axis, value in zip("XYZ", offset / coords_px):
            getattr(moved, f"set{axis}")(getattr(coordinate, f"get{axis}")(SCIPION) + value, SCIPION)
        # the particle's RELION angles, from the coordinate's own orientation
        forward = np.linalg.inv(coordinate.getMatrix(convention=TR_RELION))
        angles_deg = -np.rad2deg(euler_from_matrix(forward, axes="szyz"))
        matrix = euler_matrix(*np.deg2rad(-angles_deg), axes="szyz")
        matrix[0:3, 3] = -offset / subtomo_px
        subtomogram = SubTomogram()
        subtomogram.setSamplingRate(subtomo_px)
        subtomogram.setLocation(os.path.join(carrier.path, f"subtomogram_{index}.mrc"))
        subtomogram.setCoordinate3D(moved)
        subtomogram.setVolName(coordinate.getTomoId())
        subtomogram.setTransform(Transform(np.linalg.inv(matrix)), convention=TR_RELION)
        subtomogram._rlnRandomSubset = Integer(coordinate._rlnRandomSubset.get())
        subtomograms.append(subtomogram)
    return subtomograms


def test_subtomograms_with_their_own_sampling_rate_and_shifts(project, data, coordinates_run):
    carrier = Carrier(project["project"], "subtomograms at bin 2")
    offsets = np.random.default_rng(7).uniform(-24.0, 24.0, size=(20, 3))  # Å: 3-12 px at bin 1
    subtomograms = _subtomograms(project, carrier, offsets)
    source = carrier.publish(subtomograms=subtomograms)
    protocol = _refine(project, particles=(source, "subtomograms"), label="subtomograms at bin 2")
    # The shifts are read in pixels of the subtomograms (4 Å), the positions in pixels of the coordinates
    # (8 Å): with either rate in the other's place the particles would miss the truth by 3-12 px.
    _assert_particles_match_truth(protocol, data)
    converted = read_star(Path(protocol.inputDir()) / "particles.star").blocks["particles"]
    assert np.abs(converted["rlnOriginXAngst"]).max() > 10
    _assert_defocus_within_uncertainty(protocol, data)
    _assert_same_refinement(protocol, coordinates_run)
    output = protocol.particles
    assert output.getSize() == 20 and output.getSamplingRate() == PIXEL * SUBTOMOGRAM_BINNING
    assert {s._rlnOpticsGroup.get() for s in output.iterItems()} == {1}


# IMOD's .xf (one line per image: A11 A12 A21 A22 DX DY) maps a raw image point, relative to the image
# centre, to the aligned image: x_aligned = A x_raw + D, pixels. In the aligned image the tilt axis is
# vertical, so the aligned image is the specimen turned about Y by the tilt angle and projected.
def imod_xf_line(z_rot_deg: float, shift_angstrom, pixel_angstrom: float) -> str:
    """The .xf line of a tilt whose raw image shows the projection turned by ``z_rot_deg`` and shifted
    by ``shift_angstrom`` (RELION's rlnTomoZRot and rlnTomoX/YShiftAngst): A undoes the rotation, D the shift."""
    c, s = math.cos(math.radians(z_rot_deg)), math.sin(math.radians(z_rot_deg))
    a = np.array([[c, s], [-s, c]])
    d = -a @ (np.asarray(shift_angstrom, dtype=float) / pixel_angstrom)
    return f"{a[0, 0]:.9f} {a[0, 1]:.9f} {a[1, 0]:.9f} {a[1, 1]:.9f} {d[0]:.6f} {d[1]:.6f}"


def matrix_from_xf_line(line: str) -> np.ndarray:
    """Scipion's tilt-image matrix of an .xf line, laid out as scipion-em-imod's ``readXfFile``."""
    a11, a12, a21, a22, dx, dy = (float(v) for v in line.split())
    return np.array([[a11, a12, dx], [a21, a22, dy], [0.0, 0.0, 1.0]])


def matrix_from_aln_row(rot_deg: float, tx_px: float, ty_px: float) -> np.ndarray:
    """Scipion's tilt-image matrix of an AreTomo .aln row (ROT, TX, TY), as scipion-em-aretomo's
    ``readAlnFile`` builds it: the rotation by -ROT and the shifts rotated by it, negated."""
    angle = -math.radians(rot_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shifts = rotation @ np.array([tx_px, ty_px])
    return np.array([[rotation[0, 0], rotation[0, 1], -shifts[0]], [rotation[1, 0], rotation[1, 1], -shifts[1]], [0, 0, 1]])


def _aligned_tilt_series(project, data, carrier: Carrier):
    """The imported (unaligned) tilt series with IMOD's .xf alignment of the truth on every image and
    the aligned tilt angles, as scipion-em-imod's 'import transformation matrix' protocol leaves them."""
    from pwem.objects import Transform
    from tomo.objects import SetOfTiltSeries

    truth = data["truth"]["tomograms"]
    raw = project["ts"].outputTiltSeries
    aligned = SetOfTiltSeries.create(carrier.path, template="tiltseries%s.sqlite")
    aligned.copyInfo(raw)
    for ts in raw.iterItems(orderBy="_tsId"):
        by_dose = {t["pre_exposure"]: t for t in truth[ts.getTsId()]}
        images = [ti.clone() for ti in ts.iterItems(orderBy="_index")]
        new_ts = ts.clone()
        new_ts.setObjId(None)
        aligned.append(new_ts)
        for ti in images:
            tilt = by_dose[ti.getAcquisition().getDoseInitial()]
            xf = matrix_from_xf_line(imod_xf_line(tilt["zrot"], (tilt["xsh"], tilt["ysh"]), PIXEL))
            aln = matrix_from_aln_row(tilt["zrot"], tilt["xsh"] / PIXEL, tilt["ysh"] / PIXEL)
            np.testing.assert_allclose(xf, aln, atol=1e-6)  # the two programs' files, one alignment
            ti.setObjId(None)
            ti.setTiltAngle(tilt["ytilt"])
            ti.setTransform(Transform(xf))
            new_ts.append(ti)
        aligned.update(new_ts)
    return aligned


def test_xf_lines_follow_imods_definition(data):
    """The .xf built for the truth takes every particle's raw-image position (RELION's projection of the
    truth) to the projection turned about a vertical tilt axis, centred: what IMOD's alignment gives."""
    truth, info = data["truth"]["tomograms"], data["truth"]["tomogram_info"]
    tset = tomograms_io.read_tomogram_set(data["relion"] / "truth" / "tomograms_true.star")
    pset = particles_io.read_particle_set(data["relion"] / "truth" / "particles_true.star")
    image = (SIMULATION.image_size_px, SIMULATION.image_size_px)
    centre = np.array([image[0] // 2, image[1] // 2], dtype=float)
    for name, tilts in truth.items():
        size = tuple(info[name]["size_px"])
        tomo = tomograms_io.tomogram(tset, name)
        positions = particles_io.particle_positions_px(pset, particles_io.particles_of(pset, name), tomo)
        for tilt in tilts:
            raw = geometry.project(geometry.projection_matrix(0.0, tilt["ytilt"], tilt["zrot"], tilt["xsh"], tilt["ysh"],
                                                              PIXEL, size, image)[None], positions)[:, 0, :2]
            turned = geometry.project(geometry.projection_matrix(0.0, tilt["ytilt"], 0.0, 0.0, 0.0, PIXEL, size, image)[None],
                                      positions)[:, 0, :2]
            xf = matrix_from_xf_line(imod_xf_line(tilt["zrot"], (tilt["xsh"], tilt["ysh"]), PIXEL))
            aligned = (xf[:2, :2] @ (raw - centre).T).T + xf[:2, 2] + centre
            np.testing.assert_allclose(aligned, turned, atol=1e-4)


def test_tilt_series_aligned_by_imod_or_aretomo(project, data, coordinates_run):
    carrier = Carrier(project["project"], "tilt series aligned by IMOD (.xf)")
    source = carrier.publish(tiltSeries=_aligned_tilt_series(project, data, carrier))
    protocol = _refine(project, tilt_series=(source, "tiltSeries"), label="tilt series aligned by IMOD")
    _assert_particles_match_truth(protocol, data)
    # Every particle projects where the truth put it in every raw tilt image.
    converted = Path(protocol.inputDir())
    tset = tomograms_io.read_tomogram_set(converted / "tomograms.star")
    true_set = tomograms_io.read_tomogram_set(data["relion"] / "truth" / "tomograms_true.star")
    pset = particles_io.read_particle_set(converted / "particles.star")
    worst = 0.0
    for name in ("TS_01", "TS_02"):
        tomo, true_tomo = tomograms_io.tomogram(tset, name), tomograms_io.tomogram(true_set, name)
        positions = particles_io.particle_positions_px(pset, particles_io.particles_of(pset, name), tomo)
        # the converted rows are the stack's frames, as the truth's (both in the simulated stack order)
        np.testing.assert_array_equal(tomo.pre_exposure_e_per_angstrom2, true_tomo.pre_exposure_e_per_angstrom2)
        got = geometry.project(tomo.projection_matrices, positions)[..., :2]
        expected = geometry.project(true_tomo.projection_matrices, positions)[..., :2]
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst < 0.1, worst
    _assert_defocus_within_uncertainty(protocol, data)
    _assert_same_refinement(protocol, coordinates_run)


def test_several_optics_groups_reach_the_output_particles(project, data):
    from tomoctfrefine.io.star import parse_vector
    from tomoctfrefine.protocols import ProtTomoImportRelionMetadata
    from tomoctfrefine.protocols.convert import (optics_group_info, optics_table_from_text,
                                                 write_optimisation_set_from_scipion)

    proj, meta = project["project"], project["meta"]
    two_groups = launch(proj, new_protocol(proj, ProtTomoImportRelionMetadata, inputTiltSeries=(project["ts"], "outputTiltSeries"),
                                           tomogramsStar=str(data["relion"] / "tomograms.star"),
                                           particlesStar=str(data["root"] / "particles_two_groups.star"),
                                           inputTomograms=(project["tomograms"], "Tomograms"), boxSize=32))
    protocol = _refine(project, particles=(two_groups, "coordinates"), refineEvenAbe=True, refineOddAbe=True,
                       label="two optics groups")
    converted = read_star(Path(protocol.inputDir()) / "particles.star").blocks
    assert list(converted["optics"]["rlnOpticsGroup"]) == [1, 2]
    assert set(converted["particles"].groupby("rlnTomoName")["rlnOpticsGroup"].unique().map(tuple)) == {(1,), (2,)}
    _assert_particles_match_truth(protocol, data)
    _assert_defocus_within_uncertainty(protocol, data)

    written = read_star(Path(protocol.outDir()) / "particles.star").blocks["optics"]
    output = protocol.coordinates
    carried = optics_table_from_text(optics_group_info(output))
    assert list(carried["rlnOpticsGroup"]) == list(written["rlnOpticsGroup"]) == [1, 2]
    for column in ("rlnEvenZernike", "rlnOddZernike"):
        assert list(carried[column]) == list(written[column])
        first, second = (parse_vector(v) for v in carried[column])
        assert len(first) == len(second) > 0 and first != second  # each group fitted on its own data
    groups = {}
    for coordinate in output.iterItems():
        groups.setdefault(coordinate.getTomoId(), set()).add(coordinate._rlnOpticsGroup.get())
    assert groups == {"TS_01": {1}, "TS_02": {2}}
    # A next run starting from these particles starts from the refined aberrations of each group.
    again = write_optimisation_set_from_scipion(
        Path(protocol._getTmpPath("again")), meta.tiltSeries, meta.CTFs, output,
        project["volume"].outputVolume.getHalfMaps(asList=True), project["mask"].outputMask.getFileName(), hand=-1)
    optics = read_star(again.particles).blocks["optics"]
    for column in ("rlnEvenZernike", "rlnOddZernike"):
        assert list(optics[column]) == list(written[column])


def test_relion_optimisation_set_gives_the_same_refinement(project, data, coordinates_run):
    """The same dataset given as its RELION optimisation set (with the tilt series and CTFs to receive
    the result): the refined CTF of the Scipion objects' run, and RELION's job layout in extra/."""
    meta = project["meta"]
    protocol = _refine(project, inputFrom=1, optimisationSet=str(data["relion"] / "optimisation_set.star"),
                       label="RELION optimisation set")
    assert protocol.inputOptimisationSet() == str(data["relion"] / "optimisation_set.star")
    assert protocol.inputTiltSeries.get().getObjId() == meta.tiltSeries.getObjId()
    _assert_defocus_within_uncertainty(protocol, data)
    _assert_same_refinement(protocol, coordinates_run)
    extra = Path(protocol.outDir())
    assert sorted(p.name for p in (extra / "tilt_series").iterdir()) == ["TS_01.star", "TS_02.star"]
    assert (extra / "note.txt").read_text().startswith(
        f"tomoctfrefine refine --i {data['relion'] / 'optimisation_set.star'} --o {extra} --b 96 --do_defocus ")
    assert not hasattr(protocol, "coordinates")  # the particles are RELION's own file
