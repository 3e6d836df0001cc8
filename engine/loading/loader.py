"""The Loader: one rank's stream of training batches from a store, as torch tensors.

    loader = Loader("atlas.store", batch_size=4096, rank=rank, world_size=world_size, obs_keys=("cell_type",))
    for epoch in range(n_epochs):
        loader.set_epoch(epoch)
        for batch in loader:       # {"X": float32 tensor, "index": int64 ids, "cell_type": int64 codes, ...}
            ...

The plan comes from `engine.loading.sampler` (a pure function of the settings); the reading is
`engine.loading.readers.BufferReader`, run in local threads (mode="local") or in Ray reader actors on this rank's
node (mode="ray"). Both give the same batches. At most `prefetch` batches are read ahead of the consumer
(backpressure), so memory stays bounded however slow the training step is.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import CellrayError
from engine.loading.readers import BufferReader, make_reader_actor
from engine.loading.sampler import BufferPlan, Sampler, SamplerConfig, auto_block_size
from engine.loading.tensors import to_torch
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


class Loader:
    """Batches of one rank. See the module docstring and engine/loading/sampler.py for the plan's guarantees.

    store: a path or an opened Store. transforms: None (raw counts as float32), a pipeline spec for
    `engine.preprocess.transforms.Pipeline.from_spec`, or a callable(CSRBlock, cell_index) -> dict.
    output: "dense" (float32 [B, genes]) or "csr" (torch sparse CSR, densify on the GPU with `.to_dense()`).
    remainder: "drop" or "pad" (see engine/loading/sampler.py). block_size: cells per contiguous read (default: about
    one compressed chunk of the store). buffer_blocks: blocks shuffled together. prefetch: batches read
    ahead (default: two buffers). mode: "local" (threads), "ray" (reader actors), or None: "ray" when Ray
    is initialised, else "local". num_workers: threads or actors reading in parallel.
    """

    def __init__(
        self,
        store: Store | str | Path,
        batch_size: int,
        transforms: Any = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mode: str | None = None,
        obs_keys: Sequence[str] = (),
        split: str = "train",
        val_fraction: float = 0.0,
        block_size: int | None = None,
        buffer_blocks: int = 16,
        prefetch: int | None = None,
        output: str = "dense",
        remainder: str = "drop",
        shuffle: bool | None = None,
        balance_by: str | None = None,
        class_weights: dict[str, float] | None = None,
        num_workers: int = 2,
        reader_cpus: float = 0.5,
        pin_memory: bool | None = None,
        device: Any = None,
        direct_io: bool = True,
    ):
        self.store = store if isinstance(store, Store) else Store.open(store)
        m = self.store.manifest
        if block_size is None:
            block_size = auto_block_size(m.n_cells, sum(s.nnz for s in m.shards), m.chunk_elements)
        self.config = SamplerConfig(
            batch_size=batch_size,
            block_size=block_size,
            buffer_blocks=buffer_blocks,
            seed=seed,
            shuffle=(split != "val") if shuffle is None else shuffle,
            split=split,
            val_fraction=val_fraction,
            remainder=remainder,
        )
        balance = None if balance_by is None else self._balance(balance_by, class_weights)
        self.sampler = Sampler([s.n_cells for s in m.shards], self.config, rank, world_size, balance)
        if mode is None:
            import ray

            mode = "ray" if ray.is_initialized() else "local"
        if mode not in ("local", "ray"):
            raise CellrayError(f"mode is {mode!r}: expected 'local' or 'ray'")
        self.mode = mode
        self.rank, self.world_size = rank, world_size
        self.obs_keys = tuple(obs_keys)
        self.output = output
        self.transforms = transforms
        k = self.config.buffer_batches
        self.prefetch = max(k, 2 * k if prefetch is None else prefetch)
        self.num_workers = max(1, num_workers)
        self.reader_cpus = reader_cpus
        self.direct_io = direct_io
        self.device = device
        self.pin_memory = pin_memory
        self.metrics = LoaderMetrics()
        self._reader = BufferReader(self.store, transforms, output, self.obs_keys, direct_io)  # validates options
        self._pool: ThreadPoolExecutor | None = None
        self._actors: list = []
        self._inflight: set = set()  # read calls not fetched yet (close lets them finish: no retry noise)
        self._views = None  # engine.loading.shm.SharedViews: batches the reader actors hand over in shared memory
        self._carry: list = []
        self._ray_metrics = None

    # -- public API
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
        return self.metrics.snapshot()

    def close(self) -> None:
        self._carry = []
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._actors:
            import ray

            if self._inflight:  # let reads under way finish (a buffer each), rather than kill them mid-task
                ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=5.0)
                self._inflight.clear()
            for a in self._actors:
                ray.kill(a)
            self._actors = []
        if self._views is not None:
            self._views.close()
            self._views = None
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
        pending: collections.deque = collections.deque()  # (plan, handle), oldest first
        carry, self._carry = self._carry, []
        if carry and skip == 0 and (carry[0][0].epoch, carry[0][0].index) == (epoch, j0):
            pending.extend(carry)  # the previous pass already started reading this epoch's first buffers
        next_e, next_j = epoch, j0 + len(pending)
        in_flight = sum(p.n_batches for p, _ in pending)  # batches submitted and not yet handed out
        self.metrics = LoaderMetrics()
        while True:
            while True:  # read ahead while the bound allows, into the next epoch's first buffers too
                if next_j >= n_buffers:
                    if next_e != epoch or n_buffers == 0:
                        break
                    next_e, next_j = epoch + 1, 0
                plan = s.buffer(next_e, next_j)
                if pending and in_flight + plan.n_batches > self.prefetch:
                    break
                pending.append((plan, self._submit(plan)))
                in_flight += plan.n_batches
                next_j += 1
            if not pending or pending[0][0].epoch != epoch:
                break
            plan, handle = pending.popleft()
            first = skip if plan.index == j0 else 0
            in_flight -= first
            for b in range(first, plan.n_batches):
                self.metrics.queue_depth = in_flight
                self.metrics.max_queue_depth = max(self.metrics.max_queue_depth, in_flight)
                t0 = time.perf_counter()
                batch = self._result(plan, handle, b)
                out = self._to_torch(batch)
                self.metrics.wait_s += time.perf_counter() - t0
                in_flight -= 1
                self.metrics.batches += 1
                self.metrics.cells += len(batch["index"])
                s.batches_done = plan.first_batch + b + 1
                self._report()
                yield out
        self._carry = list(pending)  # next epoch's first buffers, kept only if the next pass starts there
        s.set_epoch(epoch + 1)

    # -- reading, local or Ray
    def _submit(self, plan: BufferPlan):
        if self.mode == "local":
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="cellray-reader")
            return self._pool.submit(self._reader.read, plan)
        return self._submit_ray(plan)

    def _new_actor(self):
        return make_reader_actor(
            str(self.store.path),
            self.transforms,
            self.output,
            self.obs_keys,
            self.direct_io,
            self.reader_cpus,
            share_memory=self._views.prefix,
        )

    def _submit_ray(self, plan: BufferPlan) -> dict:
        if not self._actors:
            from engine.loading.shm import SharedViews

            self._views = SharedViews()
            self._actors = [self._new_actor() for _ in range(self.num_workers)]
        i = plan.index % len(self._actors)
        # one call per buffer: a ray.get costs ~1 ms, so fetch a buffer's batches at once. Beside this process the
        # reader puts them in shared memory (engine/loading/shm.py); `released` hands back what we are done with
        ref = self._actors[i].read_many.remote([plan], self._views.released(i))
        self._inflight.add(ref)
        return {"ref": ref, "batches": None, "actor": i}

    def _result(self, plan: BufferPlan, handle, b: int) -> dict[str, Any]:
        if self.mode == "local":
            batches = handle.result()
            out, batches[b] = batches[b], None  # free each batch as soon as it is handed out
            return out
        import ray

        for _attempt in range(3):
            try:
                if handle["batches"] is None:
                    ref = handle.pop("ref")
                    self._inflight.discard(ref)
                    res = ray.get(ref)
                    handle["batches"] = self._views.attach(res["buffers"][0], handle["actor"], res["dropped"])
                out, handle["batches"][b] = handle["batches"][b], None
                return out
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                # Ray's own retries are spent (or the actor is gone for good): replace it and re-issue the buffer
                log.warning("reader for buffer %d of epoch %d died (%s); re-issuing it", plan.index, plan.epoch, e)
                i = plan.index % len(self._actors)
                self._actors[i] = self._new_actor()
                self._views.forget(i)
                handle.clear()
                handle.update(self._submit_ray(plan))
                self.metrics.reissued += 1
            except ray.exceptions.RayTaskError as e:
                # the read itself failed (bad bytes, a bad spec): deterministic, so never retried; the consumer
                # gets cellray's own one-line error, not Ray's wrapper with the actor's traceback
                cause = getattr(e, "cause", None)
                if isinstance(cause, CellrayError):
                    raise cause.with_traceback(None) from None
                raise
        raise CellrayError(f"buffer {plan.index} of epoch {plan.epoch} failed on 3 fresh readers")

    def _to_torch(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        pin = (
            self.pin_memory if self.pin_memory is not None else (self.device is not None and torch.cuda.is_available())
        )
        return to_torch(batch, self.obs_keys, pin=pin, device=self.device)

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

    def _balance(self, key: str, class_weights: dict[str, float] | None) -> dict[str, Any]:
        """Weights per category code of `key`: given, or inverse class frequency (one pass over obs codes)."""
        schema = self.store.manifest.obs_schema.get(key)
        if schema is None or "categories" not in schema:
            raise CellrayError(
                f"{self.store.path}: balance_by={key!r} needs a categorical obs column; have "
                f"{list(self.store.manifest.obs_schema)}"
            )
        cats = list(schema["categories"])
        if class_weights is not None:
            unknown = sorted(set(class_weights) - set(cats))
            if unknown:
                raise CellrayError(f"class_weights names {unknown}, not categories of obs column {key!r} ({cats})")
            w = np.array([float(class_weights.get(c, 0.0)) for c in cats])
        else:
            from engine.loading.chunks import StoreBlocks

            blocks = StoreBlocks(self.store)
            counts = np.zeros(len(cats), dtype=np.int64)
            for shard in range(self.store.n_shards):
                codes = blocks.obs_codes(shard, key)
                counts += np.bincount(codes[codes >= 0], minlength=len(cats))[: len(cats)]
            w = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
        return {"key": key, "weights": np.concatenate([w, [0.0]])}  # code -1 (missing) indexes the trailing 0
