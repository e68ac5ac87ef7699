"""Scipion viewer of "tomo CTF refinement": the engine's report plots (PNG) from Analyze Results.

The engine's report writes ``<out>/plots/*.png`` (defocus and scale against tilt, phase maps, hand
check); the viewer shows whichever exist, in that order, so it keeps working when the report adds
or drops a plot. The refined ``SetOfCTFTomoSeries`` also opens in scipion-em-tomo's CTF viewer.
"""
from __future__ import annotations

from pathlib import Path

from pyworkflow.viewer import DESKTOP_TKINTER, MessageView, View, Viewer

from tomoctfrefine.protocols import ProtTomoCtfRefine

#: Plot name prefixes in display order; anything else comes last, alphabetically.
PLOT_ORDER = ("defocus", "scale", "even", "odd", "group", "hand")


def report_plots(out_dir) -> list[Path]:
    """The report's PNG files under ``out_dir`` (``plots/`` or the folder itself), in display order."""
    out_dir = Path(out_dir)
    pngs = {p for folder in (out_dir / "plots", out_dir) if folder.is_dir() for p in folder.glob("*.png")}
    pngs = {p for p in pngs if not p.name.endswith(".part.png")}

    def rank(path: Path):
        prefix = next((i for i, name in enumerate(PLOT_ORDER) if path.stem.startswith(name)), len(PLOT_ORDER))
        return prefix, path.stem

    return sorted(pngs, key=rank)


class PngView(View):
    """One PNG in a matplotlib window."""

    def __init__(self, path, title=None):
        View.__init__(self)
        self.path = Path(path)
        self.title = title or self.path.stem.replace("_", " ")

    def show(self):
        import matplotlib.image as mpimg
        import matplotlib.pyplot as plt

        figure = plt.figure(self.title)
        axis = figure.add_axes([0, 0, 1, 1])
        axis.imshow(mpimg.imread(str(self.path)))
        axis.set_axis_off()
        figure.show()


class TomoCtfRefineViewer(Viewer):
    """Plots of the refinement: defocus and contrast scale per tilt, aberration phase maps, hand check."""

    _label = "tomo CTF refinement plots"
    _targets = [ProtTomoCtfRefine]
    _environments = [DESKTOP_TKINTER]

    def _visualize(self, obj, **kwargs):
        plots = report_plots(obj.outDir())
        if not plots:
            return [MessageView(f"No plots yet in {obj.outDir()}: the refinement has not written its report.",
                                title="tomo CTF refinement", tkParent=self.getTkRoot())]
        return [PngView(path) for path in plots]
