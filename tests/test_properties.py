"""Property-based tests (hypothesis): STAR round trips of random tables, projection-geometry invariants
and CTF symmetries, over the whole range of values the files and the physics allow.

Example counts are kept small (the file runs in a few seconds); hypothesis shrinks any failure to the
simplest table or geometry that breaks a property.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tomoctfrefine.io.star import StarDocument, format_vector, parse_vector, read_star, write_star
from tomoctfrefine.physics.ctf import Optics, ctf_2d, defocus_from_quadratic_form, quadratic_form_from_defocus
from tomoctfrefine.physics.geometry import euler_zyz_matrix, projection_matrix, rotation_x, rotation_y, rotation_z

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ----------------------------------------------------------------------------------------- STAR

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12) | st.floats(
    allow_nan=False, allow_infinity=False, min_value=-1e-3, max_value=1e-3)
integers = st.integers(min_value=-(2**31), max_value=2**31)
# names as RELION writes them: no white space, no STAR syntax at the start
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_./:-]{0,15}", fullmatch=True).filter(
    lambda s: not s.startswith(("data_", "loop_")))
vectors = st.lists(finite, min_size=0, max_size=9)


@st.composite
def tables(draw):
    rows = draw(st.integers(min_value=1, max_value=6))
    return pd.DataFrame({
        "rlnDefocusU": draw(st.lists(finite, min_size=rows, max_size=rows)),
        "rlnOpticsGroup": draw(st.lists(integers, min_size=rows, max_size=rows)),
        "rlnMicrographName": draw(st.lists(names, min_size=rows, max_size=rows)),
        "rlnEvenZernike": [format_vector(v) for v in draw(st.lists(vectors, min_size=rows, max_size=rows))],
        "rlnCtfScalefactor": draw(st.lists(finite, min_size=rows, max_size=rows)),
    })


@SETTINGS
@given(table=tables(), general=st.dictionaries(st.sampled_from(["rlnTomoSubTomosAre2DStacks", "rlnOpticsGroup"]), integers, min_size=1),
       name=st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True))
def test_star_round_trip_of_random_tables(tmp_path, table, general, name):
    path = tmp_path / "random.star"
    write_star(StarDocument({"general": general, name: table}, version="50001"), path)
    back = read_star(path)
    assert back.version == "50001" and list(back.blocks) == ["general", name]
    assert {k: int(v) for k, v in back.blocks["general"].items()} == general
    read = back.blocks[name]
    assert list(read.columns) == list(table.columns)
    # floats: six decimals when exact, else 12 significant digits (RELION reads doubles the same way)
    for column in ("rlnDefocusU", "rlnCtfScalefactor"):
        np.testing.assert_allclose(read[column].to_numpy(dtype=float), table[column].to_numpy(dtype=float), rtol=1e-11, atol=0)
    assert read["rlnOpticsGroup"].tolist() == table["rlnOpticsGroup"].tolist()
    assert read["rlnMicrographName"].tolist() == table["rlnMicrographName"].tolist()
    assert [parse_vector(v) for v in read["rlnEvenZernike"]] == [parse_vector(v) for v in table["rlnEvenZernike"]]
    # a second pass does not drift further (12 significant digits are not idempotent as text: a value
    # written as 720575940380.0 may come back as 720575940380.000000, the same number)
    again = tmp_path / "again.star"
    write_star(back, again)
    twice = read_star(again).blocks[name]
    for column in ("rlnDefocusU", "rlnCtfScalefactor"):
        np.testing.assert_allclose(twice[column].to_numpy(dtype=float), table[column].to_numpy(dtype=float), rtol=1e-11, atol=0)
    assert twice.drop(columns=["rlnDefocusU", "rlnCtfScalefactor"]).equals(read.drop(columns=["rlnDefocusU", "rlnCtfScalefactor"]))


# ------------------------------------------------------------------------------------- geometry

angles = st.floats(min_value=-180, max_value=180, allow_nan=False)


def assert_rotation(matrix: np.ndarray) -> None:
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-12)
    assert abs(np.linalg.det(matrix) - 1.0) < 1e-12


@SETTINGS
@given(x_tilt=st.floats(-5, 5), y_tilt=st.floats(-70, 70), z_rot=angles,
       shift=st.tuples(st.floats(-800, 800), st.floats(-800, 800)), pixel=st.floats(0.5, 12.0),
       tomogram=st.tuples(st.integers(2, 4000), st.integers(2, 4000), st.integers(2, 2000)),
       image=st.tuples(st.integers(2, 4000), st.integers(2, 4000)))
def test_tomogram_centre_projects_to_image_centre_plus_shift(x_tilt, y_tilt, z_rot, shift, pixel, tomogram, image):
    matrix = projection_matrix(x_tilt, y_tilt, z_rot, shift[0], shift[1], pixel, tomogram, image)
    centre = np.array([tomogram[0] // 2, tomogram[1] // 2, tomogram[2] // 2, 1.0])
    expected = np.array([image[0] // 2 + shift[0] / pixel, image[1] // 2 + shift[1] / pixel, 0.0, 1.0])
    np.testing.assert_allclose(matrix @ centre, expected, rtol=0, atol=1e-9 * max(tomogram))
    assert_rotation(matrix[:3, :3])
    np.testing.assert_array_equal(matrix[3], [0, 0, 0, 1])
    # a displacement of the particle moves its image by the rotated displacement (no scaling)
    step = np.array([3.0, -2.0, 5.0, 0.0])
    assert np.isclose(np.linalg.norm((matrix @ step)[:3]), np.linalg.norm(step[:3]), rtol=1e-12)


@SETTINGS
@given(a=angles, b=angles, c=angles)
def test_rotations_are_orthonormal(a, b, c):
    for matrix in (rotation_x(a), rotation_y(b), rotation_z(c), euler_zyz_matrix(a, b, c)):
        assert_rotation(matrix)


@SETTINGS
@given(a=angles, b=angles, c=angles)
def test_euler_zyz_composes_relions_elementary_rotations(a, b, c):
    # RELION's Euler_angles2matrix is the passive form of Rz(rot) Ry(tilt) Rz(psi): its transpose
    np.testing.assert_allclose(euler_zyz_matrix(a, b, c), (rotation_z(a) @ rotation_y(b) @ rotation_z(c)).T, atol=1e-12)


# ------------------------------------------------------------------------------------------ CTF

defocus = st.floats(min_value=2000, max_value=60000)
optics = st.builds(Optics, st.sampled_from([100.0, 200.0, 300.0]), st.floats(0.0, 4.0), st.floats(0.0, 0.3))


def frequencies(seed: int, pixel: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.uniform(-0.5 / pixel, 0.5 / pixel, size=(2, 200)))


@SETTINGS
@given(u=defocus, v=defocus, angle=angles, optics=optics, seed=st.integers(0, 2**32 - 1), pixel=st.floats(0.8, 5.0),
       phase=st.floats(0, 180), bfactor=st.floats(0, 400))
def test_ctf_is_centrosymmetric(u, v, angle, optics, seed, pixel, phase, bfactor):
    fx, fy = frequencies(seed, pixel)
    np.testing.assert_array_equal(ctf_2d(u, v, angle, optics, fx, fy, phase, bfactor),
                                  ctf_2d(u, v, angle, optics, -fx, -fy, phase, bfactor))


@SETTINGS
@given(u=defocus, v=defocus, angle=angles, optics=optics, seed=st.integers(0, 2**32 - 1), pixel=st.floats(0.8, 5.0))
def test_swapping_u_and_v_with_a_quarter_turn_is_the_same_ctf(u, v, angle, optics, seed, pixel):
    fx, fy = frequencies(seed, pixel)
    np.testing.assert_allclose(ctf_2d(v, u, angle + 90.0, optics, fx, fy), ctf_2d(u, v, angle, optics, fx, fy), rtol=0, atol=1e-8)


@SETTINGS
@given(u=defocus, v=defocus, angle=angles, optics=optics, seed=st.integers(0, 2**32 - 1), pixel=st.floats(0.8, 5.0))
def test_quadratic_form_round_trip_is_the_same_ctf(u, v, angle, optics, seed, pixel):
    fx, fy = frequencies(seed, pixel)
    u2, v2, angle2 = defocus_from_quadratic_form(*quadratic_form_from_defocus(u, v, angle))
    assert u2 <= v2 + 1e-9 * max(u, v)  # RELION's order after refinement
    assert {round(u2, 5), round(v2, 5)} == {round(min(u, v), 5), round(max(u, v), 5)}
    assert -180.0 <= angle2 <= 180.0  # atan2 of RELION's eigenvector: -180 when its sine is -0.0
    np.testing.assert_allclose(ctf_2d(u2, v2, angle2, optics, fx, fy), ctf_2d(u, v, angle, optics, fx, fy), rtol=0, atol=1e-8)
