"""Equivariant messages on CUDA with Triton: per-edge harmonics, receiver-row and sender-row
tensor-product sums, per-atom symmetric contractions.

Algorithms (maths in README.md; the same sums as cpu_numba.py, ordered for a GPU):
* ``_sh_kernel``: e3nn's polynomials of the unit vector (and their gradients), one program per
  block of edges, in the inputs' dtype; value, vjp or jvp chosen at compile time.
* ``_tp_rows_kernel`` (``tp_conv``): one program per (receiver, block of channels) walks the
  receiver's CSR row, so each output row has one writer: no atomics, deterministic. Per edge
  the dense coupling of each input component ([nY, Dout], the same for every program, so read
  from cache) is contracted with y (a [nY] x [nY, Dout] product); the edge's y and weights are
  read once, and the channel products are elementwise ("uvu": no channel mixing, so no
  ``tl.dot``; see README.md "Triton path").
* ``_tp_sender_kernel`` (the x-gradient): the same per sender row (``by_sender`` CSR), reading
  g at each edge's receiver: one writer per row, no atomics.
* ``_tp_edge_kernel``: the y-, w- and (tabulated weights) distance gradients, one program per
  edge, looping over channel blocks; every value has one writer (a row of w shared by an edge
  and its mirror is stored by the edge of lower index, which adds its partner's term).
* Tabulated weights (``*_spline``): the cubic table is read inside the edge loops (SPLINE).
* Symmetric contraction: one program per (atom, block of channels) for the polynomial and its
  x-gradients; the coefficient gradients one program per (element, tuple, block of channels)
  over the atoms of that element (element-sorted on the device), one writer per value.
Sizes come from tensor shapes only (no host synchronisation); offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastff.kernels.gpu_common import constants

# Edges per program of the harmonics kernels: 128 edges x 16 components keep the jvp within
# 128 registers in float64 (python -m fastff.aot; README "Tuning").
BLOCK_E = 128
# Elements of the [Dout, channels] tiles of the convolution kernels (Dout padded to a power of
# two): 1024 = 64 x 16 keeps every tp kernel within 128 registers in float64 (README "Tuning").
TILE = 1024
# The per-edge gradient kernel keeps three such tiles live (g, weights, T): 512 = 64 x 8.
EDGE_TILE = 512
# Warps of the tile kernels: 8 (256 threads, 4 elements of a 1024 tile each) halves the
# registers per thread of the default 4 (README "Tuning").
TP_WARPS = 8
# Atoms per step of the coefficient-gradient kernel.
BLOCK_N = 8
# Elements of the [components, channels] tiles of the symmetric-contraction kernels: the
# polynomial's [M, channels] tile at 512 (4 x 128) spilled 4 bytes in float64 on sm_90, 256
# does not (README "Tuning").
SYMC_TILE = 512
APPLY_TILE = 256
_SIZES = ["num_edges", "n_x", "n_rows", "nc", "d_in", "n_y", "d_out", "n_paths", "intervals",
          "n_atoms", "dim", "n_k", "n_m", "n_z", "n_g", "n_rows_w"]


# ---------------------------------------------------------------- spherical harmonics
@triton.jit
def _emit(other_ptr, out_ptr, e, mask, m: tl.constexpr, NY: tl.constexpr, MODE: tl.constexpr,
          val, d0, d1, d2, t0, t1, t2, acc0, acc1, acc2):
    """Component m: store Y_m (MODE 0), accumulate grad_m . dY_m/du (1), store dY_m/du . t (2)."""
    if MODE == 0:
        tl.store(out_ptr + e * NY + m, val, mask=mask)
    elif MODE == 1:
        gm = tl.load(other_ptr + e * NY + m, mask=mask, other=0.0)
        acc0 += gm * d0
        acc1 += gm * d1
        acc2 += gm * d2
    else:
        tl.store(out_ptr + e * NY + m, d0 * t0 + d1 * t1 + d2 * t2, mask=mask)
    return acc0, acc1, acc2


@triton.jit
def _sh_kernel(v_ptr, other_ptr, out_ptr, num_edges, LMAX: tl.constexpr, MODE: tl.constexpr,
               BLOCK_E: tl.constexpr):
    """MODE 0: out = Y [E, nY]; 1: out = vjp of other [E, nY] -> [E, 3]; 2: out = jvp of
    other [E, 3] -> [E, nY]."""
    NY: tl.constexpr = (LMAX + 1) * (LMAX + 1)
    # constants as scalars of the data's dtype: a bare literal is rounded to float32 first
    dt = out_ptr.dtype.element_ty
    eps = tl.full([], 1e-12, dt)  # torch.nn.functional.normalize's (e3nn's normalize=True)
    _S3 = tl.full([], 1.7320508075688772, dt)  # sqrt(3)
    _S5 = tl.full([], 2.23606797749979, dt)  # sqrt(5)
    _S7 = tl.full([], 2.6457513110645907, dt)  # sqrt(7)
    _C1 = tl.full([], 0.9128709291752769, dt)  # sqrt(5 / 6)
    _C2 = tl.full([], 0.6123724356957945, dt)  # sqrt(3 / 8)
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = e < num_edges
    vx = tl.load(v_ptr + e * 3, mask=mask, other=0.0)
    vy = tl.load(v_ptr + e * 3 + 1, mask=mask, other=0.0)
    vz = tl.load(v_ptr + e * 3 + 2, mask=mask, other=0.0)
    r = tl.sqrt(vx * vx + vy * vy + vz * vz)
    inside = r > eps
    r = tl.where(inside, r, eps)
    x = vx / r
    y = vy / r
    z = vz / r
    zero = x * 0.0
    one = zero + 1.0
    t0 = zero
    t1 = zero
    t2 = zero
    if MODE == 2:  # the unit map's Jacobian (symmetric) applied to the tangent
        t0 = tl.load(other_ptr + e * 3, mask=mask, other=0.0)
        t1 = tl.load(other_ptr + e * 3 + 1, mask=mask, other=0.0)
        t2 = tl.load(other_ptr + e * 3 + 2, mask=mask, other=0.0)
        dot = tl.where(inside, x * t0 + y * t1 + z * t2, 0.0)
        t0 = (t0 - x * dot) / r
        t1 = (t1 - y * dot) / r
        t2 = (t2 - z * dot) / r
    a0 = zero
    a1 = zero
    a2 = zero
    a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 0, NY, MODE, one, zero, zero, zero, t0, t1,
                       t2, a0, a1, a2)
    if LMAX >= 1:
        s3 = zero + _S3
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 1, NY, MODE, _S3 * x, s3, zero, zero,
                           t0, t1, t2, a0, a1, a2)
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 2, NY, MODE, _S3 * y, zero, s3, zero,
                           t0, t1, t2, a0, a1, a2)
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 3, NY, MODE, _S3 * z, zero, zero, s3,
                           t0, t1, t2, a0, a1, a2)
    if LMAX >= 2:
        b0 = _S3 * x * z
        b4 = 0.5 * _S3 * (z * z - x * x)
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 4, NY, MODE, _S5 * b0, _S5 * _S3 * z,
                           zero, _S5 * _S3 * x, t0, t1, t2, a0, a1, a2)
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 5, NY, MODE, _S5 * _S3 * x * y,
                           _S5 * _S3 * y, _S5 * _S3 * x, zero, t0, t1, t2, a0, a1, a2)
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 6, NY, MODE,
                           _S5 * (y * y - 0.5 * (x * x + z * z)), -_S5 * x, 2.0 * _S5 * y,
                           -_S5 * z, t0, t1, t2, a0, a1, a2)
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 7, NY, MODE, _S5 * _S3 * y * z, zero,
                           _S5 * _S3 * z, _S5 * _S3 * y, t0, t1, t2, a0, a1, a2)
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 8, NY, MODE, _S5 * b4, -_S5 * _S3 * x,
                           zero, _S5 * _S3 * z, t0, t1, t2, a0, a1, a2)
    if LMAX >= 3:
        # gradients of b0 = s3 x z and b4 = s3 (z^2 - x^2) / 2
        d00 = _S3 * z
        d02 = _S3 * x
        d40 = -_S3 * x
        d42 = _S3 * z
        q = 4.0 * y * y - x * x - z * z
        k1 = _S7 * _C1
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 9, NY, MODE, k1 * (b0 * z + b4 * x),
                           k1 * (z * d00 + x * d40 + b4), zero, k1 * (z * d02 + b0 + x * d42),
                           t0, t1, t2, a0, a1, a2)
        k2 = _S7 * _S5
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 10, NY, MODE, k2 * b0 * y, k2 * y * d00,
                           k2 * b0, k2 * y * d02, t0, t1, t2, a0, a1, a2)
        k3 = _S7 * _C2
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 11, NY, MODE, k3 * q * x,
                           k3 * (-2.0 * x * x + q), k3 * 8.0 * x * y, k3 * (-2.0 * x * z),
                           t0, t1, t2, a0, a1, a2)
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 12, NY, MODE,
                           _S7 * 0.5 * y * (2.0 * y * y - 3.0 * (x * x + z * z)),
                           _S7 * (-3.0 * x * y), _S7 * (3.0 * y * y - 1.5 * (x * x + z * z)),
                           _S7 * (-3.0 * y * z), t0, t1, t2, a0, a1, a2)
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 13, NY, MODE, k3 * z * q,
                           k3 * (-2.0 * x * z), k3 * 8.0 * y * z, k3 * (-2.0 * z * z + q),
                           t0, t1, t2, a0, a1, a2)
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 14, NY, MODE, k2 * b4 * y, k2 * y * d40,
                           k2 * b4, k2 * y * d42, t0, t1, t2, a0, a1, a2)
        a0, a1, a2 = _emit(other_ptr, out_ptr, e, mask, 15, NY, MODE, k1 * (b4 * z - b0 * x),
                           k1 * (z * d40 - x * d00 - b0), zero, k1 * (z * d42 + b4 - x * d02),
                           t0, t1, t2, a0, a1, a2)
    if MODE == 1:  # through the unit map: (I - u u^T) / |v| inside, I / eps at the origin
        dot = tl.where(inside, x * a0 + y * a1 + z * a2, 0.0)
        tl.store(out_ptr + e * 3, (a0 - x * dot) / r, mask=mask)
        tl.store(out_ptr + e * 3 + 1, (a1 - y * dot) / r, mask=mask)
        tl.store(out_ptr + e * 3 + 2, (a2 - z * dot) / r, mask=mask)


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous()


def _check_lmax(lmax) -> int:
    lmax = int(lmax)
    if not 0 <= lmax <= 3:
        raise ValueError(f"lmax must be 0..3, got {lmax}")
    return lmax


def _sh(vectors, lmax, mode, other, width):
    lmax = _check_lmax(lmax)
    v = _c(vectors)
    out = torch.empty(v.shape[0], width, dtype=v.dtype, device=v.device)
    if v.shape[0]:
        o = _c(other) if other is not None else v
        _sh_kernel[(triton.cdiv(v.shape[0], BLOCK_E),)](v, o, out, v.shape[0], LMAX=lmax,
                                                        MODE=mode, BLOCK_E=BLOCK_E)
    return out


def spherical_harmonics(vectors, lmax):
    """Launcher: see reference.py."""
    return _sh(vectors, lmax, 0, None, (int(lmax) + 1) ** 2)


def spherical_harmonics_vjp(grad, vectors, lmax):
    """Launcher: see reference.py."""
    return _sh(vectors, lmax, 1, grad, 3)


def spherical_harmonics_jvp(tangent, vectors, lmax):
    """Launcher: see reference.py."""
    return _sh(vectors, lmax, 2, tangent, (int(lmax) + 1) ** 2)


# ---------------------------------------------------------------- tensor-product convolution
@triton.jit
def _spline_at(d_ptr, step_ptr, e, intervals, ORDER: tl.constexpr):
    """(interval, weights of t^0..t^3 for the ORDER-th derivative in r): weights 0 outside the
    table [0, step * intervals)."""
    r = tl.load(d_ptr + e)
    step = tl.load(step_ptr)
    s = r / step
    inside = (r >= 0.0) & (s < intervals)
    k = tl.minimum(tl.maximum(tl.floor(s), 0.0), intervals - 1.0)
    t = s - k
    zero = t * 0.0
    if ORDER == 0:
        w0 = zero + 1.0
        w1 = t
        w2 = t * t
        w3 = t * t * t
    else:
        w0 = zero
        w1 = zero + 1.0 / step
        w2 = 2.0 * t / step
        w3 = 3.0 * t * t / step
    return (k.to(tl.int64), tl.where(inside, w0, 0.0), tl.where(inside, w1, 0.0),
            tl.where(inside, w2, 0.0), tl.where(inside, w3, 0.0))


@triton.jit
def _weight_row(w_row_ptr, e, ok, n_rows_w, ROWS: tl.constexpr):
    """(row of w that edge e reads, ok and the row in range): w_row[e] (ROWS) or e."""
    row = e
    if ROWS:
        row = tl.load(w_row_ptr + e)
        inside = (row >= 0) & (row < n_rows_w)
        ok = ok & inside
        row = tl.where(inside, row, 0)
    return row, ok


@triton.jit
def _edge_weights(w_ptr, d_ptr, coeffs_ptr, step_ptr, e, row, ok, path, offs_c, m2, n_paths,
                  nc, intervals, SPLINE: tl.constexpr, ORDER: tl.constexpr):
    """[Dout, channels] tile of the edge's weights per output component, w[row, path(b), c],
    or the ORDER-th r-derivative of the table's at d[e] (SPLINE); zero for an invalid edge."""
    col = path[:, None] * nc + offs_c[None, :]
    mask = m2 & ok
    if SPLINE:
        k, w0, w1, w2, w3 = _spline_at(d_ptr, step_ptr, e, intervals, ORDER)
        width = n_paths.to(tl.int64) * nc  # row stride of the table, 64-bit offsets
        at = coeffs_ptr + k * 4 * width + col
        tile = w0 * tl.load(at, mask=mask, other=0.0)
        tile += w1 * tl.load(at + width, mask=mask, other=0.0)
        tile += w2 * tl.load(at + 2 * width, mask=mask, other=0.0)
        tile += w3 * tl.load(at + 3 * width, mask=mask, other=0.0)
    else:
        tile = tl.load(w_ptr + row * n_paths * nc + col, mask=mask, other=0.0)
    return tile


