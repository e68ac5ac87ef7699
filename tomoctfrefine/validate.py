"""Input validation shared by ``check`` and ``refine``: every problem at once, before any heavy work.

:func:`inspect_inputs` reads everything an optimisation set names (STAR files fully, MRC files by
their headers; the data only of maps and stacks small enough to scan for NaN quickly) and returns an
:class:`InputReport`: a summary (counts, dose range, pixel sizes, reference) and the list of
:class:`~tomoctfrefine.errors.Problem`. :func:`validate_inputs` returns just the problems; callers raise
``InputError(problems)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, Problem
from .io import particles as particles_io
from .io import tomograms as tomograms_io
from .io.fsc import read_fsc
from .io.maps import read_map_header
from .io.optimisation_set import KEYS, OptimisationSet
from .io.star import non_finite_columns
from .io.trajectories import read_trajectories

#: Files up to this size are read whole to look for NaN/inf (larger ones: header and size only).
NAN_SCAN_MAX_BYTES = 256 * 1024 * 1024
OPTICS_TOLERANCE = 1e-3
PIXEL_SIZE_RELATIVE_TOLERANCE = 1e-3


@dataclass
class TomogramSummary:
    """What ``check`` prints for one tomogram."""

    name: str
    tilt_count: int
    dose_min_e_per_angstrom2: float
    dose_max_e_per_angstrom2: float
    pixel_size_angstrom: float
    particle_count: int = 0
    half_set_counts: tuple = (0, 0)


@dataclass
class InputReport:
    """Everything :func:`inspect_inputs` found.

    ``tomogram_set`` and ``particle_set`` are the objects read (None if unreadable), so that callers do
    not read them twice.
    """

    problems: list = field(default_factory=list)
    tomograms: list = field(default_factory=list)
    particle_count: int = 0
    half_set_counts: tuple = (0, 0)
    optics_groups: list = field(default_factory=list)
    reference_box_px: int | None = None
    reference_pixel_size_angstrom: float | None = None
    mask_present: bool = False
    fsc_present: bool = False
    trajectories_present: bool = False
    tomogram_set: object = None
    particle_set: object = None

    def summary_lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        lines = [f"tomograms: {len(self.tomograms)}"]
        for t in self.tomograms:
            lines.append(
                f"  {t.name}: {t.tilt_count} tilts, dose {t.dose_min_e_per_angstrom2:g}-{t.dose_max_e_per_angstrom2:g} e/Å², "
                f"pixel {t.pixel_size_angstrom:g} Å, {t.particle_count} particles (half sets {t.half_set_counts[0]}/{t.half_set_counts[1]})"
            )
        if self.tomograms:
            tilts = sorted({t.tilt_count for t in self.tomograms})
            lines.append("tilts per tomogram: " + ("-".join(str(v) for v in (tilts[0], tilts[-1])) if len(tilts) > 1 else str(tilts[0])))
            lines.append(
                f"dose range: {min(t.dose_min_e_per_angstrom2 for t in self.tomograms):g}-"
                f"{max(t.dose_max_e_per_angstrom2 for t in self.tomograms):g} e/Å²"
            )
            pixels = sorted({t.pixel_size_angstrom for t in self.tomograms})
            lines.append("tilt-series pixel size: " + ", ".join(f"{p:g}" for p in pixels) + " Å")
        lines.append(f"particles: {self.particle_count}")
        lines.append(f"half sets: {self.half_set_counts[0]}/{self.half_set_counts[1]}")
        lines.append("optics groups: " + (", ".join(f"{n} ({name}, {p:g} Å)" if p else f"{n} ({name})" for n, name, p in self.optics_groups) or "none"))
        if self.reference_box_px is not None:
            lines.append(f"reference: {self.reference_box_px} px, {self.reference_pixel_size_angstrom:g} Å/px")
        else:
            lines.append("reference: none readable")
        lines.append(f"mask: {'present' if self.mask_present else 'none'}")
        lines.append(f"FSC: {'present' if self.fsc_present else 'none'}")
        lines.append(f"trajectories: {'present' if self.trajectories_present else 'none'}")
        return lines


class _Collector:
    """Builds problems that name where a path came from (the optimisation set key, or a flag)."""

    def __init__(self, opt: OptimisationSet, flag_names: dict | None):
        self.opt = opt
        self.flags = flag_names or {}
        self.problems: list[Problem] = []

    def origin(self, field_name: str) -> tuple[str, str]:
        if field_name in self.opt.overridden:
            return "command line", self.flags.get(field_name, KEYS[field_name])
        return (str(self.opt.source_path) if self.opt.source_path else "command line"), KEYS[field_name]

    def entry(self, field_name: str, message: str, fix: str) -> None:
        file, key = self.origin(field_name)
        self.problems.append(Problem(file, message, fix, key))

    def add(self, problem: Problem) -> None:
        self.problems.append(problem)

    def extend(self, error: InputError, key: str = "") -> None:
        for p in error.problems:
            self.problems.append(Problem(p.file, p.message, p.fix, p.key or key))

    def how_to_give(self, field_name: str) -> str:
        flag = self.flags.get(field_name)
        return f"add {KEYS[field_name]} to the optimisation set" + (f" or give {flag}" if flag else "")


def _find(opt: OptimisationSet, col: _Collector, field_name: str, required: bool) -> Path | None:
    value = getattr(opt, field_name)
    if value is None:
        if required:
            col.entry(field_name, f"no {_LABELS[field_name]} given", col.how_to_give(field_name))
        return None
    path = opt.resolved(field_name)
    if not path.exists():
        col.entry(field_name, f"{_LABELS[field_name]} not found: {value}", "correct the path (relative paths are read from the working directory)")
        return None
    return path


_LABELS = {
    "particles_path": "particles file",
    "tomograms_path": "tomograms file",
    "trajectories_path": "trajectories file",
    "ref1_path": "reference half map 1",
    "ref2_path": "reference half map 2",
    "mask_path": "reference mask",
    "fsc_path": "FSC file",
}


#: Columns the engine reads as numbers (a text value there would stop the run late).
NUMERIC_COLUMNS = (
    *tomograms_io.SIZE, tomograms_io.HAND, tomograms_io.PIXEL_SIZE, tomograms_io.VOLTAGE, tomograms_io.CS,
    tomograms_io.Q0, tomograms_io.FRACTIONAL_DOSE, tomograms_io.DOSE_BFACTOR, tomograms_io.DEFOCUS_SLOPE,
    tomograms_io.FRAME_COUNT, *tomograms_io.ANGLES, *tomograms_io.SHIFTS, tomograms_io.DEFOCUS_U,
    tomograms_io.DEFOCUS_V, tomograms_io.DEFOCUS_ANGLE, tomograms_io.SCALE, tomograms_io.BFACTOR,
    tomograms_io.PHASE_SHIFT, tomograms_io.PRE_EXPOSURE, particles_io.OPTICS_GROUP, particles_io.HALF_SET,
    *particles_io.CENTRED, *particles_io.COORDINATES, *particles_io.ORIGIN, *particles_io.ANGLES,
    *particles_io.SUBTOMO_ANGLES,
)


def _non_numeric(col: _Collector, table, file, block: str) -> bool:
    """Report text in columns read as numbers; True if there was any."""
    found = False
    for column in table.columns:
        if column not in NUMERIC_COLUMNS or table[column].dtype.kind in "biuf":
            continue
        for row, value in enumerate(table[column].tolist()):
            try:
                float(value)
            except (TypeError, ValueError):
                col.add(Problem(str(file), f"data_{block} has a non-numeric value in {column} (row {row + 1}: {str(value)!r})", "write a number there", column))
                found = True
                break
    return found


def _non_finite(col: _Collector, table, file, block: str) -> None:
    for column, count in non_finite_columns(table):
        col.add(Problem(str(file), f"data_{block} has {count} NaN or infinite value{'s' if count > 1 else ''} in {column}", "repair or remove those rows", column))


def _scan_map(col: _Collector, field_name: str, path: Path, header) -> None:
    if header.file_size_bytes > NAN_SCAN_MAX_BYTES or not header.size_matches:
        return
    data = np.memmap(path, dtype=header.dtype, mode="r", offset=header.data_offset_bytes, shape=header.shape)
    count = int((~np.isfinite(data)).sum()) if np.issubdtype(header.dtype, np.floating) else 0
    if count:
        col.entry(field_name, f"{_LABELS[field_name]} {path} has {count} NaN or infinite voxel{'s' if count > 1 else ''}", "repair the map")


def _check_maps(opt: OptimisationSet, col: _Collector, report: InputReport, tilt_pixel_sizes: list, box_size_px) -> None:
    headers = {}
    for field_name, required in (("ref1_path", True), ("ref2_path", True), ("mask_path", False)):
        path = _find(opt, col, field_name, required)
        if path is None:
            continue
        try:
            header = read_map_header(path)
        except InputError as error:
            file, key = col.origin(field_name)
            for p in error.problems:
                col.add(Problem(p.file, p.message, p.fix, key))
            continue
        if np.issubdtype(header.dtype, np.complexfloating):
            col.entry(field_name, f"{_LABELS[field_name]} {path} holds complex numbers ({header.dtype})", "give a real-space map (MRC mode 2)")
            continue
        if not header.size_matches:
            col.entry(field_name, f"{_LABELS[field_name]} {path} is shorter than its header says ({header.file_size_bytes} < {header.expected_size_bytes} bytes)", "the file is truncated: copy it again")
            continue
        headers[field_name] = header
        _scan_map(col, field_name, path, header)
    for field_name, header in headers.items():
        if len(set(header.shape)) != 1:
            col.entry(field_name, f"{_LABELS[field_name]} is not a cube ({header.shape[2]} x {header.shape[1]} x {header.shape[0]} px)", "give a cubic map")
    report.mask_present = "mask_path" in headers
    h1, h2 = headers.get("ref1_path"), headers.get("ref2_path")
    if h1 is not None and h2 is not None:
        if h1.shape != h2.shape:
            col.entry("ref2_path", f"half maps differ in shape ({h1.shape[2]} px vs {h2.shape[2]} px box)", "give the two half maps of one refinement")
        if abs(h1.voxel_size_angstrom - h2.voxel_size_angstrom) > PIXEL_SIZE_RELATIVE_TOLERANCE * h1.voxel_size_angstrom:
            col.entry("ref2_path", f"half maps differ in pixel size ({h1.voxel_size_angstrom:g} Å vs {h2.voxel_size_angstrom:g} Å)", "give the two half maps of one refinement")
    reference = h1 if h1 is not None else h2
    if reference is not None:
        report.reference_box_px = reference.shape[2]
        report.reference_pixel_size_angstrom = reference.voxel_size_angstrom
        field_name = "ref1_path" if h1 is not None else "ref2_path"
        for pixel in sorted(set(tilt_pixel_sizes)):
            if abs(reference.voxel_size_angstrom - pixel) > PIXEL_SIZE_RELATIVE_TOLERANCE * pixel:
                factor = reference.voxel_size_angstrom / pixel
                col.entry(
                    field_name,
                    f"reference pixel size {reference.voxel_size_angstrom:g} Å differs from the tilt-series pixel size {pixel:g} Å (factor {factor:g})",
                    f"the reference must be at bin 1: rescale it to {pixel:g} Å/px (a box {factor:g} times larger)",
                )
        mask = headers.get("mask_path")
        if mask is not None and mask.shape != reference.shape:
            col.entry("mask_path", f"mask box {mask.shape[2]} px differs from the reference box {reference.shape[2]} px", "give a mask made for these half maps")
        if box_size_px is not None and reference.shape[2] > box_size_px:
            col.entry(field_name, f"reference box {reference.shape[2]} px is larger than the refinement box {box_size_px} px", "use a refinement box at least as large as the reference")
    if box_size_px is not None and (box_size_px <= 0 or box_size_px % 2):
        col.add(Problem("command line", f"box size {box_size_px} px must be even and positive", "give an even box size"))


def _check_tilt_images(col: _Collector, tset, name: str, tilt_count: int, box_size_px=None) -> tuple[int, int] | None:
    """Check the tilt images of one tomogram; return their size (W, H) when readable."""
    size = _check_tilt_image_files(col, tset, name, tilt_count)
    if size is not None and box_size_px is not None and box_size_px > min(size):
        col.add(Problem("command line", f"refinement box {box_size_px} px is larger than the tilt images of {name} ({size[0]} x {size[1]} px)",
                        f"give a box of at most {min(size)} px (--b)", "--b"))
    return size


def _complex(col: _Collector, header, label: str, key: str) -> bool:
    if np.issubdtype(header.dtype, np.complexfloating):
        col.add(Problem(str(header.path), f"{label} holds complex numbers ({header.dtype}), not real pixel values", "give real-valued images (MRC mode 0, 1, 2, 6 or 12)", key))
        return True
    return False


def _check_tilt_image_files(col: _Collector, tset, name: str, tilt_count: int) -> tuple[int, int] | None:
    stack, micrographs = tomograms_io.image_paths(tset, name)
    where = str(tset.path)
    declared = tomograms_io.declared_frame_count(tset, name)
    if declared is not None and declared != tilt_count:
        col.add(Problem(where, f"tomogram {name}: {tomograms_io.FRAME_COUNT} says {declared} tilts but its table has {tilt_count}", "make them agree", tomograms_io.FRAME_COUNT))
    if stack is not None:
        if not stack.exists():
            col.add(Problem(where, f"tilt stack of {name} not found: {stack}", "correct the path (relative paths are read from the working directory)", tomograms_io.STACK))
            return None
        try:
            header = read_map_header(stack)
        except InputError as error:
            col.extend(error, tomograms_io.STACK)
            return None
        if _complex(col, header, f"tilt stack of {name}", tomograms_io.STACK):
            return None
        if header.shape[0] != tilt_count:
            col.add(Problem(str(stack), f"tilt stack of {name} has {header.shape[0]} slices but its tilt table has {tilt_count} rows", "give the stack that matches the tilt table", tomograms_io.STACK))
        if not header.size_matches:
            col.add(Problem(str(stack), f"tilt stack of {name} is shorter than its header says ({header.file_size_bytes} < {header.expected_size_bytes} bytes)", "the file is truncated: copy it again", tomograms_io.STACK))
            return header.shape[2], header.shape[1]
        if header.file_size_bytes <= NAN_SCAN_MAX_BYTES and np.issubdtype(header.dtype, np.floating):
            data = np.memmap(stack, dtype=header.dtype, mode="r", offset=header.data_offset_bytes, shape=header.shape)
            bad = ~np.isfinite(data).reshape(header.shape[0], -1).all(axis=1)
            if bad.any():
                col.add(Problem(str(stack), f"tilt stack of {name} has NaN or infinite pixels in tilt{'s' if bad.sum() > 1 else ''} {', '.join(str(i + 1) for i in np.flatnonzero(bad))}", "repair or exclude those tilts", tomograms_io.STACK))
        return header.shape[2], header.shape[1]
    if micrographs is not None:
        sizes = set()
        for path in micrographs:
            if not path.exists():
                col.add(Problem(str(tset.tilt_paths.get(name, where)), f"tilt image of {name} not found: {path}", "correct the path", tomograms_io.MICROGRAPH))
                continue
            try:
                header = read_map_header(path)
            except InputError as error:
                col.extend(error, tomograms_io.MICROGRAPH)
                continue
            if _complex(col, header, f"tilt image of {name}", tomograms_io.MICROGRAPH):
                continue
            sizes.add((header.shape[2], header.shape[1]))
            if header.shape[0] != 1:
                col.add(Problem(str(path), f"tilt image of {name} has {header.shape[0]} sections, expected one 2D image", "give one 2D MRC per tilt", tomograms_io.MICROGRAPH))
        if len(sizes) > 1:
            col.add(Problem(str(tset.tilt_paths.get(name, where)), f"tilt images of {name} differ in size", "give images of one size", tomograms_io.MICROGRAPH))
        return next(iter(sizes)) if len(sizes) == 1 else None
    return None


def inspect_inputs(opt: OptimisationSet, box_size_px: int | None = None, flag_names: dict | None = None) -> InputReport:
    """Read and check every input of a refinement; never raises for bad input.

    Parameters
    ----------
    opt : OptimisationSet
        The inputs (with any command-line overrides applied).
    box_size_px : int, optional
        The refinement box, if known (checked against the reference).
    flag_names : dict, optional
        Field name -> command-line flag, so problems in overridden paths name the flag.

    Returns
    -------
    InputReport
        Summary and every problem found.
    """
    col = _Collector(opt, flag_names)
    report = InputReport()
    tset = pset = None
    tomos: dict = {}

    path = _find(opt, col, "tomograms_path", True)
    if path is not None:
        try:
            tset = tomograms_io.read_tomogram_set(path)
        except InputError as error:
            col.extend(error, KEYS["tomograms_path"])
    if tset is not None:
        report.tomogram_set = tset
        column_problems = tomograms_io.missing_columns(tset)
        for p in column_problems:
            col.add(p)
        if _non_numeric(col, tset.global_table, tset.path, tomograms_io.GLOBAL_BLOCK):
            column_problems.append("non-numeric")
        _non_finite(col, tset.global_table, tset.path, tomograms_io.GLOBAL_BLOCK)
        names = tomograms_io.tomogram_names(tset)
        for name in sorted({n for n in names if names.count(n) > 1}):
            col.add(Problem(str(tset.path), f"tomogram name {name} appears {names.count(name)} times", "give each tomogram a unique name", tomograms_io.NAME))
        for name in dict.fromkeys(names):
            table = tset.tilt_tables[name]
            if _non_numeric(col, table, tset.tilt_paths.get(name, tset.path), name):
                column_problems.append("non-numeric")
            _non_finite(col, table, tset.tilt_paths.get(name, tset.path), name)
            size = _check_tilt_images(col, tset, name, len(table), box_size_px)
            pixel = tset.global_table.loc[tset.global_table[tomograms_io.NAME].astype(str) == name, tomograms_io.PIXEL_SIZE].iloc[0] \
                if tomograms_io.PIXEL_SIZE in tset.global_table.columns else 1.0
            try:
                if float(pixel) <= 0:
                    col.add(Problem(str(tset.path), f"tomogram {name} has pixel size {float(pixel):g} Å", "give the tilt-series pixel size in Å", tomograms_io.PIXEL_SIZE))
                    continue
            except (TypeError, ValueError):
                continue
            try:
                tomos[name] = tomograms_io.tomogram(tset, name, image_size=size or (0, 0))
            except (InputError, ValueError, KeyError, TypeError) as error:
                if not column_problems:
                    col.add(Problem(str(tset.tilt_paths.get(name, tset.path)), f"tomogram {name} cannot be used: {error}", "check its tables"))
        for name, tomo in tomos.items():
            if tomo.pixel_size_angstrom <= 0:
                col.add(Problem(str(tset.path), f"tomogram {name} has pixel size {tomo.pixel_size_angstrom:g} Å", "give the tilt-series pixel size in Å", tomograms_io.PIXEL_SIZE))
            report.tomograms.append(
                TomogramSummary(name, tomo.tilt_count, float(np.min(tomo.pre_exposure_e_per_angstrom2, initial=np.inf)),
                                float(np.max(tomo.pre_exposure_e_per_angstrom2, initial=-np.inf)), tomo.pixel_size_angstrom)
            )

    path = _find(opt, col, "particles_path", True)
    if path is not None:
        try:
            pset = particles_io.read_particle_set(path)
        except InputError as error:
            col.extend(error, KEYS["particles_path"])
    if pset is not None:
        report.particle_set = pset
        _check_particles(col, report, pset, tset, tomos)

    _check_maps(opt, col, report, [t.pixel_size_angstrom for t in tomos.values()], box_size_px)

    path = _find(opt, col, "fsc_path", False)
    if path is not None:
        try:
            curve = read_fsc(path)
            report.fsc_present = True
            if not np.all(np.isfinite(curve.fsc)):
                col.entry("fsc_path", f"FSC file {path} has NaN or infinite values", "give a complete postprocess.star")
        except InputError as error:
            col.extend(error, KEYS["fsc_path"])

    path = _find(opt, col, "trajectories_path", False)
    if path is not None:
        try:
            trajectories = read_trajectories(path)
            report.trajectories_present = True
            if pset is not None:
                _check_trajectories(col, path, trajectories, pset, tomos)
        except InputError as error:
            col.extend(error, KEYS["trajectories_path"])

    report.problems = col.problems
    return report


def _check_particles(col: _Collector, report: InputReport, pset, tset, tomos: dict) -> None:
    where = str(pset.path)
    column_problems = particles_io.missing_columns(pset)
    for p in column_problems:
        col.add(p)
    if len(pset.particles) == 0:
        col.add(Problem(where, "data_particles has no particles", "give the particles of the refinement (a RELION particles.star with rows)", "data_particles"))
    if _non_numeric(col, pset.optics, where, particles_io.OPTICS) | _non_numeric(col, pset.particles, where, particles_io.PARTICLES):
        column_problems = column_problems + ["non-numeric"]
    _non_finite(col, pset.optics, where, particles_io.OPTICS)
    _non_finite(col, pset.particles, where, particles_io.PARTICLES)
    report.particle_count = len(pset.particles)
    try:
        groups = particles_io.optics_groups(pset)
    except (TypeError, ValueError):  # NaN or text in data_optics, reported above
        return
    report.optics_groups = [(g.number, g.name, g.pixel_size_angstrom) for g in groups.values()]
    if column_problems:
        return
    halves = particles_io.half_sets(pset, np.arange(len(pset.particles)))
    report.half_set_counts = (int((halves == 1).sum()), int((halves == 2).sum()))
    invalid = np.flatnonzero((halves != 1) & (halves != 2))
    if len(invalid):
        col.add(Problem(where, f"{len(invalid)} particle{'s have' if len(invalid) > 1 else ' has'} a half set other than 1 or 2 (first at row {invalid[0] + 1})", "set the half set to 1 or 2", particles_io.HALF_SET))
    for half, count in zip((1, 2), report.half_set_counts):
        if count == 0 and len(pset.particles):
            col.add(Problem(where, f"half set {half} is empty", "assign particles to both half sets", particles_io.HALF_SET))
    numbers = particles_io.optics_group_numbers(pset, np.arange(len(pset.particles)))
    unknown_groups = sorted(set(numbers.tolist()) - set(groups))
    for number in unknown_groups:
        col.add(Problem(where, f"particles name optics group {number}, which data_optics does not define", "add the optics group or correct rlnOpticsGroup", particles_io.OPTICS_GROUP))
    if tset is None:
        return
    known = set(tomograms_io.tomogram_names(tset))
    for name in particles_io.tomogram_names_of_particles(pset):
        rows = particles_io.particles_of(pset, name)
        if name not in known:
            col.add(Problem(where, f"{len(rows)} particle{'s name' if len(rows) > 1 else ' names'} tomogram {name}, which is not in {tset.path}", "remove them or add the tomogram", particles_io.TOMO_NAME))
            continue
        tomo = tomos.get(name)
        if tomo is None:
            continue
        for summary in report.tomograms:
            if summary.name == name:
                summary.particle_count = len(rows)
                h = halves[rows]
                summary.half_set_counts = (int((h == 1).sum()), int((h == 2).sum()))
        for number in sorted(set(numbers[rows].tolist()) & set(groups)):
            _compare_optics(col, where, groups[number], tomo, tset)
        if tomo.pixel_size_angstrom <= 0:
            continue
        try:
            positions = particles_io.particle_positions_px(pset, rows, tomo)
        except (ValueError, KeyError) as error:
            col.add(Problem(where, f"positions of the particles of {name} cannot be computed: {error}", "check the coordinate columns"))
            continue
        size = np.asarray(tomo.size_px, dtype=float)
        finite = np.all(np.isfinite(positions), axis=1)
        outside = np.flatnonzero(finite & ~np.all((positions >= 0) & (positions < size[None, :]), axis=1))
        if len(outside):
            first = rows[outside[0]]
            px = positions[outside[0]]
            col.add(Problem(
                where,
                f"{len(outside)} particle{'s' if len(outside) > 1 else ''} of {name} {'lie' if len(outside) > 1 else 'lies'} outside the tomogram "
                f"({tomo.size_px[0]} x {tomo.size_px[1]} x {tomo.size_px[2]} px); first at row {first + 1}, ({px[0]:.1f}, {px[1]:.1f}, {px[2]:.1f}) px",
                "check the coordinates, the pixel size and the tomogram size",
                particles_io.CENTRED[0] if set(particles_io.CENTRED) <= set(pset.particles.columns) else particles_io.COORDINATES[0],
            ))


def _compare_optics(col: _Collector, where: str, group, tomo, tset) -> None:
    pairs = (
        (particles_io.VOLTAGE, "voltage", group.voltage_kv, tomo.optics.voltage_kv, "kV"),
        (particles_io.CS, "spherical aberration", group.spherical_aberration_mm, tomo.optics.spherical_aberration_mm, "mm"),
        (particles_io.Q0, "amplitude contrast", group.amplitude_contrast, tomo.optics.amplitude_contrast, ""),
    )
    for key, label, particle_value, tomogram_value, unit in pairs:
        if particle_value is not None and abs(particle_value - tomogram_value) > OPTICS_TOLERANCE:
            unit = f" {unit}" if unit else ""
            col.add(Problem(where, f"optics group {group.number} {label} {particle_value:g}{unit} differs from tomogram {tomo.name}'s {tomogram_value:g}{unit}", "make the particle and tomogram optics agree", key))
    pixel = group.pixel_size_angstrom
    if pixel is not None and abs(pixel - tomo.pixel_size_angstrom) > PIXEL_SIZE_RELATIVE_TOLERANCE * tomo.pixel_size_angstrom:
        col.add(Problem(where, f"optics group {group.number} pixel size {pixel:g} Å differs from tomogram {tomo.name}'s {tomo.pixel_size_angstrom:g} Å", "make the particle and tomogram pixel sizes agree", particles_io.PIXEL_SIZE))


def _check_trajectories(col: _Collector, path: Path, trajectories: dict, pset, tomos: dict) -> None:
    missing = 0
    first_missing = None
    for name, tomo in tomos.items():
        rows = particles_io.particles_of(pset, name)
        for particle in particles_io.particle_names(pset, rows):
            shifts = trajectories.get(particle)
            if shifts is None:
                missing += 1
                first_missing = first_missing or particle
            elif len(shifts) != tomo.tilt_count:
                col.add(Problem(str(path), f"trajectory of {particle} has {len(shifts)} tilts, tomogram {name} has {tomo.tilt_count}", "give the trajectories made for this tilt series"))
    if missing:
        col.add(Problem(str(path), f"{missing} particle{'s have' if missing > 1 else ' has'} no trajectory (first: {first_missing})", "give the trajectories made for these particles"))


def validate_inputs(opt: OptimisationSet, box_size_px: int | None = None, flag_names: dict | None = None) -> list[Problem]:
    """Every problem in the inputs of a refinement (empty when they are usable).

    Callers raise ``InputError(problems)`` when the list is not empty.
    """
    return inspect_inputs(opt, box_size_px, flag_names).problems
