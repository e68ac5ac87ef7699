"""The Scipion workflow script shown in README.rst runs and refines the defocus towards the truth."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def readme_workflow_script() -> str:
    text = (ROOT / "README.rst").read_text()
    block = re.search(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+?)(?=\S)", text[text.index("Build and run a tomo CTF") - 200:])
    return "\n".join(line[3:] for line in block.group(1).splitlines()) + "\n"


def test_readme_workflow_script_runs(tmp_path):
    script = tmp_path / "workflow.py"
    script.write_text(readme_workflow_script())
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "work")], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("TS_")]
    truth = json.loads((tmp_path / "work" / "relion" / "truth" / "truth.json").read_text())["tomograms"]
    assert len(rows) == sum(len(tilts) for tilts in truth.values())
    errors = []
    for name, order, u, v, *_ in rows:
        by_dose = sorted(truth[name], key=lambda t: t["pre_exposure"])  # Scipion's acquisition order, 1-based
        tilt = by_dose[int(order) - 1]
        errors.append((float(u) + float(v)) / 2 - (tilt["dfu"] + tilt["dfv"]) / 2)
    assert np.sqrt(np.mean(np.square(errors))) < 150  # from ~900 Å RMS at the start
    assert "RELION files for downstream jobs:" in result.stdout
