"""Helpers of the store's tests."""

from __future__ import annotations

import zarr


def blosc_store_array(path, values, chunk: int, per_file: int):
    """A 1-D array laid out as a store's X/data: sharded, blosc, crc32c after each chunk."""
    arr = zarr.create_array(
        str(path),
        shape=values.shape,
        chunks=(chunk,),
        shards=(chunk * per_file,),
        dtype=values.dtype,
        compressors=[zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), zarr.codecs.Crc32cCodec()],
        config={"write_empty_chunks": True},
    )
    arr[:] = values
    return arr
