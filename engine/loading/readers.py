"""Execute a rank's read plan: fetch a buffer's blocks, shuffle, cut batches, run the transform pipeline.

`collect` (a buffer's cells, out of one store's blocks or a mix's) and `BatchCutter` (its batches) are the one
implementation, behind `BufferReader.read(plan)` and `MixedReader.read`. The Loader runs it through one of two
readings with one interface (`submit(plan) -> InFlight`, `batch(job, b)`, `processes()`, `close()`):
`ThreadReading`, threads of its own process (mode="local"), or `engine.loading.actors.ActorReading`, Ray reader
actors on its node (mode="ray"), so both modes give identical batches. A batch is a dict of numpy arrays (and, for
CSR, a `CSRBlock`); beside its consumer an actor hands it over in shared memory (engine/loading/shm.py), and the
Loader turns it into torch tensors.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
from pydantic import Field

from engine.config import Config
from engine.errors import LoaderError
from engine.loading.buffers import BatchBuffers
from engine.loading.chunks import StoreBlocks
from engine.loading.sampler import BufferPlan
from engine.store.csr import CSRRows, gather_dense, gather_rows_csr, gather_rows_dense
from engine.store.format import CSRBlock, Store

if TYPE_CHECKING:
    from engine.loading.actors import ActorCall

log = logging.getLogger(__name__)


def single_threaded_kernels() -> None:
    """Run numba's parallel kernels on one thread in this reader thread: readers already work in parallel
    (one buffer each), and a parallel kernel's barrier stalls whenever a core is busy elsewhere (measured:
    normalize+log1p+densify of 4,096 cells took 12-100 ms with 2 numba threads on a busy 2-core machine)."""
    import numba

    if numba.get_num_threads() != 1:
        numba.set_num_threads(1)


def build_pipeline(transforms: Any, store: Store):
    """None: no pipeline; a spec (list/dict): `engine.preprocess.transforms.Pipeline.from_spec`; a callable as is."""
    if transforms is None:
        return None
    if callable(transforms):
        return transforms
    from engine.preprocess.transforms import Pipeline

    return Pipeline.from_spec(transforms, store)


def take_into(buffers: BatchBuffers, values: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """values[sel] into a reusable array of `buffers` (shared memory in a reader actor beside its consumer)."""
    out = buffers.empty(len(sel), values.dtype)
    np.take(values, sel, out=out)
    return out


def buffer_pick(plan: BufferPlan, obs: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Which of the buffer's n cells (in stream order) make its batches, batch after batch: this rank's slice of
    each global batch, a class-balanced resample (`obs` holds the balance key's codes), a permutation, or as is."""
    rng = np.random.Generator(np.random.PCG64(list(plan.shuffle_seed)))
    if plan.columns is not None:  # this rank's slice of each global batch (resize-invariant plan)
        return plan.column_pick()
    if plan.balance is not None:  # class-balanced: resample the buffer with replacement, p ~ weight[code]
        p = plan.balance.weights[obs[plan.balance.key]]
        if p.sum() <= 0:  # no cell of a weighted class in this buffer: keep it as it is, shuffled
            log.warning("buffer %d of epoch %d has no cell with a positive class weight", plan.index, plan.epoch)
            p = np.ones(n)
        return rng.choice(n, size=n, replace=True, p=p / p.sum())
    return rng.permutation(n) if plan.shuffle else np.arange(n)


def collect(plan: BufferPlan, blocks: Any, obs_keys: Sequence[str]) -> tuple[CSRRows, dict[str, np.ndarray]]:
    """A buffer's cells, unshuffled: the pool `blocks.read_pool` decodes them into, and per cell in stream order its
    "row" in the pool, "index" (global: `blocks.cell_offsets` per shard), "pad" flag, and the codes of `obs_keys` (and
    of the balance key). `blocks`: a store's `StoreBlocks`, or a mix's `MixBlocks`."""
    segs = plan.segments
    row, index, pad = plan.cells(blocks.cell_offsets)  # before the read: a plan that does not fit reads nothing
    pool = blocks.read_pool(segs[:, :3])
    keys = list(dict.fromkeys([*obs_keys, *([plan.balance.key] if plan.balance is not None else [])]))
    cols = {"row": row, "index": index, "pad": pad}
    if keys:  # each segment's cells are a run of `row`: their codes are a slice of their shard's, picked the same way
        ends = np.cumsum(segs[:, 4])
        bases = np.cumsum(segs[:, 2] - segs[:, 1]) - (segs[:, 2] - segs[:, 1])
        for k in keys:
            parts = [
                blocks.obs_codes(int(shard), k)[start + row[end - take : end] - base]
                for (shard, start, _, _, take, _), end, base in zip(segs, ends, bases)
            ]
            cols[k] = np.concatenate(parts) if parts else np.empty(0, np.int64)
    return pool, cols


