"""The model of a whole tilt image (image_model.py), against the simulator's noiseless tilt images.

The simulator renders pseudo-atoms in real space and filters each particle with its own CTF on a patch
large enough for the delocalisation; the model projects the masked half maps through central slices.
Two independent routes to the same image: their difference is the model's error.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tomoctfrefine import forward, kernels, reference
from tomoctfrefine.image_model import render_tilt_model, with_own_particles
from tomoctfrefine.io.maps import memmap_stack, read_map
from tomoctfrefine.io.particles import half_sets, optics_zernike, particle_positions_px, particle_rotations, particles_of, read_particle_set
from tomoctfrefine.io.tomograms import read_tomogram_set, tomogram
from tomoctfrefine.refine.scale import scale_band, scale_evidence
from tomoctfrefine.simulate import SimulationParameters, simulate_dataset
from tomoctfrefine.statistics import compute_statistics

BOX = 128


def simulated(folder, particles: int, seed: int) -> dict:
    simulate_dataset(folder, SimulationParameters(seed=seed, n_tilts=7, tilt_max_deg=45.0, image_size_px=384,
                                                  particles_per_tomogram=particles, box_size_px=64, placement_margin_px=48,
                                                  write_noiseless=True, snr=1.0))
    tomo = tomogram(read_tomogram_set(folder / "truth" / "tomograms_true.star"), "TS_01")
    pset = read_particle_set(folder / "truth" / "particles_true.star")
    rows = particles_of(pset, "TS_01")
    half1, voxel = read_map(folder / "ref" / "half1.mrc")
    refs = reference.prepare_references(half1, read_map(folder / "ref" / "half2.mrc")[0],
                                        read_map(folder / "ref" / "mask.mrc")[0], BOX, voxel)
    truth = json.loads((folder / "truth" / "truth.json").read_text())
    positions = particle_positions_px(pset, rows, tomo)
    rotations = particle_rotations(pset, rows)
    halves = half_sets(pset, rows)
    clean = np.asarray(memmap_stack(folder / "truth" / "tilt_series" / "TS_01_noiseless.mrc"), dtype=np.float32)
    scale = np.array([t["scale"] for t in truth["tomograms"]["TS_01"]])
    image_positions = forward.image_positions_px(tomo, positions)
    matrices = forward.particle_matrices(tomo, rotations)
    depth = np.pi * tomo.optics.wavelength_angstrom * forward.depth_defocus_angstrom(tomo, positions)
    models = np.empty_like(clean)
    for f in range(tomo.tilt_count):
        slices = np.empty((len(rows), BOX, BOX // 2 + 1), dtype=np.complex64)
        kernels.central_slices(refs.bricks, refs.grid_size, np.asarray(halves, dtype=np.int64) - 1,
                               np.ascontiguousarray(matrices[:, f]), float(BOX * BOX), slices)
        models[f] = render_tilt_model(tomo, f, image_positions[:, f], slices, depth[:, f], scale[f], optics_zernike(pset, 1)[0],
                                      None, clean.shape[1:])
    return dict(tomo=tomo, refs=refs, clean=clean, models=models, scale=scale,
                particles=(positions, rotations, halves), even=optics_zernike(pset, 1)[0])


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    return simulated(tmp_path_factory.mktemp("crowded"), particles=14, seed=3)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return simulated(tmp_path_factory.mktemp("single"), particles=1, seed=4)


def test_the_rendered_model_is_the_simulated_noiseless_image(crowded):
    """Measured: the residual holds 0.3-0.6 % of the noiseless image's power (the half maps' 2 % noise,
    the mask's edge and the trilinear slices); with a wrong sign, shift or hand it would hold > 100 %."""
    clean, models = crowded["clean"], crowded["models"]
    for f in range(len(clean)):
        residual = np.sum((clean[f] - models[f]) ** 2) / np.sum(clean[f] ** 2)
        assert residual < 0.02, (f, residual)


