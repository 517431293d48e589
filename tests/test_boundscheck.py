"""The numba kernels never index out of bounds: rerun neighbor-list and compaction tests, the
fused spline backward's, the PaiNN message's, cfconv's, the radial bases', the positions-based
spline kernels' and the cluster-pair builder's with NUMBA_BOUNDSCHECK=1.

Bounds checking is a compile-time flag that numba's on-disk cache does not key on, so the
subprocess compiles into its own cache directory.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _bounds_checked(tmp_path, test_file: str, selection: str) -> None:
    """Run tests/kernels/<test_file> -k <selection> with NUMBA_BOUNDSCHECK=1; they must pass."""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           str(ROOT / "kernels" / test_file), "-k", selection]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_neighbor_kernels_pass_with_boundscheck(tmp_path):
    # compaction: periodic, small cells, batches, near-cutoff mirrors, out-of-range neighbours
    _bounds_checked(tmp_path, "test_neighbors.py",
                    "(numba and (tiny or triclinic or smaller or mixed or batch or outside or "
                    "parallel or gradcheck or opcheck or compact)) or compact_keeps_mirrors or "
                    "compact_opcheck")


def test_fused_message_kernels_pass_with_boundscheck(tmp_path):
    # spline backward: planted edges beyond the cutoff, d_rev != d, an out-of-range sender, an
    # empty edge set; PaiNN message: rows split across blocks, d_rev != d, an out-of-range sender;
    # cfconv's pair kernels: pairs split across blocks, skewed mirrors, an out-of-range pair end;
    # the fused activation and filter terms: sizes that are not a multiple of its chunk
    _bounds_checked(tmp_path, "test_message.py",
                    "numba and (spline_conv_vjp or fused_backward or painn_launchers or "
                    "painn_out_of_range or launchers_match or cfconv_out_of_range or "
                    "fused_activation or fused_filter_terms or second_order_terms)")


def test_radial_kernels_pass_with_boundscheck(tmp_path):
    # every order of both recurrences, one pass or one order at a time, distances at zero and
    # beyond the cutoff
    _bounds_checked(tmp_path, "test_radial.py", "numba and (one_pass or matches_reference)")


def test_positions_spline_kernels_pass_with_boundscheck(tmp_path):
    # per-row geometry buffers, cells smaller than twice the cutoff, batches, an out-of-range
    # sender
    _bounds_checked(tmp_path, "test_message_positions.py",
                    "numba and (launchers or out_of_range)")


def test_cluster_build_and_kernel_pass_with_boundscheck(tmp_path):
    # the builder writes each chunk's entries within cluster-level bounds: checked here
    _bounds_checked(tmp_path, "test_nonbonded_clusters.py", "(matches and numba) or listed_once")
