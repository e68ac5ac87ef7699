"""Synthetic RELION-5 tomography datasets with known truth (demo data, tests, benchmarks).

The forward simulation is independent of the project's prediction code: it renders each particle from
Gaussian pseudo-atoms directly in every tilt image, so that the refinement and the forward model are
tested against something they do not share. Only the physics conventions (projection matrices, Euler
angles, CTF, dose, Zernike basis, depth-dependent defocus) come from :mod:`tomoctfrefine.physics`.

Image model (per tilt ``f``, particle ``i``; Fourier transform of a patch around the particle)::

    I_f = sum_i  -c_f * CTF_if(k) * D_f(k) * exp(i chi_odd(k)) * Proj_if(k)  +  white noise

* ``Proj_if``: the pseudo-atoms of the reference, rotated by the particle's ``A = euler_zyz(rot, tilt,
  psi)`` (reference -> tomogram), placed at the particle position and projected with the tilt's
  projection matrix; a 3D Gaussian of mass ``m`` and width ``sigma`` projects to a 2D Gaussian of the same
  mass and width. The reference map ``ref/map_true.mrc`` holds the same atoms as 3D Gaussians on the
  voxel grid (box centre at ``s // 2``), so its sum along z equals the projection of an untilted,
  unrotated particle: the image's contrast scale is the one of "sum of map voxels along a ray".
* ``CTF_if = -sin(gamma)`` with the tilt's true U, V, angle plus the particle's depth offset
  ``hand * p * slope * dz`` (RELION's model), even Zernike phase in gamma; ``D_f`` the dose weight of the
  tilt's pre-exposure; ``c_f`` the true contrast scale (Beer-Lambert times a per-tilt jitter).
* The minus sign: raw tilt images have inverted contrast with respect to the reference (the spec's
  pitfall 1): a particle is dark.
* Noise: white Gaussian, ``sigma^2 = var(noiseless lowest-dose tilt image) / snr`` (mean over tomograms).

The STAR files carry perturbed *starting* values (defocus, astigmatism; scale ``start_scale``; no Zernike
terms); ``truth/truth.json`` and ``truth/*_true.star`` carry the truth.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Union

import mrcfile
import numpy as np
import pandas as pd
import scipy.fft

from .errors import InputError, Problem
from .fsc import mask_corrected_fsc, write_fsc_star
from .io import particles as particle_columns
from .io import tomograms as tomogram_columns
from .io.maps import write_map
from .io.optimisation_set import OptimisationSet, write_optimisation_set
from .io.star import StarDocument, format_vector, write_text_atomic, write_star
from .physics import geometry
from .physics.ctf import Optics, ctf_gamma, electron_wavelength_angstrom
from .physics.dose import dose_weight
from .physics.zernike import even_phase_rad, odd_phase_rad

PathLike = Union[str, os.PathLike]

#: Where :func:`simulate_dataset` writes the truth, relative to the output folder.
TRUTH_JSON = Path("truth") / "truth.json"


@dataclass(frozen=True)
class SimulationParameters:
    """Everything a simulated dataset depends on (with the seed, it is reproducible bit for bit).

    The defaults make a small dataset (1 tomogram, 13 tilts of 320² px, 24 particles) in about a second.
    See :data:`PRESETS` for the datasets of the accuracy and map benchmarks.

    Attributes
    ----------
    seed : int
        Seed of every random draw (atoms, geometry, CTF, particles, noise use separate streams).
    n_tomograms, n_tilts : int
        Tilt series and tilts per series (nominal angles evenly spaced over ``±tilt_max_deg``).
    tilt_max_deg : float
    dose_per_tilt_e_per_angstrom2 : float
        Dose of one tilt (``rlnTomoImportFractionalDose``); pre-exposure = dose x acquisition index.
    dose_scheme : str
        ``"dose_symmetric"`` (Hagen: 0, then groups of ``dose_symmetric_group_size`` tilts alternating
        positive first), ``"sequential"`` (from -max to +max) or ``"bidirectional"`` (0 to +max, then
        -step to -max).
    dose_symmetric_group_size : int
    image_size_px : int
        Square tilt images; the tomogram is ``image_size_px`` x ``image_size_px`` x ``tomogram_thickness_px``.
    tomogram_thickness_px : int
    pixel_size_angstrom : float
    voltage_kv, spherical_aberration_mm, amplitude_contrast : float
    bfactor_per_electron_dose_angstrom2 : float
        0: Grant-Grigorieff dose weights; > 0: RELION 5's ``exp(-b N k^2/4)`` (written to tomograms.star).
    defocus_mean_angstrom, defocus_tomogram_sd_angstrom, defocus_tilt_sd_angstrom : float
        True mean defocus ``(U+V)/2``: mean, spread between tomograms, spread between tilts.
    astigmatism_angstrom, astigmatism_tilt_sd_angstrom : float
        True ``U - V`` and its per-tilt spread.
    astigmatism_angle_deg : float or None
        Mean astigmatism angle (None: random per tomogram); per-tilt spread ``astigmatism_angle_tilt_sd_deg``.
    hand : int
        True defocus handedness (+1 or -1) used to simulate the depth-dependent defocus.
    written_hand : int or None
        ``rlnTomoHand`` written to tomograms.star (None: the true hand; the opposite tests hand checks).
    defocus_slope : float
        ``rlnTomoDefocusSlope`` (written only when not 1).
    even_zernike, odd_zernike : tuple of float
        True aberrations in RELION's index order (radius in 1/Å); the start files carry none.
    ice_thickness_relative, ice_thickness_tomogram_sd : float
        Beer-Lambert scale ``c_f = L exp(-tau / |n . v_f|) (1 + scale_jitter N(0,1))`` (RELION's model,
        ``v_f`` the viewing direction of tilt f): ``tau`` and its spread between tomograms.
    ice_normal_tilt_deg : float
        Angle between the ice normal ``n`` and z (random azimuth per tomogram).
    relative_luminance : float or None
        ``L``; None: ``exp(ice_thickness_relative)`` so that an untilted view has scale about 1.
    scale_jitter : float
        Relative per-tilt scale jitter.
    z_rot_deg, z_rot_sd_deg, x_tilt_sd_deg, tilt_offset_sd_deg, tilt_angle_sd_deg, shift_sd_angstrom : float
        Tilt geometry (written exactly to the files): tilt-axis angle and per-tilt spread, a per-tomogram
        x tilt, a per-tomogram and a per-tilt deviation of the y tilt from nominal, per-tilt shifts.
    particles_per_tomogram : int
    box_size_px : int
        Reference box (half maps, mask, true map).
    particle_radius_angstrom : float
        Pseudo-atoms are drawn uniformly in a ball of this radius.
    n_atoms : int
    atom_sigma_min_angstrom, atom_sigma_max_angstrom : float
        Gaussian width of each atom, uniform in this range ("sharpness": about 1.2-1.6 Å atoms keep
        signal to 4 Å; 2-2.6 Å atoms stop near 7 Å).
    placement_margin_px : int or None
        Particles are placed so that their projected centre stays more than this from the image edges in
        every tilt (None: ``box_size_px``, so every particle is visible in every tilt for estimation boxes
        up to twice the reference box).
    min_separation_fraction : float
        Minimum distance between particle centres, as a fraction of the particle diameter.
    half_map_noise_fraction : float
        Independent white noise added to each half map, relative to the true map's standard deviation.
    snr : float
        Variance of the noiseless lowest-dose tilt image over the noise variance.
    start_defocus_rms_angstrom : float
        The starting defocus (both U and V) is off by this RMS over all tilts (exactly).
    start_astigmatism_sd_angstrom, start_angle_sd_deg : float
        Perturbation of the starting ``U - V`` and angle.
    start_scale : float
        ``rlnCtfScalefactor`` written in the starting files.
    write_noiseless : bool
        Also write the noiseless stacks to ``truth/tilt_series/<name>_noiseless.mrc``.
    include_fsc : bool
        Name ``ref/postprocess.star`` in the optimisation set.
    render_box_px : int or None
        Patch size for the CTF convolution (None: from the delocalisation of each tilt's CTF).
    """

    seed: int = 0
    n_tomograms: int = 1
    n_tilts: int = 13
    tilt_max_deg: float = 36.0
    dose_per_tilt_e_per_angstrom2: float = 3.0
    dose_scheme: str = "dose_symmetric"
    dose_symmetric_group_size: int = 2
    image_size_px: int = 320
    tomogram_thickness_px: int = 120
    pixel_size_angstrom: float = 2.0
    voltage_kv: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor_per_electron_dose_angstrom2: float = 0.0
    defocus_mean_angstrom: float = 30000.0
    defocus_tomogram_sd_angstrom: float = 3000.0
    defocus_tilt_sd_angstrom: float = 300.0
    astigmatism_angstrom: float = 500.0
    astigmatism_tilt_sd_angstrom: float = 50.0
    astigmatism_angle_deg: float | None = None
    astigmatism_angle_tilt_sd_deg: float = 5.0
    hand: int = -1
    written_hand: int | None = None
    defocus_slope: float = 1.0
    even_zernike: tuple = ()
    odd_zernike: tuple = ()
    ice_thickness_relative: float = 0.3
    ice_thickness_tomogram_sd: float = 0.0
    ice_normal_tilt_deg: float = 0.0
    relative_luminance: float | None = None
    scale_jitter: float = 0.1
    z_rot_deg: float = 3.0
    z_rot_sd_deg: float = 0.2
    x_tilt_sd_deg: float = 0.2
    tilt_offset_sd_deg: float = 1.0
    tilt_angle_sd_deg: float = 0.3
    shift_sd_angstrom: float = 10.0
    particles_per_tomogram: int = 24
    box_size_px: int = 64
    particle_radius_angstrom: float = 40.0
    n_atoms: int = 250
    atom_sigma_min_angstrom: float = 2.0
    atom_sigma_max_angstrom: float = 2.6
    placement_margin_px: int | None = None
    min_separation_fraction: float = 0.9
    half_map_noise_fraction: float = 0.05
    snr: float = 0.5
    start_defocus_rms_angstrom: float = 900.0
    start_astigmatism_sd_angstrom: float = 100.0
    start_angle_sd_deg: float = 15.0
    start_scale: float = 1.0
    write_noiseless: bool = False
    include_fsc: bool = True
    render_box_px: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "even_zernike", tuple(float(v) for v in self.even_zernike))
        object.__setattr__(self, "odd_zernike", tuple(float(v) for v in self.odd_zernike))

    @property
    def optics(self) -> Optics:
        return Optics(self.voltage_kv, self.spherical_aberration_mm, self.amplitude_contrast)

    @property
    def margin_px(self) -> int:
        return self.box_size_px if self.placement_margin_px is None else int(self.placement_margin_px)

    @property
    def luminance(self) -> float:
        return math.exp(self.ice_thickness_relative) if self.relative_luminance is None else float(self.relative_luminance)

    def to_dict(self) -> dict:
        """All parameters as a JSON-ready dict."""
        values = asdict(self)
        values["even_zernike"] = list(self.even_zernike)
        values["odd_zernike"] = list(self.odd_zernike)
        return values

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SimulationParameters":
        """Parameters of a named preset (:data:`PRESETS`) with some fields replaced."""
        if name not in PRESETS:
            raise InputError([Problem("--preset", f"unknown preset {name!r}", f"use one of {', '.join(PRESETS)}", "preset")])
        return cls(**{**PRESETS[name], **overrides})


def isotropic_rho4_even_zernike(phase_rad: float, resolution_angstrom: float) -> list[float]:
    """Even coefficients (indices 0, 2, 6) of a pure ``c rho^4`` phase reaching ``phase_rad`` at
    ``resolution_angstrom``: ``6 rho^4 = Z(0,4) + 3 Z(0,2) + 2 Z(0,0)`` in RELION's unnormalised basis."""
    c = phase_rad * resolution_angstrom**4
    coefficients = [0.0] * 9
    coefficients[0], coefficients[2], coefficients[6] = 2 * c / 6, 3 * c / 6, c / 6
    return coefficients


def coma_trefoil_odd_zernike(coma_rad: float, trefoil_rad: float, resolution_angstrom: float) -> list[float]:
    """Odd coefficients of pure ``rho^3 cos(phi)`` coma and ``rho^3 cos(3 phi)`` trefoil with the given
    phases at ``resolution_angstrom``: ``3 rho^3 cos phi = Z(1,3) + 2 Z(1,1)``; ``Z(3,3) = rho^3 cos 3phi``."""
    r3 = resolution_angstrom**3
    coefficients = [0.0] * 6
    coefficients[1] = 2 * coma_rad * r3 / 3
    coefficients[4] = coma_rad * r3 / 3
    coefficients[5] = trefoil_rad * r3
    return coefficients


#: Named parameter sets. ``accuracy``: the issue-5 dataset (2 x 41 tilts ±60°, 150 particles per tomogram,
#: 1024² px at 2 Å, SNR 0.1, start 900 Å RMS off). ``map``: the issue-11 dataset (1.35 Å, sharp atoms,
#: 128-px reference, visible for boxes up to 512). ``map_aberrations``: ``map`` with even (rho^4, 1.2 rad at
#: 3.5 Å, plus Z(4,4) 1.5 rad) and odd (trefoil 1 rad, coma 0.2 rad at 3.5 Å) aberrations.
PRESETS: dict[str, dict] = {
    "small": {},
    "accuracy": dict(
        n_tomograms=2, n_tilts=41, tilt_max_deg=60.0, image_size_px=1024, tomogram_thickness_px=200,
        particles_per_tomogram=150, box_size_px=96, particle_radius_angstrom=50.0, n_atoms=600,
        placement_margin_px=192, snr=0.1, start_defocus_rms_angstrom=900.0,
    ),
    "map": dict(
        n_tomograms=2, n_tilts=41, tilt_max_deg=60.0, image_size_px=1024, tomogram_thickness_px=400,
        pixel_size_angstrom=1.35, particles_per_tomogram=135, box_size_px=128, particle_radius_angstrom=50.0,
        n_atoms=2000, atom_sigma_min_angstrom=1.2, atom_sigma_max_angstrom=1.6, placement_margin_px=256,
        min_separation_fraction=0.8, snr=0.1, start_defocus_rms_angstrom=950.0, half_map_noise_fraction=0.02,
    ),
}
_MAP_EVEN = isotropic_rho4_even_zernike(1.2, 3.5)
_MAP_EVEN[8] = 1.5 * 3.5**4  # Z(4,4) = rho^4 cos(4 phi): 1.5 rad at 3.5 Å
PRESETS["map_aberrations"] = dict(PRESETS["map"], even_zernike=tuple(_MAP_EVEN), odd_zernike=tuple(coma_trefoil_odd_zernike(0.2, 1.0, 3.5)))


def _problem(key: str, message: str, fix: str) -> Problem:
    return Problem("simulation parameters", message, fix, key)


def check_parameters(params: SimulationParameters) -> list[Problem]:
    """Every problem of a parameter set (empty when it can be simulated)."""
    problems = []
    p = params.pixel_size_angstrom
    positive = ["n_tomograms", "n_tilts", "image_size_px", "tomogram_thickness_px", "pixel_size_angstrom", "voltage_kv",
                "particles_per_tomogram", "box_size_px", "particle_radius_angstrom", "n_atoms", "atom_sigma_min_angstrom", "snr"]
    for name in positive:
        if not getattr(params, name) > 0:
            problems.append(_problem(name, f"{name} must be positive (got {getattr(params, name)})", f"give a positive {name}"))
    if problems:
        return problems
    if params.box_size_px % 2:
        problems.append(_problem("box_size_px", f"the reference box must be even (got {params.box_size_px})", "use an even box"))
    if params.image_size_px % 2:
        problems.append(_problem("image_size_px", f"the image size must be even (got {params.image_size_px})", "use an even size"))
    if params.hand not in (1, -1) or (params.written_hand is not None and params.written_hand not in (1, -1)):
        problems.append(_problem("hand", "hand and written_hand must be +1 or -1", "use 1 or -1"))
    if params.atom_sigma_max_angstrom < params.atom_sigma_min_angstrom:
        problems.append(_problem("atom_sigma_max_angstrom", "atom_sigma_max_angstrom is below atom_sigma_min_angstrom", "swap them"))
    extent_px = (params.particle_radius_angstrom + 3 * params.atom_sigma_max_angstrom) / p
    if extent_px >= params.box_size_px / 2 - 1:
        problems.append(_problem("box_size_px", f"particle (radius {params.particle_radius_angstrom} Å plus 3 atom sigmas = "
                                 f"{extent_px:.1f} px) does not fit in the {params.box_size_px}-px reference box",
                                 "increase box_size_px or decrease particle_radius_angstrom"))
    if params.particle_radius_angstrom / p >= params.tomogram_thickness_px / 2:
        problems.append(_problem("tomogram_thickness_px", "the tomogram is thinner than a particle", "increase tomogram_thickness_px"))
    if 2 * params.margin_px >= params.image_size_px:
        problems.append(_problem("placement_margin_px", f"margin {params.margin_px} px leaves no room in a {params.image_size_px}-px image",
                                 "decrease placement_margin_px (or box_size_px) or increase image_size_px"))
    if params.dose_scheme not in ("dose_symmetric", "sequential", "bidirectional"):
        problems.append(_problem("dose_scheme", f"unknown dose scheme {params.dose_scheme!r}", "use dose_symmetric, sequential or bidirectional"))
    if params.tilt_max_deg >= 89 or params.tilt_max_deg < 0:
        problems.append(_problem("tilt_max_deg", "tilt_max_deg must lie in [0, 89)", "give a smaller tilt range"))
    return problems


# ----------------------------------------------------------------------------------------------------
# Random streams: each part of the truth has its own, so changing the particle count does not change the
# defocus truth, etc.

_STREAMS = {"atoms": 1, "half_maps": 2, "geometry": 3, "ctf": 4, "scale": 5, "particles": 6, "start": 7, "noise": 8, "fsc": 9}


def _rng(params: SimulationParameters, stream: str, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(params.seed), _STREAMS[stream], int(index)])


