"""Scipion protocol "tomo CTF refinement": per-tilt defocus, contrast scale and Zernike aberrations.

Thin by design: convert Scipion's sets to a RELION-5 optimisation set (``extra/input/``), run the
engine's plan one step at a time (``pipeline.plan``, each step a process of ``engine_step.py``, under
MPI when asked; "continue" resumes after the last finished one), register the results. The run's
``extra/`` is laid out as a RELION job folder (``tomograms.star``, ``tilt_series/<name>.star``,
``particles.star`` when aberrations were refined, ``optimisation_set.star``, ``note.txt`` with the
equivalent ``tomoctfrefine refine`` command). It contains no numerics; the engine does those.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
from enum import Enum
from pathlib import Path

from pwem.objects import FSC, EMFile, SetOfFSCs
from pwem.protocols import EMProtocol
from pyworkflow import BETA
from pyworkflow.object import Integer, String
from pyworkflow.protocol import params
from pyworkflow.utils import Message
from tomo.objects import SetOfCoordinates3D, SetOfCTFTomoSeries, SetOfSubTomograms, SubTomogram

from . import convert

INPUT_SCIPION, INPUT_OPTIMISATION_SET = 0, 1
#: Run as a script, not with ``-m``: ``-m`` would import this package, hence Scipion, in every engine
#: process and MPI rank (2 s each) although the engine needs none of it.
ENGINE_SCRIPT = str(Path(__file__).with_name("engine_step.py"))


class Outputs(Enum):
    CTFs = SetOfCTFTomoSeries
    particles = SetOfSubTomograms
    coordinates = SetOfCoordinates3D
    relionFiles = EMFile
    FSCs = SetOfFSCs


class ProtTomoCtfRefine(EMProtocol):
    """Refine the per-tilt CTF of cryo-ET tilt series against a subtomogram average, as RELION-5's
    "Tomo CTF refinement" (relion_tomo_refine_ctf) does: per-tilt defocus (a scan then an astigmatic
    fit, optionally regularised), the contrast scale of each tilt (per frame, or the Beer-Lambert ice
    model per tomogram or globally), and the odd and even Zernike aberrations of each optics group.

    Inputs are Scipion tomo objects (tilt series aligned by any program, at bin 1; tomograms and
    coordinates at any binning; or subtomograms at their own sampling rate) or an existing RELION
    optimisation set. Outputs: a new SetOfCTFTomoSeries with the refined defocus (attributes _ctfScale
    and _defocusUncertainty per tilt), the particles with every optics group's refined row (Zernike
    coefficients included) as opticsGroupInfo and each particle's _rlnOpticsGroup, as scipion-em-relion
    keeps them, and the RELION optimisation set itself for downstream RELION/reliontomo jobs.
    """

    _label = "tomo CTF refinement"
    _devStatus = BETA
    _possibleOutputs = Outputs

    # ------------------------------------------------------------------------------------ form
    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("inputFrom", params.EnumParam, choices=["Scipion objects", "RELION optimisation set"],
                      default=INPUT_SCIPION, display=params.EnumParam.DISPLAY_HLIST, important=True,
                      label="Input from",
                      help="Scipion objects: tilt series with their alignment, their CTF, the particles and "
                           "the average with its half maps (converted to a RELION-5 optimisation set).\n"
                           "RELION optimisation set: an existing optimisation_set.star, e.g. the one of "
                           "reliontomo's pseudo-subtomograms, used as it is.")
        form.addParam("optimisationSet", params.FileParam, condition=f"inputFrom=={INPUT_OPTIMISATION_SET}",
                      label="Optimisation set (optimisation_set.star)",
                      help="A RELION 4 or 5 optimisation set naming the particles, the tomograms, the two "
                           "half maps and the mask (and optionally the FSC and trajectories).")
        form.addParam("inputTiltSeries", params.PointerParam, pointerClass="SetOfTiltSeries", allowsNull=True,
                      label="Tilt series (aligned, bin 1)",
                      help="Aligned, non-interpolated tilt series at the pixel size the particles were "
                           "refined at (bin 1). With an optimisation set as input it is optional: give it "
                           "with the CTFs below to get the refined CTF back as Scipion objects.")
        form.addParam("inputCtfTomoSeries", params.PointerParam, pointerClass="SetOfCTFTomoSeries",
                      allowsNull=True, label="CTF of the tilt series",
                      help="The per-tilt CTF estimated for these tilt series: the starting defocus "
                           "(Å, positive underfocus) of the refinement. Excluded views are skipped.")
        form.addParam("inReParticles", params.PointerParam, pointerClass="SetOfSubTomograms,SetOfCoordinates3D",
                      allowsNull=True, condition=f"inputFrom=={INPUT_SCIPION}",
                      label="Particles (oriented subtomograms or 3D coordinates)",
                      help="Particles with the orientations of the refinement that produced the average, "
                           "and their half set (attribute _rlnRandomSubset, 1 or 2; alternated if absent). "
                           "Their tomograms give the tomogram size.")
        form.addParam("recVolume", params.PointerParam, pointerClass="AverageSubTomogram,Volume",
                      allowsNull=True, condition=f"inputFrom=={INPUT_SCIPION}",
                      label="Average with its half maps (bin 1)",
                      help="The subtomogram average; its two half maps are the references. It must be at "
                           "the tilt series' pixel size (Å/px).")
        form.addParam("inRefMask", params.PointerParam, pointerClass="VolumeMask", allowsNull=True,
                      condition=f"inputFrom=={INPUT_SCIPION}", label="Reference mask",
                      help="Soft mask around the particle, same box and pixel size (Å/px) as the half maps.")
        form.addParam("inFsc", params.PointerParam, pointerClass="FSC", allowsNull=True,
                      condition=f"inputFrom=={INPUT_SCIPION}", label="FSC of the half maps (optional)",
                      help="Gold-standard FSC (frequency in 1/Å): frequencies where it is low get less "
                           "weight. Without it the half maps' own FSC is used.")
        form.addParam("handedness", params.BooleanParam, default=True, condition=f"inputFrom=={INPUT_SCIPION}",
                      label="Does focus decrease with Z distance?",
                      help="RELION's rlnTomoHand: yes writes -1, no writes +1. The refinement checks "
                           "whether the data agree (hand check plot) and, unless told otherwise (Defocus, "
                           "advanced), adopts the hand they decisively prefer and says so in the summary.")

        self._defineOptionParams(form)
        form.addParallelSection(threads=1, mpi=1)

    # ------------------------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        """Convert, then one step per entry of the engine's plan (``tomoctfrefine.pipeline.plan``: the
        order the CLI runs), then register the outputs. Each engine step runs in its own process (under
        MPI when asked), so "continue" resumes after the last finished one."""
        from tomoctfrefine import pipeline

        options = self.plannedOptions()
        self._insertFunctionStep(self.convertInputStep, json.dumps(dataclasses.asdict(options), sort_keys=True),
                                 needsGPU=False)
        for step in pipeline.plan(options):
            self._insertFunctionStep(self.engineStep, step, needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _defineOptionParams(self, form):
        """The refinement's options, as the engine's schema declares them (``tomoctfrefine.options.FORM``: label,
        help, default, condition and the RELION flag each sets are written there once)."""
        from tomoctfrefine.options import FORM, form_default

        kinds = {"bool": params.BooleanParam, "int": params.IntParam, "float": params.FloatParam,
                 "enum": params.EnumParam}
        section = None
        for param in FORM:
            if param.section != section:
                form.addSection(label=param.section)
                section = param.section
            keywords = dict(default=form_default(param), label=param.label, help=param.help)
            if param.condition:
                keywords["condition"] = param.condition
            if param.expert:
                keywords["expertLevel"] = params.LEVEL_ADVANCED
            if param.minimum is not None:
                keywords["validators"] = [params.GE(param.minimum)]
            if param.kind == "enum":
                keywords.update(choices=[str(c) for c in param.choices], display=params.EnumParam.DISPLAY_HLIST)
            form.addParam(param.name, kinds[param.kind], **keywords)

    def plannedOptions(self):
        """The form as ``tomoctfrefine.options.RefineOptions`` (what the engine runs)."""
        from tomoctfrefine.options import FORM, options_from_form

        values = {param.name: getattr(self, param.name).get() for param in FORM}
        return options_from_form(values, threads=int(self.numberOfThreads.get() or 1))

    def refineOptions(self) -> dict:
        """The form as keyword arguments of ``tomoctfrefine.options.RefineOptions``."""
        return dataclasses.asdict(self.plannedOptions())

    # paths (relative to the project directory, the working directory of every step)
    def inputDir(self) -> str:
        """The converted inputs (RELION files): apart from the outputs, which the refinement must not
        overwrite."""
        return self._getExtraPath("input")

    def outDir(self) -> str:
        """The refinement's output folder, laid out as a RELION job folder: ``tomograms.star``,
        ``tilt_series/<name>.star``, ``particles.star`` (with aberrations), ``optimisation_set.star``,
        ``note.txt``, the report."""
        return self._getExtraPath()

    def optionsFile(self) -> str:
        return os.path.join(self.inputDir(), "refine_options.json")

    def inputOptimisationSet(self) -> str:
        if self.inputFrom.get() == INPUT_OPTIMISATION_SET:
            return self.optimisationSet.get()
        return os.path.join(self.inputDir(), "optimisation_set.star")

    def convertInputStep(self, optionsJson):
        os.makedirs(self.inputDir(), exist_ok=True)
        with open(self.optionsFile(), "w") as handle:
            handle.write(optionsJson)
        if self.inputFrom.get() == INPUT_OPTIMISATION_SET:
            return
        volume = self.recVolume.get()
        halves = volume.getHalfMaps(asList=True)
        fsc_path = None
        if self.inFsc.get() is not None:
            fsc_path = convert.write_fsc_from_scipion(self.inFsc.get(), volume.getXDim(), volume.getSamplingRate(),
                                                      os.path.join(self.inputDir(), "fsc.star"))
        particles = self.inReParticles.get()
        box = particles.getBoxSize() if hasattr(particles, "getBoxSize") else None
        converted = convert.write_optimisation_set_from_scipion(
            self.inputDir(), self.inputTiltSeries.get(), self.inputCtfTomoSeries.get(), particles,
            [_mrc_path(h) for h in halves], _mrc_path(self.inRefMask.get().getFileName()),
            hand=-1 if self.handedness else 1, fsc_path=fsc_path, box_size_px=box)
        groups = sorted(set(converted.optics_groups.values()))
        self.info(f"Wrote {converted.optimisation_set}: {len(converted.tilt_order)} tilt series, optics group(s) "
                  f"{groups}; {converted.skipped_particles} particles skipped (no tilt series or CTF)")

    def engineStep(self, step):
        """Run one step of the engine's plan (``protocols/engine_step.py``), under MPI when asked."""
        extra = ["--optimisation-set", self.inputOptimisationSet(), "--options", self.optionsFile()] if step == "prepare" else []
        self._runEngine(step, *extra)

    def _runEngine(self, step, *extra):
        from tomoctfrefine.plugin import Plugin

        args = " ".join(shlex.quote(str(word)) for word in [ENGINE_SCRIPT, step, self.outDir(), *extra])
        self.runJob(Plugin.getPythonProgram(), args, env=Plugin.getEnviron(self.numberOfThreads.get() or 1),
                    numberOfMpi=max(1, int(self.numberOfMpi.get() or 1)))

    def createOutputStep(self):
        self.registerOutputs(self.outDir())

    def registerOutputs(self, outDir):
        """Register the RELION files in ``outDir`` as Scipion sets (separate from the step so that a
        refinement made elsewhere can be registered the same way)."""
        out_dir = Path(outDir)
        opt_path = out_dir / "optimisation_set.star"
        from tomoctfrefine.io.optimisation_set import read_optimisation_set

        out_opt = read_optimisation_set(opt_path)
        tomograms_star = out_opt.resolved("tomograms_path")
        particles_star = out_opt.resolved("particles_path")
        outputs, sources = {}, []

        opt_file = EMFile(filename=str(opt_path))
        outputs[Outputs.relionFiles.name] = opt_file

        ctf_set = self.inputCtfTomoSeries.get()
        if ctf_set is not None and tomograms_star is not None:
            order_file = Path(self.inputDir()) / convert.TILT_ORDER_FILE
            tilt_order = json.loads(order_file.read_text()) if order_file.exists() else None
            summary_file = out_dir / "summary.json"
            summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
            refined = convert.read_tilt_series_ctfs(tomograms_star, tilt_order, summary)
            ts_pointer = self.inputTiltSeries if self.inputTiltSeries.get() is not None else None
            ctfs, updated = convert.refined_ctf_set(self._getPath(), ctf_set, refined, ts_pointer)
            self.info(f"{updated} tilt CTFs refined in {len(refined)} tilt series")
            outputs[Outputs.CTFs.name] = ctfs
            sources.append(self.inputCtfTomoSeries)

        particles = self.inReParticles.get() if self.inputFrom.get() == INPUT_SCIPION else None
        if particles is not None:
            new, name = self._outputParticles(particles, particles_star)
            new._optimisationSet = String(str(opt_path))
            new._relionTomograms = String(str(tomograms_star))
            new._relionParticles = String(str(particles_star))
            new._estimationBoxSize = Integer(self.boxSize.get())
            outputs[name] = new
            sources.append(self.inReParticles)

        # Only this run's assessment (a continued run may have left an older assess/ folder).
        fscs = self._assessedFscs(out_dir) if self.doAssess else None
        if fscs is not None:
            outputs[Outputs.FSCs.name] = fscs

        self._defineOutputs(**outputs)
        for source in sources + ([self.inputTiltSeries] if self.inputTiltSeries.get() is not None else []):
            for output in outputs.values():
                self._defineSourceRelation(source, output)
        if fscs is not None and self.inputFrom.get() == INPUT_SCIPION and self.recVolume.get() is not None:
            self._defineSourceRelation(self.recVolume, fscs)

    def _outputParticles(self, particles, particles_star):
        """A copy of the input particles carrying the refined optics: every optics group's row of the
        particles file (with its Zernike coefficients) as ``opticsGroupInfo``, and each particle's
        ``_rlnOpticsGroup`` (scipion-em-relion's convention). Returns (set, output name)."""
        groups_file = Path(self.inputDir()) / convert.OPTICS_GROUPS_FILE
        groups = json.loads(groups_file.read_text()) if groups_file.exists() else {}
        if isinstance(particles, SetOfSubTomograms):
            new = SetOfSubTomograms.create(self._getPath(), template="subtomograms%s.sqlite")
            name = Outputs.particles.name
        else:
            new = SetOfCoordinates3D.create(self._getPath(), template="coordinates%s.sqlite")
            name = Outputs.coordinates.name
        new.copyInfo(particles)
        if isinstance(particles, SetOfCoordinates3D):
            new.setBoxSize(particles.getBoxSize())

        def set_group(item, row=None):
            coordinate = item.getCoordinate3D() if isinstance(item, SubTomogram) else item
            own = getattr(item, convert.ATTR_OPTICS_GROUP, None)
            default = own.get() if own is not None and own.get() is not None else 1
            setattr(item, convert.ATTR_OPTICS_GROUP, Integer(groups.get(str(coordinate.getTomoId()), default)))

        new.copyItems(particles, updateItemCallback=set_group)
        if particles_star is not None and Path(particles_star).exists():
            convert.set_optics_group_info(new, convert.optics_table_text(particles_star))
        return new, name

    def _assessedFscs(self, out_dir: Path):
        """The corrected FSCs of the assessment (before, after) as a SetOfFSCs, or None without one."""
        curves = [(label, out_dir / "assess" / label / "postprocess.star") for label in ASSESS_LABELS]
        if not all(path.exists() for _, path in curves):
            return None
        fscs = self._createSetOfFSCs()
        for label, path in curves:
            frequencies, values = fsc_curve_from_postprocess(path)
            fsc = FSC(objLabel=ASSESS_LABELS[label])
            fsc.setData(frequencies, values)
            fscs.append(fsc)
        fscs.write()
        return fscs

    # ------------------------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        if importlib.util.find_spec("tomoctfrefine.pipeline") is None:
            errors.append("tomoctfrefine's engine (tomoctfrefine.pipeline) is not installed: "
                          "reinstall tomoctfrefine (pip install -e .[all]).")
        refine_anything = self.refineDefocus or self.refineContrast or self.refineOddAbe or self.refineEvenAbe
        if not refine_anything:
            errors.append("Nothing to refine: enable defocus, scale or aberrations.")
        from tomoctfrefine.options import form_labels, option_problems

        errors += [str(problem) for problem in option_problems(self.plannedOptions(), naming="form", labels=form_labels())]
        if self.inputFrom.get() == INPUT_OPTIMISATION_SET:
            errors += self._validateOptimisationSet()
        else:
            errors += self._validateScipionInputs()
        return errors

    def _validateScipionInputs(self):
        errors = []
        needed = [("inputTiltSeries", "tilt series"), ("inputCtfTomoSeries", "CTF of the tilt series"),
                  ("inReParticles", "particles"), ("recVolume", "average with its half maps"),
                  ("inRefMask", "reference mask")]
        missing = [label for name, label in needed if getattr(self, name).get() is None]
        if missing:
            return ["Missing input: " + ", ".join(missing) + "."]
        files_master = getattr(self.inReParticles.get(), "_filesMaster", None)
        if files_master is not None:
            # scipion-em-reliontomo's pseudo-subtomograms keep the particles' orientations in RELION's
            # files (their transforms hold the subtomograms' own frames): refine them from those files.
            return [f"These are RELION pseudo-subtomograms: choose 'Input from: RELION optimisation set' and give "
                    f"their optimisation set ({files_master.get()})."]
        ts_set, volume = self.inputTiltSeries.get(), self.recVolume.get()
        ts_pixel = ts_set.getSamplingRate()
        if not volume.hasHalfMaps():
            errors.append("The average has no half maps: import or reconstruct it with its two half maps.")
        if abs(volume.getSamplingRate() - ts_pixel) > 1e-3 * ts_pixel:
            errors.append(f"The reference is at {volume.getSamplingRate():.3f} Å/px but the tilt series are at "
                          f"{ts_pixel:.3f} Å/px: the refinement needs the average at bin 1 (reconstruct it at "
                          f"the tilt series' pixel size).")
        mask = self.inRefMask.get()
        if mask.getDim() != volume.getDim():
            errors.append(f"The mask box {mask.getDim()} differs from the average's {volume.getDim()}.")
        dims = ts_set.getDim()
        if dims and self.boxSize.get() > min(dims[0], dims[1]):
            errors.append(f"Box size {self.boxSize.get()} px is larger than the tilt images ({dims[0]} x {dims[1]} px): "
                          f"use at most {min(dims[0], dims[1])}.")
        if not ts_set.hasAlignment():
            errors.append("The tilt series have no alignment: align them (or import their alignment) first.")
        return errors

    def _validateOptimisationSet(self):
        path = self.optimisationSet.get()
        if not path or not os.path.exists(path):
            return [f"Optimisation set {path!r} not found: give an existing optimisation_set.star."]
        from tomoctfrefine.errors import InputError
        from tomoctfrefine.io.optimisation_set import read_optimisation_set
        from tomoctfrefine.validate import validate_inputs

        try:
            opt = read_optimisation_set(path)
            problems = [_form_message(problem) for problem in validate_inputs(opt, box_size_px=self.boxSize.get())]
        except InputError as error:
            return [str(problem) for problem in error.problems]
        if not problems:
            smallest = _smallest_tilt_image_px(opt)
            if smallest is not None and self.boxSize.get() > smallest:
                problems.append(f"Box size {self.boxSize.get()} px is larger than the tilt images "
                                f"({smallest} px): use at most {smallest}.")
        return problems

    def _warnings(self):
        warnings = []
        if self.inputFrom.get() == INPUT_SCIPION and self.inFsc.get() is None:
            warnings.append("No FSC given: frequency weights come from the half maps themselves.")
        particles = self.inReParticles.get() if self.inputFrom.get() == INPUT_SCIPION else None
        if particles is not None and particles.getSize():
            first = particles.getFirstItem()
            coordinate = first.getCoordinate3D() if isinstance(first, SubTomogram) else None
            if all(getattr(obj, convert.ATTR_HALF_SET, None) is None for obj in (first, coordinate)):
                warnings.append("The particles carry no half set (_rlnRandomSubset): they are split into halves "
                                "alternately, which is only right if the half maps were made that way.")
        return warnings

    def _summary(self):
        summary = []
        if self.hasAttribute(Outputs.CTFs.name):
            summary.append(f"Refined CTF of {getattr(self, Outputs.CTFs.name).getSize()} tilt series.")
        summary_file = Path(self.outDir()) / "summary.json"
        results = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        for name, tomogram in results.get("tomograms", {}).items():
            hand = tomogram.get("hand", {})
            if hand.get("verdict") in ("opposite hand", "undecided"):
                summary.append(f"{name}: {hand['message']}")
        if self.hasAttribute(Outputs.FSCs.name):
            assessment = results.get("assessment")
            if assessment and None not in (assessment["before"]["resolution_0.143_angstrom"],
                                           assessment["after"]["resolution_0.143_angstrom"]):
                summary.append(f"FSC 0.143: {assessment['before']['resolution_0.143_angstrom']:.2f} Å before, "
                               f"{assessment['after']['resolution_0.143_angstrom']:.2f} Å after refinement.")
        if self.hasAttribute(Outputs.relionFiles.name):
            summary.append(f"RELION files: {getattr(self, Outputs.relionFiles.name).getFileName()}")
        note = Path(self.outDir()) / "note.txt"
        if summary and note.exists():
            summary.append(f"Equivalent command: {note.read_text().strip()}")
        if not summary:
            summary.append("Outputs not ready yet.")
        return summary

    def _methods(self):
        steps = [name for flag, name in ((self.refineDefocus, "per-tilt defocus"), (self.refineContrast, "contrast scale"),
                                         (self.refineOddAbe, "odd aberrations"), (self.refineEvenAbe, "even aberrations")) if flag]
        return [f"Tilt-series CTF ({', '.join(steps)}) refined with tomoctfrefine, a re-implementation of "
                f"RELION-5's tomo CTF refinement [Burt2024], with {self.boxSize.get()} px boxes."]

    def _citations(self):
        return ["Burt2024", "Zivanov2022"]


