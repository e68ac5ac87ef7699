"""FSC, mask correction by phase randomisation, resolution, masked correlation, postprocess STAR.

Half maps = the fixture's true map + independent noise of a known spectrum. The "true" FSC of the masked
maps is then known from the noise itself: signal power / (signal + noise power) of ``mask * map``
per shell, without the signal-noise and noise-noise cross terms that the estimate contains.
"""

import mrcfile
import numpy as np
import pytest

from tomoctfrefine.fsc import (
    fourier_shell_correlation,
    mask_corrected_fsc,
    masked_correlation,
    resolution_at,
    shell_sums,
    write_fsc_star,
)
from tomoctfrefine.io.fsc import read_fsc
from tomoctfrefine.io.star import read_star

PIXEL = 2.0


def _read(path):
    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=np.float64)


@pytest.fixture(scope="module")
def truth(relion5_small):
    return _read(relion5_small / "ref" / "map_true.mrc"), _read(relion5_small / "ref" / "mask.mrc")


def _coloured_noise(rng, s, sigma):
    k = np.fft.fftfreq(s)
    kx = np.fft.rfftfreq(s)
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    white = np.fft.rfftn(rng.standard_normal((s, s, s)))
    return np.fft.irfftn(white * sigma * (1 + 8 * radius), s=(s, s, s))  # noise rising with frequency


@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.1])
def test_mask_corrected_fsc_is_not_above_the_true_fsc_and_gives_the_right_resolution(truth, sigma):
    true_map, mask = truth
    s = true_map.shape[0]
    rng = np.random.default_rng(int(sigma * 1000))
    noise1, noise2 = _coloured_noise(rng, s, sigma), _coloured_noise(rng, s, sigma)
    result = mask_corrected_fsc(true_map + noise1, true_map + noise2, mask, PIXEL)

    signal = shell_sums(np.abs(np.fft.rfftn(mask * true_map)) ** 2, s)
    noise = 0.5 * (shell_sums(np.abs(np.fft.rfftn(mask * noise1)) ** 2, s) + shell_sums(np.abs(np.fft.rfftn(mask * noise2)) ** 2, s))
    true_fsc = signal / (signal + noise)
    # FSC noise per shell ~ 1/sqrt(independent coefficients) = 1/sqrt(n_shell * mask volume fraction)
    coefficients = shell_sums(np.ones((s, s, s // 2 + 1)), s)
    tolerance = 4.0 / np.sqrt(np.maximum(coefficients * (mask**2).mean(), 1.0))
    shells = np.arange(1, s // 2 + 1)
    assert np.all(result.corrected[shells] <= true_fsc[shells] + tolerance[shells])
    # the correction matters: the masked FSC of these maps is inflated beyond the randomisation shell
    assert result.randomise_from_shell < s // 2
    true_resolution = resolution_at(true_fsc, 0.143, s, PIXEL)
    shell_width = s * PIXEL / (s * PIXEL / true_resolution) ** 2  # d(resolution)/d(shell) at the crossing
    assert abs(result.resolution(0.143) - true_resolution) <= 2 * shell_width


def test_fsc_of_identical_maps_is_one_and_of_independent_noise_is_zero():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 32, 32, 32))
    np.testing.assert_allclose(fourier_shell_correlation(a, a), 1.0, atol=1e-12)
    assert np.abs(fourier_shell_correlation(a, b)[2:]).max() < 4 / np.sqrt(4 * np.pi * 4)


def test_resolution_at_interpolates_between_shells():
    curve = np.array([1.0, 0.9, 0.5, 0.1, 0.0])
    # crosses 0.143 between shells 2 (0.5) and 3 (0.1): shell 2 + 0.357/0.4
    assert resolution_at(curve, 0.143, 8, 2.0) == pytest.approx(16.0 / (2 + 0.357 / 0.4))
    assert resolution_at(np.ones(5), 0.143, 8, 2.0) == 4.0  # never drops: Nyquist


def test_masked_correlation_reproduces_the_fixture_readme(truth, relion5_small):
    true_map, mask = truth
    relion = _read(relion5_small / "runs" / "reconstruct_truth" / "merged.mrc")
    relion_refined = _read(relion5_small / "runs" / "reconstruct" / "merged.mrc")
    # README: "reconstruction vs true map, masked, low-passed at 0.15/px: 0.917 (true CTF: 0.917)"
    assert round(masked_correlation(relion_refined, true_map, mask, lowpass_per_px=0.15), 3) == 0.917
    assert round(masked_correlation(relion, true_map, mask, lowpass_per_px=0.15), 3) == 0.917
    assert masked_correlation(true_map, true_map, mask) == pytest.approx(1.0)


def test_postprocess_star_round_trips_through_the_fsc_reader(truth, tmp_path):
    true_map, mask = truth
    rng = np.random.default_rng(7)
    result = mask_corrected_fsc(true_map + _coloured_noise(rng, 64, 0.05), true_map + _coloured_noise(rng, 64, 0.05), mask, PIXEL)
    path = write_fsc_star(result, tmp_path / "postprocess.star", "half1.mrc", "half2.mrc", "mask.mrc")
    curve = read_fsc(path)  # what the refinement's --fsc reads
    np.testing.assert_array_equal(curve.spectral_index, np.arange(33))
    np.testing.assert_allclose(curve.fsc, result.corrected, atol=1e-9)
    doc = read_star(path)
    assert list(doc.blocks) == ["general", "fsc"]
    assert list(doc.blocks["fsc"].columns) == [
        "rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution", "rlnFourierShellCorrelationCorrected",
        "rlnFourierShellCorrelationUnmaskedMaps", "rlnFourierShellCorrelationMaskedMaps",
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps",
    ]
    assert float(doc.blocks["general"]["rlnFinalResolution"]) == pytest.approx(result.resolution(), abs=1e-5)
    assert doc.blocks["fsc"]["rlnAngstromResolution"].iloc[2] == pytest.approx(64.0)
    in_memory = result.as_curve()  # what the refinement uses when it gets no --fsc
    np.testing.assert_allclose(in_memory.fsc, curve.fsc, atol=1e-9)
    np.testing.assert_array_equal(in_memory.spectral_index, curve.spectral_index)
