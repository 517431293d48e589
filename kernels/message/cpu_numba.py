"""Message passing on CPU with numba: receiver-row segment sums, pair kernels, spline tables.

Every reduction has one writer per output value and a fixed order of additions, so results are
bitwise deterministic without atomics: ``gms`` walks the CSR rows of a full list sorted by
receiver (one row per ``prange`` task); cfconv's ``_pair_scatter`` writes both ends of a pair
and splits the features between tasks instead. cfconv runs SchNet's filter network as BLAS GEMMs
on blocks of unordered pairs (``dense.blocked_*``: a scalar numba loop loses ~10x to BLAS at
F = 128), with the first layer of float32 gaussian filters fused into one band kernel
(cpu_numba_filter.py) and the activation's elementwise terms into single passes
(cpu_numba_activation.py). The spline kernels evaluate a cubic table of W(r) inside the edge
loop, no GEMM; ``spline_conv_positions*`` compute each distance from positions with
sign-symmetric arithmetic, so a pair and its mirror agree bit for bit. Out-of-range neighbour
indices (possible only with value checks off) are skipped, never read. Tuned for F = 64..256 and
30..60 neighbours per atom. Maths: README.md beside this file; measurements: its Tuning table.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

import fastff.kernels.cpu_threads  # noqa: F401  (numba's OpenMP layer first)
from fastff.kernels.message import dense
from fastff.kernels.message.cpu_numba_filter import FusedFilter
from fastff.kernels.neighbors.cpu_numba import _system_index
from fastff.kernels.radial.cpu_numba import radial_orders as _radial

# Features per block of cfconv's filter GEMMs (pairs x F): 1 MiB per [block, F] float32
# temporary, 2048 pairs at F = 128 (larger blocks cost peak memory for little time: Tuning).
BLOCK_FEATURES = 2048 * 128
# Below F = 128 the block grows as (128 / F)^2, up to this factor: a block's fixed cost (~20
# op and kernel launches) stays while its work per pair, ~F (K + F), shrinks (Tuning).
SMALL_F_GROWTH = 4.0


def _pairs_per_block(nf: int) -> int:
    nf = max(nf, 1)
    growth = min(SMALL_F_GROWTH, max(1.0, (128 / nf) ** 2))
    return max(1, int(BLOCK_FEATURES * growth) // nf)


# Edges per block of PaiNN's filter GEMM ([block, 3F] temporaries; 1024..4096 within 5%).
PAINN_BLOCK = 2048


@njit(cache=True, parallel=True)
def _gms_rows(out, h, w, j, ptr, e0, a0, a1):
    """out[a] += sum over edges e of row a inside [e0, e0 + len(w)) of h[j_e] * w[e - e0]."""
    e1 = e0 + w.shape[0]
    n_h = h.shape[0]
    nf = h.shape[1]
    for a in prange(a0, a1 + 1):
        lo = max(ptr[a], e0)
        hi = min(ptr[a + 1], e1)
        for e in range(lo, hi):
            src = j[e]
            if src < 0 or src >= n_h:
                continue
            for f in range(nf):
                out[a, f] += h[src, f] * w[e - e0, f]


@njit(cache=True, parallel=True)
def _ggm(a, b, i, j, e0, out):
    nf = a.shape[1]
    for k in prange(out.shape[0]):
        e = e0 + k
        ia, jb = i[e], j[e]
        if ia < 0 or ia >= a.shape[0] or jb < 0 or jb >= b.shape[0]:
            for f in range(nf):
                out[k, f] = 0.0
            continue
        for f in range(nf):
            out[k, f] = a[ia, f] * b[jb, f]


def _np(t: torch.Tensor):
    return t.detach().contiguous().numpy()


def _rows(out, h, w, e0, a0, a1, j, ptr):
    _gms_rows(out.numpy(), _np(h), _np(w), j, ptr, e0, a0, a1)


def gms(h, w, i, j, ptr, rev):
    """Launcher: out[a] = sum_{e in row a} h[j_e] * w_e, [N, F]."""
    out = h.new_zeros(ptr.shape[0] - 1, h.shape[1])
    if w.shape[0]:
        _rows(out, h, w, 0, 0, ptr.shape[0] - 2, _np(j), _np(ptr))
    return out


def ggm(a, b, i, j, ptr, rev):
    """Launcher: out[e] = a[i_e] * b[j_e], [E, F]."""
    out = a.new_empty(i.shape[0], a.shape[1])
    if i.shape[0]:
        _ggm(_np(a), _np(b), _np(i), _np(j), 0, out.numpy())
    return out


# Features per task of _pair_scatter: at least 16 (one 64-byte line of float32), and about one
# task per thread for F = 64..256.
_MIN_FEATURE_CHUNK = 16


@njit(cache=True, parallel=True)
def _pair_scatter(out, h, w, a, b, p0, chunk):
    """out[a_p] += h[b_p] * w_p and out[b_p] += h[a_p] * w_p for the pairs p0..p0+len(w).

    Both ends of a pair are written, so rows have many writers: the tasks split the features
    instead, and each walks every pair of the block in order. Each output value therefore has
    one writer and a fixed order of additions: bitwise deterministic, whatever the threads."""
    nf = w.shape[1]
    n_out, n_h = out.shape[0], h.shape[0]
    for t in prange((nf + chunk - 1) // chunk):
        # unsigned feature bounds: numba then emits no negative-index wraparound in the inner
        # loops, which would otherwise keep them from vectorizing (5-7x slower at F = 64)
        f0 = np.uint64(t * chunk)
        f1 = np.uint64(min(t * chunk + chunk, nf))
        for k in range(w.shape[0]):
            pa, pb = a[p0 + k], b[p0 + k]
            if pa < 0 or pb < 0 or pa >= n_out or pb >= n_out or pa >= n_h or pb >= n_h:
                continue
            for f in range(f0, f1):
                out[pa, f] += h[pb, f] * w[k, f]
            for f in range(f0, f1):
                out[pb, f] += h[pa, f] * w[k, f]


@njit(cache=True, parallel=True)
def _pair_product(g, x, a, b, p0, out):
    """out[k] = g[a_p] * x[b_p] + g[b_p] * x[a_p] for p = p0 + k (0 for out-of-range ends)."""
    nf = out.shape[1]
    n = min(g.shape[0], x.shape[0])
    for k in prange(out.shape[0]):
        pa, pb = a[p0 + k], b[p0 + k]
        if pa < 0 or pb < 0 or pa >= n or pb >= n:
            for f in range(nf):
                out[k, f] = 0.0
            continue
        for f in range(nf):
            out[k, f] = g[pa, f] * x[pb, f] + g[pb, f] * x[pa, f]


def _scatter_fn(pairs):
    a, b = _np(pairs.a), _np(pairs.b)

    def scatter(out, h, w, p0):
        nf = w.shape[1]
        chunk = max(_MIN_FEATURE_CHUNK, -(-nf // numba.get_num_threads()))
        _pair_scatter(out.numpy(), _np(h), _np(w), a, b, p0, chunk)

    return scatter


def _params(w1, b1, w2, b2):
    return w1.detach(), b1.detach(), w2.detach(), b2.detach()


def cfconv(x, d, i, j, ptr, rev, pairs, w1, b1, w2, b2, cutoff, kind, envelope, activation,
           keep_filters, keep_budget):
    """Launcher: (out [N, F], filters): out[a] = sum_{e in row a} x[j_e] (W(d_e) + W(d_rev e))
    / 2, one filter per unordered pair (README.md); filters are the pair filters [P, F] if
    ``keep_filters`` and they fit in ``keep_budget`` bytes, else an empty [0, F]."""
    with torch.no_grad():
        pairs = dense.MirrorPairs(pairs)
        keep = keep_filters and dense.keeps(len(pairs), x.shape[1], x, keep_budget)
        return dense.blocked_forward(
            x.detach().contiguous(), d.detach(), ptr.shape[0] - 1, pairs,
            _params(w1, b1, w2, b2), dense.FilterSettings(cutoff, kind, envelope, activation),
            FusedFilter(activation), _radial, _scatter_fn(pairs), _pairs_per_block(x.shape[1]),
            keep)


def _product_fn(pairs, g, x):
    """product_fn of dense.blocked_vjp: u_p = g[a_p] x[b_p] + g[b_p] x[a_p] for a block."""
    a, b, gc, xc = _np(pairs.a), _np(pairs.b), _np(g), _np(x)

    def product(g_, x_, p0, p1):
        out = torch.empty(p1 - p0, g_.shape[1], dtype=g_.dtype)
        _pair_product(gc, xc, a, b, p0, out.numpy())
        return out

    return product


def cfconv_vjp(g, x, d, i, j, ptr, rev, pairs, filters, w1, b1, w2, b2, cutoff, kind, envelope,
               activation, need_params, need_x, need_d, keep_budget):
    """Launcher: (grad_x, grad_d [E], grad_w1, grad_b1, grad_w2, grad_b2, products) of
    sum <g, out>; the x-gradient reads the forward's pair ``filters`` when they were kept
    ([P, F]). products are every pair's t = u w2 [P, F] if they fit in ``keep_budget`` bytes
    (for cfconv_vjp_vjp), else an empty [0, F]."""
    with torch.no_grad():
        pairs = dense.MirrorPairs(pairs)
        kept = filters.detach() if need_x and filters.shape[0] == len(pairs) else None
        out = dense.blocked_vjp(
            g.detach(), x.detach(), d.detach(), pairs, _params(w1, b1, w2, b2),
            dense.FilterSettings(cutoff, kind, envelope, activation), FusedFilter(activation),
            need_params, need_x, need_d, _radial, _product_fn(pairs, g, x), _scatter_fn(pairs),
            _pairs_per_block(g.shape[1]), kept,
            dense.keeps(len(pairs), g.shape[1], g, keep_budget))
    return dense.params_or_empty(out, d)


def cfconv_vjp_vjp(v, g, x, d, i, j, ptr, rev, pairs, products, w1, b1, w2, b2, cutoff, kind,
                   envelope, activation, need_g, need_x, need_params, need_d):
    """Launcher: (grad_g, grad_x, grad_d [E], grad_w1, grad_b1, grad_w2, grad_b2) of
    sum_e v_e grad_d_e, grad_d = cfconv_vjp(g, x, d, ...)[1]; empty [0] where not asked for.
    Reads the ``products`` t that cfconv_vjp of the same g and x kept ([P, F]), if it did."""
    with torch.no_grad():
        pairs = dense.MirrorPairs(pairs)
        kept = products.detach() if products.shape[0] == len(pairs) else None
        out = dense.blocked_vjp_vjp(
            v.detach(), g.detach(), x.detach(), d.detach(), pairs, _params(w1, b1, w2, b2),
            dense.FilterSettings(cutoff, kind, envelope, activation), FusedFilter(activation),
            need_g, need_x, need_params, need_d, _radial, _product_fn(pairs, g, x),
            _scatter_fn(pairs), _pairs_per_block(g.shape[1]), kept)
    return dense.params_or_empty(out, d)


@njit(cache=True, inline="always")
def _spline_poly(t, order, inv_h):
    """(p0, p1, p2, p3): W^(order) = sum_q p_q c_q at fractional position t (float64)."""
    if order == 0:
        return 1.0, t, t * t, t * t * t
    if order == 1:
        return 0.0, inv_h, 2.0 * t * inv_h, 3.0 * t * t * inv_h
    if order == 2:
        s = inv_h * inv_h
        return 0.0, 0.0, 2.0 * s, 6.0 * t * s
    if order == 3:
        return 0.0, 0.0, 0.0, 6.0 * inv_h * inv_h * inv_h
    return 0.0, 0.0, 0.0, 0.0


@njit(cache=True, inline="always")
def _interval(r, inv_h, nint):
    """The table interval of distance r (clamped to the table)."""
    return min(max(int(r * inv_h), 0), nint - 1)


@njit(cache=True, inline="always")
def _spline_setup(r, inv_h, nint, order, scale, p):
    """Interval k of distance r; writes the weights of W^(order), times ``scale``, into p[0:4]
    (an array of the table's dtype: the feature loops then run in that precision)."""
    k = _interval(r, inv_h, nint)
    p0, p1, p2, p3 = _spline_poly(r * inv_h - k, order, inv_h)
    p[0], p[1], p[2], p[3] = p0 * scale, p1 * scale, p2 * scale, p3 * scale
    return k


# Feature loops: "reassoc" lets LLVM vectorise the per-edge dot products (a fixed order for a
# given build: still bitwise reproducible run to run); "contract" allows FMAs. NaN and inf keep
# their IEEE meaning (no "nnan"/"ninf"), so bad values still show (Tuning: 4.6x).
_FEATURE_MATH = {"reassoc", "contract"}


@njit(cache=True, parallel=True, fastmath=_FEATURE_MATH)
def _spline_conv(x, d, scale, has_scale, coeffs, j, ptr, cutoff, order, out):
    n_x = x.shape[0]
    nf = x.shape[1]
    nint = coeffs.shape[0]
    inv_h = nint / cutoff
    for a in prange(ptr.shape[0] - 1):
        p = np.empty(4, dtype=coeffs.dtype)
        acc = np.zeros(nf, dtype=out.dtype)  # the row's sum stays in cache, then one write
        for e in range(ptr[a], ptr[a + 1]):
            r = d[e]
            src = j[e]
            if not r < cutoff or src < 0 or src >= n_x:
                continue
            k = _spline_setup(r, inv_h, nint, order, scale[e] if has_scale else 1.0, p)
            p0, p1, p2, p3 = p[0], p[1], p[2], p[3]
            c0 = coeffs[k, 0]
            c1 = coeffs[k, 1]
            c2 = coeffs[k, 2]
            c3 = coeffs[k, 3]
            xs = x[src]
            for f in range(nf):
                acc[f] += xs[f] * (p0 * c0[f] + p1 * c1[f] + p2 * c2[f] + p3 * c3[f])
        for f in range(nf):
            out[a, f] += acc[f]


# Edges per prange chunk of _spline_edge_dot: enough work per task to hide scheduling.
_EDGE_CHUNK = 256


@njit(cache=True, parallel=True, fastmath=_FEATURE_MATH)
def _spline_edge_dot(g, x, d, coeffs, i, j, cutoff, order, out):
    nf = x.shape[1]
    nint = coeffs.shape[0]
    inv_h = nint / cutoff
    n_edges = d.shape[0]
    for chunk in prange((n_edges + _EDGE_CHUNK - 1) // _EDGE_CHUNK):
        p = np.empty(4, dtype=coeffs.dtype)
        for e in range(chunk * _EDGE_CHUNK, min((chunk + 1) * _EDGE_CHUNK, n_edges)):
            r = d[e]
            dst, src = i[e], j[e]
            out[e] = 0.0
            if not r < cutoff or src < 0 or src >= x.shape[0] or dst < 0 or dst >= g.shape[0]:
                continue
            if order >= 1:  # the forces' case: W^(n) has no c_0 term, see _partial_dots
                k = _interval(r, inv_h, nint)
                m1, m2, m3 = _partial_dots(g[dst], x[src], coeffs[k])
                out[e] = _combine_dots(r, k, inv_h, order, m1, m2, m3)
                continue
            k = _spline_setup(r, inv_h, nint, order, 1.0, p)
            p0, p1, p2, p3 = p[0], p[1], p[2], p[3]
            acc = p0 - p0
            for f in range(nf):
                w = p0 * coeffs[k, 0, f] + p1 * coeffs[k, 1, f] + p2 * coeffs[k, 2, f] \
                    + p3 * coeffs[k, 3, f]
                acc += g[dst, f] * x[src, f] * w
            out[e] = acc


# spline_conv's backward needs, per edge, W^(n)(d_rev) for dL/dx and W^(n+1)(d) for dL/dd. As two
# passes, each edge's 1 KB table interval (F = 64 float32) is read twice and the feature loops
# do 11 operations per feature; fused, mirrored pairs (bitwise equal distances) read it once,
# and the dot product is taken against the interval's rows (below): 9 operations (Tuning).
@njit(cache=True, inline="always")
def _partial_dots(ga, xs, c):
    """m_q = <ga * xs, c[q]> for q = 1, 2, 3, summed in the table's precision. W^(n+1) =
    sum_q w_q c[q] has w_0 = 0 for every n >= 0, so <ga * xs, W^(n+1)> = sum_q w_q m_q: four
    operations per feature instead of the six of forming W^(n+1), and three independent sums."""
    c1, c2, c3 = c[1], c[2], c[3]
    m1 = m2 = m3 = c1[0] - c1[0]
    for f in range(xs.shape[0]):
        u = ga[f] * xs[f]
        m1 += u * c1[f]
        m2 += u * c2[f]
        m3 += u * c3[f]
    return m1, m2, m3


@njit(cache=True, inline="always")
def _conv_and_partial_dots(gs, xs, ga, c, p, acc):
    """acc += gs * W^(n) (weights p) and _partial_dots(ga, xs, c), in one read of c."""
    p0, p1, p2, p3 = p[0], p[1], p[2], p[3]
    c0, c1, c2, c3 = c[0], c[1], c[2], c[3]
    m1 = m2 = m3 = p0 - p0
    for f in range(acc.shape[0]):
        a1, a2, a3 = c1[f], c2[f], c3[f]
        acc[f] += gs[f] * (p0 * c0[f] + p1 * a1 + p2 * a2 + p3 * a3)
        u = ga[f] * xs[f]
        m1 += u * a1
        m2 += u * a2
        m3 += u * a3
    return m1, m2, m3


@njit(cache=True, inline="always")
def _conv_row(gs, c, p, acc):
    """acc += gs * W^(n) (weights p): the dL/dx half alone."""
    p0, p1, p2, p3 = p[0], p[1], p[2], p[3]
    c0, c1, c2, c3 = c[0], c[1], c[2], c[3]
    for f in range(acc.shape[0]):
        acc[f] += gs[f] * (p0 * c0[f] + p1 * c1[f] + p2 * c2[f] + p3 * c3[f])


@njit(cache=True, inline="always")
def _combine_dots(r, k, inv_h, order, m1, m2, m3):
    """<g * x, W^(order)> from the partial dots m_q (w_0 = 0 for order >= 1)."""
    _, w1, w2, w3 = _spline_poly(r * inv_h - k, order, inv_h)
    return w1 * m1 + w2 * m2 + w3 * m3


@njit(cache=True, parallel=True, fastmath=_FEATURE_MATH)
def _spline_conv_vjp(grad, x, d, d_rev, coeffs, j, ptr, cutoff, order, grad_x, grad_d):
    """grad_x[a] = sum_{e in row a} grad[j_e] W^(n)(d_rev_e);
    grad_d[e] = <grad[a] * x[j_e], W^(n+1)(d_e)>, one writer per row."""
    n_g, n_x = grad.shape[0], x.shape[0]
    nf = grad.shape[1]
    nint = coeffs.shape[0]
    inv_h = nint / cutoff
    for a in prange(ptr.shape[0] - 1):
        p = np.empty(4, dtype=coeffs.dtype)  # weights of W^(n) at d_rev
        acc = np.zeros(nf, dtype=grad_x.dtype)
        ga = grad[min(np.int64(a), n_g - 1)]  # read only when a < n_g (dot_ok)
        for e in range(ptr[a], ptr[a + 1]):
            src = j[e]
            r, r_rev = d[e], d_rev[e]
            conv_ok = r_rev < cutoff and src >= 0 and src < n_g
            dot_ok = r < cutoff and src >= 0 and src < n_x and a < n_g
            grad_d[e] = 0.0
            if conv_ok and dot_ok and r_rev == r:  # the normal case: one interval for both
                k = _spline_setup(r, inv_h, nint, order, 1.0, p)
                m1, m2, m3 = _conv_and_partial_dots(grad[src], x[src], ga, coeffs[k], p, acc)
                grad_d[e] = _combine_dots(r, k, inv_h, order + 1, m1, m2, m3)
                continue
            if conv_ok:
                k = _spline_setup(r_rev, inv_h, nint, order, 1.0, p)
                _conv_row(grad[src], coeffs[k], p, acc)
            if dot_ok:
                k = _interval(r, inv_h, nint)
                m1, m2, m3 = _partial_dots(ga, x[src], coeffs[k])
                grad_d[e] = _combine_dots(r, k, inv_h, order + 1, m1, m2, m3)
        for f in range(nf):
            grad_x[a, f] += acc[f]


def spline_conv(x, d, scale, coeffs, i, j, ptr, rev, cutoff, order):
    """Launcher: out[a] = sum_{e in row a} scale_e x[j_e] W^(order)(d_e), [N, F]."""
    out = x.new_zeros(ptr.shape[0] - 1, x.shape[1])
    if d.shape[0]:
        sc = _np(scale) if scale is not None else np.zeros(1, dtype=_np(d).dtype)
        _spline_conv(_np(x), _np(d), sc, scale is not None, _np(coeffs), _np(j), _np(ptr),
                     float(cutoff), int(order), out.numpy())
    return out


def spline_edge_dot(g, x, d, coeffs, i, j, ptr, rev, cutoff, order):
    """Launcher: out[e] = <g[i_e] * x[j_e], W^(order)(d_e)>, [E]."""
    out = d.new_empty(d.shape[0])
    if d.shape[0]:
        _spline_edge_dot(_np(g), _np(x), _np(d), _np(coeffs), _np(i), _np(j), float(cutoff),
                         int(order), out.numpy())
    return out


def spline_conv_vjp(grad, x, d, d_rev, coeffs, i, j, ptr, rev, cutoff, order):
    """Launcher: (grad_x [N, F], grad_d [E]) = (spline_conv(grad, d_rev, order),
    spline_edge_dot(grad, x, d, order + 1)) in one pass over the rows."""
    grad_x = grad.new_zeros(ptr.shape[0] - 1, grad.shape[1])
    grad_d = d.new_zeros(d.shape[0])
    if d.shape[0] and grad.shape[0]:
        _spline_conv_vjp(_np(grad), _np(x), _np(d), _np(d_rev), _np(coeffs), _np(j), _np(ptr),
                         float(cutoff), int(order), grad_x.numpy(), grad_d.numpy())
    return grad_x, grad_d


# ---------------------------------------------------------------- tabulated filter from positions
# spline_conv with the distances computed inside from positions (README.md): over a
# mirror-symmetric full list, the backward is row-owned without the mirror index, and the
# forces need no [E] distance tensor, no norm backward and no scatter of pair vectors.
@njit(cache=True)
def _pair_geometry(pos, cells, s, a, b, sh0, sh1, sh2):
    """r_ab = (x_b - x_a) + S @ cell and |r_ab|, in float64 and plain IEEE arithmetic (this
    function has no fastmath): the mirror pair (b, a, -S) gets exactly the negated vector and
    the same distance, bit for bit, which the row-owned backward relies on."""
    v0 = (np.float64(pos[b, 0]) - np.float64(pos[a, 0])) + (
        (sh0 * np.float64(cells[s, 0, 0]) + sh1 * np.float64(cells[s, 1, 0]))
        + sh2 * np.float64(cells[s, 2, 0]))
    v1 = (np.float64(pos[b, 1]) - np.float64(pos[a, 1])) + (
        (sh0 * np.float64(cells[s, 0, 1]) + sh1 * np.float64(cells[s, 1, 1]))
        + sh2 * np.float64(cells[s, 2, 1]))
    v2 = (np.float64(pos[b, 2]) - np.float64(pos[a, 2])) + (
        (sh0 * np.float64(cells[s, 0, 2]) + sh1 * np.float64(cells[s, 1, 2]))
        + sh2 * np.float64(cells[s, 2, 2]))
    return v0, v1, v2, np.sqrt((v0 * v0 + v1 * v1) + v2 * v2)


# Rows per prange task of the kernels below, which first compute the geometry of a row's
# edges into a small buffer and then run the feature loops: computed edge by edge in front of
# each feature loop, the latency chain position -> distance -> table interval -> coefficients
# was not hidden (Tuning).
_ROW_CHUNK = 16


@njit(cache=True, inline="always")
def _row_geometry(pos, cells, s, a, j, shifts, ptr, n, cutoff, geo, edges):
    """Edges of row a inside the cutoff with an in-range neighbour: their count m, geo[:m] =
    (r_ab, |r_ab|) and edges[:m] their indices."""
    m = 0
    for e in range(ptr[a], ptr[a + 1]):
        b = j[e]
        if b < 0 or b >= n:
            continue
        v0, v1, v2, r = _pair_geometry(pos, cells, s, a, b, shifts[e, 0], shifts[e, 1],
                                       shifts[e, 2])
        geo[m, 0], geo[m, 1], geo[m, 2], geo[m, 3] = v0, v1, v2, r
        edges[m] = e
        m += r < cutoff
    return m


@njit(cache=True, parallel=True, fastmath=_FEATURE_MATH)
def _spline_conv_positions(x, pos, cells, atom_system, j, shifts, ptr, coeffs, cutoff, max_row,
                           out):
    rows = ptr.shape[0] - 1
    n = min(x.shape[0], pos.shape[0])
    nint = coeffs.shape[0]
    inv_h = nint / cutoff
    nf = x.shape[1]
    batched = atom_system.shape[0] > 0
    for c in prange((rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        acc = np.empty(nf, dtype=out.dtype)
        geo = np.empty((max_row, 4))
        edges = np.empty(max_row, np.int64)
        for a in range(c * _ROW_CHUNK, min(rows, (c + 1) * _ROW_CHUNK)):
            s = atom_system[a] if batched and a < atom_system.shape[0] else 0
            m = _row_geometry(pos, cells, s, a, j, shifts, ptr, n, cutoff, geo, edges)
            for f in range(nf):
                acc[f] = 0.0
            for q in range(m):
                k, p1, p2, p3 = _values_weights(geo[q, 3], inv_h, nint, coeffs)
                _conv_at(x, j[edges[q]], coeffs, k, p1, p2, p3, acc)
            for f in range(nf):
                out[a, f] = acc[f]  # every row: out needs no zeroing


# The feature loops below index the 2-D and 3-D arrays directly instead of taking row views
# (x[b], coeffs[k]): per edge, views cost more than the F = 64 loop's arithmetic (Tuning).
@njit(cache=True, inline="always")
def _values_weights(r, inv_h, nint, coeffs):
    """Interval k of r and the weights (t, t^2, t^3) of W = c0 + t c1 + t^2 c2 + t^3 c3, in the
    table's precision (the feature loops then run in it)."""
    k = _interval(r, inv_h, nint)
    t = r * inv_h - k
    cast = coeffs.dtype.type
    return k, cast(t), cast(t * t), cast(t * t * t)


@njit(cache=True, inline="always")
def _conv_at(h, b, coeffs, k, p1, p2, p3, acc):
    """acc += h[b] * W (weights of interval k)."""
    for f in range(acc.shape[0]):
        acc[f] += h[b, f] * (coeffs[k, 0, f] + p1 * coeffs[k, 1, f] + p2 * coeffs[k, 2, f]
                             + p3 * coeffs[k, 3, f])


@njit(cache=True, inline="always")
def _slope_weights(r, k, inv_h, coeffs):
    """(s1, s2, s3) of W' = s1 c1 + s2 c2 + s3 c3 at r (interval k), in the table's precision."""
    _, s1, s2, s3 = _spline_poly(r * inv_h - k, 1, inv_h)
    cast = coeffs.dtype.type
    return cast(s1), cast(s2), cast(s3)


# The two functions below form W'(r) per feature and take one dot with it, rather than three
# dots with c1, c2, c3 combined afterwards (as _partial_dots does): one more multiply per
# feature, but one sum to reduce across SIMD lanes per edge instead of three (Tuning).
@njit(cache=True, inline="always")
def _pair_slope_at(grad, x, a, b, coeffs, k, s1, s2, s3):
    """<grad[a] * x[b] + grad[b] * x[a], W'(r)> (interval k, weights of W')."""
    acc = s1 - s1
    for f in range(grad.shape[1]):
        u = grad[a, f] * x[b, f] + grad[b, f] * x[a, f]
        acc += u * (s1 * coeffs[k, 1, f] + s2 * coeffs[k, 2, f] + s3 * coeffs[k, 3, f])
    return acc


@njit(cache=True, inline="always")
def _conv_and_pair_slope_at(grad, x, a, b, coeffs, k, p1, p2, p3, s1, s2, s3, acc):
    """acc += grad[b] * W(r) and _pair_slope_at(...), in one read of interval k."""
    dot = s1 - s1
    for f in range(acc.shape[0]):
        c1, c2, c3 = coeffs[k, 1, f], coeffs[k, 2, f], coeffs[k, 3, f]
        gb = grad[b, f]
        acc[f] += gb * (coeffs[k, 0, f] + p1 * c1 + p2 * c2 + p3 * c3)
        dot += (grad[a, f] * x[b, f] + gb * x[a, f]) * (s1 * c1 + s2 * c2 + s3 * c3)
    return dot


@njit(cache=True, parallel=True, fastmath=_FEATURE_MATH)
def _spline_conv_positions_vjp(grad, x, pos, cells, atom_system, j, shifts, ptr, coeffs, cutoff,
                               max_row, need_x, need_cell, grad_x, grad_pos, cell_rows):
    """One writer per row a (README.md): grad_x[a] = sum_e grad[b] W(r_e);
    grad_pos[a] = -sum_e (t_e + t'_e) r_e / |r_e| with t_e = <grad[a] x[b], W'(r_e)> and the
    mirror's t'_e = <grad[b] x[a], W'(r_e)>; cell_rows[a] = sum_e S_e (x) (t_e + t'_e) r_e / 2|r_e|
    (each pair is seen from both ends)."""
    n = min(grad.shape[0], x.shape[0], pos.shape[0])
    rows = min(ptr.shape[0] - 1, n)
    nint = coeffs.shape[0]
    inv_h = nint / cutoff
    nf = grad.shape[1]
    batched = atom_system.shape[0] > 0
    for c in prange((rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        acc = np.empty(nf, dtype=grad.dtype)
        geo = np.empty((max_row, 4))
        edges = np.empty(max_row, np.int64)
        slopes = np.empty(max_row)  # t_e + t'_e
        for a in range(c * _ROW_CHUNK, min(rows, (c + 1) * _ROW_CHUNK)):
            s = atom_system[a] if batched and a < atom_system.shape[0] else 0
            m = _row_geometry(pos, cells, s, a, j, shifts, ptr, n, cutoff, geo, edges)
            for f in range(nf):
                acc[f] = 0.0
            if need_x:
                for q in range(m):
                    b, r = j[edges[q]], geo[q, 3]
                    k, p1, p2, p3 = _values_weights(r, inv_h, nint, coeffs)
                    s1, s2, s3 = _slope_weights(r, k, inv_h, coeffs)
                    slopes[q] = _conv_and_pair_slope_at(grad, x, a, b, coeffs, k, p1, p2, p3,
                                                        s1, s2, s3, acc)
            else:
                for q in range(m):
                    b, r = j[edges[q]], geo[q, 3]
                    k = _interval(r, inv_h, nint)
                    s1, s2, s3 = _slope_weights(r, k, inv_h, coeffs)
                    slopes[q] = _pair_slope_at(grad, x, a, b, coeffs, k, s1, s2, s3)
            f0 = f1 = f2 = 0.0
            for q in range(m):
                r = geo[q, 3]
                w = slopes[q] / r if r > 0.0 else 0.0  # coincident atoms: 0, as torch's norm
                f0 -= w * geo[q, 0]
                f1 -= w * geo[q, 1]
                f2 -= w * geo[q, 2]
                if need_cell:
                    e = edges[q]
                    for t in range(3):
                        h = 0.5 * w * shifts[e, t]
                        cell_rows[a, 3 * t] += h * geo[q, 0]
                        cell_rows[a, 3 * t + 1] += h * geo[q, 1]
                        cell_rows[a, 3 * t + 2] += h * geo[q, 2]
            grad_pos[a, 0], grad_pos[a, 1], grad_pos[a, 2] = f0, f1, f2
            if need_x:
                for f in range(nf):
                    grad_x[a, f] = acc[f]


def _max_row(ptr):
    return int((ptr[1:] - ptr[:-1]).max()) if ptr.shape[0] > 1 else 0


def spline_conv_positions(x, positions, cells, atom_system, i, j, shifts, ptr, coeffs, cutoff):
    """Launcher: out[a] = sum_{e in row a} x[j_e] W(|r_e|), r_e from positions, [N, F]."""
    if not j.shape[0]:
        return x.new_zeros(ptr.shape[0] - 1, x.shape[1])
    out = x.new_empty(ptr.shape[0] - 1, x.shape[1])
    _spline_conv_positions(_np(x), _np(positions), _np(cells), _system_index(atom_system),
                           _np(j), _np(shifts), _np(ptr), _np(coeffs), float(cutoff),
                           _max_row(ptr), out.numpy())
    return out


def spline_conv_positions_vjp(grad, x, positions, cells, atom_system, i, j, shifts, ptr, coeffs,
                              cutoff, need_x, need_cell):
    """Launcher: (grad_x [N, F] or [0], grad_positions [N, 3], grad_cells [B, 3, 3] or [0]) of
    sum <grad, spline_conv_positions(...)> over a mirror-symmetric full list."""
    n = ptr.shape[0] - 1
    # the kernel runs and writes every row
    every_row = j.shape[0] > 0 and min(grad.shape[0], x.shape[0], positions.shape[0]) >= n
    grad_x = (grad.new_empty if every_row else grad.new_zeros)(n if need_x else 0, grad.shape[1])
    grad_pos = positions.new_zeros(n, 3)
    cell_rows = positions.new_zeros(n if need_cell else 0, 9)
    if j.shape[0]:
        _spline_conv_positions_vjp(
            _np(grad), _np(x), _np(positions), _np(cells), _system_index(atom_system), _np(j),
            _np(shifts), _np(ptr), _np(coeffs), float(cutoff), _max_row(ptr), bool(need_x),
            bool(need_cell), grad_x.numpy(), grad_pos.numpy(), cell_rows.numpy())
    cell = dense.cell_sums(cell_rows, atom_system, cells) if need_cell else None
    return dense.params_or_empty((grad_x if need_x else None, grad_pos, cell), positions)


# ---------------------------------------------------------------- PaiNN message (README.md)
@njit(cache=True, parallel=True, fastmath=_FEATURE_MATH)
def _painn_rows(ds, dv, phi, v, unit, w, j, ptr, e0, a0, a1):
    """ds[a] += sum_e phi_s[j] W_s; dv[a, k] += sum_e phi_vs[j] W_vs unit_e[k]
    + phi_vv[j] W_vv v[j, k], over the edges of rows a0..a1 inside [e0, e0 + len(w))."""
    e1 = e0 + w.shape[0]
    n_phi = phi.shape[0]
    nf = ds.shape[1]
    for a in prange(a0, a1 + 1):
        for e in range(max(ptr[a], e0), min(ptr[a + 1], e1)):
            src = j[e]
            if src < 0 or src >= n_phi:
                continue
            we, ps, vs = w[e - e0], phi[src], v[src]
            ux, uy, uz = unit[e, 0], unit[e, 1], unit[e, 2]
            for f in range(nf):
                pvs = ps[nf + f] * we[nf + f]
                pvv = ps[2 * nf + f] * we[2 * nf + f]
                ds[a, f] += ps[f] * we[f]
                dv[a, 0, f] += pvs * ux + pvv * vs[0, f]
                dv[a, 1, f] += pvs * uy + pvv * vs[1, f]
                dv[a, 2, f] += pvs * uz + pvv * vs[2, f]


# Two feature loops per edge with the sender side summed in a per-row buffer: one loop that
# writes gw, gphi and r together touches too many arrays for LLVM's runtime alias checks and
# stayed scalar (Tuning).
@njit(cache=True, parallel=True, fastmath=_FEATURE_MATH)
def _painn_vjp_rows(gs, gv, phi, v, unit, unit_rev, w, w_rev, j, ptr, e0, a0, a1, gphi, r,
                    gunit, gw):
    """One pass over rows a0..a1 for the edges inside [e0, e0 + len(w)): the filter gradient
    gw of each edge and gunit (receiver side), and the sender-side gradients of the row's atom
    through the mirrored edges (filter w_rev, unit vector unit_rev) into gphi[:, :2F] and r."""
    e1 = e0 + w.shape[0]
    n_phi = phi.shape[0]
    nf = gs.shape[1]
    for a in prange(a0, a1 + 1):
        ga, gva = gs[a], gv[a]
        acc = np.zeros((5, nf), dtype=gs.dtype)  # sender side: (phi_s, phi_vs, r_x, r_y, r_z)
        for e in range(max(ptr[a], e0), min(ptr[a + 1], e1)):
            k = e - e0
            src = j[e]
            if src < 0 or src >= n_phi:
                gw[k, :] = 0.0
                gunit[e, 0], gunit[e, 1], gunit[e, 2] = 0.0, 0.0, 0.0
                continue
            ps, vs, gwk, we_vs = phi[src], v[src], gw[k], w[k, nf:2 * nf]
            ux, uy, uz = unit[e, 0], unit[e, 1], unit[e, 2]
            gx = gy = gz = 0.0
            for f in range(nf):  # receiver side: d<g, message of e>/dW_e and /d unit_e
                g0, g1, g2 = gva[0, f], gva[1, f], gva[2, f]
                pvs = ps[nf + f]
                gwk[f] = ga[f] * ps[f]
                gwk[nf + f] = pvs * (g0 * ux + g1 * uy + g2 * uz)
                gwk[2 * nf + f] = ps[2 * nf + f] * (g0 * vs[0, f] + g1 * vs[1, f]
                                                    + g2 * vs[2, f])
                pw = pvs * we_vs[f]
                gx += g0 * pw
                gy += g1 * pw
                gz += g2 * pw
            gunit[e, 0], gunit[e, 1], gunit[e, 2] = gx, gy, gz
            gsrc, gvs, wr = gs[src], gv[src], w_rev[k]
            rx, ry, rz = unit_rev[e, 0], unit_rev[e, 1], unit_rev[e, 2]
            for f in range(nf):  # sender side: atom a sends along the mirrored edge (src <- a)
                wvv = wr[2 * nf + f]
                h0, h1, h2 = gvs[0, f], gvs[1, f], gvs[2, f]
                acc[0, f] += gsrc[f] * wr[f]
                acc[1, f] += (h0 * rx + h1 * ry + h2 * rz) * wr[nf + f]
                acc[2, f] += h0 * wvv
                acc[3, f] += h1 * wvv
                acc[4, f] += h2 * wvv
        for f in range(nf):
            gphi[a, f] += acc[0, f]
            gphi[a, nf + f] += acc[1, f]
            r[a, 0, f] += acc[2, f]
            r[a, 1, f] += acc[3, f]
            r[a, 2, f] += acc[4, f]


def painn_message(phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope):
    """Launcher: (ds [N, F], dv [N, 3, F]) of the PaiNN message; see README.md."""
    jn, pn, phin, vn, un = _np(j), _np(ptr), _np(phi), _np(v), _np(unit)

    def rows(ds, dv, w, e0, a0, a1):
        _painn_rows(ds.numpy(), dv.numpy(), phin, vn, un, _np(w), jn, pn, e0, a0, a1)

    return dense.blocked_painn_forward(phi, v, d, i, ptr, wf, bf,
                                       dense.RadialSettings(cutoff, kind, envelope), _radial,
                                       rows, PAINN_BLOCK)


def painn_message_vjp(gs, gv, phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope,
                      need_params):
    """Launcher: gradients (phi, v, d, unit, wf, bf) of <gs, ds> + <gv, dv>; see README.md."""
    args = [_np(t) for t in (gs, gv, phi, v, unit, unit.index_select(0, rev))]
    jn, pn = _np(j), _np(ptr)

    def rows(gphi, r, gunit, w, w_rev, e0, a0, a1):
        gw = torch.empty_like(w)
        _painn_vjp_rows(*args, _np(w), _np(w_rev), jn, pn, e0, a0, a1, gphi.numpy(), r.numpy(),
                        gunit.numpy(), gw.numpy())
        return gw

    out = dense.blocked_painn_vjp(phi, v, d, d.index_select(0, rev), i, ptr, wf, bf,
                                  dense.RadialSettings(cutoff, kind, envelope), need_params,
                                  _radial, rows, PAINN_BLOCK)
    return dense.params_or_empty(out, d)
