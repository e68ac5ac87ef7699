"""The report: what the plots draw (error bars from the Fisher information, astigmatism axis, hand check
with its thresholds, FSC page) and the pages of ``logfile.pdf``, after a real assessed refinement of the
RELION-5 fixture (run once for the module, with progress lines every advance)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tomoctfrefine import pipeline, progress, report
from tomoctfrefine.io.optimisation_set import read_optimisation_set


def pdf_page_count(path: Path) -> int:
    """Pages of a PDF written by Pillow (one ``/Type /Page`` object per page, and the tree's ``/Count``)."""
    data = Path(path).read_bytes()
    pages = len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data))
    counts = [int(c) for c in re.findall(rb"/Count\s+(\d+)", data)]
    assert counts == [pages], (counts, pages)
    return pages


@pytest.fixture(scope="module")
def assessed_run(relion5_small, tmp_path_factory):
    """``refine`` with the tutorial settings and ``assess`` on a copy of the fixture (in process, so that
    the progress lines can be asked for at every advance instead of every 5 s)."""
    folder = tmp_path_factory.mktemp("report") / "data"
    shutil.copytree(relion5_small, folder)
    options = pipeline.RefineOptions(box_size_px=128, do_defocus=True, regularise_defocus=True, regularisation_lambda=0.1,
                                     do_scale=True, scale_mode="per_frame", threads=2, assess=True)
    out = folder / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(progress, "LOG_INTERVAL_S", 0.0)
        pipeline.run_refinement(read_optimisation_set(folder / "optimisation_set.star"), options, out)
    return out


# --- what is drawn -------------------------------------------------------------------------------


def test_scale_uncertainty_is_one_over_root_information_and_minus_one_without_information():
    information = np.array([100.0, 4.0, 0.0, -3.0, np.nan, 1e4])
    np.testing.assert_array_equal(report.scale_uncertainty(information), [0.1, 0.5, -1.0, -1.0, -1.0, 0.01])


def _summary_tomogram():
    angle = np.array([0.0, 3.0, -3.0, 6.0, -6.0])
    return {
        "tilt_angle_deg": angle.tolist(),
        "pre_exposure_e_per_angstrom2": [0.0, 3.0, 6.0, 9.0, 12.0],
        "scale_before": [1.0] * 5,
        "scale_per_tilt": [0.9, 0.8, 0.85, 0.7, 0.75],
        "scale_after": [0.9, 0.8, 0.85, 0.7, 1.0],  # the last tilt had no information: input kept
        "scale_uncertainty": report.scale_uncertainty([400.0, 100.0, 25.0, 4.0, 0.0]).tolist(),
        "scale_model": "per_frame",
    }


def _bars(axis):
    """(x, centre, half-length) of every error bar drawn on ``axis``, read from matplotlib's artists."""
    containers = [c for c in axis.containers if c.has_yerr]
    assert len(containers) == 1
    (segments,) = [collection.get_segments() for collection in containers[0].lines[2]]
    bars = [(a[0], (a[1] + b[1]) / 2, abs(b[1] - a[1]) / 2) for a, b in segments]
    for a, b in segments:
        assert a[0] == b[0]  # vertical
    return sorted(bars)


def test_scale_figure_draws_one_sigma_bars_from_the_information_on_both_axes():
    plt = report._pyplot()
    tomogram = _summary_tomogram()
    figure = report._scale_figure(plt, "TS_x", tomogram)
    try:
        by_angle, by_dose = figure.axes[0], figure.axes[1]
        # tilts with information: 1/sqrt(400, 100, 25, 4) = 0.05, 0.1, 0.2, 0.5 around the per-tilt estimate
        expected_angle = sorted([(0.0, 0.9, 0.05), (3.0, 0.8, 0.1), (-3.0, 0.85, 0.2), (6.0, 0.7, 0.5)])
        np.testing.assert_allclose(_bars(by_angle), expected_angle, atol=1e-12)
        expected_dose = sorted([(0.0, 0.9, 0.05), (3.0, 0.8, 0.1), (6.0, 0.85, 0.2), (9.0, 0.7, 0.5)])
        np.testing.assert_allclose(_bars(by_dose), expected_dose, atol=1e-12)
        assert by_angle.get_xlabel() == "tilt angle (°)"
        assert by_dose.get_xlabel() == "dose before the tilt (e⁻/Å²)"
        assert "unitless" in by_angle.get_ylabel()
        # the tilt without information is drawn (hollow) without a bar, and named in the legend
        assert "no information: input kept" in [t.get_text() for t in by_angle.get_legend().get_texts()]
    finally:
        plt.close(figure)


