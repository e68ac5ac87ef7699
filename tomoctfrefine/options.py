"""What a refinement does: :class:`RefineOptions`, written once.

Each field declares, in its ``metadata`` (see :func:`option`), everything the three front ends need:

* the RELION flag (``relion_tomo_refine_ctf``'s name, or ours where RELION has none), its help text and the
  group RELION's ``--help`` lists it under: :mod:`tomoctfrefine.cli.refine` builds its parser, ``--help`` (with
  defaults) and the translation from flags to options from it;
* its validation: :func:`option_problems` checks every field with it and names the flag, the field or the form
  label, depending on who asks;
* its place in the Scipion form (:data:`FORM`): the protocol builds its Defocus, Scale, Aberrations and
  Assessment sections and its ``refineOptions()`` from it.

A flag is declared only for a field the engine implements: there is no parsed-and-ignored flag.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import Problem

Check = Callable[[Any], "str | None"]


def option(default: Any, flag: str | None, help: str, group: str, *, check: Check | None = None,
           kind: str = "value", values: dict | None = None, affects_results: bool = True, fix: str = "",
           noun: str = "") -> Any:
    """A :class:`RefineOptions` field with its flag, help, help group and validation.

    Parameters
    ----------
    default :
        The field's default (RELION's, where RELION has the flag).
    flag : str or None
        The command-line flag; None for an option of the Python API only.
    help, group :
        ``--help`` text and section.
    check : callable, optional
        ``check(value)`` returns what is wrong with a value (None when it is fine).
    kind : {"value", "switch", "inverted_switch", "choice"}
        How the flag sets the field: ``--flag X``; ``--flag`` sets True; ``--flag`` sets False; for a choice,
        ``values`` maps each value but the default to its own switch.
    affects_results : bool
        False for options that cannot change what is written (threads, resuming): a resumed run may change them.
    fix : str
        What to do when ``check`` fails.
    noun : str
        What the value is, in words ("the box size"): the subject of ``check``'s message.
    """
    return field(default=default, metadata=dict(flag=flag, help=help, group=group, check=check, kind=kind,
                                                values=values or {}, affects_results=affects_results, fix=fix,
                                                noun=noun))


def _finite(value) -> str | None:
    return None if isinstance(value, (int, float)) and math.isfinite(value) else f"must be a finite number, got {value}"


def _at_least(minimum: float, integer: bool = False) -> Check:
    def check(value):
        if integer and (isinstance(value, bool) or not isinstance(value, int)):
            return f"must be a whole number, got {value!r}"
        problem = _finite(value)
        if problem:
            return problem
        return None if value >= minimum else f"must be at least {minimum:g}, got {value:g}"
    return check


def _one_of(allowed: tuple) -> Check:
    def check(value):
        return None if value in allowed else f"must be one of {', '.join(str(a) for a in allowed)}, got {value!r}"
    return check


def _whole(value) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) else f"must be a whole number, got {value!r}"


def _fraction(value) -> str | None:
    return _finite(value) or (None if 0 <= value < 1 else f"must lie in [0, 1), got {value:g}")


def _box(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be a whole number of pixels, got {value!r}"
    if value < 16 or value % 2:
        return f"must be an even number of pixels, at least 16, got {value}"
    return None


def _magnitude(limit: float) -> Check:
    def check(value):
        problem = _finite(value)
        if problem:
            return problem
        return None if abs(value) <= limit else f"must lie within ±{limit:g}, got {value:g}"
    return check


DEFOCUS = "Defocus refinement options"
SCALE = "Scale estimation options"
ABERRATIONS = "Aberration refinement options"
REFERENCE = "Reference map"
COMPUTE = "Computational options"
OURS = "tomoctfrefine's own options"


@dataclass(frozen=True)
class RefineOptions:
    """What to refine and how: RELION's flags, named for their meaning, with RELION's defaults.

    The RELION-5 tutorial's settings are ``box_size_px=512, do_defocus=True, regularise_defocus=True,
    regularisation_lambda=0.1, do_scale=True, scale_mode="per_frame"``. ``regularisation_lambda`` is
    dimensionless here: 1 pulls a tilt towards the tomogram's common value as strongly as an average tilt's own
    data pull it (RELION's depends on the box size and the particle count). Every field's flag, help and
    validation are in its metadata (module docstring).
    """

    box_size_px: int = option(None, "--b", "Box size to be used for the estimation (px, even; required)", COMPUTE,
                              check=_box, fix="use an even box such as 128, 256 or 512", noun="the box size")
    do_defocus: bool = option(False, "--do_defocus", "Refine the (astigmatic) defocus of every tilt", DEFOCUS, kind="switch")
    defocus_scan_min_angstrom: float = option(-3000.0, "--d0", "Lowest defocus offset of the scan (Å)", DEFOCUS,
                                              check=_magnitude(1e5), fix="scan a range such as -3000 to 3000 Å", noun="the lowest defocus offset")
    defocus_scan_max_angstrom: float = option(3000.0, "--d1", "Highest defocus offset of the scan (Å)", DEFOCUS,
                                              check=_magnitude(1e5), fix="scan a range such as -3000 to 3000 Å", noun="the highest defocus offset")
    defocus_scan_steps: int = option(100, "--ds", "Number of defocus offsets scanned, both ends included", DEFOCUS,
                                     check=_at_least(2, integer=True), fix="use e.g. 100", noun="the number of scan samples")
    regularise_defocus: bool = option(False, "--do_reg_defocus", "Regularise the defocus: pull every tilt's defocus and "
                                      "astigmatism towards the tomogram's common value (see --reg_astigmatism_only)",
                                      DEFOCUS, kind="switch")
    regularisation_lambda: float = option(0.001, "--lambda", "Regularisation strength (dimensionless: 1 pulls a tilt "
                                          "as strongly as an average tilt's own data)", DEFOCUS, check=_at_least(0.0),
                                          fix="use e.g. 0.1", noun="the regularisation strength")
    regularise_astigmatism_only: bool = option(False, "--reg_astigmatism_only", "With --do_reg_defocus, pull only the "
                                               "astigmatism towards the common value and leave each tilt's mean defocus "
                                               "free (tomoctfrefine's choice; RELION pulls both)", DEFOCUS, kind="switch")
    reset_to_common: bool = option(False, "--reset_to_common", "With --do_reg_defocus, start every tilt from the CTF of "
                                   "the tilt with the lowest dose", DEFOCUS, kind="switch")
    kmin_angstrom: float = option(30.0, "--kmin", "Lowest spatial frequency used by the defocus scan and fit (Å)", DEFOCUS,
                                  check=_at_least(0.0), fix="use e.g. 30", noun="the lowest resolution")
    do_scale: bool = option(False, "--do_scale", "Refine the contrast scale of every tilt", SCALE, kind="switch")
    scale_mode: str = option("global", None, "Scale model: one per tilt, Beer-Lambert per tomogram, or Beer-Lambert "
                             "with one luminance for all tomograms (neither flag)", SCALE, kind="choice",
                             values={"per_frame": "--per_frame_scale", "per_tomogram": "--per_tomogram_scale"},
                             check=_one_of(("per_frame", "per_tomogram", "global")), fix="use per_frame, per_tomogram or global", noun="the scale model")
    model_neighbours: bool = option(True, "--no_neighbour_model", "Fit the scale without modelling the neighbouring "
                                    "particles in each box (faster, as RELION; their signal then counts as noise)",
                                    SCALE, kind="inverted_switch")
    do_even_aberrations: bool = option(False, "--do_even_aberrations", "Refine the symmetric (even) aberrations",
                                       ABERRATIONS, kind="switch")
    even_order: int = option(4, "--ne", "Highest even Zernike order (2, 4, 6 or 8)", ABERRATIONS,
                             check=_one_of((2, 4, 6, 8)), fix="use 4", noun="the even aberration order")
    do_odd_aberrations: bool = option(False, "--do_odd_aberrations", "Refine the antisymmetric (odd) aberrations",
                                      ABERRATIONS, kind="switch")
    odd_order: int = option(3, "--no", "Highest odd Zernike order (1, 3, 5 or 7)", ABERRATIONS,
                            check=_one_of((1, 3, 5, 7)), fix="use 3", noun="the odd aberration order")
    freq_cutoff_angstrom: float = option(-1.0, "--freq_cutoff", "Highest resolution used (Å); 0 or negative: up to where "
                                         "the FSC falls below 0.143", REFERENCE, check=_finite, fix="give e.g. 4, or -1", noun="the frequency cutoff")
    fsc_threshold_width_px: float = option(5.0, "--fsc_thresh_width", "Width of the cosine fall-off after the frequency "
                                           "cutoff (Fourier px)", REFERENCE, check=_at_least(0.0), fix="use e.g. 5", noun="the cutoff's fall-off width")
    use_snr_weight: bool = option(False, "--use_SNR_weight", "Weight each frequency by the reference's SNR (from the FSC)",
                                  REFERENCE, kind="switch")
    per_frame_noise: bool = option(False, "--per_frame_noise", "Estimate the noise spectrum of each tilt separately",
                                   COMPUTE, kind="switch")
    min_frame: int = option(0, "--min_frame", "First tilt to refine (index in the tilt table, from 0)", COMPUTE,
                            check=_at_least(0, integer=True), fix="use 0 or more", noun="the first tilt")
    max_frame: int = option(-1, "--max_frame", "Last tilt to refine (index; 0 or negative: the last one)", COMPUTE,
                            check=_whole, fix="use -1 for all tilts", noun="the last tilt")
    cutoff_fraction: float = option(0.02, "--cutoff_fract", "Leave out, row by row, the frequencies beyond the last one "
                                    "whose noise weight (relative to the tilt's mean) and dose weight both exceed this",
                                    COMPUTE, check=_fraction, fix="use e.g. 0.02", noun="the cutoff fraction")
    threads: int = option(6, "--j", "Number of threads (per MPI rank)", COMPUTE, check=_at_least(1, integer=True),
                          affects_results=False, fix="use 1 or more", noun="the thread count")
    only_do_unfinished: bool = option(False, "--only_do_unfinished", "Resume: keep what an earlier run with the same "
                                      "inputs and options finished, redo the rest", COMPUTE, kind="switch",
                                      affects_results=False)
    diagnostics: bool = option(False, "--diag", "Write RELION's diagnostic files: per tomogram the defocus scan's cost "
                               "(temp/defocus/<tomo>_dataTerm.mrc) and the raw and fitted scales "
                               "(temp/scale/<tomo>_raw_scale.dat, <tomo>_fitted_scale.dat)", COMPUTE, kind="switch",
                               affects_results=False)
    assess: bool = option(False, "--assess", "Reconstruct the particle with the input and the refined CTF and report "
                          "the FSC gain", OURS, kind="switch", affects_results=False)
    check_hand: bool = option(True, "--no_hand_check", "Do not compare the fit of the two defocus hands", OURS,
                              kind="inverted_switch")
    adopt_hand: bool = option(True, "--keep_hand", "Keep the input defocus hand even when the data decisively prefer the "
                              "opposite one (default: adopt it, write it as rlnTomoHand and say so)", OURS,
                              kind="inverted_switch")

    @property
    def do_aberrations(self) -> bool:
        return self.do_even_aberrations or self.do_odd_aberrations

    @property
    def regularised_components(self) -> str:
        """What the defocus regularisation pulls together (``refine.defocus.refine_defocus``'s argument)."""
        return "astigmatism" if self.regularise_astigmatism_only else "all"

    def replace(self, **changes) -> "RefineOptions":
        return dataclasses.replace(self, **changes)

    def fingerprint(self, names=None) -> str:
        """Hash of the options that change results (all of them, or those in ``names``)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.metadata["affects_results"] and (names is None or f.name in names)}
        return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: dict) -> "RefineOptions":
        """Options from a dict of field names, refusing names that are not fields (a typo would go unnoticed)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"RefineOptions has no field(s) {', '.join(unknown)}")
        return cls(**values)


def fields() -> tuple:
    """The fields of :class:`RefineOptions`, in their order."""
    return dataclasses.fields(RefineOptions)


def flag_of(name: str) -> str:
    """The flag that sets field ``name`` (for a choice: its switches), else the field's name."""
    meta = next(f for f in fields() if f.name == name).metadata
    if meta["kind"] == "choice":
        return "/".join(meta["values"].values())
    return meta["flag"] or name


# ----------------------------------------------------------------------------------------------
# Validation


def option_problems(options: RefineOptions, naming: str = "flag", labels: dict | None = None) -> list[Problem]:
    """Everything wrong with ``options`` on their own (nothing about the inputs).

    Parameters
    ----------
    naming : {"flag", "field", "form"}
        How problems name an option: its flag (the CLI), its field (the Python API) or its form label (Scipion;
        ``labels`` maps field names to labels, as :data:`FORM` gives them).
    """
    problems: list[Problem] = []

    def name(field_name: str) -> str:
        if naming == "form" and labels and field_name in labels:
            return labels[field_name]
        return flag_of(field_name) if naming == "flag" else field_name

    def add(field_name: str, message: str, fix: str, *more: str) -> None:
        where = "/".join(name(n) for n in (field_name, *more))
        problems.append(Problem("RefineOptions" if naming == "field" else where, message, fix,
                                where if naming == "field" else ""))

    for f in fields():
        value = getattr(options, f.name)
        if f.name == "scale_mode" and value == "both":
            add(f.name, "the per-frame and per-tomogram scale models exclude each other", "choose one of them")
            continue
        if f.name == "box_size_px" and value is None:
            add(f.name, "the estimation box size is required", "give it, e.g. 256")
            continue
        check = f.metadata["check"]
        message = check(value) if check else None
        if message:
            add(f.name, f"{f.metadata['noun']} {message}".strip(), f.metadata["fix"])
    if not problems:
        if options.do_defocus and not options.defocus_scan_min_angstrom < options.defocus_scan_max_angstrom:
            add("defocus_scan_min_angstrom",
                f"the defocus scan is empty: {options.defocus_scan_min_angstrom:g} Å is not below "
                f"{options.defocus_scan_max_angstrom:g} Å", "scan a range such as -3000 to 3000 Å",
                "defocus_scan_max_angstrom")
        if 0 < options.max_frame < options.min_frame:
            add("max_frame", f"the tilt range is empty: the last tilt {options.max_frame} is before the first "
                f"{options.min_frame}", "give a last tilt at or after the first, or -1 for all")
        if options.reset_to_common and not (options.do_defocus and options.regularise_defocus):
            add("reset_to_common", "resetting to the common CTF needs a regularised defocus refinement",
                "add --do_defocus --do_reg_defocus, or leave it out")
    return problems


# ----------------------------------------------------------------------------------------------
# The Scipion form (read by tomoctfrefine.protocols; no Scipion import here)


@dataclass(frozen=True)
class FormParam:
    """One parameter of the protocol's form and the option fields it sets.

    ``kind`` is ``bool``, ``int``, ``float`` or ``enum`` (``choices``); ``to_options(value)`` gives the fields it
    sets (default: ``{fields[0]: value}``); ``default`` is derived from the options' defaults unless given.
    """

    name: str
    section: str
    label: str
    help: str
    kind: str
    fields: tuple
    default: Any = None
    condition: str = ""
    expert: bool = False
    choices: tuple = ()
    minimum: float | None = None
    to_options: Callable[[Any], dict] | None = None

    def options(self, value) -> dict:
        if self.to_options is not None:
            return self.to_options(value)
        if self.kind == "enum":
            value = self.choices[int(value)]
        return {self.fields[0]: value}


def _default(name: str) -> Any:
    return next(f for f in fields() if f.name == name).default


def _scale_mode(per_frame: bool, per_tomogram: bool) -> str:
    return "per_frame" if per_frame else "per_tomogram" if per_tomogram else "global"


FORM: tuple[FormParam, ...] = (
    FormParam("boxSize", "Defocus", "Box size for estimation (px, bin 1)",
              "Side of the square boxes cut around each particle in each tilt image, in tilt-series pixels (bin 1). "
              "RELION-5's tutorial uses 512; it must hold the particle and the CTF's delocalisation and fit in the tilt "
              "images. The values found do not depend on it. Wizard: from the particle diameter.",
              "int", ("box_size_px",), default=512, minimum=16),
    FormParam("refineDefocus", "Defocus", "Refine defocus?", "Refine U, V and the astigmatism angle of every tilt.",
              "bool", ("do_defocus",), default=True),
    FormParam("defocusRange", "Defocus", "Defocus search range (± Å)",
              "The first scan tests offsets from -range to +range Å around the input defocus (RELION's --d0 -R --d1 R). "
              "Wizard: from the spread of the input CTFs.", "float",
              ("defocus_scan_min_angstrom", "defocus_scan_max_angstrom"), default=3000.0, condition="refineDefocus",
              minimum=1.0, to_options=lambda r: {"defocus_scan_min_angstrom": -float(r), "defocus_scan_max_angstrom": float(r)}),
    FormParam("defocusSteps", "Defocus", "Defocus scan samples", "Number of offsets tested in the scan (RELION's --ds).",
              "int", ("defocus_scan_steps",), condition="refineDefocus", expert=True, minimum=2),
    FormParam("doDefocusReg", "Defocus", "Do defocus regularisation?",
              "Pull each tilt's defocus and astigmatism towards the tomogram's common value, weighted by how well the "
              "data determine it (RELION's --do_reg_defocus).", "bool", ("regularise_defocus",), default=True,
              condition="refineDefocus"),
    FormParam("regParam", "Defocus", "Defocus regularisation lambda (dimensionless)",
              "Strength of the regularisation (RELION's --lambda): 1 pulls a tilt as strongly as an average tilt's own "
              "data; 0.1 in RELION-5's tutorial.", "float", ("regularisation_lambda",), default=0.1,
              condition="refineDefocus and doDefocusReg", minimum=0.0),
    FormParam("regAstigmatismOnly", "Defocus", "Regularise the astigmatism only?",
              "Yes: only the astigmatism is pulled together and each tilt's mean defocus stays free (tomoctfrefine's "
              "choice, --reg_astigmatism_only). No: both, as RELION does.", "bool", ("regularise_astigmatism_only",),
              condition="refineDefocus and doDefocusReg", expert=True),
    FormParam("resetToCommon", "Defocus", "Start from the lowest-dose tilt's CTF?",
              "Start every tilt from the CTF of the tilt with the lowest dose (RELION's --reset_to_common).", "bool",
              ("reset_to_common",), condition="refineDefocus and doDefocusReg", expert=True),
    FormParam("kMin", "Defocus", "Lowest resolution used (Å)", "Frequencies below 1/kMin are ignored (RELION's --kmin).",
              "float", ("kmin_angstrom",), expert=True, minimum=0.0),
    FormParam("adoptHand", "Defocus", "Adopt the defocus hand the data prefer?",
              "Every run compares the fit of both defocus hands. Yes: when the data decisively prefer the opposite hand, "
              "the refinement uses it and writes it (rlnTomoHand), saying so in the log and the summary. No: the input "
              "hand is kept and the verdict only reported (the CLI's --keep_hand).", "bool", ("adopt_hand",), expert=True),
    FormParam("refineContrast", "Scale", "Refine contrast scale?", "Refine the contrast scale of each tilt "
              "(rlnCtfScalefactor).", "bool", ("do_scale",), default=True),
    FormParam("refineScalePerFrame", "Scale", "Refine scale per frame?",
              "One free scale per tilt image. Exclusive with per tomogram; with neither, one Beer-Lambert ice model is "
              "fitted to all tomograms.", "bool", ("scale_mode",), default=True, condition="refineContrast",
              to_options=lambda v: {}),
    FormParam("refineScalePerTomo", "Scale", "Refine scale per tomogram?",
              "A Beer-Lambert ice model (luminance, thickness, ice normal) per tomogram. Exclusive with per frame.",
              "bool", ("scale_mode",), default=False, condition="refineContrast", to_options=lambda v: {}),
    FormParam("modelNeighbours", "Scale", "Model neighbouring particles?",
              "Render every particle at the refined CTF and remove the neighbours' signal from each box before the scale "
              "is fitted (and the defocus polished). About twice as precise a scale in crowded tomograms; No is RELION's "
              "way (faster).", "bool", ("model_neighbours",), condition="refineContrast", expert=True),
    FormParam("refineOddAbe", "Aberrations", "Refine odd aberrations?", "Odd Zernike terms (beam tilt, trefoil) per "
              "optics group.", "bool", ("do_odd_aberrations",)),
    FormParam("maxAbeOddOrder", "Aberrations", "Max order of odd aberrations (Zernike n)",
              "Highest radial order n of the odd Zernike polynomials; 3 is RELION's default.", "enum", ("odd_order",),
              default=0, choices=(3, 5, 7), condition="refineOddAbe"),
    FormParam("refineEvenAbe", "Aberrations", "Refine even aberrations?", "Even Zernike terms (spherical aberration, "
              "astigmatism corrections) per optics group.", "bool", ("do_even_aberrations",)),
    FormParam("maxAbeEvenOrder", "Aberrations", "Max order of even aberrations (Zernike n)",
              "Highest radial order n of the even Zernike polynomials; 4 is RELION's default.", "enum", ("even_order",),
              default=0, choices=(4, 6, 8), condition="refineEvenAbe"),
    FormParam("doAssess", "Assessment", "Assess: reconstruct before/after?",
              "After the refinement, reconstruct the particle from the tilt series twice, with the input CTF and with the "
              "refined one (same box, half sets and mask), and compare the mask-corrected gold-standard FSCs: "
              "resolution at FSC 0.143 before and after and the gain per frequency band (report, summary.json). Both "
              "FSCs become the output FSCs. It costs two particle reconstructions.", "bool", ("assess",)),
)


def form_default(param: FormParam) -> Any:
    """The form's default: the param's own, else the option's."""
    if param.default is not None:
        return param.default
    return _default(param.fields[0])


def options_from_form(values: dict, threads: int = 1) -> RefineOptions:
    """:class:`RefineOptions` from the form's values (``{param name: value}``; missing ones take their default)."""
    chosen: dict = {}
    get = lambda p: values.get(p.name, form_default(p))  # noqa: E731
    params = {p.name: p for p in FORM}
    for param in FORM:
        chosen.update(param.options(get(param)))
    if not get(params["refineDefocus"]):
        chosen["regularise_defocus"] = False
        chosen["reset_to_common"] = False
    per_frame, per_tomogram = bool(get(params["refineScalePerFrame"])), bool(get(params["refineScalePerTomo"]))
    # both: refused by option_problems, naming the two form labels
    chosen["scale_mode"] = "both" if per_frame and per_tomogram else _scale_mode(per_frame, per_tomogram)
    if not get(params["refineContrast"]):
        chosen["scale_mode"] = "per_frame"
    chosen["threads"] = max(1, int(threads))
    return RefineOptions(**chosen)


def form_labels() -> dict:
    """Field name -> form label (the first form parameter that sets it)."""
    labels: dict = {}
    for param in FORM:
        for name in param.fields:
            labels.setdefault(name, param.label)
    labels["scale_mode"] = "Refine scale per frame? / Refine scale per tomogram?"
    return labels
