"""fastff.mm public functions: bad input gets clear errors naming the argument; the functional
API agrees with the op-level reference; energies are scalars or [B]."""

import math

import pytest
import torch

import fastff
import fastff.mm as mm
from fastff.testing import assert_close_scaled


def _water_like(rng, n=12, box=1.4):
    side = math.ceil(n ** (1 / 3))
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pos = ((grid[:n] + 0.5) * box / side
           + torch.as_tensor(rng.uniform(-0.05, 0.05, (n, 3)))).double()
    cell = torch.eye(3, dtype=torch.float64) * box
    q = torch.as_tensor(rng.normal(0, 0.4, n))
    s = torch.as_tensor(rng.uniform(0.2, 0.3, n))
    e = torch.as_tensor(rng.uniform(0.1, 0.8, n))
    return pos, cell, q, s, e


@pytest.fixture
def setup(rng):
    pos, cell, q, s, e = _water_like(rng)
    nl = fastff.neighbor_list(pos, 0.6, cell)
    return pos, cell, nl, q, s, e


def test_nonbonded_is_lj_plus_coulomb(setup):
    pos, cell, nl, q, s, e = setup
    total = mm.nonbonded(pos, nl, q, s, e, cutoff=0.5, cell=cell, switch_distance=0.4)
    parts = (mm.lennard_jones(pos, nl, s, e, cutoff=0.5, cell=cell, switch_distance=0.4)
             + mm.coulomb(pos, nl, q, cutoff=0.5, cell=cell))
    assert total.shape == ()
    assert_close_scaled(total, parts, "mm", torch.float64, "nonbonded")


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_half_and_full_lists_agree(setup, backend):
    pos, cell, nl, q, s, e = setup
    half = fastff.neighbor_list(pos, 0.6, cell, half=True)
    results = []
    for lst in (nl, half):
        x = pos.clone().requires_grad_(True)
        c = cell.clone().requires_grad_(True)
        params = [t.clone().requires_grad_(True) for t in (q, s, e)]
        energy = mm.nonbonded(x, lst, *params, cutoff=0.5, cell=c, switch_distance=0.4,
                              backend=backend)
        results.append([energy, *torch.autograd.grad(energy, [x, c, *params])])
    for a, b in zip(*results, strict=True):
        assert_close_scaled(a, b, "mm", torch.float64, "half vs full")


def test_exceptions_replace_the_pair(setup):
    """An exception with the combined parameters of its pair and plain Coulomb equals the
    plain-Coulomb sum without it; exclusions remove the pair."""
    pos, cell, nl, q, s, e = setup
    d = nl.distances(pos)
    k = int(((nl.i < nl.j) & (d < 0.5)).nonzero()[0, 0])
    a, b = int(nl.i[k]), int(nl.j[k])
    idx = torch.tensor([[b, a]])
    same = (idx, (q[a] * q[b]).view(1), ((s[a] + s[b]) / 2).view(1),
            torch.sqrt(e[a] * e[b]).view(1))
    plain = mm.nonbonded(pos, nl, q, s, e, cutoff=0.5, cell=cell, method="plain")
    with_exc = mm.nonbonded(pos, nl, q, s, e, cutoff=0.5, cell=cell, method="plain",
                            exceptions=same, exceptions_use_pbc=True)  # the pair may cross the cell
    assert_close_scaled(with_exc, plain, "mm", torch.float64, "exception")
    zero = torch.zeros(1, dtype=torch.float64)
    excluded = mm.nonbonded(pos, nl, q, s, e, cutoff=0.5, cell=cell, method="plain",
                            exceptions=(idx, zero, zero, zero))
    r = float(d[k])
    pair = 138.935456 * q[a] * q[b] / r + 4 * same[3] * ((same[2] / r) ** 12 - (same[2] / r) ** 6)
    assert_close_scaled(plain - excluded, pair.view(()), "mm", torch.float64, "exclusion")


