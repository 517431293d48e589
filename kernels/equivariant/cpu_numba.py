"""Equivariant messages on CPU with numba: per-edge harmonics, receiver-row tensor-product sums,
per-atom symmetric contractions.

Algorithms (maths in README.md):
* ``spherical_harmonics`` and its vjp / jvp: e3nn's polynomials of the unit vector and their
  gradients, one edge per iteration, float64 inside.
* ``tp_conv`` walks the CSR rows of the receivers (edges in any order, reached through the
  ``by_receiver`` permutation, fastest when the edges are stored in that order), so each
  output row has one writer: no atomics, deterministic. Per edge, the coupling contracted with
  y gives one scalar per (path, input, output) component; the channel loops (innermost,
  contiguous) then do one multiply per (path, input) and one multiply-add per output
  component. ``tp_conv_vjp`` walks the receivers' rows again and writes each edge's y- and
  w-gradients and its share of the sender's x-gradient ([E, Din, C], Din <= 4: the hidden
  features' components, not the messages'), which one pass over the senders' rows sums
  (``tp_conv_sender`` is that alone). No [E, Dout, C] tensor exists.
* The symmetric contraction evaluates each atom's polynomial from its sparse list of monomials
  (index tuples, degree <= 3) with the element's coefficients; the coefficient gradients are
  summed per element over the atoms of that element (element-sorted), one writer per block.

Channel loops use fastmath "reassoc" + "contract" so that LLVM vectorizes the dot products
(deterministic for a given build). Out-of-range indices (possible only with value checks off)
are skipped, never read.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

import fastff.kernels.cpu_threads  # noqa: F401  (numba's OpenMP layer first)
from fastff.kernels.cpu_math import exp_neg

_MATH = {"reassoc", "contract"}
# Rows (atoms) per prange task (~16 x 50 edges): each task allocates its scratch once. numba's
# OpenMP layer still gives each thread one contiguous block of tasks (docs/backends.md).
ROWS = 16
# Edges per prange task of the harmonics kernels.
EDGES = 1024
NORM_EPS = 1e-12
_S3, _S5, _S7 = math.sqrt(3.0), math.sqrt(5.0), math.sqrt(7.0)
_C1, _C2 = math.sqrt(5.0 / 6.0), math.sqrt(3.0 / 8.0)


def _np(t: torch.Tensor):
    return t.detach().contiguous().numpy()


# ---------------------------------------------------------------- spherical harmonics
@njit(cache=True, inline="always")
def _harmonics(x, y, z, lmax, val, grad):
    """val[m] = Y_m(u), grad[m, k] = dY_m/du_k at u = (x, y, z), "component" normalised."""
    val[0] = 1.0
    grad[0, 0] = grad[0, 1] = grad[0, 2] = 0.0
    if lmax < 1:
        return
    val[1], val[2], val[3] = _S3 * x, _S3 * y, _S3 * z
    for m in range(1, 4):
        for k in range(3):
            grad[m, k] = _S3 if m - 1 == k else 0.0
    if lmax < 2:
        return
    a0, a1, a2 = _S3 * x * z, _S3 * x * y, y * y - 0.5 * (x * x + z * z)
    a3, a4 = _S3 * y * z, 0.5 * _S3 * (z * z - x * x)
    # gradients of a0..a4
    d00, d01, d02 = _S3 * z, 0.0, _S3 * x
    d10, d11, d12 = _S3 * y, _S3 * x, 0.0
    d20, d21, d22 = -x, 2.0 * y, -z
    d30, d31, d32 = 0.0, _S3 * z, _S3 * y
    d40, d41, d42 = -_S3 * x, 0.0, _S3 * z
    val[4], val[5], val[6], val[7], val[8] = _S5 * a0, _S5 * a1, _S5 * a2, _S5 * a3, _S5 * a4
    grad[4, 0], grad[4, 1], grad[4, 2] = _S5 * d00, _S5 * d01, _S5 * d02
    grad[5, 0], grad[5, 1], grad[5, 2] = _S5 * d10, _S5 * d11, _S5 * d12
    grad[6, 0], grad[6, 1], grad[6, 2] = _S5 * d20, _S5 * d21, _S5 * d22
    grad[7, 0], grad[7, 1], grad[7, 2] = _S5 * d30, _S5 * d31, _S5 * d32
    grad[8, 0], grad[8, 1], grad[8, 2] = _S5 * d40, _S5 * d41, _S5 * d42
    if lmax < 3:
        return
    q = 4.0 * y * y - x * x - z * z
    q0, q1, q2 = -2.0 * x, 8.0 * y, -2.0 * z
    val[9] = _S7 * _C1 * (a0 * z + a4 * x)
    grad[9, 0] = _S7 * _C1 * (z * d00 + x * d40 + a4)
    grad[9, 1] = _S7 * _C1 * (z * d01 + x * d41)
    grad[9, 2] = _S7 * _C1 * (z * d02 + a0 + x * d42)
    val[10] = _S7 * _S5 * a0 * y
    grad[10, 0] = _S7 * _S5 * y * d00
    grad[10, 1] = _S7 * _S5 * (y * d01 + a0)
    grad[10, 2] = _S7 * _S5 * y * d02
    val[11] = _S7 * _C2 * q * x
    grad[11, 0] = _S7 * _C2 * (x * q0 + q)
    grad[11, 1] = _S7 * _C2 * x * q1
    grad[11, 2] = _S7 * _C2 * x * q2
    val[12] = _S7 * 0.5 * y * (2.0 * y * y - 3.0 * (x * x + z * z))
    grad[12, 0] = _S7 * (-3.0 * x * y)
    grad[12, 1] = _S7 * (3.0 * y * y - 1.5 * (x * x + z * z))
    grad[12, 2] = _S7 * (-3.0 * y * z)
    val[13] = _S7 * _C2 * z * q
    grad[13, 0] = _S7 * _C2 * z * q0
    grad[13, 1] = _S7 * _C2 * z * q1
    grad[13, 2] = _S7 * _C2 * (z * q2 + q)
    val[14] = _S7 * _S5 * a4 * y
    grad[14, 0] = _S7 * _S5 * y * d40
    grad[14, 1] = _S7 * _S5 * (y * d41 + a4)
    grad[14, 2] = _S7 * _S5 * y * d42
    val[15] = _S7 * _C1 * (a4 * z - a0 * x)
    grad[15, 0] = _S7 * _C1 * (z * d40 - x * d00 - a0)
    grad[15, 1] = _S7 * _C1 * (z * d41 - x * d01)
    grad[15, 2] = _S7 * _C1 * (z * d42 + a4 - x * d02)


@njit(cache=True, inline="always")
def _unit(vectors, e):
    """(ux, uy, uz, r, inside): torch.nn.functional.normalize's u = v / max(|v|, eps)."""
    vx, vy, vz = np.float64(vectors[e, 0]), np.float64(vectors[e, 1]), np.float64(vectors[e, 2])
    r = math.sqrt(vx * vx + vy * vy + vz * vz)
    inside = r > NORM_EPS
    if not inside:
        r = NORM_EPS
    return vx / r, vy / r, vz / r, r, inside