#: Assessment sides (folders under out/assess) and the labels of their FSCs.
ASSESS_LABELS = {"before": "FSC before refinement (input CTF)", "after": "FSC after refinement (refined CTF)"}


def fsc_curve_from_postprocess(path) -> tuple[list[float], list[float]]:
    """Frequencies (1/Å, 0 at the origin) and the mask-corrected FSC of a postprocess-style STAR file."""
    import numpy as np
    from tomoctfrefine.io.fsc import read_fsc

    curve = read_fsc(path)
    resolution = np.asarray(curve.resolution_angstrom, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        frequency = np.where(np.isfinite(resolution) & (resolution > 0), 1.0 / resolution, 0.0)
    return [float(f) for f in frequency], [float(v) for v in curve.fsc]


#: The engine validator names command-line flags; the form shows its labels instead.
FORM_LABELS = {"--b": "Box size for estimation"}


def _form_message(problem) -> str:
    """An engine ``Problem`` in the form's words (flag -> form label)."""
    label = FORM_LABELS.get(problem.key)
    if label is None:
        return str(problem)
    fix = problem.fix.replace(f" ({problem.key})", "")
    return f"{label}: {problem.message}" + (f"; {fix}" if fix else "")


def _smallest_tilt_image_px(opt) -> int | None:
    """Smallest side (px) of the tilt-series stacks an optimisation set names (None if unknown)."""
    from tomoctfrefine.io.maps import read_map_header
    from tomoctfrefine.io.paths import resolve_path
    from tomoctfrefine.io.star import read_star

    tomograms = opt.resolved("tomograms_path")
    table = read_star(tomograms).blocks.get("global")
    if table is None or "rlnTomoTiltSeriesName" not in table:
        return None
    sides = [min(read_map_header(resolve_path(name, [tomograms.parent])).shape[1:])
             for name in table["rlnTomoTiltSeriesName"]]
    return min(sides) if sides else None


def _mrc_path(path: str) -> str:
    """A Scipion file name without its ``:mrc`` format suffix."""
    return path.split(":")[0] if path.endswith((":mrc", ":mrcs")) else path
