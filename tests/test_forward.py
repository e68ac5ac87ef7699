"""Forward model: reference preparation, weights, extraction and prediction (spec sections 5-6),
checked against closed forms, a real-space projection, an independent extraction, and the RELION-5
fixture with its true CTF."""
import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

from tomoctfrefine import forward, reference, statistics
from tomoctfrefine.errors import InputError
from tomoctfrefine.io.maps import read_map
from tomoctfrefine.io.particles import half_sets, particle_positions_px, particle_rotations, particles_of, read_particle_set, optics_zernike
from tomoctfrefine.io.tomograms import Tomogram, load_tilt_images, read_tomogram_set, tomogram
from tomoctfrefine.physics.ctf import Optics, ctf_gamma
from tomoctfrefine.physics.geometry import euler_zyz_matrices, euler_zyz_matrix, fourier_grid_per_angstrom, projection_matrix


def synthetic_tomogram(tilts_deg, size=(160, 160, 64), image=(160, 160), pixel=2.0, zrot=7.0, defocus=20000.0):
    n = len(tilts_deg)
    matrices = np.stack([projection_matrix(0.3, t, zrot, 6.0, -4.0, pixel, size, image) for t in tilts_deg])
    return Tomogram(
        name="synthetic", optics=Optics(300.0, 2.7, 0.1), pixel_size_angstrom=pixel, size_px=size, image_size_px=image,
        hand=-1.0, defocus_slope=1.0, fractional_dose_e_per_angstrom2=3.0, bfactor_per_electron_dose_angstrom2=0.0,
        projection_matrices=matrices, defocus_u_angstrom=np.full(n, defocus + 300.0), defocus_v_angstrom=np.full(n, defocus - 300.0),
        defocus_angle_deg=np.full(n, 30.0), ctf_scale=np.ones(n), ctf_bfactor_angstrom2=np.zeros(n), phase_shift_deg=np.zeros(n),
        pre_exposure_e_per_angstrom2=np.zeros(n))


def blob_map(s, centres, sigmas, amplitudes):
    z, y, x = np.mgrid[0:s, 0:s, 0:s].astype(float)
    volume = np.zeros((s, s, s))
    for (cx, cy, cz), sigma, a in zip(centres, sigmas, amplitudes):
        volume += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return volume


# --------------------------------------------------------------------------------------------
# reference preparation and weights