class BufferReader:
    """Reads buffers of one store. Thread-safe: the Loader's local mode shares one across threads."""

    def __init__(
        self,
        store: Store | str | os.PathLike,
        transforms: Any = None,
        output: str = "dense",
        obs_keys: Sequence[str] = (),
        direct_io: bool = True,
    ):
        self.store = store if isinstance(store, Store) else Store.open(store)
        self.blocks = StoreBlocks(self.store, direct=direct_io)
        self.obs_keys = tuple(obs_keys)
        pipeline = build_pipeline(transforms, self.store)
        self.cutter = BatchCutter(output, pipeline, self.store.n_genes, ("index", *self.obs_keys))
        missing = [k for k in self.obs_keys if k not in self.store.manifest.obs_schema]
        if missing:
            raise LoaderError(
                f"{self.store.path}: obs_keys {missing} are not in the store; it has "
                f"{list(self.store.manifest.obs_schema)}"
            )

    def close(self) -> None:
        self.blocks.close()

    def read(self, plan: BufferPlan) -> list[dict[str, Any]]:
        """The plan's batches, in order."""
        single_threaded_kernels()
        return self.cutter.cut(plan, *collect(plan, self.blocks, self.obs_keys))


def _is_cellray_pipeline(pipeline: Any) -> bool:
    from engine.preprocess.transforms import Pipeline  # only with a pipeline: raw reads import no transforms

    return isinstance(pipeline, Pipeline)


