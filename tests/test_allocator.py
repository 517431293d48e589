"""fastff.allocator: glibc keeps freed blocks for reuse after tune_malloc (page faults of an
allocation churn, in fresh processes with and without it), and bad thresholds are refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastff import allocator

# Tensors of 0.5-12 MiB allocated, filled and freed in a mixed order of sizes, as the blocked
# kernels' temporaries are; prints the page faults per round after two warm-up rounds.
CHURN = """
import resource, sys, torch
if sys.argv[1] == "tuned":
    from fastff.allocator import malloc_tuned, tune_malloc
    assert tune_malloc() and malloc_tuned()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def churn():
    for mb in (1, 3, 6, 2, 12, 4):
        a = torch.rand(mb << 18)
        b = torch.rand(mb << 17)
        del a
        c = torch.rand(mb << 18)
        del b, c
churn()
churn()
f0 = faults()
for _ in range(10):
    churn()
print((faults() - f0) / 10)
"""

glibc = pytest.mark.skipif(allocator._libc() is None, reason="mallopt is glibc's")


def _faults_per_round(mode: str) -> float:
    proc = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.split()[-1])


@glibc
def test_tuned_malloc_reuses_freed_blocks_instead_of_faulting_in_new_pages():
    default, tuned = _faults_per_round("default"), _faults_per_round("tuned")
    # one round touches ~100 MiB (25,000 pages); glibc's defaults hand much of it back
    assert default > 2000, default
    assert tuned < 0.1 * default, (tuned, default)


def test_bad_thresholds_name_the_argument():
    with pytest.raises(ValueError, match="mmap_threshold"):
        allocator.tune_malloc(mmap_threshold=64 << 20)
    with pytest.raises(ValueError, match="mmap_threshold"):
        allocator.tune_malloc(mmap_threshold=0)
    with pytest.raises(ValueError, match="trim_threshold"):
        allocator.tune_malloc(trim_threshold=-1)
