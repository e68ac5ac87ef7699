"""Per-tilt sufficient statistics: everything the defocus, scale and aberration fits need.

For one tomogram, tilt ``f`` and Fourier pixel ``k`` (numpy ``rfft2`` grid, shape ``(s, s//2+1)``,
indexed ``[y, x]``), summed over the particles ``i`` visible in that tilt:

* ``q_ik``: the CTF-free, dose-weighted prediction of particle i (central slice of its own half map,
  normalised so that a true projection has scale 1, i.e. box-independent);
* ``gamma_ik``: the CTF phase of particle i at the *current* parameters (tilt's central defocus plus the
  particle's depth offset, current even aberrations, amplitude contrast, phase shift);
* ``o_ik``: the observed box (raw: odd aberrations are *not* removed, so that they can be fitted);
* ``w_k``: the noise weight (inverse noise power) of the tilt.

    a_ss = sum_i w |q|^2 sin^2 gamma      a_sc = sum_i w |q|^2 sin gamma cos gamma
    a_cc = sum_i w |q|^2 cos^2 gamma
    b_s  = sum_i w o conj(q) sin gamma    b_c  = sum_i w o conj(q) cos gamma       (complex)
    oo   = sum_i w |o|^2

Model: ``o = -c_f exp(i psi(k)) sin(gamma + delta(k)) q + noise``, with a per-tilt scale ``c_f``, an
extra CTF phase ``delta`` common to all particles (defocus change, astigmatism, even aberrations) and an
odd phase ``psi``. With ``e = (cos delta, sin delta)`` the weighted squared residual is *exactly*

    sum_k [ oo + c^2 e^T A e + 2 c Re(exp(-i psi) e^T b) ]

so every fit runs on these arrays, never on images. The statistics for the opposite defocus hand
(``*_flipped_hand``, optional) serve the handedness check.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TiltStatistics:
    """Sufficient statistics of one tomogram (arrays have a leading tilt axis).

    Attributes
    ----------
    a_ss, a_sc, a_cc : ndarray, float64, shape (n_tilts, s, s//2+1)
    b_s, b_c : ndarray, complex128, shape (n_tilts, s, s//2+1)
    oo : ndarray, float64, shape (n_tilts, s, s//2+1)
    particle_count : ndarray, int, shape (n_tilts,)
        Number of visible particles accumulated per tilt.
    box_size_px : int
    pixel_size_angstrom : float
    flipped_hand : TiltStatistics or None
        The same statistics computed with the opposite defocus hand.
    """

    a_ss: np.ndarray
    a_sc: np.ndarray
    a_cc: np.ndarray
    b_s: np.ndarray
    b_c: np.ndarray
    oo: np.ndarray
    particle_count: np.ndarray
    box_size_px: int
    pixel_size_angstrom: float
    flipped_hand: "TiltStatistics | None" = field(default=None)

    @property
    def n_tilts(self) -> int:
        return self.a_ss.shape[0]

    def save(self, path) -> None:
        """Save as ``.npz`` (atomically: temporary name, then rename)."""
        import os

        arrays = {name: getattr(self, name) for name in ("a_ss", "a_sc", "a_cc", "b_s", "b_c", "oo", "particle_count")}
        arrays["meta"] = np.array([self.box_size_px, self.pixel_size_angstrom])
        if self.flipped_hand is not None:
            for name in ("a_ss", "a_sc", "a_cc", "b_s", "b_c", "oo"):
                arrays[f"flipped_{name}"] = getattr(self.flipped_hand, name)
        path = str(path)
        tmp = path + ".part.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "TiltStatistics":
        with np.load(path) as data:
            meta = data["meta"]
            common = dict(particle_count=data["particle_count"], box_size_px=int(meta[0]), pixel_size_angstrom=float(meta[1]))
            flipped = None
            if "flipped_a_ss" in data:
                flipped = cls(**{n: data[f"flipped_{n}"] for n in ("a_ss", "a_sc", "a_cc", "b_s", "b_c", "oo")}, **common)
            return cls(**{n: data[n] for n in ("a_ss", "a_sc", "a_cc", "b_s", "b_c", "oo")}, **common, flipped_hand=flipped)
