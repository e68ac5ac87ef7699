"""Fourier shell correlation of half maps, mask correction by phase randomisation, masked correlation.

* :func:`fourier_shell_correlation`: FSC per shell ``round(|k|)`` (``s//2+1`` shells, shell 0 = origin).
* :func:`mask_corrected_fsc`: RELION postprocess's gold-standard FSC: the FSC of the unmasked half maps,
  of the masked ones, and of the masked maps after their phases were randomised beyond the shell where the
  unmasked FSC first drops below 0.8; ``FSC_corrected = (FSC_masked - FSC_random) / (1 - FSC_random)``
  beyond that shell (Chen et al. 2013, high-resolution noise substitution), ``FSC_masked`` below it.
* :func:`resolution_at`: resolution (Å) where a curve first falls below a threshold (0.143, 0.5).
* :func:`masked_correlation`: Pearson correlation of two maps multiplied by a mask (optionally
  low-passed), the measure the fixture README and the benchmarks report.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft

#: RELION postprocess randomises phases beyond the first shell where the unmasked FSC is below this.
RANDOMISE_BELOW_FSC = 0.8


@lru_cache(maxsize=8)
def _shell_grid(s: int) -> np.ndarray:
    k = np.fft.fftfreq(s) * s
    kx = np.fft.rfftfreq(s) * s
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    shells = np.rint(radius).astype(np.int64)
    shells.setflags(write=False)
    return shells


def shell_indices(box_size_px: int) -> np.ndarray:
    """Shell index ``round(|k|)`` (pixels) of each coefficient of an ``s^3`` volume's ``rfftn`` (read-only;
    cached, since every FSC of a map size uses the same grid)."""
    return _shell_grid(int(box_size_px))


@lru_cache(maxsize=8)
def _half_grid_multiplicity(box_size_px: int) -> np.ndarray:
    """How many coefficients of the full transform each ``rfftn`` coefficient stands for (1 or 2; read-only)."""
    s = int(box_size_px)
    count = np.full((s, s, s // 2 + 1), 2.0)
    count[..., 0] = 1.0
    if s % 2 == 0:
        count[..., -1] = 1.0
    count.setflags(write=False)
    return count


@lru_cache(maxsize=8)
def _shell_bins(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat shell index of the coefficients in shells ``<= s/2``, and which coefficients those are."""
    shells = shell_indices(s).ravel()
    keep = np.flatnonzero(shells <= s // 2)
    kept = shells[keep]
    kept.setflags(write=False)
    keep.setflags(write=False)
    return kept, keep


def shell_sums(values: np.ndarray, box_size_px: int) -> np.ndarray:
    """Sum of a full-transform quantity given on the ``rfftn`` grid over each shell (``s//2+1`` shells)."""
    s = int(box_size_px)
    kept, keep = _shell_bins(s)
    weights = (values * _half_grid_multiplicity(s)).ravel()[keep]
    return np.bincount(kept, weights=weights, minlength=s // 2 + 1)[: s // 2 + 1]


def _transform(volume: np.ndarray) -> np.ndarray:
    """``rfftn`` in double precision on all of numba's threads (``--j``)."""
    import numba

    return scipy.fft.rfftn(np.asarray(volume, dtype=np.float64), workers=int(numba.get_num_threads()))


def _correlation_of_transforms(f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    s = f1.shape[0]
    cross = shell_sums(f1.real * f2.real + f1.imag * f2.imag, s)
    power1 = shell_sums(f1.real**2 + f1.imag**2, s)
    power2 = shell_sums(f2.real**2 + f2.imag**2, s)
    denominator = np.sqrt(power1 * power2)
    return np.where(denominator > 0, cross / np.where(denominator > 0, denominator, 1.0), 0.0)


def fourier_shell_correlation(map1: np.ndarray, map2: np.ndarray) -> np.ndarray:
    """FSC of two cubic maps per shell ``round(|k|)``, shells ``0 .. s/2``; 0 where a shell is empty."""
    return _correlation_of_transforms(_transform(map1), _transform(map2))


def shell_resolution_angstrom(box_size_px: int, pixel_size_angstrom: float) -> np.ndarray:
    """Resolution ``s p / i`` (Å) of each shell ``i`` (``inf`` for shell 0)."""
    index = np.arange(box_size_px // 2 + 1, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(index > 0, box_size_px * pixel_size_angstrom / np.where(index > 0, index, 1.0), np.inf)


def phase_randomise(volume: np.ndarray, from_shell: int, rng: np.random.Generator, transform: np.ndarray | None = None) -> np.ndarray:
    """The map with the phases of every coefficient in shells ``>= from_shell`` replaced by random ones
    (amplitudes kept; Hermitian symmetry kept by drawing the phases of a real white-noise map).
    ``transform``: the map's ``rfftn`` when the caller has it already."""
    import numba

    s = volume.shape[0]
    workers = int(numba.get_num_threads())
    transform = _transform(volume) if transform is None else transform
    noise = scipy.fft.rfftn(rng.standard_normal(volume.shape), workers=workers)
    random_phase = np.exp(1j * np.angle(noise))
    outer = shell_indices(s) >= from_shell
    transform = np.where(outer, np.abs(transform) * random_phase, transform)
    return scipy.fft.irfftn(transform, s=volume.shape, workers=workers)


def first_shell_below(curve: np.ndarray, threshold: float, start: int = 1) -> int:
    """First shell ``>= start`` whose value is below ``threshold`` (``len(curve)`` if none)."""
    below = np.flatnonzero(np.asarray(curve)[start:] < threshold)
    return int(below[0] + start) if below.size else len(curve)


def resolution_at(curve: np.ndarray, threshold: float, box_size_px: int, pixel_size_angstrom: float) -> float:
    """Resolution (Å) where ``curve`` first crosses below ``threshold``, interpolated linearly in
    spatial frequency between the last shell above and the first below; the Nyquist resolution when it
    never drops, ``inf`` when shell 1 is already below."""
    curve = np.asarray(curve, dtype=float)
    first = first_shell_below(curve, threshold)
    if first >= len(curve):
        return 2.0 * pixel_size_angstrom
    if first <= 1:
        return float("inf")
    above, below = curve[first - 1], curve[first]
    fraction = (above - threshold) / (above - below) if above != below else 0.0
    shell = (first - 1) + fraction
    return float(box_size_px * pixel_size_angstrom / shell)


@dataclass(frozen=True)
class FscResult:
    """Gold-standard FSC of two half maps (RELION postprocess's table ``data_fsc``).

    Attributes
    ----------
    spectral_index : int array (s//2+1,)
    resolution_angstrom : float array
        ``s p / index`` (``inf`` at index 0).
    unmasked, masked, phase_randomised_masked, corrected : float arrays
        FSC of the unmasked maps, of the masked maps, of the masked maps with phases randomised beyond
        ``randomise_from_shell``, and the mask-corrected FSC.
    randomise_from_shell : int
    box_size_px : int
    pixel_size_angstrom : float
    """

    spectral_index: np.ndarray
    resolution_angstrom: np.ndarray
    unmasked: np.ndarray
    masked: np.ndarray
    phase_randomised_masked: np.ndarray
    corrected: np.ndarray
    randomise_from_shell: int
    box_size_px: int
    pixel_size_angstrom: float

    def resolution(self, threshold: float = 0.143) -> float:
        """Resolution (Å) of the corrected FSC at ``threshold``."""
        return resolution_at(self.corrected, threshold, self.box_size_px, self.pixel_size_angstrom)

    @property
    def randomise_from_angstrom(self) -> float:
        return float(self.box_size_px * self.pixel_size_angstrom / max(self.randomise_from_shell, 1))

    def as_curve(self):
        """The corrected curve as :class:`tomoctfrefine.io.fsc.FscCurve` (what ``--fsc`` provides)."""
        from .io.fsc import FscCurve

        return FscCurve(self.spectral_index.copy(), self.resolution_angstrom.copy(), self.corrected.copy())


def mask_corrected_fsc(
    half1: np.ndarray,
    half2: np.ndarray,
    mask: np.ndarray | None,
    pixel_size_angstrom: float,
    randomise_from_shell: int | None = None,
    seed: int = 0,
) -> FscResult:
    """Gold-standard FSC with RELION postprocess's mask correction (see the module docstring).

    Parameters
    ----------
    half1, half2 : (s, s, s) arrays
        Independent half maps.
    mask : (s, s, s) array or None
        Soft mask in [0, 1]; without one the corrected FSC is the unmasked FSC.
    pixel_size_angstrom : float
    randomise_from_shell : int, optional
        Shell from which phases are randomised; default: the first shell where the unmasked FSC drops
        below 0.8 (RELION's choice).
    seed : int
        Seed of the phase randomisation (the result is deterministic).
    """
    s = half1.shape[0]
    index = np.arange(s // 2 + 1)
    resolution = shell_resolution_angstrom(s, pixel_size_angstrom)
    transforms = _transform(half1), _transform(half2)  # for the unmasked FSC and the phase randomisation
    unmasked = _correlation_of_transforms(*transforms)
    if mask is None:
        return FscResult(index, resolution, unmasked, unmasked, np.zeros_like(unmasked), unmasked, len(index), s, pixel_size_angstrom)
    mask = np.asarray(mask, dtype=np.float64)
    masked = fourier_shell_correlation(half1 * mask, half2 * mask)
    if randomise_from_shell is None:
        randomise_from_shell = first_shell_below(unmasked, RANDOMISE_BELOW_FSC)
    randomise_from_shell = int(max(randomise_from_shell, 1))
    if randomise_from_shell >= len(index):
        return FscResult(index, resolution, unmasked, masked, np.zeros_like(masked), masked, randomise_from_shell, s, pixel_size_angstrom)
    rng = np.random.default_rng(seed)
    random1 = phase_randomise(half1, randomise_from_shell, rng, transforms[0])
    random2 = phase_randomise(half2, randomise_from_shell, rng, transforms[1])
    randomised = fourier_shell_correlation(random1 * mask, random2 * mask)
    corrected = masked.copy()
    outer = index >= randomise_from_shell
    with np.errstate(divide="ignore", invalid="ignore"):
        substituted = (masked - randomised) / (1.0 - randomised)
    corrected[outer] = np.where(randomised[outer] < 1.0, substituted[outer], 0.0)
    return FscResult(index, resolution, unmasked, masked, randomised, corrected, randomise_from_shell, s, pixel_size_angstrom)


def lowpass(volume: np.ndarray, frequency_per_px: float) -> np.ndarray:
    """Sharp low-pass: keep Fourier coefficients with ``|k| <= frequency_per_px`` (cycles per pixel)."""
    s = volume.shape[0]
    k = np.fft.fftfreq(s)
    kx = np.fft.rfftfreq(s)
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    return np.fft.irfftn(np.fft.rfftn(np.asarray(volume, dtype=np.float64)) * (radius <= frequency_per_px), s=volume.shape)


def masked_correlation(
    volume: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None, lowpass_per_px: float | None = None
) -> float:
    """Pearson correlation of ``mask * volume`` and ``mask * reference`` over the whole box, after an
    optional sharp low-pass of both maps at ``lowpass_per_px`` (cycles/pixel). This is the measure of the
    fixture README (0.917 for RELION's reconstruction of ``relion5_small``, low-passed at 0.15/px)."""
    a = np.asarray(volume, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if lowpass_per_px is not None:
        a, b = lowpass(a, lowpass_per_px), lowpass(b, lowpass_per_px)
    if mask is not None:
        a, b = a * mask, b * mask
    a = a - a.mean()
    b = b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def write_fsc_star(result: FscResult, path, half_map_1: str = "", half_map_2: str = "", mask: str = ""):
    """Write ``result`` as a RELION postprocess-style STAR file (``data_general`` + ``data_fsc``), usable
    as the refinement's ``--fsc``. Returns the path written."""
    from .io.fsc import write_postprocess_fsc

    general = {
        "final_resolution_angstrom": round(result.resolution(0.143), 6),
        "randomise_from_angstrom": round(result.randomise_from_angstrom, 6),
    }
    for key, value in (("half_map_1", half_map_1), ("half_map_2", half_map_2), ("mask", mask)):
        if value:
            general[key] = str(value)
    curves = {
        "corrected": result.corrected,
        "unmasked": result.unmasked,
        "masked": result.masked,
        "phase_randomised_masked": result.phase_randomised_masked,
    }
    return write_postprocess_fsc(path, result.spectral_index, result.resolution_angstrom, curves, general)
