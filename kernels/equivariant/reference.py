"""Equivariant messages in pure torch: the float64-safe definition of "correct".

Every launcher here is written with differentiable torch ops (gathers, einsums, index_add), so
autograd through it gives every higher derivative: op.py uses these formulas as the composite
path where no fused kernel exists (third derivatives of the symmetric contraction, second
derivatives of the spherical harmonics in the vectors). The tests check the explicit gradient
formulas against torch autograd of the forward definitions. Memory: [E, D, C] and [N, K, C]
temporaries, so this is an oracle for small systems, not a fast path. Maths in README.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# torch.nn.functional.normalize's eps, which e3nn's SphericalHarmonics(normalize=True) uses
NORM_EPS = 1e-12

_S3, _S5, _C1, _C2 = math.sqrt(3.0), math.sqrt(5.0), math.sqrt(5.0 / 6.0), math.sqrt(3.0 / 8.0)


# ---------------------------------------------------------------- spherical harmonics
def _harmonics_of_unit(u: Tensor, lmax: int) -> tuple[Tensor, Tensor]:
    """(Y [E, (lmax+1)^2], dY/du [E, (lmax+1)^2, 3]) of e3nn's polynomials at u (not
    renormalised), with the "component" normalisation sqrt(2l + 1) applied."""
    x, y, z = u.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    values = [one]
    grads = [(zero, zero, zero)]
    if lmax >= 1:
        values += [_S3 * x, _S3 * y, _S3 * z]
        grads += [(_S3 * one, zero, zero), (zero, _S3 * one, zero), (zero, zero, _S3 * one)]
    if lmax >= 2:
        a = [_S3 * x * z, _S3 * x * y, y * y - 0.5 * (x * x + z * z), _S3 * y * z,
             0.5 * _S3 * (z * z - x * x)]
        da = [(_S3 * z, zero, _S3 * x), (_S3 * y, _S3 * x, zero), (-x, 2 * y, -z),
              (zero, _S3 * z, _S3 * y), (-_S3 * x, zero, _S3 * z)]
        values += [_S5 * t for t in a]
        grads += [(_S5 * gx, _S5 * gy, _S5 * gz) for gx, gy, gz in da]
    if lmax >= 3:
        q = 4 * y * y - x * x - z * z
        dq = (-2 * x, 8 * y, -2 * z)
        ex, ey, ez = (one, zero, zero), (zero, one, zero), (zero, zero, one)

        def comb(*terms):  # sum of coef * (f * grad g): terms (coef, f, grad g)
            return tuple(sum(c * f * g[k] for c, f, g in terms) for k in range(3))

        b = [_C1 * (a[0] * z + a[4] * x), _S5 * a[0] * y, _C2 * q * x,
             0.5 * y * (2 * y * y - 3 * (x * x + z * z)), _C2 * z * q, _S5 * a[4] * y,
             _C1 * (a[4] * z - a[0] * x)]
        db = [comb((_C1, z, da[0]), (_C1, a[0], ez), (_C1, x, da[4]), (_C1, a[4], ex)),
              comb((_S5, y, da[0]), (_S5, a[0], ey)),
              comb((_C2, x, dq), (_C2, q, ex)),
              (-3 * x * y, 3 * y * y - 1.5 * (x * x + z * z), -3 * y * z),
              comb((_C2, z, dq), (_C2, q, ez)),
              comb((_S5, y, da[4]), (_S5, a[4], ey)),
              comb((_C1, z, da[4]), (_C1, a[4], ez), (-_C1, x, da[0]), (-_C1, a[0], ex))]
        s7 = math.sqrt(7.0)
        values += [s7 * t for t in b]
        grads += [tuple(s7 * t for t in g) for g in db]
    if lmax > 3:
        raise ValueError(f"lmax must be 0..3, got {lmax}")
    return torch.stack(values, -1), torch.stack([torch.stack(g, -1) for g in grads], -2)


def _unit(vectors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(u, r, inside) with u = v / max(|v|, eps) as torch.nn.functional.normalize; ``inside``
    where |v| > eps (there the map's Jacobian is (I - u u^T) / |v|, elsewhere I / eps)."""
    r = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    inside = r > NORM_EPS
    rr = torch.where(inside, r, torch.full_like(r, NORM_EPS))
    return vectors / rr, rr, inside


def _unit_vjp(gu: Tensor, u: Tensor, rr: Tensor, inside: Tensor) -> Tensor:
    tangential = gu - u * (u * gu).sum(-1, keepdim=True)
    return torch.where(inside, tangential, gu) / rr