@triton.jit
def _coupling_tile(coupling_ptr, a, offs_m, offs_b, n_y, d_out):
    """coupling[a, m, b] as a [nY, Dout] tile (zero padded)."""
    mask = (offs_m < n_y)[:, None] & (offs_b < d_out)[None, :]
    return tl.load(coupling_ptr + (a * n_y + offs_m[:, None]) * d_out + offs_b[None, :],
                   mask=mask, other=0.0)


@triton.jit
def _t_tile(coupling_ptr, x_ptr, ye, s, ok, offs_m, offs_b, offs_c, cm, d_in, n_y, d_out, nc,
            DOUT_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """T[b, c] = sum_a K_a[e, b] x[s, a, c] of one edge (y row ye); the coupling tiles (shared
    by every program) are re-read from cache."""
    t = tl.zeros((DOUT_P, BLOCK_C), dtype=ye.dtype)
    for a in range(0, d_in):
        ca = _coupling_tile(coupling_ptr, a, offs_m, offs_b, n_y, d_out)
        ka = tl.sum(ca * ye[:, None], axis=0)
        xa = tl.load(x_ptr + (s * d_in + a) * nc + offs_c, mask=cm & ok, other=0.0)
        t += ka[:, None] * xa[None, :]
    return t


@triton.jit(do_not_specialize=_SIZES)
def _tp_rows_kernel(out_ptr, x_ptr, y_ptr, w_ptr, d_ptr, coeffs_ptr, step_ptr, coupling_ptr,
                    out_path_ptr, senders_ptr, by_receiver_ptr, ptr_ptr, w_row_ptr, num_edges,
                    n_x, n_rows_w, nc, d_in, n_y, d_out, n_paths, intervals,
                    SPLINE: tl.constexpr, ROWS: tl.constexpr, NY_P: tl.constexpr,
                    DOUT_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[r, b, c] = sum over row r's edges of w[row_e, path(b), c] sum_a K_a[e, b]
    x[s_e, a, c], K_a[e, b] = sum_m coupling[a, m, b] y[e, m], row_e = w_row[e] (ROWS) or e."""
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs_c < nc
    offs_b = tl.arange(0, DOUT_P).to(tl.int64)
    bm = offs_b < d_out
    offs_m = tl.arange(0, NY_P).to(tl.int64)
    ym = offs_m < n_y
    m2 = bm[:, None] & cm[None, :]
    path = tl.load(out_path_ptr + offs_b, mask=bm, other=0)
    lo = tl.load(ptr_ptr + row)
    hi = tl.load(ptr_ptr + row + 1)
    acc = tl.zeros((DOUT_P, BLOCK_C), dtype=out_ptr.dtype.element_ty)
    for k in range(lo, hi):
        e = tl.load(by_receiver_ptr + k)
        e_ok = (e >= 0) & (e < num_edges)
        e = tl.where(e_ok, e, 0)
        s = tl.load(senders_ptr + e)
        ok = e_ok & (s >= 0) & (s < n_x)
        s = tl.where(ok, s, 0)
        wrow, ok = _weight_row(w_row_ptr, e, ok, n_rows_w, ROWS)
        # the edge's weights and y read once
        ye = tl.load(y_ptr + e * n_y + offs_m, mask=ym & ok, other=0.0)
        t = _t_tile(coupling_ptr, x_ptr, ye, s, ok, offs_m, offs_b, offs_c, cm, d_in, n_y, d_out,
                    nc, DOUT_P, BLOCK_C)
        acc += t * _edge_weights(w_ptr, d_ptr, coeffs_ptr, step_ptr, e, wrow, ok, path, offs_c,
                                 m2, n_paths, nc, intervals, SPLINE, 0)
    tl.store(out_ptr + (row * d_out + offs_b[:, None]) * nc + offs_c[None, :], acc, mask=m2)


@triton.jit(do_not_specialize=_SIZES)
def _tp_sender_kernel(gx_ptr, g_ptr, y_ptr, w_ptr, d_ptr, coeffs_ptr, step_ptr, coupling_ptr,
                      out_path_ptr, receivers_ptr, by_sender_ptr, sender_ptr_ptr, w_row_ptr,
                      num_edges, n_g, n_rows_w, nc, d_in, n_y, d_out, n_paths, intervals,
                      SPLINE: tl.constexpr, ROWS: tl.constexpr, NY_P: tl.constexpr,
                      DOUT_P: tl.constexpr, DIN_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """gx[s, a, c] = sum over sender s's edges of sum_b K_a[e, b] w[row_e, path(b), c]
    g[r_e, b, c]."""
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs_c < nc
    offs_b = tl.arange(0, DOUT_P).to(tl.int64)
    bm = offs_b < d_out
    offs_m = tl.arange(0, NY_P).to(tl.int64)
    ym = offs_m < n_y
    m2 = bm[:, None] & cm[None, :]
    path = tl.load(out_path_ptr + offs_b, mask=bm, other=0)
    lo = tl.load(sender_ptr_ptr + row)
    hi = tl.load(sender_ptr_ptr + row + 1)
    rows_a = tl.arange(0, DIN_P).to(tl.int64)
    acc = tl.zeros((DIN_P, BLOCK_C), dtype=gx_ptr.dtype.element_ty)
    for k in range(lo, hi):
        e = tl.load(by_sender_ptr + k)
        e_ok = (e >= 0) & (e < num_edges)
        e = tl.where(e_ok, e, 0)
        r = tl.load(receivers_ptr + e)
        ok = e_ok & (r >= 0) & (r < n_g)
        r = tl.where(ok, r, 0)
        wrow, ok = _weight_row(w_row_ptr, e, ok, n_rows_w, ROWS)
        ye = tl.load(y_ptr + e * n_y + offs_m, mask=ym & ok, other=0.0)
        gr = tl.load(g_ptr + (r * d_out + offs_b[:, None]) * nc + offs_c[None, :],
                     mask=m2 & ok, other=0.0)
        gw = gr * _edge_weights(w_ptr, d_ptr, coeffs_ptr, step_ptr, e, wrow, ok, path, offs_c,
                                m2, n_paths, nc, intervals, SPLINE, 0)
        for a in range(0, d_in):
            ca = _coupling_tile(coupling_ptr, a, offs_m, offs_b, n_y, d_out)
            ka = tl.sum(ca * ye[:, None], axis=0)
            part = tl.sum(ka[:, None] * gw, axis=0)
            acc += tl.where((rows_a == a)[:, None], part[None, :], 0.0)
    tl.store(gx_ptr + (row * d_in + rows_a[:, None]) * nc + offs_c[None, :], acc,
             mask=(rows_a < d_in)[:, None] & cm[None, :])


@triton.jit(do_not_specialize=_SIZES)
def _tp_edge_kernel(gy_ptr, gw_ptr, gd_ptr, g_ptr, x_ptr, y_ptr, w_ptr, d_ptr, coeffs_ptr,
                    step_ptr, coupling_ptr, out_path_ptr, senders_ptr, receivers_ptr, w_row_ptr,
                    partner_ptr, num_edges, n_x, n_g, n_rows_w, nc, d_in, n_y, d_out, n_paths,
                    intervals, SPLINE: tl.constexpr, ROWS: tl.constexpr, NEED_Y: tl.constexpr,
                    NEED_W: tl.constexpr, NEED_D: tl.constexpr, NY_P: tl.constexpr,
                    DOUT_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per edge e (one program): gy[e, m] = sum_{a, b} coupling[a, m, b] H[a, b] with
    H[a, b] = sum_c x[s, a, c] w[i, path(b), c] g[r, b, c] (i = w_row[e] with ROWS, else e);
    gw[i, p, c] = sum over the b of path p of T[b, c] g[r, b, c], T[b, c] = sum_a K_a[e, b]
    x[s, a, c]; gd[e] = that dotted with the table's slope (SPLINE). A row shared with a
    partner edge is stored by the edge of lower index, which adds the partner's T g: one
    writer per row, no atomics."""
    e = tl.program_id(0).to(tl.int64)
    s = tl.load(senders_ptr + e)
    r = tl.load(receivers_ptr + e)
    ok = (s >= 0) & (s < n_x) & (r >= 0) & (r < n_g)
    s = tl.where(ok, s, 0)
    r = tl.where(ok, r, 0)
    wrow, ok = _weight_row(w_row_ptr, e, ok, n_rows_w, ROWS)
    offs_b = tl.arange(0, DOUT_P).to(tl.int64)
    bm = offs_b < d_out
    offs_m = tl.arange(0, NY_P).to(tl.int64)
    ym = offs_m < n_y
    path = tl.load(out_path_ptr + offs_b, mask=bm, other=0)
    ye = tl.load(y_ptr + e * n_y + offs_m, mask=ym & ok, other=0.0)
    if ROWS and NEED_W:
        pe = tl.load(partner_ptr + e)
        paired = (pe >= 0) & (pe < num_edges)
        # the edge of lower index (a partner beyond the edges counts as none) writes the row,
        # when in range, even if its own term is void
        _, writes = _weight_row(w_row_ptr, e, (pe < 0) | (e < pe), n_rows_w, ROWS)
        pe = tl.where(paired, pe, 0)
        ps = tl.load(senders_ptr + pe)
        pr = tl.load(receivers_ptr + pe)
        # only the writer reads its partner's edge
        paired = writes & paired & (ps >= 0) & (ps < n_x) & (pr >= 0) & (pr < n_g)
        ps = tl.where(paired, ps, 0)
        pr = tl.where(paired, pr, 0)
        yp = tl.load(y_ptr + pe * n_y + offs_m, mask=ym & paired, other=0.0)
    gy = tl.zeros((NY_P,), dtype=gy_ptr.dtype.element_ty)
    gd = tl.zeros((BLOCK_C,), dtype=gy_ptr.dtype.element_ty)
    for c0 in range(0, nc, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cm = offs_c < nc
        m2 = bm[:, None] & cm[None, :]
        gr = tl.load(g_ptr + (r * d_out + offs_b[:, None]) * nc + offs_c[None, :],
                     mask=m2 & ok, other=0.0)
        if NEED_Y:
            gw_tile = gr * _edge_weights(w_ptr, d_ptr, coeffs_ptr, step_ptr, e, wrow, ok, path,
                                         offs_c, m2, n_paths, nc, intervals, SPLINE, 0)
        t = tl.zeros((DOUT_P, BLOCK_C), dtype=gy_ptr.dtype.element_ty)
        for a in range(0, d_in):
            ca = _coupling_tile(coupling_ptr, a, offs_m, offs_b, n_y, d_out)
            xa = tl.load(x_ptr + (s * d_in + a) * nc + offs_c, mask=cm & ok, other=0.0)
            if NEED_Y:
                h = tl.sum(gw_tile * xa[None, :], axis=1)
                gy += tl.sum(ca * h[None, :], axis=1)
            if NEED_W or NEED_D:
                ka = tl.sum(ca * ye[:, None], axis=0)
                t += ka[:, None] * xa[None, :]
        if NEED_W or NEED_D:
            tg = t * gr
            if NEED_W:
                wm = cm
                if ROWS:
                    wm = cm & writes
                    if paired:  # uniform per program: the other edges skip the partner's work
                        gp = tl.load(g_ptr + (pr * d_out + offs_b[:, None]) * nc
                                     + offs_c[None, :], mask=m2, other=0.0)
                        tg += gp * _t_tile(coupling_ptr, x_ptr, yp, ps, paired, offs_m, offs_b,
                                           offs_c, cm, d_in, n_y, d_out, nc, DOUT_P, BLOCK_C)
                for p in range(0, n_paths):
                    part = tl.sum(tl.where((path == p)[:, None], tg, 0.0), axis=0)
                    tl.store(gw_ptr + (wrow * n_paths + p) * nc + offs_c, part, mask=wm)
            if NEED_D:
                slope = _edge_weights(w_ptr, d_ptr, coeffs_ptr, step_ptr, e, wrow, ok, path,
                                      offs_c, m2, n_paths, nc, intervals, SPLINE, 1)
                gd += tl.sum(tg * slope, axis=0)
    if NEED_Y:
        tl.store(gy_ptr + e * n_y + offs_m, gy, mask=ym)
    if NEED_D:
        tl.store(gd_ptr + e, tl.sum(gd, axis=0))


def _blocks(d_out: int, nc: int, tile: int | None = None) -> tuple[int, int]:
    """(Dout padded, channels per program): a [Dout, channels] tile of at most ``tile``
    elements (TILE, read at the call)."""
    tile = TILE if tile is None else tile
    dout_p = triton.next_power_of_2(max(d_out, 1))
    return dout_p, max(1, min(triton.next_power_of_2(max(nc, 1)), tile // dout_p))


class _Table:
    """The weights' source: exact w [E, P, C] (or [R, P, C] read by row, ``w_row``, with each
    edge's ``w_partner``), or a cubic table (coeffs, step) read in-kernel."""

    def __init__(self, like, w=None, distances=None, coeffs=None, step=1.0, w_row=None,
                 w_partner=None):
        self.spline = coeffs is not None
        self.rows = w_row is not None and w_row.shape[0] > 0
        if self.rows:
            self.w_row = _c(w_row)
            # no partners given: every row has one reader
            self.partner = _c(w_partner) if w_partner.shape[0] else torch.full_like(self.w_row, -1)
        if self.spline:
            self.w = like.new_zeros(1)
            self.d, self.coeffs = _c(distances), _c(coeffs)
            self.step = constants((step,), like.dtype, like.device)
            self.intervals = coeffs.shape[0]
            self.n_paths = coeffs.shape[2] // like.shape[2]
        else:
            self.w = _c(w)
            self.d = self.coeffs = self.step = like.new_zeros(1)
            self.intervals = 1
            self.n_paths = w.shape[1]

    def args(self):
        return self.w, self.d, self.coeffs, self.step

    def row_args(self, index):
        """(w_row, w_partner) for the kernels; without rows ``index``, an int64 tensor of the
        launch that is not read (an empty tensor has no pointer to pass)."""
        return (self.w_row, self.partner) if self.rows else (index, index)


def _plan(coupling, out_path, like):
    return _c(coupling).to(like.dtype), _c(out_path)


def _conv(x, y, table, senders, by_receiver, receiver_ptr, coupling, out_path):
    n_rows, nc = receiver_ptr.shape[0] - 1, x.shape[2]
    d_in, n_y, d_out = coupling.shape
    out = x.new_empty(n_rows, d_out, nc)
    if out.numel() == 0:
        return out
    if y.shape[0] == 0:
        return out.zero_()
    dout_p, block_c = _blocks(d_out, nc)
    c, path = _plan(coupling, out_path, x)
    _tp_rows_kernel[(n_rows, triton.cdiv(nc, block_c))](
        out, _c(x), _c(y), *table.args(), c, path, _c(senders), _c(by_receiver),
        _c(receiver_ptr), table.row_args(path)[0], y.shape[0], x.shape[0], table.w.shape[0],
        nc, d_in, n_y, d_out, table.n_paths, table.intervals, SPLINE=table.spline,
        ROWS=table.rows, NY_P=triton.next_power_of_2(n_y), DOUT_P=dout_p, BLOCK_C=block_c,
        num_warps=TP_WARPS)
    return out


def _sender_sum(g, y, table, receivers, by_sender, sender_ptr, coupling, out_path):
    n_rows, nc = sender_ptr.shape[0] - 1, g.shape[2]
    d_in, n_y, d_out = coupling.shape
    out = g.new_empty(n_rows, d_in, nc)
    if out.numel() == 0:
        return out
    if y.shape[0] == 0:
        return out.zero_()
    dout_p, block_c = _blocks(d_out, nc)
    c, path = _plan(coupling, out_path, g)
    _tp_sender_kernel[(n_rows, triton.cdiv(nc, block_c))](
        out, _c(g), _c(y), *table.args(), c, path, _c(receivers), _c(by_sender),
        _c(sender_ptr), table.row_args(path)[0], y.shape[0], g.shape[0], table.w.shape[0], nc,
        d_in, n_y, d_out, table.n_paths, table.intervals, SPLINE=table.spline, ROWS=table.rows,
        NY_P=triton.next_power_of_2(n_y), DOUT_P=dout_p, DIN_P=triton.next_power_of_2(d_in),
        BLOCK_C=block_c, num_warps=TP_WARPS)
    return out


def _edge_grads(g, x, y, table, senders, receivers, coupling, out_path, need_y, need_w,
                need_d):
    """(gy [E, nY], gw [rows of w, P, C], gd [E]), each an empty [0] unless asked for."""
    num_edges, nc = y.shape[0], g.shape[2]
    d_in, n_y, d_out = coupling.shape
    # distinct empty tensors: a custom op's outputs must not alias one another; zeros: a row
    # no edge writes (shared rows read by no edge, invalid edges) has a zero gradient
    gy = g.new_zeros(y.shape) if need_y else g.new_zeros(0)
    gw = g.new_zeros(table.w.shape[0], table.n_paths, nc) if need_w else g.new_zeros(0)
    gd = g.new_zeros(num_edges) if need_d else g.new_zeros(0)
    if not (need_y or need_w or need_d) or num_edges == 0:
        return gy, gw, gd
    dout_p, block_c = _blocks(d_out, nc, EDGE_TILE)
    c, path = _plan(coupling, out_path, g)
    _tp_edge_kernel[(num_edges,)](
        gy if need_y else g, gw if need_w else g, gd if need_d else g, _c(g), _c(x), _c(y),
        *table.args(), c, path, _c(senders), _c(receivers), *table.row_args(path), num_edges,
        x.shape[0], g.shape[0], table.w.shape[0], nc, d_in, n_y, d_out, table.n_paths,
        table.intervals, SPLINE=table.spline, ROWS=table.rows, NEED_Y=bool(need_y),
        NEED_W=bool(need_w), NEED_D=bool(need_d),
        NY_P=triton.next_power_of_2(n_y), DOUT_P=dout_p, BLOCK_C=block_c, num_warps=TP_WARPS)
    return gy, gw, gd


def tp_conv(x, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender, sender_ptr,
            w_row, w_partner, coupling, out_path):
    """Launcher: see reference.py."""
    return _conv(x, y, _Table(x, w=w, w_row=w_row, w_partner=w_partner), senders, by_receiver,
                 receiver_ptr, coupling, out_path)


def tp_conv_sender(g, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender,
                   sender_ptr, w_row, w_partner, coupling, out_path):
    """Launcher: see reference.py (one program per sender row and block of channels)."""
    return _sender_sum(g, y, _Table(g, w=w, w_row=w_row, w_partner=w_partner), receivers,
                       by_sender, sender_ptr, coupling, out_path)


def tp_conv_vjp(g, x, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender,
                sender_ptr, w_row, w_partner, coupling, out_path, need_x, need_y, need_w):
    """Launcher: see reference.py (the x-gradient by sender rows, y and w per edge; a shared
    row's w-gradient stored by one of its two edges)."""
    table = _Table(g, w=w, w_row=w_row, w_partner=w_partner)
    gx = _sender_sum(g, y, table, receivers, by_sender, sender_ptr, coupling, out_path) \
        if need_x else g.new_zeros(0)
    gy, gw, _ = _edge_grads(g, x, y, table, senders, receivers, coupling, out_path, need_y,
                            need_w, False)
    return gx, gy, gw


def tp_conv_spline(x, y, distances, coeffs, step, senders, receivers, by_receiver,
                   receiver_ptr, by_sender, sender_ptr, coupling, out_path):
    """Launcher: see reference.py (the weights read from the table inside the edge loop)."""
    table = _Table(x, distances=distances, coeffs=coeffs, step=step)
    return _conv(x, y, table, senders, by_receiver, receiver_ptr, coupling, out_path)


def tp_conv_spline_vjp(g, x, y, distances, coeffs, step, senders, receivers, by_receiver,
                       receiver_ptr, by_sender, sender_ptr, coupling, out_path, need_x, need_y,
                       need_d):
    """Launcher: see reference.py."""
    table = _Table(g, distances=distances, coeffs=coeffs, step=step)
    gx = _sender_sum(g, y, table, receivers, by_sender, sender_ptr, coupling, out_path) \
        if need_x else g.new_zeros(0)
    gy, _, gd = _edge_grads(g, x, y, table, senders, receivers, coupling, out_path, need_y,
                            False, need_d)
    return gx, gy, gd


# ---------------------------------------------------------------- symmetric contraction
@triton.jit
def _factor(x_ptr, v_ptr, n, t, dim, nc, offs_c, cm, TANGENT: tl.constexpr):
    """(x[n, t, c], v[n, t, c]) of one tuple entry: (1, 0) for an unused entry (t = -1)."""
    used = t >= 0
    at = (n * dim + tl.where(used, t, 0)) * nc + offs_c
    f = tl.where(used, tl.load(x_ptr + at, mask=cm & used, other=0.0), 1.0)
    dv = f * 0.0
    if TANGENT:
        dv = tl.load(v_ptr + at, mask=cm & used, other=0.0)
    return f, dv


@triton.jit
def _tuple(tuples_ptr, k):
    return (tl.load(tuples_ptr + k * 3), tl.load(tuples_ptr + k * 3 + 1),
            tl.load(tuples_ptr + k * 3 + 2))


@triton.jit(do_not_specialize=_SIZES)
def _symc_apply_kernel(out_ptr, x_ptr, v_ptr, elements_ptr, weights_ptr, tuples_ptr, dim, n_k,
                       n_m, nc, n_z, DIRECTIONAL: tl.constexpr, M_P: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """out[n, m, c] = sum_k weights[z_n, k, m, c] mono_k[n, c] (DIRECTIONAL: the monomial's
    derivative along v); one program per (atom, block of channels)."""
    n_k = n_k.to(tl.int64)  # the tuple loop's index in 64 bits (k * 3 offsets)
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs_c < nc
    offs_m = tl.arange(0, M_P).to(tl.int64)
    m2 = (offs_m < n_m)[:, None] & cm[None, :]
    z = tl.load(elements_ptr + n)
    ok = (z >= 0) & (z < n_z)
    z = tl.where(ok, z, 0)
    acc = tl.zeros((M_P, BLOCK_C), dtype=out_ptr.dtype.element_ty)
    for k in range(0, n_k):
        t0, t1, t2 = _tuple(tuples_ptr, k)
        f0, v0 = _factor(x_ptr, v_ptr, n, t0, dim, nc, offs_c, cm, DIRECTIONAL)
        f1, v1 = _factor(x_ptr, v_ptr, n, t1, dim, nc, offs_c, cm, DIRECTIONAL)
        f2, v2 = _factor(x_ptr, v_ptr, n, t2, dim, nc, offs_c, cm, DIRECTIONAL)
        if DIRECTIONAL:
            mono = v0 * f1 * f2 + f0 * v1 * f2 + f0 * f1 * v2
        else:
            mono = f0 * f1 * f2
        wk = tl.load(weights_ptr + ((z * n_k + k) * n_m + offs_m[:, None]) * nc + offs_c[None, :],
                     mask=m2 & ok, other=0.0)
        acc += wk * mono[None, :]
    tl.store(out_ptr + (n * n_m + offs_m[:, None]) * nc + offs_c[None, :], acc, mask=m2)


@triton.jit(do_not_specialize=_SIZES)
def _symc_grad_x_kernel(out_ptr, g_ptr, x_ptr, v_ptr, elements_ptr, weights_ptr, tuples_ptr,
                        dim, n_k, n_m, nc, n_z, SECOND: tl.constexpr, D_P: tl.constexpr,
                        M_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[n, d, c] = sum_k G_k[c] d(mono_k)/dx[n, d, c] (SECOND: of the monomial's derivative
    along v), G_k = sum_m g[n, m, c] weights[z_n, k, m, c]; one program per (atom, channels)."""
    n_k = n_k.to(tl.int64)  # the tuple loop's index in 64 bits (k * 3 offsets)
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs_c < nc
    offs_m = tl.arange(0, M_P).to(tl.int64)
    m2 = (offs_m < n_m)[:, None] & cm[None, :]
    rows = tl.arange(0, D_P).to(tl.int64)
    z = tl.load(elements_ptr + n)
    ok = (z >= 0) & (z < n_z)
    z = tl.where(ok, z, 0)
    gn = tl.load(g_ptr + (n * n_m + offs_m[:, None]) * nc + offs_c[None, :], mask=m2 & ok,
                 other=0.0)
    acc = tl.zeros((D_P, BLOCK_C), dtype=out_ptr.dtype.element_ty)
    for k in range(0, n_k):
        wk = tl.load(weights_ptr + ((z * n_k + k) * n_m + offs_m[:, None]) * nc + offs_c[None, :],
                     mask=m2 & ok, other=0.0)
        big_g = tl.sum(gn * wk, axis=0)
        t0, t1, t2 = _tuple(tuples_ptr, k)
        f0, v0 = _factor(x_ptr, v_ptr, n, t0, dim, nc, offs_c, cm, SECOND)
        f1, v1 = _factor(x_ptr, v_ptr, n, t1, dim, nc, offs_c, cm, SECOND)
        f2, v2 = _factor(x_ptr, v_ptr, n, t2, dim, nc, offs_c, cm, SECOND)
        if SECOND:
            o0 = v1 * f2 + f1 * v2
            o1 = v0 * f2 + f0 * v2
            o2 = v0 * f1 + f0 * v1
        else:
            o0 = f1 * f2
            o1 = f0 * f2
            o2 = f0 * f1
        # an unused entry (t = -1) matches no row
        acc += tl.where((rows == t0)[:, None], (big_g * o0)[None, :], 0.0)
        acc += tl.where((rows == t1)[:, None], (big_g * o1)[None, :], 0.0)
        acc += tl.where((rows == t2)[:, None], (big_g * o2)[None, :], 0.0)
    tl.store(out_ptr + (n * dim + rows[:, None]) * nc + offs_c[None, :], acc,
             mask=(rows < dim)[:, None] & cm[None, :])


@triton.jit(do_not_specialize=_SIZES)
def _symc_collect_kernel(out_ptr, g_ptr, x_ptr, v_ptr, order_ptr, elem_ptr_ptr, tuples_ptr, dim,
                         n_k, n_m, nc, DIRECTIONAL: tl.constexpr, M_P: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[z, k, m, c] = sum over the atoms n of element z of g[n, m, c] mono_k[n, c]
    (DIRECTIONAL: its derivative along v); one program per (element, tuple, block of
    channels), BLOCK_N atoms a step, columns (m, c) flattened."""
    zk = tl.program_id(0).to(tl.int64)
    z = zk // n_k
    k = zk % n_k
    cols = tl.arange(0, M_P * BLOCK_C)
    m = (cols // BLOCK_C).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + (cols % BLOCK_C)
    colm = (m < n_m) & (offs_c < nc)
    lo = tl.load(elem_ptr_ptr + z)
    hi = tl.load(elem_ptr_ptr + z + 1)
    t0, t1, t2 = _tuple(tuples_ptr, k)
    acc = tl.zeros((BLOCK_N, M_P * BLOCK_C), dtype=out_ptr.dtype.element_ty)
    for i0 in range(lo, hi, BLOCK_N):
        idx = i0 + tl.arange(0, BLOCK_N)
        im = idx < hi
        n = tl.load(order_ptr + idx, mask=im, other=0)[:, None]
        mask = im[:, None] & colm[None, :]
        c = offs_c[None, :]
        f0, v0 = _factor(x_ptr, v_ptr, n, t0, dim, nc, c, mask, DIRECTIONAL)
        f1, v1 = _factor(x_ptr, v_ptr, n, t1, dim, nc, c, mask, DIRECTIONAL)
        f2, v2 = _factor(x_ptr, v_ptr, n, t2, dim, nc, c, mask, DIRECTIONAL)
        if DIRECTIONAL:
            mono = v0 * f1 * f2 + f0 * v1 * f2 + f0 * f1 * v2
        else:
            mono = f0 * f1 * f2
        gt = tl.load(g_ptr + (n * n_m + m[None, :]) * nc + c, mask=mask, other=0.0)
        acc += gt * mono
    tl.store(out_ptr + ((z * n_k + k) * n_m + m) * nc + offs_c, tl.sum(acc, axis=0), mask=colm)


def _symc_blocks(rows: int, nc: int, tile: int = SYMC_TILE) -> tuple[int, int]:
    """(rows padded, channels per program): a [rows, channels] tile of at most ``tile``."""
    rows_p = triton.next_power_of_2(max(rows, 1))
    return rows_p, max(1, min(triton.next_power_of_2(max(nc, 1)), tile // rows_p))


def _symc_apply(x, v, elements, weights, tuples, directional):
    n, dim, nc = x.shape
    n_z, n_k, n_m, _ = weights.shape
    out = x.new_zeros(n, n_m, nc)
    if out.numel() == 0 or n_k == 0:
        return out
    m_p, block_c = _symc_blocks(n_m, nc, APPLY_TILE)
    _symc_apply_kernel[(n, triton.cdiv(nc, block_c))](
        out, _c(x), _c(v), _c(elements), _c(weights), _c(tuples), dim, n_k, n_m, nc, n_z,
        DIRECTIONAL=directional, M_P=m_p, BLOCK_C=block_c)
    return out


def _symc_grad_x(g, x, v, elements, weights, tuples, second):
    n, dim, nc = x.shape
    n_z, n_k, n_m, _ = weights.shape
    out = torch.zeros_like(x)
    if out.numel() == 0 or n_k == 0:
        return out
    d_p, block_c = _symc_blocks(max(dim, n_m), nc)
    _symc_grad_x_kernel[(n, triton.cdiv(nc, block_c))](
        out, _c(g), _c(x), _c(v), _c(elements), _c(weights), _c(tuples), dim, n_k, n_m, nc, n_z,
        SECOND=second, D_P=triton.next_power_of_2(dim), M_P=triton.next_power_of_2(n_m),
        BLOCK_C=block_c)
    return out


def _symc_collect(g, x, v, elements, weights, tuples, directional):
    """The coefficient gradient: atoms sorted by element on the device (no host copy), their
    segments found by a search over the sorted elements; out-of-range elements fall outside
    every segment."""
    n, dim, nc = x.shape
    n_z, n_k, n_m, _ = weights.shape
    out = torch.zeros_like(weights)
    if out.numel() == 0 or n == 0:
        return out
    keys, order = torch.sort(_c(elements), stable=True)
    bounds = torch.arange(n_z + 1, dtype=keys.dtype, device=keys.device)
    elem_ptr = torch.searchsorted(keys, bounds)
    m_p, block_c = _symc_blocks(n_m, nc, SYMC_TILE // BLOCK_N)
    _symc_collect_kernel[(n_z * n_k, triton.cdiv(nc, block_c))](
        out, _c(g), _c(x), _c(v), order, elem_ptr, _c(tuples), dim, n_k, n_m, nc,
        DIRECTIONAL=directional, M_P=m_p, BLOCK_C=block_c, BLOCK_N=BLOCK_N)
    return out


def symmetric_contraction(x, elements, weights, tuples):
    """Launcher: see reference.py."""
    return _symc_apply(x, x, elements, weights, tuples, False)


def symmetric_contraction_vjp(g, x, elements, weights, tuples, need_x, need_weights):
    """Launcher: see reference.py."""
    gx = _symc_grad_x(g, x, x, elements, weights, tuples, False) if need_x else x.new_zeros(0)
    gw = _symc_collect(g, x, x, elements, weights, tuples, False) if need_weights \
        else x.new_zeros(0)
    return gx, gw


def symmetric_contraction_vjp_vjp(v, g, x, elements, weights, tuples, need_g, need_x,
                                  need_weights):
    """Launcher: see reference.py."""
    gg = _symc_apply(x, v, elements, weights, tuples, True) if need_g else x.new_zeros(0)
    gx = _symc_grad_x(g, x, v, elements, weights, tuples, True) if need_x else x.new_zeros(0)
    gw = _symc_collect(g, x, v, elements, weights, tuples, True) if need_weights \
        else x.new_zeros(0)
    return gg, gx, gw


# ---------------------------------------------------------------- ahead-of-time compilation
def _sig(names: str, kinds: dict[str, str]) -> dict[str, str]:
    """Signature from space-separated names: *_ptr float pointers unless listed in ``kinds``,
    other names i32 sizes unless listed."""
    return {n: kinds.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in names.split()}


_IDX = {n: "*i64" for n in ("out_path_ptr", "senders_ptr", "receivers_ptr", "by_receiver_ptr",
                            "by_sender_ptr", "ptr_ptr", "sender_ptr_ptr", "w_row_ptr",
                            "partner_ptr", "tuples_ptr", "elements_ptr", "order_ptr",
                            "elem_ptr_ptr")}
_TP = {"NY_P": 16, "DOUT_P": 64, "BLOCK_C": 16}  # lmax = 3, Dout <= 64 (MACE's l <= 3 outputs)
_CONST = {n: "constexpr" for n in ("LMAX", "MODE", "BLOCK_E", "SPLINE", "ROWS", "NY_P", "DOUT_P",
                                   "BLOCK_C", "NEED_Y", "NEED_W", "NEED_D", "DIRECTIONAL",
                                   "SECOND", "D_P", "M_P", "BLOCK_N", "DIN_P")}

AOT_SPECS = [
    *({"kernel": _sh_kernel, "name": f"_sh_kernel[{('Y', 'vjp', 'jvp')[mode]}]",
       "signature": _sig("v_ptr other_ptr out_ptr num_edges LMAX MODE BLOCK_E", _CONST),
       "constexprs": {"LMAX": 3, "MODE": mode, "BLOCK_E": BLOCK_E}} for mode in range(3)),
    # exact weights per edge, per shared row (rows: w_row, w_partner) and tabulated
    *({"kernel": _tp_rows_kernel, "name": f"_tp_rows_kernel[{name}]",
       "signature": _sig("out_ptr x_ptr y_ptr w_ptr d_ptr coeffs_ptr step_ptr coupling_ptr "
                         "out_path_ptr senders_ptr by_receiver_ptr ptr_ptr w_row_ptr num_edges "
                         "n_x n_rows_w nc d_in n_y d_out n_paths intervals SPLINE ROWS NY_P "
                         "DOUT_P BLOCK_C", _IDX | _CONST),
       "constexprs": {"SPLINE": sp, "ROWS": rows, **_TP}}
      for name, sp, rows in (("w", False, False), ("w,rows", False, True),
                             ("spline", True, False))),
    *({"kernel": _tp_sender_kernel, "name": f"_tp_sender_kernel[{name}]",
       "signature": _sig("gx_ptr g_ptr y_ptr w_ptr d_ptr coeffs_ptr step_ptr coupling_ptr "
                         "out_path_ptr receivers_ptr by_sender_ptr sender_ptr_ptr w_row_ptr "
                         "num_edges n_g n_rows_w nc d_in n_y d_out n_paths intervals SPLINE ROWS "
                         "NY_P DOUT_P DIN_P BLOCK_C", _IDX | _CONST),
       "constexprs": {"SPLINE": sp, "ROWS": rows, **_TP, "DIN_P": 4}}
      for name, sp, rows in (("w", False, False), ("w,rows", False, True),
                             ("spline", True, False))),
    *({"kernel": _tp_edge_kernel, "name": f"_tp_edge_kernel[{name}]",
       "signature": _sig("gy_ptr gw_ptr gd_ptr g_ptr x_ptr y_ptr w_ptr d_ptr coeffs_ptr step_ptr "
                         "coupling_ptr out_path_ptr senders_ptr receivers_ptr w_row_ptr "
                         "partner_ptr num_edges n_x n_g n_rows_w nc d_in n_y d_out n_paths "
                         "intervals SPLINE ROWS NEED_Y NEED_W NEED_D NY_P DOUT_P BLOCK_C",
                         _IDX | _CONST),
       "constexprs": {"SPLINE": sp, "ROWS": rows, "NEED_Y": ny, "NEED_W": nw, "NEED_D": nd,
                      **_TP, "BLOCK_C": EDGE_TILE // _TP["DOUT_P"]}}
      for name, sp, rows, ny, nw, nd in (("y,w", False, False, True, True, False),
                                         ("w", False, False, False, True, False),
                                         ("y,w,rows", False, True, True, True, False),
                                         ("w,rows", False, True, False, True, False),
                                         ("spline,y,d", True, False, True, False, True))),
    # M <= 4 outputs per channel (MACE: one irrep block), x of D = 16 components (l <= 3)
    *({"kernel": _symc_apply_kernel, "name": f"_symc_apply_kernel[{'jvp' if dr else 'value'}]",
       "signature": _sig("out_ptr x_ptr v_ptr elements_ptr weights_ptr tuples_ptr dim n_k n_m nc "
                         "n_z DIRECTIONAL M_P BLOCK_C", _IDX | _CONST),
       "constexprs": {"DIRECTIONAL": dr, "M_P": 4, "BLOCK_C": APPLY_TILE // 4}}
      for dr in (False, True)),
    *({"kernel": _symc_grad_x_kernel, "name": f"_symc_grad_x_kernel[{'second' if sc else 'first'}]",
       "signature": _sig("out_ptr g_ptr x_ptr v_ptr elements_ptr weights_ptr tuples_ptr dim n_k "
                         "n_m nc n_z SECOND D_P M_P BLOCK_C", _IDX | _CONST),
       "constexprs": {"SECOND": sc, "D_P": 16, "M_P": 4, "BLOCK_C": SYMC_TILE // 16}}
      for sc in (False, True)),
    *({"kernel": _symc_collect_kernel,
       "name": f"_symc_collect_kernel[{'jvp' if dr else 'value'}]",
       "signature": _sig("out_ptr g_ptr x_ptr v_ptr order_ptr elem_ptr_ptr tuples_ptr dim n_k n_m "
                         "nc DIRECTIONAL M_P BLOCK_C BLOCK_N", _IDX | _CONST),
       "constexprs": {"DIRECTIONAL": dr, "M_P": 4, "BLOCK_C": SYMC_TILE // BLOCK_N // 4,
                      "BLOCK_N": BLOCK_N}}
      for dr in (False, True)),
]
for _spec in AOT_SPECS:  # every kernel runs in the dtype of its inputs: float32 or float64
    _spec["dtypes"] = ("fp32", "fp64")
    if _spec["kernel"] in (_tp_rows_kernel, _tp_sender_kernel, _tp_edge_kernel):
        _spec["options"] = {"num_warps": TP_WARPS}
