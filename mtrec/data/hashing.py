"""splitmix64, vectorized: the one integer hash behind id -> embedding row (mtrec.data.batch) and
per-row sampling (mtrec.train.sampling).

Example:
    >>> hex(int(splitmix64(np.zeros(1, np.uint64))[0]))   # splitmix64's first output from seed 0
    '0xe220a8397b1dcdaf'
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every element (x + golden gamma, then the xor-shift-multiply finalizer),
    wrapping modulo 2**64. Same shape.

    Raises:
        TypeError: `x` is not uint64 (an int64 operand would turn the arithmetic into float64).
    """
    if x.dtype != np.uint64:
        raise TypeError(f"splitmix64 needs a uint64 array, got {x.dtype}; view int64 ids as uint64 first")
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))