def test_own_particle_added_back_gives_the_statistics_of_the_image_itself(single):
    """With one particle the model holds no neighbour: residual + own model = the image, so the
    statistics of the residual with its own particle added back analytically equal the image's."""
    d = single
    weights = np.ones((BOX, BOX // 2 + 1))
    plain = compute_statistics(d["tomo"], d["clean"], *d["particles"], d["refs"], weights, d["even"])
    residual = compute_statistics(d["tomo"], d["clean"] - d["models"], *d["particles"], d["refs"], weights, d["even"])
    rebuilt = with_own_particles(residual, d["scale"])
    scale_plain, _ = scale_evidence(plain, band=scale_band(BOX, d["tomo"].pixel_size_angstrom))
    scale_rebuilt, _ = scale_evidence(rebuilt, band=scale_band(BOX, d["tomo"].pixel_size_angstrom))
    np.testing.assert_allclose(scale_rebuilt, scale_plain, rtol=1e-4)
    # per pixel to 1 % (measured 0.5 %): the box cuts and tapers the rendered particle, the analytic own
    # term is the periodic product; with a wrong sign or shift they would differ by 100-200 %
    for name in ("b_s", "b_c"):
        a, b = getattr(plain, name), getattr(rebuilt, name)
        assert np.abs(a - b).max() <= 0.01 * np.abs(a).max(), name


def test_modelled_neighbours_leave_the_scale_at_the_truth(crowded):
    """Noiseless, crowded: without the model the neighbours' signal in each box scatters the fitted
    scale by about a percent; with it (residual + own model) the scale is the truth within 0.3 %."""
    d = crowded
    weights = np.ones((BOX, BOX // 2 + 1))
    band = scale_band(BOX, d["tomo"].pixel_size_angstrom)
    plain, _ = scale_evidence(compute_statistics(d["tomo"], d["clean"], *d["particles"], d["refs"], weights, d["even"]), band=band)
    residual = compute_statistics(d["tomo"], d["clean"] - d["models"], *d["particles"], d["refs"], weights, d["even"])
    modelled, _ = scale_evidence(with_own_particles(residual, d["scale"]), band=band)
    error_plain = np.std(plain / d["scale"])
    error_modelled = np.std(modelled / d["scale"])
    assert error_modelled < 0.003, (modelled / d["scale"])
    assert error_modelled < error_plain / 2, (error_plain, error_modelled)


def test_statistics_taken_to_another_defocus_equal_the_statistics_accumulated_there(single):
    """A defocus change is a phase common to a tilt's particles: rotating the sums is exact (periodic
    prediction), so the neighbour model can use the input statistics beyond its resolution."""
    import dataclasses

    from tomoctfrefine.physics.geometry import fourier_grid_per_angstrom
    from tomoctfrefine.refine.defocus import absolute_parameters, phase_basis_per_angstrom

    d = single
    tomo = d["tomo"]
    moved = dataclasses.replace(tomo, defocus_u_angstrom=tomo.defocus_u_angstrom + 700.0,
                                defocus_v_angstrom=tomo.defocus_v_angstrom + 400.0)
    weights = np.ones((BOX, BOX // 2 + 1))
    at_input = compute_statistics(tomo, d["clean"], *d["particles"], d["refs"], weights, d["even"], windowed=False)
    there = compute_statistics(moved, d["clean"], *d["particles"], d["refs"], weights, d["even"], windowed=False)
    n = tomo.tilt_count
    ctf = lambda t: (t.defocus_u_angstrom, t.defocus_v_angstrom, t.defocus_angle_deg)  # noqa: E731
    change = absolute_parameters(*ctf(moved), n) - absolute_parameters(*ctf(tomo), n)
    fx, fy = fourier_grid_per_angstrom(BOX, tomo.pixel_size_angstrom)
    delta = np.einsum("fc,cyx->fyx", change, phase_basis_per_angstrom(tomo.optics.wavelength_angstrom, fx, fy))
    rotated = at_input.with_phase_change(delta)
    for name in ("a_ss", "a_sc", "a_cc", "b_s", "b_c"):
        a, b = getattr(rotated, name), getattr(there, name)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), name
