"""README.rst's figures come from the code (``benchmarks/readme.py``).

* The demo block: README shows the summary lines ``tomoctfrefine demo`` prints. The demo runs here
  (its own small dataset, as a user runs it) and its summary must equal README's line for line once every
  number is masked: a line added, removed or reworded on either side fails, the noise does not.
* The Benchmarks section: every table and figure is a block that ``benchmarks/readme.py tables`` renders
  from the committed ``benchmarks/*_results.*`` (no benchmark runs here), and outside those blocks the
  section has no number.
* No internal vocabulary (issue numbers, sessions, helpers) in README.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme  # noqa: E402

TEXT = (ROOT / "README.rst").read_text()


@pytest.fixture(scope="module")
def demo_stdout(tmp_path_factory) -> str:
    stdout, _ = readme.run_demo(tmp_path_factory.mktemp("demo"))
    return stdout


def _masked(lines: list[str]) -> list[str]:
    return [readme.masked(line) for line in lines]


def test_readme_demo_block_has_the_format_of_the_demo_output(demo_stdout):
    ours = _masked(readme.demo_summary(demo_stdout))
    shown = _masked(readme.readme_demo_lines(TEXT))
    assert shown == ours, "README's demo block is out of date: run python benchmarks/readme.py demo\n" + "\n".join(
        f"{'README' if side else 'demo  '}: {line}" for side, lines in ((1, shown), (0, ours)) for line in lines)
    # the summary is what the brief names: defocus error, hand check, the map before and after
    assert [line.split(":")[0] for line in ours[:4]] == ["defocus error RMS", "hand check", "before", "after "]
    assert re.match(r"On \d+ cores \(load average [\d.]+\), a first run took \d+ s \(numba compiles the kernels and "
                    r"caches them\), a second \d+ s, and ended with::", " ".join(readme.block(TEXT, "demo").split()))


def test_demo_comparison_fails_when_a_line_is_added_removed_or_reworded(demo_stdout):
    summary = readme.demo_summary(demo_stdout)
    lines = demo_stdout.splitlines()
    hand = next(i for i, line in enumerate(lines) if line.startswith("hand check:"))
    added = "\n".join(lines[:hand + 1] + ["scale model: per-frame"] + lines[hand + 1:])
    reworded = demo_stdout.replace("defocus error RMS:", "defocus RMS error:")
    removed = demo_stdout.replace(lines[hand] + "\n", "")
    for changed in (added, reworded, removed):
        assert _masked(readme.demo_summary(changed)) != _masked(summary)
    # numbers alone do not count
    assert _masked(readme.demo_summary(re.sub(r"\d", "7", demo_stdout))) == _masked(summary)
    # the per-tilt rows, progress lines and paths are not summary lines
    assert not any(re.match(r"-?\d+\.\d\s", line) or "[" in line[:3] for line in summary)


@pytest.mark.parametrize("name", readme.BENCHMARK_BLOCKS)
def test_readme_benchmark_block_is_what_the_results_files_render(name):
    assert readme.block(TEXT, name) == readme.render_block(name), (
        f"README's '{name}' block differs from benchmarks/readme.py's rendering of the results: "
        "run python benchmarks/readme.py tables")


def test_readme_tables_parse_as_their_borders_say():
    assert readme.simple_table_problems(TEXT) == []
    bad = "===  ===\na    b\n===  ===\nxyzzy  c\n===  ===\n"
    assert readme.simple_table_problems(bad) == ["text in a column gap: 'xyzzy  c'"]


def test_benchmarks_section_has_no_number_outside_the_rendered_blocks():
    section = TEXT.split("Benchmarks\n----------\n", 1)[1].split("\nTroubleshooting\n---", 1)[0]
    assert set(readme.BENCHMARK_BLOCKS) <= set(re.findall(r"^\.\. begin: (\w+)$", section, re.M))
    outside = readme.outside_blocks(section)
    assert re.findall(r".*\d.*", outside) == []


def test_readme_speaks_without_internal_vocabulary():
    found = re.findall(r"(?i).{0,30}\b(?:issues? \d+|session \d+|sessions?\b|helpers?\b|the lead\b|the team\b).{0,30}", TEXT)
    assert found == []


def test_a_changed_benchmark_output_is_an_error_not_a_guess(tmp_path):
    """The printed tables are read by their headers: a renamed column stops the rendering."""
    results = (ROOT / "benchmarks" / "accuracy_results.txt").read_text()
    (tmp_path / "accuracy_results.txt").write_text(results.replace(" astig |", "astigm |"))
    with pytest.raises(ValueError, match="no table with the header"):
        readme.render_block("accuracy", tmp_path)


def test_speed_table_shows_the_columns_the_results_have(tmp_path):
    """speed_results.json may carry RELION's CPU time and peak memory per row (a side-by-side run), or
    not: columns no row has are left out, the speed-up is RELION's wall time over ours."""
    record = {"date": "today", "cores": 2,
              "rows": [{"steps": "defocus", "box": 256, "mode": "threads", "wall_s": 10.0, "cpu_s": 18.0, "peak_mb": 500.0,
                        "relion_wall_s": 25.0, "relion_cpu_s": 45.0, "relion_peak_mb": 600.0},
                       {"steps": "defocus", "box": 256, "mode": "mpi", "wall_s": 8.0, "cpu_s": 15.0, "peak_mb": 900.0}]}
    (tmp_path / "speed_results.json").write_text(json.dumps(record))
    text = readme.render_block("speed", tmp_path)
    header = next(line for line in text.splitlines() if line.startswith("steps"))
    assert header.split() == ["steps", "box", "parallel", "wall", "s", "CPU", "s", "peak", "MB", "RELION", "wall", "s",
                              "RELION", "CPU", "s", "RELION", "MB", "speed-up"]
    assert re.search(r"^defocus\s+256\s+2 threads\s+10\.0\s+18\.0\s+500\s+25\s+45\.0\s+600\s+2\.5x$", text, re.M)
    assert re.search(r"^defocus\s+256\s+2 ranks\s+8\.0\s+15\.0\s+900$", text, re.M)
    assert "at least 2.5x as fast and, where RELION's memory was measured, uses less" in " ".join(text.split())
    for row in record["rows"]:
        del row["cpu_s"]
    (tmp_path / "speed_results.json").write_text(json.dumps(record))
    assert "CPU s " not in readme.render_block("speed", tmp_path).replace("RELION CPU s", "")


def test_readme_script_check_mode_agrees_with_the_tests():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme.py"), "tables", "--check"],
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout.strip()) == (0, "README.rst is up to date"), result.stdout + result.stderr
