"""What a refinement did, as pictures: per-tomogram PNGs, one ``logfile.pdf``, from ``summary.json``.

The summary is the single source: the CLI prints from it, the plots draw it, Scipion's viewer shows
the PNGs. Matplotlib runs with the Agg backend (no display needed).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Collection

import numpy as np

from .io.atomic import write_atomically


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_summary(summary: dict, path: Path) -> None:
    """Write JSON (``summary.json``, the run state) atomically; NaN is refused: other programs read it."""
    text = json.dumps(summary, indent=1, allow_nan=False, default=_jsonable)
    write_atomically(path, lambda tmp: tmp.write_text(text))


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def scale_uncertainty(information) -> np.ndarray:
    """Standard error of each tilt's scale estimate, ``1/sqrt(I)`` from its Fisher information ``I``;
    ``-1`` for tilts without information (as ``defocus_uncertainty_angstrom``: JSON has no NaN)."""
    information = np.asarray(information, dtype=float)
    usable = np.isfinite(information) & (information > 0)
    return np.where(usable, 1.0 / np.sqrt(np.where(usable, information, 1.0)), -1.0)


def error_bars(values, uncertainty) -> tuple[np.ndarray, np.ndarray]:
    """Which points get an error bar (finite positive uncertainty) and the half-length of each bar
    (0 where there is none): what the plots draw as ``value ± 1σ``."""
    uncertainty = np.asarray(uncertainty, dtype=float)
    shown = np.isfinite(uncertainty) & (uncertainty > 0) & np.isfinite(np.asarray(values, dtype=float))
    return shown, np.where(shown, uncertainty, 0.0)


def astigmatism(defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg) -> tuple[np.ndarray, np.ndarray]:
    """Astigmatism ``|U - V|`` (Å) and the azimuth of the axis of largest defocus in ``[0, 180)`` degrees.

    RELION may write ``U < V`` with the angle turned by 90° (the same CTF); the axis of the larger defocus
    is the same for both ways of writing it, so before and after can be compared.
    """
    u, v = np.asarray(defocus_u_angstrom, dtype=float), np.asarray(defocus_v_angstrom, dtype=float)
    angle = np.asarray(defocus_angle_deg, dtype=float)
    return np.abs(u - v), np.mod(np.where(u >= v, angle, angle + 90.0), 180.0)


def _mean_defocus(tomogram: dict, when: str) -> np.ndarray:
    return (np.asarray(tomogram[f"defocus_u_{when}_angstrom"]) + np.asarray(tomogram[f"defocus_v_{when}_angstrom"])) / 2


def _defocus_figure(plt, name: str, tomogram: dict):
    """Mean defocus (±1σ), astigmatism and its axis against tilt angle, before and after."""
    angle = np.asarray(tomogram["tilt_angle_deg"])
    order = np.argsort(angle)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    before, after = _mean_defocus(tomogram, "before"), _mean_defocus(tomogram, "after")
    axes[0].plot(angle[order], before[order] / 1e4, "o-", color="0.6", label="before")
    sigma = np.asarray(tomogram.get("defocus_uncertainty_angstrom", np.zeros_like(after)), dtype=float)
    _, bar = error_bars(after, sigma)  # -1 marks tilts without information: no bar
    axes[0].errorbar(angle[order], after[order] / 1e4, yerr=bar[order] / 1e4, fmt="o-", color="C0", capsize=2,
                     label="refined (±1σ)")
    if "defocus_true_angstrom" in tomogram:
        axes[0].plot(angle[order], np.asarray(tomogram["defocus_true_angstrom"])[order] / 1e4, "k+", label="truth")
    axes[0].set_ylabel("mean defocus (µm)")
    axes[0].set_title(f"{name}: defocus")
    size_before, axis_before = astigmatism(tomogram["defocus_u_before_angstrom"], tomogram["defocus_v_before_angstrom"],
                                           tomogram["defocus_angle_before_deg"])
    size_after, axis_after = astigmatism(tomogram["defocus_u_after_angstrom"], tomogram["defocus_v_after_angstrom"],
                                         tomogram["defocus_angle_after_deg"])
    axes[1].plot(angle[order], size_before[order], "o-", color="0.6", label="before")
    axes[1].plot(angle[order], size_after[order], "o-", color="C0", label="refined")
    true_keys = ("defocus_u_true_angstrom", "defocus_v_true_angstrom", "defocus_angle_true_deg")
    if all(key in tomogram for key in true_keys):
        size_true, axis_true = astigmatism(*(tomogram[key] for key in true_keys))
        axes[1].plot(angle[order], size_true[order], "k+", label="truth")
        axes[2].plot(angle[order], axis_true[order], "k+", label="truth")
    axes[1].set_ylim(bottom=0)
    axes[1].set_ylabel("astigmatism |U − V| (Å)")
    axes[1].set_title("astigmatism")
    axes[2].plot(angle[order], axis_before[order], "o", color="0.6", label="before")
    axes[2].plot(angle[order], axis_after[order], "o", color="C0", label="refined")
    axes[2].set_ylim(0, 180)
    axes[2].set_yticks(range(0, 181, 45))
    axes[2].set_ylabel("azimuth of the largest defocus (°)")
    axes[2].set_title("astigmatism axis")
    for axis in axes:
        axis.set_xlabel("tilt angle (°)")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def _scale_panel(axis, x, order, tomogram: dict, xlabel: str, legend: bool):
    scale_before = np.asarray(tomogram["scale_before"], dtype=float)
    axis.plot(x[order], scale_before[order], "o-", color="0.6", label="before")
    if "scale_per_tilt" in tomogram:
        estimate = np.asarray(tomogram["scale_per_tilt"], dtype=float)
        shown, bar = error_bars(estimate, tomogram.get("scale_uncertainty", np.zeros_like(estimate)))
        kept = order[shown[order]]
        axis.errorbar(x[kept], estimate[kept], yerr=bar[kept], fmt="o", ms=3.5, color="C1", capsize=3, zorder=3,
                      label="per-tilt estimate (±1σ)")
        missing = order[~shown[order]]
        if "scale_uncertainty" in tomogram and len(missing):
            axis.plot(x[missing], np.asarray(tomogram["scale_after"], dtype=float)[missing], "o", mfc="none", color="C1",
                      label="no information: input kept")
    axis.plot(x[order], np.asarray(tomogram["scale_after"], dtype=float)[order], "-", color="C0",
              label=f"written ({tomogram.get('scale_model', '').replace('_', ' ')})")
    if "scale_true" in tomogram:
        axis.plot(x[order], np.asarray(tomogram["scale_true"], dtype=float)[order], "k+", label="truth")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("contrast scale (rlnCtfScalefactor, unitless)")
    axis.grid(alpha=0.3)
    if legend:
        axis.legend(fontsize=8)


def _scale_figure(plt, name: str, tomogram: dict):
    """The per-tilt scale estimates (±1σ from their Fisher information) and the written scale against tilt
    angle and against the dose received before the tilt."""
    angle = np.asarray(tomogram["tilt_angle_deg"], dtype=float)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    _scale_panel(axes[0], angle, np.argsort(angle), tomogram, "tilt angle (°)", True)
    if "pre_exposure_e_per_angstrom2" in tomogram:
        dose = np.asarray(tomogram["pre_exposure_e_per_angstrom2"], dtype=float)
        _scale_panel(axes[1], dose, np.argsort(dose, kind="stable"), tomogram, "dose before the tilt (e⁻/Å²)", False)
        axes[1].set_title("against dose")
        axes[1].tick_params(labelleft=True)
    else:
        axes[1].set_visible(False)
    axes[0].set_title(f"{name}: contrast scale")
    figure.tight_layout()
    return figure


def _phase_figure(plt, title: str, maps: dict[str, np.ndarray]):
    figure, axes = plt.subplots(1, len(maps), figsize=(4.6 * len(maps), 4.3))
    for axis, (label, image) in zip(np.atleast_1d(axes), maps.items()):
        image = np.asarray(image)
        n = image.shape[0]
        # pixel i is frequency (i - n//2) / (n/2) of Nyquist
        low, high = (-(n // 2) - 0.5) / (n / 2), (n - 1 - n // 2 + 0.5) / (n / 2)
        shown = axis.imshow(image, cmap="twilight", vmin=-np.pi, vmax=np.pi, origin="lower", extent=(low, high, low, high))
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("kx (fraction of Nyquist)")
        axis.set_ylabel("ky (fraction of Nyquist)")
        figure.colorbar(shown, ax=axis, fraction=0.046, label="phase (rad)")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _hand_thresholds() -> tuple[float, float]:
    """The log-likelihood ratio (nats) and z-score a hand verdict needs (the hand check's defaults)."""
    import inspect

    from .refine.handedness import check_handedness

    parameters = inspect.signature(check_handedness).parameters
    return float(parameters["threshold_nats"].default), float(parameters["z_threshold"].default)


def _hand_figure(plt, summary: dict):
    """Per tomogram: the log-likelihood ratio of the input hand over the opposite one (nats) and its
    z-score over the tilts, with the thresholds a verdict needs."""
    names = [n for n, t in summary["tomograms"].items() if "hand" in t]
    hands = [summary["tomograms"][n]["hand"] for n in names]
    gains = np.array([h.get("log_likelihood_gain", 0.0) for h in hands], dtype=float)
    z_scores = np.array([h.get("z_score", 0.0) for h in hands], dtype=float)
    colours = ["C2" if h.get("verdict") == "input hand" else "C3" if h.get("verdict") == "opposite hand" else "0.6" for h in hands]
    labels = [f"{n}\n{h.get('verdict', '')}" + ("\n(opposite hand adopted)" if h.get("adopted") else "") for n, h in zip(names, hands)]
    threshold_nats, threshold_z = _hand_thresholds()
    figure, axes = plt.subplots(1, 2, figsize=(min(16.0, 9.0 + 0.8 * len(names)), 4.4))
    x = np.arange(len(names))
    many = len(names) > 6
    for axis, values, threshold, ylabel, title, unit in (
        (axes[0], gains, threshold_nats, "log-likelihood ratio (nats)", "input hand − opposite hand", " nats"),
        (axes[1], z_scores, threshold_z, "z-score (unitless)", "consistency over the tilts", ""),
    ):
        axis.bar(x, values, color=colours, width=0.6)
        if not many:
            for position, value in zip(x, values):
                axis.annotate(f"{value:+.1f}", (position, value), ha="center", va="bottom" if value >= 0 else "top", fontsize=8)
        axis.axhline(0, color="k", lw=0.8)
        axis.axhline(threshold, color="k", lw=0.7, ls="--", label=f"verdict needs ±{threshold:g}{unit}")
        axis.axhline(-threshold, color="k", lw=0.7, ls="--")
        axis.set_xticks(x, labels, fontsize=6 if many else 8, rotation=60 if many else 0)
        axis.set_xlim(-0.6, len(names) - 0.4)
        axis.set_xlabel("tomogram")
        axis.set_ylabel(ylabel)
        axis.set_title(title, fontsize=10)
        low, high = min(values.min(initial=0.0), -threshold), max(values.max(initial=0.0), threshold)
        axis.set_ylim(low - 0.15 * (high - low), high + 0.15 * (high - low))
        axis.legend(fontsize=8, loc="best")
    figure.suptitle("Hand check (positive: the input rlnTomoHand fits better; a verdict needs both thresholds, same sign)",
                    fontsize=10)
    figure.tight_layout()
    return figure


def _fsc_figure(plt, assessment: dict):
    """Mask-corrected gold-standard FSC before and after (and the unmasked ones; and against the truth
    when known), against spatial frequency with the resolution on the top axis."""
    curves = assessment["curves"]
    size, pixel = int(assessment["map_size_px"]), float(assessment["pixel_size_angstrom"])
    frequency = np.asarray(curves["spectral_index"], dtype=float) / (size * pixel)
    figure, axis = plt.subplots(figsize=(8, 4.8))
    for label, colour in (("before", "0.45"), ("after", "C0")):
        if f"{label}_corrected" not in curves:
            continue
        resolution = assessment.get(label, {}).get("resolution_0.143_angstrom")
        text = f"{label}: {resolution:.2f} Å at 0.143" if resolution else label
        axis.plot(frequency[1:], np.asarray(curves[f"{label}_corrected"])[1:], color=colour, lw=1.6, label=text)
        if f"{label}_unmasked" in curves:
            axis.plot(frequency[1:], np.asarray(curves[f"{label}_unmasked"])[1:], color=colour, ls=":", lw=0.9,
                      label=f"{label}, unmasked")
        if f"{label}_against_truth" in curves:
            axis.plot(frequency[1:], np.asarray(curves[f"{label}_against_truth"])[1:], color=colour, ls="--", lw=0.9,
                      label=f"{label}, masked map vs truth")
    axis.axhline(0.143, color="k", lw=0.6, ls="--")
    axis.text(frequency[-1], 0.15, "0.143", ha="right", va="bottom", fontsize=8)
    axis.axhline(0.0, color="k", lw=0.4)
    axis.set_xlim(0, frequency[-1] * 1.01)
    axis.set_ylim(-0.1, 1.02)
    axis.set_xlabel("spatial frequency (1/Å)")
    axis.set_ylabel("FSC (unitless)")
    axis.grid(alpha=0.3)
    top = axis.secondary_xaxis("top", functions=(lambda f: 1.0 / np.maximum(f, 1e-9), lambda r: 1.0 / np.maximum(r, 1e-9)))
    ticks = [r for r in (50, 30, 20, 15, 10, 8, 6, 5, 4, 3, 2.5, 2) if 1.0 / r <= frequency[-1] * 1.01]
    top.set_xticks(ticks, [f"{r:g}" for r in ticks])
    top.set_xlabel("resolution (Å)")
    if any(key.endswith("_against_truth") for key in curves):
        axis.axhline(0.5, color="k", lw=0.5, ls=(0, (1, 3)))
        axis.text(frequency[-1], 0.51, "0.5 (against the truth)", ha="right", va="bottom", fontsize=8)
    title = "Gold-standard FSC (mask-corrected) before and after CTF refinement"
    first, second = (assessment.get(label, {}).get("resolution_0.143_angstrom") for label in ("before", "after"))
    if first and second:
        title += f"\nresolution at 0.143: {first:.2f} Å before, {second:.2f} Å after"
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _image_figure(plt, path: Path):
    figure, axis = plt.subplots(figsize=(8, 5))
    axis.imshow(plt.imread(path))
    axis.axis("off")
    return figure


def save_figure_png(figure, path: Path, dpi: int | None = None) -> Path:
    """Write a figure as a PNG atomically (and close it)."""
    plt = _pyplot()
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=dpi or PLOT_DPI)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def write_fsc_plot(assessment: dict, path: Path) -> Path:
    """The FSC before/after page of the report (``assess.json``'s content) as a PNG on its own."""
    return save_figure_png(_fsc_figure(_pyplot(), assessment), path, dpi=110)


