"""Check and decode many blosc chunks of one file in one numba call, without Python per chunk.

A loader block spans several compressed chunks, and with small chunks (the store default: 16,384 values) the Python
work around each chunk (index lookup, crc32c call, numcodecs' argument checks) cost as much as decoding it. This
kernel calls the C functions numcodecs and google-crc32c call (`blosc_decompress_ctx`, `crc32c_value`), by address,
with the GIL released. Each chunk is checked before a byte of it is decoded: its crc32c (format v2), then its blosc
header (decoded size = the chunk's size, compressed size = the bytes it has in the file, so the decoder reads
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
        empty = np.empty(0, dtype=np.int64)
        decode_blosc_chunks(np.empty(0, dtype=np.uint8), empty, empty, True, True, np.empty(0, dtype=np.uint8), 1)


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


@numba.njit(nogil=True, cache=True, inline="always")
def _u32(buf, at):  # a little-endian uint32 of a uint8 array, as int64
    return np.int64(buf[at]) | np.int64(buf[at + 1]) << 8 | np.int64(buf[at + 2]) << 16 | np.int64(buf[at + 3]) << 24


@numba.njit(nogil=True, cache=True)
def _decode_blosc_chunks(blosc, crc, file, offsets, nbytes, checksum, verify, dest, chunk_bytes):
    base = np.uint64(file.ctypes.data)
    out = np.uint64(dest.ctypes.data)
    for k in range(offsets.shape[0]):
        off, n = offsets[k], nbytes[k]
        if off < 0 or n < 0 or off + n > file.shape[0]:  # missing (v1) or pointing outside the file
            return k
        if checksum:
            n -= 4
            if n < 16:
                return k
            if verify and np.int64(_crc32c(crc, base + np.uint64(off), np.uint64(n))) != _u32(file, off + n):
                return k
        # blosc 1 header: version, versionlz, flags, typesize, nbytes (u32), blocksize (u32), cbytes (u32)
        if n < 16 or _u32(file, off + 4) != chunk_bytes or _u32(file, off + 12) != n:
            return k
        got = _blosc_decompress(blosc, base + np.uint64(off), out + np.uint64(k * chunk_bytes), np.uint64(chunk_bytes))
        if got != chunk_bytes:
            return k
    return -1


def decode_blosc_chunks(
    file: np.ndarray,
    offsets: np.ndarray,
    nbytes: np.ndarray,
    checksum: bool,
    verify: bool,
    dest: np.ndarray,
    chunk_bytes: int,
) -> int:
    """Decode the chunks at `offsets`/`nbytes` (int64; < 0: missing) of `file` (the shard file, uint8) into
    consecutive `chunk_bytes` slots of `dest` (a contiguous array). Returns -1, or the position of the first chunk
    that is missing, fails a check or does not decode (nothing after it is decoded)."""
    if not dest.flags.c_contiguous or dest.nbytes < len(offsets) * chunk_bytes:
        raise ValueError(f"dest: {dest.nbytes} contiguous bytes for {len(offsets)} chunks of {chunk_bytes}")
    blosc, crc = _functions()
    return int(
        _decode_blosc_chunks(
            np.uint64(blosc), np.uint64(crc), file, offsets, nbytes, checksum, verify, dest, chunk_bytes
        )
    )
