"""The eager peers of ``fastff bench``: what a user runs instead of fastff.

* SchNet: ``torch_geometric.nn.models.SchNet`` itself (:func:`pyg_schnet`), whose weights a
  fastff SchNet copies through :func:`fastff.interop.pyg.from_pyg`; both get the same pairs.
* PaiNN: :class:`EagerPaiNN`, plain torch with autograd written after schnetpack's code
  (schnetpack does not install here). fastff's reference backend of PaiNN is not that peer: its
  message is a custom op whose backward is a hand-written vector-Jacobian product, so it stays
  the correctness oracle, and this module holds the eager model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fastff.neighbors import NeighborList


def pyg_schnet(num_features: int = 64, num_interactions: int = 3, num_basis: int = 32,
               cutoff: float = 0.5):
    """A ``torch_geometric`` SchNet with fastff SchNet's defaults (F = 64, 3 interactions,
    32 gaussians, cutoff 0.5 in the positions' unit), built under float64 defaults so its
    gaussian grid carries no float32 rounding (see :mod:`fastff.interop.pyg`), in float64."""
    from torch_geometric.nn.models import SchNet

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return SchNet(hidden_channels=num_features, num_filters=num_features,
                      num_interactions=num_interactions, num_gaussians=num_basis, cutoff=cutoff,
                      max_num_neighbors=10**6)
    finally:
        torch.set_default_dtype(default)


def pair_graph(verlet, cell: Tensor | None, pbc: Tensor | None):
    """A torch_geometric ``interaction_graph``: the pairs of fastff's compacting ``verlet`` list
    at the positions given (source j, target i) and their periodic distances (differentiable)."""
    def graph(pos: Tensor, batch: Tensor):
        nl = verlet.update(pos, cell, pbc)
        return torch.stack([nl.j, nl.i]), nl.distances(pos, cell)
    return graph


class EagerPaiNN(nn.Module):
    """PaiNN as schnetpack computes it, in plain torch (autograd for forces), on given pairs.

    The equations of ``schnetpack.representation.PaiNN`` (schnetpack 2.x: ``PaiNNInteraction``,
    ``PaiNNMixing``) and an ``Atomwise`` sum readout, with their tensors: per layer
    ``x = context(q)`` [N, 3F], ``x_ij = W_ij * x_j`` [E, 3F] split into (dq, dmuR, dmumu),
    ``q_i += sum_j dq``, ``mu_i += sum_j dmuR dir_ij + dmumu mu_j`` (index_add), then
    ``(mu_V, mu_W) = mu_channel_mix(mu)``, ``(dq, dmu, dqmu) = intra(cat(q, sqrt(|mu_V|^2 +
    1e-8)))``, ``q += dq + dqmu <mu_V, mu_W>``, ``mu += dmu mu_W``. The filters of all layers come
    from one Linear over the radial basis, times the cosine cutoff, as schnetpack's
    ``filter_net`` with ``shared_filters=False``.

    Hyper-parameters follow fastff's :class:`fastff.models.PaiNN` so that the weights copy
    exactly (:meth:`from_fastff`): the basis is sqrt(2 / c) sin(k pi r / c) / r (schnetpack's
    ``BesselRBF`` without the constant sqrt(2 / c), which its filter weights absorb) and the
    readout activation is the shifted softplus (schnetpack's ``Atomwise`` takes the activation
    as an argument).

    ``forward(species [N], vectors [E, 3], nl)`` -> energy (scalar), with ``vectors`` r_j - r_i
    of ``nl``'s pairs, all within the cutoff.
    """

    def __init__(self, num_features: int, num_interactions: int, num_basis: int, cutoff: float,
                 max_species: int):
        super().__init__()
        f = num_features
        self.num_features, self.num_basis, self.cutoff = f, num_basis, float(cutoff)
        self.embedding = nn.Embedding(max_species, f)
        self.filter_net = nn.Linear(num_basis, num_interactions * 3 * f)
        self.context = nn.ModuleList(
            nn.Sequential(nn.Linear(f, f), nn.SiLU(), nn.Linear(f, 3 * f))
            for _ in range(num_interactions))
        self.mu_channel_mix = nn.ModuleList(nn.Linear(f, 2 * f, bias=False)
                                            for _ in range(num_interactions))
        self.intra = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * f, f), nn.SiLU(), nn.Linear(f, 3 * f))
            for _ in range(num_interactions))
        self.readout: nn.Module = nn.Identity()

    @classmethod
    def from_fastff(cls, model) -> EagerPaiNN:
        """The same function as a :class:`fastff.models.PaiNN` (its weights copied)."""
        f = model.num_features
        messages: list[Any] = list(model.messages)
        updates: list[Any] = list(model.updates)
        ref = model.embedding.weight
        out = cls(f, len(messages), messages[0].num_basis, model.cutoff, model.max_species
                  ).to(ref.device, ref.dtype)
        context: list[Any] = list(out.context)
        mix: list[Any] = list(out.mu_channel_mix)
        intra: list[Any] = list(out.intra)
        with torch.no_grad():
            out.embedding.weight.copy_(model.embedding.weight)
            out.filter_net.weight.copy_(torch.cat([m.filter.weight for m in messages], 0))
            out.filter_net.bias.copy_(torch.cat([m.filter.bias for m in messages], 0))
            for k, (message, update) in enumerate(zip(messages, updates, strict=True)):
                context[k].load_state_dict(message.context.state_dict())
                # schnetpack's (mu_V, mu_W): V gives the norm, W multiplies; fastff's V and U
                mix[k].weight.copy_(torch.cat([update.V.weight, update.U.weight]))
                intra[k][0].load_state_dict(update.mlp[0].state_dict())
                # fastff splits (a_vv, a_sv, a_ss), schnetpack (dq, dmu, dqmu) = (a_ss, a_vv, a_sv)
                w, b = update.mlp[2].weight, update.mlp[2].bias
                order = torch.cat([torch.arange(2 * f, 3 * f), torch.arange(0, f),
                                   torch.arange(f, 2 * f)])
                intra[k][2].weight.copy_(w[order])
                intra[k][2].bias.copy_(b[order])
        import copy

        out.readout = copy.deepcopy(model.readout)
        return out

    def forward(self, species: Tensor, vectors: Tensor, nl: NeighborList) -> Tensor:
        f = self.num_features
        idx_i, idx_j = nl.i, nl.j
        d = torch.linalg.vector_norm(vectors, dim=1)
        dir_ij = vectors / d.unsqueeze(1)
        k = torch.arange(1, self.num_basis + 1, dtype=d.dtype, device=d.device)
        phi = math.sqrt(2.0 / self.cutoff) * torch.sin(
            k * (math.pi / self.cutoff) * d.unsqueeze(1)) / d.unsqueeze(1)
        fcut = 0.5 * (torch.cos(d * (math.pi / self.cutoff)) + 1.0)
        filters = torch.split(self.filter_net(phi) * fcut.unsqueeze(1), 3 * f, dim=1)
        q = self.embedding(species)
        mu = q.new_zeros(q.shape[0], 3, f)
        for layer, w in enumerate(filters):
            x = self.context[layer](q).index_select(0, idx_j) * w
            dq, dmu_r, dmu_mu = torch.split(x, f, dim=1)
            q = q.index_add(0, idx_i, dq)
            dmu = dmu_r.unsqueeze(1) * dir_ij.unsqueeze(2) \
                + dmu_mu.unsqueeze(1) * mu.index_select(0, idx_j)
            mu = mu.index_add(0, idx_i, dmu)
            mu_v, mu_w = torch.split(self.mu_channel_mix[layer](mu), f, dim=2)
            norm = torch.sqrt((mu_v * mu_v).sum(1) + 1e-8)
            dq_intra, dmu_intra, dqmu_intra = torch.split(
                self.intra[layer](torch.cat([q, norm], 1)), f, dim=1)
            q = q + dq_intra + dqmu_intra * (mu_v * mu_w).sum(1)
            mu = mu + dmu_intra.unsqueeze(1) * mu_w
        return self.readout(q).sum()
