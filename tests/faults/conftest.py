"""Fixtures of the fault-injection suite: small stores made per module, and corruption helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest


def chunk_files(store: Path, shard: int = 1, array: str = "data") -> list[Path]:
    return sorted((store / "shards" / f"{shard:05d}" / "X" / array / "c").iterdir())


def flip_byte(path: Path, offset: int = 40) -> None:
    """Flip one bit inside a compressed chunk (the bytes still decode, or not: either way a read must fail)."""
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def swap_chunks(path: Path, a: int = 0, b: int = 1) -> None:
    """Swap two inner chunks of a zarr shard file in its index, the index's crc32c rewritten: every chunk's own
    checksum still holds, only their places changed."""
    meta = json.loads((path.parent.parent / "zarr.json").read_text())
    cfg = meta["codecs"][0]["configuration"]
    per = meta["chunk_grid"]["configuration"]["chunk_shape"][0] // cfg["chunk_shape"][0]
    raw = bytearray(path.read_bytes())
    n = per * 16 + 4
    index = np.frombuffer(bytes(raw[-n:-4]), "<u8").reshape(per, 2).copy()
    assert index[a, 1] != index[b, 1] or index[a, 0] != index[b, 0]
    index[[a, b]] = index[[b, a]]
    body = index.tobytes()
    raw[-n:] = body + google_crc32c.value(body).to_bytes(4, "little")
    path.write_bytes(bytes(raw))


@pytest.fixture
def fresh_store(tiny_store, tmp_path) -> Path:
    """A private copy of the session's tiny store, to corrupt."""
    return Path(shutil.copytree(tiny_store, tmp_path / "copy.store"))
