"""Particle reconstruction against RELION 5.0.1's own reconstruction of the relion5_small fixture.

``runs/reconstruct_truth/merged.mrc`` is ``relion_tomo_reconstruct_particle --b 128 --crop 64`` with the
true CTF; ``runs/reconstruct/merged.mrc`` the same with RELION's refined CTF, scale and Zernike terms.
Correlations are the fixture README's measure (maps times the mask, low-passed at 0.15/px).
"""

import mrcfile
import numpy as np
import pytest

from tomoctfrefine.errors import InputError
from tomoctfrefine.fsc import fourier_shell_correlation, masked_correlation
from tomoctfrefine.io.optimisation_set import read_optimisation_set
from tomoctfrefine.physics.geometry import euler_zyz_matrix
from tomoctfrefine.reconstruct import (
    FourierAccumulators,
    finalise,
    reconstruct,
    wiener_regulariser,
    write_reconstruction,
)
from tomoctfrefine.kernels import backproject_slices


def _read(path):
    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=np.float64), float(mrc.voxel_size.x)


@pytest.fixture(scope="module")
def truth(relion5_small):
    return _read(relion5_small / "ref" / "map_true.mrc")[0], _read(relion5_small / "ref" / "mask.mrc")[0]


@pytest.fixture(scope="module")
def true_ctf_reconstruction(relion5_small):
    opt = read_optimisation_set(particles=relion5_small / "truth" / "particles_true.star", tomograms=relion5_small / "truth" / "tomograms_true.star")
    return reconstruct(opt, 128, 64)


def test_true_ctf_map_correlates_with_truth_as_well_as_relions(true_ctf_reconstruction, truth, relion5_small):
    true_map, mask = truth
    relion = _read(relion5_small / "runs" / "reconstruct_truth" / "merged.mrc")[0]
    ours = masked_correlation(true_ctf_reconstruction.merged, true_map, mask, lowpass_per_px=0.15)
    theirs = masked_correlation(relion, true_map, mask, lowpass_per_px=0.15)
    assert theirs == pytest.approx(0.917, abs=5e-4)  # the README's number: the measure is the same
    # Same data, same algorithm: equal to RELION's within its float32 rounding.
    assert ours >= theirs - 1e-4


def test_same_hand_orientation_contrast_and_scale_as_relion(true_ctf_reconstruction, truth, relion5_small):
    _, mask = truth
    relion, voxel = _read(relion5_small / "runs" / "reconstruct_truth" / "merged.mrc")
    ours = true_ctf_reconstruction.merged.astype(np.float64)
    assert true_ctf_reconstruction.pixel_size_angstrom == voxel == 2.0
    assert ours.shape == relion.shape == (64, 64, 64)
    # A flipped hand, a transposed axis or inverted contrast would give ~0 or negative correlations.
    assert masked_correlation(ours, relion, mask, lowpass_per_px=0.15) > 0.9999
    assert masked_correlation(ours, relion, mask) > 0.99  # full band: only the outermost shells differ
    assert masked_correlation(ours, np.flip(relion, axis=0), mask, lowpass_per_px=0.15) < 0.7
    # Same normalisation (unitary FFTs, CTF^2 division): the same amplitude, not just the same shape.
    slope = float((ours * relion).sum() / (relion * relion).sum())
    assert slope == pytest.approx(1.0, abs=0.03)
    fsc = fourier_shell_correlation(ours, relion)
    assert fsc[1:28].min() > 0.999


def test_refined_ctf_scale_and_aberrations_match_relions_reconstruction(truth, relion5_small):
    """RELION's refined set has rlnCtfScalefactor ~11 and even/odd Zernike terms: the map must follow
    RELION's use of all three (a wrong odd-phase sign would break the high shells)."""
    _, mask = truth
    opt = read_optimisation_set(relion5_small / "runs" / "defocus_scale_aberr" / "optimisation_set.star")
    ours = reconstruct(opt, 128, 64).merged.astype(np.float64)
    relion = _read(relion5_small / "runs" / "reconstruct" / "merged.mrc")[0]
    assert masked_correlation(ours, relion, mask, lowpass_per_px=0.15) > 0.9999
    assert masked_correlation(ours, relion, mask) > 0.99
    assert float((ours * relion).sum() / (relion * relion).sum()) == pytest.approx(1.0, abs=0.03)


