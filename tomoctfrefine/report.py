"""What a refinement did, as pictures: per-tomogram PNGs, one ``logfile.pdf``, from ``summary.json``.

The summary is the single source: the CLI prints from it, the plots draw it, Scipion's viewer shows
the PNGs. Matplotlib runs with the Agg backend (no display needed).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_summary(summary: dict, path: Path) -> None:
    """Write JSON (``summary.json``, the run state) atomically; NaN is refused: other programs read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(summary, indent=1, allow_nan=False, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _defocus_figure(plt, name: str, tomogram: dict):
    angle = np.asarray(tomogram["tilt_angle_deg"])
    order = np.argsort(angle)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    before = (np.asarray(tomogram["defocus_u_before_angstrom"]) + np.asarray(tomogram["defocus_v_before_angstrom"])) / 2
    after = (np.asarray(tomogram["defocus_u_after_angstrom"]) + np.asarray(tomogram["defocus_v_after_angstrom"])) / 2
    axes[0].plot(angle[order], before[order] / 1e4, "o-", color="0.6", label="before")
    sigma = np.asarray(tomogram.get("defocus_uncertainty_angstrom", np.zeros_like(after)), dtype=float)
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, 0.0)  # -1 marks tilts without information
    axes[0].errorbar(angle[order], after[order] / 1e4, yerr=sigma[order] / 1e4, fmt="o-", color="C0", capsize=2, label="refined (±1σ)")
    if "defocus_true_angstrom" in tomogram:
        axes[0].plot(angle[order], np.asarray(tomogram["defocus_true_angstrom"])[order] / 1e4, "k+", label="truth")
    axes[0].set_xlabel("tilt angle (°)")
    axes[0].set_ylabel("mean defocus (µm)")
    axes[0].set_title(f"{name}: defocus")
    axes[0].legend(fontsize=8)
    astig_before = np.asarray(tomogram["defocus_v_before_angstrom"]) - np.asarray(tomogram["defocus_u_before_angstrom"])
    astig_after = np.asarray(tomogram["defocus_v_after_angstrom"]) - np.asarray(tomogram["defocus_u_after_angstrom"])
    axes[1].plot(angle[order], np.abs(astig_before[order]), "o-", color="0.6", label="before")
    axes[1].plot(angle[order], np.abs(astig_after[order]), "o-", color="C0", label="refined")
    axes[1].set_xlabel("tilt angle (°)")
    axes[1].set_ylabel("|V - U| (Å)")
    axes[1].set_title("astigmatism")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    return figure


def _scale_figure(plt, name: str, tomogram: dict):
    angle = np.asarray(tomogram["tilt_angle_deg"])
    order = np.argsort(angle)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(angle[order], np.asarray(tomogram["scale_before"])[order], "o-", color="0.6", label="before")
    if "scale_per_tilt" in tomogram:
        axis.plot(angle[order], np.asarray(tomogram["scale_per_tilt"])[order], "o", color="C1", label="per-tilt estimate")
    axis.plot(angle[order], np.asarray(tomogram["scale_after"])[order], "-", color="C0", label=f"written ({tomogram.get('scale_model', '')})")
    if "scale_true" in tomogram:
        axis.plot(angle[order], np.asarray(tomogram["scale_true"])[order], "k+", label="truth")
    axis.set_xlabel("tilt angle (°)")
    axis.set_ylabel("contrast scale")
    axis.set_title(f"{name}: contrast scale")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _phase_figure(plt, title: str, maps: dict[str, np.ndarray]):
    figure, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 4))
    for axis, (label, image) in zip(np.atleast_1d(axes), maps.items()):
        shown = axis.imshow(image, cmap="twilight", vmin=-np.pi, vmax=np.pi)
        axis.set_title(label, fontsize=9)
        axis.axis("off")
        figure.colorbar(shown, ax=axis, fraction=0.046)
    figure.suptitle(title)
    return figure


def _hand_figure(plt, summary: dict):
    names = list(summary["tomograms"])
    gains = [summary["tomograms"][n].get("hand", {}).get("log_likelihood_gain", 0.0) for n in names]
    figure, axis = plt.subplots(figsize=(6, 3))
    labels = [f"{n}\n(opposite hand adopted)" if summary["tomograms"][n].get("hand", {}).get("adopted") else n for n in names]
    axis.bar(labels, gains, color=["C2" if g >= 0 else "C3" for g in gains])
    axis.axhline(0, color="k", lw=0.8)
    axis.set_ylabel("log-likelihood: input hand - flipped")
    axis.set_title("handedness check (positive: the input hand fits better)")
    figure.tight_layout()
    return figure


def _image_figure(plt, path: Path):
    figure, axis = plt.subplots(figsize=(8, 5))
    axis.imshow(plt.imread(path))
    axis.axis("off")
    return figure


#: Resolution of the PNGs and of the PDF's pages (the same raster).
PLOT_DPI = 90


def write_report(summary: dict, out_dir: Path, phase_maps: dict[str, dict[str, np.ndarray]] | None = None,
                 extra_images: list[Path] = ()) -> list[Path]:
    """Draw every plot of ``summary`` as PNGs under ``out_dir/plots`` and all of them in ``logfile.pdf``
    (``extra_images``, PNGs made elsewhere such as the FSC before/after, are added as pages).

    Each figure is drawn once, at :data:`PLOT_DPI`, and that raster is both its PNG and its page of
    the PDF (Pillow writes the PDF): a vector PDF drew every figure a second time and loaded
    matplotlib's PDF backend, 1.2 of the 1.8 s the report took at the end of every run.

    Returns the PNG paths.
    """
    from PIL import Image

    plt = _pyplot()
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, object]] = []
    for name, tomogram in summary["tomograms"].items():
        if "defocus_u_after_angstrom" in tomogram:
            figures.append((f"defocus_{name}", _defocus_figure(plt, name, tomogram)))
        if "scale_after" in tomogram:
            figures.append((f"scale_{name}", _scale_figure(plt, name, tomogram)))
    for title, maps in (phase_maps or {}).items():
        figures.append((title, _phase_figure(plt, title.replace("_", " "), maps)))
    if any("hand" in t for t in summary["tomograms"].values()):
        figures.append(("hand_check", _hand_figure(plt, summary)))
    for image in extra_images:
        figures.append((Path(image).stem + "_before_after", _image_figure(plt, image)))
    paths = []
    pages = []
    for stem, figure in figures:
        figure.set_dpi(PLOT_DPI)
        figure.canvas.draw()
        page = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")
        plt.close(figure)
        path = plot_dir / f"{stem}.png"
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