def noise_realisation(params: SimulationParameters, tomogram_index: int, noise_sigma: float):
    """The white noise added to each tilt image of tomogram ``tomogram_index`` (0-based, in the order
    written), tilt by tilt: ``(image_size_px, image_size_px)`` float32 arrays. Seeded, so the noise of a
    written dataset can be drawn again (benchmarks compare a refinement with an efficient estimator on
    the very same noise)."""
    rng = _rng(params, "noise", tomogram_index)
    for _ in range(params.n_tilts):
        yield noise_sigma * rng.standard_normal((params.image_size_px, params.image_size_px), dtype=np.float32)


def _q(values):
    """Round to the six decimals the STAR files carry, so files, truth and simulation agree exactly."""
    return np.round(np.asarray(values, dtype=float), 6)


# ----------------------------------------------------------------------------------------------------
# The structure: Gaussian pseudo-atoms, the 3D map and the 2D projections.


@dataclass(frozen=True)
class PseudoAtoms:
    """Gaussian pseudo-atoms of the reference.

    Attributes
    ----------
    positions_angstrom : ndarray (n, 3)
        (x, y, z) relative to the box centre.
    sigma_angstrom : ndarray (n,)
    mass : ndarray (n,)
        Integral of each atom's density (map units x voxels).
    """

    positions_angstrom: np.ndarray
    sigma_angstrom: np.ndarray
    mass: np.ndarray