def read_phase_maps(out_dir: Path) -> dict:
    """The aberration phase maps written in ``out_dir`` (``group_<g>_<kind>_phase_<fit>.mrc``), by group."""
    from .io.maps import read_map

    maps: dict = {}
    for path in sorted(Path(out_dir).glob("group_*_phase_*.mrc")):
        group, kind, _, fit = path.stem.split("_", 1)[1].split("_")
        maps.setdefault(f"phase_group_{group}", {})[f"{kind} {fit}"] = np.squeeze(read_map(path)[0])
    return maps


def extend_report(out_dir: Path, assessment: dict | None = None, per_tomogram: dict[str, dict] | None = None) -> list[Path]:
    """Add to a finished run's ``summary.json`` and redraw its plots and ``logfile.pdf``.

    ``assessment``: :func:`tomoctfrefine.assess.assess`'s result (the report then has the FSC page);
    ``per_tomogram``: entries merged into each named tomogram's summary (e.g. the truth of simulated
    data: ``defocus_true_angstrom``, ``defocus_u/v_true_angstrom``, ``defocus_angle_true_deg``,
    ``scale_true``, drawn as black crosses). Returns the PNG paths (the pages of ``logfile.pdf``, in order).
    """
    out_dir = Path(out_dir)
    summary = json.loads((out_dir / "summary.json").read_text())
    if assessment is not None:
        summary["assessment"] = assessment
    for name, entries in (per_tomogram or {}).items():
        summary["tomograms"][name].update(entries)
    # what write_outputs drew and this does not change is not drawn again
    changed = {f"{kind}_{name}" for name in (per_tomogram or {}) for kind in ("defocus", "scale")} | {"fsc_before_after"}
    unchanged = {p.stem for p in (out_dir / "plots").glob("*.png") if p.stem not in changed and not p.name.endswith(".part.png")}
    paths = write_report(summary, out_dir, read_phase_maps(out_dir), reuse=unchanged)
    write_summary(summary, out_dir / "summary.json")
    return paths