def test_astigmatism_axis_is_the_same_however_relion_writes_u_and_v():
    size, axis = report.astigmatism([31000.0, 30000.0, 30000.0], [30000.0, 31000.0, 30000.0], [30.0, 120.0, 170.0])
    np.testing.assert_array_equal(size, [1000.0, 1000.0, 0.0])
    np.testing.assert_array_equal(axis[:2], [30.0, 30.0])  # U > V at 30°, or U < V with the angle turned by 90°
    _, axis = report.astigmatism([30500.0], [30000.0], [-20.0])
    np.testing.assert_array_equal(axis, [160.0])  # in [0, 180)


def test_hand_figure_shows_nats_z_scores_and_the_verdict_thresholds():
    plt = report._pyplot()
    summary = {"tomograms": {
        "TS_01": {"hand": {"log_likelihood_gain": 13.5, "z_score": 3.4, "verdict": "input hand", "adopted": False}},
        "TS_02": {"hand": {"log_likelihood_gain": -40.0, "z_score": -5.0, "verdict": "opposite hand", "adopted": True}},
    }}
    figure = report._hand_figure(plt, summary)
    try:
        ratio, z = figure.axes
        assert ratio.get_ylabel() == "log-likelihood ratio (nats)"
        assert z.get_ylabel() == "z-score (unitless)"
        assert [round(p.get_height(), 6) for p in ratio.patches] == [13.5, -40.0]
        assert [round(p.get_height(), 6) for p in z.patches] == [3.4, -5.0]
        thresholds = sorted({round(line.get_ydata()[0], 6) for line in ratio.lines if line.get_linestyle() == "--"})
        assert thresholds == [-10.0, 10.0]  # check_handedness's threshold_nats
        assert sorted({round(line.get_ydata()[0], 6) for line in z.lines if line.get_linestyle() == "--"}) == [-3.0, 3.0]
        labels = [t.get_text() for t in ratio.get_xticklabels()]
        assert labels == ["TS_01\ninput hand", "TS_02\nopposite hand\n(opposite hand adopted)"]
        assert [t.get_text() for t in ratio.texts] == ["+13.5", "-40.0"]
    finally:
        plt.close(figure)


# --- after a real assessed refinement ------------------------------------------------------------


def test_summary_has_the_scale_uncertainty_of_the_scale_step(assessed_run):
    summary = json.loads((assessed_run / "summary.json").read_text())
    entry = summary["tomograms"]["TS_01"]
    with np.load(assessed_run / "temp" / "scale" / "TS_01.npz") as arrays:
        information = arrays["information"]
    assert (information > 0).all()
    np.testing.assert_allclose(entry["scale_uncertainty"], 1.0 / np.sqrt(information), rtol=1e-12)
    # 30 particles, 13 tilts: the per-tilt scale is known to about 1 % (measured 0.0094-0.0105)
    assert 0.005 < min(entry["scale_uncertainty"]) and max(entry["scale_uncertainty"]) < 0.02


def test_logfile_has_the_fsc_page_after_an_assessed_run(assessed_run):
    pngs = sorted(p.name for p in (assessed_run / "plots").glob("*.png"))
    assert pngs == ["defocus_TS_01.png", "fsc_before_after.png", "hand_check.png", "scale_TS_01.png"]
    # one page per plot: defocus, scale, hand check, FSC (fsc.png is not added a second time)
    assert pdf_page_count(assessed_run / "logfile.pdf") == 4
    summary = json.loads((assessed_run / "summary.json").read_text())
    assert summary["assessment"]["before"]["particles_per_half"] == [9, 11]