def make_pseudo_atoms(params: SimulationParameters) -> PseudoAtoms:
    """Atoms drawn uniformly in a ball of ``particle_radius_angstrom``, widths and masses at random."""
    rng = _rng(params, "atoms")
    n = params.n_atoms
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius = params.particle_radius_angstrom * rng.uniform(size=n) ** (1.0 / 3.0)
    sigma = rng.uniform(params.atom_sigma_min_angstrom, params.atom_sigma_max_angstrom, size=n)
    mass = rng.uniform(0.5, 1.5, size=n)
    return PseudoAtoms(direction * radius[:, None], sigma, mass)


def _gaussian_profiles(coordinates_px: np.ndarray, centres_px: np.ndarray, sigma_px: np.ndarray) -> np.ndarray:
    """Normalised 1D Gaussians ``(..., n_atoms, len(coordinates))`` in the dtype of ``sigma_px``, exactly 0
    beyond 9 sigma (no subnormal numbers, which would slow the products down many times)."""
    dtype = sigma_px.dtype
    d = (coordinates_px.astype(dtype) - centres_px.astype(dtype)[..., None]) / sigma_px[:, None]
    half_d2 = dtype.type(0.5) * d * d
    values = np.exp(-np.minimum(half_d2, dtype.type(40.0)))
    values[half_d2 >= 40.0] = 0.0
    return values / (dtype.type(math.sqrt(2 * math.pi)) * sigma_px[:, None])


