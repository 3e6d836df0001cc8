"""Check and decode many blosc chunks, of any files, in one numba call, without Python per chunk.

A loader block spans several compressed chunks, and with small chunks (the store default: 16,384 values) the Python
work around each chunk (index lookup, crc32c call, numcodecs' argument checks) cost as much as decoding it. This
kernel calls the C functions numcodecs and google-crc32c call (`blosc_decompress_ctx`, `crc32c_value`), by address,
with the GIL released. Chunks are given as addresses (in mapped files, into pools:
`engine.store.chunkfile.ChunkBatch` builds them), so a whole loader buffer, every block of both arrays of any
shards, is one call: one release of the GIL per buffer instead of one per run, which is what lets two reader threads
use both cores (`python bench/loader.py --threads`: two threads at 1.5x one thread's cells/s with a call per run,
1.8-1.9x with one per buffer). Each chunk is checked before a byte of it is decoded: its crc32c (format v2), then its
blosc header (decoded size = the chunk's size, compressed size = the bytes it has in the file, so the decoder reads
nothing outside the chunk); the decoder must return the chunk's size. At the first failure it returns that chunk's
position, and the caller reads that chunk again on the Python path, which raises the error naming it.

`available()` is False where the symbols cannot be found (another build of numcodecs or google-crc32c); callers then
use the per-chunk Python path, which checks the same things.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

log = logging.getLogger(__name__)


@cache
def _functions() -> tuple[int, int] | None:
    """Addresses of `blosc_decompress_ctx` and `crc32c_value`, or None."""
    try:
        import google_crc32c._crc32c as crc_ext
        from numcodecs import blosc as blosc_ext

        blosc = ctypes.CDLL(blosc_ext.__file__).blosc_decompress_ctx
        crc = ctypes.CDLL(crc_ext.__file__).crc32c_value  # resolved in the extension's own libcrc32c
    except (ImportError, OSError, AttributeError) as e:
        log.debug("chunk kernel unavailable (%s): chunks decode one by one in Python", e)
        return None
    return ctypes.cast(blosc, ctypes.c_void_p).value, ctypes.cast(crc, ctypes.c_void_p).value


def available() -> bool:
    return _functions() is not None


def warm() -> None:
    """Load the compiled kernel now (numba's cache and JIT start-up: ~1.3 s in a fresh process here), so that a
    reader pays it when it is set up rather than inside its first read."""
    if available():
        empty, addresses = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint64)
        decode_blosc_at(addresses, empty, empty, addresses, empty, True)


# The C functions are called through their addresses, passed as plain integers: the kernel caches like any other
# (a ctypes function object would be a "dynamic global") and each call is dispatched on ints and arrays only.
_I8P = ir.IntType(8).as_pointer()


@intrinsic
def _blosc_decompress(typingctx, fn, src, dest, destsize):
    """int blosc_decompress_ctx(const void *src, void *dest, size_t destsize, int nthreads=1) at address fn."""

    def codegen(context, builder, signature, args):
        fn, src, dest, destsize = args
        fnty = ir.FunctionType(ir.IntType(32), [_I8P, _I8P, ir.IntType(64), ir.IntType(32)])
        call = builder.inttoptr(fn, fnty.as_pointer())
        return builder.call(
            call, [builder.inttoptr(src, _I8P), builder.inttoptr(dest, _I8P), destsize, ir.Constant(ir.IntType(32), 1)]
        )

    return types.int32(types.uint64, types.uint64, types.uint64, types.uint64), codegen


@intrinsic
def _crc32c(typingctx, fn, data, count):
    """uint32_t crc32c_value(const uint8_t *data, size_t count) at address fn."""

    def codegen(context, builder, signature, args):
        fn, data, count = args
        call = builder.inttoptr(fn, ir.FunctionType(ir.IntType(32), [_I8P, ir.IntType(64)]).as_pointer())
        return builder.call(call, [builder.inttoptr(data, _I8P), count])

    return types.uint32(types.uint64, types.uint64, types.uint64), codegen


@intrinsic
def _byte_at(typingctx, addr):
    """The byte at address addr, as int64."""

    def codegen(context, builder, signature, args):
        return builder.zext(builder.load(builder.inttoptr(args[0], _I8P)), ir.IntType(64))

    return types.int64(types.uint64), codegen


@numba.njit(nogil=True, cache=True, inline="always")
def _u32_at(a):  # the little-endian uint32 at address a, as int64
    return (
        _byte_at(a)
        | _byte_at(a + np.uint64(1)) << 8
        | _byte_at(a + np.uint64(2)) << 16
        | _byte_at(a + np.uint64(3)) << 24
    )


@numba.njit(nogil=True, cache=True)
def _decode_blosc_at(blosc, crc, src, nbytes, tail, dest, chunk_bytes, verify, start):
    for k in range(start, src.shape[0]):
        a, n, want = src[k], nbytes[k], chunk_bytes[k]
        if n < 0:  # missing (v1), or pointing outside its file
            return k
        if tail[k]:  # the chunk ends in its crc32c
            n -= 4
            if n < 16:
                return k
            if verify and np.int64(_crc32c(crc, a, np.uint64(n))) != _u32_at(a + np.uint64(n)):
                return k
        # blosc 1 header: version, versionlz, flags, typesize, nbytes (u32), blocksize (u32), cbytes (u32)
        if n < 16 or _u32_at(a + np.uint64(4)) != want or _u32_at(a + np.uint64(12)) != n:
            return k
        if _blosc_decompress(blosc, a, dest[k], np.uint64(want)) != want:
            return k
    return -1


def decode_blosc_at(
    src: np.ndarray,
    nbytes: np.ndarray,
    tail: np.ndarray,
    dest: np.ndarray,
    chunk_bytes: np.ndarray,
    verify: bool,
    start: int = 0,
) -> int:
    """Decode chunk k (k >= start) from address src[k] (nbytes[k] bytes there, < 0: missing; its last tail[k] bytes
    its crc32c, or tail 0) to address dest[k] (chunk_bytes[k] bytes). The caller vouches for the addresses
    (`engine.store.chunkfile.ChunkBatch`: mapped files and pools it keeps alive). Returns -1, or the position of the
    first chunk that is missing, fails a check or does not decode (nothing after it is decoded)."""
    blosc, crc = _functions()
    return int(_decode_blosc_at(np.uint64(blosc), np.uint64(crc), src, nbytes, tail, dest, chunk_bytes, verify, start))
