"""The Python API example of README.rst runs as written, in the folder of a simulated dataset, and refines
the defocus to the truth; the one-call alternative its last comment names gives the same files."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tomoctfrefine.io.tomograms import read_tomogram_set, tomogram, tomogram_names
from tomoctfrefine.simulate import SimulationParameters, load_truth, simulate_dataset

ROOT = Path(__file__).resolve().parents[1]
# Small enough for a few seconds (9 tilts x 12 particles), large enough for the README's box of 128 px.
SMALL = SimulationParameters(n_tilts=9, particles_per_tomogram=12, image_size_px=256, seed=2)


def readme_api_example() -> str:
    """The code block that follows "Python API:" in README.rst, unindented."""
    text = (ROOT / "README.rst").read_text()
    block = re.search(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+?)(?=\S)", text[text.index("Python API:"):])
    return "\n".join(line[3:] for line in block.group(1).splitlines()) + "\n"


def one_call_alternative(script: str) -> str:
    """The call the example's last comment offers instead of the steps ("# or ...: <call>")."""
    comment = script.rstrip().splitlines()[-1]
    assert comment.startswith("# or "), comment
    return comment.split(": ", 1)[1]


def mean_defocus(tomograms_star: Path) -> dict:
    tset = read_tomogram_set(tomograms_star)
    return {name: (t.defocus_u_angstrom + t.defocus_v_angstrom) / 2
            for name, t in ((n, tomogram(tset, n)) for n in tomogram_names(tset))}


def test_readme_python_api_example_runs_and_refines_the_defocus(tmp_path):
    data = tmp_path / "data"
    simulate_dataset(data, SMALL)
    script = readme_api_example()
    assert 'read_optimisation_set("optimisation_set.star")' in script and '"out"' in script
    # As written, then its one-call alternative into another folder (same inputs, same options).
    alternative = one_call_alternative(script).replace('"out"', '"out_one_call"')
    (tmp_path / "example.py").write_text(script + alternative + "\n")
    result = subprocess.run([sys.executable, str(tmp_path / "example.py")], cwd=data, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    out = data / "out"
    truth = load_truth(data)
    true_mean = {name: np.array([(t["dfu"] + t["dfv"]) / 2 for t in tilts]) for name, tilts in truth["tomograms"].items()}
    start = np.concatenate([d - true_mean[n] for n, d in mean_defocus(data / "tomograms.star").items()])
    errors = np.concatenate([d - true_mean[n] for n, d in mean_defocus(out / "tomograms.star").items()])
    summary = json.loads((out / "summary.json").read_text())
    sigma = np.concatenate([t["defocus_uncertainty_angstrom"] for t in summary["tomograms"].values()])
    assert np.sqrt(np.mean(start**2)) > 800
    # the error is of the size the Fisher information predicts, far below the ~900 Å start
    assert np.sqrt(np.mean(errors**2)) < 2.0 * np.sqrt(np.mean(sigma**2)) + 10

    for name in truth["tomograms"]:
        star = Path("tilt_series") / f"{name}.star"
        assert (data / "out_one_call" / star).read_text() == (out / star).read_text()
