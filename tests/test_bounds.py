"""Cramér-Rao bounds from the statistics equal the real-space Fisher information of the images."""
import numpy as np
import pytest

from tomoctfrefine.physics.ctf import Optics, ctf_gamma
from tomoctfrefine.physics.geometry import fourier_grid_per_angstrom
from tomoctfrefine.refine.bounds import cramer_rao_bounds, fisher_information
from tomoctfrefine.statistics import TiltStatistics

OPTICS = Optics(300.0, 2.7, 0.1)


@pytest.mark.parametrize("box", [16, 17])
def test_fisher_information_equals_the_real_space_sum_over_pixels(box):
    """I = sum_x (d m_x / d t)^2 / sigma^2 over the real-space pixels of every particle image."""
    rng = np.random.default_rng(0)
    pixel, sigma, scale, n_particles = 2.0, 0.7, 1.3, 5
    fx, fy = fourier_grid_per_angstrom(box, pixel)
    q = np.fft.rfft2(rng.normal(size=(n_particles, box, box)), norm="ortho")
    depth = rng.normal(0, 200, n_particles)[:, None, None]
    defocus = 8000.0

    def images(dz=0.0, c=scale):
        gamma = ctf_gamma(defocus + dz + depth, defocus + dz + depth, 0.0, OPTICS, fx, fy)
        return np.fft.irfft2(-c * np.sin(gamma) * q, s=(box, box), norm="ortho")

    h = 0.5
    d_dz = (images(h) - images(-h)) / (2 * h)
    d_c = images(c=1.0)
    expected_dz = np.sum(d_dz**2) / sigma**2
    expected_c = np.sum(d_c**2) / sigma**2
    expected_cross = np.sum(d_dz * d_c) / sigma**2

    gamma = ctf_gamma(defocus + depth, defocus + depth, 0.0, OPTICS, fx, fy)
    w = 1 / sigma**2
    q2 = w * np.abs(q) ** 2
    sg, cg = np.sin(gamma), np.cos(gamma)
    zeros = np.zeros((1, box, box // 2 + 1))
    stats = TiltStatistics(
        a_ss=(q2 * sg * sg).sum(0)[None], a_sc=(q2 * sg * cg).sum(0)[None], a_cc=(q2 * cg * cg).sum(0)[None],
        b_s=zeros.astype(complex), b_c=zeros.astype(complex), oo=zeros, particle_count=np.array([n_particles]),
        box_size_px=box, pixel_size_angstrom=pixel,
    )
    fisher = fisher_information(stats, OPTICS.wavelength_angstrom, [scale])[0]
    # DC excluded by the bound; its contribution to d/dz is exactly zero and to d/dc small
    assert fisher[0, 0] == pytest.approx(expected_dz, rel=1e-5)  # central difference, h = 0.5 Å
    dc_term = w * np.abs(q[:, 0, 0]) ** 2 @ np.sin(gamma[:, 0, 0]) ** 2
    assert fisher[3, 3] == pytest.approx(expected_c - dc_term, rel=1e-9)
    assert fisher[0, 3] == pytest.approx(expected_cross, rel=1e-5, abs=1e-9 * expected_dz)
    bounds = cramer_rao_bounds(stats, OPTICS.wavelength_angstrom, [scale])
    assert bounds.defocus_angstrom[0] == pytest.approx(1 / np.sqrt(expected_dz), rel=1e-5)
    assert bounds.defocus_joint_angstrom[0] >= bounds.defocus_angstrom[0]
    assert bounds.scale_joint[0] >= bounds.scale[0]


def test_tilts_without_particles_have_an_infinite_bound():
    zeros = np.zeros((2, 8, 5))
    stats = TiltStatistics(zeros, zeros, zeros, zeros.astype(complex), zeros.astype(complex), zeros, np.array([0, 0]), 8, 2.0)
    bounds = cramer_rao_bounds(stats, OPTICS.wavelength_angstrom, [1.0, 1.0])
    assert np.all(np.isinf(bounds.defocus_angstrom)) and np.all(np.isinf(bounds.scale_joint))
