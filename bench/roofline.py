"""Roofline of fastff's GPU kernels: bytes moved, FLOPs, and the shortest time an H100 or H200
could take, so that a time measured on a GPU can be read against its limit.

    python bench/roofline.py                # the table of the README "Roofline" sections
    python bench/roofline.py --json out.json

A kernel cannot run faster than ``max(bytes / bandwidth, flops / peak)`` (Williams, Waterman &
Patterson, CACM 52 (2009) 65). Bytes are DRAM traffic, counted once per array a kernel streams
(reads of data that the 50 MB L2 cache holds across programs, such as the positions a tile
kernel gathers again and again, are counted once); FLOPs count multiplies, adds and compares
of the arithmetic that must happen (square roots and reciprocals as one each), per pair or
element, as derived in each estimator below. Both are estimates of the work, not
measurements: a measured time close to the roofline time leaves little to gain; a time far
above it points at latency, launch overhead or contention.

Peaks assumed (dense, no sparsity; boost clocks), from NVIDIA's datasheets: H100 SXM5 80 GB
("NVIDIA H100 Tensor Core GPU" datasheet, 2023): HBM3 3.35 TB/s, FP64 34 TFLOP/s (FP64 tensor
67), FP32 67 TFLOP/s, TF32 tensor 495 TFLOP/s (989 with sparsity). H200 SXM 141 GB ("NVIDIA
H200 Tensor Core GPU" datasheet, 2024): HBM3e 4.8 TB/s, compute as the H100 SXM. PCIe cards
are slower (H100 PCIe: 2.0 TB/s, FP32 51 TFLOP/s): scale accordingly.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

GPUS = {
    "H100": {"bandwidth": 3.35e12, "fp32": 67e12, "fp64": 34e12, "tf32": 495e12},
    "H200": {"bandwidth": 4.8e12, "fp32": 67e12, "fp64": 34e12, "tf32": 495e12},
}
_BYTES = {"fp32": 4, "fp64": 8}


@dataclass
class Estimate:
    """The work of one kernel (or fused sequence) on one workload."""

    family: str
    kernel: str
    workload: str
    bytes: float
    flops: float
    precision: str  # which peak bounds the FLOPs: fp32, fp64 or tf32

    def seconds(self, gpu: str) -> float:
        peak = GPUS[gpu]
        return max(self.bytes / peak["bandwidth"], self.flops / peak[self.precision])

    def bound(self, gpu: str) -> str:
        peak = GPUS[gpu]
        memory = self.bytes / peak["bandwidth"]
        return "memory" if memory >= self.flops / peak[self.precision] else "compute"


def neighbor_list(n: int, neighbors: float, *, dtype: str = "fp32", half: bool = False,
                  workload: str | None = None) -> Estimate:
    """Cell list (kernels/neighbors/gpu_triton.py): binning (positions read, wrapped positions,
    images, bins and the order written: ~40 bytes per atom plus a position read per pass), the
    count pass and the fill pass. Bins are one cutoff wide, so an atom tests the atoms of 27
    bins, 27 / (4 pi / 3) = 6.45 times the neighbours within the cutoff; each test costs 11
    operations (3 subtractions, 3 image additions, 3 multiplies, 2 additions) and a compare,
    in both passes. The list written: j, i (8 bytes each), shifts (12) and the distance, per
    pair; ``neighbors`` counts both directions of a pair (a full list)."""
    size = _BYTES[dtype]
    pairs = n * neighbors * (0.5 if half else 1.0)
    candidates = n * 6.45 * neighbors
    bytes_ = n * (3 * size * 3 + 40) + pairs * (8 + 8 + 12 + size) + 8 * n
    flops = 2 * 12 * candidates
    return Estimate("neighbors", "neighbor_list (count + fill + binning)",
                    workload or f"{n:,} atoms, {neighbors:g} neighbours, {dtype}", bytes_, flops,
                    dtype)


def nonbonded_tiles(n: int, density: float, cutoff: float, skin: float, *, dtype: str = "fp32",
                    efficiency: float = 0.35, workload: str | None = None) -> Estimate:
    """Cluster tiles (kernels/nonbonded/gpu_clusters.py), energy and forces of LJ + reaction
    field. Pairs within ``rlist`` per atom (half): 2 pi / 3 density rlist^3; a tile evaluates
    all 32 x 32 lane pairs, of which ``efficiency`` lie within rlist (0.35: OpenMM's CUDA tiles
    at 0.9-1.0 nm in water reach 0.3-0.4). Per evaluated pair, 55 operations: minimum image 9,
    distance 5, reciprocal square root 2, LJ with combining rules 14, reaction field 6, the
    gradient 6 and the i- and j-side sums 6, plus the masks 7. DRAM: positions and parameters
    read (28 bytes per atom in float32), forces written (12, and 12 of partner atomics that
    stay in L2), 8 bytes per tile."""
    size = _BYTES[dtype]
    rlist = cutoff + skin
    pairs = n * (2 * math.pi / 3) * density * rlist ** 3
    tiles = pairs / (1024 * efficiency)
    flops = tiles * 1024 * 55
    bytes_ = n * (4 * size + 4 + 3 * size * 2) + tiles * 8
    return Estimate("nonbonded", "nonbonded_tiles_kernel (energy + forces)",
                    workload or f"{n:,} atoms, {cutoff:g} nm, {dtype}", bytes_, flops, dtype)


def nonbonded_rows(n: int, density: float, cutoff: float, skin: float, *,
                   dtype: str = "fp32", half: bool = True, workload: str | None = None
                   ) -> Estimate:
    """The pair-list kernel (kernels/nonbonded/gpu_triton.py), one row per atom: per listed
    pair (within cutoff + skin), j (8 bytes) and the shift (12) read from DRAM, the partner's
    position and parameters from L2, 45 operations (no minimum image, no tile masks)."""
    size = _BYTES[dtype]
    rlist = cutoff + skin
    pairs = n * (4 * math.pi / 3) * density * rlist ** 3 * (0.5 if half else 1.0)
    bytes_ = pairs * 20 + n * (4 * size + 3 * size * 2 + 8)
    return Estimate("nonbonded", "_nonbonded_rows (energy + forces)",
                    workload or f"{n:,} atoms, {cutoff:g} nm, {'half' if half else 'full'} "
                    f"list, {dtype}", bytes_, pairs * 45, dtype)


def cfconv(n: int, neighbors: float, features: int, basis: int, *,
           workload: str | None = None) -> Estimate:
    """A fused continuous-filter convolution (SchNet), energy and forces, with the filter
    network on TF32 tensor cores: per unordered pair, the two dense layers 2 (K F + F F)
    FLOPs forward; forces need the backward through both layers and the message (about twice
    the forward) and the forward again (recomputed, no [E, F] tensor kept): 4 x forward. The
    message (2 F per edge: multiply and add) and the basis are small beside it. DRAM with no
    [E, F] tensor: features in and out (4 N F bytes each, twice for the backward), the list
    (16 bytes per edge) and the distances."""
    pairs = n * neighbors / 2
    flops = 4 * pairs * 2 * (basis * features + features * features) + 4 * n * neighbors * features
    bytes_ = 4 * 4 * n * features + n * neighbors * (16 + 4)
    return Estimate("message", "cfconv (fused, energy + forces)",
                    workload or f"{n:,} atoms, {neighbors:g} neighbours, F={features}, "
                    f"K={basis}", bytes_, flops, "tf32")


def radial_basis(edges: int, basis: int, *, dtype: str = "fp32",
                 workload: str | None = None) -> Estimate:
    """radial_basis_kernel: E K values written, E distances read; ~20 operations per value
    (a Gaussian: 6 and an exponential; the envelope shared per edge)."""
    size = _BYTES[dtype]
    return Estimate("radial", "radial_basis_kernel", workload or
                    f"{edges:,} edges x {basis} bases, {dtype}", edges * (basis + 1) * size,
                    edges * basis * 20, dtype)


def bonded(n_bonds: int, n_angles: int, n_torsions: int, *, dtype: str = "fp32",
           workload: str | None = None) -> Estimate:
    """Bonds, angles and torsions (kernels/bonded/gpu_triton.py): per term, its indices (8
    bytes per atom), two parameters and two parameter gradients, gathered positions (from
    L2 beyond the first read) and gradient atomics (12 bytes per atom, in L2); ~30, 90 and 200
    operations per bond, angle and torsion (atan2 and the dihedral gradient)."""
    size = _BYTES[dtype]
    per = {2: (n_bonds, 30), 3: (n_angles, 90), 4: (n_torsions, 200)}
    bytes_ = sum(t * (8 * w + 4 * size) for w, (t, _) in per.items())
    flops = sum(t * f for t, f in per.values())
    return Estimate("bonded", "bonded_terms (three kernels)", workload or
                    f"{n_bonds:,} bonds, {n_angles:,} angles, {n_torsions:,} torsions, {dtype}",
                    bytes_, flops, dtype)


def table() -> list[Estimate]:
    """The workloads of the GPU targets and benchmarks: water (100 atoms/nm^3) for MM and
    neighbor lists, a SchNet-sized message passing layer."""
    water = 100.0  # atoms per nm^3 (TIP3P at 0.986 g/cm^3: 33 molecules)
    return [
        neighbor_list(100_000, 50, workload="100,000 atoms, 50 neighbours (full), fp32"),
        neighbor_list(100_000, 50, half=True, workload="100,000 atoms, 50 neighbours, half"),
        neighbor_list(1_000_000, 50, workload="1,000,000 atoms, 50 neighbours (full), fp32"),
        nonbonded_tiles(100_000, water, 0.9, 0.1),
        nonbonded_tiles(100_000, water, 0.9, 0.1, dtype="fp64"),
        nonbonded_rows(100_000, water, 0.9, 0.1),
        bonded(66_667, 33_333, 0, workload="water, 100,000 atoms: 66,667 bonds, 33,333 angles"),
        cfconv(10_000, 50, 128, 32),
        radial_basis(500_000, 32),
        radial_basis(500_000, 32, dtype="fp64"),
    ]


def markdown(rows: list[Estimate], families: set[str] | None = None) -> str:
    lines = ["| kernel | workload | bytes (MB) | GFLOP | bound | H100 (us) | H200 (us) |",
             "|---|---|---|---|---|---|---|"]
    for e in rows:
        if families is not None and e.family not in families:
            continue
        lines.append(f"| {e.kernel} | {e.workload} | {e.bytes / 1e6:.1f} | {e.flops / 1e9:.2f} | "
                     f"{e.bound('H100')} ({e.precision}) | {e.seconds('H100') * 1e6:.1f} | "
                     f"{e.seconds('H200') * 1e6:.1f} |")
    return "\n".join(lines)


def as_dict(e: Estimate) -> dict:
    out = asdict(e)
    for gpu in GPUS:
        out[f"{gpu}_us"] = e.seconds(gpu) * 1e6
        out[f"{gpu}_bound"] = e.bound(gpu)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--family", nargs="*", help="only these families")
    args = parser.parse_args(argv)
    rows = table()
    print(markdown(rows, set(args.family) if args.family else None))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([as_dict(e) for e in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
