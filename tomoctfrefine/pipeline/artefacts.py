"""What each step keeps per tomogram (or optics group) under ``temp/``, as typed objects with their save/load.

Every artefact is one ``.npz`` written atomically (:func:`~.workspace.save_arrays`); loading tolerates fields
added later (they take their defaults), so a folder written by an older version still resumes.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..refine.defocus import DefocusFit
from .workspace import load_arrays, save_arrays


def _fit_arrays(fit: DefocusFit | None, prefix: str = "") -> dict:
    if fit is None:
        return {}
    return {prefix + f.name: getattr(fit, f.name) for f in dataclasses.fields(fit) if getattr(fit, f.name) is not None}


def _fit_from(arrays: dict, prefix: str = "") -> DefocusFit | None:
    if prefix + "defocus_u_angstrom" not in arrays:
        return None
    values = {}
    for f in dataclasses.fields(DefocusFit):
        if prefix + f.name in arrays:
            values[f.name] = arrays[prefix + f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            return None  # written by an incompatible version: redo it
    return DefocusFit(**values)


@dataclass
class HandCheck:
    """The hand check of one tomogram (``refine.handedness``) and whether its verdict was adopted."""

    log_likelihood_gain: float
    z_score: float
    verdict: str
    message: str
    adopted: bool

    def arrays(self) -> dict:
        return {"hand_log_likelihood_gain": np.array(self.log_likelihood_gain), "hand_z_score": np.array(self.z_score),
                "hand_verdict": np.array(self.verdict), "hand_message": np.array(self.message),
                "hand_adopted": np.array(self.adopted)}

    @classmethod
    def from_arrays(cls, arrays: dict) -> "HandCheck | None":
        if "hand_verdict" not in arrays:
            return None
        return cls(float(arrays["hand_log_likelihood_gain"]), float(arrays["hand_z_score"]), str(arrays["hand_verdict"]),
                   str(arrays["hand_message"]), bool(arrays["hand_adopted"]))


@dataclass
class DefocusResult:
    """The defocus step's result for one tomogram (also the aberration step's per-tomogram defocus)."""

    fit: DefocusFit
    hand: HandCheck | None = None

    def save(self, path: Path) -> None:
        save_arrays(path, **_fit_arrays(self.fit), **({} if self.hand is None else self.hand.arrays()))

    @classmethod
    def load(cls, path: Path) -> "DefocusResult | None":
        arrays = load_arrays(path)
        fit = _fit_from(arrays)
        return None if fit is None else cls(fit, HandCheck.from_arrays(arrays))


@dataclass
class ScaleEvidence:
    """Per-tilt scale estimate and its Fisher information at the latest CTF (the scale step's first half), the
    estimate before the neighbours were modelled, and the defocus polished on the neighbour-free statistics."""

    estimate: np.ndarray
    information: np.ndarray
    first_estimate: np.ndarray
    first_information: np.ndarray
    polished: DefocusFit | None = None

    def save(self, path: Path) -> None:
        save_arrays(path, estimate=self.estimate, information=self.information, first_estimate=self.first_estimate,
                    first_information=self.first_information, **_fit_arrays(self.polished))

    @classmethod
    def load(cls, path: Path) -> "ScaleEvidence":
        arrays = load_arrays(path)
        return cls(arrays["estimate"], arrays["information"], arrays.get("first_estimate", arrays["estimate"]),
                   arrays.get("first_information", arrays["information"]), _fit_from(arrays))


@dataclass
class ScaleResult:
    """The scale model fitted for one tomogram: per-tilt scale to write, the evidence it was fitted to, and the
    Beer-Lambert parameters when a model was fitted."""

    scale: np.ndarray
    estimate: np.ndarray
    information: np.ndarray
    model: str
    success: bool
    message: str
    luminance: float | None = None
    relative_ice_thickness: float | None = None
    ice_normal: np.ndarray | None = None

    def save(self, path: Path) -> None:
        save_arrays(path, scale=self.scale, estimate=self.estimate, information=self.information,
                    luminance=self.luminance, relative_ice_thickness=self.relative_ice_thickness,
                    ice_normal=self.ice_normal,
                    fit=np.array(json.dumps({"model": self.model, "success": bool(self.success), "message": self.message})))

    @classmethod
    def load(cls, path: Path) -> "ScaleResult":
        arrays = load_arrays(path)
        fit = json.loads(str(arrays["fit"]))
        optional = lambda key: arrays[key] if key in arrays else None  # noqa: E731
        luminance, thickness = optional("luminance"), optional("relative_ice_thickness")
        return cls(arrays["scale"], arrays["estimate"], arrays["information"], fit["model"], fit["success"],
                   fit["message"], None if luminance is None else float(luminance),
                   None if thickness is None else float(thickness), optional("ice_normal"))


@dataclass
class AberrationResult:
    """The aberrations fitted for one optics group: coefficients (None when that kind was not refined), their
    uncertainties and the phase maps (per pixel and of the fit, on the half grid)."""

    even_coefficients: np.ndarray | None
    odd_coefficients: np.ndarray | None
    even_uncertainty: np.ndarray | None = None
    odd_uncertainty: np.ndarray | None = None
    even_phase_per_pixel: np.ndarray | None = None
    even_phase_fit: np.ndarray | None = None
    odd_phase_per_pixel: np.ndarray | None = None
    odd_phase_fit: np.ndarray | None = None

    def save(self, path: Path) -> None:
        save_arrays(path, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def load(cls, path: Path) -> "AberrationResult":
        arrays = load_arrays(path)
        return cls(**{f.name: arrays.get(f.name) for f in dataclasses.fields(cls)})
