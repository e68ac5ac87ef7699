"""STAR reading and writing on the real RELION 5.0.1 files of the fixture."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tomoctfrefine.errors import InputError
from tomoctfrefine.io.star import (
    StarDocument,
    format_value,
    format_vector,
    non_finite_columns,
    parse_vector,
    read_star,
    star_text,
    write_star,
)

EXPECTED_BLOCKS = {
    "optimisation_set.star": [""],
    "particles.star": ["general", "optics", "particles"],
    "particles_true.star": ["general", "optics", "particles"],
    "tomograms.star": ["global"],
    "tomograms_true.star": ["global"],
    "TS_01.star": ["TS_01"],
}


def assert_documents_equal(a: StarDocument, b: StarDocument) -> None:
    assert a.version == b.version
    assert list(a.blocks) == list(b.blocks)
    for name in a.blocks:
        x, y = a.blocks[name], b.blocks[name]
        if isinstance(x, dict):
            assert isinstance(y, dict) and list(x) == list(y) and x == y
        else:
            assert list(x.columns) == list(y.columns)
            pd.testing.assert_frame_equal(x, y, check_exact=True)


def test_fixture_has_the_expected_star_files(relion5_small):
    assert len(sorted(relion5_small.rglob("*.star"))) == 18


def test_every_fixture_star_file_reads(relion5_small_star):
    doc = read_star(relion5_small_star)
    assert doc.version == "50001"
    assert list(doc.blocks) == EXPECTED_BLOCKS[relion5_small_star.name]
    for block in doc.blocks.values():
        assert len(block) > 0


def test_write_then_read_is_identical(relion5_small_star, tmp_path):
    doc = read_star(relion5_small_star)
    out = write_star(doc, tmp_path / "copy.star")
    again = read_star(out)
    assert_documents_equal(doc, again)
    # a second write of what was read back is byte-identical: the text is a fixed point
    assert star_text(again) == out.read_text()


def test_read_values_and_types_of_the_tilt_series_table(relion5_small):
    table = read_star(relion5_small / "tilt_series" / "TS_01.star").blocks["TS_01"]
    assert list(table.columns) == [
        "rlnTomoNominalStageTiltAngle", "rlnMicrographPreExposure", "rlnDefocusU", "rlnDefocusV",
        "rlnDefocusAngle", "rlnCtfScalefactor", "rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot",
        "rlnTomoXShiftAngst", "rlnTomoYShiftAngst",
    ]
    assert len(table) == 13
    assert table["rlnDefocusU"].iloc[0] == 33570.994053
    assert table["rlnTomoYShiftAngst"].iloc[-1] == -13.275176


def test_names_stay_strings_and_vectors_stay_text(relion5_small):
    doc = read_star(relion5_small / "runs" / "defocus_scale_aberr" / "particles.star")
    assert doc.blocks["particles"]["rlnTomoParticleName"].iloc[0] == "TS_01/1"
    even = doc.blocks["optics"]["rlnEvenZernike"].iloc[0]
    assert even.startswith("[45.7087298722,-230.529253911,")
    assert parse_vector(even)[8] == 378.362218209
    assert doc.blocks["general"] == {"rlnTomoSubTomosAre2DStacks": 1}


def test_relion_layout_of_written_files(tmp_path, relion5_small):
    doc = read_star(relion5_small / "particles.star")
    text = write_star(doc, tmp_path / "p.star").read_text()
    lines = text.splitlines()
    assert text.count("# version 50001\n\ndata_") == 3
    assert "\ndata_general\n\n_rlnTomoSubTomosAre2DStacks  1\n \n" in text
    assert "loop_ \n_rlnOpticsGroup #1 \n_rlnOpticsGroupName #2 \n" in text
    assert "_rlnRandomSubset #13 " in lines
    row = next(line for line in lines if "TS_01/1 " in line)
    assert row.split() == ["TS_01", "TS_01/1", "1", "77.299576", "28.353621", "-47.439286", "-121.968728",
                           "5.056925", "-71.613860", "0.000000", "0.000000", "0.000000", "1"]
    assert text.endswith(" \n")


def test_key_value_block_written_as_pairs(tmp_path, relion5_small):
    doc = read_star(relion5_small / "optimisation_set.star")
    text = write_star(doc, tmp_path / "o.star").read_text()
    assert "\ndata_\n\n_rlnTomoParticlesFile" in text
    assert "loop_" not in text
    assert read_star(tmp_path / "o.star").blocks[""]["rlnTomoReferenceMaskFile"] == "ref/mask.mrc"


def test_other_version_line_is_kept(tmp_path, relion5_small):
    doc = read_star(relion5_small / "tomograms.star")
    doc.version = "30001"
    path = write_star(doc, tmp_path / "v4.star")
    assert path.read_text().startswith("\n# version 30001\n")
    assert read_star(path).version == "30001"


@pytest.mark.parametrize(
    "value, text",
    [
        (300.0, "300.000000"),
        (-1.0, "-1.000000"),
        (33570.994053, "33570.994053"),
        (1.0 / 3.0, "0.333333333333"),
        (1e-7, "1e-07"),
        (123456789012.5, "123456789012.500000"),
        (float("nan"), "nan"),
        (7, "7"),
        (np.int64(-3), "-3"),
        ("TS_01/1", "TS_01/1"),
        ("two words", '"two words"'),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_floats_round_trip_to_1e_minus_12(tmp_path):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=200) * 10.0 ** rng.integers(-12, 12, size=200), [0.0, 1e300, -5e-300]])
    table = pd.DataFrame({"rlnDefocusU": values, "rlnOpticsGroup": np.arange(len(values))})
    again = read_star(write_star(StarDocument({"x": table}), tmp_path / "f.star")).blocks["x"]
    np.testing.assert_allclose(again["rlnDefocusU"].to_numpy(), values, rtol=1e-11, atol=0)
    assert again["rlnDefocusU"].dtype == np.float64 and again["rlnOpticsGroup"].dtype == np.int64


def test_integral_floats_stay_float_columns(tmp_path):
    table = pd.DataFrame({"rlnTomoHand": [-1.0, 1.0]})
    again = read_star(write_star(StarDocument({"global": table}), tmp_path / "h.star")).blocks["global"]
    assert again["rlnTomoHand"].dtype == np.float64


def test_vectors_round_trip_exactly():
    values = [0.81874292964123, -1e-17, 53.82298746621, 1.0]
    text = format_vector(values)
    assert text.startswith("[") and " " not in text
    assert parse_vector(text) == values
    assert parse_vector("[]") == []


def test_empty_loop_round_trips(tmp_path):
    table = pd.DataFrame({"rlnDefocusU": pd.Series([], dtype=float), "rlnDefocusV": pd.Series([], dtype=float)})
    again = read_star(write_star(StarDocument({"empty": table, "kv": {"rlnTomoName": "a"}}), tmp_path / "e.star"))
    assert list(again.blocks["empty"].columns) == ["rlnDefocusU", "rlnDefocusV"]
    assert len(again.blocks["empty"]) == 0


def test_short_row_is_malformed(tmp_path, relion5_small):
    text = (relion5_small / "particles.star").read_text().replace(" 0.000000 0.000000 0.000000 2\n", " 0.000000 0.000000 2\n", 1)
    path = tmp_path / "short.star"
    path.write_text(text)
    with pytest.raises(InputError) as error:
        read_star(path)
    assert str(error.value) == (
        f"{path}: malformed STAR file: block data_particles: a row has 12 values for 13 columns "
        "('TS_01 TS_01/2 1 40.547857 131.183736 17.883364 -9.907020 117'); "
        "check the file was written completely by RELION or tomoctfrefine"
    )


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as error:
        read_star(tmp_path / "absent.star")
    assert str(error.value) == f"{tmp_path / 'absent.star'}: file not found; check the path"


def test_file_without_data_block(tmp_path):
    path = tmp_path / "nothing.star"
    path.write_text("# version 50001\n\n")
    with pytest.raises(InputError) as error:
        read_star(path)
    assert "malformed STAR file: no data_ block" in str(error.value)


def test_write_is_atomic_and_leaves_no_temporary(tmp_path, relion5_small):
    doc = read_star(relion5_small / "tomograms.star")
    write_star(doc, tmp_path / "t.star")
    write_star(doc, tmp_path / "t.star")
    assert [p.name for p in tmp_path.iterdir()] == ["t.star"]


def test_non_finite_columns():
    table = pd.DataFrame({"a": [1.0, np.nan, np.inf], "b": ["[1,2]", "[nan,1]", "[3,4]"], "c": ["x", "y", "z"]})
    assert non_finite_columns(table) == [("a", 2), ("b", 1)]
