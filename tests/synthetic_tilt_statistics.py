"""Pixel-level synthetic data for the refinement tests: TiltStatistics accumulated with numpy.

Particles are random real-space images (optionally a fixed-size object embedded in the box, so that
two box sizes see the same physical particle), Fourier transformed with numpy's unitary rfft2. The
observation of particle i in tilt f is ``o = -c_f exp(i psi) sin(gamma_true) q + N`` with ``N`` the
unitary rfft2 of white real noise of variance ``sigma^2`` (so ``E|N_k|^2 = sigma^2``, ``w = 1/sigma^2``),
and the statistics are accumulated at a *starting* CTF exactly as the contract of
:mod:`tomoctfrefine.statistics` says.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tomoctfrefine.physics.ctf import Optics, ctf_gamma, quadratic_form_from_defocus
from tomoctfrefine.physics.geometry import fourier_grid_per_angstrom
from tomoctfrefine.statistics import TiltStatistics


@dataclass
class Truth:
    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    defocus_angle_deg: np.ndarray
    scale: np.ndarray
    even_phase_rad: np.ndarray | float
    odd_phase_rad: np.ndarray | float
    depth_angstrom: list


def change_between(start_u, start_v, start_angle, true_u, true_v, true_angle) -> np.ndarray:
    """``(dz, a_c, a_s)`` taking the start CTF to the true one (see refine.defocus)."""
    out = []
    for args in zip(start_u, start_v, start_angle, true_u, true_v, true_angle):
        s = np.array(quadratic_form_from_defocus(*args[:3]))
        t = np.array(quadratic_form_from_defocus(*args[3:]))
        d = t - s
        out.append((-(d[0] + d[2]) / 2, -(d[0] - d[2]) / 2, -d[1]))
    return np.array(out)


def simulate_statistics(
    rng: np.random.Generator,
    *,
    optics: Optics,
    box_size_px: int,
    pixel_size_angstrom: float,
    particles_per_tilt,
    true_u, true_v, true_angle,
    start_u, start_v, start_angle,
    scale,
    noise_sigma: float,
    depth_sd_angstrom: float = 300.0,
    true_even_phase=0.0,
    start_even_phase=0.0,
    true_odd_phase=0.0,
    object_px: int | None = None,
    bfactor_angstrom2: float = 40.0,
    with_flipped_hand: bool = False,
    true_hand: float = 1.0,
) -> tuple[TiltStatistics, Truth]:
    s, p = box_size_px, pixel_size_angstrom
    n_tilts = len(true_u)
    counts = np.broadcast_to(np.asarray(particles_per_tilt), (n_tilts,)).astype(int)
    fx, fy = fourier_grid_per_angstrom(s, p)
    envelope = np.exp(-0.25 * bfactor_angstrom2 * (fx**2 + fy**2))
    shape = (n_tilts, s, s // 2 + 1)
    acc = {k: np.zeros(shape) for k in ("a_ss", "a_sc", "a_cc", "oo")}
    acc.update({k: np.zeros(shape, complex) for k in ("b_s", "b_c")})
    flip = {k: np.zeros_like(v) for k, v in acc.items()} if with_flipped_hand else None
    w = 1.0 / noise_sigma**2
    rotation = np.exp(1j * np.asarray(true_odd_phase))
    depths = []
    for f in range(n_tilts):
        n = counts[f]
        depth = rng.normal(0.0, depth_sd_angstrom, n)
        depths.append(depth)
        if n == 0:
            continue
        if object_px is None:
            images = rng.normal(size=(n, s, s))
        else:
            images = np.zeros((n, s, s))
            lo = (s - object_px) // 2
            images[:, lo:lo + object_px, lo:lo + object_px] = rng.normal(size=(n, object_px, object_px))
        q = np.fft.rfft2(images, norm="ortho") * envelope
        noise = np.fft.rfft2(rng.normal(0.0, noise_sigma, (n, s, s)), norm="ortho")
        dz = depth[:, None, None]
        gamma_true = ctf_gamma(true_u[f] + true_hand * dz, true_v[f] + true_hand * dz, true_angle[f], optics, fx, fy, even_phase_rad=true_even_phase)
        o = -scale[f] * rotation * np.sin(gamma_true) * q + noise
        targets = [(acc, 1.0)] + ([(flip, -1.0)] if flip is not None else [])
        for target, hand in targets:
            gamma = ctf_gamma(start_u[f] + hand * dz, start_v[f] + hand * dz, start_angle[f], optics, fx, fy, even_phase_rad=start_even_phase)
            sg, cg = np.sin(gamma), np.cos(gamma)
            q2 = w * np.abs(q) ** 2
            z = w * o * np.conj(q)
            target["a_ss"][f] = (q2 * sg * sg).sum(0)
            target["a_sc"][f] = (q2 * sg * cg).sum(0)
            target["a_cc"][f] = (q2 * cg * cg).sum(0)
            target["b_s"][f] = (z * sg).sum(0)
            target["b_c"][f] = (z * cg).sum(0)
            target["oo"][f] = (w * np.abs(o) ** 2).sum(0)
    flipped = None
    if flip is not None:
        flipped = TiltStatistics(**flip, particle_count=counts.copy(), box_size_px=s, pixel_size_angstrom=p)
    stats = TiltStatistics(**acc, particle_count=counts.copy(), box_size_px=s, pixel_size_angstrom=p, flipped_hand=flipped)
    truth = Truth(np.asarray(true_u), np.asarray(true_v), np.asarray(true_angle), np.asarray(scale), true_even_phase, true_odd_phase, depths)
    return stats, truth
