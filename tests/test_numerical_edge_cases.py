"""Numerical edge cases end to end, on small simulated data with known truth: tilts where no particle
is visible keep their input values (RELION moves their defocus to the scan's lower bound and writes NaN
scales), particles at the image edge, shells of zero weight, a data set with almost no signal, and the
check before writing that refuses non-finite values.

Tolerances: a refined tilt's mean-defocus error must lie within 5 of its own reported standard
deviations (plus 20 Å for the discretisation of the simulated defocus gradient over the particle), i.e.
the reported uncertainty is honest; every written number must be finite.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tomoctfrefine import pipeline
from tomoctfrefine.io.fsc import FscCurve, write_fsc
from tomoctfrefine.io.star import read_star, write_star
from tomoctfrefine.simulate import SimulationParameters, load_truth, simulate_dataset

BIN = Path(sys.executable).parent
FLAGS = ["--b", "64", "--do_defocus", "--do_scale", "--per_frame_scale", "--j", "1"]
HIDDEN = 4  # the tilt whose particles are all moved out of view
CTF_COLUMNS = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfScalefactor"]


def simulate(tmp_path_factory, name: str, **parameters) -> Path:
    folder = tmp_path_factory.mktemp(name) / "data"
    simulate_dataset(folder, SimulationParameters(n_tomograms=1, n_tilts=9, particles_per_tomogram=16, **parameters))
    return folder


def refine(root: Path, *extra, out="out") -> dict:
    result = subprocess.run([str(BIN / "tomoctfrefine"), "refine", "--i", "optimisation_set.star", "--o", out, *FLAGS, *extra],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads((root / out / "summary.json").read_text())["tomograms"]["TS_01"]


def tilt_table(path: Path):
    return read_star(path).blocks["TS_01"]


def mean_defocus_errors(root: Path, entry: dict) -> np.ndarray:
    truth = load_truth(root)["tomograms"]["TS_01"]
    true_mean = np.array([(t["dfu"] + t["dfv"]) / 2 for t in truth])
    return (np.asarray(entry["defocus_u_after_angstrom"]) + np.asarray(entry["defocus_v_after_angstrom"])) / 2 - true_mean


def assert_all_finite(root: Path, out="out") -> None:
    table = tilt_table(root / out / "tilt_series" / "TS_01.star")
    assert np.all(np.isfinite(table[CTF_COLUMNS].to_numpy(dtype=float)))
    assert "nan" not in (root / out / "summary.json").read_text().lower()


@pytest.fixture(scope="module")
def edge_data(tmp_path_factory) -> Path:
    """Particles placed 4 px from the image edges (boxes cut by the border in many tilts), and tilt
    HIDDEN shifted 20 µm so that no particle projects into it."""
    root = simulate(tmp_path_factory, "edge", placement_margin_px=4, seed=11)
    doc = read_star(root / "tilt_series" / "TS_01.star")
    doc.blocks["TS_01"].loc[doc.blocks["TS_01"].index[HIDDEN], "rlnTomoXShiftAngst"] = 2.0e5
    write_star(doc, root / "tilt_series" / "TS_01.star")
    return root


@pytest.fixture(scope="module")
def edge_run(edge_data) -> dict:
    return refine(edge_data)


def test_tilt_without_visible_particles_keeps_its_input_values(edge_data, edge_run):
    before = tilt_table(edge_data / "tilt_series" / "TS_01.star")
    after = tilt_table(edge_data / "out" / "tilt_series" / "TS_01.star")
    assert edge_run["refined"][HIDDEN] is False and edge_run["defocus_uncertainty_angstrom"][HIDDEN] == -1.0
    assert after.loc[after.index[HIDDEN], CTF_COLUMNS].tolist() == before.loc[before.index[HIDDEN], CTF_COLUMNS].tolist()
    others = [i for i in range(len(before)) if i != HIDDEN]
    assert all(np.asarray(edge_run["refined"])[others])
    assert np.all(after["rlnDefocusU"].to_numpy()[others] != before["rlnDefocusU"].to_numpy()[others])
    assert_all_finite(edge_data)


def test_particles_at_the_image_edge_give_honest_defocus(edge_data, edge_run):
    errors = mean_defocus_errors(edge_data, edge_run)
    sigma = np.asarray(edge_run["defocus_uncertainty_angstrom"])
    refined = np.asarray(edge_run["refined"])
    assert np.all(np.abs(errors[refined]) < 5 * sigma[refined] + 20), (errors, sigma)
    assert np.all(sigma[refined] < 200)  # the edge particles still carry information
    assert edge_run["particle_count"] == 16


def test_zero_weight_shells(edge_data, tmp_path):
    """An FSC that is exactly 0 over a band of shells and beyond shell 24 gives those shells zero SNR
    weight (--use_SNR_weight): the fit ignores them, without NaN from 0/0."""
    root = tmp_path / "data"
    shutil.copytree(edge_data, root, ignore=shutil.ignore_patterns("out", "truth"))
    shutil.copytree(edge_data / "truth", root / "truth")
    index = np.arange(33)
    fsc = np.where((index >= 9) & (index <= 12), 0.0, np.where(index <= 24, 0.95, 0.0))
    fsc[0] = 1.0
    write_fsc(root / "postprocess.star", FscCurve(index, np.where(index > 0, 128.0 / np.maximum(index, 1), np.inf), fsc))
    entry = refine(root, "--fsc", "postprocess.star", "--use_SNR_weight")
    assert_all_finite(root)
    refined = np.asarray(entry["refined"])
    sigma = np.asarray(entry["defocus_uncertainty_angstrom"])
    errors = mean_defocus_errors(root, entry)
    assert np.all(np.abs(errors[refined]) < 5 * sigma[refined] + 20), (errors, sigma)


@pytest.fixture(scope="module")
def low_snr_data(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory, "low_snr", snr=0.0005, seed=12)


def test_very_low_snr_does_not_move_the_defocus_beyond_its_uncertainty(low_snr_data):
    entry = refine(low_snr_data)
    assert_all_finite(low_snr_data)
    before = (np.asarray(entry["defocus_u_before_angstrom"]) + np.asarray(entry["defocus_v_before_angstrom"])) / 2
    after = (np.asarray(entry["defocus_u_after_angstrom"]) + np.asarray(entry["defocus_v_after_angstrom"])) / 2
    sigma = np.asarray(entry["defocus_uncertainty_angstrom"])
    refined = np.asarray(entry["refined"])
    errors = mean_defocus_errors(low_snr_data, entry)
    # within the scan (--d0 -3000 --d1 3000) plus one scan step (the local fit polishes the best scan point
    # within its basin, which reaches one step past the edge; measured 3044 Å once), or within 4 of its
    # own standard deviations
    change = np.abs(after - before)
    assert np.all((change <= 3000 + 6000 / 99) | (change < 4 * sigma)), (change, sigma)
    # where a tilt was refined, its reported uncertainty covers the error; no tilt claims precision it has not
    assert np.all(np.abs(errors[refined]) < 5 * sigma[refined] + 20), (errors, sigma)
    assert np.all(after[~refined] == before[~refined])
    scales = tilt_table(low_snr_data / "out" / "tilt_series" / "TS_01.star")["rlnCtfScalefactor"].to_numpy()
    assert np.all(np.isfinite(scales)) and np.all(scales > 0)


@pytest.mark.parametrize("step, key, label", [("defocus", "defocus_u_angstrom", "defocus U"), ("scale", "scale", "scale")])
def test_writing_refuses_non_finite_values(edge_data, edge_run, tmp_path, step, key, label):
    out = tmp_path / "out"
    shutil.copytree(edge_data / "out", out)
    for name in ("optimisation_set.star", "summary.json"):
        (out / name).unlink()
    # the step's own file, and the scale step's evidence where it holds the defocus it polished
    for path in [out / "temp" / step / "TS_01.npz", *sorted((out / "temp" / "scale").glob("TS_01.evidence_*.npz"))]:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        if key not in arrays:
            continue
        arrays[key] = arrays[key].astype(float)
        arrays[key][2] = np.nan
        np.savez(path, **arrays)
    written = (out / "tilt_series" / "TS_01.star").read_text()
    with pytest.raises(RuntimeError, match=f"^TS_01: refusing to write non-finite {label} values$"):
        pipeline.write_outputs(out)
    assert not (out / "optimisation_set.star").exists() and not (out / "summary.json").exists()
    assert (out / "tilt_series" / "TS_01.star").read_text() == written