@njit(cache=True, parallel=True)
def _sh_kernel(vectors, lmax, mode, other, out):
    """mode 0: out = Y [E, nY]; 1: out = vjp of other [E, nY] -> [E, 3]; 2: out = jvp of
    other [E, 3] -> [E, nY]."""
    n_edges = vectors.shape[0]
    ny = (lmax + 1) * (lmax + 1)
    for chunk in prange((n_edges + EDGES - 1) // EDGES):
        val = np.empty(16)
        grad = np.empty((16, 3))
        for e in range(chunk * EDGES, min(n_edges, (chunk + 1) * EDGES)):
            ux, uy, uz, r, inside = _unit(vectors, e)
            _harmonics(ux, uy, uz, lmax, val, grad)
            if mode == 0:
                for m in range(ny):
                    out[e, m] = val[m]
            elif mode == 1:
                g0 = g1 = g2 = 0.0
                for m in range(ny):
                    gm = np.float64(other[e, m])
                    g0 += gm * grad[m, 0]
                    g1 += gm * grad[m, 1]
                    g2 += gm * grad[m, 2]
                if inside:
                    dot = ux * g0 + uy * g1 + uz * g2
                    g0, g1, g2 = g0 - ux * dot, g1 - uy * dot, g2 - uz * dot
                out[e, 0], out[e, 1], out[e, 2] = g0 / r, g1 / r, g2 / r
            else:
                t0, t1, t2 = (np.float64(other[e, 0]), np.float64(other[e, 1]),
                              np.float64(other[e, 2]))
                if inside:
                    dot = ux * t0 + uy * t1 + uz * t2
                    t0, t1, t2 = t0 - ux * dot, t1 - uy * dot, t2 - uz * dot
                t0, t1, t2 = t0 / r, t1 / r, t2 / r
                for m in range(ny):
                    out[e, m] = grad[m, 0] * t0 + grad[m, 1] * t1 + grad[m, 2] * t2


def _sh(vectors, lmax, mode, other, width):
    v = _np(vectors)
    out = vectors.new_empty(vectors.shape[0], width)
    if v.shape[0]:
        o = _np(other) if other is not None else v
        _sh_kernel(v, int(lmax), mode, o, out.numpy())
    return out


def spherical_harmonics(vectors, lmax):
    """Launcher: see reference.py."""
    return _sh(vectors, lmax, 0, None, (lmax + 1) ** 2)


def spherical_harmonics_vjp(grad, vectors, lmax):
    """Launcher: see reference.py."""
    return _sh(vectors, lmax, 1, grad, 3)


def spherical_harmonics_jvp(tangent, vectors, lmax):
    """Launcher: see reference.py."""
    return _sh(vectors, lmax, 2, tangent, (lmax + 1) ** 2)


# ---------------------------------------------------------------- tensor-product convolution
def coupling_plan(coupling: torch.Tensor, out_path: torch.Tensor, dtype):
    """The sparse coupling as the kernels walk it, from the dense [Din, nY, Dout] tensor:
    groups (path, input component) -> output components -> (y component, coefficient).

    Returns (pa_path, pa_in, pa_ptr, b_out, b_ptr, ent_m, ent_coef): int64 arrays except the
    coefficients (``dtype``)."""
    c = coupling.detach().cpu().double().numpy()
    paths = out_path.detach().cpu().numpy().astype(np.int64)
    a, m, b = np.nonzero(c)
    p = paths[b]
    order = np.lexsort((m, b, a, p))
    a, m, b, p = a[order], m[order], b[order], p[order]
    coef = c[a, m, b]
    new_b = np.ones(len(a), bool)
    new_b[1:] = (p[1:] != p[:-1]) | (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    b_start = np.flatnonzero(new_b)
    new_pa = np.ones(len(b_start), bool)
    pb, ab = p[b_start], a[b_start]
    new_pa[1:] = (pb[1:] != pb[:-1]) | (ab[1:] != ab[:-1])
    pa_start = np.flatnonzero(new_pa)
    i64 = np.int64
    return (pb[pa_start].astype(i64), ab[pa_start].astype(i64),
            np.append(pa_start, len(b_start)).astype(i64), b[b_start].astype(i64),
            np.append(b_start, len(a)).astype(i64), m.astype(i64), coef.astype(dtype))


@njit(cache=True, inline="always")
def _edge_scalars(y, e, b_ptr, ent_m, ent_coef, kval):
    """kval[q] = sum over output group q's entries of coefficient * y[e, m]."""
    for q in range(b_ptr.shape[0] - 1):
        t = 0.0
        for s in range(b_ptr[q], b_ptr[q + 1]):
            t += ent_coef[s] * y[e, ent_m[s]]
        kval[q] = t


@njit(cache=True, inline="always")
def _weight_row(w_row, e, n_rows):
    """The row of w edge e reads (e without weight rows); -1 when out of range."""
    row = w_row[e] if w_row.shape[0] else e
    return row if 0 <= row < n_rows else -1


@njit(cache=True, inline="always")
def _edge_weights(w, row, e, d, coeffs, step, order, wq, table_w):
    """The edge's weights [P, C]: the row w[row], or (``coeffs`` non-empty: tabulated) the
    table's order-th derivative at d[e] written into table_w; None beyond the table (or for
    a row out of range)."""
    if coeffs.shape[2] == 0:
        return w[row] if row >= 0 else None
    k = _spline_weights(np.float64(d[e]), step, coeffs.shape[0], order, wq)
    if k < 0:
        return None
    flat = table_w.reshape(table_w.shape[0] * table_w.shape[1])
    w0, w1 = coeffs.dtype.type(wq[0]), coeffs.dtype.type(wq[1])
    w2, w3 = coeffs.dtype.type(wq[2]), coeffs.dtype.type(wq[3])
    for f in range(flat.shape[0]):
        flat[f] = (w0 * coeffs[k, 0, f] + w1 * coeffs[k, 1, f] + w2 * coeffs[k, 2, f]
                   + w3 * coeffs[k, 3, f])
    return table_w


@njit(cache=True, fastmath=_MATH)
def _conv_rows(r0, r1, x, y, w, w_row, d, coeffs, step, senders, by_receiver, ptr, pa_path,
               pa_in, pa_ptr, b_out, b_ptr, ent_m, ent_coef, kval, rx, wq, table_w, out):
    """tp_conv over receiver rows [r0, r1) (one prange task; a separate function so that
    numba's parallel analysis does not see the weights' two sources)."""
    n_x, n_edges, nc = x.shape[0], y.shape[0], x.shape[2]
    for r in range(r0, r1):
        out[r] = 0.0
        for k in range(ptr[r], ptr[r + 1]):
            e = by_receiver[k]
            if e < 0 or e >= n_edges:
                continue
            s = senders[e]
            if s < 0 or s >= n_x:
                continue
            we = _edge_weights(w, _weight_row(w_row, e, w.shape[0]), e, d, coeffs, step, 0, wq,
                               table_w)
            if we is None:
                continue
            _edge_scalars(y, e, b_ptr, ent_m, ent_coef, kval)
            for gp in range(pa_path.shape[0]):
                p, a = pa_path[gp], pa_in[gp]
                for c in range(nc):
                    rx[c] = we[p, c] * x[s, a, c]
                for q in range(pa_ptr[gp], pa_ptr[gp + 1]):
                    kv, b = kval[q], b_out[q]
                    for c in range(nc):
                        out[r, b, c] += kv * rx[c]


@njit(cache=True, parallel=True)
def _tp_conv_kernel(x, y, w, w_row, d, coeffs, step, n_paths, senders, by_receiver, ptr, pa_path,
                    pa_in, pa_ptr, b_out, b_ptr, ent_m, ent_coef, out):
    n_rows, nc = ptr.shape[0] - 1, x.shape[2]
    for chunk in prange((n_rows + ROWS - 1) // ROWS):
        kval = np.empty(b_out.shape[0], dtype=x.dtype)
        rx = np.empty(nc, dtype=x.dtype)
        wq = np.empty(4)
        table_w = np.empty((n_paths, nc), dtype=x.dtype)
        _conv_rows(chunk * ROWS, min(n_rows, (chunk + 1) * ROWS), x, y, w, w_row, d, coeffs,
                   step, senders, by_receiver, ptr, pa_path, pa_in, pa_ptr, b_out, b_ptr, ent_m,
                   ent_coef, kval, rx, wq, table_w, out)


@njit(cache=True, inline="always")
def _group_cotangent(g, r, kval, b_out, t0, t1, tmp):
    """tmp[c] = sum over the (path, input) group's outputs t0 <= t < t1 of kval[t] g[r, b_t, c]."""
    kv, b = kval[t0], b_out[t0]
    for c in range(g.shape[2]):
        tmp[c] = kv * g[r, b, c]
    for t in range(t0 + 1, t1):
        kv, b = kval[t], b_out[t]
        for c in range(g.shape[2]):
            tmp[c] += kv * g[r, b, c]


@njit(cache=True, fastmath=_MATH)
def _vjp_rows(r0, r1, g, x, y, w, w_row, w_partner, d, coeffs, step, senders, receivers,
              by_receiver, ptr, pa_path, pa_in, pa_ptr, b_out, b_ptr, ent_m, ent_coef, n_x,
              need_q, need_y, need_w, need_d, kval, qval, local_w, local_q, tmp, u, wq,
              table_w, q, gy, gw, gd):
    """Per edge of receiver rows [r0, r1) (g[r] stays in cache): the y-gradient, the
    w-gradient (stored, or with tabulated weights dotted at once with the table's slope: the
    distance gradient), and the sender's share q_e = d/dx[sender] of the edge's term (summed
    per sender afterwards), each accumulated in a small local buffer and stored once. Per
    (path, input) group, t = sum_b k_b g[r, b] serves both the w-gradient (x t) and the share
    (w t); the y-gradient takes one dot <w x, g[r, b]> per output component.

    A weight row shared with a partner edge is written by the edge of lower index, which adds
    the partner's term (its g[receiver] and x[sender] read at random): one writer per row."""
    n_edges, nc = y.shape[0], g.shape[2]
    for r in range(r0, r1):
        for k in range(ptr[r], ptr[r + 1]):
            e = by_receiver[k]
            if e < 0 or e >= n_edges:
                continue
            s = senders[e]
            row = _weight_row(w_row, e, w.shape[0])
            partner = w_partner[e] if w_partner.shape[0] else -1
            if partner >= n_edges:
                partner = -1
            writes_w = need_w and row >= 0 and (partner < 0 or e < partner)
            grads_w = writes_w or need_d
            if grads_w:
                local_w[:] = 0.0
            if need_q:
                local_q[:] = 0.0
            qval[:] = 0.0
            we = _edge_weights(w, row, e, d, coeffs, step, 0, wq, table_w)
            if 0 <= s < n_x:
                _edge_scalars(y, e, b_ptr, ent_m, ent_coef, kval)
                for gp in range(pa_path.shape[0]):
                    p, a = pa_path[gp], pa_in[gp]
                    t0, t1 = pa_ptr[gp], pa_ptr[gp + 1]
                    if grads_w or need_q:
                        _group_cotangent(g, r, kval, b_out, t0, t1, tmp)
                        if grads_w:
                            for c in range(nc):
                                local_w[p, c] += x[s, a, c] * tmp[c]
                        if need_q and we is not None:
                            for c in range(nc):
                                local_q[a, c] += we[p, c] * tmp[c]
                    if need_y and we is not None:
                        for c in range(nc):
                            u[c] = we[p, c] * x[s, a, c]
                        for t in range(t0, t1):
                            b = b_out[t]
                            acc = 0.0
                            for c in range(nc):
                                acc += u[c] * g[r, b, c]
                            qval[t] = acc
            if writes_w and partner >= 0:
                _add_partner_term(g, x, y, partner, senders[partner], receivers[partner], n_x,
                                  pa_path, pa_in, pa_ptr, b_out, b_ptr, ent_m, ent_coef, kval,
                                  tmp, local_w)
            if writes_w:
                gw[row] = local_w
            if need_d:
                gd[e] = _table_slope_dot(local_w, d, e, coeffs, step, wq)
            if need_q:
                q[e] = local_q
            if need_y:
                gy[e] = 0.0
                for t in range(b_out.shape[0]):
                    for j in range(b_ptr[t], b_ptr[t + 1]):
                        gy[e, ent_m[j]] += ent_coef[j] * qval[t]


@njit(cache=True, inline="always")
def _add_partner_term(g, x, y, e, s, r, n_x, pa_path, pa_in, pa_ptr, b_out, b_ptr, ent_m,
                      ent_coef, kval, tmp, local_w):
    """local_w += the w-gradient of edge e (sender s, receiver r); kval and tmp are reused."""
    if not (0 <= s < n_x and 0 <= r < g.shape[0]):
        return
    nc = g.shape[2]
    _edge_scalars(y, e, b_ptr, ent_m, ent_coef, kval)
    for gp in range(pa_path.shape[0]):
        p, a = pa_path[gp], pa_in[gp]
        _group_cotangent(g, r, kval, b_out, pa_ptr[gp], pa_ptr[gp + 1], tmp)
        for c in range(nc):
            local_w[p, c] += x[s, a, c] * tmp[c]


@njit(cache=True, parallel=True)
def _tp_vjp_kernel(g, x, y, w, w_row, w_partner, d, coeffs, step, n_paths, senders, receivers,
                   by_receiver, ptr, pa_path, pa_in, pa_ptr, b_out, b_ptr, ent_m, ent_coef, n_x,
                   need_q, need_y, need_w, need_d, q, gy, gw, gd):
    n_rows, nc, d_in = ptr.shape[0] - 1, g.shape[2], q.shape[1]
    for chunk in prange((n_rows + ROWS - 1) // ROWS):
        kval = np.empty(b_out.shape[0], dtype=g.dtype)
        qval = np.empty(b_out.shape[0], dtype=g.dtype)
        local_w = np.empty((n_paths, nc), dtype=g.dtype)
        local_q = np.empty((d_in, nc), dtype=g.dtype)
        tmp = np.empty(nc, dtype=g.dtype)
        u = np.empty(nc, dtype=g.dtype)
        wq = np.empty(4)
        table_w = np.empty((n_paths, nc), dtype=g.dtype)
        _vjp_rows(chunk * ROWS, min(n_rows, (chunk + 1) * ROWS), g, x, y, w, w_row, w_partner,
                  d, coeffs, step, senders, receivers, by_receiver, ptr, pa_path, pa_in, pa_ptr,
                  b_out, b_ptr, ent_m, ent_coef, n_x, need_q, need_y, need_w, need_d, kval,
                  qval, local_w, local_q, tmp, u, wq, table_w, q, gy, gw, gd)


@njit(cache=True, inline="always")
def _table_slope_dot(local_w, d, e, coeffs, step, wq):
    """<local_w, d/dr table(d[e])>: the interval's coefficient rows dotted with local_w."""
    k = _spline_weights(np.float64(d[e]), step, coeffs.shape[0], 1, wq)
    if k < 0:
        return 0.0
    flat = local_w.reshape(local_w.shape[0] * local_w.shape[1])
    acc = 0.0
    for qq in range(1, 4):
        dot = 0.0
        for f in range(flat.shape[0]):
            dot += flat[f] * coeffs[k, qq, f]
        acc += wq[qq] * dot
    return acc


@njit(cache=True, parallel=True, fastmath=_MATH)
def _sender_sums(q, by_sender, sender_ptr, out):
    """out[s] = sum of q[e] over the edges of sender s (sender CSR order: one writer per row)."""
    n_rows, n_edges = sender_ptr.shape[0] - 1, q.shape[0]
    for chunk in prange((n_rows + ROWS - 1) // ROWS):
        for s in range(chunk * ROWS, min(n_rows, (chunk + 1) * ROWS)):
            out[s] = 0.0
            for k in range(sender_ptr[s], sender_ptr[s + 1]):
                e = by_sender[k]
                if 0 <= e < n_edges:
                    for a in range(q.shape[1]):
                        for c in range(q.shape[2]):
                            out[s, a, c] += q[e, a, c]


def _plan(coupling, out_path, dtype):
    return coupling_plan(coupling, out_path, np.dtype(str(dtype).replace("torch.", "")))


def _no_table(like):
    """(distances, coeffs) placeholders for the exact-weights path (coeffs with F = 0)."""
    return np.zeros(1, like.dtype), np.zeros((1, 4, 0), like.dtype)


_NO_ROWS = np.zeros(0, np.int64)  # weights per edge (the tabulated path)


def _conv(x, y, w, w_row, d, coeffs, step, n_paths, senders, by_receiver, receiver_ptr,
          coupling, out_path):
    out = x.new_empty(receiver_ptr.shape[0] - 1, coupling.shape[2], x.shape[2])
    if not y.shape[0]:
        return out.zero_()
    if out.numel():
        _tp_conv_kernel(_np(x), _np(y), w, w_row, d, coeffs, float(step), n_paths, _np(senders),
                        _np(by_receiver), _np(receiver_ptr), *_plan(coupling, out_path, x.dtype),
                        out.numpy())
    return out


def tp_conv(x, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender, sender_ptr,
            w_row, w_partner, coupling, out_path):
    """Launcher: see reference.py."""
    wn = _np(w)
    return _conv(x, y, wn, _np(w_row), *_no_table(wn), 1.0, w.shape[1], senders, by_receiver,
                 receiver_ptr, coupling, out_path)


def tp_conv_spline(x, y, distances, coeffs, step, senders, receivers, by_receiver,
                   receiver_ptr, by_sender, sender_ptr, coupling, out_path):
    """Launcher: see reference.py (the weights read from the table inside the edge loop)."""
    cn = _np(coeffs)
    nc = x.shape[2]
    return _conv(x, y, np.zeros((1, 1, nc), cn.dtype), _NO_ROWS, _np(distances), cn, step,
                 coeffs.shape[2] // nc, senders, by_receiver, receiver_ptr, coupling, out_path)


def _vjp(g, x, y, w, w_row, w_partner, d, coeffs, step, n_paths, senders, receivers,
         by_receiver, receiver_ptr, by_sender, sender_ptr, coupling, out_path, need_x, need_y,
         need_w, need_d):
    """(gx, gy, gw, gd) with empty [0] tensors where not asked for."""
    dtype = g.dtype
    num_senders = sender_ptr.shape[0] - 1
    gx = torch.empty(num_senders, coupling.shape[0], g.shape[2], dtype=dtype) if need_x \
        else g.new_zeros(0)
    # every edge of a receiver row is written; edges in no row (possible only with value checks
    # off) keep the zeros of the fill
    complete = int(receiver_ptr[-1]) == y.shape[0] if receiver_ptr.shape[0] else False
    alloc = torch.empty if complete else torch.zeros
    gy = alloc(y.shape, dtype=dtype) if need_y else g.new_zeros(0)
    # shared rows: a row no edge reads would not be written (zeros cost ~10 ms per 77 MB)
    gw = (torch.zeros if w_row.shape[0] else alloc)((w.shape[0], n_paths, g.shape[2]),
                                                     dtype=dtype) if need_w else g.new_zeros(0)
    gd = alloc(y.shape[0], dtype=dtype) if need_d else g.new_zeros(0)
    if not y.shape[0] or not (need_x or need_y or need_w or need_d):
        return gx.zero_(), gy, gw, gd
    plan = _plan(coupling, out_path, dtype)
    # the x-gradient: per-edge shares (written in the receivers' pass, where the edge's
    # weights are at hand) summed per sender; re-reading the weights (or re-evaluating the
    # table) and g[receiver] at random in a senders' pass cost more
    shares = bool(need_x)
    q = alloc((y.shape[0], coupling.shape[0], g.shape[2]), dtype=dtype) if shares else \
        torch.zeros(1, coupling.shape[0], g.shape[2], dtype=dtype)
    dummy = np.zeros((1, 1), dtype=q.numpy().dtype)
    if need_y or need_w or need_d or shares:
        _tp_vjp_kernel(_np(g), _np(x), _np(y), w, w_row, w_partner, d, coeffs, float(step),
                       n_paths, _np(senders), _np(receivers), _np(by_receiver),
                       _np(receiver_ptr), *plan, num_senders,
                       shares, bool(need_y), bool(need_w), bool(need_d), q.numpy(),
                       gy.numpy() if need_y else dummy,
                       gw.numpy() if need_w else dummy.reshape(1, 1, 1),
                       gd.numpy() if need_d else dummy.reshape(1))
    if shares and num_senders:
        _sender_sums(q.numpy(), _np(by_sender), _np(sender_ptr), gx.numpy())
    return gx, gy, gw, gd


def tp_conv_sender(g, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender,
                   sender_ptr, w_row, w_partner, coupling, out_path):
    """Launcher: see reference.py. A pass over the receivers' rows (y and w read in their
    order) writes each edge's share, then the senders' rows sum them."""
    x = g.new_zeros(1, coupling.shape[0], g.shape[2])  # not read when only shares are wanted
    wn = _np(w)
    return _vjp(g, x, y, wn, _np(w_row), _np(w_partner), *_no_table(wn), 1.0, w.shape[1],
                senders, receivers, by_receiver, receiver_ptr, by_sender, sender_ptr, coupling,
                out_path, True, False, False, False)[0]


def tp_conv_vjp(g, x, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender,
                sender_ptr, w_row, w_partner, coupling, out_path, need_x, need_y, need_w):
    """Launcher: see reference.py."""
    wn = _np(w)
    return _vjp(g, x, y, wn, _np(w_row), _np(w_partner), *_no_table(wn), 1.0, w.shape[1],
                senders, receivers, by_receiver, receiver_ptr, by_sender, sender_ptr, coupling,
                out_path, need_x, need_y, need_w, False)[:3]


def tp_conv_spline_vjp(g, x, y, distances, coeffs, step, senders, receivers, by_receiver,
                       receiver_ptr, by_sender, sender_ptr, coupling, out_path, need_x, need_y,
                       need_d):
    """Launcher: see reference.py."""
    nc = g.shape[2]
    cn = _np(coeffs)
    gx, gy, _, gd = _vjp(g, x, y, np.zeros((1, 1, nc), cn.dtype), _NO_ROWS, _NO_ROWS,
                         _np(distances), cn, step,
                         coeffs.shape[2] // nc, senders, receivers, by_receiver, receiver_ptr,
                         by_sender, sender_ptr, coupling, out_path, need_x, need_y, False,
                         need_d)
    return gx, gy, gd


# ---------------------------------------------------------------- symmetric contraction
@njit(cache=True, inline="always")
def _degree(tuples, k):
    return 1 + (tuples[k, 1] >= 0) + (tuples[k, 2] >= 0)


@njit(cache=True, inline="always")
def _monomial(x, n, tuples, k, mono):
    """mono[c] = prod of x[n, t, c] over the tuple's entries (trailing -1 entries read 1)."""
    deg = _degree(tuples, k)
    t0, t1, t2 = tuples[k, 0], tuples[k, 1], tuples[k, 2]
    nc = mono.shape[0]
    if deg == 1:
        for c in range(nc):
            mono[c] = x[n, t0, c]
    elif deg == 2:
        for c in range(nc):
            mono[c] = x[n, t0, c] * x[n, t1, c]
    else:
        for c in range(nc):
            mono[c] = x[n, t0, c] * x[n, t1, c] * x[n, t2, c]


@njit(cache=True, inline="always")
def _directional(x, v, n, tuples, k, out):
    """out[c] = the derivative of the monomial along v (the tangent at atom n)."""
    deg = _degree(tuples, k)
    t0, t1, t2 = tuples[k, 0], tuples[k, 1], tuples[k, 2]
    nc = out.shape[0]
    if deg == 1:
        for c in range(nc):
            out[c] = v[n, t0, c]
    elif deg == 2:
        for c in range(nc):
            out[c] = v[n, t0, c] * x[n, t1, c] + x[n, t0, c] * v[n, t1, c]
    else:
        for c in range(nc):
            x0, x1, x2 = x[n, t0, c], x[n, t1, c], x[n, t2, c]
            out[c] = v[n, t0, c] * x1 * x2 + x0 * v[n, t1, c] * x2 + x0 * x1 * v[n, t2, c]


@njit(cache=True, inline="always")
def _pull(g, weights, n, z, k, big_g):
    """big_g[c] = sum_m g[n, m, c] weights[z, k, m, c]."""
    nc = big_g.shape[0]
    for c in range(nc):
        big_g[c] = 0.0
    for m in range(g.shape[1]):
        for c in range(nc):
            big_g[c] += g[n, m, c] * weights[z, k, m, c]


@njit(cache=True, parallel=True, fastmath=_MATH)
def _symc_apply(x, v, elements, weights, tuples, directional, out):
    """out[n, m] = sum_k weights[z_n, k, m] * (mono_k, or its derivative along v)."""
    n_atoms, nc = x.shape[0], x.shape[2]
    for chunk in prange((n_atoms + ROWS - 1) // ROWS):
        mono = np.empty(nc, dtype=x.dtype)
        for n in range(chunk * ROWS, min(n_atoms, (chunk + 1) * ROWS)):
            z = elements[n]
            if z < 0 or z >= weights.shape[0]:
                continue
            for k in range(tuples.shape[0]):
                if directional:
                    _directional(x, v, n, tuples, k, mono)
                else:
                    _monomial(x, n, tuples, k, mono)
                for m in range(out.shape[1]):
                    for c in range(nc):
                        out[n, m, c] += weights[z, k, m, c] * mono[c]


@njit(cache=True, parallel=True, fastmath=_MATH)
def _symc_collect(g, x, v, order, elem_ptr, tuples, directional, out):
    """out[z, k, m] = sum over atoms n of element z of g[n, m] * (mono_k, or its derivative
    along v): one task per (element, block of tuples), atoms in element order."""
    num_z, n_k, nc = out.shape[0], out.shape[1], x.shape[2]
    blocks = (n_k + ROWS - 1) // ROWS
    for task in prange(num_z * blocks):
        z, blk = task // blocks, task % blocks
        mono = np.empty(nc, dtype=x.dtype)
        for t in range(elem_ptr[z], elem_ptr[z + 1]):
            n = order[t]
            for k in range(blk * ROWS, min(n_k, (blk + 1) * ROWS)):
                if directional:
                    _directional(x, v, n, tuples, k, mono)
                else:
                    _monomial(x, n, tuples, k, mono)
                for m in range(out.shape[2]):
                    for c in range(nc):
                        out[z, k, m, c] += g[n, m, c] * mono[c]


@njit(cache=True, parallel=True, fastmath=_MATH)
def _symc_grad_x(g, x, v, elements, weights, tuples, second, out):
    """out[n] = sum_k G_k * d(mono_k)/dx (second: d(mono_k along v)/dx), G_k = sum_m g weights."""
    n_atoms, nc = x.shape[0], x.shape[2]
    for chunk in prange((n_atoms + ROWS - 1) // ROWS):
        big_g = np.empty(nc, dtype=x.dtype)
        for n in range(chunk * ROWS, min(n_atoms, (chunk + 1) * ROWS)):
            z = elements[n]
            if z < 0 or z >= weights.shape[0]:
                continue
            for k in range(tuples.shape[0]):
                _pull(g, weights, n, z, k, big_g)
                deg = _degree(tuples, k)
                t0, t1, t2 = tuples[k, 0], tuples[k, 1], tuples[k, 2]
                if deg == 1:
                    if not second:
                        for c in range(nc):
                            out[n, t0, c] += big_g[c]
                elif deg == 2:
                    if second:
                        for c in range(nc):
                            out[n, t0, c] += big_g[c] * v[n, t1, c]
                            out[n, t1, c] += big_g[c] * v[n, t0, c]
                    else:
                        for c in range(nc):
                            out[n, t0, c] += big_g[c] * x[n, t1, c]
                            out[n, t1, c] += big_g[c] * x[n, t0, c]
                elif second:
                    for c in range(nc):
                        x0, x1, x2 = x[n, t0, c], x[n, t1, c], x[n, t2, c]
                        v0, v1, v2 = v[n, t0, c], v[n, t1, c], v[n, t2, c]
                        gc = big_g[c]
                        out[n, t0, c] += gc * (v1 * x2 + x1 * v2)
                        out[n, t1, c] += gc * (v0 * x2 + x0 * v2)
                        out[n, t2, c] += gc * (v0 * x1 + x0 * v1)
                else:
                    for c in range(nc):
                        x0, x1, x2 = x[n, t0, c], x[n, t1, c], x[n, t2, c]
                        gc = big_g[c]
                        out[n, t0, c] += gc * x1 * x2
                        out[n, t1, c] += gc * x0 * x2
                        out[n, t2, c] += gc * x0 * x1


def _element_rows(elements, num_elements):
    """(atoms in element order, [Z + 1] pointer): the coefficient gradients' summation order."""
    e = elements.detach().cpu().numpy()
    valid = (e >= 0) & (e < num_elements)
    order = np.argsort(np.where(valid, e, num_elements), kind="stable").astype(np.int64)
    counts = np.bincount(e[valid], minlength=num_elements)
    ptr = np.zeros(num_elements + 1, np.int64)
    ptr[1:] = np.cumsum(counts)
    return order, ptr


def symmetric_contraction(x, elements, weights, tuples):
    """Launcher: see reference.py."""
    out = x.new_zeros(x.shape[0], weights.shape[2], x.shape[2])
    if out.numel() and tuples.shape[0]:
        xn = _np(x)
        _symc_apply(xn, xn, _np(elements), _np(weights), _np(tuples), False, out.numpy())
    return out


def symmetric_contraction_vjp(g, x, elements, weights, tuples, need_x, need_weights):
    """Launcher: see reference.py."""
    gx = torch.zeros_like(x) if need_x else x.new_zeros(0)
    gw = torch.zeros_like(weights) if need_weights else x.new_zeros(0)
    if not (x.numel() and tuples.shape[0]):
        return gx, gw
    gn, xn, en, wn, tn = _np(g), _np(x), _np(elements), _np(weights), _np(tuples)
    if need_x:
        _symc_grad_x(gn, xn, xn, en, wn, tn, False, gx.numpy())
    if need_weights:
        order, ptr = _element_rows(elements, weights.shape[0])
        _symc_collect(gn, xn, xn, order, ptr, tn, False, gw.numpy())
    return gx, gw


def symmetric_contraction_vjp_vjp(v, g, x, elements, weights, tuples, need_g, need_x,
                                  need_weights):
    """Launcher: see reference.py."""
    gg = torch.zeros_like(g) if need_g else x.new_zeros(0)
    gx = torch.zeros_like(x) if need_x else x.new_zeros(0)
    gw = torch.zeros_like(weights) if need_weights else x.new_zeros(0)
    if not (x.numel() and tuples.shape[0]):
        return gg, gx, gw
    vn, gn, xn, en, wn, tn = _np(v), _np(g), _np(x), _np(elements), _np(weights), _np(tuples)
    if need_g:
        _symc_apply(xn, vn, en, wn, tn, True, gg.numpy())
    if need_x:
        _symc_grad_x(gn, xn, vn, en, wn, tn, True, gx.numpy())
    if need_weights:
        order, ptr = _element_rows(elements, weights.shape[0])
        _symc_collect(gn, xn, vn, order, ptr, tn, True, gw.numpy())
    return gg, gx, gw


# ---------------------------------------------------------------- tabulated radial weights
@njit(cache=True, inline="always")
def _spline_weights(r, step, intervals, order, wq):
    """Interval of r and wq[q] = d^order/dr^order t^q (t = r / step - k); -1 outside."""
    x = r / step
    if not (r >= 0.0 and x < intervals):
        return -1
    k = min(int(math.floor(x)), intervals - 1)
    t = x - k
    scale = 1.0 / step**order
    for q in range(4):
        if q < order:
            wq[q] = 0.0
        else:
            f = 1.0
            for m in range(order):
                f *= q - m
            wq[q] = f * t ** (q - order) * scale
    return k


@njit(cache=True, parallel=True, fastmath=_MATH)
def _spline_values(d, coeffs, step, order, out):
    """out[e] = table^(order)(d_e)."""
    n_edges, nf, intervals = d.shape[0], coeffs.shape[2], coeffs.shape[0]
    for chunk in prange((n_edges + EDGES - 1) // EDGES):
        wq = np.empty(4)
        for e in range(chunk * EDGES, min(n_edges, (chunk + 1) * EDGES)):
            k = _spline_weights(np.float64(d[e]), step, intervals, order, wq)
            if k < 0:
                out[e] = 0.0
                continue
            w0, w1 = coeffs.dtype.type(wq[0]), coeffs.dtype.type(wq[1])
            w2, w3 = coeffs.dtype.type(wq[2]), coeffs.dtype.type(wq[3])
            for f in range(nf):
                out[e, f] = (w0 * coeffs[k, 0, f] + w1 * coeffs[k, 1, f]
                             + w2 * coeffs[k, 2, f] + w3 * coeffs[k, 3, f])


@njit(cache=True, parallel=True, fastmath=_MATH)
def _spline_dots(grad, d, coeffs, step, order, out):
    """out[e] = <grad[e], table^(order + 1)(d_e)>: the coefficient rows dotted with grad, then
    weighted, so no [F] value is formed."""
    n_edges, nf, intervals = d.shape[0], coeffs.shape[2], coeffs.shape[0]
    for chunk in prange((n_edges + EDGES - 1) // EDGES):
        wq = np.empty(4)
        for e in range(chunk * EDGES, min(n_edges, (chunk + 1) * EDGES)):
            k = _spline_weights(np.float64(d[e]), step, intervals, order + 1, wq)
            acc = 0.0
            if k >= 0:
                for q in range(4):
                    if wq[q] != 0.0:
                        dot = 0.0
                        for f in range(nf):
                            dot += grad[e, f] * coeffs[k, q, f]
                        acc += wq[q] * dot
            out[e] = acc


def radial_spline(distances, coeffs, step, order):
    """Launcher: see reference.py."""
    out = coeffs.new_empty(distances.shape[0], coeffs.shape[2])
    if distances.shape[0]:
        _spline_values(_np(distances), _np(coeffs), float(step), int(order), out.numpy())
    return out


def radial_spline_vjp(grad, distances, coeffs, step, order):
    """Launcher: see reference.py."""
    out = distances.new_empty(distances.shape[0])
    if distances.shape[0]:
        _spline_dots(_np(grad), _np(distances), _np(coeffs), float(step), int(order),
                     out.numpy())
    return out


# ---------------------------------------------------------------- the radial network's SiLU
@njit(cache=True, inline="always")
def _sigmoid32(x):
    """sigmoid(x) of a float32 from exp(-|x|) (no overflow), through cpu_math's vectorizable
    exp (numba's math.exp is a scalar libm call)."""
    e = exp_neg(abs(x))
    r = np.float32(1.0) / (np.float32(1.0) + e)  # one division: the select below vectorizes
    return r if x >= 0 else e * r


@njit(cache=True, inline="always")
def _sigmoid64(x):
    e = math.exp(-abs(x))
    r = 1.0 / (1.0 + e)
    return r if x >= 0 else e * r


@njit(cache=True, inline="always")
def _silu_low(x, s, order):
    """d^order/dx^order silu(x) for order <= 2 given s = sigmoid(x) (closed forms; orders >= 3,
    a third derivative, take _silu_order's loops, which would keep these from vectorizing)."""
    one = s * 0 + 1
    if order == 0:
        return x * s
    if order == 1:
        return s * (one + x * (one - s))
    return s * (one - s) * (2 * one + x * (one - 2 * s))


@njit(cache=True, inline="always")
def _silu_order(x, s, order, coef_n, coef_m):
    """d^order/dx^order silu(x) = x P_n(s) + n P_{n-1}(s), the polynomials by Horner."""
    pn = s * 0
    for q in range(coef_n.shape[0] - 1, -1, -1):
        pn = pn * s + coef_n[q]
    pm = s * 0
    for q in range(coef_m.shape[0] - 1, -1, -1):
        pm = pm * s + coef_m[q]
    return x * pn + order * pm


@njit(cache=True, fastmath=_MATH)
def _silu_block(x, order, coef_n, coef_m, a, b, factors, out, i0, i1):
    """out[i] = a[i] b[i] silu^(order)(x[i]) for i in [i0, i1), with ``factors`` (0, 1 or 2)
    of a, b. One loop per factor count: a loop-invariant branch inside the element loop kept
    LLVM from vectorizing it (2x slower)."""
    if order > 2:
        for i in range(i0, i1):
            v = _silu_order(x[i], _sigmoid64(x[i]), order, coef_n, coef_m)
            out[i] = v * (a[i] if factors > 0 else 1.0) * (b[i] if factors > 1 else 1.0)
    elif factors == 0:
        for i in range(i0, i1):
            out[i] = _silu_low(x[i], _sigmoid64(x[i]), order)
    elif factors == 1:
        for i in range(i0, i1):
            out[i] = _silu_low(x[i], _sigmoid64(x[i]), order) * a[i]
    else:
        for i in range(i0, i1):
            out[i] = _silu_low(x[i], _sigmoid64(x[i]), order) * a[i] * b[i]


@njit(cache=True, fastmath=_MATH)
def _silu_block32(x, order, coef_n, coef_m, a, b, factors, out, i0, i1):
    """float32: as _silu_block with cpu_math's exp, and one loop per (order <= 2, factors): a
    loop-invariant branch inside the element loop kept LLVM from vectorizing it (~2x)."""
    one, two = np.float32(1.0), np.float32(2.0)
    if order > 2:
        for i in range(i0, i1):
            v = _silu_order(x[i], _sigmoid32(x[i]), order, coef_n, coef_m)
            out[i] = v * (a[i] if factors > 0 else one) * (b[i] if factors > 1 else one)
    elif order == 0:
        if factors == 0:
            for i in range(i0, i1):
                out[i] = x[i] * _sigmoid32(x[i])
        elif factors == 1:
            for i in range(i0, i1):
                out[i] = x[i] * _sigmoid32(x[i]) * a[i]
        else:
            for i in range(i0, i1):
                out[i] = x[i] * _sigmoid32(x[i]) * a[i] * b[i]
    elif order == 1:
        if factors == 0:
            for i in range(i0, i1):
                s = _sigmoid32(x[i])
                out[i] = s * (one + x[i] * (one - s))
        elif factors == 1:
            for i in range(i0, i1):
                s = _sigmoid32(x[i])
                out[i] = s * (one + x[i] * (one - s)) * a[i]
        else:
            for i in range(i0, i1):
                s = _sigmoid32(x[i])
                out[i] = s * (one + x[i] * (one - s)) * a[i] * b[i]
    elif factors == 0:
        for i in range(i0, i1):
            s = _sigmoid32(x[i])
            out[i] = s * (one - s) * (two + x[i] * (one - two * s))
    elif factors == 1:
        for i in range(i0, i1):
            s = _sigmoid32(x[i])
            out[i] = s * (one - s) * (two + x[i] * (one - two * s)) * a[i]
    else:
        for i in range(i0, i1):
            s = _sigmoid32(x[i])
            out[i] = s * (one - s) * (two + x[i] * (one - two * s)) * a[i] * b[i]


@njit(cache=True, parallel=True)
def _silu_kernel(x, order, coef_n, coef_m, a, b, factors, out):
    """out = a * b * silu^(order)(x) over flat arrays (a, b = x stand-ins when unused)."""
    n = x.shape[0]
    block = 16 * EDGES
    for chunk in prange((n + block - 1) // block):
        _silu_block(x, order, coef_n, coef_m, a, b, factors, out, chunk * block,
                    min(n, (chunk + 1) * block))


@njit(cache=True, parallel=True)
def _silu_kernel32(x, order, coef_n, coef_m, a, b, factors, out):
    n = x.shape[0]
    block = 16 * EDGES
    for chunk in prange((n + block - 1) // block):
        _silu_block32(x, order, coef_n, coef_m, a, b, factors, out, chunk * block,
                      min(n, (chunk + 1) * block))


def silu_term(x, order, a, b):
    """Launcher: see reference.py. The value and the first backward take torch's own fused
    kernels (their exp is ~1.5x faster than cpu_math's); every other term is one pass here."""
    from fastff.kernels.equivariant.reference import sigmoid_polynomials

    if order == 0 and a is None and b is None:
        return torch.nn.functional.silu(x)
    if order == 1 and (a is None) != (b is None):
        return torch.ops.aten.silu_backward(a if a is not None else b, x)

    polys = sigmoid_polynomials(order)
    dtype = _np(x).dtype
    coef_n = np.asarray(polys[order], dtype)
    coef_m = np.asarray(polys[order - 1] if order else [0.0], dtype)
    xn = _np(x).reshape(-1)
    out = torch.empty_like(x)
    factors = [_np(f).reshape(-1) for f in (a, b) if f is not None]
    if x.numel():
        kernel = _silu_kernel32 if dtype == np.float32 else _silu_kernel
        kernel(xn, int(order), coef_n, coef_m, *(factors + [xn, xn])[:2], len(factors),
               out.numpy().reshape(-1))
    return out
