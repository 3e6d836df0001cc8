"""The Loader: one rank's stream of training batches from a store, as torch tensors.

    loader = Loader("atlas.store", SamplerConfig(batch_size=4096), rank=rank, world_size=world_size,
                    obs_keys=("cell_type",))
    for epoch in range(n_epochs):
        loader.set_epoch(epoch)
        for batch in loader:       # {"X": float32 tensor, "index": int64 ids, "cell_type": int64 codes, ...}
            ...

The plan comes from `engine.loading.sampler` (a pure function of the SamplerConfig, the store, rank and world
size); the reading is `engine.loading.readers.BufferReader`, run in threads of this process (mode="local",
`ThreadReading`) or in Ray reader actors on this rank's node (mode="ray", `ActorReading`). Both give the same
batches. At most `ReadOptions.prefetch` batches are read ahead of the consumer (backpressure), so memory stays
bounded however slow the training step is.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from engine.errors import LoaderError
from engine.loading.actors import ActorReading
from engine.loading.mix_reader import MixedReader
from engine.loading.mixing import Mix
from engine.loading.readers import BufferReader, InFlight, ReaderProcess, ReadOptions, ThreadReading
from engine.loading.sampler import Sampler, SamplerConfig
from engine.loading.tensors import copy_stream, to_torch
from engine.store.format import Store

log = logging.getLogger(__name__)


@dataclass
class LoaderMetrics:
    """What the dashboard shows: throughput, time the consumer waited for data, and read-ahead depth."""

    cells: int = 0
    batches: int = 0
    wait_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    queue_depth: int = 0  # batches read ahead of the consumer right now
    max_queue_depth: int = 0
    reissued: int = 0  # buffers re-read after their reader died

    def snapshot(self) -> dict[str, float]:
        elapsed = max(1e-9, time.perf_counter() - self.started)
        return {
            "cells_per_s": self.cells / elapsed,
            "batches": self.batches,
            "wait_s": self.wait_s,
            "wait_fraction": self.wait_s / elapsed,
            "mean_batch_wait_ms": 1e3 * self.wait_s / max(1, self.batches),
            "queue_depth": self.queue_depth,
            "max_queue_depth": self.max_queue_depth,
            "reissued": self.reissued,
        }


def _check_device(device: Any) -> Any:
    """`device` as given, once torch knows it and can put a tensor there (a CUDA one needs a CUDA device here)."""
    if device is None:
        return None
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise LoaderError(f"device is {device!r}: not a torch device ({e})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise LoaderError(f"device is {device!r}, but torch sees no CUDA device on this machine")
    try:  # an index past the node's GPUs, a backend this build or machine lacks (mps, xpu)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise LoaderError(f"device is {device!r}, which torch cannot use here: {str(e).split('. ')[0]}") from None
    return device


# Ray mode: an actor's call costs ~1 ms of round trip, and an actor that finished its calls waits for the next one;
# more buffers per call (and so a deeper read-ahead) cut both (`python bench/loader.py --per-call`)
MAX_BUFFERS_PER_CALL = 8


def buffers_per_call(reading: ReadOptions, buffer_bytes: float) -> int:
    """Ray mode's default buffers per actor call: as many as keep each actor's read-ahead (two calls) within
    `reading.read_ahead_bytes_per_reader` of batches, 1 to MAX_BUFFERS_PER_CALL (1 when even that exceeds it)."""
    fit = int(reading.read_ahead_bytes_per_reader // max(1.0, 2 * buffer_bytes))
    return min(MAX_BUFFERS_PER_CALL, max(1, fit))


class Loader:
    """Batches of one rank. See the module docstring and engine/loading/sampler.py for the plan's guarantees.

    store: a path, an opened Store, or a `Mix` of several (engine/loading/mixing.py; batches then carry "source",
    each cell's position in the mix's sources). sampler: the plan's settings (batch size, blocks, buffers, split,
    remainder, class balance). transforms: None (raw counts as
    float32), a pipeline spec for `engine.preprocess.transforms.Pipeline.from_spec`, or a callable(CSRBlock,
    cell_index) -> dict (a built Pipeline).
    output: "dense" (float32 [B, genes]) or "csr" (torch sparse CSR, densify on the GPU with `.to_dense()`).
    mode: "local" (threads), "ray" (reader actors), or None: "ray" when Ray is initialised, else "local".
    reading: readers, their CPUs, read-ahead. device: where batches go (on CUDA: through pinned host memory, copied on
    a stream of their own while the step before runs).
    """

    def __init__(
        self,
        store: Store | str | Path | Mix,
        sampler: SamplerConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        transforms: Any = None,
        obs_keys: Sequence[str] = (),
        output: str = "dense",
        mode: str | None = None,
        reading: ReadOptions | None = None,
        device: Any = None,
    ):
        self.mix = store.open() if isinstance(store, Mix) else None
        if self.mix is not None:
            self.store = self.mix.stores[0]
            self.sampler = self.mix.sampler(sampler, rank, world_size)
        else:
            self.store = store if isinstance(store, Store) else Store.open(store)
            self.sampler = Sampler.for_store(self.store, sampler, rank, world_size)
        self.config = self.sampler.config  # the block size resolved for this store
        if mode is None:
            import ray

            mode = "ray" if ray.is_initialized() else "local"
        if mode not in ("local", "ray"):
            raise LoaderError(f"mode is {mode!r}: expected 'local' or 'ray'")
        self.mode = mode
        self.rank, self.world_size = rank, world_size
        self.obs_keys = tuple(obs_keys)
        self.reading = reading or ReadOptions()
        k = self.config.buffer_batches
        self.device = _check_device(device)
        self._copy_stream = copy_stream(device)  # CUDA: a batch is copied while the step before it runs
        self.metrics = LoaderMetrics()
        # built in either mode: it checks the output, obs keys and transforms here, before any reader starts; a
        # reader actor builds its own the same way (`make_reader`)
        settings = (transforms, output, self.obs_keys, self.reading.direct_io)
        if self.mix is not None:
            settings += ((self.config.balance_by,) if self.config.balance_by else (),)  # obs read beside obs_keys
            self._reader = MixedReader(self.mix, *settings)
            make_reader = partial(MixedReader, store.by_path(), *settings)
        else:
            self._reader = BufferReader(self.store, *settings)
            make_reader = partial(BufferReader, str(self.store.path), *settings)
        per_call = 1
        if mode == "ray":
            rank_batch = self.config.batch_size // (world_size if self.config.global_batch else 1)
            per_call = self.reading.buffers_per_call or buffers_per_call(
                self.reading, k * rank_batch * self.bytes_per_cell()
            )
            self.reading = self.reading.model_copy(update={"buffers_per_call": per_call})
        # read ahead: two buffers per reader thread, one being read and one queued (with fewer, a thread that finished
        # sat idle until the consumer had taken every batch of an older buffer: 1-7% of its time with 3 buffers for
        # 2 threads); two calls' worth of buffers per reader actor (mode "ray": the same idling, per call)
        default = k * 2 * self.reading.readers * per_call
        self.prefetch = max(k, default if self.reading.prefetch is None else self.reading.prefetch)
        self._readers: ThreadReading | ActorReading = (
            ThreadReading(self._reader, self.reading.readers)
            if mode == "local"
            else ActorReading(make_reader, self.reading)
        )
        self._carry: list[InFlight] = []
        self._ray_metrics = None

    # -- public API
    def bytes_per_cell(self) -> float:
        """About how many bytes one cell of a batch takes: X as dense float32, or as CSR (float32 values and int32
        indices of the store's non-zeros; of the densest store of a mix), and cellray's pipeline's token arrays (a
        callable's outputs other than X are not counted)."""
        cutter = self._reader.cutter
        stores = self.mix.stores if self.mix is not None else [self.store]
        nnz = max(st.nnz / max(1, st.n_cells) for st in stores)
        if cutter.native:
            return cutter.pipeline.bytes_per_cell(cutter.n_genes, nnz, dense_x=cutter.output == "dense")
        return 4.0 * cutter.n_genes if cutter.output == "dense" else 8.0 + 8.0 * nnz

    def __len__(self) -> int:
        """Batches per rank per epoch (equal on every rank)."""
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch. Without it, each completed pass moves to the next epoch."""
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The position: (epoch, batches done) plus the plan settings. Save it with the model checkpoint."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the next unseen batch of the saved epoch."""
        self.sampler.load_state_dict(state)

    def stats(self) -> dict[str, float]:
        """The current pass's metrics (`LoaderMetrics.snapshot`) and `reader_busy_s`, the seconds the readers have
        spent reading buffers since the Loader was made, all together (reader threads; in Ray mode the actors, in
        the calls fetched so far): what they did not spend of `readers` x the wall time, they waited for work."""
        self.metrics.reissued = self._readers.reissued
        return {**self.metrics.snapshot(), "reader_busy_s": self._readers.busy_s}

    def decode_stats(self) -> dict[str, int]:
        """Elements decoded and used by this process's reads (mode "local"; benchmarks report their ratio)."""
        return dict(self._reader.blocks.stats)

    def reader_processes(self) -> list[ReaderProcess]:
        """(pid, node id) of each reader actor (mode "ray"); empty when threads of this process read."""
        return self._readers.processes()

    def close(self) -> None:
        self._carry = []
        self._readers.close()
        self._reader.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s = self.sampler
        if s.batches_done >= len(s):  # the saved position is an epoch's end: start the next one
            s.set_epoch(s.epoch + 1)
        epoch, start = s.epoch, s.batches_done
        j0, skip = divmod(start, self.config.buffer_batches)
        n_buffers = s.n_buffers
        pending: collections.deque[InFlight] = collections.deque()  # oldest first
        carry, self._carry = self._carry, []
        if carry and skip == 0 and (carry[0].plan.epoch, carry[0].plan.index) == (epoch, j0):
            pending.extend(carry)  # the previous pass already started reading this epoch's first buffers
        next_e, next_j = epoch, j0
        if pending:  # the carry may reach into later epochs: go on after its last buffer
            next_e, next_j = pending[-1].plan.epoch, pending[-1].plan.index + 1
        in_flight = sum(job.plan.n_batches for job in pending)  # batches submitted and not yet handed out
        self.metrics = LoaderMetrics()
        group = self._readers.buffers_per_submit
        while True:
            # read ahead while the bound allows, into the next epochs too (a small store's epoch is a few buffers,
            # and stopping at the next epoch's end split calls and left readers idle at each epoch's turn); actor
            # readers take `group` buffers per call, so wait until that many fit (or no more come)
            plans, room, last = [], self.prefetch - in_flight, False
            e, j = next_e, next_j
            while len(plans) < group:
                if j >= n_buffers:
                    if n_buffers == 0:
                        last = True
                        break
                    e, j = e + 1, 0
                n = s.buffer_n_batches(j)
                if (pending or plans) and n > room:
                    break  # planned once it fits: the consumer plans each buffer once
                plans.append(s.buffer(e, j))
                room -= n
                j += 1
            if plans and (len(plans) == group or last or not pending):
                pending.extend(self._readers.submit(plans))
                in_flight += sum(p.n_batches for p in plans)
                next_e, next_j = e, j
                continue
            if not pending or pending[0].plan.epoch != epoch:
                break
            job = pending.popleft()
            plan = job.plan
            first = skip if plan.index == j0 else 0
            in_flight -= first
            for b in range(first, plan.n_batches):
                self.metrics.queue_depth = in_flight
                self.metrics.max_queue_depth = max(self.metrics.max_queue_depth, in_flight)
                t0 = time.perf_counter()
                batch = self._readers.batch(job, b)
                out = self._to_torch(batch)
                self.metrics.wait_s += time.perf_counter() - t0
                in_flight -= 1
                self.metrics.batches += 1
                self.metrics.cells += len(batch["index"])
                s.batches_done = plan.first_batch + b + 1
                self._report()
                yield out
        self._carry = list(pending)  # the next epochs' first buffers, kept only if the next pass starts there
        s.set_epoch(epoch + 1)

    def _to_torch(self, batch: dict[str, Any]) -> dict[str, Any]:
        return to_torch(batch, (*self.obs_keys, "source"), device=self.device, stream=self._copy_stream)

    def _report(self) -> None:
        """Dashboard gauges (Ray mode only), at most once a second."""
        if self.mode != "ray":
            return
        now = time.perf_counter()
        if self._ray_metrics is None:
            from ray.util.metrics import Gauge

            tags = ("rank",)
            self._ray_metrics = (
                Gauge("cellray_loader_cells_per_s", "cells per second delivered", tags),
                Gauge("cellray_loader_wait_fraction", "fraction of time the consumer waited for data", tags),
                Gauge("cellray_loader_queue_depth", "batches read ahead", tags),
                [0.0],
            )
        cells, wait, depth, last = self._ray_metrics
        if now - last[0] < 1.0:
            return
        last[0] = now
        snap = self.metrics.snapshot()
        t = {"rank": str(self.rank)}
        cells.set(snap["cells_per_s"], tags=t)
        wait.set(snap["wait_fraction"], tags=t)
        depth.set(snap["queue_depth"], tags=t)