def spherical_harmonics(vectors, lmax):
    """Launcher: Y(v / |v|) [E, (lmax+1)^2], e3nn's order and "component" normalisation."""
    u, _, _ = _unit(vectors)
    return _harmonics_of_unit(u, lmax)[0].contiguous()


def spherical_harmonics_vjp(grad, vectors, lmax):
    """Launcher: sum_m grad[e, m] dY_m/dv [E, 3]."""
    u, rr, inside = _unit(vectors)
    dy = _harmonics_of_unit(u, lmax)[1]
    return _unit_vjp(torch.einsum("em,emk->ek", grad, dy), u, rr, inside).contiguous()


def spherical_harmonics_jvp(tangent, vectors, lmax):
    """Launcher: dY/dv . tangent [E, (lmax+1)^2]."""
    u, rr, inside = _unit(vectors)
    dy = _harmonics_of_unit(u, lmax)[1]
    du = _unit_vjp(tangent, u, rr, inside)  # the unit map's Jacobian is symmetric
    return torch.einsum("emk,ek->em", dy, du).contiguous()


# ---------------------------------------------------------------- tensor-product convolution
def _coupled(coupling: Tensor, first: Tensor, y: Tensor) -> Tensor:
    """[E, Dout, C]: sum_{a, m} coupling[a, m, b] first[e, a, c] y[e, m]."""
    return torch.einsum("amb,eac,em->ebc", coupling, first, y)


def _edge_rows(w: Tensor, w_row: Tensor) -> Tensor:
    """[E, P, C]: each edge's row of w (w itself when w_row is empty)."""
    return w.index_select(0, w_row) if w_row.numel() else w


def tp_conv(x, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender, sender_ptr,
            w_row, w_partner, coupling, out_path):
    """Launcher: out[r] = sum_{e: receivers_e = r} w[row_e, path(b)] * (x[senders_e] (x) y_e)_b,
    [N, Dout, C], row_e = w_row[e] (e when w_row is empty; w_partner is the kernels' concern)."""
    msg = _coupled(coupling, x[senders], y) * _edge_rows(w, w_row)[:, out_path, :]
    out = x.new_zeros(receiver_ptr.shape[0] - 1, coupling.shape[2], x.shape[2])
    return out.index_add(0, receivers, msg)


def tp_conv_sender(g, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender,
                   sender_ptr, w_row, w_partner, coupling, out_path):
    """Launcher: the x-gradient of sum <g, tp_conv(x, y, w)>, [N, Din, C]."""
    weighted = g[receivers] * _edge_rows(w, w_row)[:, out_path, :]
    per_edge = torch.einsum("amb,em,ebc->eac", coupling, y, weighted)
    out = g.new_zeros(sender_ptr.shape[0] - 1, coupling.shape[0], g.shape[2])
    return out.index_add(0, senders, per_edge)


def tp_conv_vjp(g, x, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender,
                sender_ptr, w_row, w_partner, coupling, out_path, need_x, need_y, need_w):
    """Launcher: (x-gradient [N, Din, C], y-gradient [E, nY], w-gradient [rows of w, P, C]) of
    sum <g, tp_conv(x, y, w)>, each an empty [0] tensor unless asked for."""
    gr, xs = g[receivers], x[senders]
    gx, gy, gw = g.new_zeros(0), g.new_zeros(0), g.new_zeros(0)
    if need_x:
        gx = tp_conv_sender(g, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender,
                            sender_ptr, w_row, w_partner, coupling, out_path)
    if need_y:
        gy = torch.einsum("amb,eac,ebc->em", coupling, xs,
                          gr * _edge_rows(w, w_row)[:, out_path, :]).contiguous()
    if need_w:
        per_out = _coupled(coupling, xs, y) * gr
        per_edge = g.new_zeros(y.shape[0], *w.shape[1:]).index_add(1, out_path, per_out)
        gw = g.new_zeros(w.shape).index_add(0, w_row, per_edge) if w_row.numel() else per_edge
    return gx, gy, gw


# ---------------------------------------------------------------- symmetric contraction
def _padded(t: Tensor, fill: float) -> Tensor:
    """[N, D + 1, C]: t with one more row of ``fill`` (what a tuple's -1 entries read)."""
    return torch.cat([t, torch.full_like(t[:, :1], fill)], 1)


def _slots(tuples: Tensor, dim: int) -> Tensor:
    return torch.where(tuples < 0, torch.full_like(tuples, dim), tuples)


