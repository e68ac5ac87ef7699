"""README.rst's figures, made by the code: the demo's printed summary and the Benchmarks section.

README.rst holds generated blocks between two RST comments, ``.. begin: NAME`` and ``.. end: NAME``:

``demo``
    The summary lines ``tomoctfrefine demo`` prints (defocus error, hand check, the particle before and
    after) and the demo's run time, from a real run of the demo.
``forward_model``, ``accuracy``, ``map_accuracy``, ``relion_maps``, ``speed``
    The Benchmarks section's tables and every number of their prose, rendered from the results the
    benchmark scripts wrote: ``forward_model_results.json`` (``forward_model.py --json``),
    ``accuracy_results.txt``, ``map_accuracy_results.txt``, ``map_accuracy_relion_results.txt`` (the
    scripts' printed tables: read by their headers, an unknown header is an error, not a guess) and
    ``speed_results.json``.

    python benchmarks/readme.py demo             # run the demo (about a minute), write its block
    python benchmarks/readme.py tables           # render the benchmark blocks from the committed results
    python benchmarks/readme.py tables --check   # exit 1, showing the difference, if README.rst is not up to date

``tests/test_readme_figures.py`` checks that README's blocks equal what this script renders from the
committed results, and that README's demo block has the demo's current output format (numbers masked).

``speed_results.json``: ``{"date", "cores", "machine", "warm_up_s", "relion", "rows": [...]}`` ("machine",
"warm_up_s" and "relion", a sentence on how RELION's times were taken, are optional); each row has
``steps``, ``box``, ``parallel`` (or ``mode``: ``threads``/``mpi``/``single``) and any of ``wall_s``,
``cpu_s``, ``peak_mb``, ``load``, ``relion_wall_s`` (or ``relion_s``), ``relion_cpu_s``,
``relion_peak_mb`` (or ``relion_mb``); a column no row has is left out of the table.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = ROOT / "README.rst"
sys.path.insert(0, str(HERE))

BENCHMARK_BLOCKS = ("forward_model", "accuracy", "map_accuracy", "relion_maps", "speed")
#: The RELION build the side-by-side benchmarks ran (map_accuracy.py's docstring says how it was built).
RELION_BUILD = "RELION 5.0.1 at commit 73f0a3c0, CPU build"


# ----------------------------------------------------------------------------------------------
# Blocks between RST comments


def _marker_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.\. begin: {re.escape(name)}\n(.*?)^\.\. end: {re.escape(name)}$", re.S | re.M)


def block(text: str, name: str) -> str:
    """The text of README's block ``name`` (between its markers, without the blank lines around it)."""
    found = _marker_pattern(name).findall(text)
    if len(found) != 1:
        raise ValueError(f"README.rst: expected one block '.. begin: {name}' ... '.. end: {name}', found {len(found)}")
    return found[0].strip("\n") + "\n"


def replace_block(text: str, name: str, content: str) -> str:
    """``text`` with block ``name`` holding ``content`` (blank lines around it: a comment right after a
    paragraph would be read as part of it)."""
    block(text, name)  # exactly one
    content = content.strip("\n")
    return _marker_pattern(name).sub(lambda _: f".. begin: {name}\n\n{content}\n\n.. end: {name}", text)


def outside_blocks(text: str) -> str:
    """``text`` without its generated blocks (markers kept)."""
    return re.sub(r"^(\.\. begin: (\w+)\n).*?^(\.\. end: \2)$", r"\1\3", text, flags=re.S | re.M)


# ----------------------------------------------------------------------------------------------
# The demo

#: Lines of ``tomoctfrefine demo``'s output that are not its summary: progress and log lines (their
#: number depends on the machine's speed), the step headings, the per-tilt table (its rows change with
#: the dataset), and the closing lines (paths; the run time, which README gives in words). Every other
#: line is a summary line: a line the demo adds is one README must show too.
NOT_SUMMARY = (
    re.compile(r"^\s*$"),
    re.compile(r"^\s*\[\d\d:\d\d:\d\d\] "),
    re.compile(r"^\d+\. \S"),
    re.compile(r"^\S+: mean defocus \(Å\) and contrast scale per tilt$"),
    re.compile(r"^\s+tilt\s+dose \|"),
    re.compile(r"^\s*-?\d+\.\d\s+\d+ \|"),
    re.compile(r"^plots: "),
    re.compile(r"^demo finished in \d+ s$"),
)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def demo_summary(stdout: str) -> list[str]:
    """The summary lines of the demo's output (:data:`NOT_SUMMARY` says what is left out), unindented."""
    return [line.strip() for line in stdout.splitlines() if not any(p.search(line) for p in NOT_SUMMARY)]


