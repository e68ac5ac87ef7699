"""Before/after assessment of a CTF refinement: what the user's next map will look like.

Both optimisation sets are reconstructed the same way (:func:`tomoctfrefine.reconstruct.reconstruct`), the
gold-standard FSC of each pair of half maps is computed inside the mask with RELION postprocess's
phase-randomisation correction (:func:`tomoctfrefine.fsc.mask_corrected_fsc`), and the report gives both
curves on one plot, the resolution at FSC 0.143 before and after, and the mean FSC gain per frequency band.
With the true map of a simulated dataset it also gives each map's masked correlation with the truth and
the FSC against the truth at 0.5 and 0.143.

Files written in ``out_dir``: ``before/`` and ``after/`` (``half1.mrc``, ``half2.mrc``, ``merged.mrc``,
``postprocess.star`` usable as ``--fsc``, ``optimisation_set.star`` naming those as references),
``fsc.png`` and ``assess.json``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, Problem
from .fsc import FscResult, fourier_shell_correlation, mask_corrected_fsc, masked_correlation, resolution_at, write_fsc_star
from .io.maps import read_map
from .io.optimisation_set import OptimisationSet, with_paths, write_optimisation_set
from .reconstruct import Reconstruction, reconstruct_sets, write_reconstruction

#: Number of equal-width frequency bands (from shell 1 to Nyquist) for the gain table.
BAND_COUNT = 4
#: Low-pass (cycles/pixel) of the second correlation with the truth, as in the fixture README.
TRUTH_LOWPASS_PER_PX = 0.15


@dataclass
class AssessedMap:
    """One side of the comparison."""

    label: str
    reconstruction: Reconstruction
    fsc: FscResult
    files: dict
    truth: dict | None


def fit_to_box(volume: np.ndarray, size_px: int) -> np.ndarray:
    """Centre-crop or zero-pad a cubic volume to ``size_px`` (mask or truth map of another box size)."""
    current = volume.shape[0]
    if current == size_px:
        return volume
    if current > size_px:
        margin = (current - size_px) // 2
        return volume[margin : margin + size_px, margin : margin + size_px, margin : margin + size_px]
    out = np.zeros((size_px,) * 3, dtype=volume.dtype)
    margin = (size_px - current) // 2
    out[margin : margin + current, margin : margin + current, margin : margin + current] = volume
    return out


def frequency_bands(box_size_px: int, pixel_size_angstrom: float, count: int = BAND_COUNT) -> list[tuple[int, int]]:
    """``count`` contiguous shell ranges ``[first, last]`` of equal width from shell 1 to Nyquist."""
    nyquist = box_size_px // 2
    edges = np.linspace(1, nyquist + 1, count + 1).round().astype(int)
    return [(int(edges[i]), int(edges[i + 1] - 1)) for i in range(count) if edges[i + 1] > edges[i]]


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def truth_measures(volume: np.ndarray, true_map: np.ndarray, mask: np.ndarray | None, pixel_size_angstrom: float) -> dict:
    """Masked correlation with the true map (full band and low-passed at 0.15/px) and the FSC of the
    masked map against the masked truth at 0.5 and 0.143."""
    s = volume.shape[0]
    masked_volume = volume if mask is None else volume * mask
    masked_truth = true_map if mask is None else true_map * mask
    curve = fourier_shell_correlation(masked_volume, masked_truth)
    return {
        "masked_correlation": masked_correlation(volume, true_map, mask),
        "masked_correlation_lowpass": masked_correlation(volume, true_map, mask, lowpass_per_px=TRUTH_LOWPASS_PER_PX),
        "lowpass_per_px": TRUTH_LOWPASS_PER_PX,
        "fsc_0.5_angstrom": _finite(resolution_at(curve, 0.5, s, pixel_size_angstrom)),
        "fsc_0.143_angstrom": _finite(resolution_at(curve, 0.143, s, pixel_size_angstrom)),
        "fsc_curve": [float(v) for v in curve],
    }


def assess_optimisation_set(
    opt: OptimisationSet,
    label: str,
    out_dir: Path,
    box_size_px: int,
    crop_size_px: int | None,
    mask: np.ndarray | None,
    mask_path: Path | None,
    true_map: np.ndarray | None,
    snr: float | None = None,
    log=None,
    regularisation: str = "wiener",
) -> AssessedMap:
    """Reconstruct one optimisation set, write its maps, FSC STAR and optimisation set under ``out_dir/label``."""
    reconstruction = reconstruct_sets([opt], box_size_px, crop_size_px, snr=snr, log=log, regularisation=regularisation,
                                      labels=[label])[0]
    return assess_reconstruction(opt, label, reconstruction, out_dir, mask, mask_path, true_map, log)


def assess_reconstruction(
    opt: OptimisationSet,
    label: str,
    reconstruction: Reconstruction,
    out_dir: Path,
    mask: np.ndarray | None,
    mask_path: Path | None,
    true_map: np.ndarray | None,
    log=None,
) -> AssessedMap:
    """Write one reconstruction's maps, its FSC STAR and optimisation set under ``out_dir/label``, with the
    truth measures when ``true_map`` is given."""
    folder = Path(out_dir) / label
    files = {k: Path(v) for k, v in write_reconstruction(reconstruction, folder).items()}
    size = reconstruction.merged.shape[0]
    fitted_mask = None if mask is None else fit_to_box(mask, size)
    result = mask_corrected_fsc(reconstruction.half1, reconstruction.half2, fitted_mask, reconstruction.pixel_size_angstrom)
    files["fsc"] = Path(write_fsc_star(result, folder / "postprocess.star", str(files["half1"].resolve()), str(files["half2"].resolve()), str(mask_path or "")))
    next_opt = with_paths(
        opt,
        ref1_path=str(files["half1"].resolve()),
        ref2_path=str(files["half2"].resolve()),
        mask_path=str(Path(mask_path).resolve()) if mask_path and mask is not None and mask.shape[0] == size else None,
        fsc_path=str(files["fsc"].resolve()),
        particles_path=str(opt.resolved("particles_path").resolve()),
        tomograms_path=str(opt.resolved("tomograms_path").resolve()),
        trajectories_path=str(opt.resolved("trajectories_path").resolve()) if opt.trajectories_path else None,
    )
    files["optimisation_set"] = Path(write_optimisation_set(next_opt, folder / "optimisation_set.star"))
    truth = None
    if true_map is not None:
        truth = truth_measures(reconstruction.merged, fit_to_box(true_map, size), fitted_mask, reconstruction.pixel_size_angstrom)
    if log is not None:
        log(f"{label}: {sum(reconstruction.particle_count)} particles, FSC 0.143 at {result.resolution(0.143):.2f} Å")
    return AssessedMap(label, reconstruction, result, files, truth)


def plot_fsc(summary: dict, path: Path) -> Path:
    """The FSC page of the report (:func:`tomoctfrefine.report.write_fsc_plot`) from :func:`assess`'s
    summary: both corrected curves, the unmasked ones dotted, against the truth dashed, the 0.143 line."""
    from .report import write_fsc_plot

    return write_fsc_plot(summary, path)


def _write_json(data: dict, path: Path) -> Path:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)
    return path


def _load_volume(path, what: str, flag: str) -> tuple[np.ndarray, float]:
    if not Path(path).exists():
        raise InputError([Problem(str(path), f"{what} not found", f"check the path given to {flag}", flag)])
    data, voxel = read_map(path)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError([Problem(str(path), f"{what} is not a cubic 3D map (shape {data.shape})", f"give a cubic map to {flag}", flag)])
    return data.astype(np.float64), voxel


def assess(
    before: OptimisationSet,
    after: OptimisationSet,
    out_dir,
    box_size_px: int,
    crop_size_px: int | None = None,
    mask_path=None,
    truth_path=None,
    snr: float | None = None,
    log=None,
    regularisation: str = "wiener",
) -> dict:
    """Reconstruct with both optimisation sets and compare (see the module docstring).

    Parameters
    ----------
    before, after : OptimisationSet
        E.g. the refinement's input and its output optimisation set.
    out_dir : path-like
    box_size_px, crop_size_px : int
        RELION's ``--b`` and ``--crop`` of the reconstruction.
    mask_path : path-like, optional
        Mask for the FSC (default: the after set's mask, else the before set's); cropped or padded to the
        map size when its box differs.
    truth_path : path-like, optional
        True map (simulated data) at the tilt-series pixel size.
    snr : float, optional
        Constant Wiener term ``1/SNR`` for the reconstruction (RELION's ``--SNR``); overrides
        ``regularisation``.
    log : callable, optional
    regularisation : {"wiener", "relion"}
        ``"wiener"`` (default): signal and noise powers per shell from the half sets, so that sparsely
        sampled voxels do not swamp the FSC; ``"relion"``: RELION's heuristic (the maps
        ``relion_tomo_reconstruct_particle`` writes).

    Returns
    -------
    dict
        The content of ``assess.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mask_path is None:
        mask_path = after.resolved("mask_path") or before.resolved("mask_path")
    mask = _load_volume(mask_path, "mask", "--mask")[0] if mask_path else None
    true_map = _load_volume(truth_path, "true map", "--truth")[0] if truth_path else None
    labels = ("before", "after")
    # Both sets together: every observed box is extracted once for the two (see reconstruct_sets).
    reconstructions = reconstruct_sets([before, after], box_size_px, crop_size_px, snr=snr, log=log,
                                       regularisation=regularisation, labels=labels)
    sides = [
        assess_reconstruction(opt, label, reconstruction, out, mask, Path(mask_path) if mask_path else None, true_map, log)
        for opt, label, reconstruction in zip((before, after), labels, reconstructions)
    ]
    plot = out / "fsc.png"
    first, second = sides[0].fsc, sides[1].fsc
    bands = []
    for start, stop in frequency_bands(first.box_size_px, first.pixel_size_angstrom):
        a = float(first.corrected[start : stop + 1].mean())
        b = float(second.corrected[start : stop + 1].mean())
        bands.append({
            "from_angstrom": float(first.resolution_angstrom[start]),
            "to_angstrom": float(first.resolution_angstrom[stop]),
            "fsc_before": a,
            "fsc_after": b,
            "gain": b - a,
        })
    summary = {
        "box_size_px": int(box_size_px),
        "crop_size_px": int(crop_size_px) if crop_size_px else None,
        "pixel_size_angstrom": first.pixel_size_angstrom,
        "map_size_px": first.box_size_px,
        "mask": str(mask_path) if mask_path else None,
        "truth": str(truth_path) if truth_path else None,
        "regularisation": f"constant 1/SNR = {1.0 / snr:g}" if snr else regularisation,
        "plot": str(plot),
        "bands": bands,
        "resolution_gain_angstrom": _finite(first.resolution(0.143) - second.resolution(0.143)),
        "curves": {
            "spectral_index": [int(i) for i in first.spectral_index],
            "resolution_angstrom": [_finite(r) for r in first.resolution_angstrom],
        },
    }
    for side in sides:
        entry = {
            "optimisation_set": str(side.files["optimisation_set"]),
            "particles_per_half": list(side.reconstruction.particle_count),
            "resolution_0.143_angstrom": _finite(side.fsc.resolution(0.143)),
            "resolution_0.5_angstrom": _finite(side.fsc.resolution(0.5)),
            "randomise_from_angstrom": _finite(side.fsc.randomise_from_angstrom),
            "files": {k: str(v) for k, v in side.files.items()},
        }
        if side.truth is not None:
            entry["truth"] = {k: v for k, v in side.truth.items() if k != "fsc_curve"}
        summary[side.label] = entry
        summary["curves"][f"{side.label}_corrected"] = [float(v) for v in side.fsc.corrected]
        summary["curves"][f"{side.label}_unmasked"] = [float(v) for v in side.fsc.unmasked]
        if side.truth is not None:
            summary["curves"][f"{side.label}_against_truth"] = side.truth["fsc_curve"]
    plot_fsc(summary, plot)
    _write_json(summary, out / "assess.json")
    return summary


def summary_lines(summary: dict) -> list[str]:
    """A short human-readable report of :func:`assess`'s result."""
    lines = []
    for label in ("before", "after"):
        side = summary[label]
        text = f"{label:6s}: FSC 0.143 at {side['resolution_0.143_angstrom']:.2f} Å ({sum(side['particles_per_half'])} particles)"
        if "truth" in side:
            truth = side["truth"]
            text += f"; vs truth: masked correlation {truth['masked_correlation']:.4f} (low-passed {truth['masked_correlation_lowpass']:.4f})"
            if truth["fsc_0.5_angstrom"] is not None:
                text += f", FSC 0.5 at {truth['fsc_0.5_angstrom']:.2f} Å"
        lines.append(text)
    for band in summary["bands"]:
        lines.append(
            f"band {band['from_angstrom']:.1f}-{band['to_angstrom']:.1f} Å: mean FSC {band['fsc_before']:.3f} -> {band['fsc_after']:.3f} ({band['gain']:+.3f})"
        )
    return lines
