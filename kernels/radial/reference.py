"""Radial bases and envelopes in pure torch: the float64-safe definition of "correct".

Closed forms for derivatives of any order (README.md beside this file); autograd-native, so
order 0 can also be differentiated by torch itself, which the tests use as an independent check
of the closed forms. Memory: a few [E, K] temporaries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# DimeNet's polynomial envelope with p = 6: u(x) = 1 + sum_q coef_q x^q
POLY_TERMS = ((6, -28.0), (7, 48.0), (8, -21.0))


def gaussian_grid(num_basis: int, cutoff: float) -> tuple[float, float]:
    """(spacing Δ, width γ) of the gaussian basis."""
    delta = cutoff / (num_basis - 1) if num_basis > 1 else cutoff
    return delta, 0.5 / (delta * delta)


def envelope_derivatives(r: Tensor, cutoff: float, envelope: str, order: int) -> list[Tensor]:
    """[u, u', ..., u^(order)] of the envelope, each [E]; zero for r >= cutoff."""
    inside = r < cutoff
    out = []
    for m in range(order + 1):
        if envelope == "none":
            out.append(torch.ones_like(r) if m == 0 else torch.zeros_like(r))
            continue
        if envelope == "cosine":
            w = math.pi / cutoff
            val = 0.5 * w**m * torch.cos(w * r + m * math.pi / 2)
            if m == 0:
                val = val + 0.5
        elif envelope == "polynomial":
            x = r / cutoff
            val = torch.ones_like(r) if m == 0 else torch.zeros_like(r)
            for q, coef in POLY_TERMS:
                if m <= q:
                    val = val + coef * math.perm(q, m) * x ** (q - m) / cutoff**m
        else:
            raise ValueError(f"envelope must be 'cosine', 'polynomial' or 'none', got {envelope!r}")
        out.append(torch.where(inside, val, torch.zeros_like(val)))
    return out


def basis_derivatives(r: Tensor, num_basis: int, cutoff: float, kind: str,
                      order: int) -> list[Tensor]:
    """[b, b', ..., b^(order)] of the basis, each [E, K]."""
    r2 = r.unsqueeze(1)
    if kind == "gaussian":
        delta, gamma = gaussian_grid(num_basis, cutoff)
        mu = torch.arange(num_basis, dtype=r.dtype, device=r.device) * delta
        s = math.sqrt(gamma)
        z = s * (r2 - mu)
        e = torch.exp(-z * z)
        hermite = [torch.ones_like(z), 2 * z]
        for m in range(1, order):
            hermite.append(2 * z * hermite[m] - 2 * m * hermite[m - 1])
        return [(-s) ** n * hermite[n] * e for n in range(order + 1)]
    if kind == "bessel":
        a = torch.arange(1, num_basis + 1, dtype=r.dtype, device=r.device) * (math.pi / cutoff)
        norm = math.sqrt(2.0 / cutoff)
        tiny = r2.abs() < 1e-12
        rs = torch.where(tiny, torch.ones_like(r2), r2)
        out = []
        for n in range(order + 1):
            acc = torch.zeros_like(a * rs)
            for m in range(n + 1):
                acc = acc + (math.comb(n, m) * a**m * torch.sin(a * rs + m * math.pi / 2)
                             * ((-1) ** (n - m) * math.factorial(n - m)) / rs ** (n - m + 1))
            # limits at r -> 0 of (sin(ar)/r)^(n): a^(n+1) (-1)^(n/2) / (n+1) for even n, else 0
            limit = (a ** (n + 1) * ((-1) ** (n // 2)) / (n + 1)) if n % 2 == 0 else a * 0
            out.append(norm * torch.where(tiny, limit.expand_as(acc), acc))
        return out
    raise ValueError(f"kind must be 'gaussian' or 'bessel', got {kind!r}")


def radial_basis(distances: Tensor, num_basis: int, cutoff: float, kind: str, envelope: str,
                 order: int) -> Tensor:
    """Launcher: d^order/dr^order [u(r) b_k(r)], [E, K]. See README.md."""
    b = basis_derivatives(distances, num_basis, cutoff, kind, order)
    u = envelope_derivatives(distances, cutoff, envelope, order)
    out = torch.zeros_like(b[0])
    for m in range(order + 1):
        out = out + math.comb(order, m) * u[m].unsqueeze(1) * b[order - m]
    return out