def test_bad_parameters(setup):
    pos, cell, nl, q, s, e = setup
    kw = dict(cutoff=0.5, cell=cell)
    with pytest.raises(ValueError, match="sigma"):
        mm.nonbonded(pos, nl, q, s[:-1], e, **kw)
    with pytest.raises(TypeError, match="charges"):
        mm.nonbonded(pos, nl, q.float(), s, e, **kw)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        mm.lennard_jones(pos, nl, s, -e, **kw)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        mm.lennard_jones(pos, nl, -s, e, **kw)
    with pytest.raises(ValueError, match="method"):
        mm.coulomb(pos, nl, q, method="pme", **kw)
    with pytest.raises(ValueError, match="ewald_alpha"):
        mm.coulomb(pos, nl, q, method="ewald_real", **kw)
    with pytest.raises(ValueError, match="switch_distance"):
        mm.lennard_jones(pos, nl, s, e, switch_distance=0.6, **kw)


def test_bad_neighbor_lists(setup):
    pos, cell, nl, q, s, e = setup
    with pytest.raises(ValueError, match="exceeds the neighbor list's cutoff"):
        mm.coulomb(pos, nl, q, cutoff=0.65, cell=cell)
    with pytest.raises(TypeError, match="nl must be a fastff.NeighborList"):
        mm.coulomb(pos, (nl.i, nl.j), q, cutoff=0.5, cell=cell)


def test_reaction_field_cutoff_limit_is_named(rng):
    pos, cell, q, s, e = _water_like(rng, n=8, box=1.0)
    nl = fastff.neighbor_list(pos, 0.6, cell)
    with pytest.raises(ValueError, match=r"half the shortest cell height \(0\.5"):
        mm.coulomb(pos, nl, q, cutoff=0.55, cell=cell)
    mm.coulomb(pos, nl, q, cutoff=0.55, cell=cell, method="ewald_real", ewald_alpha=3.0)


def test_bad_exceptions(setup):
    pos, cell, nl, q, s, e = setup
    one = torch.ones(2, dtype=torch.float64)
    twice = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=r"exceptions name the pair \(0, 1\) more than once"):
        mm.nonbonded(pos, nl, q, s, e, cutoff=0.5, cell=cell, exceptions=(twice, one, one, one))
    with pytest.raises(ValueError, match="exceptions.pairs"):
        mm.nonbonded(pos, nl, q, s, e, cutoff=0.5, cell=cell,
                     exceptions=(torch.tensor([[2, 2], [0, 1]]), one, one, one))
    with pytest.raises(ValueError, match="exceptions.sigma"):
        mm.nonbonded(pos, nl, q, s, e, cutoff=0.5, cell=cell,
                     exceptions=(torch.tensor([[0, 1]]), one[:1], one, one[:1]))


def test_bad_terms(rng):
    pos = torch.as_tensor(rng.uniform(0, 1, (6, 3)))
    k = torch.ones(2, dtype=torch.float64)
    with pytest.raises(IndexError, match="bonds holds index 6"):
        mm.harmonic_bonds(pos, torch.tensor([[0, 1], [5, 6]]), k, k)
    with pytest.raises(ValueError, match=r"angles\[1\] = \[2, 3, 2\] names one atom twice"):
        mm.harmonic_angles(pos, torch.tensor([[0, 1, 2], [2, 3, 2]]), k, k)
    with pytest.raises(ValueError, match=r"torsions must have shape \[T, 4\]"):
        mm.periodic_torsions(pos, torch.tensor([[0, 1, 2]]), k[:1],
                             torch.ones(1, dtype=torch.int64), k[:1])
    with pytest.raises(TypeError, match="bonds must be int64"):
        mm.harmonic_bonds(pos, torch.tensor([[0, 1]], dtype=torch.int32), k[:1], k[:1])
    with pytest.raises(ValueError, match=r"r0 must have shape \[2\]"):
        mm.harmonic_bonds(pos, torch.tensor([[0, 1], [1, 2]]), k, k[:1])
    with pytest.raises(TypeError, match="k has dtype torch.float32"):
        mm.harmonic_bonds(pos, torch.tensor([[0, 1], [1, 2]]), k.float(), k)
    with pytest.raises(ValueError, match="cell must be finite and non-singular"):
        mm.harmonic_bonds(pos, torch.tensor([[0, 1], [1, 2]]), k, k,
                          cell=torch.zeros(3, 3, dtype=torch.float64))


def test_no_checks_still_memory_safe_for_valid_input(setup):
    pos, cell, nl, q, s, e = setup
    with fastff.no_checks():
        a = mm.nonbonded(pos, nl, q, s, e, cutoff=0.5, cell=cell)
    assert_close_scaled(a, mm.nonbonded(pos, nl, q, s, e, cutoff=0.5, cell=cell,
                                        backend="reference"), "mm", torch.float64, "energy")