def render_map(atoms: PseudoAtoms, box_size_px: int, pixel_size_angstrom: float) -> np.ndarray:
    """The atoms as 3D Gaussians on the voxel grid, ``[z, y, x]`` float64, atom at ``s//2 + x/p``.

    Each atom contributes ``mass * N(x; mu, sigma^2 I)`` sampled at voxel centres, so the sum of the map
    along z is the 2D rendering of :func:`render_projection` of the untilted, unrotated particle.
    """
    s = box_size_px
    centre = s // 2 + atoms.positions_angstrom / pixel_size_angstrom
    sigma = atoms.sigma_angstrom / pixel_size_angstrom
    grid = np.arange(s, dtype=float)
    gx = _gaussian_profiles(grid, centre[:, 0], sigma)
    gy = _gaussian_profiles(grid, centre[:, 1], sigma) * atoms.mass[:, None]
    gz = _gaussian_profiles(grid, centre[:, 2], sigma)
    volume = np.empty((s, s, s))
    for z in range(s):
        volume[z] = (gy * gz[:, z, None]).T @ gx
    return volume


def render_projection(
    atom_xy_px: np.ndarray, sigma_px: np.ndarray, mass: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """2D rendering ``[y, x]`` of projected atoms (2D Gaussians of the same mass and width).

    Parameters
    ----------
    atom_xy_px : ndarray (..., n_atoms, 2)
        Atom positions in pixel coordinates of the image (pixel ``[j, i]`` is at ``(x, y) = (i, j)``);
        leading axes are a batch.
    sigma_px, mass : ndarray (n_atoms,)
    shape : (height, width)
    """
    gx = _gaussian_profiles(np.arange(shape[1], dtype=float), atom_xy_px[..., 0], sigma_px)
    gy = _gaussian_profiles(np.arange(shape[0], dtype=float), atom_xy_px[..., 1], sigma_px) * mass[:, None]
    return np.matmul(np.swapaxes(gy, -1, -2), gx)


def soft_sphere_mask(box_size_px: int, radius_px: float, edge_width_px: float = 5.0) -> np.ndarray:
    """1 inside ``radius_px`` of the box centre ``s//2``, raised-cosine edge over ``edge_width_px``."""
    grid = np.arange(box_size_px) - box_size_px // 2
    r = np.sqrt(grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None, :] ** 2)
    mask = 0.5 + 0.5 * np.cos(np.pi * np.clip((r - radius_px) / edge_width_px, 0.0, 1.0))
    return mask


# ----------------------------------------------------------------------------------------------------
# Acquisition: tilt angles, dose order, geometry, CTF and scale truth, starting values.


def acquisition_order(nominal_deg: np.ndarray, scheme: str, group_size: int = 2) -> np.ndarray:
    """Acquisition index of each tilt (tilts given in any order; the one nearest 0° is first)."""
    n = len(nominal_deg)
    by_angle = np.argsort(nominal_deg, kind="stable")
    zero = int(np.argmin(np.abs(nominal_deg)))
    if scheme == "sequential":
        sequence = list(by_angle)
    else:
        positive = [i for i in by_angle if nominal_deg[i] > nominal_deg[zero]]
        negative = [i for i in by_angle[::-1] if nominal_deg[i] < nominal_deg[zero]]
        sequence = [zero]
        if scheme == "bidirectional":
            sequence += positive + negative
        else:
            while positive or negative:
                sequence += positive[:group_size] + negative[:group_size]
                positive, negative = positive[group_size:], negative[group_size:]
    order = np.empty(n, dtype=int)
    order[np.array(sequence)] = np.arange(n)
    return order


@dataclass
class TomogramTruth:
    """Per-tomogram truth (per-tilt arrays in table order, i.e. sorted by nominal angle).

    Angles in degrees, shifts in Å, defocus in Å; positions in tomogram pixels.
    """

    name: str
    nominal_deg: np.ndarray
    x_tilt_deg: np.ndarray
    y_tilt_deg: np.ndarray
    z_rot_deg: np.ndarray
    x_shift_angstrom: np.ndarray
    y_shift_angstrom: np.ndarray
    pre_exposure_e_per_angstrom2: np.ndarray
    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    defocus_angle_deg: np.ndarray
    scale: np.ndarray
    start_defocus_u_angstrom: np.ndarray
    start_defocus_v_angstrom: np.ndarray
    start_defocus_angle_deg: np.ndarray
    projection_matrices: np.ndarray
    ice_thickness_relative: float
    ice_normal: np.ndarray
    centred_coordinates_angstrom: np.ndarray = field(default=None)
    angles_deg: np.ndarray = field(default=None)
    positions_px: np.ndarray = field(default=None)
    rotations: np.ndarray = field(default=None)
    random_subset: np.ndarray = field(default=None)

    @property
    def n_tilts(self) -> int:
        return len(self.nominal_deg)


def tomogram_size_px(params: SimulationParameters) -> tuple[int, int, int]:
    return (params.image_size_px, params.image_size_px, params.tomogram_thickness_px)


def _tilt_geometry(params: SimulationParameters, index: int) -> dict:
    rng = _rng(params, "geometry", index)
    n = params.n_tilts
    nominal = np.linspace(-params.tilt_max_deg, params.tilt_max_deg, n) if n > 1 else np.zeros(1)
    order = acquisition_order(nominal, params.dose_scheme, params.dose_symmetric_group_size)
    x_tilt = np.full(n, rng.normal(0.0, params.x_tilt_sd_deg))
    y_tilt = nominal + rng.normal(0.0, params.tilt_offset_sd_deg) + rng.normal(0.0, params.tilt_angle_sd_deg, n)
    z_rot = params.z_rot_deg + rng.normal(0.0, params.z_rot_sd_deg, n)
    shifts = rng.normal(0.0, params.shift_sd_angstrom, (2, n))
    return dict(
        nominal_deg=_q(nominal), x_tilt_deg=_q(x_tilt), y_tilt_deg=_q(y_tilt), z_rot_deg=_q(z_rot),
        x_shift_angstrom=_q(shifts[0]), y_shift_angstrom=_q(shifts[1]),
        pre_exposure_e_per_angstrom2=_q(order * params.dose_per_tilt_e_per_angstrom2),
    )


def _projection_matrices(params: SimulationParameters, g: dict) -> np.ndarray:
    size = tomogram_size_px(params)
    image = (params.image_size_px, params.image_size_px)
    return np.stack([
        geometry.projection_matrix(xt, yt, zr, xs, ys, params.pixel_size_angstrom, size, image)
        for xt, yt, zr, xs, ys in zip(g["x_tilt_deg"], g["y_tilt_deg"], g["z_rot_deg"], g["x_shift_angstrom"], g["y_shift_angstrom"])
    ])