class BatchCutter:
    """Cuts a buffer's batches out of its decoded pool: the plan's pick of its cells (`buffer_pick`), batch after
    batch, each with `keys` of the buffer's stream columns (and "pad" where the plan pads) and X, gathered straight
    out of the pool (raw, or through the pipeline). A reader actor swaps its three array pools for shared memory."""

    def __init__(self, output: str, pipeline: Any, n_genes: int, keys: Sequence[str]):
        if output not in ("dense", "csr"):
            raise LoaderError(f"output is {output!r}: expected 'dense' or 'csr'")
        self.output, self.pipeline, self.n_genes, self.keys = output, pipeline, n_genes, tuple(keys)
        # cellray's pipeline takes the store's dtypes (uint16 counts: half the bytes gathered, no sign check);
        # another callable gets float32 counts and int32 indices, as it always has
        self.native = pipeline is not None and _is_cellray_pipeline(pipeline)
        self.pipeline_out = getattr(pipeline, "dense", False) and "out" in inspect.signature(pipeline).parameters
        self.dense_buffers = BatchBuffers()
        self.csr_buffers = BatchBuffers()  # a pool of its own: CSR arrays never crowd dense batches out of it
        self.small_buffers = BatchBuffers()  # cell ids, obs codes, indptrs

    def cut(self, plan: BufferPlan, pool: CSRRows, cols: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """The plan's batches out of `pool`. `cols`: per stream position, "row" (in the pool) and every key."""
        pick = buffer_pick(plan, cols, plan.n_cells)
        keys = (*self.keys, "pad") if plan.remainder == "pad" else self.keys
        batches = []
        for b in range(plan.n_batches):
            sel = pick[b * plan.batch_size : (b + 1) * plan.batch_size]
            rows = cols["row"][sel]
            batch: dict[str, Any] = {k: take_into(self.small_buffers, cols[k], sel) for k in keys}
            if self.pipeline is None:
                batch["X"] = self._raw_x(pool, rows)
            else:
                dtypes = (pool.data.dtype, pool.indices.dtype) if self.native else (np.float32, np.int32)
                ip, ix, dx = gather_rows_csr(pool, rows, *dtypes, self.csr_buffers)
                out = self._run_pipeline(CSRBlock(ip, ix, dx, self.n_genes), batch["index"])
                for key, value in out.items():
                    batch[key] = self._finish_x(value) if key == "X" else value
            batches.append(batch)
        return batches

    def _run_pipeline(self, block: CSRBlock, index: np.ndarray) -> dict[str, Any]:
        """The pipeline, writing a dense X into a reused buffer when it can (`Pipeline(..., out=)`)."""
        if not self.pipeline_out:
            return self.pipeline(block, index)
        n_out = self.pipeline.n_genes_out
        out, _ = self.dense_buffers.get((block.n_cells, n_out))  # the pipeline clears a reused buffer itself
        return self.pipeline(block, index, out=out)

    def _raw_x(self, pool: CSRRows, rows: np.ndarray):
        if self.output == "dense":
            return gather_rows_dense(pool, rows, self.n_genes, self.dense_buffers)
        ip, ix, dx = gather_rows_csr(pool, rows, np.float32, np.int32, self.csr_buffers)
        dt = _index_dtype(ip)  # torch wants indptr and indices of one signed dtype
        indptr = self.small_buffers.empty(len(ip), dt)
        indptr[:] = ip
        return CSRBlock(indptr, ix.astype(dt, copy=False), dx, self.n_genes)

    def _finish_x(self, x):
        if not isinstance(x, CSRBlock):
            return x
        if self.output == "dense":
            return gather_dense(x.indptr, x.indices, x.data, np.arange(x.n_cells), x.n_genes)
        dt = _index_dtype(x.indptr)  # torch wants indptr and indices of one signed dtype
        return CSRBlock(
            x.indptr.astype(dt, copy=False),
            x.indices.astype(dt, copy=False),
            x.data.astype(np.float32, copy=False),
            x.n_genes,
        )


def _index_dtype(indptr: np.ndarray):
    """int32 indices (half the bytes) unless a batch could hold 2^31 non-zeros."""
    return np.int32 if indptr[-1] < 2**31 - 1 else np.int64


# ------------------------------------------------------------------------------------------------ reading


class ReadOptions(Config):
    """How a Loader reads: how many readers, their CPUs (Ray mode), how far ahead, through which chunk reader."""

    error: ClassVar[type[Exception]] = LoaderError

    readers: int = Field(2, gt=0)  # reader threads (mode "local") or reader actors (mode "ray")
    cpus_per_reader: float = Field(0.5, ge=0)  # each reader actor's CPU reservation
    # batches read ahead of the consumer; default two buffers per reader thread, two calls' worth per actor
    prefetch: int | None = Field(None, gt=0)
    # mode "ray": buffers an actor reads per call; None: 1-8, by the bytes below (loader.buffers_per_call)
    buffers_per_call: int | None = Field(None, gt=0)
    read_ahead_bytes_per_reader: int = Field(512 * 2**20, gt=0)
    direct_io: bool = True  # engine.store.chunkfile's checked reader; False reads through zarr-python


@dataclass
class InFlight:
    """One buffer being read, and where its batches come from."""

    plan: BufferPlan
    future: Future | None = None  # thread reading
    call: ActorCall | None = None  # actor reading
    slot: int = 0  # actor reading: this buffer's position in its call
    batches: list | None = None  # fetched; each is set to None once handed out (its memory freed)


class ReaderProcess(NamedTuple):
    pid: int
    node_id: str


class ThreadReading:
    """Buffers read by threads of this process, sharing one BufferReader."""

    buffers_per_submit = 1  # a thread takes buffers one at a time: nothing to gain from grouping them

    def __init__(self, reader: BufferReader, threads: int):
        self.reader = reader
        self.threads = threads
        self.reissued = 0  # threads never die: nothing is re-read
        self.busy_s, self._busy_lock = 0.0, threading.Lock()  # seconds the threads spent reading, all together
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, plans: Sequence[BufferPlan]) -> list[InFlight]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cellray-reader")
        return [InFlight(plan, future=self._pool.submit(self._read, plan)) for plan in plans]

    def _read(self, plan: BufferPlan) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        batches = self.reader.read(plan)  # a read that fails is not counted: it ends the pass
        with self._busy_lock:
            self.busy_s += time.perf_counter() - t0
        return batches

    def batch(self, job: InFlight, b: int) -> dict[str, Any]:
        if job.batches is None:
            job.batches = job.future.result()
        out, job.batches[b] = job.batches[b], None
        return out

    def processes(self) -> list[ReaderProcess]:
        return []  # the reading is this process's own work

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