def _monomials(x: Tensor, tuples: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
    """(mono [N, K, C], the factors [N, K, C] at each of the 3 positions, slots [K, 3])."""
    slots = _slots(tuples, x.shape[1])
    xp = _padded(x, 1.0)
    factors = [xp[:, slots[:, q]] for q in range(3)]
    return factors[0] * factors[1] * factors[2], factors, slots


def _by_element(elements: Tensor, num_elements: int):
    for z in range(num_elements):
        rows = (elements == z).nonzero().flatten()
        if rows.numel():
            yield z, rows


def _apply(weights, elements, per_atom):
    """[N, M, C]: sum_k weights[z_n, k, m, c] per_atom[n, k, c]."""
    out = per_atom.new_zeros(per_atom.shape[0], weights.shape[2], per_atom.shape[2])
    for z, rows in _by_element(elements, weights.shape[0]):
        out = out.index_add(0, rows, torch.einsum("nkc,kmc->nmc", per_atom[rows], weights[z]))
    return out


def _collect(g, elements, per_atom, weights):
    """[Z, K, M, C]: sum_{n: z_n = z} g[n, m, c] per_atom[n, k, c]."""
    out = weights.new_zeros(weights.shape)
    for z, rows in _by_element(elements, weights.shape[0]):
        part = torch.einsum("nmc,nkc->kmc", g[rows], per_atom[rows])
        out = out.index_add(0, torch.tensor([z], device=out.device), part.unsqueeze(0))
    return out


def _to_rows(per_slot: list[Tensor], slots: Tensor, like: Tensor) -> Tensor:
    """[N, D, C]: sum over positions q of per_slot[q][n, k, c] added at row slots[k, q]."""
    out = _padded(like.new_zeros(like.shape), 0.0)
    for q in range(3):
        out = out.index_add(1, slots[:, q], per_slot[q])
    return out[:, :-1]


def symmetric_contraction(x, elements, weights, tuples):
    """Launcher: out[n, m, c] = sum_k weights[z_n, k, m, c] prod_q x[n, tuples[k, q], c]
    (entries -1 read 1), [N, M, C]."""
    return _apply(weights, elements, _monomials(x, tuples)[0])


def _others(factors: list[Tensor], q: int) -> Tensor:
    a, b = (factors[t] for t in range(3) if t != q)
    return a * b


def symmetric_contraction_vjp(g, x, elements, weights, tuples, need_x, need_weights):
    """Launcher: (x-gradient [N, D, C], weights-gradient [Z, K, M, C]) of
    sum <g, symmetric_contraction(x)>, each an empty [0] tensor unless asked for."""
    mono, factors, slots = _monomials(x, tuples)
    gx, gw = x.new_zeros(0), x.new_zeros(0)
    if need_x:
        big_g = _pull(g, elements, weights)
        gx = _to_rows([big_g * _others(factors, q) for q in range(3)], slots, x).contiguous()
    if need_weights:
        gw = _collect(g, elements, mono, weights)
    return gx, gw


def _pull(g, elements, weights):
    """G [N, K, C] = sum_m g[n, m, c] weights[z_n, k, m, c]."""
    out = g.new_zeros(g.shape[0], weights.shape[1], g.shape[2])
    for z, rows in _by_element(elements, weights.shape[0]):
        out = out.index_add(0, rows, torch.einsum("nmc,kmc->nkc", g[rows], weights[z]))
    return out


def symmetric_contraction_vjp_vjp(v, g, x, elements, weights, tuples, need_g, need_x,
                                  need_weights):
    """Launcher: the (g, x, weights) gradients of sum <v, gx>, gx the x-gradient of
    symmetric_contraction_vjp; each an empty [0] tensor unless asked for."""
    _, factors, slots = _monomials(x, tuples)
    vp = _padded(v, 0.0)
    tangents = [vp[:, slots[:, q]] for q in range(3)]
    # J = d mono along v; dJ_q its derivative in the factor at position q
    jac = sum(tangents[q] * _others(factors, q) for q in range(3))
    gg, gx, gw = x.new_zeros(0), x.new_zeros(0), x.new_zeros(0)
    if need_g:
        gg = _apply(weights, elements, jac)
    if need_weights:
        gw = _collect(g, elements, jac, weights)
    if need_x:
        big_g = _pull(g, elements, weights)
        per_slot = []
        for q in range(3):
            a, b = (t for t in range(3) if t != q)
            per_slot.append(big_g * (tangents[a] * factors[b] + factors[a] * tangents[b]))
        gx = _to_rows(per_slot, slots, x).contiguous()
    return gg, gx, gw


# ---------------------------------------------------------------- tabulated radial weights
def _spline_terms(distances: Tensor, coeffs: Tensor, step: float, order: int):
    """(interval coefficients [E, 4, F], powers-of-t weights [E, 4], inside mask [E])."""
    intervals = coeffs.shape[0]
    x = distances / step
    inside = (distances >= 0) & (x < intervals)
    k = torch.clamp(torch.floor(x), 0, intervals - 1).long()
    t = x - k.to(x.dtype)
    # d^order/dt^order of t^q, q = 0..3, over step^order
    weights = []
    for q in range(4):
        if q < order:
            weights.append(torch.zeros_like(t))
        else:
            weights.append(math.perm(q, order) * t ** (q - order))
    return coeffs[k], torch.stack(weights, 1) / step**order, inside


def radial_spline(distances, coeffs, step, order):
    """Launcher: d^order/dr^order of the cubic table at each distance, [E, F]: on interval
    k = floor(r / step), t = r / step - k, value sum_q coeffs[k, q] t^q; zero outside
    [0, step * len(coeffs))."""
    rows, weights, inside = _spline_terms(distances, coeffs, step, order)
    value = torch.einsum("eqf,eq->ef", rows, weights)
    return torch.where(inside.unsqueeze(1), value, torch.zeros_like(value)).contiguous()


def radial_spline_vjp(grad, distances, coeffs, step, order):
    """Launcher: sum_f grad[e, f] d^(order+1)/dr^(order+1) table_f(r_e), [E]."""
    return (grad * radial_spline(distances, coeffs, step, order + 1)).sum(1)


def _table_weights(distances, coeffs, step, channels):
    w = radial_spline(distances, coeffs, step, 0)
    return w.reshape(w.shape[0], -1, channels)


def tp_conv_spline(x, y, distances, coeffs, step, senders, receivers, by_receiver,
                   receiver_ptr, by_sender, sender_ptr, coupling, out_path):
    """Launcher: tp_conv with w = radial_spline(distances, coeffs, step, 0) viewed [E, P, C]."""
    w = _table_weights(distances, coeffs, step, x.shape[2])
    none = senders.new_empty(0)
    return tp_conv(x, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender, sender_ptr,
                   none, none, coupling, out_path)


def tp_conv_spline_vjp(g, x, y, distances, coeffs, step, senders, receivers, by_receiver,
                       receiver_ptr, by_sender, sender_ptr, coupling, out_path, need_x, need_y,
                       need_d):
    """Launcher: (x-, y- and distance-gradient) of sum <g, tp_conv_spline(...)>, each an empty
    [0] tensor unless asked for."""
    w = _table_weights(distances, coeffs, step, g.shape[2])
    none = senders.new_empty(0)
    gx, gy, gw = tp_conv_vjp(g, x, y, w, senders, receivers, by_receiver, receiver_ptr,
                             by_sender, sender_ptr, none, none, coupling, out_path, need_x,
                             need_y, need_d)
    gd = g.new_zeros(0)
    if need_d:
        gd = radial_spline_vjp(gw.reshape(gw.shape[0], -1), distances, coeffs, step, 0)
    return gx, gy, gd


# ---------------------------------------------------------------- the radial network's SiLU
def sigmoid_polynomials(order: int) -> list[list[float]]:
    """Coefficients (ascending powers of s) of the polynomials P_k(s) = d^k/dx^k sigmoid(x),
    s = sigmoid(x), for k = 0..order: P_0 = s, P_{k+1} = P_k'(s) s (1 - s)."""
    polys = [[0.0, 1.0]]
    for _ in range(order):
        p = polys[-1]
        dp = [q * p[q] for q in range(1, len(p))]  # P'(s), ascending
        nxt = [0.0] * (len(dp) + 2)
        for q, c in enumerate(dp):  # times s - s^2
            nxt[q + 1] += c
            nxt[q + 2] -= c
        polys.append(nxt)
    return polys


def silu_term(x, order, a, b):
    """Launcher: a * b * d^order/dx^order silu(x) (a missing factor is 1), elementwise:
    silu^(n) = x s^(n) + n s^(n-1), s = sigmoid(x)."""
    s = torch.sigmoid(x)
    polys = sigmoid_polynomials(order)

    def poly(k):
        return sum(c * s**q for q, c in enumerate(polys[k]) if c)

    value = x * poly(order) + (order * poly(order - 1) if order else 0)
    for factor in (a, b):
        if factor is not None:
            value = value * factor
    return value.contiguous()