def demo_seconds(stdout: str) -> int:
    found = re.findall(r"^demo finished in (\d+) s$", stdout, re.M)
    if len(found) != 1:
        raise ValueError("the demo's output has no 'demo finished in N s' line")
    return int(found[0])


def masked(line: str) -> str:
    """``line`` with every number replaced by ``#``: what the demo's output format is, whatever the noise."""
    return _NUMBER.sub("#", line)


def run_demo(folder: Path, numba_cache: Path | None = None) -> tuple[str, float]:
    """Run ``python -m tomoctfrefine demo`` in ``folder``; its stdout and the machine's 1-min load average
    at the start (the run time depends on it). ``numba_cache``: numba's cache folder (an empty one makes
    the run compile every kernel, as a first run after installation does)."""
    load = os.getloadavg()[0]
    env = dict(os.environ, MPLBACKEND="Agg", **({"NUMBA_CACHE_DIR": str(numba_cache)} if numba_cache else {}))
    result = subprocess.run([sys.executable, "-m", "tomoctfrefine", "demo", "--out", "demo"], cwd=folder, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"tomoctfrefine demo failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout, load


def render_demo(first: str, second: str, load: float, cores: int) -> str:
    """The demo block from the output of a first run (numba compiles the kernels) and a second one."""
    return wrap_prose(f"On {cores} cores (load average {load:.1f}), a first run took {demo_seconds(first)} s (numba compiles "
                      f"the kernels and caches them), a second {demo_seconds(second)} s, and ended with::") + "\n" + "".join(
        f"   {line}\n" for line in demo_summary(second))


def readme_demo_lines(text: str) -> list[str]:
    """The demo's lines as README shows them (the literal block of the demo block)."""
    content = block(text, "demo")
    literal = content.split("::\n\n", 1)
    if len(literal) != 2:
        raise ValueError("README.rst's demo block has no literal block ('::')")
    return [line.strip() for line in literal[1].splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# RST simple tables


def rst_table(header_rows: list[list[str]], body: list[list[str]]) -> str:
    """An RST simple table. A header row whose first cell is empty continues the one above it (docutils
    joins them); a body row must not start with an empty cell."""
    columns = len(header_rows[0])
    for row in header_rows + body:
        if len(row) != columns:
            raise ValueError(f"row {row} has {len(row)} cells, the table {columns}")
    for row in body:
        if not row[0].strip():
            raise ValueError(f"row {row}: an RST simple table's body row needs a first cell")
    widths = [max(1, *(len(row[i]) for row in header_rows + body)) for i in range(columns)]
    border = "  ".join("=" * width for width in widths)

    def line(row):
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()

    return "\n".join([border, *map(line, header_rows), border, *map(line, body), border]) + "\n"


def simple_table_problems(text: str) -> list[str]:
    """Where the RST simple tables of ``text`` would not parse as their borders say: a cell's text that
    crosses into a column gap (docutils' "Text in column margin") or a body row without a first cell."""
    problems = []
    lines = text.splitlines()
    border = re.compile(r"^=+( +=+)+$")
    index = 0
    while index < len(lines):
        if not border.match(lines[index]):
            index += 1
            continue
        spans = [m.span() for m in re.finditer(r"=+", lines[index])]
        seen, index = 0, index + 1
        while index < len(lines) and seen < 2:
            line = lines[index]
            if border.match(line):
                seen += 1
            elif line.strip():
                for (_, end), (start, _) in zip(spans, spans[1:]):
                    if line[end:start].strip():
                        problems.append(f"text in a column gap: {line!r}")
                if seen == 1 and not line[:spans[0][1]].strip():
                    problems.append(f"body row without a first cell: {line!r}")
            index += 1
    return problems


# ----------------------------------------------------------------------------------------------
# The benchmarks' printed tables


@dataclass
class PipeTable:
    """A table a benchmark printed: a header line, a line of dashes, rows of ``|``-separated segments."""
    context: str          # the last "<what>, dataset '<name>' -- ..." line above it ("" if none)
    header: str
    rows: list[list[str]] = field(default_factory=list)


def pipe_tables(text: str) -> list[PipeTable]:
    tables, context = [], ""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^(\(partial\) )?[A-Z][\w ]*, dataset '[^']+' -- ", line):
            context = line
        if index + 1 < len(lines) and "|" in line and re.fullmatch(r"-{20,}", lines[index + 1]):
            table = PipeTable(context, " ".join(line.split()))
            for row in lines[index + 2:]:
                if not row.strip():
                    break
                table.rows.append([segment.strip() for segment in row.split("|")])
            tables.append(table)
    return tables


def read_rows(text: str, header: str, segments: list, context: str | None = None, first_only: bool = True) -> list[dict]:
    """The rows of the printed table whose header is ``header`` (whitespace-normalised), as dicts.

    ``segments``: per ``|``-segment, a tuple of field names (whitespace-separated values; a first name
    starting with ``*`` takes every token the others leave, e.g. a label with spaces before a box) or a
    string (the segment's whole text). A segment that is empty or ``-`` gives None for its fields.
    ``context``: only tables under this "..., dataset 'name'" line (a regular expression); the first such
    table unless ``first_only`` is False."""
    matches = [t for t in pipe_tables(text) if t.header == " ".join(header.split())
               and (context is None or re.search(context, t.context))]
    if not matches:
        raise ValueError(f"no table with the header {header!r}{'' if context is None else f' under {context!r}'}: "
                         "the benchmark's output changed; update benchmarks/readme.py")
    rows = []
    for table in matches[:1] if first_only else matches:
        for raw in table.rows:
            if len(raw) != len(segments):
                raise ValueError(f"row {raw} of the table {header!r} has {len(raw)} segments, expected {len(segments)}")
            row = {}
            for spec, value in zip(segments, raw):
                if isinstance(spec, str):
                    row[spec] = value
                    continue
                tokens = value.split()
                if tokens in ([], ["-"]):
                    row.update(dict.fromkeys((name.lstrip("*") for name in spec), None))
                    continue
                if spec[0].startswith("*") and len(tokens) >= len(spec):
                    tokens = [" ".join(tokens[:len(tokens) - len(spec) + 1]), *tokens[len(tokens) - len(spec) + 1:]]
                if len(tokens) != len(spec):
                    raise ValueError(f"segment {value!r} of the table {header!r}: {len(tokens)} values for {spec}")
                row.update(zip((name.lstrip("*") for name in spec), tokens))
            rows.append(row)
    return rows


def number(value: str | None) -> float:
    return math.nan if value in (None, "-", "") else float(value)


def missed_by(verdict: str) -> list[tuple[float, str, str]]:
    """``(by, unit, what)`` of each "MISSED by 0.13x CRB (defocus)" of a verdict cell."""
    return [(float(by), unit.strip(), what) for by, unit, what in
            re.findall(r"MISSED by ([\d.]+)\s*([^(;]*?)\s*\(([^)]*)\)", verdict)]


def _unit(unit: str) -> str:
    """A verdict's unit in words ("x CRB": times the Cramér-Rao bound)."""
    return "x the bound" if unit == "x CRB" else f" {unit}"


def wrap_prose(text: str) -> str:
    """``text`` with its prose paragraphs wrapped as README's text is (tables left as they are)."""
    paragraphs = text.strip("\n").split("\n\n")
    return "\n\n".join(paragraph if paragraph.startswith("=") else
                        textwrap.fill(" ".join(paragraph.split("\n")), 105, break_long_words=False, break_on_hyphens=False)
                        for paragraph in paragraphs) + "\n"


def _list(items: list[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _range(values: list[float], digits: int) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if f"{low:.{digits}f}" == f"{high:.{digits}f}" else f"{low:.{digits}f}-{high:.{digits}f}"


def _preset(name: str):
    from tomoctfrefine.simulate import SimulationParameters

    return SimulationParameters.from_preset(name)


def _shape(params) -> str:
    return (f"{params.n_tomograms} x {params.n_tilts} tilts (±{params.tilt_max_deg:g}°), {params.particles_per_tomogram} "
            f"particles per tomogram, {params.image_size_px}² px at {params.pixel_size_angstrom:g} Å")


# ----------------------------------------------------------------------------------------------
# Forward model


def render_forward_model(record: dict) -> str:
    rows = []
    for entry in record["boxes"]:
        for row in entry["rows"]:
            rows.append([str(row["box"]), str(row["threads"]), f"{row['pairs_per_second']:.0f}", f"{row['cpu_seconds']:.2f}",
                         f"{row['pairs'] / row['cpu_seconds']:.0f}", f"{row['statistics_peak_mb']:.0f}",
                         f"{entry['references_mb']:.0f}"])
    pairs = sorted({row["pairs"] for entry in record["boxes"] for row in entry["rows"]})
    loads = [entry["load"] for entry in record["boxes"]]
    flipped = "with" if record["flipped_hand"] else "without"
    text = (f"Forward model (``benchmarks/forward_model.py``, ``benchmarks/forward_model_results.json``): the statistics "
            f"accumulation (box extraction, FFT, central slice, accumulation) of {record['tilts']} tilts x "
            f"{record['particles']} particles ({_list([str(p) for p in pairs])} particle-tilt pairs), weights to Nyquist, "
            f"{flipped} the opposite hand's statistics, numba compiled before timing; measured {record['date']} on "
            f"{record['cores']} cores at load average {_range(loads, 1)}"
            + (" (a shared machine: both rates are lower than on an idle one)" if max(loads) > record["cores"] else "")
            + ". Memory: the arrays the accumulation allocates, and the references prepared for it.\n\n")
    return text + rst_table([["box", "threads", "pairs/s (wall)", "CPU s", "pairs per CPU s", "statistics MB", "references MB"]], rows)


# ----------------------------------------------------------------------------------------------
# Accuracy

ACCURACY_ERRORS = ("set box band tilts | start RMSE CRB x z bias max | astig | scale% CRB% x z x* | verdict",
                   [("set", "box", "band", "tilts"), ("start", "rmse", "bound", "x", "z", "bias", "max"), ("astig",),
                    ("scale_pct", "scale_bound_pct", "scale_x", "scale_z", "scale_x_efficient"), "verdict"])
ACCURACY_ABERRATIONS = ("set box | even 30-6.7 to Nyq odd 30-6.7 to Nyq | hand verdict | scale g | wall s peak MB | dataset",
                        [("set", "box"), ("even", "even_nyquist", "odd", "odd_nyquist"), "hand", ("scale_g",),
                         ("wall_s", "peak_mb"), "dataset"])
ACCURACY_POOLED = ("set n band tilts | defocus x z bias | scale x z x* | verdict",
                   [("set", "n", "band", "tilts"), ("x", "z", "bias"), ("scale_x", "scale_z", "scale_x_efficient"), "verdict"])
ACCURACY_MAPS = ("set | corr before after true CTF | FSC0.143 before after true | FSC0.5 before after true | verdict",
                 [("set",), ("before", "after", "true"), ("fsc143_before", "fsc143_after", "fsc143_true"),
                  ("fsc5_before", "fsc5_after", "fsc5_true"), "verdict"])


def render_accuracy(text: str) -> str:
    import accuracy
    import common

    targets = accuracy.TARGETS
    errors = read_rows(text, *ACCURACY_ERRORS)
    aberrations = read_rows(text, *ACCURACY_ABERRATIONS)
    pooled = read_rows(text, *ACCURACY_POOLED)
    maps = read_rows(text, *ACCURACY_MAPS)
    recipes = sorted({row["set"][0] for row in errors})
    labels = {row["set"]: row["dataset"] for row in aberrations}
    main = [row for row in errors if row["set"] in recipes]
    box = int(main[0]["box"])  # --box; (a) also ran at a larger box
    options = common.tutorial_options(box)
    params = _preset("accuracy")
    n_real = max(int(row["n"]) for row in pooled)
    low = common.LOW_DOSE_E_PER_ANGSTROM2

    out = [
        f"Accuracy (``benchmarks/accuracy.py --realisations {n_real}``, ``benchmarks/accuracy_results.txt``): one pass with "
        f"the tutorial settings (box {box}, defocus scan ±{options.defocus_scan_max_angstrom:g} Å in "
        f"{options.defocus_scan_steps} steps, regularised defocus with λ {options.regularisation_lambda:g}, per-frame scale; "
        f"even and odd aberrations too for c) on simulated data: {_shape(params)}, SNR {params.snr:g}, starting "
        f"defocus {params.start_defocus_rms_angstrom:g} Å RMS off, starting scale {params.start_scale:g}. "
        + "; ".join(f"({k}) {labels[k]}" for k in recipes) + ".",
        "",
        f"``x`` = RMS error / Cramér-Rao bound, the smallest RMS error an unbiased estimator can reach (here computed "
        f"from the true map and CTF, the simulator's white-noise variance and every pixel of the box, with the "
        f"neighbouring particles known). Targets: defocus within {targets['defocus_ratio']}x the bound, absolute bias "
        f"≤ {targets['bias_angstrom']:g} Å, astigmatism ≤ {targets['astig_low_dose_angstrom']:g} Å below {low:g} e/Å², "
        f"scale within {targets['scale_ratio']}x the bound. ``x*`` = the same ratio for an efficient estimator that knows "
        "everything but the scale, fitted to the whole tilt image on the dataset's very noise: what that noise "
        f"allows. Band ``<{low:g}``: the tilts with less than {low:g} e/Å² before them. Errors in Å and %:",
        "",
        rst_table([["set", "box", "band", "RMSE", "bound", "x", "bias", "astig.", "scale %", "scale x", "x*"]],
                  [[r["set"], r["box"], r["band"], r["rmse"], r["bound"], r["x"], r["bias"], r["astig"], r["scale_pct"],
                    r["scale_x"], r["scale_x_efficient"]] for r in main]).rstrip("\n"),
        "",
    ]
    tilts = sorted({int(r["tilts"]) for r in errors})
    scatter = 100 / math.sqrt(2 * max(tilts))
    out += [
        f"One dataset's RMS over {max(tilts)} tilts scatters by about {scatter:.0f} % between noise realisations, and "
        "``x`` over all tilts rests on the few high-dose tilts with the largest bounds. So each recipe is also refined "
        f"on {n_real} datasets (other seeds) and pooled: RMS over all their tilts; ``z`` = RMS of each tilt's error over "
        "its own bound, which weighs every tilt alike:",
        "",
        rst_table([["set", "band", "tilts", "defocus x", "z", "bias", "scale x", "z", "x*"]],
                  [[r["set"], r["band"], r["tilts"], r["x"], r["z"], r["bias"], r["scale_x"], r["scale_z"],
                    r["scale_x_efficient"]] for r in pooled]).rstrip("\n"),
        "",
    ]
    pooled_misses = [(r, m) for r in pooled for m in missed_by(r["verdict"])]
    single = [(r, m) for r in errors for m in missed_by(r["verdict"])]
    worst = {}
    for _, (by, unit, what) in single:
        worst[what] = max(worst.get(what, (0.0, unit)), (by, unit))
    sentence = ("Pooled, every target is met." if not pooled_misses else
                "Pooled, " + _list([f"{r['set']} {r['band']} misses the {what} target by {by:g}{_unit(unit)}"
                                    for r, (by, unit, what) in pooled_misses]) + ".")
    if single:
        rows_missing = len({(r["set"], r["box"], r["band"]) for r, _ in single})
        extra = sorted({(r["set"], r["box"]) for r in errors if int(r["box"]) != box})
        sentence += (f" Single datasets scatter with their noise: of the {len(errors)} rows in the results file (both "
                     f"bands of {len(labels)} datasets" + "".join(f", {k} also at box {b}" for k, b in extra) + f"), "
                     f"{rows_missing} miss a target, by at most " +
                     _list([f"{by:g}{_unit(unit)} ({what})" for what, (by, unit) in sorted(worst.items())]) + ".")
    ratios = [number(r["scale_x"]) / number(r["scale_x_efficient"]) for r in main]
    sentence += (f" The scale is within {100 * (max(ratios) - 1):.0f} % of the efficient estimator's on every row of the "
                 "first table.")
    out += [sentence, ""]

    c_rows = [r for r in aberrations if r["set"].startswith("c") and int(r["box"]) == box]
    c_first = next(r for r in c_rows if r["set"] == "c")
    hands = [r for r in aberrations if int(r["box"]) == box]
    hands_right = sum(r["hand"].endswith(" ok") for r in hands)
    out += [
        f"Aberrations (c): RMS phase error even {c_first['even']} rad, odd {c_first['odd']} rad over 30-6.7 Å "
        f"({c_first['even_nyquist']} and {c_first['odd_nyquist']} to Nyquist); over the {len(c_rows)} c datasets even "
        f"≤ {max(number(r['even']) for r in c_rows):.3f}, odd ≤ {max(number(r['odd']) for r in c_rows):.3f} rad (targets "
        f"{targets['even_rad']:g} and {targets['odd_rad']:g}). Hand: named right in {hands_right} of {len(hands)} "
        "datasets; the data's hand is adopted and written back when the input's is wrong (d), so d's errors are like "
        "the others'.",
    ]
    comparisons = re.findall(r"^\(a\) box (\d+) vs (\d+), (\S+): .*-> (ok|MISSED)", text, re.M)
    if comparisons:
        verdicts = {v for *_, v in comparisons}
        first, second = comparisons[0][0], comparisons[0][1]
        out[-1] += (f" Box {first} is no worse than {second} (within two sampling errors)." if verdicts == {"ok"} else
                    f" Box {first} is worse than {second} (beyond two sampling errors): see the results file.")
    recon = re.search(r"^Reconstruction \(box (\d+), crop (\d+), (\w+) regularisation\)", text, re.M)
    out += [
        "",
        f"Maps (box {recon[1]}, cropped to {recon[2]}, {recon[3]} regularisation) reconstructed with the starting, the "
        "refined and the true CTF, against the true map: masked correlation, and the resolution (Å) where the FSC "
        "with the true map falls to 0.5:",
        "",
        rst_table([["set", "before", "after", "true CTF", "after - true", "FSC 0.5 before", "after", "true CTF"]],
                  [[r["set"], r["before"], r["after"], r["true"], re.search(r"; ([-+][\d.]+)\)", r["verdict"])[1],
                    r["fsc5_before"], r["fsc5_after"], r["fsc5_true"]] for r in maps]).rstrip("\n"),
    ]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# Map accuracy, and side by side with RELION

MAP_TABLE = ("CTF box | corr - true FSC0.5 0.143 | dz<40 RMSE CRB | dz all CRB | scale% <40 CRB | even rad odd rad | wall s MB | verdict",
             [("*ctf", "box"), ("corr", "minus_true", "fsc5", "fsc143"), ("dz40", "dz40_bound"), ("dz", "dz_bound"),
              ("scale40", "scale40_bound"), ("even", "odd"), ("wall_s", "mb"), "verdict"])
SIDE_TABLE = ("CTF box | ours - true FSC0.5 | RELION - true FSC0.5 | RELION-ours of - true | verdict",
              [("*ctf", "box"), ("ours", "ours_minus_true", "ours_fsc5"), ("relion", "relion_minus_true", "relion_fsc5"),
               ("diff", "diff_minus_true"), "verdict"])


def _map_rows(text: str, dataset: str, table=MAP_TABLE, kind: str = "Map accuracy") -> list[dict]:
    return read_rows(text, *table, context=rf"^{kind}, dataset '{re.escape(dataset)}' -- ")


def _datasets(text: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"^Map accuracy, dataset '([^']+)' -- ", text, re.M)))


def render_map_accuracy(text: str) -> str:
    import map_accuracy

    params = _preset("map")
    rows, truth, misses, met = [], [], [], {}
    for dataset in _datasets(text):
        for r in _map_rows(text, dataset):
            if r["ctf"] == "true CTF":
                truth.append((dataset, r))
                continue
            box = "start" if r["ctf"] == "starting CTF" else r["box"]
            rows.append([dataset, box, r["corr"], r["minus_true"], f"{r['dz40']} (bound {r['dz40_bound']})",
                         f"{r['scale40']} (bound {r['scale40_bound']})", f"{r['even']} / {r['odd']}"])
            if r["ctf"].startswith("tomoctfrefine"):
                if r["verdict"] == "ok":
                    met.setdefault(dataset, []).append(r["box"])
                else:
                    misses.append((dataset, r))
    recon = re.search(r"^Reconstruction: box (\d+), crop (\d+), (\w+) regularisation", text, re.M)
    gap = map_accuracy.TARGET_CORRELATION_GAP
    intro = (f"Map accuracy (``benchmarks/map_accuracy.py``, ``benchmarks/map_accuracy_results.txt``): data to about "
             f"{min(number(r['fsc5']) for _, r in truth):.0f} Å ({_shape(params)}, particles of sharp pseudo-atoms, SNR "
             f"{params.snr:g}, starting defocus {params.start_defocus_rms_angstrom:g} Å RMS off; map_aberrations adds even "
             "and odd aberrations), one pass with the tutorial settings at each box, reconstructed with box "
             f"{recon[1]}, cropped to {recon[2]}, {recon[3].upper() if recon[3] == 'relion' else recon[3]}'s "
             f"regularisation. Target: the masked correlation with the true map within {gap:g} of the map made with "
             "the true CTF. Per-tilt errors below "
             "40 e/Å² with the bounds of the refinement's own statistics; RMS phase errors from 30 Å to Nyquist:\n")
    table = rst_table([["dataset", "box", "correlation", "minus true CTF", "defocus Å", "scale %", "even / odd rad"]], rows)
    sentences = [f"True-CTF maps: correlation {_list([r['corr'] for _, r in truth])}, FSC 0.5 against the true map at "
                 f"{_list([r['fsc5'] for _, r in truth])} Å."]
    sentences.append("The target is met " + "; ".join(f"at box{'es' if len(boxes) > 1 else ''} {_list(boxes)} for {dataset}"
                                                      for dataset, boxes in met.items()) +
                     ("." if not misses else
                      "; it is missed " + _list([f"at box {r['box']} for {dataset} ({r['minus_true']}, with phase errors "
                                                 f"{r['even']} / {r['odd']} rad)" for dataset, r in misses]) + "."))
    return intro + "\n" + table + "\n" + " ".join(sentences) + "\n"


def render_relion_maps(relion_text: str, ours_text: str) -> str:
    import map_accuracy

    rows, agreement, shift = [], [], []
    verdicts = []
    for dataset in _datasets(relion_text):
        table = {(r["ctf"], r["box"]): r for r in _map_rows(relion_text, dataset)}
        side = {(r["ctf"], r["box"]): r for r in _map_rows(relion_text, dataset, SIDE_TABLE, "Side by side")}
        ours_now = {(r["ctf"], r["box"]): r for r in _map_rows(ours_text, dataset)}
        for key, r in side.items():
            if r["diff"] is not None and key[0] != "true CTF":
                agreement.append(abs(number(r["diff"])))
                verdicts.append(abs(number(r["diff_minus_true"])))
        boxes = sorted({box for ctf, box in table if ctf == "tomoctfrefine, one pass"}, key=int)
        for box in boxes:
            ours, relion = table[("tomoctfrefine, one pass", box)], table.get(("RELION, one pass", box))
            ours_side, relion_side = side[("tomoctfrefine, one pass", box)], side.get(("RELION, one pass", box))
            if relion is None or relion_side is None:
                continue
            aberrations = number(ours["even"]) > 0 or number(relion["even"]) > 0
            rows.append([dataset, box, f"{ours_side['ours_minus_true']} / {ours_side['relion_minus_true']}",
                         f"{relion_side['ours_minus_true']} / {relion_side['relion_minus_true']}",
                         f"{ours['dz40']} / {relion['dz40']}", f"{ours['scale40']} / {relion['scale40']}",
                         f"{ours['even']} / {relion['even']}" if aberrations else ""])
            if ("tomoctfrefine, one pass", box) in ours_now:
                shift.append(abs(number(ours["minus_true"]) - number(ours_now[("tomoctfrefine, one pass", box)]["minus_true"])))
    gap = map_accuracy.TARGET_CORRELATION_GAP
    intro = (f"Side by side with RELION (``RELION_BIN=<build>/bin python benchmarks/map_accuracy.py --relion-only``, "
             f"``benchmarks/map_accuracy_relion_results.txt``; {RELION_BUILD}, on the same data). Each optimisation set "
             "tomoctfrefine wrote is reconstructed by ``relion_tomo_reconstruct_particle`` too, and "
             "``relion_tomo_refine_ctf`` runs one pass with the same tutorial settings. Correlations minus the true-CTF "
             "map's, each cell our reconstruction / RELION's; then the refinements' per-tilt errors below 40 e/Å² "
             "(defocus Å, scale %) and even phase errors (rad), ours / RELION's. This run was made with an earlier "
             f"version of tomoctfrefine, whose rows differ from the table above by at most {max(shift):.4f}:\n")
    table = rst_table([["dataset", "box", "tomoctfrefine", "RELION one pass", "defocus Å", "scale %", "even phase"],
                       ["", "", "ours / RELION's", "ours / RELION's", "ours / RELION", "ours / RELION", "ours / RELION"]], rows)
    text = (f"RELION reconstructs every optimisation set we wrote to the masked correlation of our own reconstruction "
            f"within {max(agreement):.4f}, and its refined-minus-true difference within {max(verdicts):.4f} of ours "
            f"(target {gap:g}): it reads our defocus, per-tilt scale, hand and Zernike coefficients as we mean them.")
    first = _datasets(relion_text)[0]
    table_first = {(r["ctf"], r["box"]): r for r in _map_rows(relion_text, first)}
    above = [(box, r) for (ctf, box), r in table_first.items() if ctf == "RELION, one pass" and number(r["minus_true"]) > 0]
    if above:
        box, r = above[0]
        ours = table_first[("tomoctfrefine, one pass", box)]
        text += (f" RELION's one pass at box {box} lands *above* the true-CTF map ({r['minus_true']} on {first}) with "
                 f"{number(r['dz40']) / number(ours['dz40']):.1f}x our defocus error and "
                 f"{number(r['scale40']) / number(ours['scale40']):.1f}x our scale error. The diagnostics at the end of the "
                 "results file (RELION's values swapped into the true CTF one part at a time) trace this to its per-tilt "
                 "scale, which falls with dose faster than the truth: that damps the frequencies only the low-dose tilts "
                 "carry, a gentle low-pass which the masked correlation of a nearly unregularised map rewards. It is not a "
                 "better CTF: with a per-shell Wiener reconstruction RELION's map falls below the true-CTF map, and ours stays "
                 "level with it.")
    return intro + "\n" + table + "\n" + text + "\n"


# ----------------------------------------------------------------------------------------------
# Speed

#: (header, how to get it from a row of speed_results.json); a column no row has is left out.
SPEED_COLUMNS = (
    ("steps", lambda r: r.get("steps")),
    ("box", lambda r: r.get("box")),
    ("parallel", lambda r: r.get("parallel") or {"threads": "2 threads", "mpi": "2 ranks", "single": "1 thread"}.get(r.get("mode"))),
    ("wall s", lambda r: _fixed(r.get("wall_s"), 1)),
    ("CPU s", lambda r: _fixed(r.get("cpu_s"), 1)),
    ("peak MB", lambda r: _fixed(r.get("peak_mb"), 0)),
    ("RELION wall s", lambda r: _fixed(_relion_wall(r), 0)),
    ("RELION CPU s", lambda r: _fixed(r.get("relion_cpu_s"), 1)),
    ("RELION MB", lambda r: _fixed(r.get("relion_peak_mb", r.get("relion_mb")), 0)),
    ("speed-up", lambda r: f"{_relion_wall(r) / r['wall_s']:.1f}x" if _relion_wall(r) and r.get("wall_s") else None),
)


def _relion_wall(row: dict):
    return row.get("relion_wall_s", row.get("relion_s"))


def _fixed(value, digits: int):
    return None if value is None else f"{value:.{digits}f}"


def render_speed(record: dict) -> str:
    params = _preset("accuracy")
    rows = record["rows"]
    cells = [[getter(r) for _, getter in SPEED_COLUMNS] for r in rows]
    keep = [i for i in range(len(SPEED_COLUMNS)) if any(c[i] is not None for c in cells)]
    table = rst_table([[SPEED_COLUMNS[i][0] for i in keep]], [[str(c[i] or "") for i in keep] for c in cells])
    loads = [r["load"] for r in rows if r.get("load") is not None]
    text = (f"Speed (``benchmarks/speed.py``, ``benchmarks/speed_results.json``): the accuracy data ({_shape(params)}, "
            f"{params.box_size_px}³ reference), one fresh process per row, numba compiled and cached first"
            + (f" (the warm-up run took {record['warm_up_s']:.1f} s)" if record.get("warm_up_s") else "")
            + f"; run {record['date']} on {record['cores']} cores" + (f", {record['machine']}" if record.get("machine") else "")
            + (f" (load average {_range(loads, 1)} at the rows' starts)" if loads else "") + ". "
            + (f"{record['relion']}. " if record.get("relion") else "")
            + "\"everything\" is defocus, per-frame scale, even and odd aberrations, with the hand check and the "
            "neighbour model of the scale step (the defaults); \"everything-nn\" is the same with "
            "``--no_neighbour_model``:\n")
    compared = [r for r in rows if _relion_wall(r) and r.get("wall_s")]
    notes = []
    if compared:
        slowest = min(_relion_wall(r) / r["wall_s"] for r in compared)
        memory = [r for r in compared if r.get("relion_peak_mb", r.get("relion_mb")) and r.get("peak_mb")]
        less = all(r["peak_mb"] < r.get("relion_peak_mb", r.get("relion_mb")) for r in memory)
        notes.append(f"Every row timed against RELION is at least {math.floor(slowest * 10) / 10:.1f}x as fast"
                     + (" and, where RELION's memory was measured, uses less" if memory and less else "")
                     + ": tilts are read one at a time and their pages released, and the statistics are stored in single precision.")
    everything = {r["box"]: r["wall_s"] for r in rows if r.get("steps") == "everything" and r.get("wall_s")
                  and (r.get("parallel") or r.get("mode")) in ("2 threads", "threads")}
    small, large = min(everything, default=None), sorted(everything)[1] if len(everything) > 1 else None
    if large and everything[small] > everything[large]:
        notes.append(f"Box {small} is slower than {large}: there the CTF moves the particle's signal into the box edge in most "
                     "tilts, and the windowed prediction that models it costs extra FFTs per particle.")
    return text + "\n" + table + ("\n" + " ".join(notes) + "\n" if notes else "")


# ----------------------------------------------------------------------------------------------
# All blocks


def render_block(name: str, results: Path = HERE) -> str:
    """Block ``name`` of README's Benchmarks section, rendered from the results files in ``results``."""
    return wrap_prose(_render_block(name, results))


def _render_block(name: str, results: Path) -> str:
    if name == "forward_model":
        return render_forward_model(json.loads((results / "forward_model_results.json").read_text()))
    if name == "accuracy":
        return render_accuracy((results / "accuracy_results.txt").read_text())
    if name == "map_accuracy":
        return render_map_accuracy((results / "map_accuracy_results.txt").read_text())
    if name == "relion_maps":
        return render_relion_maps((results / "map_accuracy_relion_results.txt").read_text(),
                                  (results / "map_accuracy_results.txt").read_text())
    if name == "speed":
        return render_speed(json.loads((results / "speed_results.json").read_text()))
    raise ValueError(f"unknown block {name!r}")


def _write(text: str) -> None:
    temporary = README.with_name(README.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, README)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("demo", "tables"))
    parser.add_argument("--check", action="store_true", help="tables: only compare, exit 1 if README.rst differs")
    args = parser.parse_args(argv)
    text = README.read_text()
    if args.what == "demo":
        with tempfile.TemporaryDirectory() as folder:
            cache = Path(folder) / "numba_cache"
            (Path(folder) / "first").mkdir()
            (Path(folder) / "second").mkdir()  # a fresh folder: the demo would resume from the first run's files
            first, load = run_demo(Path(folder) / "first", cache)
            second, _ = run_demo(Path(folder) / "second", cache)
            print(f"demo ran in {demo_seconds(first)} s, then {demo_seconds(second)} s (load average {load:.1f} at the start)")
        new = replace_block(text, "demo", render_demo(first, second, load, os.cpu_count() or 1))
    else:
        new = text
        for name in BENCHMARK_BLOCKS:
            new = replace_block(new, name, render_block(name))
    problems = simple_table_problems(new)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    if args.check:
        if new != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), "README.rst", "rendered"))
            return 1
        print("README.rst is up to date")
        return 0
    if new != text:
        _write(new)
        print("README.rst updated")
    else:
        print("README.rst already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