def viewing_directions(projection_matrices: np.ndarray) -> np.ndarray:
    """RELION's ``v_f``: the normalised third row of each projection matrix's rotation (tomogram frame)."""
    rows = projection_matrices[:, 2, :3]
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _ctf_truth(params: SimulationParameters, index: int, n: int) -> dict:
    rng = _rng(params, "ctf", index)
    mean = params.defocus_mean_angstrom + rng.normal(0.0, params.defocus_tomogram_sd_angstrom) + rng.normal(0.0, params.defocus_tilt_sd_angstrom, n)
    astig = params.astigmatism_angstrom + rng.normal(0.0, params.astigmatism_tilt_sd_angstrom, n)
    base_angle = rng.uniform(-90.0, 90.0) if params.astigmatism_angle_deg is None else params.astigmatism_angle_deg
    angle = base_angle + rng.normal(0.0, params.astigmatism_angle_tilt_sd_deg, n)
    return dict(defocus_u_angstrom=_q(mean + astig / 2), defocus_v_angstrom=_q(mean - astig / 2), defocus_angle_deg=_q(angle))


def _scale_truth(params: SimulationParameters, index: int, projection_matrices: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    rng = _rng(params, "scale", index)
    n = len(projection_matrices)
    tau = params.ice_thickness_relative + rng.normal(0.0, params.ice_thickness_tomogram_sd)
    azimuth = rng.uniform(0.0, 2 * np.pi)
    t = np.deg2rad(params.ice_normal_tilt_deg)
    normal = np.array([np.sin(t) * np.cos(azimuth), np.sin(t) * np.sin(azimuth), np.cos(t)])
    cosine = np.abs(viewing_directions(projection_matrices) @ normal)
    jitter = np.clip(1.0 + params.scale_jitter * rng.normal(size=n), 0.05, None)
    return _q(params.luminance * np.exp(-tau / cosine) * jitter), float(tau), normal


def _start_values(params: SimulationParameters, truths: list[dict]) -> list[dict]:
    """Perturbed starting CTFs: defocus offsets with exactly the requested RMS over all tilts."""
    rng = _rng(params, "start")
    counts = [len(t["defocus_u_angstrom"]) for t in truths]
    offsets = rng.normal(size=sum(counts))
    rms = float(np.sqrt(np.mean(offsets**2))) if len(offsets) else 0.0
    if rms > 0:
        offsets *= params.start_defocus_rms_angstrom / rms
    starts = []
    begin = 0
    for truth, n in zip(truths, counts):
        u, v, a = truth["defocus_u_angstrom"], truth["defocus_v_angstrom"], truth["defocus_angle_deg"]
        off = offsets[begin:begin + n]
        begin += n
        astig = (u - v) + rng.normal(0.0, params.start_astigmatism_sd_angstrom, n)
        mean = (u + v) / 2 + off
        starts.append(dict(
            start_defocus_u_angstrom=_q(mean + astig / 2), start_defocus_v_angstrom=_q(mean - astig / 2),
            start_defocus_angle_deg=_q(a + rng.normal(0.0, params.start_angle_sd_deg, n)),
        ))
    return starts


def random_rotation_angles_deg(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniformly distributed orientations as RELION (rot, tilt, psi) in degrees, shape ``(n, 3)``."""
    rot = rng.uniform(-180.0, 180.0, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
    psi = rng.uniform(-180.0, 180.0, n)
    return np.stack([rot, tilt, psi], axis=1)


def _place_particles(params: SimulationParameters, index: int, projection_matrices: np.ndarray, name: str) -> dict:
    """Random positions inside the slab whose projections stay ``margin`` px inside every tilt image, at
    least ``min_separation_fraction`` particle diameters apart (random sequential addition)."""
    rng = _rng(params, "particles", index)
    size = tomogram_size_px(params)
    centre = geometry.tomogram_centre_px(size)
    radius_px = params.particle_radius_angstrom / params.pixel_size_angstrom
    half_z = size[2] / 2 - radius_px
    margin = params.margin_px
    separation = params.min_separation_fraction * 2 * radius_px
    wanted = params.particles_per_tomogram
    chosen = np.empty((0, 3))
    idle = 0
    while len(chosen) < wanted and idle < 20:
        candidates = np.column_stack([
            rng.uniform(0.0, size[0], 4096), rng.uniform(0.0, size[1], 4096), centre[2] + rng.uniform(-half_z, half_z, 4096)
        ])
        # centred coordinates in Å are what the file carries: round them first
        candidates = _q((candidates - centre) * params.pixel_size_angstrom) / params.pixel_size_angstrom + centre
        xy = geometry.project(projection_matrices, candidates)[..., :2]
        candidates = candidates[np.all((xy > margin) & (xy < params.image_size_px - margin), axis=(1, 2))]
        if len(chosen):
            distance = np.linalg.norm(candidates[:, None, :] - chosen[None, :, :], axis=-1).min(axis=1)
            candidates = candidates[distance >= separation]
        before = len(chosen)
        for candidate in candidates:
            if len(chosen) > before and np.min(np.linalg.norm(chosen[before:] - candidate, axis=1)) < separation:
                continue
            chosen = np.vstack([chosen, candidate])
            if len(chosen) == wanted:
                break
        idle = idle + 1 if len(chosen) == before else 0
    if len(chosen) < wanted:
        raise InputError([_problem(
            "particles_per_tomogram",
            f"only {len(chosen)} of {wanted} particles fit in tomogram {name} with margin {margin} px and separation {separation:.0f} px",
            "decrease particles_per_tomogram, placement_margin_px or min_separation_fraction, or increase image_size_px "
            "or tomogram_thickness_px",
        )])
    positions = chosen
    angles = _q(random_rotation_angles_deg(rng, wanted))
    return dict(
        positions_px=positions,
        centred_coordinates_angstrom=_q((positions - centre) * params.pixel_size_angstrom),
        angles_deg=angles,
        rotations=geometry.euler_zyz_matrices(angles[:, 0], angles[:, 1], angles[:, 2]),
        random_subset=np.arange(wanted) % 2 + 1,
    )


def make_tomogram_truths(params: SimulationParameters) -> list[TomogramTruth]:
    """Geometry, CTF, scale, starting values and particles of every tomogram."""
    geometries = [_tilt_geometry(params, t) for t in range(params.n_tomograms)]
    ctfs = [_ctf_truth(params, t, params.n_tilts) for t in range(params.n_tomograms)]
    starts = _start_values(params, ctfs)
    truths = []
    for t in range(params.n_tomograms):
        name = f"TS_{t + 1:02d}"
        matrices = _projection_matrices(params, geometries[t])
        scale, tau, normal = _scale_truth(params, t, matrices)
        truth = TomogramTruth(name=name, **geometries[t], **ctfs[t], scale=scale, **starts[t], projection_matrices=matrices,
                              ice_thickness_relative=tau, ice_normal=normal)
        for key, value in _place_particles(params, t, matrices, name).items():
            setattr(truth, key, value)
        truths.append(truth)
    return truths


# ----------------------------------------------------------------------------------------------------
# Rendering the tilt images.


def _cutoff_frequency_per_angstrom(params: SimulationParameters, pre_exposure: float) -> float:
    """Highest frequency where signal survives the sharpest atoms and the tilt's dose (1e-4), <= Nyquist."""
    nyquist = 0.5 / params.pixel_size_angstrom
    k = np.linspace(0.0, nyquist, 512)
    envelope = np.exp(-2 * np.pi**2 * params.atom_sigma_min_angstrom**2 * k**2) * dose_weight(
        pre_exposure, k, params.bfactor_per_electron_dose_angstrom2)
    alive = np.nonzero(envelope > 1e-4)[0]
    return float(k[alive[-1]]) if len(alive) else nyquist


def _delocalisation_angstrom(params: SimulationParameters, u: float, v: float, angle: float, k_max: float) -> float:
    """Largest displacement ``|grad phase| / 2 pi`` of the tilt's CTF and odd phase up to ``k_max``."""
    n = 257
    axis = np.linspace(-k_max, k_max, n)
    fx, fy = np.meshgrid(axis, axis)
    even = even_phase_rad(params.even_zernike, fx, fy)
    gamma = ctf_gamma(u, v, angle, params.optics, fx, fy, even_phase_rad=even)
    odd = odd_phase_rad(params.odd_zernike, fx, fy)
    step = axis[1] - axis[0]
    inside = fx**2 + fy**2 <= k_max**2
    largest = 0.0
    for phase in (gamma + odd, gamma - odd):
        gy, gx = np.gradient(phase, step)
        largest = max(largest, float(np.max(np.hypot(gx, gy)[inside])))
    return largest / (2 * np.pi)


def _even_fast(n: int) -> int:
    n = scipy.fft.next_fast_len(int(n), real=True)
    while n % 2:
        n = scipy.fft.next_fast_len(n + 1, real=True)
    return n


def _patch_size_px(params: SimulationParameters, render_px: int, max_defocus: float, u: float, v: float, angle: float, pre: float) -> int:
    if params.render_box_px is not None:
        return int(params.render_box_px)
    k_max = _cutoff_frequency_per_angstrom(params, pre)
    extra = max_defocus - max(u, v)
    delocalisation = _delocalisation_angstrom(params, u + extra, v + extra, angle, k_max) / params.pixel_size_angstrom
    return _even_fast(render_px + 2 * math.ceil(delocalisation) + 16)


def _render_region_px(atoms: PseudoAtoms, pixel_size_angstrom: float) -> int:
    extent = np.max(np.linalg.norm(atoms.positions_angstrom, axis=1) + 5 * atoms.sigma_angstrom) / pixel_size_angstrom
    return 2 * math.ceil(extent) + 4


def render_tilt_series(
    params: SimulationParameters, atoms: PseudoAtoms, truth: TomogramTruth, out: np.ndarray, chunk: int = 16
) -> None:
    """Write the noiseless tilt images of one tomogram into ``out`` (n_tilts, H, W), in place.

    Each particle is rendered on a small region around its projected centre, embedded in a patch large
    enough for the CTF's delocalisation, filtered in Fourier space (float32: the phases stay accurate to
    ~1e-5 rad) and added to the image (clipped at its edges).
    """
    f32 = np.float32
    p = params.pixel_size_angstrom
    size = tomogram_size_px(params)
    wavelength = electron_wavelength_angstrom(params.voltage_kv)
    sigma_px = (atoms.sigma_angstrom / p).astype(f32)
    mass = atoms.mass.astype(f32)
    atoms_px = atoms.positions_angstrom / p
    render_px = _render_region_px(atoms, p)
    depth_offsets = geometry.depth_defocus_offset_angstrom(truth.projection_matrices, truth.positions_px, size, params.hand, p, params.defocus_slope)
    height = width = params.image_size_px
    for f in range(truth.n_tilts):
        u, v, angle = truth.defocus_u_angstrom[f], truth.defocus_v_angstrom[f], truth.defocus_angle_deg[f]
        pre = truth.pre_exposure_e_per_angstrom2[f]
        max_defocus = max(u, v) + float(np.max(np.abs(depth_offsets[:, f])))
        patch = _patch_size_px(params, render_px, max_defocus, u, v, angle, pre)
        fx, fy = geometry.fourier_grid_per_angstrom(patch, p)
        k2 = fx**2 + fy**2
        gamma = ctf_gamma(u, v, angle, params.optics, fx, fy, even_phase_rad=even_phase_rad(params.even_zernike, fx, fy)).astype(f32)
        # everything but the per-particle CTF; the leading minus is the inverted contrast of raw tilt images
        common = -truth.scale[f] * dose_weight(pre, np.sqrt(k2), params.bfactor_per_electron_dose_angstrom2)
        if any(params.odd_zernike):
            common = (common * np.exp(1j * odd_phase_rad(params.odd_zernike, fx, fy))).astype(np.complex64)
        else:
            common = common.astype(f32)
        k2 = k2.astype(f32)
        centres = geometry.project(truth.projection_matrices[f:f + 1], truth.positions_px)[:, 0, :2]
        origins = np.round(centres).astype(int) - patch // 2
        overlaps = np.all((origins + patch > 0) & (origins < np.array([width, height])), axis=1)
        rotations = truth.projection_matrices[f, :3, :3] @ truth.rotations  # reference -> image frame
        image = np.zeros((height, width))
        start = patch // 2 - render_px // 2
        for begin in range(0, len(centres), chunk):
            rows = np.arange(begin, min(begin + chunk, len(centres)))
            rows = rows[overlaps[rows]]
            if not len(rows):
                continue
            offsets = np.einsum("pij,aj->pai", rotations[rows, :2, :], atoms_px)
            atom_xy = (offsets + (centres[rows] - np.round(centres[rows]) + render_px // 2)[:, None, :]).astype(f32)
            # forward transform pruned to the rows that hold the particle: x first on those rows, then y
            slab = np.zeros((len(rows), render_px, patch), dtype=f32)
            slab[:, :, start:start + render_px] = render_projection(atom_xy, sigma_px, mass, (render_px, render_px))
            spectra = np.zeros((len(rows), patch, patch // 2 + 1), dtype=np.complex64)
            spectra[:, start:start + render_px] = scipy.fft.rfft(slab, axis=-1, workers=-1)
            spectra = scipy.fft.fft(spectra, axis=-2, overwrite_x=True, workers=-1)
            phase = gamma[None] - (np.pi * wavelength * depth_offsets[rows, f]).astype(f32)[:, None, None] * k2[None]
            spectra *= -np.sin(phase) * common[None]
            patches = scipy.fft.irfft2(spectra, s=(patch, patch), overwrite_x=True, workers=-1)
            for row, values in zip(rows, patches):
                x0, y0 = origins[row]
                xa, ya = max(x0, 0), max(y0, 0)
                xb, yb = min(x0 + patch, width), min(y0 + patch, height)
                image[ya:yb, xa:xb] += values[ya - y0:yb - y0, xa - x0:xb - x0]
        out[f] = image


# ----------------------------------------------------------------------------------------------------
# Files. RELION's column names of the files written here (the io package reads them back).

T, P = tomogram_columns, particle_columns
_NOMINAL_TILT = "rlnTomoNominalStageTiltAngle"
_ORIGINAL_PIXEL_SIZE = "rlnMicrographOriginalPixelSize"
_SUBTOMOS_ARE_STACKS = "rlnTomoSubTomosAre2DStacks"


def _tomograms_document(params: SimulationParameters, truths: list[TomogramTruth], tilt_series_dir: str,
                        true_hand: bool = False) -> StarDocument:
    """tomograms.star: the hand written for the refinement (``written_hand``), or the true one."""
    size = tomogram_size_px(params)
    hand = params.hand if params.written_hand is None or true_hand else params.written_hand
    n = len(truths)
    table = pd.DataFrame({
        T.NAME: [t.name for t in truths], T.VOLTAGE: [params.voltage_kv] * n, T.CS: [params.spherical_aberration_mm] * n,
        T.Q0: [params.amplitude_contrast] * n, _ORIGINAL_PIXEL_SIZE: [params.pixel_size_angstrom] * n,
        T.HAND: [float(hand)] * n, T.PIXEL_SIZE: [params.pixel_size_angstrom] * n,
        T.TILT_SERIES_STAR: [f"{tilt_series_dir}/{t.name}.star" for t in truths],
        T.STACK: [f"tilt_series/{t.name}.mrc" for t in truths], T.FRAME_COUNT: [t.n_tilts for t in truths],
        T.SIZE[0]: [size[0]] * n, T.SIZE[1]: [size[1]] * n, T.SIZE[2]: [size[2]] * n,
        T.FRACTIONAL_DOSE: [params.dose_per_tilt_e_per_angstrom2] * n, P.OPTICS_GROUP_NAME: ["optics1"] * n,
    })
    if params.defocus_slope != 1.0:
        table[T.DEFOCUS_SLOPE] = float(params.defocus_slope)
    if params.bfactor_per_electron_dose_angstrom2 > 0:
        table[T.DOSE_BFACTOR] = float(params.bfactor_per_electron_dose_angstrom2)
    return StarDocument({T.GLOBAL_BLOCK: table}, version="50001")


def _tilt_series_document(truth: TomogramTruth, true_values: bool, start_scale: float) -> StarDocument:
    if true_values:
        u, v, a, scale = truth.defocus_u_angstrom, truth.defocus_v_angstrom, truth.defocus_angle_deg, truth.scale
    else:
        u, v, a = truth.start_defocus_u_angstrom, truth.start_defocus_v_angstrom, truth.start_defocus_angle_deg
        scale = np.full(truth.n_tilts, float(start_scale))
    table = pd.DataFrame({
        _NOMINAL_TILT: truth.nominal_deg, T.PRE_EXPOSURE: truth.pre_exposure_e_per_angstrom2,
        T.DEFOCUS_U: u, T.DEFOCUS_V: v, T.DEFOCUS_ANGLE: a, T.SCALE: scale,
        T.ANGLES[0]: truth.x_tilt_deg, T.ANGLES[1]: truth.y_tilt_deg, T.ANGLES[2]: truth.z_rot_deg,
        T.SHIFTS[0]: truth.x_shift_angstrom, T.SHIFTS[1]: truth.y_shift_angstrom,
    })
    return StarDocument({truth.name: table}, version="50001")


def _particles_document(params: SimulationParameters, truths: list[TomogramTruth], with_zernike: bool) -> StarDocument:
    optics = {
        P.OPTICS_GROUP: [1], P.OPTICS_GROUP_NAME: ["optics1"], P.CS: [params.spherical_aberration_mm],
        P.VOLTAGE: [params.voltage_kv], P.PIXEL_SIZE: [params.pixel_size_angstrom], P.Q0: [params.amplitude_contrast],
    }
    if with_zernike:
        optics[P.EVEN_ZERNIKE] = [format_vector(params.even_zernike)]
        optics[P.ODD_ZERNIKE] = [format_vector(params.odd_zernike)]
    tables = []
    for truth in truths:
        n = len(truth.positions_px)
        coordinates, angles = truth.centred_coordinates_angstrom, truth.angles_deg
        columns = {P.TOMO_NAME: [truth.name] * n, P.PARTICLE_NAME: [f"{truth.name}/{i + 1}" for i in range(n)],
                   P.OPTICS_GROUP: np.ones(n, dtype=int)}
        columns.update({P.CENTRED[i]: coordinates[:, i] for i in range(3)})
        columns.update({P.ANGLES[i]: angles[:, i] for i in range(3)})
        columns.update({P.ORIGIN[i]: np.zeros(n) for i in range(3)})
        columns[P.HALF_SET] = truth.random_subset.astype(int)
        tables.append(pd.DataFrame(columns))
    return StarDocument({
        P.GENERAL: {_SUBTOMOS_ARE_STACKS: 1},
        P.OPTICS: pd.DataFrame(optics),
        P.PARTICLES: pd.concat(tables, ignore_index=True),
    }, version="50001")


def _new_stack(path: Path, shape: tuple[int, int, int], pixel_size_angstrom: float) -> mrcfile.mrcfile.MrcFile:
    mrc = mrcfile.new_mmap(str(path), shape=shape, mrc_mode=2, overwrite=True)
    mrc.voxel_size = pixel_size_angstrom
    return mrc


def _truth_json(params: SimulationParameters, truths: list[TomogramTruth], noise_sigma: float, mask_radius_px: float,
                seconds: float, lowest_dose_variance: list[float], final_resolution: float) -> dict:
    tomograms, info = {}, {}
    for truth in truths:
        tilts = []
        for f in range(truth.n_tilts):
            tilts.append(dict(
                index=f, nominal=float(truth.nominal_deg[f]), xtilt=float(truth.x_tilt_deg[f]), ytilt=float(truth.y_tilt_deg[f]),
                zrot=float(truth.z_rot_deg[f]), xsh=float(truth.x_shift_angstrom[f]), ysh=float(truth.y_shift_angstrom[f]),
                pre_exposure=float(truth.pre_exposure_e_per_angstrom2[f]),
                dfu=float(truth.defocus_u_angstrom[f]), dfv=float(truth.defocus_v_angstrom[f]), dfang=float(truth.defocus_angle_deg[f]),
                scale=float(truth.scale[f]),
                start_dfu=float(truth.start_defocus_u_angstrom[f]), start_dfv=float(truth.start_defocus_v_angstrom[f]),
                start_dfang=float(truth.start_defocus_angle_deg[f]), start_scale=float(params.start_scale),
            ))
        tomograms[truth.name] = tilts
        info[truth.name] = dict(
            n_particles=int(len(truth.positions_px)), size_px=list(tomogram_size_px(params)),
            ice_thickness_relative=truth.ice_thickness_relative, ice_normal=[float(v) for v in truth.ice_normal],
            relative_luminance=params.luminance,
            lowest_dose_noiseless_variance=lowest_dose_variance[truths.index(truth)],
        )
    return {
        "params": params.to_dict(),
        "wavelength_A": electron_wavelength_angstrom(params.voltage_kv),
        "noise_sigma": noise_sigma,
        "mask_radius_px": mask_radius_px,
        "hand": int(params.hand),
        "written_hand": int(params.hand if params.written_hand is None else params.written_hand),
        "defocus_slope": float(params.defocus_slope),
        "even": list(params.even_zernike),
        "odd": list(params.odd_zernike),
        "n_particles": [int(len(t.positions_px)) for t in truths],
        "half_map_fsc_resolution_angstrom": final_resolution,
        "scale_model": "raw tilt image = -scale * CTF * dose * projection + noise; projection = sum of ref/map_true.mrc "
                       "voxels along the ray; scale = relative_luminance * exp(-ice_thickness_relative / |n . v_f|) * jitter",
        "tomograms": tomograms,
        "tomogram_info": info,
        "sim_seconds": seconds,
    }


def simulate_dataset(out_dir: PathLike, params: SimulationParameters | None = None, *, verbose: bool = False) -> Path:
    """Simulate a RELION-5 dataset with known truth.

    Writes, under ``out_dir``: ``optimisation_set.star``, ``tomograms.star``, ``tilt_series/<TS>.star``
    and ``.mrc``, ``particles.star``, ``ref/half1.mrc``, ``ref/half2.mrc``, ``ref/mask.mrc``,
    ``ref/map_true.mrc``, ``ref/postprocess.star``, and the truth: ``truth/truth.json``,
    ``truth/optimisation_set_true.star``, ``truth/tomograms_true.star``, ``truth/tilt_series/<TS>.star``,
    ``truth/particles_true.star`` (same data, true CTF, scale and aberrations). All paths inside the files
    are relative to ``out_dir`` (run RELION from there).

    Parameters
    ----------
    out_dir : path-like
    params : SimulationParameters, optional
        Defaults to ``SimulationParameters()``.
    verbose : bool
        Print progress per tomogram.

    Returns
    -------
    Path
        ``out_dir / "optimisation_set.star"``.

    Raises
    ------
    InputError
        If the parameters cannot be simulated (each problem names the parameter and the fix).
    """
    started = time.perf_counter()
    params = SimulationParameters() if params is None else params
    problems = check_parameters(params)
    if problems:
        raise InputError(problems)
    out = Path(out_dir)
    for sub in ("ref", "tilt_series", "truth/tilt_series"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    p = params.pixel_size_angstrom

    atoms = make_pseudo_atoms(params)
    truths = make_tomogram_truths(params)

    # tilt images: noiseless into temporary stacks, then noise at one sigma for all tomograms
    shape = (params.n_tilts, params.image_size_px, params.image_size_px)
    noiseless_paths, variances = [], []
    for truth in truths:
        path = out / "tilt_series" / f".{truth.name}.noiseless.tmp.mrc"
        mrc = _new_stack(path, shape, p)
        try:
            render_tilt_series(params, atoms, truth, mrc.data)
            lowest = int(np.argmin(truth.pre_exposure_e_per_angstrom2))
            variances.append(float(np.var(mrc.data[lowest], dtype=np.float64)))
            mrc.update_header_stats()
        finally:
            mrc.close()
        noiseless_paths.append(path)
        if verbose:
            print(f"  rendered {truth.name}: {truth.n_tilts} tilts, {len(truth.positions_px)} particles "
                  f"({time.perf_counter() - started:.1f} s)", flush=True)
    noise_sigma = float(np.sqrt(np.mean(variances) / params.snr))
    for t, (truth, path) in enumerate(zip(truths, noiseless_paths)):
        final = out / "tilt_series" / f"{truth.name}.mrc"
        temporary = out / "tilt_series" / f".{truth.name}.mrc.tmp"
        with mrcfile.mmap(str(path), mode="r") as clean:
            noisy = _new_stack(temporary, shape, p)
            try:
                for f, noise in enumerate(noise_realisation(params, t, noise_sigma)):
                    noisy.data[f] = clean.data[f] + noise
                noisy.update_header_stats()
            finally:
                noisy.close()
        os.replace(temporary, final)
        if params.write_noiseless:
            os.replace(path, out / "truth" / "tilt_series" / f"{truth.name}_noiseless.mrc")
        else:
            path.unlink()

    # reference: true map, half maps with independent noise, soft mask, FSC
    map_true = render_map(atoms, params.box_size_px, p)
    rng = _rng(params, "half_maps")
    noise = params.half_map_noise_fraction * float(np.std(map_true))
    half1 = map_true + noise * rng.standard_normal(map_true.shape)
    half2 = map_true + noise * rng.standard_normal(map_true.shape)
    mask_radius_px = min((params.particle_radius_angstrom + 3 * params.atom_sigma_max_angstrom) / p + 2, params.box_size_px / 2 - 6)
    mask = soft_sphere_mask(params.box_size_px, mask_radius_px)
    fsc = mask_corrected_fsc(half1, half2, mask, p, seed=params.seed)
    write_map(out / "ref" / "map_true.mrc", map_true, p)
    write_map(out / "ref" / "half1.mrc", half1, p)
    write_map(out / "ref" / "half2.mrc", half2, p)
    write_map(out / "ref" / "mask.mrc", mask, p)
    write_fsc_star(fsc, out / "ref" / "postprocess.star", "ref/half1.mrc", "ref/half2.mrc", "ref/mask.mrc")

    # STAR files: starting values, then the truth
    for truth in truths:
        write_star(_tilt_series_document(truth, False, params.start_scale), out / "tilt_series" / f"{truth.name}.star")
        write_star(_tilt_series_document(truth, True, params.start_scale), out / "truth" / "tilt_series" / f"{truth.name}.star")
    write_star(_tomograms_document(params, truths, "tilt_series"), out / "tomograms.star")
    write_star(_tomograms_document(params, truths, "truth/tilt_series", true_hand=True), out / "truth" / "tomograms_true.star")
    write_star(_particles_document(params, truths, with_zernike=False), out / "particles.star")
    write_star(_particles_document(params, truths, with_zernike=True), out / "truth" / "particles_true.star")
    references = dict(ref1_path="ref/half1.mrc", ref2_path="ref/half2.mrc", mask_path="ref/mask.mrc",
                      fsc_path="ref/postprocess.star" if params.include_fsc else None)
    write_optimisation_set(OptimisationSet(particles_path="truth/particles_true.star", tomograms_path="truth/tomograms_true.star",
                                           version="50001", **references), out / "truth" / "optimisation_set_true.star")
    opt_path = write_optimisation_set(OptimisationSet(particles_path="particles.star", tomograms_path="tomograms.star",
                                                      version="50001", **references), out / "optimisation_set.star")

    seconds = time.perf_counter() - started
    truth_doc = _truth_json(params, truths, noise_sigma, float(mask_radius_px), seconds, variances, fsc.resolution(0.143))
    write_text_atomic(out / TRUTH_JSON, json.dumps(truth_doc, indent=1) + "\n")
    return opt_path


def load_truth(path: PathLike) -> dict:
    """Read ``truth.json`` (give the file or the dataset folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / TRUTH_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError([Problem(str(path), "truth file not found", "give a folder written by 'tomoctfrefine simulate'")]) from None


def parameters_from_truth(truth: dict) -> SimulationParameters:
    """The :class:`SimulationParameters` recorded in a ``truth.json`` written by this module."""
    known = {f.name for f in fields(SimulationParameters)}
    return SimulationParameters(**{k: v for k, v in truth["params"].items() if k in known})