def test_minimum_image_bonds_with_unwrapped_and_wrapped_positions(rng):
    pos, cell, *_ = _water_like(rng, n=8, box=1.0)
    bonds = torch.tensor([[0, 1], [2, 3], [4, 5]])
    k = torch.full((3,), 1000.0, dtype=torch.float64)
    r0 = torch.full((3,), 0.1, dtype=torch.float64)
    e = mm.harmonic_bonds(pos, bonds, k, r0, cell=cell)
    moved = pos.clone()
    moved[1] += cell[0] - 2 * cell[2]  # a periodic image of atom 1
    assert_close_scaled(mm.harmonic_bonds(moved, bonds, k, r0, cell=cell), e, "mm",
                        torch.float64, "image")


def _molecule_terms(rng, n=12):
    pos = torch.cumsum(torch.as_tensor(rng.uniform(-0.1, 0.1, (n, 3))), 0) + 0.7
    bonds = torch.stack([torch.arange(n - 1), torch.arange(1, n)], 1)
    angles = torch.stack([torch.arange(n - 2), torch.arange(1, n - 1), torch.arange(2, n)], 1)
    torsions = torch.stack([torch.arange(n - 3) + k for k in range(4)], 1)

    def floats(t, lo, hi):
        return torch.as_tensor(rng.uniform(lo, hi, t))

    return pos, dict(
        bonds=(bonds, floats(n - 1, 100, 500), floats(n - 1, 0.1, 0.2)),
        angles=(angles, floats(n - 2, 50, 300), floats(n - 2, 1.5, 2.2)),
        torsions=(torsions, floats(n - 3, 0.5, 5), torch.as_tensor(rng.integers(1, 5, n - 3)),
                  floats(n - 3, -3, 3)))


@pytest.mark.parametrize("periodic", [None, (True, False, True)])
def test_bonded_equals_the_three_terms(rng, periodic):
    pos, terms = _molecule_terms(rng)
    cell = torch.eye(3, dtype=torch.float64) * 1.3
    batch = (torch.arange(pos.shape[0]) >= 6).long()  # terms belong to their first atom
    flags = periodic or (True, True, True)
    expected = (mm.harmonic_bonds(pos, *terms["bonds"], cell=cell if flags[0] else None,
                                  batch=batch)
                + mm.harmonic_angles(pos, *terms["angles"], cell=cell if flags[1] else None,
                                     batch=batch)
                + mm.periodic_torsions(pos, *terms["torsions"],
                                       cell=cell if flags[2] else None, batch=batch))
    got = mm.bonded(pos, **terms, cell=cell, batch=batch, periodic=periodic)
    assert got.shape == (2,)
    assert_close_scaled(got, expected, "mm", torch.float64, "bonded")
    # absent kinds contribute nothing
    only = mm.bonded(pos, angles=terms["angles"])
    assert_close_scaled(only, mm.harmonic_angles(pos, *terms["angles"]), "mm", torch.float64,
                        "angles only")


def test_bonded_bad_input(rng):
    pos, terms = _molecule_terms(rng)
    index, k, theta0 = terms["angles"]
    with pytest.raises(ValueError, match=r"angles.theta0 must have shape \[10\]"):
        mm.bonded(pos, angles=(index, k, theta0[:3]))
    with pytest.raises(ValueError, match=r"torsions must be \(index, k, periodicity, phase\)"):
        mm.bonded(pos, torsions=terms["torsions"][:3])
    with pytest.raises(IndexError, match="bonds.index holds index 12"):
        mm.bonded(pos, bonds=(terms["bonds"][0] + 1, *terms["bonds"][1:]))
    with pytest.raises(ValueError, match="periodicity must be >= 0"):
        t_index, t_k, t_n, t_phase = terms["torsions"]
        mm.bonded(pos, torsions=(t_index, t_k, -t_n, t_phase))
    with pytest.raises(ValueError, match="periodic terms need a cell"):
        mm.bonded(pos, **terms, periodic=(True, False, False))
    with pytest.raises(ValueError, match="periodic must be 3 bools"):
        mm.bonded(pos, **terms, cell=torch.eye(3, dtype=torch.float64), periodic=(True,))
