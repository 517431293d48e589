"""float32 exp and log1p that LLVM vectorizes inside numba loops (numba's math.exp and
math.log1p are scalar libm calls, ~8-10x slower per element in a float32 loop).

* exp(-y) = 2^-n exp(-r), r = y - n ln2 in [0, ln2) (Cody-Waite split of ln2), exp(-r) by its
  degree-8 Taylor polynomial (truncation < 1e-7 relative), 2^-n by writing the exponent bits;
  y is clamped at 87 (exp(-y) >= 1.6e-38, never a denormal);
* log1p(e) for e in [0, 1] as 2 atanh(t), t = e / (2 + e) <= 1/3, odd series to t^17
  (truncation < 1e-9).

Used by the filter networks' activation (message/cpu_numba_activation.py) and the gaussian
radial basis (radial/cpu_numba.py). Errors are within a few float32 ulp (their tests).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

import fastff.kernels.cpu_threads  # noqa: F401  (numba's OpenMP layer first)

F32 = np.float32
_LOG2E = F32(1.0 / math.log(2.0))
_LN2_HI, _LN2_LO = F32(0.693145751953125), F32(1.428606765330187e-06)  # ln2 = HI + LO


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret an int32 as the float32 with those bits (vectorizes, unlike a libm ldexp)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, inline="always", fastmath={"contract"})
def exp_neg(y):
    """exp(-y) for float32 y >= 0."""
    y = min(y, F32(87.0))
    n = np.floor(y * _LOG2E)
    q = n * _LN2_LO - (y - n * _LN2_HI)  # -r
    p = F32(2.48015873015873e-05)  # 1 / 8!
    p = p * q + F32(1.984126984126984e-04)
    p = p * q + F32(1.388888888888889e-03)
    p = p * q + F32(8.333333333333333e-03)
    p = p * q + F32(4.1666666666666664e-02)
    p = p * q + F32(0.16666666666666666)
    p = p * q + F32(0.5)
    p = p * q + F32(1.0)
    p = p * q + F32(1.0)
    return p * _float32_from_bits((np.int32(127) - np.int32(n)) << np.int32(23))


@njit(cache=True, inline="always", fastmath={"contract"})
def log1p_unit(e):
    """log(1 + e) for float32 e in [0, 1]."""
    t = e / (F32(2.0) + e)
    t2 = t * t
    p = F32(2.0 / 17.0)
    p = p * t2 + F32(2.0 / 15.0)
    p = p * t2 + F32(2.0 / 13.0)
    p = p * t2 + F32(2.0 / 11.0)
    p = p * t2 + F32(2.0 / 9.0)
    p = p * t2 + F32(2.0 / 7.0)
    p = p * t2 + F32(2.0 / 5.0)
    p = p * t2 + F32(2.0 / 3.0)
    p = p * t2 + F32(2.0)
    return p * t
