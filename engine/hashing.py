"""splitmix64: the one integer mixer behind every seeded choice in cellray.

The store's shuffle (a Feistel permutation), the validation split (a stable hash of the cell id) and the
masking kernel's random stream all mix 64-bit integers with the splitmix64 finaliser. One definition keeps them
bit-identical across processes, numba and numpy.
"""

from __future__ import annotations

import numba
import numpy as np

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's state increment
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@numba.njit(nogil=True, cache=True, inline="always")
def mix64(z):
    """The splitmix64 finaliser of a uint64 (wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True, cache=True, inline="always")
def splitmix64_next(state):
    """Advance a splitmix64 stream: returns (new state, next random uint64)."""
    state = state + GOLDEN_GAMMA
    return state, mix64(state)


@numba.njit(nogil=True, cache=True)
def mix64_array(x, key):
    """mix64(x ^ key) for every element of a uint64 array."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = mix64(x[i] ^ key)
    return out
