"""``tomoctfrefine assess`` on the relion5_small fixture: before = the input optimisation set (perturbed
CTF, RMS defocus error 881 Å, no scale, no aberrations), after = the same particles with the true CTF."""
import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from tomoctfrefine.cli import main
from tomoctfrefine.io.fsc import read_fsc
from tomoctfrefine.io.optimisation_set import read_optimisation_set


@pytest.fixture(scope="module")
def assessed(tmp_path_factory, relion5_small):
    folder = tmp_path_factory.mktemp("assess")
    truth_set = folder / "truth_optimisation_set.star"
    truth_set.write_text(
        "\n# version 50001\n\ndata_\n\n"
        f"_rlnTomoParticlesFile  {relion5_small / 'truth' / 'particles_true.star'}\n"
        f"_rlnTomoTomogramsFile  {relion5_small / 'truth' / 'tomograms_true.star'}\n"
        f"_rlnTomoReferenceMaskFile  {relion5_small / 'ref' / 'mask.mrc'}\n\n"
    )
    out = folder / "out"
    code = main([
        "assess", "--before", str(relion5_small / "optimisation_set.star"), "--after", str(truth_set), "--o", str(out),
        "--b", "128", "--crop", "64", "--truth", str(relion5_small / "ref" / "map_true.mrc"), "--j", "2",
    ])
    return code, out, json.loads((out / "assess.json").read_text())


def test_true_ctf_map_is_closer_to_the_truth_than_the_perturbed_one(assessed):
    code, _, summary = assessed
    assert code == 0
    before, after = summary["before"]["truth"], summary["after"]["truth"]
    # measured: 0.826 -> 0.835; the perturbed defocus flips CTF phases beyond ~8 Å
    assert after["masked_correlation"] > before["masked_correlation"] + 0.004
    assert after["fsc_0.143_angstrom"] < before["fsc_0.143_angstrom"]
    assert summary["after"]["resolution_0.143_angstrom"] < summary["before"]["resolution_0.143_angstrom"]
    assert summary["resolution_gain_angstrom"] == pytest.approx(
        summary["before"]["resolution_0.143_angstrom"] - summary["after"]["resolution_0.143_angstrom"]
    )
    # the gain is at middle and high frequencies, not in the lowest band
    bands = summary["bands"]
    assert len(bands) == 4 and bands[0]["from_angstrom"] == 128.0 and bands[-1]["to_angstrom"] == 4.0
    assert abs(bands[0]["gain"]) < 0.01
    assert bands[1]["gain"] > 0.02
    # beyond the signal the corrected FSC is noise around 0, not mask leakage of damped shells
    assert min(min(b["fsc_before"], b["fsc_after"]) for b in bands) > -0.05
    assert summary["before"]["particles_per_half"] == summary["after"]["particles_per_half"] == [9, 11]


def test_outputs_feed_the_next_refinement(assessed, relion5_small):
    _, out, summary = assessed
    for side in ("before", "after"):
        folder = out / side
        for name in ("half1.mrc", "half2.mrc", "merged.mrc"):
            with mrcfile.open(folder / name, permissive=True) as mrc:
                assert mrc.data.shape == (64, 64, 64) and float(mrc.voxel_size.x) == 2.0
        curve = read_fsc(folder / "postprocess.star")
        np.testing.assert_allclose(curve.fsc, summary["curves"][f"{side}_corrected"], atol=1e-9)
        opt = read_optimisation_set(folder / "optimisation_set.star")
        assert Path(opt.ref1_path) == (folder / "half1.mrc").resolve()
        assert Path(opt.fsc_path) == (folder / "postprocess.star").resolve()
        assert Path(opt.mask_path) == (relion5_small / "ref" / "mask.mrc").resolve()
    assert (out / "fsc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.rglob(".*")]  # no temporary files left


def test_bad_box_is_a_one_line_error(tmp_path, capsys, relion5_small):
    code = main(["assess", "--before", str(relion5_small / "optimisation_set.star"), "--after", str(relion5_small / "optimisation_set.star"),
                 "--o", str(tmp_path / "x"), "--b", "65"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: --b [--b]: box size 65 must be even and at least 8; give an even box size such as 128"


def test_missing_truth_map_names_the_file_and_flag(tmp_path, capsys, relion5_small):
    missing = tmp_path / "nope.mrc"
    code = main(["assess", "--before", str(relion5_small / "optimisation_set.star"), "--after", str(relion5_small / "optimisation_set.star"),
                 "--o", str(tmp_path / "x"), "--b", "64", "--truth", str(missing)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {missing} [--truth]: true map not found; check the path given to --truth"