def test_taper_and_presharpen_follow_relion():
    s = 32
    volume = np.random.default_rng(0).normal(size=(s, s, s)) + 3.0
    tapered = reference.taper_volume(volume)
    axis = np.arange(s) - s // 2
    r = np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    assert np.all(tapered[r >= s / 2] == 0)
    inner = r < s / 2 - 10
    c = np.where(inner, 1.0, 0.5 - 0.5 * np.cos(np.pi * (s / 2 - r) / 10))
    c[r >= s / 2] = 0
    mean = np.sum(c * volume) / np.sum(c)
    np.testing.assert_allclose(tapered[inner], volume[inner] - mean)
    sharpened = reference.presharpen(np.ones((s, s, s)))
    assert sharpened[s // 2, s // 2, s // 2] == 0.0
    assert sharpened[s // 2, s // 2, s // 2 + 8] == pytest.approx(1.0 / (np.sinc(8 / s) ** 2 + 0.02))


def test_centred_fourier_transform_is_unitary_rfftn_with_origin_at_the_box_centre():
    volume = np.random.default_rng(1).normal(size=(16, 16, 16))
    ft = reference.centred_fourier_transform(volume)
    np.testing.assert_allclose(ft, np.fft.rfftn(np.fft.ifftshift(volume), norm="ortho"), atol=2e-6)
    assert ft.dtype == np.complex64


def test_bricked_references_round_trip_and_cropping_keeps_the_slices():
    rng = np.random.default_rng(2)
    maps = [rng.normal(size=(20, 20, 20)) for _ in range(2)]
    refs = reference.prepare_references(maps[0], maps[1], None, 30)  # 30: grid not a multiple of the brick
    plain = refs.half_maps_ft
    assert plain.shape == (2, 30, 30, 16)
    np.testing.assert_array_equal(reference.from_bricks(reference.to_bricks(plain[1]), 30), plain[1])
    # the particle itself: its solvent level (outer shell) removed, no box-filling pedestal, centre kept
    solvent = reference.solvent_level(maps[0])
    radius = np.sqrt(sum(g**2 for g in np.meshgrid(*[np.arange(30) - 15] * 3, indexing="ij")))
    expected = (reference.pad_volume(maps[0] - solvent, 30) * reference._taper_weight(radius, 15.0, 10.0)
                / (np.sinc(radius / 30) ** 2 + reference.PRESHARPEN_EPSILON))
    np.testing.assert_allclose(plain[0], reference.centred_fourier_transform(expected), atol=1e-5)
    cropped = refs.cropped(9.0)
    assert cropped.grid_size == 22 and cropped.max_radius_px == 9.0
    tomo = synthetic_tomogram([0.0, 40.0])
    rotations = euler_zyz_matrices(*rng.uniform(-180, 180, (3, 3)))
    full = forward.predict(refs, tomo, rotations, np.array([1, 2, 1]))
    small = forward.predict(cropped, tomo, rotations, np.array([1, 2, 1]))
    inside = reference.radius_px(30) <= 9.0
    np.testing.assert_allclose(small[..., inside], full[..., inside], rtol=1e-6, atol=1e-7)
    assert np.all(small[..., ~inside] == 0)


def test_prepare_rejects_a_reference_larger_than_the_box():
    half = np.zeros((48, 48, 48), dtype=np.float32)
    with pytest.raises(InputError, match=r"half map 1 \[--b\]: reference is 48 px, larger than the box 32 px; choose a box"):
        reference.prepare_references(half, half, None, 32)


def test_noise_weights_of_white_noise_are_inverse_variance():
    rng = np.random.default_rng(3)
    images = rng.normal(0.0, 2.0, size=(2, 256, 256)).astype(np.float32)
    images[1] *= 2.0
    static = reference.noise_weights(images, 32)
    per_frame = reference.noise_weights(images, 32, per_frame=True)
    # unitary FFT: E|F|^2 = sigma^2; static weight = 1/mean(sigma^2) = 1/10
    assert static.shape == (2, 32, 17)
    assert np.median(static) == pytest.approx(0.1, rel=0.03)
    assert np.median(per_frame[0]) == pytest.approx(0.25, rel=0.03)
    assert np.median(per_frame[1]) == pytest.approx(1 / 16, rel=0.03)
    np.testing.assert_array_equal(static[0], static[1])


def test_frequency_cutoff_from_fsc_and_manual_cutoff():
    s = 64
    refs = reference.PreparedReferences.from_fourier(np.zeros((2, s, s, s // 2 + 1), np.complex64), s, 2.0)
    fsc = np.concatenate([np.ones(11), np.linspace(0.9, 0.0, 22)])  # 33 shells (box 64), first < 0.143 at index 29
    snr, last = reference.snr_from_fsc(fsc, s)
    assert last == 28
    assert snr[5] == pytest.approx(1.0)
    weight = reference.frequency_cutoff_weight(refs, fsc=fsc, fsc_thresh_width_px=5.0)
    r = reference.radius_px(s)
    assert np.all(weight[r < 28] == 1.0)
    assert np.all(weight[np.floor(r) + 1 > 33] == 0.0)
    flank = (r > 28) & (r < 33) & (np.floor(r) + 1 < 33)  # and inside the last radial bin (sh = 33)
    np.testing.assert_allclose(weight[flank], 0.5 * (1 + np.cos(np.pi * (r[flank] - 28) / 5)))
    # --freq_cutoff 8 Å with 2 Å/px: int(64 * 2 / 8) = 16 < 28
    cut = reference.frequency_cutoff_weight(refs, fsc=fsc, freq_cutoff_angstrom=8.0)
    assert np.all(cut[r < 16] == 1.0) and np.all(cut[r >= 21] == 0.0)
    snr_weighted = reference.frequency_cutoff_weight(refs, fsc=fsc, use_snr_weight=True)
    i = np.argmin(np.abs(r[0] - 20))
    f = np.interp(20 * 2 * 32 / 64, np.arange(33), np.where(fsc < 0.143, 0, fsc))
    assert snr_weighted[0, i] == pytest.approx(2 * f / (f + 1))


def test_row_range_mask_excludes_high_dose_frequencies():
    tomo = synthetic_tomogram([0.0, 30.0])
    tomo = dataclasses.replace(tomo, pre_exposure_e_per_angstrom2=np.array([0.0, 60.0]))
    damping = forward.tilt_damping(tomo, 32)
    mask = forward.row_range_mask(np.ones((32, 17)), damping, 0.02)
    r = reference.radius_px(32)
    assert mask[0, 0].sum() == 17 and mask[0][r <= 15].all()
    assert mask[1, 0].sum() < 17  # dose weight at 60 e/Å² falls below 0.02 before Nyquist
    assert not mask[1][damping[1] < 0.02].any()


# --------------------------------------------------------------------------------------------
# prediction normalisation and orientation against a real-space projection


def real_space_projection(volume, matrix):
    """Project ``volume`` [z,y,x] rotated by ``matrix`` (reference -> image frame) along the image z axis."""
    s = volume.shape[0]
    c = s // 2
    w, v, u = np.mgrid[0:s, 0:s, 0:s].astype(float) - c
    image_frame = np.stack([u, v, w])                            # (x, y, z) in the image frame
    source = np.einsum("ji,jabc->iabc", matrix, image_frame) + c  # M^T x: reference coordinates
    rotated = ndimage.map_coordinates(volume, source[::-1], order=3, mode="constant")
    return rotated.sum(axis=0)


def test_prediction_equals_unitary_ft_of_projection():
    s = 64
    volume = blob_map(s, [(32, 32, 32), (41, 30, 27), (25, 38, 35), (33, 23, 40)], [2.5, 2.0, 2.2, 1.8], [0.3, 1.0, 0.9, -0.7])
    refs = reference.prepare_references(volume, volume, None, s)
    tomo = synthetic_tomogram([0.0, 30.0, -45.0], size=(128, 128, 64), image=(128, 128))
    rotation = euler_zyz_matrix(40.0, 70.0, -20.0)
    predicted = forward.predict(refs, tomo, rotation[None], np.array([1]))[0]
    r = reference.radius_px(s)
    band = (r > 3) & (r < 20)
    for f in range(3):
        matrix = tomo.projection_matrices[f, :3, :3] @ rotation
        expected = np.fft.rfft2(np.fft.ifftshift(real_space_projection(volume, matrix)), norm="ortho")
        ratio = np.vdot(expected[band], predicted[f][band]) / np.vdot(expected[band], expected[band])
        correlation = abs(np.vdot(expected[band], predicted[f][band])) / np.linalg.norm(expected[band]) / np.linalg.norm(predicted[f][band])
        assert correlation > 0.995
        assert ratio.real == pytest.approx(1.0, abs=0.01)  # incl. the 1.02 that undoes presharpening's 0.02
        assert abs(ratio.imag) < 0.01
        # the transposed rotation (a classic convention slip) does not match
        wrong = np.fft.rfft2(np.fft.ifftshift(real_space_projection(volume, matrix.T)), norm="ortho")
        assert abs(np.vdot(wrong[band], predicted[f][band])) / np.linalg.norm(wrong[band]) / np.linalg.norm(predicted[f][band]) < 0.8


def test_prediction_is_box_independent_and_dose_weighted():
    volume = blob_map(48, [(24, 24, 24), (30, 20, 26)], [2.0, 1.5], [1.0, 0.5])
    tomo = synthetic_tomogram([0.0], size=(128, 128, 64), image=(128, 128))
    tomo = dataclasses.replace(tomo, pre_exposure_e_per_angstrom2=np.array([20.0]))
    small = forward.predict(reference.prepare_references(volume, volume, None, 48), tomo, np.eye(3)[None], [2])[0, 0]
    large = forward.predict(reference.prepare_references(volume, volume, None, 96), tomo, np.eye(3)[None], [2])[0, 0]
    # same physical frequency: pixel x of box 48 is pixel 2x of box 96; unitary 2D FTs of the same
    # projection differ by the box ratio (s_small / s_large) in amplitude per pixel
    assert large[0, 10] == pytest.approx(small[0, 5] * 48 / 96, rel=0.03)
    fx, fy = fourier_grid_per_angstrom(48, 2.0)
    from tomoctfrefine.physics.dose import dose_weight
    undosed = forward.predict(reference.prepare_references(volume, volume, None, 48),
                              dataclasses.replace(tomo, pre_exposure_e_per_angstrom2=np.array([0.0])), np.eye(3)[None], [2])[0, 0]
    np.testing.assert_allclose(small, undosed * dose_weight(20.0, np.hypot(fx, fy)), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# extraction


def test_observation_of_a_gaussian_spot_is_centred_and_unitary():
    s, sigma, amplitude = 48, 2.0, 5.0
    tomo = synthetic_tomogram([0.0, 20.0])
    position = np.array([[83.3, 71.8, 35.6]])
    xy = forward.image_positions_px(tomo, position)[0]
    images = np.zeros((2, 160, 160), np.float32)
    yy, xx = np.mgrid[0:160, 0:160]
    for f in range(2):
        images[f] = amplitude * np.exp(-((xx - xy[f, 0]) ** 2 + (yy - xy[f, 1]) ** 2) / (2 * sigma**2))
    observed = forward.extract_observations(images, tomo, position, s)
    assert observed.visible.all()
    r = reference.radius_px(s)
    expected = amplitude * 2 * np.pi * sigma**2 / s * np.exp(-2 * np.pi**2 * sigma**2 * r**2 / s**2)
    for f in range(2):
        np.testing.assert_allclose(observed.spectra[0, f], expected, atol=2e-4 * expected.max())


def numpy_observation(image, xy, s):
    """Spec 6.1 written out in numpy: clamp, cropCircle (outside mean, 5 px edge), centre, unitary FFT, shift."""
    centre = np.floor(xy + 0.5)
    t = xy - centre
    ox, oy = (centre - s // 2).astype(int)
    rows = np.clip(oy + np.arange(s), 0, image.shape[0] - 1)
    cols = np.clip(ox + np.arange(s), 0, image.shape[1] - 1)
    box = image[np.ix_(rows, cols)].astype(np.float64)
    yy, xx = np.mgrid[0:s, 0:s] - s / 2.0
    r = np.hypot(xx, yy)
    taper = np.where(r < s / 2 - 5, 1.0, np.where(r < s / 2, 0.5 - 0.5 * np.cos(np.pi * (s / 2 - r) / 5), 0.0))
    box = taper * (box - box[r > s / 2].mean())
    ky, kx = np.fft.fftfreq(s, 1 / s)[:, None], np.arange(s // 2 + 1)[None, :]
    return np.fft.rfft2(np.fft.ifftshift(box), norm="ortho") * np.exp(2j * np.pi * (kx * t[0] + ky * t[1]) / s)


def test_box_extraction_follows_the_spec_including_edge_clamping():
    rng = np.random.default_rng(5)
    image = rng.normal(size=(90, 110)).astype(np.float32) + np.linspace(0, 3, 110)[None, :].astype(np.float32)
    positions = np.array([[10.2, 15.7], [55.5, 44.5], [104.9, 88.1], [-3.2, 40.0], [60.0, 60.49]])
    ours = forward.observe(image, positions, 32)
    for i, xy in enumerate(positions):
        expected = numpy_observation(image, xy, 32)
        np.testing.assert_allclose(ours[i], expected, atol=2e-5 * np.abs(expected).max())


# --------------------------------------------------------------------------------------------
# the RELION-5 fixture with its true CTF


@pytest.fixture(scope="module")
def fixture_data(relion5_small):
    tomo = tomogram(read_tomogram_set(relion5_small / "truth" / "tomograms_true.star"), "TS_01")
    pset = read_particle_set(relion5_small / "truth" / "particles_true.star")
    rows = particles_of(pset, "TS_01")
    half1, pixel = read_map(relion5_small / "ref" / "half1.mrc")
    half2, _ = read_map(relion5_small / "ref" / "half2.mrc")
    mask, _ = read_map(relion5_small / "ref" / "mask.mrc")
    s = 96
    refs = reference.prepare_references(half1, half2, mask, s, pixel)
    images = load_tilt_images(tomo)
    weights = reference.noise_weights(images, s) * reference.frequency_cutoff_weight(refs)
    truth = json.loads((relion5_small / "truth" / "truth.json").read_text())
    return dict(tomo=tomo, images=images, positions=particle_positions_px(pset, rows, tomo),
                rotations=particle_rotations(pset, rows), halves=half_sets(pset, rows), even=optics_zernike(pset, 1)[0],
                refs=refs, weights=weights, truth=truth, s=s)


def explained(d, **changes):
    """Correlation and explained chi^2 (sum over tilts of (e^T b)^2 / e^T A e at delta = 0) of the model."""
    tomo = dataclasses.replace(d["tomo"], **{k: v for k, v in changes.items() if k not in ("rotations", "even")})
    stats = statistics.compute_statistics(tomo, d["images"], d["positions"], changes.get("rotations", d["rotations"]),
                                          d["halves"], d["refs"], d["weights"], changes.get("even", d["even"]))
    b = -stats.b_s.real.sum()
    correlation = b / np.sqrt(stats.a_ss.sum() * stats.oo.sum())
    chi2 = np.sum(stats.b_s.real.sum(axis=(1, 2)) ** 2 / stats.a_ss.sum(axis=(1, 2)))
    return correlation, chi2


def test_fixture_true_ctf_beats_wrong_defocus_hand_contrast_and_orientation(fixture_data):
    d = fixture_data
    tomo = d["tomo"]
    correlation, chi2 = explained(d)
    assert correlation > 0.08  # positive: raw images have inverted contrast, q carries it
    for offset in (-1000.0, 1000.0):
        c, x = explained(d, defocus_u_angstrom=tomo.defocus_u_angstrom + offset, defocus_v_angstrom=tomo.defocus_v_angstrom + offset)
        assert c < correlation - 0.005 and x < chi2 - 500
    # the hand only moves defocus by the depth (about +-100 Å here): a small but significant chi^2 loss
    c, x = explained(d, hand=-tomo.hand)
    assert c < correlation and x < chi2 - 5
    c, x = explained(d, even=[])
    assert x < chi2 - 2
    transposed = np.transpose(d["rotations"], (0, 2, 1))
    c, x = explained(d, rotations=transposed)
    assert c < 0.5 * correlation
    # inverted contrast: the same statistics give the opposite sign
    assert -correlation < 0


def test_fixture_defocus_optimum_is_at_the_truth(fixture_data):
    d = fixture_data
    tomo = d["tomo"]
    offsets = np.array([-240.0, 0.0, 240.0])
    chi2 = [explained(d, defocus_u_angstrom=tomo.defocus_u_angstrom + o, defocus_v_angstrom=tomo.defocus_v_angstrom + o)[1]
            for o in offsets]
    curvature = chi2[0] - 2 * chi2[1] + chi2[2]
    vertex = -240.0 * (chi2[2] - chi2[0]) / (2 * curvature)
    assert curvature < 0
    assert abs(vertex) < 60.0  # Å; the scan step of RELION's default search is 60.6 Å


def test_fixture_particles_sit_at_the_box_centre(fixture_data):
    """Cross-correlating observed boxes with CTF-modulated predictions peaks at the origin (sub-pixel)."""
    d = fixture_data
    tomo, s = d["tomo"], d["s"]
    observed = forward.extract_observations(d["images"], tomo, d["positions"], s)
    predicted = forward.predict(d["refs"], tomo, d["rotations"], d["halves"])
    fx, fy = fourier_grid_per_angstrom(s, tomo.pixel_size_angstrom)
    depth = forward.depth_defocus_angstrom(tomo, d["positions"])
    total = np.zeros((s, s // 2 + 1), complex)
    for f in range(tomo.tilt_count):
        for i in np.nonzero(observed.visible[:, f])[0]:
            gamma = ctf_gamma(tomo.defocus_u_angstrom[f] + depth[i, f], tomo.defocus_v_angstrom[f] + depth[i, f],
                              tomo.defocus_angle_deg[f], tomo.optics, fx, fy)
            model = np.sin(gamma) * predicted[i, f]  # -CTF * prediction
            total += d["weights"][f] * observed.spectra[i, f] * np.conj(model)
    cc = np.fft.fftshift(np.fft.irfft2(total, s=(s, s)))
    peak = np.unravel_index(np.argmax(cc), cc.shape)
    assert peak == (s // 2, s // 2) and cc[peak] > 0
    y, x = peak
    dx = 0.5 * (cc[y, x - 1] - cc[y, x + 1]) / (cc[y, x - 1] - 2 * cc[y, x] + cc[y, x + 1])
    dy = 0.5 * (cc[y - 1, x] - cc[y + 1, x]) / (cc[y - 1, x] - 2 * cc[y, x] + cc[y + 1, x])
    assert abs(dx) < 0.2 and abs(dy) < 0.2


def test_box_noise_fraction_matches_white_noise_in_observed_boxes():
    rng = np.random.default_rng(11)
    image = rng.normal(0.0, 1.0, size=(600, 600)).astype(np.float32)
    centres = rng.uniform(70, 530, size=(200, 2))
    power = np.mean(np.abs(forward.observe(image, centres, 128)[:, 1:, 1:]) ** 2)
    assert forward.box_noise_fraction(128) == pytest.approx(0.7107, abs=1e-4)
    assert power == pytest.approx(forward.box_noise_fraction(128), rel=0.01)


def test_fixture_odd_aberration_enters_as_exp_plus_i_chi_odd(fixture_data, relion5_small):
    """With the truth's odd Zernike terms, the model o = -c exp(i chi_odd) sin(gamma) q explains more than
    without them, and the opposite sign explains less (RELION multiplies predictions by exp(i chi_odd))."""
    from tomoctfrefine.io.particles import optics_zernike as zernike_of
    from tomoctfrefine.physics.zernike import odd_phase_rad

    d = fixture_data
    pset = read_particle_set(relion5_small / "truth" / "particles_true.star")
    odd = zernike_of(pset, 1)[1]
    assert odd == [0.0, 0.0, 150.0, 0.0, 0.0, -100.0]
    stats = statistics.compute_statistics(d["tomo"], d["images"], d["positions"], d["rotations"], d["halves"], d["refs"],
                                          d["weights"], d["even"])
    fx, fy = fourier_grid_per_angstrom(d["s"], d["tomo"].pixel_size_angstrom)
    chi = odd_phase_rad(odd, fx, fy)
    explained = {}
    for sign in (1, 0, -1):
        projected = np.real(np.exp(-1j * sign * chi) * stats.b_s).sum(axis=(1, 2))
        explained[sign] = np.sum(projected**2 / stats.a_ss.sum(axis=(1, 2)))
    assert explained[1] > explained[0] + 20 and explained[0] > explained[-1] + 20


def test_snr_from_half_maps_follows_relion():
    """Half maps = signal + independent noise: the shell SNR weight is (tau^2 - sigma^2)/tau^2."""
    rng = np.random.default_rng(4)
    s = 24
    signal = ndimage.gaussian_filter(rng.normal(size=(s, s, s)), 1.0) * 20
    refs = reference.prepare_references(signal + rng.normal(size=(s, s, s)), signal + rng.normal(size=(s, s, s)), None, s)
    weight, last = reference.snr_from_half_maps(refs)
    f1, f2 = refs.half_maps_ft.astype(complex)
    k = np.fft.fftfreq(s, 1 / s)
    shell = np.floor(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(s // 2 + 1)[None, None, :] ** 2) + 0.5).astype(int)
    for r in (2, 5, 9):
        tau2 = np.mean((np.abs(f1) ** 2 + np.abs(f2) ** 2)[shell == r] / 2)
        sigma2 = np.mean(np.abs(f1 - f2)[shell == r] ** 2 / 2)
        assert weight[r] == pytest.approx((tau2 - sigma2) / tau2)
    assert weight[2] > 0.9 and weight[last] >= 0.05 and (last == s // 2 or weight[last + 1] < 0.05)
