"""Cache hints for the numba kernels that move batches: ask for lines before they are read, write rows past the cache.

- A loader buffer's pool of decoded chunks is bigger than a core's L2 and its rows are gathered in random order:
  asking for a row's first lines a few rows ahead (`prefetch_row`) lets the copy find them in cache.
- A dense batch (4,096 x 2,000 float32: 32 MB) is written once, and read later by another thread or the GPU copy.
  A plain store first reads each line it writes; a row built in a scratch row that stays in cache and written out
  with non-temporal stores (`stream_row`) is only written. `store_fence` orders those stores before the batch is
  handed on (they are weakly ordered on x86).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

PREFETCH_LINES = 3  # 64-byte lines asked for per row and array; the hardware streams a longer row's rest itself


@intrinsic
def _prefetch(typingctx, addr):
    """A hint to load the cache line at address addr, for reading, into every level (llvm.prefetch)."""

    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        builder.call(fn, [builder.inttoptr(args[0], i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(types.uint64), codegen


@intrinsic
def _stream64(typingctx, dst, src):
    """The 64 bytes at address src stored at address dst (64-byte aligned: a cache line) by non-temporal stores."""

    def codegen(context, builder, signature, args):
        vec = ir.VectorType(ir.IntType(32), 16).as_pointer()
        value = builder.load(builder.inttoptr(args[1], vec), align=4)
        store = builder.store(value, builder.inttoptr(args[0], vec), align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(types.uint64, types.uint64), codegen


@intrinsic
def store_fence(typingctx):
    """Every store before it (non-temporal ones too) is visible before any after it (mfence on x86)."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@numba.njit(nogil=True, cache=True, inline="always")
def prefetch_row(indices, data, a):
    """Asks for the first PREFETCH_LINES lines of a row starting at element a of indices and of data."""
    at_i = np.uint64(indices.ctypes.data + a * indices.itemsize)
    at_d = np.uint64(data.ctypes.data + a * data.itemsize)
    for line in range(PREFETCH_LINES):
        _prefetch(at_i + np.uint64(64 * line))
        _prefetch(at_d + np.uint64(64 * line))


@numba.njit(nogil=True, cache=True, inline="always")
def stream_row(dst, src):
    """dst[:] = src (contiguous 1-D arrays of one 4-byte dtype), its whole cache lines by non-temporal stores. Call
    `store_fence` before another thread reads dst."""
    n = dst.shape[0]
    at = dst.ctypes.data
    head = min(n, (64 - at % 64) % 64 // 4)
    for k in range(head):
        dst[k] = src[k]
    k = head
    d, s = np.uint64(at), np.uint64(src.ctypes.data)
    while k + 16 <= n:
        _stream64(d + np.uint64(4 * k), s + np.uint64(4 * k))
        k += 16
    for t in range(k, n):
        dst[t] = src[t]
