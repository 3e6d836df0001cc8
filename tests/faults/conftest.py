"""Fixtures of the fault-injection suite: small stores made per module, and corruption helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def chunk_files(store: Path, shard: int = 1, array: str = "data") -> list[Path]:
    return sorted((store / "shards" / f"{shard:05d}" / "X" / array / "c").iterdir())


def flip_byte(path: Path, offset: int = 40) -> None:
    """Flip one bit inside a compressed chunk (the bytes still decode, or not: either way a read must fail)."""
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.fixture
def fresh_store(tiny_store, tmp_path) -> Path:
    """A private copy of the session's tiny store, to corrupt."""
    return Path(shutil.copytree(tiny_store, tmp_path / "copy.store"))
