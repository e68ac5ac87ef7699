"""A wrong defocus hand in the input: the refinement names it, adopts the data's hand (refines with it,
writes it as rlnTomoHand and says so), and ``--keep_hand`` keeps the input hand and only reports.

A small simulated dataset (2 tilt series x 17 tilts ±51°, particles spread in depth, SNR 0.5) is written
with ``rlnTomoHand`` opposite to the hand the images were simulated with, and refined in one pass with
the tutorial settings at box 96. Every particle's depth defocus then has the wrong sign. Refined with the
adopted hand, defocus and scale are found as with a right input (within 1.5x and 2x their Cramér-Rao
bounds, as tests/test_benchmarks_small.py) and the written hand is the data's.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import starfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
from tomoctfrefine.simulate import SimulationParameters, simulate_dataset  # noqa: E402

PARAMS = SimulationParameters(
    seed=7, n_tomograms=2, n_tilts=17, tilt_max_deg=51.0, image_size_px=400, particles_per_tomogram=30,
    box_size_px=64, placement_margin_px=64, snr=0.5, start_defocus_rms_angstrom=900.0, start_scale=1.0,
    hand=-1, written_hand=1,
)
BOX = 96


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hand")
    data = root / "data"
    simulate_dataset(data, PARAMS)
    outs = {}
    for label, adopt in (("adopted", True), ("kept", False)):
        outs[label] = root / label
        common.refine_once(data, outs[label], common.tutorial_options(BOX, threads=2, adopt_hand=adopt),
                           log=lambda m: None, in_process=True)
    bounds = common.bounds_at_truth(data, BOX, root / "truth_stats", log=lambda m: None, in_process=True)
    return data, outs, bounds


def _written_hands(out: Path) -> list:
    table = starfile.read(out / "tomograms.star", always_dict=True)["global"]
    return table["rlnTomoHand"].tolist()


def test_the_data_s_hand_is_adopted_written_and_reported(runs):
    data, outs, bounds = runs
    assert _written_hands(data) == [1.0, 1.0]  # the input as written (inputs are never modified)
    assert _written_hands(outs["adopted"]) == [-1.0, -1.0]
    summary = json.loads((outs["adopted"] / "summary.json").read_text())
    for name, entry in summary["tomograms"].items():
        hand = entry["hand"]
        assert (hand["verdict"], hand["adopted"], hand["input"], hand["written"]) == ("opposite hand", True, 1.0, -1.0)
        assert hand["message"].endswith("Refined with the opposite hand and written as rlnTomoHand -1 (input +1); "
                                        "--keep_hand keeps the input hand.")
    log = (outs["adopted"] / "run.log").read_text()
    assert log.count("Refined with the opposite hand") == PARAMS.n_tomograms
    errors = common.ctf_errors(data, common.refined_table(outs["adopted"], data), bounds)["bands"]["all"]
    assert errors["defocus_rmse"] <= 1.5 * errors["defocus_bound"], errors
    assert abs(errors["defocus_bias"]) <= 3 * errors["defocus_bound"] / np.sqrt(errors["tilts"]), errors
    assert errors["scale_rel_rms"] <= 2.0 * errors["scale_bound"], errors


def test_keep_hand_keeps_the_input_hand_and_only_reports(runs):
    data, outs, bounds = runs
    assert _written_hands(outs["kept"]) == [1.0, 1.0]
    summary = json.loads((outs["kept"] / "summary.json").read_text())
    for entry in summary["tomograms"].values():
        assert (entry["hand"]["verdict"], entry["hand"]["adopted"]) == ("opposite hand", False)
        assert entry["hand"]["message"].endswith("The hand was not changed (--keep_hand): flip rlnTomoHand and rerun.")
    kept = common.ctf_errors(data, common.refined_table(outs["kept"], data), bounds)["bands"]["all"]
    # the per-tilt defocus (at the tomogram's centre) hardly depends on the hand when the particles sit
    # on both sides of it; what the hand changes is each particle's depth term
    assert kept["defocus_rmse"] <= 1.5 * kept["defocus_bound"], kept
