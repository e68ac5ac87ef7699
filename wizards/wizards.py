"""Form wizards of "tomo CTF refinement": estimation box and defocus scan range from the inputs."""
import numpy as np
from pwem.wizards import EmWizard

from tomoctfrefine.protocols import ProtTomoCtfRefine

from . import estimation


def estimation_box_for(protocol) -> int:
    """The estimation box (px) the wizard proposes for ``protocol``'s inputs."""
    from tomoctfrefine.io.maps import read_map

    volume, mask, ts_set = protocol.recVolume.get(), protocol.inRefMask.get(), protocol.inputTiltSeries.get()
    if volume is None or mask is None or ts_set is None:
        raise ValueError("Select the tilt series, the average and the mask first.")
    pixel_size = ts_set.getSamplingRate()
    mask_map, mask_pixel = read_map(mask.getFileName().split(":")[0])
    diameter = estimation.particle_diameter_angstrom(mask_map, mask_pixel)
    max_defocus = 0.0
    ctf_set = protocol.inputCtfTomoSeries.get()
    if ctf_set is not None:
        for series in ctf_set.iterItems():
            for ctf in series.iterItems():
                max_defocus = max(max_defocus, ctf.getDefocusU(), ctf.getDefocusV())
    dims = ts_set.getDim()
    return estimation.estimation_box_px(diameter, volume.getXDim(), pixel_size, max_defocus,
                                        ts_set.getAcquisition().getVoltage(),
                                        image_size_px=min(dims[0], dims[1]) if dims else None)


def defocus_range_for(protocol) -> float:
    """The ± defocus scan range (Å) the wizard proposes from ``protocol``'s input CTFs."""
    ctf_set = protocol.inputCtfTomoSeries.get()
    if ctf_set is None:
        raise ValueError("Select the CTF of the tilt series first.")
    means = {}
    for series in ctf_set.iterItems():
        values = [0.5 * (c.getDefocusU() + c.getDefocusV()) for c in series.iterItems() if c.isEnabled()]
        means[series.getTsId()] = np.array(values)
    return estimation.defocus_scan_range_angstrom(means)


class TomoCtfRefineBoxSizeWizard(EmWizard):
    """Estimation box from the particle diameter (the mask's extent), the reference box and the CTF
    delocalisation at the largest input defocus."""

    _targets = [(ProtTomoCtfRefine, ["boxSize"])]

    def show(self, form, *params):
        try:
            form.setVar("boxSize", estimation_box_for(form.protocol))
        except ValueError as error:
            form.showError(str(error))


class TomoCtfRefineDefocusRangeWizard(EmWizard):
    """Defocus scan range from the spread of the input per-tilt defocus."""

    _targets = [(ProtTomoCtfRefine, ["defocusRange"])]

    def show(self, form, *params):
        try:
            form.setVar("defocusRange", int(defocus_range_for(form.protocol)))
        except ValueError as error:
            form.showError(str(error))