#: Resolution of the PNGs and of the PDF's pages (the same raster).
PLOT_DPI = 90


def write_report(summary: dict, out_dir: Path, phase_maps: dict[str, dict[str, np.ndarray]] | None = None,
                 extra_images: list[Path] = (), reuse: Collection[str] = ()) -> list[Path]:
    """Draw every plot of ``summary`` as PNGs under ``out_dir/plots`` and all of them in ``logfile.pdf``:
    per tomogram defocus and scale, the aberration phase maps, the hand check and, when
    ``summary["assessment"]`` holds an assessment, the FSC before and after (``fsc_before_after``).
    ``extra_images``, PNGs made elsewhere, are added as pages, except one whose page is drawn already
    (``assess/fsc.png`` when the summary has the assessment). ``reuse`` names plots (PNG stems) whose
    existing PNG is still right: it becomes the page as it is, without drawing the figure again.

    Each figure is drawn once, at :data:`PLOT_DPI`, and that raster is both its PNG and its page of
    the PDF (Pillow writes the PDF): a vector PDF drew every figure a second time and loaded
    matplotlib's PDF backend, 1.2 of the 1.8 s the report took at the end of every run.

    Returns the PNG paths, in page order.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    drawers: list[tuple[str, Callable]] = []
    for name, tomogram in summary["tomograms"].items():
        if "defocus_u_after_angstrom" in tomogram:
            drawers.append((f"defocus_{name}", lambda plt, name=name, tomogram=tomogram: _defocus_figure(plt, name, tomogram)))
        if "scale_after" in tomogram:
            drawers.append((f"scale_{name}", lambda plt, name=name, tomogram=tomogram: _scale_figure(plt, name, tomogram)))
    for title, maps in (phase_maps or {}).items():
        label = title.replace("phase_group_", "aberration phases, optics group ").replace("_", " ")
        drawers.append((title, lambda plt, label=label, maps=maps: _phase_figure(plt, label, maps)))
    if any("hand" in t for t in summary["tomograms"].values()):
        drawers.append(("hand_check", lambda plt: _hand_figure(plt, summary)))
    if summary.get("assessment"):
        drawers.append(("fsc_before_after", lambda plt: _fsc_figure(plt, summary["assessment"])))
    for image in extra_images:
        stem = Path(image).stem + "_before_after"
        if stem not in (name for name, _ in drawers):  # the FSC page is drawn from the summary already
            drawers.append((stem, lambda plt, image=image: _image_figure(plt, image)))
    paths = []
    pages = []
    for stem, draw in drawers:
        path = plot_dir / f"{stem}.png"
        if stem in reuse and path.exists():
            page = Image.open(path).convert("RGB")
        else:
            plt = _pyplot()
            figure = draw(plt)
            figure.set_dpi(PLOT_DPI)
            figure.canvas.draw()
            page = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")
            plt.close(figure)
            page.save(path.with_suffix(".part.png"), format="PNG", dpi=(PLOT_DPI, PLOT_DPI))
            os.replace(path.with_suffix(".part.png"), path)
        pages.append(page)
        paths.append(path)
    if not pages:
        pages.append(Image.new("RGB", (PLOT_DPI * 6, PLOT_DPI * 4), "white"))
    tmp_pdf = out_dir / "logfile.pdf.part"
    pages[0].save(tmp_pdf, format="PDF", save_all=True, append_images=pages[1:], resolution=PLOT_DPI)
    os.replace(tmp_pdf, out_dir / "logfile.pdf")
    return paths