def test_written_maps_round_trip(true_ctf_reconstruction, tmp_path):
    paths = write_reconstruction(true_ctf_reconstruction, tmp_path / "rec")
    assert sorted(p.name for p in paths.values()) == ["half1.mrc", "half2.mrc", "merged.mrc"]
    for tag, path in paths.items():
        data, voxel = _read(path)
        assert voxel == 2.0
        np.testing.assert_array_equal(data, getattr(true_ctf_reconstruction, tag))
    assert not [p for p in (tmp_path / "rec").iterdir() if p.name.startswith(".")]


def test_backprojection_of_exact_central_slices_recovers_a_map():
    """Noise-free, CTF-free central slices of a map of Gaussian blobs (analytic transform) from many
    orientations, inserted with unit weights: the normalised reconstruction equals the map
    (central-slice theorem; unitary transforms keep the amplitude)."""
    rng = np.random.default_rng(3)
    s, sigma = 32, 1.5
    centres = rng.uniform(-5, 5, size=(6, 3))
    z, y, x = np.mgrid[0:s, 0:s, 0:s] - s // 2
    volume = sum(np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * sigma**2)) for c in centres)
    ky = np.fft.fftfreq(s)[:, None] * s + 0 * np.fft.rfftfreq(s)[None, :]
    kx = np.fft.rfftfreq(s)[None, :] * s + 0 * ky
    n = 400
    slices, matrices = [], []
    for angles in rng.uniform([-180, 0, -180], [180, 180, 180], size=(n, 3)):
        rotation = euler_zyz_matrix(*angles)
        u = np.stack([kx, ky, 0 * kx], -1) @ rotation  # u = R^T k, in reference coordinates
        # unitary DFT of the sampled blobs (continuous transform of a Gaussian, sampled; 2 pi^2 sigma^2)
        amplitude = (2 * np.pi * sigma**2) ** 1.5 / s**1.5 * np.exp(-2 * np.pi**2 * sigma**2 * (u**2).sum(-1) / s**2)
        slices.append(amplitude * sum(np.exp(-2j * np.pi * (u @ c) / s) for c in centres))
        matrices.append(np.linalg.inv(rotation).T)
    data = np.zeros((2, s, s, s // 2 + 1), np.complex128)
    weight = np.zeros((2, s, s, s // 2 + 1))
    backproject_slices(np.array(slices), np.ones((n, s, s // 2 + 1)), np.array(matrices), np.zeros(n, np.int64),
                       np.full(n, s / 2.0), data, weight)
    recovered = finalise(FourierAccumulators(data, weight, 1.0)).half1.astype(float)
    inner = (x**2 + y**2 + z**2) < (s / 2 - 6) ** 2
    assert np.corrcoef(recovered[inner], volume[inner])[0, 1] > 0.99
    # the taper removes the (small) mean inside the sphere: compare shapes after removing means
    a, b = recovered[inner] - recovered[inner].mean(), volume[inner] - volume[inner].mean()
    assert float((a * b).sum() / (b * b).sum()) == pytest.approx(1.0, abs=0.05)


def test_wiener_regulariser_recovers_the_noise_to_signal_ratio():
    """Half sets D_h = W_h V + n_h with Var n_h = sigma^2 W_h and signal power tau^2: the estimate of
    sigma^2 / tau^2 per shell is right to its sampling error."""
    rng = np.random.default_rng(5)
    s = 32
    shape = (s, s, s // 2 + 1)
    tau2, sigma2 = 4.0, 10.0
    signal = np.sqrt(tau2 / 2) * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    weight = rng.uniform(0.5, 3.0, size=(2,) + shape)
    noise = np.sqrt(sigma2 * weight / 2) * (rng.standard_normal((2,) + shape) + 1j * rng.standard_normal((2,) + shape))
    data = weight * signal[None] + noise
    ratio = wiener_regulariser(data, weight)
    k = np.fft.fftfreq(s) * s
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + (np.fft.rfftfreq(s) * s)[None, None, :] ** 2)
    shell = (radius > 8) & (radius < 14)  # > 1000 voxels per shell: a few % error
    assert np.median(ratio[shell]) == pytest.approx(sigma2 / tau2, rel=0.15)
    assert np.isinf(ratio[radius > s / 2 + 1]).all()


def test_wiener_map_of_the_sparse_fixture_is_far_closer_to_the_truth(truth, relion5_small):
    """20 particles: RELION's heuristic divides sparsely sampled voxels by tiny weights, so its full-band
    map is noise (masked correlation ~0.01, the same in RELION's own map); the Wiener map is not."""
    true_map, mask = truth
    opt = read_optimisation_set(particles=relion5_small / "truth" / "particles_true.star", tomograms=relion5_small / "truth" / "tomograms_true.star")
    relion = _read(relion5_small / "runs" / "reconstruct_truth" / "merged.mrc")[0]
    wiener = reconstruct(opt, 128, 64, regularisation="wiener").merged
    assert masked_correlation(relion, true_map, mask) < 0.05
    assert masked_correlation(wiener, true_map, mask) > 0.8


def test_bad_box_size_is_one_line_error(relion5_small):
    opt = read_optimisation_set(relion5_small / "optimisation_set.star")
    with pytest.raises(InputError) as error:
        reconstruct(opt, 127)
    assert str(error.value) == "--b [--b]: box size 127 must be even and at least 8; give an even box size such as 128"


# --- the fast CTF correction and the shared back-projection ------------------------------------------


def _radius(s):
    k = np.fft.fftfreq(s) * s
    return np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + (np.fft.rfftfreq(s) * s)[None, None, :] ** 2)


def _reference_finalise_map(data_fs, weight_fs, crop, snr=None, regulariser=None, unit_shell_gain=False):
    """The CTF correction written out in double-precision numpy, voxel grids and all (the formulas of
    reconstruct.py before its fused single-precision kernels), as the reference they must equal."""
    s = data_fs.shape[0]
    volume = np.fft.fftshift(np.fft.irfftn(data_fs, s=(s, s, s), norm="ortho"))
    c = np.arange(s) - s // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    volume = volume / np.maximum(np.sinc(r / s) ** 2, 1e-2)
    transform = np.fft.rfftn(volume, norm="ortho")
    radius = _radius(s)
    inside = np.floor(radius) + 1 < s // 2 + 1
    if snr:
        divisor = weight_fs + 1.0 / snr
    elif regulariser is not None:
        divisor = weight_fs + regulariser
    else:
        bins = s // 2 + 1
        lower = np.floor(radius).astype(int).ravel()
        t = radius.ravel() - lower
        keep = lower < bins
        total, count = np.zeros(bins + 1), np.zeros(bins + 1)
        np.add.at(total, lower[keep], (1 - t[keep]) * weight_fs.ravel()[keep])
        np.add.at(count, lower[keep], 1 - t[keep])
        np.add.at(total, lower[keep] + 1, t[keep] * weight_fs.ravel()[keep])
        np.add.at(count, lower[keep] + 1, t[keep])
        average = np.where(count[:bins] > 0, total[:bins] / np.where(count[:bins] > 0, count[:bins], 1), 0.0)
        low = np.minimum(np.floor(radius).astype(int), bins - 2)
        frac = radius - low
        divisor = np.maximum(weight_fs, 0.001 * ((1 - frac) * average[low] + frac * average[low + 1]))
    usable = inside & (divisor > 0) & np.isfinite(divisor)
    transform = np.where(usable, transform / np.where(usable, divisor, 1.0), 0.0)
    if unit_shell_gain and regulariser is not None and not snr:
        shells = np.rint(radius).astype(int).ravel()
        gain = np.bincount(shells, np.where(usable, weight_fs / np.where(usable, divisor, 1.0), 0.0).ravel(), minlength=s + 1)
        count = np.bincount(shells, usable.ravel().astype(float), minlength=s + 1)
        mean = np.where(count > 0, gain / np.maximum(count, 1), 0.0)[shells].reshape(transform.shape)
        transform = np.where(mean > 0, transform / np.where(mean > 0, mean, 1.0), 0.0)
    volume = np.fft.irfftn(transform, s=(s, s, s), norm="ortho")
    m = (s - crop) // 2
    volume = volume[m : m + crop, m : m + crop, m : m + crop]
    half = crop / 2.0
    c = np.arange(crop) - half
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    taper = np.where(r < half, np.where(r < half - 10, 1.0, 0.5 - 0.5 * np.cos(np.pi * (half - r) / 10)), 0.0)
    return taper * (volume - (taper * volume).sum() / taper.sum())


@pytest.mark.parametrize("regularisation, snr", [("relion", None), ("wiener", None), ("relion", 2.0)])
@pytest.mark.parametrize("crop", [32, 48])
def test_fast_ctf_correction_equals_the_double_precision_formulas(regularisation, snr, crop):
    rng = np.random.default_rng(1)
    s = 48
    shape = (s, s, s // 2 + 1)
    signal = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * np.exp(-_radius(s) / 6)
    weight = rng.uniform(0, 2, (2,) + shape) * (rng.uniform(size=(2,) + shape) > 0.2)  # a fifth of the voxels empty
    noise = rng.standard_normal((2,) + shape) + 1j * rng.standard_normal((2,) + shape)
    data = weight * signal[None] + 0.3 * np.sqrt(weight) * noise
    result = finalise(FourierAccumulators(data, weight, 2.0), crop, snr, regularisation)
    regulariser = wiener_regulariser(data, weight) if regularisation == "wiener" else None
    expected = {
        "half1": _reference_finalise_map(data[0], weight[0], crop, snr, regulariser, True),
        "half2": _reference_finalise_map(data[1], weight[1], crop, snr, regulariser, True),
        "merged": _reference_finalise_map(data[0] + data[1], weight[0] + weight[1], crop, snr, regulariser),
    }
    for tag, reference in expected.items():
        ours = getattr(result, tag)
        assert ours.dtype == np.float32 and ours.shape == (crop,) * 3
        # single precision: measured 4-7e-7 of the map's largest value
        assert np.abs(ours - reference).max() < 5e-6 * np.abs(reference).max(), tag


def test_sets_reconstructed_together_extract_each_box_once_and_equal_separate_reconstructions(relion5_small, monkeypatch):
    """Before (perturbed CTF) and after (true CTF) of the fixture: the same particles in the same tilt images."""
    from tomoctfrefine import forward, reconstruct as reconstruct_module

    before = read_optimisation_set(relion5_small / "optimisation_set.star")
    after = read_optimisation_set(particles=relion5_small / "truth" / "particles_true.star",
                                  tomograms=relion5_small / "truth" / "tomograms_true.star")
    alone = [reconstruct(opt, 64, 48, regularisation="wiener") for opt in (before, after)]
    boxes = []
    observe = forward.observe

    def counting_observe(image, positions, box_size_px, *args, **kwargs):
        boxes.append(len(positions))
        return observe(image, positions, box_size_px, *args, **kwargs)

    monkeypatch.setattr(forward, "observe", counting_observe)
    lines = []
    together = reconstruct_module.reconstruct_sets([before, after], 64, 48, regularisation="wiener", log=lines.append,
                                                   labels=["before", "after"])
    # 30 particles in 13 tilts: 387 boxes of 64 px inside the images, in each set; each extracted once
    assert lines[0] == "back-projection (before, after): 774 particle images (a particle in one tilt) of 1 tomogram(s), box 64 px"
    assert sum(boxes) == 387
    for separate, joint in zip(alone, together):
        assert joint.particle_count == separate.particle_count == (15, 15)  # at box 64 every particle is inside
        for tag in ("half1", "half2", "merged"):
            a, b = getattr(separate, tag), getattr(joint, tag)
            # the same sums in another order (boxes are inserted sorted by position): float rounding only
            assert np.abs(a - b).max() < 1e-5 * np.abs(a).max()


def test_sets_too_large_for_memory_together_are_reconstructed_one_after_the_other(relion5_small, monkeypatch):
    from tomoctfrefine import reconstruct as reconstruct_module

    opt = read_optimisation_set(relion5_small / "optimisation_set.star")
    monkeypatch.setattr(reconstruct_module, "SHARED_ACCUMULATOR_LIMIT_BYTES", reconstruct_module.accumulator_bytes(64))
    lines = []
    maps = reconstruct_module.reconstruct_sets([opt, opt], 64, 48, log=lines.append, labels=["a", "b"])
    assert [line.split(":")[0] for line in lines if "(a particle in one tilt)" in line] == ["back-projection (a)", "back-projection (b)"]
    np.testing.assert_array_equal(maps[0].merged, maps[1].merged)
