"""Refinement of per-tilt defocus, contrast scale and Zernike aberrations from :class:`TiltStatistics`.

Every fit works on the statistics alone (never on images), with the likelihood and its Fisher
information of :mod:`tomoctfrefine.refine.likelihood`. Order used by the pipeline:

1. :func:`refine_defocus` per tomogram (scan, then astigmatic fit, scale profiled out);
2. :func:`refine_aberrations` per optics group (if requested), starting from step 1's results; its
   ``defocus`` dict supersedes step 1 (defocus and scale refined jointly with the aberrations);
3. a scale model from the per-frame estimates and their information (``DefocusFit.scale`` and
   ``scale_information``, or :func:`scale_evidence` when the defocus is not refined): :func:`fit_per_frame_scale`, :func:`fit_beer_lambert` or
   :func:`fit_global_beer_lambert`;
4. :func:`check_handedness` (optional; needs statistics with ``flipped_hand``);
5. :func:`cramer_rao_bounds` for benchmarks (from statistics at the true CTF).
"""
from .aberrations import AberrationFit, add_coefficients, even_fit_design, full_centred_image, refine_aberrations
from .bounds import CramerRaoBounds, cramer_rao_bounds, fisher_information
from .defocus import DefocusFit, apply_defocus_change, refine_defocus
from .handedness import HandednessVerdict, check_handedness
from .likelihood import FrequencyBand, half_plane_multiplicity
from .scale import ScaleFit, fit_beer_lambert, fit_global_beer_lambert, fit_per_frame_scale, scale_evidence, tilt_geometry

__all__ = [
    "AberrationFit", "CramerRaoBounds", "DefocusFit", "FrequencyBand", "HandednessVerdict", "ScaleFit",
    "add_coefficients", "apply_defocus_change", "check_handedness", "cramer_rao_bounds", "even_fit_design",
    "fisher_information", "fit_beer_lambert", "fit_global_beer_lambert", "fit_per_frame_scale",
    "full_centred_image", "half_plane_multiplicity", "refine_aberrations", "refine_defocus", "scale_evidence",
    "tilt_geometry",
]