def test_fsc_page_draws_the_assessed_curves_against_frequency(assessed_run):
    plt = report._pyplot()
    assessment = json.loads((assessed_run / "summary.json").read_text())["assessment"]
    figure = report._fsc_figure(plt, assessment)
    try:
        axis = figure.axes[0]
        lines = {line.get_label(): line for line in axis.lines}
        before = lines[f"before: {assessment['before']['resolution_0.143_angstrom']:.2f} Å at 0.143"]
        after = lines[f"after: {assessment['after']['resolution_0.143_angstrom']:.2f} Å at 0.143"]
        np.testing.assert_allclose(before.get_ydata(), assessment["curves"]["before_corrected"][1:])
        np.testing.assert_allclose(after.get_ydata(), assessment["curves"]["after_corrected"][1:])
        # shell i is at i / (64 px * 2 Å) 1/Å: the last (Nyquist) at 0.25 1/Å
        np.testing.assert_allclose(after.get_xdata()[-1], 0.25)
        assert axis.get_xlabel() == "spatial frequency (1/Å)" and axis.get_ylabel() == "FSC (unitless)"
    finally:
        plt.close(figure)


def test_progress_lines_with_rates_reach_run_log_during_assessment(assessed_run):
    log = (assessed_run / "run.log").read_text().splitlines()
    start = [line for line in log if "assess: back-projection (before, after): " in line and "particle images (a particle" in line]
    assert len(start) == 1
    total = int(re.search(r": (\d+) particle images \(a particle", start[0]).group(1))
    pattern = re.compile(r"assess: back-projection \(before, after\): (\d+)/(\d+) particle images \((\d+) %\), "
                         r"([\d.]+)/s, ETA ([\d.]+ s|\d+ min \d+ s), TS_01 \(1/1\)$")
    progress_lines = [pattern.search(line) for line in log if pattern.search(line)]
    # every tilt's chunk advances (13 tilts; the last one finishes the phase and is not a progress line)
    assert len(progress_lines) == 12
    done = [int(m.group(1)) for m in progress_lines]
    assert done == sorted(done) and done[0] > 0 and done[-1] < total
    assert {int(m.group(2)) for m in progress_lines} == {total}
    assert all(float(m.group(4)) > 0 for m in progress_lines)
    assert all(abs(int(m.group(3)) - 100 * d / total) <= 0.5 for m, d in zip(progress_lines, done))
    # the CTF correction of each side reports its steps, and each phase ends with its time
    for side in ("before", "after"):
        steps = [line for line in log if re.search(rf"assess: CTF correction \({side}\): [123]/4 steps \(\d+ %\), [\d.]+/s, ETA", line)]
        assert len(steps) == 3
    assert any(re.search(rf"assess: back-projection \(before, after\): {total} particle images of 1 tomogram\(s\) in [\d.]+ s \([\d.]+/s\)", line)
               for line in log)


def test_extend_report_adds_the_fsc_page_and_truth_without_redrawing_the_rest(assessed_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(assessed_run, out)
    summary = json.loads((out / "summary.json").read_text())
    assessment = summary.pop("assessment")
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "plots" / "fsc_before_after.png").unlink()
    hand = (out / "plots" / "hand_check.png").read_bytes()
    truth = {"TS_01": {"scale_true": [1.0] * 13}}
    paths = report.extend_report(out, assessment=assessment, per_tomogram=truth)
    assert [p.name for p in paths] == ["defocus_TS_01.png", "scale_TS_01.png", "hand_check.png", "fsc_before_after.png"]
    assert pdf_page_count(out / "logfile.pdf") == 4
    assert (out / "plots" / "hand_check.png").read_bytes() == hand  # reused, not drawn again
    written = json.loads((out / "summary.json").read_text())
    assert written["assessment"] == assessment and written["tomograms"]["TS_01"]["scale_true"] == [1.0] * 13
