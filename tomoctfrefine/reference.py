"""Reference preparation and frequency weights (RELION's ``reference_map.cpp``, ``refinement.cpp``).

All Fourier arrays use numpy's layouts: 2D weights on the ``rfft2`` grid, shape ``(s, s//2+1)``
indexed ``[y, x]`` (Nyquist row negative); 3D references on the ``rfftn`` grid of a ``[z, y, x]``
map, shape ``(n, n, n//2+1)`` indexed ``[kz, ky, kx]``. All transforms are unitary (``norm="ortho"``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

from .errors import InputError, Problem


#: Edge of the cubic bricks the references are stored in (see :class:`PreparedReferences`).
BRICK = 4


def to_bricks(half_map_ft: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``(n, n, nh)`` -> ``(n/B, n/B, ceil(nh/B), B, B, B)``: 4x4x4 bricks, so that the 8 neighbours of a
    trilinear sample share one or two cache lines whatever the slice orientation (1.4x faster
    slices at s = 256, 1.7x at 512, than the plain ``[z, y, x]`` layout). Copies slab by slab."""
    n, _, nh = half_map_ft.shape
    nb, nxb = -(-n // BRICK), -(-nh // BRICK)
    if out is None:
        out = np.empty((nb, nb, nxb, BRICK, BRICK, BRICK), dtype=half_map_ft.dtype)
    if half_map_ft.dtype == np.complex64 and out.dtype == np.complex64:
        from .kernels import fill_bricks

        fill_bricks(np.ascontiguousarray(half_map_ft), out)  # one parallel pass (5x faster at s = 384)
        return out
    for block in range(nb):
        slab = np.zeros((BRICK, nb * BRICK, nxb * BRICK), dtype=half_map_ft.dtype)
        z0, z1 = block * BRICK, min(n, block * BRICK + BRICK)
        slab[: z1 - z0, :n, :nh] = half_map_ft[z0:z1]
        out[block] = slab.reshape(BRICK, nb, BRICK, nxb, BRICK).transpose(1, 3, 0, 2, 4)
    return out


def from_bricks(bricks: np.ndarray, grid_size: int) -> np.ndarray:
    """Inverse of :func:`to_bricks`: the ``(n, n, n//2+1)`` array."""
    nb, _, nxb = bricks.shape[:3]
    plain = bricks.transpose(0, 3, 1, 4, 2, 5).reshape(nb * BRICK, nb * BRICK, nxb * BRICK)
    return np.ascontiguousarray(plain[:grid_size, :grid_size, : grid_size // 2 + 1])


@dataclass(frozen=True)
class PreparedReferences:
    """The two half references, ready for central-slice extraction.

    Attributes
    ----------
    bricks : ndarray, complex64, shape (2, n/4, n/4, ceil((n//2+1)/4), 4, 4, 4)
        Unitary 3D FT (``rfftn`` grid ``[kz, ky, kx]``, see :func:`to_bricks`) of half map 1 and 2
        after mask, padding, taper and presharpening, with the origin moved to the box centre ``s//2``.
    grid_size : int
        ``n``: the FT grid, ``box_size_px`` unless the grid was cropped (:meth:`cropped`); then only
        frequencies up to ``max_radius_px`` are kept.
    box_size_px : int
        The box ``s`` the references were padded to (frequencies are in units of ``1/s``).
    pixel_size_angstrom : float
        Voxel size of the half maps (from their header; only used to convert ``--freq_cutoff``).
    max_radius_px : float
        Frequencies beyond this radius (in ``1/s`` units) are not represented: slices return 0 there.
    """

    bricks: np.ndarray
    grid_size: int
    box_size_px: int
    pixel_size_angstrom: float
    max_radius_px: float

    @classmethod
    def from_fourier(cls, half_maps_ft: np.ndarray, box_size_px: int, pixel_size_angstrom: float,
                     max_radius_px: float = np.inf) -> "PreparedReferences":
        """From the plain ``(2, n, n, n//2+1)`` transforms."""
        bricks = np.stack([to_bricks(np.asarray(half, dtype=np.complex64)) for half in half_maps_ft])
        return cls(bricks, half_maps_ft.shape[1], int(box_size_px), float(pixel_size_angstrom), float(max_radius_px))

    @property
    def half_maps_ft(self) -> np.ndarray:
        """The plain ``(2, n, n, n//2+1)`` complex64 transforms (a new array each time)."""
        return np.stack([from_bricks(half, self.grid_size) for half in self.bricks])

    @property
    def nbytes(self) -> int:
        return int(self.bricks.nbytes)

    def cropped(self, max_radius_px: float) -> "PreparedReferences":
        """A copy that keeps only the frequencies a slice can reach within ``max_radius_px``.

        Trilinear interpolation at radius ``r`` reads neighbours up to ``r + sqrt(3)``, so the
        cropped grid is ``n = 2 * ceil(max_radius_px + 2)`` (never larger than the full grid). This
        cuts memory by ``(n/s)^3`` when the frequency weights vanish well below Nyquist.
        """
        s = self.grid_size
        half = int(np.ceil(max_radius_px + 2))
        if 2 * half >= s:
            return self
        rows = np.r_[0:half, s - half:s]
        nb, nxb = -(-2 * half // BRICK), -(-(half + 1) // BRICK)
        bricks = np.empty((2, nb, nb, nxb, BRICK, BRICK, BRICK), dtype=self.bricks.dtype)
        for h in range(2):
            plain = np.empty((2 * half, 2 * half, half + 1), dtype=self.bricks.dtype)
            for i, z in enumerate(rows):  # slab by slab: no full-size plain copy
                plain[i] = _z_block(self.bricks[h], z // BRICK, s)[z % BRICK][rows, : half + 1]
            to_bricks(plain, out=bricks[h])
        return PreparedReferences(bricks, 2 * half, self.box_size_px, self.pixel_size_angstrom, float(max_radius_px))


def pad_volume(volume: np.ndarray, box_size_px: int, dtype=np.float64) -> np.ndarray:
    """Zero-pad a cubic map symmetrically by ``(s - n)//2`` on each side to ``s``³ (RELION's padCenter3D)."""
    n = volume.shape[0]
    if n > box_size_px:
        raise ValueError(f"reference is {n} px, larger than the box {box_size_px} px")
    out = np.zeros((box_size_px,) * 3, dtype=dtype)
    start = (box_size_px - n) // 2
    out[start:start + n, start:start + n, start:start + n] = volume
    return out


def _slice_radius(box_size_px: int, z: int) -> np.ndarray:
    """Distance of every voxel of slice ``z`` from the box centre ``(s/2, s/2, s/2)``, shape (s, s)."""
    axis = np.arange(box_size_px) - box_size_px // 2
    return np.sqrt((z - box_size_px // 2) ** 2 + axis[:, None] ** 2 + axis[None, :] ** 2)


def _taper_weight(radius: np.ndarray, half: float, edge_width_px: float) -> np.ndarray:
    c = np.where(radius < half - edge_width_px, 1.0, 0.5 - 0.5 * np.cos(np.pi * (half - radius) / edge_width_px))
    return np.where(radius < half, c, 0.0)


def taper_volume(volume: np.ndarray, edge_width_px: float = 10.0, *, in_place: bool = False) -> np.ndarray:
    """RELION's ``Reconstruction::taper``: spherical cosine edge of ``edge_width_px`` ending at ``s/2``.

    ``c(r) = 1`` below ``s/2 - w``, ``1/2 - 1/2 cos(pi (s/2 - r)/w)`` up to ``s/2``, 0 beyond; the
    ``c``-weighted mean inside ``s/2`` is subtracted before multiplying by ``c``. Works slice by slice
    (no full-size temporaries).
    """
    out = volume if in_place else volume.copy()
    s = out.shape[0]
    weighted, total = 0.0, 0.0
    for z in range(s):
        c = _taper_weight(_slice_radius(s, z), s / 2.0, edge_width_px)
        weighted += float(np.sum(c * out[z]))
        total += float(np.sum(c))
    mean = weighted / total
    for z in range(s):
        c = _taper_weight(_slice_radius(s, z), s / 2.0, edge_width_px)
        out[z] = c * (out[z] - mean)
    return out


#: RELION's regulariser in the presharpening divisor ``sinc² + 0.02``; it leaves every slice
#: ``1/(1 + 0.02)`` too weak near the particle centre, which :mod:`tomoctfrefine.forward` undoes.
PRESHARPEN_EPSILON = 0.02


def presharpen(volume: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Divide by ``sinc²(r/s) + 0.02`` (pre-compensates trilinear interpolation in Fourier space).

    As RELION does, the centre voxel (``r = 0``) is set to 0.
    """
    out = volume if in_place else volume.copy()
    s = out.shape[0]
    for z in range(s):
        out[z] = out[z] / (np.sinc(_slice_radius(s, z) / s) ** 2 + PRESHARPEN_EPSILON)
    out[s // 2, s // 2, s // 2] = 0.0
    return out


def centred_fourier_transform(volume: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Unitary 3D rfft with the origin moved from voxel 0 to voxel ``s//2`` (factor ``(-1)^(x+y+z)``).

    Computed as 2D transforms of z slices followed by 1D transforms along z in blocks of rows, so
    that the only full-size array is ``out`` (complex64 unless given).
    """
    s = volume.shape[0]
    sh = s // 2 + 1
    if out is None:
        out = np.empty((s, s, sh), dtype=np.complex64)
    iy, ix = np.ogrid[0:s, 0:sh]
    sign_yx = (1 - 2 * ((iy + ix) % 2)).astype(np.float32)
    sign_z = (1 - 2 * (np.arange(s) % 2)).astype(np.float32)[:, None, None]
    for z in range(s):
        out[z] = scipy.fft.rfft2(volume[z], norm="ortho") * sign_yx
    block = max(1, (32 * 2**20) // (s * sh * 16))
    for y in range(0, s, block):
        out[:, y:y + block] = scipy.fft.fft(out[:, y:y + block], axis=0, norm="ortho") * sign_z
    return out


def prepare_references(
    half1: np.ndarray,
    half2: np.ndarray,
    mask: np.ndarray | None,
    box_size_px: int,
    pixel_size_angstrom: float = 1.0,
    *,
    map_paths: tuple[str, str] = ("half map 1", "half map 2"),
) -> PreparedReferences:
    """Mask, pad to ``s``, taper (10 px), presharpen and Fourier transform both half maps.

    As RELION (spec 5.4) with two differences that make the prediction the projection of the particle
    itself: the map's solvent level (the mean of the reference box's outer 3 px shell, 0 for a masked
    map) is subtracted instead of the mean of the whole padded box, and the centre voxel is kept.
    RELION's mean subtraction leaves a negative pedestal filling the box, and its zeroed centre voxel
    removes density from every frequency; both are absent from the tilt images, so the per-tilt scale
    fitted at the true CTF drifted with the dose, the high-dose tilts having only the low frequencies
    the pedestal spoils (-19 % per 100 e/Å² at box 128 of a 128 px reference; -3 % with this model).

    Parameters
    ----------
    half1, half2 : ndarray, shape (n, n, n), [z, y, x]
        Half maps at the tilt-series pixel size (no resampling is done, as in RELION).
    mask : ndarray or None
        Multiplied into both half maps.
    box_size_px : int
        Estimation box ``s`` (even); the maps are zero-padded to it.
    pixel_size_angstrom : float
        Voxel size from the map header (kept for ``--freq_cutoff``).
    map_paths : tuple of str
        Names used in error messages.

    Returns
    -------
    PreparedReferences
    """
    problems = []
    if half1.shape != half2.shape or half1.ndim != 3 or len(set(half1.shape)) != 1:
        problems.append(Problem(map_paths[1], f"half maps must be cubic and of equal size, got {half1.shape} and {half2.shape}",
                                "use the two half maps of the same refinement"))
    elif half1.shape[0] > box_size_px:
        problems.append(Problem(map_paths[0], f"reference is {half1.shape[0]} px, larger than the box {box_size_px} px",
                                "choose a box size at least as large as the reference", "--b"))
    if mask is not None and mask.shape != half1.shape:
        problems.append(Problem("mask", f"mask has shape {mask.shape}, the half maps {half1.shape}",
                                "use a mask of the same size as the half maps"))
    if box_size_px % 2:
        problems.append(Problem("--b", f"box size {box_size_px} is odd", "use an even box size", "--b"))
    if problems:
        raise InputError(problems)
    s = box_size_px
    nb, nxb = -(-s // BRICK), -(-(s // 2 + 1) // BRICK)
    bricks = np.empty((2, nb, nb, nxb, BRICK, BRICK, BRICK), dtype=np.complex64)
    for i, half in enumerate((half1, half2)):
        small = np.asarray(half, dtype=np.float64) * (1.0 if mask is None else mask)
        # the padded, tapered, presharpened map is made one z slice at a time, straight into its 2D
        # transforms: the only full-size arrays are the output and one complex64 transform (s = 512:
        # 1.1 + 0.5 GB)
        transform = centred_fourier_transform(_PreparedSlices(small, s))
        to_bricks(transform, out=bricks[i])
        del transform
    return PreparedReferences(bricks, s, s, float(pixel_size_angstrom), float(np.inf))


class _PreparedSlices:
    """The z slices of ``taper * presharpen(pad_volume(small - solvent, s))`` on demand (float32),
    indexable like a volume by :func:`centred_fourier_transform` (:func:`prepare_references` says how
    this differs from RELION's ``presharpen(taper_volume(...))``). The taper and presharpening factors
    depend on the integer squared radius only, so they are looked up in tables."""

    def __init__(self, small: np.ndarray, box_size_px: int, edge_width_px: float = 10.0):
        s = box_size_px
        self.small, self.s = small, s
        self.start = (s - small.shape[0]) // 2
        self.shape = (s,) * 3
        radius = np.sqrt(np.arange(3 * (s // 2) ** 2 + 1, dtype=float))
        self.taper = _taper_weight(radius, s / 2.0, edge_width_px)
        self.sharpen = 1.0 / (np.sinc(radius / s) ** 2 + PRESHARPEN_EPSILON)
        axis2 = (np.arange(s) - s // 2) ** 2
        self.radius2_yx = axis2[:, None] + axis2[None, :]
        self.solvent = solvent_level(small)

    def _padded(self, z: int) -> np.ndarray:
        out = np.zeros((self.s, self.s))
        n = self.small.shape[0]
        if self.start <= z < self.start + n:
            out[self.start:self.start + n, self.start:self.start + n] = self.small[z - self.start] - self.solvent
        return out

    def __getitem__(self, z: int) -> np.ndarray:
        radius2 = self.radius2_yx + (z - self.s // 2) ** 2
        return (self.taper[radius2] * self._padded(z) * self.sharpen[radius2]).astype(np.float32)


def solvent_level(volume: np.ndarray, shell_px: int = 3) -> float:
    """Mean of a cubic map over its outer ``shell_px`` voxels (the box faces): the solvent's level,
    which the tilt images do not show (the particle's contrast is relative to the ice around it)."""
    n = volume.shape[0]
    inner = volume[shell_px:n - shell_px, shell_px:n - shell_px, shell_px:n - shell_px]
    count = volume.size - inner.size
    return float((np.sum(volume, dtype=np.float64) - np.sum(inner, dtype=np.float64)) / count) if count else 0.0


# --------------------------------------------------------------------------------------------
# Frequency weights


def radius_px(box_size_px: int) -> np.ndarray:
    """Radius ``sqrt(x² + ky²)`` (in ``1/s`` units) of every pixel of the ``rfft2`` grid, ``(s, s//2+1)``."""
    ky = np.fft.fftfreq(box_size_px, 1.0 / box_size_px)[:, None]
    kx = np.arange(box_size_px // 2 + 1)[None, :]
    return np.sqrt(kx**2 + ky**2)


def radial_average(power: np.ndarray) -> np.ndarray:
    """RELION's linear-binning radial average of a half-plane image ``(s, s//2+1)`` into ``s//2+1`` bins.

    Each pixel adds weight ``1-t`` to bin ``floor(r)`` and ``t`` to ``floor(r)+1`` (``t = r - floor(r)``).
    """
    s = power.shape[-2]
    sh = s // 2 + 1
    r = radius_px(s)
    r0 = np.floor(r).astype(int)
    t = r - r0
    values = np.zeros(sh)
    weights = np.zeros(sh)
    for index, weight in ((r0, 1.0 - t), (r0 + 1, t)):
        inside = index < sh
        np.add.at(values, index[inside], (weight * power)[inside])
        np.add.at(weights, index[inside], weight[inside])
    return np.divide(values, weights, out=np.zeros(sh), where=weights > 0)


def radial_expand(profile: np.ndarray, box_size_px: int) -> np.ndarray:
    """Linear interpolation of a radial profile (bins of 1/s) onto the ``rfft2`` grid; the last bin's
    value beyond the table."""
    r = radius_px(box_size_px)
    r0 = np.floor(r).astype(int)
    t = r - r0
    n = len(profile)
    inside = r0 + 1 < n
    low = profile[np.minimum(r0, n - 1)]
    high = profile[np.minimum(r0 + 1, n - 1)]
    return np.where(inside, (1 - t) * low + t * high, profile[-1])


def periodogram_average(image: np.ndarray, box_size_px: int) -> np.ndarray:
    """Mean ``|F|²`` (unitary rfft2, no window, no mean removal) over ``s x s`` tiles at step ``s//2``."""
    s = box_size_px
    step = s // 2
    height, width = image.shape
    if height < s or width < s:
        raise ValueError(f"tilt image {width}x{height} is smaller than the box {s}")
    xs = step * np.arange((width - s) // step + 1)
    ys = step * np.arange((height - s) // step + 1)
    from .kernels import add_tile_power

    total = np.zeros((s, s // 2 + 1))
    for y in ys:
        strip = np.asarray(image[y:y + s], dtype=np.float32)
        # the tiles of a strip as a strided view: no copies; their powers summed in one pass
        tiles = np.lib.stride_tricks.sliding_window_view(strip, s, axis=1)[:, ::step][:, :len(xs)].transpose(1, 0, 2)
        add_tile_power(scipy.fft.rfft2(tiles, norm="ortho", workers=-1), total)
    return total / (len(xs) * len(ys))


def noise_weights(tilt_images: np.ndarray, box_size_px: int, per_frame: bool = False) -> np.ndarray:
    """Inverse noise power per tilt and Fourier pixel (spec 5.1), shape ``(n_tilts, s, s//2+1)``.

    Each tilt's power spectrum is the periodogram average over tiles of the whole image, radially
    averaged and interpolated back to 2D. With ``per_frame=False`` (RELION's default) every tilt
    gets ``1 / mean_f P_f``, otherwise ``1 / P_f``.
    """
    from .io.maps import release_pages

    n_tilts = tilt_images.shape[0]
    inverse = np.empty((n_tilts, box_size_px, box_size_px // 2 + 1))
    for f in range(n_tilts):
        power = radial_average(periodogram_average(tilt_images[f], box_size_px))
        release_pages(tilt_images)  # a mapped stack would otherwise become resident whole
        # RELION has no guard against P = 0 (inf weights); a shell without power gets weight 0
        inverse[f] = radial_expand(np.divide(1.0, power, out=np.zeros_like(power), where=power > 0), box_size_px)
    if per_frame:
        return inverse
    positive = inverse > 0
    with np.errstate(divide="ignore"):
        summed = np.sum(np.where(positive, 1.0 / np.where(positive, inverse, 1.0), 0.0), axis=0)
    static = np.divide(n_tilts, summed, out=np.zeros_like(summed), where=summed > 0)
    return np.broadcast_to(static, inverse.shape).copy()


def snr_from_fsc(fsc: np.ndarray, box_size_px: int) -> tuple[np.ndarray, int]:
    """Shell SNR weight ``2F/(F+1)`` and last good shell from an FSC table (spec 5.2).

    ``fsc`` holds the values by spectral index (``rlnFourierShellCorrelationCorrected``); values
    below 0.143 are set to 0; the table is mapped to the box by index ratio ``2(n_fsc-1)/s``.
    """
    values = np.array(fsc, dtype=float)
    bad = values < 0.143
    first_bad = int(np.argmax(bad)) if bad.any() else len(values)
    values[bad] = 0.0
    sh = box_size_px // 2 + 1
    scale = 2.0 * (len(values) - 1) / box_size_px
    weight = np.zeros(sh)
    for r in range(sh):
        r_fsc = scale * r
        r0 = int(r_fsc)
        if r0 + 1 < len(values):
            t = r_fsc - r0
            value = (1 - t) * values[r0] + t * values[r0 + 1]
            weight[r] = 2.0 * value / (value + 1.0)
    return weight, int((first_bad - 1) / scale)


def _z_block(bricks: np.ndarray, block: int, grid_size: int) -> np.ndarray:
    """The plain ``(B, n, n//2+1)`` slab of z slices ``[B*block, B*block + B)`` of one bricked half map."""
    nb, _, nxb = bricks.shape[:3]
    slab = bricks[block].transpose(2, 0, 3, 1, 4).reshape(BRICK, nb * BRICK, nxb * BRICK)
    return slab[:, :grid_size, : grid_size // 2 + 1]


def snr_from_half_maps(references: PreparedReferences) -> tuple[np.ndarray, int]:
    """Shell SNR weight ``(tau² - sigma²)/tau²`` and last shell (first below 0.05, minus 1) estimated
    from the two prepared half maps (shells ``round(|k|)``), RELION's fallback without an FSC.
    Streams over slabs of z slices (no full-size temporaries)."""
    n = references.grid_size
    sh = references.box_size_px // 2 + 1
    k = np.fft.fftfreq(n, 1.0 / n)
    radius_yx = k[:, None] ** 2 + np.arange(n // 2 + 1)[None, :] ** 2
    counts = np.zeros(sh)
    tau2 = np.zeros(sh)
    sigma2 = np.zeros(sh)
    for block in range(references.bricks.shape[1]):
        f1 = _z_block(references.bricks[0], block, n).astype(np.complex128)
        f2 = _z_block(references.bricks[1], block, n).astype(np.complex128)
        for i in range(f1.shape[0]):
            z = BRICK * block + i
            if z >= n:
                break
            shell = np.floor(np.sqrt(radius_yx + k[z] ** 2) + 0.5).astype(int)
            inside = shell < sh
            counts += np.bincount(shell[inside], minlength=sh)
            tau2 += np.bincount(shell[inside], weights=((np.abs(f1[i]) ** 2 + np.abs(f2[i]) ** 2) / 2)[inside], minlength=sh)
            sigma2 += np.bincount(shell[inside], weights=(np.abs(f1[i] - f2[i]) ** 2 / 2)[inside], minlength=sh)
    tau2 = np.divide(tau2, counts, out=np.zeros(sh), where=counts > 0)
    sigma2 = np.divide(sigma2, counts, out=np.zeros(sh), where=counts > 0)
    weight = np.where((tau2 > 0) & (tau2 > sigma2), (tau2 - sigma2) / np.where(tau2 > 0, tau2, 1.0), 0.0)
    below = np.nonzero(weight < 0.05)[0]
    last_shell = int(below[0]) - 1 if len(below) else sh - 1
    if last_shell < 0:
        last_shell = sh - 1
    return weight, last_shell


def frequency_cutoff_weight(
    references: PreparedReferences,
    *,
    fsc: np.ndarray | None = None,
    freq_cutoff_angstrom: float | None = None,
    fsc_thresh_width_px: float = 5.0,
    use_snr_weight: bool = False,
) -> np.ndarray:
    """Reference SNR weight times the cut-off envelope on the ``rfft2`` grid (spec 5.2).

    Parameters
    ----------
    references : PreparedReferences
        Used for the box size, the map pixel size and (without ``fsc``) the half-map SNR estimate.
    fsc : array, FscCurve or None
        FSC values by spectral index (RELION ``--fsc``, e.g. ``io.read_fsc(path)``); without it the SNR and the last shell are
        estimated from the half maps.
    freq_cutoff_angstrom : float or None
        RELION ``--freq_cutoff``: lowers the last shell to ``int(s p / X)`` if that is smaller.
    fsc_thresh_width_px : float
        Width of the cosine fall-off after the last shell (RELION ``--fsc_thresh_width``).
    use_snr_weight : bool
        Weight shells by the SNR (RELION ``--use_SNR_weight``); otherwise flat up to the cut-off.

    Returns
    -------
    ndarray, shape (s, s//2+1)
        Zero beyond ``last_shell + width`` and at the last radial bin.
    """
    s = references.box_size_px
    sh = s // 2 + 1
    if fsc is not None:
        snr, last_shell = snr_from_fsc(getattr(fsc, "fsc", fsc), s)
    else:
        snr, last_shell = snr_from_half_maps(references)
    if freq_cutoff_angstrom is not None and freq_cutoff_angstrom > 0:
        cutoff = int(s * references.pixel_size_angstrom / freq_cutoff_angstrom)
        if 0 < cutoff < last_shell:
            last_shell = cutoff
    if not use_snr_weight:
        snr = np.ones(sh)
    r = radius_px(s)
    r0 = np.floor(r).astype(int)
    t = r - r0
    valid = (r0 + 1 < sh) & (r0 + 1 <= last_shell + fsc_thresh_width_px)
    g = np.where(valid, (1 - t) * snr[np.minimum(r0, sh - 1)] + t * snr[np.minimum(r0 + 1, sh - 1)], 0.0)
    flank = (r > last_shell) & (r < last_shell + fsc_thresh_width_px)
    envelope = np.where(flank, 0.5 * (1 + np.cos(np.pi * (r - last_shell) / fsc_thresh_width_px)), 1.0)
    return np.where(valid, g * envelope, 0.0)


def weight_support_radius_px(weights: np.ndarray) -> float:
    """Largest radius (in ``1/s`` units) of a pixel with non-zero weight; pass it to
    :meth:`PreparedReferences.cropped` to keep only the reference frequencies the statistics read."""
    s = weights.shape[-2]
    nonzero = np.any(np.reshape(weights, (-1, s, s // 2 + 1)) != 0, axis=0)
    return float(radius_px(s)[nonzero].max()) if nonzero.any() else 0.0


def kmin_radius_px(box_size_px: int, pixel_size_angstrom: float, kmin_angstrom: float) -> float:
    """RELION's ``k_min_px = s p / kmin`` (a float; the aberration fit truncates it to an int)."""
    return box_size_px * pixel_size_angstrom / kmin_angstrom
