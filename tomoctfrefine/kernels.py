"""numba kernels of the project (all of them live here): arrays in, arrays out, cached compilation.

Conventions: 2D Fourier arrays are numpy ``rfft2`` grids ``[y, x]`` of shape ``(s, s//2+1)`` with
signed ``ky = y`` for ``y < s/2`` else ``y - s``; 3D references are ``rfftn`` grids ``[kz, ky, kx]`` of
shape ``(n, n, n//2+1)`` (``n`` may be smaller than ``s`` for cropped references).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the CPU to bring ``array[index]`` into the cache (LLVM's prefetch: read, keep, data); no
    bounds check, no effect on the values."""

    def codegen(context, builder, signature, arguments):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, arguments[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [arguments[1]], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = builder.module.declare_intrinsic("llvm.prefetch", [byte_pointer],
                                                    ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]))
        builder.call(function, [builder.bitcast(pointer, byte_pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@njit(cache=True, inline="always")
def _row_extent(ky, max_radius2, sh):
    """Largest ``x < sh`` with ``x*x + ky*ky <= max_radius2`` (-1 if none), exact in the arithmetic of
    that test."""
    rest = max_radius2 - ky * ky
    if rest < 0.0:
        return -1
    last = sh - 1 if rest >= (sh - 1) * (sh - 1) else int(np.sqrt(rest))
    while last + 1 < sh and (last + 1) * (last + 1) + ky * ky <= max_radius2:
        last += 1
    while last >= 0 and last * last + ky * ky > max_radius2:
        last -= 1
    return last


@njit(cache=True)
def _slice_row_corners(ky, last, m00, m01, m02, m10, m11, m12, n, nh, nb, nxb, offsets, fractions):
    """The trilinear corners of slice row ``ky``, pixels ``x = 0 .. last``, for :func:`central_slices`:
    ``offsets[0:2, x]`` the bricked offsets of the x neighbours ``x0, x1``, ``offsets[2:6, x]`` those of
    the (z, y) rows ``(z0, y0), (z0, y1), (z1, y0), (z1, y1)``; ``fractions[:, x]`` = ``fx, fy, fz`` and
    the sign of the imaginary part (-1: the conjugate branch, ``ux <= 0``). No array reads: the loop
    vectorises."""
    z_stride = nb * nxb * 64
    y_stride = nxb * 64
    for x in range(last + 1):
        ux = m00 * x + m10 * ky
        uy = m01 * x + m11 * ky
        uz = m02 * x + m12 * ky
        sign = 1.0
        if ux <= 0.0:
            sign = -1.0
        ux = ux * sign
        uy = uy * sign
        uz = uz * sign
        x0 = int(ux)  # ux >= 0: int() is floor
        y0 = int(uy)
        if uy < y0:
            y0 -= 1
        z0 = int(uz)
        if uz < z0:
            z0 -= 1
        fx = ux - x0
        fy = uy - y0
        fz = uz - z0
        # |u| is within the grid's Nyquist radius, so one conditional add wraps (integer % is slow)
        if y0 < 0:
            y0 += n
        if z0 < 0:
            z0 += n
        y1 = y0 + 1
        if y1 >= n:
            y1 -= n
        z1 = z0 + 1
        if z1 >= n:
            z1 -= n
        x1 = x0 + 1
        if x1 >= nh:
            x1 = nh - 2
        if x0 >= nh:
            x0 = nh - 1
        # offset of brick voxel (z, y, x): brick index times 64 plus the place inside the 4x4x4 brick
        z0_offset = (z0 >> 2) * z_stride + (z0 & 3) * 16
        z1_offset = (z1 >> 2) * z_stride + (z1 & 3) * 16
        y0_offset = (y0 >> 2) * y_stride + (y0 & 3) * 4
        y1_offset = (y1 >> 2) * y_stride + (y1 & 3) * 4
        offsets[0, x] = (x0 >> 2) * 64 + (x0 & 3)
        offsets[1, x] = (x1 >> 2) * 64 + (x1 & 3)
        offsets[2, x] = z0_offset + y0_offset
        offsets[3, x] = z0_offset + y1_offset
        offsets[4, x] = z1_offset + y0_offset
        offsets[5, x] = z1_offset + y1_offset
        fractions[0, x] = fx
        fractions[1, x] = fy
        fractions[2, x] = fz
        fractions[3, x] = sign


#: Rows of the slice between the prefetch of a row's reference bricks and their use (one brick edge:
#: the rows in between read mostly the bricks already in cache)
_PREFETCH_ROWS = 4


@njit(cache=True, parallel=True)
def central_slices(references, grid_size, half_index, matrices, max_radius2, out):
    """Central slices ``F_h(M^T k)`` of many (particle, tilt) pairs (0 beyond ``sqrt(max_radius2)``).

    Each pixel is a trilinear sample of the half-complex 3D FT at ``u = M^T k`` (pixels), RELION's
    linearXYZ_FftwHalf_complex: conjugate branch for ``ux <= 0``, wrap in y and z, x upper neighbour
    clamped to ``nh - 2``. The caller keeps ``|u|`` within the grid (``|u| <= n/2 - 2`` for a cropped
    grid, any slice pixel for a full one). Parallel over pairs: each sweeps its plane through the
    reference.

    The bricked references are read as one flat complex64 array; the interpolation runs on the real and
    imaginary parts separately in double precision (mixed complex64/float64 arithmetic cost twice the
    multiplications). A slice is made row by row from ``ky = -s/2`` up, each row's x range inside the
    radius computed once. The time went to waiting for the reference's bricks (a plane through a 256³
    grid touches ~1 MB of them) and to the corner arithmetic, so each row's corners are computed
    ``_PREFETCH_ROWS`` rows ahead (:func:`_slice_row_corners`, a vectorised loop), their cache lines
    prefetched then (also the next brick's when ``x1`` lies in it), and the row is interpolated from the
    stored corners: 1.2 -> 0.51 ms CPU per slice at s = 256, the values unchanged bit for bit.

    Parameters
    ----------
    references : complex64 (2, n/4, n/4, ceil((n//2+1)/4), 4, 4, 4)   bricked half maps, C-contiguous
    grid_size : int                  n
    half_index : int64 (m,)          0 or 1: the half map of each pair
    matrices : float64 (m, 3, 3)     M = P_3x3 A (image frame <- reference frame)
    max_radius2 : float              squared radius (px, of the 2D pixel) beyond which the slice is 0
    out : complex64 (m, s, s//2+1)   written
    """
    m = out.shape[0]
    s = out.shape[1]
    sh = out.shape[2]
    n = grid_size
    nh = n // 2 + 1
    nb = references.shape[1]
    nxb = references.shape[3]
    per_half = nb * nb * nxb * 64
    voxels = references.reshape(references.shape[0] * per_half)
    half = s // 2
    extent = np.empty(s, dtype=np.int64)  # by ky + s/2
    for j in range(s):
        extent[j] = _row_extent(j - half, max_radius2, sh)
    ring = _PREFETCH_ROWS + 1
    for p in prange(m):
        base = half_index[p] * per_half
        m00 = matrices[p, 0, 0]
        m01 = matrices[p, 0, 1]
        m02 = matrices[p, 0, 2]
        m10 = matrices[p, 1, 0]
        m11 = matrices[p, 1, 1]
        m12 = matrices[p, 1, 2]
        # the corners of the rows j .. j + _PREFETCH_ROWS, by row modulo ring
        offsets = np.empty((ring, 6, sh), dtype=np.int64)
        fractions = np.empty((ring, 4, sh))
        for j in range(-_PREFETCH_ROWS, s):
            ahead = j + _PREFETCH_ROWS
            if ahead < s and extent[ahead] >= 0:
                corners = offsets[ahead % ring]
                _slice_row_corners(ahead - half, extent[ahead], m00, m01, m02, m10, m11, m12, n, nh, nb, nxb,
                                   corners, fractions[ahead % ring])
                for x in range(extent[ahead] + 1):
                    a = base + corners[0, x]
                    _prefetch(voxels, a + corners[2, x])
                    _prefetch(voxels, a + corners[3, x])
                    _prefetch(voxels, a + corners[4, x])
                    _prefetch(voxels, a + corners[5, x])
                    if corners[1, x] != corners[0, x] + 1:  # x1 in the next brick
                        a = base + corners[1, x]
                        _prefetch(voxels, a + corners[2, x])
                        _prefetch(voxels, a + corners[3, x])
                        _prefetch(voxels, a + corners[4, x])
                        _prefetch(voxels, a + corners[5, x])
            if j < 0:
                continue
            ky = j - half
            row = out[p, ky if ky >= 0 else ky + s]
            last = extent[j]
            for x in range(last + 1, sh):
                row[x] = 0j
            corners = offsets[j % ring]
            weights = fractions[j % ring]
            for x in range(last + 1):
                a0 = corners[0, x]
                a1 = corners[1, x]
                b00 = base + corners[2, x]
                b10 = base + corners[3, x]
                b01 = base + corners[4, x]
                b11 = base + corners[5, x]
                fx = weights[0, x]
                fy = weights[1, x]
                fz = weights[2, x]
                gx = 1.0 - fx
                gy = 1.0 - fy
                gz = 1.0 - fz
                v0 = voxels[b00 + a0]
                v1 = voxels[b00 + a1]
                r00 = gx * v0.real + fx * v1.real
                i00 = gx * v0.imag + fx * v1.imag
                v0 = voxels[b10 + a0]
                v1 = voxels[b10 + a1]
                r10 = gx * v0.real + fx * v1.real
                i10 = gx * v0.imag + fx * v1.imag
                v0 = voxels[b01 + a0]
                v1 = voxels[b01 + a1]
                r01 = gx * v0.real + fx * v1.real
                i01 = gx * v0.imag + fx * v1.imag
                v0 = voxels[b11 + a0]
                v1 = voxels[b11 + a1]
                r11 = gx * v0.real + fx * v1.real
                i11 = gx * v0.imag + fx * v1.imag
                re = gz * (gy * r00 + fy * r10) + fz * (gy * r01 + fy * r11)
                im = gz * (gy * i00 + fy * i10) + fz * (gy * i01 + fy * i11)
                row[x] = complex(re, weights[3, x] * im)


@njit(cache=True, parallel=True)
def fill_bricks(plain, out):
    """``out[zb, yb, xb, zi, yi, xi] = plain[4 zb + zi, 4 yb + yi, 4 xb + xi]``, 0 beyond ``plain``
    (the brick layout of ``reference.to_bricks``; one parallel pass instead of numpy's slab copies).

    plain : complex64 (n, n, nh) ; out : complex64 (nb, nb, nxb, 4, 4, 4), written
    """
    n, ny, nh = plain.shape
    nb, nyb, nxb = out.shape[0], out.shape[1], out.shape[2]
    for zb in prange(nb):
        for zi in range(4):
            z = 4 * zb + zi
            for yb in range(nyb):
                for yi in range(4):
                    y = 4 * yb + yi
                    for xb in range(nxb):
                        for xi in range(4):
                            x = 4 * xb + xi
                            if z < n and y < ny and x < nh:
                                out[zb, yb, xb, zi, yi, xi] = plain[z, y, x]
                            else:
                                out[zb, yb, xb, zi, yi, xi] = 0j


@njit(cache=True)
def add_tile_power(spectra, total):
    """``total += sum_t |spectra[t]|^2`` in double precision, the tiles summed in order first (the
    order of numpy's ``total += np.sum(re**2 + im**2, axis=0)``, so the result is the same bit for bit).
    Serial: a fraction of a millisecond between two FFTs, less than waking the threads costs.

    spectra : complex64 (t, s, sh) ; total : float64 (s, sh), added to
    """
    count, rows, columns = spectra.shape
    partial = np.empty(columns)
    for y in range(rows):
        for x in range(columns):
            value = spectra[0, y, x]
            re = np.float64(value.real)
            im = np.float64(value.imag)
            partial[x] = re * re + im * im
        for t in range(1, count):
            for x in range(columns):
                value = spectra[t, y, x]
                re = np.float64(value.real)
                im = np.float64(value.imag)
                partial[x] += re * re + im * im
        for x in range(columns):
            total[y, x] += partial[x]


@njit(cache=True, parallel=True)
def extract_boxes(image, origins, out):
    """Cut ``s x s`` boxes out of one tilt image, edge-clamped, RELION's cropCircle taper, centred.

    Box pixel ``(x, y)`` reads ``image[clamp(oy + y), clamp(ox + x)]``; then the mean of the corners
    (``r > s/2`` from ``(s/2, s/2)``) is subtracted and the box multiplied by a 5 px cosine edge ending
    at ``r = s/2``; finally the box is written rolled by ``s/2`` (centre at pixel 0) so that a plain
    FFT puts the box centre at the origin. Each box row is read once per pass into a contiguous row
    (a plain slice where the box lies inside the image), and the corner sum runs over the two column
    ranges outside the circle, in the same order as a masked sweep: the same values, 20 % less time.

    Parameters
    ----------
    image : float32 (H, W)
    origins : int64 (m, 2)       (ox, oy) = round(c) - s/2
    out : float32 (m, s, s)      written
    """
    m = out.shape[0]
    s = out.shape[1]
    height = image.shape[0]
    width = image.shape[1]
    radius = s / 2.0
    edge = 5.0
    # the taper and the circle depend on the box pixel only: tabulated once; row y is inside the
    # circle for x in [inner_start[y], inner_stop[y])
    taper = np.empty((s, s))
    inner_start = np.empty(s, dtype=np.int64)
    inner_stop = np.empty(s, dtype=np.int64)
    for y in range(s):
        dy = y - radius
        inner_start[y] = s
        inner_stop[y] = s
        first = True
        for x in range(s):
            dx = x - radius
            if not (dx * dx + dy * dy > radius * radius):
                if first:
                    inner_start[y] = x
                    first = False
                inner_stop[y] = x + 1
            r = np.sqrt(dx * dx + dy * dy)
            if r < radius - edge:
                taper[y, x] = 1.0
            elif r < radius:
                taper[y, x] = 0.5 - 0.5 * np.cos(np.pi * (radius - r) / edge)
            else:
                taper[y, x] = 0.0
    half = s // 2
    for p in prange(m):
        ox = origins[p, 0]
        oy = origins[p, 1]
        clamped = ox < 0 or ox + s > width
        # image columns of the box (edge-clamped), looked up once per box
        columns = np.empty(s, dtype=np.int64)
        for x in range(s):
            columns[x] = min(max(ox + x, 0), width - 1)
        row = np.empty(s, dtype=np.float32)
        total = 0.0
        count = 0
        for y in range(s):
            line = image[min(max(oy + y, 0), height - 1)]
            if clamped:
                for x in range(s):
                    row[x] = line[columns[x]]
            else:
                row[:] = line[ox:ox + s]
            for x in range(inner_start[y]):
                total += row[x]
            for x in range(inner_stop[y], s):
                total += row[x]
            count += s - (inner_stop[y] - inner_start[y])
        outside_mean = total / count if count > 0 else 0.0
        for y in range(s):
            line = image[min(max(oy + y, 0), height - 1)]
            if clamped:
                for x in range(s):
                    row[x] = line[columns[x]]
            else:
                row[:] = line[ox:ox + s]
            weights = taper[y]
            target = out[p, (y + half) % s]
            for x in range(half):
                target[x + half] = weights[x] * (row[x] - outside_mean)
            for x in range(half, s):
                target[x - half] = weights[x] * (row[x] - outside_mean)


@njit(cache=True, parallel=True)
def shift_observations(observations, shifts, out):
    """Multiply each box FT by ``exp(+2 pi i (kx t_x + ky t_y) / s)``: the sub-pixel part ``t`` of the
    particle position moves to the origin.

    observations : complex64 (m, s, s//2+1) ; shifts : float64 (m, 2) ; out : complex64, written
    """
    m = observations.shape[0]
    s = observations.shape[1]
    sh = observations.shape[2]
    for p in prange(m):
        tx = shifts[p, 0]
        ty = shifts[p, 1]
        for y in range(s):
            ky = y if y < s // 2 else y - s
            for x in range(sh):
                phase = 2.0 * np.pi * (x * tx + ky * ty) / s
                out[p, y, x] = observations[p, y, x] * complex(np.cos(phase), np.sin(phase))


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def accumulate_tilt_statistics(
    observations,
    shifts,
    slices,
    depth_phase,
    gamma_phasor,
    freq_unit2,
    dose,
    weight,
    prediction_factor,
    with_flipped,
    a_ss, a_sc, a_cc, b_s, b_c, oo,
    f_ss, f_sc, f_cc, fb_s, fb_c,
):
    """Add the sufficient statistics of a batch of particles in one tilt (see ``statistics.py``).

    For every pixel with ``weight > 0`` and particle ``i``:
    ``q = prediction_factor * dose * slice_i`` (``slice_i = F_h(M_i^T k)`` from :func:`central_slices`;
    ``prediction_factor = -1.02 sqrt(s)``: unitary 2D FT of the projection, with the contrast inversion
    of raw images), ``o`` = observation shifted by the
    sub-pixel offset, ``gamma_i = gamma - depth_phase_i |k|^2`` (the particle's depth defocus);
    the flipped-hand statistics use ``gamma + depth_phase_i |k|^2``.

    The slices are computed beforehand (parallel over particles: each sweeps its plane through the
    reference, which keeps the reference's cache lines hot; sampling inside this row-parallel loop
    was 2.5x slower from cache misses). Both per-particle phases are separable in x and ky (``|k|^2 = (x^2 + ky^2) freq_unit2``), so the hot
    loop has no trigonometry: per-particle column tables times one row factor.
    Parallel over image rows: each pixel's accumulators belong to one thread, so there are no
    per-thread copies and the sums do not depend on the thread count. Per pixel the particles are the
    inner loop, with the sums in registers, in real arithmetic (no complex promotions of real factors),
    and ``reassoc`` lets LLVM vectorise that loop: the particles are summed in SIMD lanes, which changes
    the sums by ~1e-15 relative (they are stored in single precision) and makes the kernel 2x faster
    (11 -> 5.3 ns per pixel and particle at s = 256). The lanes depend on the batch, not on the threads.

    observations : complex64 (m, s, sh) box FTs (centred, not shifted) ; shifts : float64 (m, 2)
    slices : complex64 (m, s, sh) central slices of the particles' half maps
    depth_phase : float64 (m,) ``pi lambda dz_i`` (rad Å²) ; gamma_phasor : complex128 (s, sh)
    ``exp(i gamma)`` of the tilt ; freq_unit2 : ``1/(s p)^2`` (Å⁻²) ; dose, weight : float64 (s, sh)
    a_* , oo : float64 (s, sh) ; b_* : complex128 (s, sh) (accumulated into) ; f_* / fb_* flipped.
    """
    m = observations.shape[0]
    s = observations.shape[1]
    sh = observations.shape[2]
    # per-particle phase tables [x, p] (the particle loop is the inner one)
    shift_columns = np.empty((sh, m), dtype=np.complex128)
    depth_columns = np.empty((sh, m), dtype=np.complex128)
    for p in range(m):
        for x in range(sh):
            phase = 2.0 * np.pi * x * shifts[p, 0] / s
            shift_columns[x, p] = complex(np.cos(phase), np.sin(phase))
            phase = -depth_phase[p] * x * x * freq_unit2
            depth_columns[x, p] = complex(np.cos(phase), np.sin(phase))
    for y in prange(s):
        ky = y if y < s // 2 else y - s
        rows = np.empty((4, m))  # the row factors: shift (cos, sin), depth (cos, sin)
        for p in range(m):
            phase = 2.0 * np.pi * ky * shifts[p, 1] / s
            rows[0, p] = np.cos(phase)
            rows[1, p] = np.sin(phase)
            phase = -depth_phase[p] * ky * ky * freq_unit2
            rows[2, p] = np.cos(phase)
            rows[3, p] = np.sin(phase)
        for x in range(sh):
            w = weight[y, x]
            if w == 0.0:
                continue
            pd = prediction_factor * dose[y, x]
            g = gamma_phasor[y, x]
            ass = a_ss[y, x]
            asc = a_sc[y, x]
            acc = a_cc[y, x]
            bs_re = b_s[y, x].real
            bs_im = b_s[y, x].imag
            bc_re = b_c[y, x].real
            bc_im = b_c[y, x].imag
            ooo = oo[y, x]
            fss = fsc = fcc = fbs_re = fbs_im = fbc_re = fbc_im = 0.0
            if with_flipped:
                fss = f_ss[y, x]
                fsc = f_sc[y, x]
                fcc = f_cc[y, x]
                fbs_re = fb_s[y, x].real
                fbs_im = fb_s[y, x].imag
                fbc_re = fb_c[y, x].real
                fbc_im = fb_c[y, x].imag
            for p in range(m):
                value = slices[p, y, x]
                qr = pd * np.float64(value.real)
                qi = pd * np.float64(value.imag)
                # o = observation * shift column * shift row
                value = observations[p, y, x]
                a = np.float64(value.real)
                b = np.float64(value.imag)
                column = shift_columns[x, p]
                t_re = a * column.real - b * column.imag
                t_im = a * column.imag + b * column.real
                o_re = t_re * rows[0, p] - t_im * rows[1, p]
                o_im = t_re * rows[1, p] + t_im * rows[0, p]
                n = qr * qr + qi * qi
                z_re = o_re * qr + o_im * qi  # o conj(q)
                z_im = o_im * qr - o_re * qi
                column = depth_columns[x, p]
                d_re = column.real * rows[2, p] - column.imag * rows[3, p]
                d_im = column.real * rows[3, p] + column.imag * rows[2, p]
                cg = g.real * d_re - g.imag * d_im  # exp(i gamma_i) = exp(i gamma) depth
                sg = g.real * d_im + g.imag * d_re
                wn = w * n
                ass += wn * sg * sg
                asc += wn * sg * cg
                acc += wn * cg * cg
                ws = w * sg
                wc = w * cg
                bs_re += ws * z_re
                bs_im += ws * z_im
                bc_re += wc * z_re
                bc_im += wc * z_im
                ooo += w * (o_re * o_re + o_im * o_im)
                if with_flipped:
                    cg = g.real * d_re + g.imag * d_im  # exp(i gamma) conj(depth)
                    sg = g.imag * d_re - g.real * d_im
                    fss += wn * sg * sg
                    fsc += wn * sg * cg
                    fcc += wn * cg * cg
                    ws = w * sg
                    wc = w * cg
                    fbs_re += ws * z_re
                    fbs_im += ws * z_im
                    fbc_re += wc * z_re
                    fbc_im += wc * z_im
            a_ss[y, x] = ass
            a_sc[y, x] = asc
            a_cc[y, x] = acc
            b_s[y, x] = complex(bs_re, bs_im)
            b_c[y, x] = complex(bc_re, bc_im)
            oo[y, x] = ooo
            if with_flipped:
                f_ss[y, x] = fss
                f_sc[y, x] = fsc
                f_cc[y, x] = fcc
                fb_s[y, x] = complex(fbs_re, fbs_im)
                fb_c[y, x] = complex(fbc_re, fbc_im)


# =====================================================================================================
# Particle reconstruction (owner: assessment helper; used by tomoctfrefine/reconstruct.py).
# 3D accumulators are rfftn grids [kz, ky, kx] of shape (s, s, s//2+1); slices rfft2 grids [ky, kx].
# =====================================================================================================


@njit(cache=True, inline="always")
def _bilinear_corners(s, sh, px, py):
    """Rows, columns and weights of the bilinear sample at signed pixel frequency (px, py) on a
    half-plane grid of ``s`` rows and ``sh`` columns; for ``px < 0`` the point-mirrored sample is taken
    (``conjugate`` says so: ``F(-k) = conj F(k)`` for transforms, ``W(-k) = W(k)`` for real weights)."""
    conjugate = False
    if px < 0.0:
        px = -px
        py = -py
        conjugate = True
    x0 = int(np.floor(px))
    fx = px - x0
    y0 = int(np.floor(py))
    fy = py - y0
    x1 = x0 + 1
    if x1 > sh - 1:
        x1 = sh - 1
    if x0 > sh - 1:
        x0 = sh - 1
    return (y0 % s, (y0 + 1) % s, x0, x1, (1.0 - fy) * (1.0 - fx), (1.0 - fy) * fx, fy * (1.0 - fx), fy * fx,
            conjugate)


@njit(parallel=True, cache=True)
def backproject_slices(slices_fs, slice_weights, inverse_transposed, half_index, max_radius_px, data_fs, weight_fs):
    """Insert central slices into 3D Fourier accumulators (gather form, as RELION's backward projector).

    Each 3D voxel ``w`` (signed pixel frequency, ``|w| <= max_radius_px[j]``) within one voxel of the plane of slice j
    receives ``(1 - |d|)`` times the bilinear interpolation of the slice at ``(kx, ky)``, where
    ``(kx, ky, d) = inverse_transposed[j] @ w``; the weights are accumulated the same way.

    Parameters
    ----------
    slices_fs : complex128 (n, s, s//2+1)
        CTF-multiplied 2D transforms (origin at the particle centre).
    slice_weights : float64 (n, s, s//2+1)
        Their weights (CTF^2 times dose^2).
    inverse_transposed : float64 (n, 3, 3)
        ``inv(M).T`` with ``M = P[:3,:3] @ A`` (for a rotation this is ``M`` itself).
    half_index : int64 (n,)
        0 or 1: the accumulator each slice goes into.
    max_radius_px : float64 (n,)
        Largest 3D frequency radius (pixels) a slice may fill (RELION's dose cut-off ``maxFreq``).
    data_fs : complex128 (2, s, s, s//2+1)   (modified in place)
    weight_fs : float64 (2, s, s, s//2+1)    (modified in place)
    """
    n = slices_fs.shape[0]
    slice_rows, slice_cols = slices_fs.shape[1], slices_fs.shape[2]
    s = data_fs.shape[1]
    sh = data_fs.shape[3]
    half = s // 2
    for z in prange(s):
        zz = z if z < half else z - s
        for j in range(n):
            h = half_index[j]
            m = inverse_transposed[j]
            nx, ny, nz = m[2, 0], m[2, 1], m[2, 2]
            max_r2 = max_radius_px[j] * max_radius_px[j]
            if zz * zz > max_r2:
                continue
            # Rows that can hold a voxel of this plane: |nx x + ny yy + nz zz| < 1 for some x in [0, sh-1],
            # and yy^2 + zz^2 <= max_r2 (a superset: the tests below are exact). Skipping the other rows
            # leaves each voxel's sum over j in the same order, so the result is unchanged.
            y_limit = np.sqrt(max_r2 - zz * zz)
            y_low = -half if -y_limit < -half else int(np.floor(-y_limit))
            y_high = half - 1 if y_limit > half - 1 else int(np.ceil(y_limit))
            if ny != 0.0:
                extent = nx * (sh - 1)
                low = -1.0 - nz * zz - (extent if extent > 0.0 else 0.0)
                high = 1.0 - nz * zz - (extent if extent < 0.0 else 0.0)
                b0 = low / ny
                b1 = high / ny
                if b0 > b1:
                    b0, b1 = b1, b0
                if b0 > y_low:
                    y_low = int(np.floor(b0)) if b0 < y_high else y_high + 1
                if b1 < y_high:
                    y_high = int(np.ceil(b1)) if b1 > y_low else y_low - 1
            for yy in range(y_low, y_high + 1):
                y = yy if yy >= 0 else yy + s
                if yy * yy + zz * zz > max_r2:
                    continue
                yz = ny * yy + nz * zz
                if nx == 0.0:
                    if yz > -1.0 and yz < 1.0:
                        x0 = 0
                        x1 = sh - 1
                    else:
                        continue
                else:
                    a0 = (-yz - 1.0) / nx
                    a1 = (-yz + 1.0) / nx
                    if a0 > a1:
                        a0, a1 = a1, a0
                    x0 = int(np.ceil(a0))
                    x1 = int(np.floor(a1))
                    if x0 < 0:
                        x0 = 0
                    if x1 > sh - 1:
                        x1 = sh - 1
                for x in range(x0, x1 + 1):
                    if x * x + yy * yy + zz * zz > max_r2:
                        continue
                    depth = nx * x + yz
                    if depth <= -1.0 or depth >= 1.0:
                        continue
                    px = m[0, 0] * x + m[0, 1] * yy + m[0, 2] * zz
                    py = m[1, 0] * x + m[1, 1] * yy + m[1, 2] * zz
                    if abs(px) >= sh or abs(py) >= half + 1:
                        continue
                    c = 1.0 - abs(depth)
                    # one set of bilinear corners serves the slice and its weights
                    r0, r1, c0, c1, w00, w01, w10, w11, conjugate = _bilinear_corners(slice_rows, slice_cols, px, py)
                    f = slices_fs[j]
                    value = w00 * f[r0, c0] + w01 * f[r0, c1] + w10 * f[r1, c0] + w11 * f[r1, c1]
                    data_fs[h, z, y, x] += c * (np.conj(value) if conjugate else value)
                    g = slice_weights[j]
                    weight_fs[h, z, y, x] += c * (w00 * g[r0, c0] + w01 * g[r0, c1] + w10 * g[r1, c0] + w11 * g[r1, c1])


@njit(cache=True, inline="always")
def _signed(index, size):
    """Signed frequency of FFT index ``index`` on an axis of ``size`` (numpy's ``fftfreq(size) * size``)."""
    return index if index < (size + 1) // 2 else index - size


@njit(cache=True, parallel=True)
def shell_sums_rounded(grids, shell_count):
    """Per-shell sums of 3D ``rfftn``-grid quantities and the voxel count, shell ``round(|k|)``.

    ``grids`` : float64 (m, s, s, s//2+1); returns ``(sums (m, shell_count), counts (shell_count,))``;
    voxels of shells ``>= shell_count`` are left out. Parallel over kz (partial sums per plane, added
    at the end: no races, the same result for any thread count).
    """
    m = grids.shape[0]
    s = grids.shape[1]
    sh = grids.shape[3]
    partial = np.zeros((s, m + 1, shell_count))
    for z in prange(s):
        zz = _signed(z, s)
        for y in range(s):
            yy = _signed(y, s)
            for x in range(sh):
                shell = int(np.floor(np.sqrt(zz * zz + yy * yy + x * x) + 0.5))
                if shell >= shell_count:
                    continue
                partial[z, m, shell] += 1.0
                for i in range(m):
                    partial[z, i, shell] += grids[i, z, y, x]
    total = partial.sum(axis=0)
    return total[:m].copy(), total[m].copy()


@njit(cache=True, parallel=True)
def shell_sums_linear(values, bins):
    """RELION's ``fftwHalf_3D_lin`` sums: each voxel of an ``rfftn`` grid adds ``(1 - t) v`` to bin
    ``floor(r)`` and ``t v`` to the next (``t = r - floor(r)``), and its weights likewise; voxels with
    ``floor(r) >= bins`` are left out. Returns ``(total, weight)`` of length ``bins + 1``."""
    s = values.shape[0]
    sh = values.shape[2]
    partial = np.zeros((s, 2, bins + 1))
    for z in prange(s):
        zz = _signed(z, s)
        for y in range(s):
            yy = _signed(y, s)
            for x in range(sh):
                r = np.sqrt(zz * zz + yy * yy + x * x)
                lower = int(np.floor(r))
                if lower >= bins:
                    continue
                t = r - lower
                v = values[z, y, x]
                partial[z, 0, lower] += (1.0 - t) * v
                partial[z, 1, lower] += 1.0 - t
                partial[z, 0, lower + 1] += t * v
                partial[z, 1, lower + 1] += t
    total = partial.sum(axis=0)
    return total[0].copy(), total[1].copy()


@njit(cache=True, parallel=True)
def half_set_shell_powers(data_fs, weight_fs, threshold, shell_count):
    """Per-shell sums for the Wiener term of two half sets (``reconstruct.wiener_shell_ratio``).

    Over the voxels of shell ``round(|k|) < shell_count`` where both weights exceed ``threshold[shell]``:
    count, ``sum Re(V1 conj V2)`` and ``sum |V1 - V2|^2 / (1/W1 + 1/W2)`` with ``V_h = D_h / W_h``.
    ``data_fs`` complex (2, s, s, s//2+1), ``weight_fs`` float (2, s, s, s//2+1).
    Returns ``(count, cross, noise)``, each (shell_count,).
    """
    s = data_fs.shape[1]
    sh = data_fs.shape[3]
    partial = np.zeros((s, 3, shell_count))
    for z in prange(s):
        zz = _signed(z, s)
        for y in range(s):
            yy = _signed(y, s)
            for x in range(sh):
                shell = int(np.floor(np.sqrt(zz * zz + yy * yy + x * x) + 0.5))
                if shell >= shell_count:
                    continue
                w1 = weight_fs[0, z, y, x]
                w2 = weight_fs[1, z, y, x]
                if not (w1 > threshold[shell] and w2 > threshold[shell]):
                    continue
                v1 = data_fs[0, z, y, x] / w1
                v2 = data_fs[1, z, y, x] / w2
                d = v1 - v2
                partial[z, 0, shell] += 1.0
                partial[z, 1, shell] += v1.real * v2.real + v1.imag * v2.imag
                partial[z, 2, shell] += (d.real * d.real + d.imag * d.imag) / (1.0 / w1 + 1.0 / w2)
    total = partial.sum(axis=0)
    return total[0].copy(), total[1].copy(), total[2].copy()


@njit(cache=True, parallel=True)
def divide_by_regularised_weight(transform, weight_fs, added, floor_linear, floor_fraction, unit_shell_gain):
    """CTF correction in place: ``T / d`` with ``d = max(W + added[round(r)], floor_fraction * F(r))``,
    ``F`` the linear interpolation of ``floor_linear`` at radius ``r`` (RELION's heuristic floor;
    ``floor_fraction = 0`` disables it). Voxels with ``floor(r) + 1 >= s//2 + 1`` or without a finite
    positive ``d`` are zeroed. With ``unit_shell_gain``, each shell ``round(r)`` is further divided by its
    mean gain ``<W / d>`` over its usable voxels (shells without gain are zeroed).

    ``transform`` complex (s, s, s//2+1), modified; ``weight_fs`` float (same grid); ``added`` float64
    indexed by ``round(r)`` (length > the largest shell of the grid; ``inf`` zeroes a shell);
    ``floor_linear`` float64 (at least 2 values).
    """
    s = transform.shape[0]
    sh = transform.shape[2]
    half = s // 2
    last = floor_linear.shape[0] - 2
    shells = added.shape[0]
    partial = np.zeros((s, 2, shells))
    for z in prange(s):
        zz = _signed(z, s)
        for y in range(s):
            yy = _signed(y, s)
            for x in range(sh):
                r = np.sqrt(zz * zz + yy * yy + x * x)
                shell = int(np.floor(r + 0.5))
                divisor = weight_fs[z, y, x] + added[shell]
                if floor_fraction > 0.0:
                    lower = int(np.floor(r))
                    if lower > last:
                        lower = last
                    t = r - lower
                    floor = floor_fraction * ((1.0 - t) * floor_linear[lower] + t * floor_linear[lower + 1])
                    if floor > divisor:
                        divisor = floor
                if np.floor(r) + 1 < half + 1 and divisor > 0.0 and np.isfinite(divisor):
                    transform[z, y, x] = transform[z, y, x] / divisor
                    if unit_shell_gain:
                        partial[z, 0, shell] += weight_fs[z, y, x] / divisor
                        partial[z, 1, shell] += 1.0
                else:
                    transform[z, y, x] = 0.0
    if not unit_shell_gain:
        return
    total = partial.sum(axis=0)
    gain = np.zeros(shells)
    for k in range(shells):
        if total[1, k] > 0:
            gain[k] = total[0, k] / total[1, k]
    for z in prange(s):
        zz = _signed(z, s)
        for y in range(s):
            yy = _signed(y, s)
            for x in range(sh):
                shell = int(np.floor(np.sqrt(zz * zz + yy * yy + x * x) + 0.5))
                if gain[shell] > 0.0:
                    transform[z, y, x] = transform[z, y, x] / gain[shell]
                else:
                    transform[z, y, x] = 0.0


# ---------------------------------------------------------------------------------------------
# Refinement: the profiled per-tilt likelihood (tomoctfrefine.refine.likelihood.evaluate)


_TWO_OVER_PI = 0.63661977236758134308
# pi/2 in three parts (Cephes' DP1..DP3 times 2): q * _PI_OVER_2_A is exact for |q| < 2^29
_PI_OVER_2_A = 1.57079625129699707031
_PI_OVER_2_B = 7.54978941586159635335e-8
_PI_OVER_2_C = 5.39030285815811905290e-15


@njit(cache=True, inline="always")
def _cos_sin(x):
    """``(cos x, sin x)`` within 2.3e-16 of libm's for ``|x| < 1e4`` (Cephes' polynomials on
    ``|r| <= pi/4`` after removing the nearest multiple of pi/2), branch-free so that loops over it
    vectorise: 1 ns instead of 23 ns per pair when they do."""
    q = np.floor(x * _TWO_OVER_PI + 0.5)
    r = ((x - q * _PI_OVER_2_A) - q * _PI_OVER_2_B) - q * _PI_OVER_2_C
    z = r * r
    sin_r = r + r * z * (((((1.58962301576546568060e-10 * z - 2.50507477628578072866e-8) * z
                            + 2.75573136213857245213e-6) * z - 1.98412698295895385996e-4) * z
                          + 8.33333333332211858878e-3) * z - 1.66666666666666307295e-1)
    cos_r = 1.0 - 0.5 * z + z * z * (((((-1.13585365213876817300e-11 * z + 2.08757008419747316778e-9) * z
                                        - 2.75573141792967388112e-7) * z + 2.48015872888517045348e-5) * z
                                      - 1.38888888888730564116e-3) * z + 4.16666666666665929218e-2)
    quadrant = np.int64(q)
    odd = (quadrant & 1) != 0
    s = cos_r if odd else sin_r
    c = sin_r if odd else cos_r
    s = -s if (quadrant & 2) != 0 else s
    c = -c if ((quadrant + 1) & 2) != 0 else c
    return c, s


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def profiled_likelihood_terms(
    a_ss, a_sc, a_cc, b_s, b_c, delta, psi_cos, psi_sin, fixed_scale, use_fixed_scale, derivatives, psi_derivatives,
    s_p, s_r, scale, grad_delta, fisher_delta, fisher_delta_scale, grad_psi, fisher_psi,
):
    """Per tilt ``f`` (rows) and band pixel ``k`` (columns), with ``e = (cos delta, sin delta)`` and
    ``b`` rotated by ``exp(-i psi)``: ``S_P = sum e^T A e``, ``S_R = sum Re(e^T b)``, the scale
    ``max(0, -S_R/S_P)`` (or ``fixed_scale``) and, if ``derivatives``, the per-pixel gradient and
    Gauss-Newton curvatures of ``1/2 (c^2 e^T A e + 2 c Re e^T b)`` (see refine.likelihood).

    The cosines and sines are :func:`_cos_sin`'s and the sums run in SIMD lanes (``reassoc``): the
    loop over a tilt's pixels vectorises (libm's sin and cos were 80 % of the time); the sums change
    by float rounding only, and do not depend on the thread count."""
    n_tilts, n_pixels = a_ss.shape
    for f in prange(n_tilts):
        sp = 0.0
        sr = 0.0
        for k in range(n_pixels):
            c, s = _cos_sin(delta[f, k])
            bs_re = psi_cos[k] * b_s[f, k].real + psi_sin[k] * b_s[f, k].imag
            bc_re = psi_cos[k] * b_c[f, k].real + psi_sin[k] * b_c[f, k].imag
            sp += a_ss[f, k] * c * c + 2.0 * a_sc[f, k] * c * s + a_cc[f, k] * s * s
            sr += bs_re * c + bc_re * s
        s_p[f] = sp
        s_r[f] = sr
        if use_fixed_scale:
            cf = fixed_scale[f]
        elif sp > 0.0 and sr < 0.0:
            cf = -sr / sp
        else:
            cf = 0.0
        scale[f] = cf
        if not derivatives:
            continue
        for k in range(n_pixels):
            c, s = _cos_sin(delta[f, k])
            ass = a_ss[f, k]
            asc = a_sc[f, k]
            acc = a_cc[f, k]
            bs_re = psi_cos[k] * b_s[f, k].real + psi_sin[k] * b_s[f, k].imag
            bc_re = psi_cos[k] * b_c[f, k].real + psi_sin[k] * b_c[f, k].imag
            half_dp = asc * (c * c - s * s) + (acc - ass) * c * s
            p_prime = ass * s * s - 2.0 * asc * c * s + acc * c * c
            dr = -bs_re * s + bc_re * c
            grad_delta[f, k] = cf * cf * half_dp + cf * dr
            fisher_delta[f, k] = cf * cf * p_prime
            fisher_delta_scale[f, k] = cf * half_dp
            if psi_derivatives:
                bs_im = psi_cos[k] * b_s[f, k].imag - psi_sin[k] * b_s[f, k].real
                bc_im = psi_cos[k] * b_c[f, k].imag - psi_sin[k] * b_c[f, k].real
                grad_psi[f, k] = cf * (bs_im * c + bc_im * s)
                fisher_psi[f, k] = cf * cf * (ass * c * c + 2.0 * asc * c * s + acc * s * s)


# ---------------------------------------------------------------------------------------------
# Windowed prediction (delocalisation): the CTF-multiplied prediction cut and tapered like the boxes


@njit(cache=True, parallel=True)
def embed_centred(images, mask, out):
    """Zero-pad centred images (origin at pixel 0, wrapped) ``(m, s, s)``, times ``mask`` ``(s, s)`` (same
    layout), into ``(m, S, S)``, keeping the origin at pixel 0: offsets ``-s/2 .. s/2-1`` go to
    ``d mod S``. ``out`` is fully written."""
    m = images.shape[0]
    s = images.shape[1]
    big = out.shape[1]
    half = s // 2
    for p in prange(m):
        out[p] = 0.0
        for y in range(s):
            ty = y if y < half else y - s + big
            for x in range(s):
                tx = x if x < half else x - s + big
                out[p, ty, tx] = mask[y, x] * images[p, y, x]


@njit(cache=True, parallel=True)
def ctf_products(spectra, gamma_phasor, depth_phase, freq_unit2, with_flipped, out):
    """``sin(gamma_i) P_i`` and ``cos(gamma_i) P_i`` (and the same with the opposite hand) on a padded
    rfft2 grid, ``gamma_i = gamma - depth_phase_i |k|^2`` (flipped: ``+``). The depth phase is separable
    in x and ky, so the loop has no trigonometry (per-particle column tables times a row factor).

    spectra : complex64 (m, S, S//2+1) ; gamma_phasor : complex128 (S, S//2+1) ``exp(i gamma)``
    depth_phase : float64 (m,) ; freq_unit2 : ``1/(S p)^2`` ; out : complex64 (m, 2 or 4, S, S//2+1):
    sin, cos (, sin, cos flipped)
    """
    m = spectra.shape[0]
    big = spectra.shape[1]
    sh = spectra.shape[2]
    for p in prange(m):
        columns = np.empty(sh, dtype=np.complex128)
        for x in range(sh):
            phase = -depth_phase[p] * x * x * freq_unit2
            columns[x] = complex(np.cos(phase), np.sin(phase))
        for y in range(big):
            ky = y if y < big // 2 else y - big
            phase = -depth_phase[p] * ky * ky * freq_unit2
            row = complex(np.cos(phase), np.sin(phase))
            for x in range(sh):
                value = complex(spectra[p, y, x])
                depth = columns[x] * row
                e = gamma_phasor[y, x] * depth
                out[p, 0, y, x] = e.imag * value
                out[p, 1, y, x] = e.real * value
                if with_flipped:
                    e = gamma_phasor[y, x] * depth.conjugate()
                    out[p, 2, y, x] = e.imag * value
                    out[p, 3, y, x] = e.real * value


@njit(cache=True, parallel=True)
def crop_boxes(images, taper, out):
    """Cut the central ``s x s`` box out of padded images whose origin is pixel 0 (wrapped), then treat
    it exactly as :func:`extract_boxes` treats a tilt image: subtract the mean outside the circle
    ``r > s/2``, multiply by the cropCircle ``taper`` (``forward.crop_circle_taper``), write rolled by ``s/2``.
    Rows and columns wrap separately (``R`` may be ``s``: rows already cut to offsets ``-s/2 .. s/2-1``).

    images : float32 (m, h, R, S) ; taper : float32 (s, s) ; out : float32 (m, h, s, s)   written
    """
    m = images.shape[0]
    nh = images.shape[1]
    big_rows = images.shape[2]
    big = images.shape[3]
    s = out.shape[2]
    radius = s / 2.0
    half = s // 2
    # source row/column of box pixel y/x (offset y - s/2, wrapped) and the outside-the-circle test,
    # looked up once instead of per pixel
    rows = np.empty(s, dtype=np.int64)
    columns = np.empty(s, dtype=np.int64)
    for i in range(s):
        rows[i] = i - half + big_rows if i < half else i - half
        columns[i] = i - half + big if i < half else i - half
    outside = np.empty((s, s), dtype=np.bool_)
    for y in range(s):
        dy = y - radius
        for x in range(s):
            dx = x - radius
            outside[y, x] = dx * dx + dy * dy > radius * radius
    for p in prange(m):
        for h in range(nh):
            total = 0.0
            count = 0
            for y in range(s):
                line = images[p, h, rows[y]]
                mask = outside[y]
                for x in range(s):
                    if mask[x]:
                        total += line[columns[x]]
                        count += 1
            outside_mean = total / count if count > 0 else 0.0
            for y in range(s):
                line = images[p, h, rows[y]]
                weights = taper[y]
                target = out[p, h, (y + half) % s]
                for x in range(half):
                    target[x + half] = weights[x] * (line[columns[x]] - outside_mean)
                for x in range(half, s):
                    target[x - half] = weights[x] * (line[columns[x]] - outside_mean)


@njit(cache=True, parallel=True)
def accumulate_windowed_statistics(observations, predictions, weight, with_flipped,
                                   a_ss, a_sc, a_cc, b_s, b_c, oo, f_ss, f_sc, f_cc, fb_s, fb_c):
    """Add the sufficient statistics of a batch of particles from windowed predictions.

    ``predictions[p, 0]`` / ``[p, 1]`` are ``q_s = W[sin(gamma) q]`` and ``q_c = W[cos(gamma) q]`` in
    the frame of the box (the particle at its sub-pixel offset, like the unshifted ``observations``);
    ``[p, 2]``, ``[p, 3]`` the same for the flipped hand. ``a_ss += w |q_s|^2``, ``a_sc += w Re(q_s
    conj q_c)``, ``a_cc += w |q_c|^2``, ``b_s += w o conj(q_s)``, ``b_c += w o conj(q_c)``, ``oo += w |o|^2``.
    Parallel over rows (sums independent of the thread count).

    observations : complex64 (m, s, sh) ; predictions : complex64 (m, 2 or 4, s, sh) ; weight : float64 (s, sh)
    """
    m = observations.shape[0]
    s = observations.shape[1]
    sh = observations.shape[2]
    for y in prange(s):
        for p in range(m):
            for x in range(sh):
                w = weight[y, x]
                if w == 0.0:
                    continue
                o = complex(observations[p, y, x])
                qs = complex(predictions[p, 0, y, x])
                qc = complex(predictions[p, 1, y, x])
                a_ss[y, x] += w * (qs.real * qs.real + qs.imag * qs.imag)
                a_sc[y, x] += w * (qs.real * qc.real + qs.imag * qc.imag)
                a_cc[y, x] += w * (qc.real * qc.real + qc.imag * qc.imag)
                b_s[y, x] += w * o * qs.conjugate()
                b_c[y, x] += w * o * qc.conjugate()
                oo[y, x] += w * (o.real * o.real + o.imag * o.imag)
                if with_flipped:
                    qs = complex(predictions[p, 2, y, x])
                    qc = complex(predictions[p, 3, y, x])
                    f_ss[y, x] += w * (qs.real * qs.real + qs.imag * qs.imag)
                    f_sc[y, x] += w * (qs.real * qc.real + qs.imag * qc.imag)
                    f_cc[y, x] += w * (qc.real * qc.real + qc.imag * qc.imag)
                    fb_s[y, x] += w * o * qs.conjugate()
                    fb_c[y, x] += w * o * qc.conjugate()


@njit(cache=True, parallel=True)
def model_spectra(slices, shifts, depth_phase, gamma_phasor, freq_unit2, common, out):
    """Spectra of rendered particles (see ``image_model.py``): for particle ``i`` and pixel ``k``,
    ``out = common * sin(gamma - depth_phase_i |k|^2) * slice_i * exp(-2 pi i k.t_i / s)``: the
    particle's model at its sub-pixel offset ``t_i`` from its box centre (the inverse of the shift that
    :func:`shift_observations` applies to an observation). Separable phase tables, as in
    :func:`accumulate_tilt_statistics`: no trigonometry per pixel. Pixels where the slice is 0 are 0.

    slices : complex64 (m, s, sh) ; shifts : float64 (m, 2) ; depth_phase : float64 (m,) ;
    gamma_phasor : complex128 (s, sh) ``exp(i gamma)`` ; common : complex128 (s, sh) ; out : complex64, written
    """
    m = slices.shape[0]
    s = slices.shape[1]
    sh = slices.shape[2]
    for p in prange(m):
        shift_columns = np.empty(sh, dtype=np.complex128)
        depth_columns = np.empty(sh, dtype=np.complex128)
        for x in range(sh):
            phase = -2.0 * np.pi * x * shifts[p, 0] / s
            shift_columns[x] = complex(np.cos(phase), np.sin(phase))
            phase = -depth_phase[p] * x * x * freq_unit2
            depth_columns[x] = complex(np.cos(phase), np.sin(phase))
        for y in range(s):
            ky = y if y < s // 2 else y - s
            phase = -2.0 * np.pi * ky * shifts[p, 1] / s
            shift_row = complex(np.cos(phase), np.sin(phase))
            phase = -depth_phase[p] * ky * ky * freq_unit2
            depth_row = complex(np.cos(phase), np.sin(phase))
            for x in range(sh):
                sample = complex(slices[p, y, x])
                if sample == 0:  # beyond the slice's radius (most of a low-resolution model's pixels)
                    out[p, y, x] = 0j
                    continue
                sine = (gamma_phasor[y, x] * depth_columns[x] * depth_row).imag
                value = common[y, x] * sine * sample * shift_columns[x] * shift_row
                out[p, y, x] = value


@njit(cache=True)
def add_patches(image, patches, origins):
    """Add rolled ``s x s`` patches (centre at pixel 0, as ``irfft2`` returns them) into ``image`` with
    their box origins ``(ox, oy)``; the parts outside the image are dropped.

    Each patch row is added as two runs of columns (box columns ``0..s/2-1`` come from patch columns
    ``s/2..s-1``, then the rest), clipped to the image once per patch: no modulo or bounds test per pixel.

    image : float32 (H, W), added to ; patches : float32 or float64 (m, s, s) ; origins : int64 (m, 2)
    """
    height = image.shape[0]
    width = image.shape[1]
    s = patches.shape[1]
    half = s // 2
    for p in range(patches.shape[0]):
        ox = origins[p, 0]
        oy = origins[p, 1]
        first_column = max(0, -ox)  # box columns [first_column, last_column) lie inside the image
        last_column = min(s, width - ox)
        if first_column >= last_column:
            continue
        for by in range(max(0, -oy), min(s, height - oy)):
            target = image[oy + by]
            source = patches[p, by + half if by < half else by - half]
            for bx in range(first_column, min(half, last_column)):
                target[ox + bx] += source[bx + half]
            for bx in range(max(half, first_column), last_column):
                target[ox + bx] += source[bx - half]
