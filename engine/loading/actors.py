"""The Loader's Ray mode: reader actors on the consumer's node, and `ActorReading`, which sends them buffers.

A `ReaderActor` builds a `BufferReader` (or a mix's `MixedReader`) from the recipe each call carries and reads
`buffers_per_call` consecutive buffers a call; beside its consumer it hands the batches over in shared memory
(engine/loading/shm.py). `ActorReading` has the interface of `engine.loading.readers.ThreadReading`, so both modes
give identical batches.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import LoaderError, cellray_cause
from engine.loading.readers import InFlight, ReaderProcess, ReadOptions
from engine.loading.sampler import BufferPlan

log = logging.getLogger(__name__)


def reader_actor_class():
    """The Ray actor class, made on first use so importing this module does not import Ray."""
    import ray

    @ray.remote
    class ReaderActor:
        """One reader of a rank, built on its first call from the recipe every call carries (`start_reader_actor`).
        Stateless between calls (but for reusable memory), so a restarted actor can redo any buffer."""

        def __init__(self, direct_io: bool, shared: tuple[str, str] | None = None):
            from numcodecs import blosc

            # a reader is one thread of work by design (its CPU share is reserved): no blosc thread pool per chunk
            blosc.use_threads = False
            self.reader = None  # a BufferReader, or a mix's MixedReader
            if direct_io:
                from engine.store import chunk_kernel

                chunk_kernel.warm()  # numba's start-up at set-up, not inside the first read
            self.arena = None  # batches in shared memory, when the consumer is on this node
            if shared is not None and shared[0] == ray.get_runtime_context().get_node_id():
                from engine.loading.shm import Arena

                self.arena = Arena.create(shared[1])

        def _reader(self, recipe: list):
            if self.reader is None:
                self.reader = ray.get(recipe[0])()  # the caller's ObjectRef of its recipe
            return self.reader

        def read_many(self, recipe: list, plans: list[BufferPlan], released: list[str]) -> dict[str, Any]:
            """Consecutive buffers' batches: {"buffers": [batches per plan], "dropped": [...], "busy_s": seconds
            spent reading them}. Beside the consumer, their big arrays lie in shared segments (`engine.loading.shm`);
            `released` names the segments the consumer is done with."""
            t0 = time.perf_counter()
            reader = self._reader(recipe)
            if self.arena is None:
                out = [reader.read(p) for p in plans]
                return {"buffers": out, "dropped": [], "busy_s": time.perf_counter() - t0}
            r = reader.cutter
            self.arena.begin(released)
            saved = r.dense_buffers, r.csr_buffers, r.small_buffers
            r.dense_buffers = r.small_buffers = self.arena  # dense X (raw or from the pipeline), ids, obs codes
            if r.pipeline is None:  # raw CSR X (a pipeline's CSR input is scratch: it stays in private memory)
                r.csr_buffers = self.arena
            ok = False
            try:
                out = self.arena.share([reader.read(p) for p in plans])
                ok = True
            finally:
                r.dense_buffers, r.csr_buffers, r.small_buffers = saved
                dropped = self.arena.end(ok)
            return {"buffers": out, "dropped": dropped, "busy_s": time.perf_counter() - t0}

        def pid(self) -> int:
            return os.getpid()

        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

    return ReaderActor


_ACTOR_CLASS = None


def start_reader_actor(
    direct_io: bool = True,
    num_cpus: float = 0.5,
    max_restarts: int = 3,
    share_memory: str | None = None,
):
    """A reader actor on this node (the node of the rank it feeds; soft, so it still starts elsewhere if this node's
    resources are gone). Each call passes its reader's recipe as `[ref]` (in a list: Ray hands the ref over, not its
    value), an ObjectRef (`ray.put`) of a picklable callable such as `functools.partial(BufferReader, path, ...)` that
    the caller keeps while the actor lives; the actor builds its reader from it on its first call. Ray restarts the
    actor up to `max_restarts` times and retries its in-flight reads, the restarted actor building its reader again
    from the retried call's recipe. (For a restartable actor with a constructor argument in the object store, Ray's
    driver logs an ERROR line to the terminal, ray-project/ray#53727: calls carry the recipe instead.)
    `share_memory` (a prefix from `engine.loading.shm.new_prefix`): `read_many` hands batches over in shared memory
    segments of that name when the actor runs on the caller's node."""
    global _ACTOR_CLASS
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = reader_actor_class()
    here = ray.get_runtime_context().get_node_id()
    return _ACTOR_CLASS.options(
        num_cpus=num_cpus,
        max_restarts=max_restarts,
        max_task_retries=max_restarts,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=True),
    ).remote(direct_io, (here, share_memory) if share_memory else None)


def least_loaded(load: Sequence[int], turn: int) -> int:
    """The reader with the least `load` (cells it has still to read); ties go in turn from `turn`. Calls differ in
    size (an epoch's last buffer is short, a mix's buffers differ) and actors in speed (they share the cores with
    their consumer): a call should not queue behind a long one while another actor has less to do."""
    n = len(load)
    return min(((turn + i) % n for i in range(n)), key=lambda a: load[a])


@dataclass
class ActorCall:
    """One `read_many` call: consecutive buffers read by one actor, fetched together."""

    plans: list[BufferPlan]
    reader: int  # the actor that reads it
    ref: Any = None  # the call's ObjectRef, until its result is fetched
    buffers: list | None = None  # fetched: batches per plan

    @property
    def cells(self) -> int:
        return sum(p.n_cells for p in self.plans)


class ActorReading:
    """Buffers read by Ray reader actors on this node, `buffers_per_call` consecutive buffers per actor call. Beside
    this process the actors hand batches over in shared memory (engine/loading/shm.py). A lost actor is replaced and
    its call re-issued; an error in the read itself (bad bytes, a bad spec) is deterministic: raised as cellray's own
    error, never retried."""

    def __init__(self, make_reader: Callable[[], Any], options: ReadOptions):
        self.make_reader = make_reader  # what each actor builds its reader with (see start_reader_actor)
        self._recipe = None  # make_reader in the object store, held here while the actors live
        self.options = options
        self.buffers_per_submit = options.buffers_per_call
        self.reissued = 0
        self.busy_s = 0.0  # seconds the actors spent in the calls fetched so far, all together
        self._actors: list = []
        self._views = None  # engine.loading.shm.SharedViews
        self._calls = 0
        self._open: list[ActorCall] = []  # calls issued and not fetched yet, oldest first

    def submit(self, plans: Sequence[BufferPlan]) -> list[InFlight]:
        if not self._actors:
            from engine.loading.shm import SharedViews

            self._views = SharedViews()
            self._actors = [self._new_actor() for _ in range(self.options.readers)]
        jobs = []
        per = self.options.buffers_per_call
        for at in range(0, len(plans), per):
            call = ActorCall(list(plans[at : at + per]), least_loaded(self.unread_cells(), self._calls))
            self._issue(call)
            self._open.append(call)
            self._calls += 1
            jobs += [InFlight(plan, call=call, slot=k) for k, plan in enumerate(call.plans)]
        return jobs

    def unread_cells(self) -> list[int]:
        """Per actor, the cells of its calls it has not finished reading. A call finished but not fetched yet is no
        work of its actor's: batches are handed out in call order, and counting it kept an actor that ran ahead
        idle while this process waited for the other's call."""
        import ray

        load = [0] * len(self._actors)
        if self._open:
            refs = [c.ref for c in self._open]
            done = set(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0])
            for c in self._open:
                if c.ref not in done:
                    load[c.reader] += c.cells
        return load

    def _issue(self, call: ActorCall) -> None:
        # `released` hands back the shared segments this process is done with
        actor = self._actors[call.reader]
        call.ref = actor.read_many.remote([self._recipe], call.plans, self._views.released(call.reader))

    def batch(self, job: InFlight, b: int) -> dict[str, Any]:
        import ray

        call = job.call
        for _attempt in range(3):
            try:
                if job.batches is None:
                    if call.buffers is None:
                        res = ray.get(call.ref)
                        self._open.remove(call)
                        self.busy_s += res["busy_s"]
                        call.buffers = self._views.attach(res["buffers"], call.reader, res["dropped"])
                    job.batches, call.buffers[job.slot] = call.buffers[job.slot], None
                out, job.batches[b] = job.batches[b], None
                return out
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                # Ray's own retries are spent (or the actor is gone for good): replace it and re-issue the call
                plan = job.plan
                log.warning("reader for buffer %d of epoch %d died (%s); re-issuing it", plan.index, plan.epoch, e)
                self._actors[call.reader] = self._new_actor()
                self._views.forget(call.reader)
                self._issue(call)
                self.reissued += 1
            except ray.exceptions.RayTaskError as e:
                cause = cellray_cause(e)
                if cause is not None:
                    raise cause from None
                raise
        raise LoaderError(f"buffer {job.plan.index} of epoch {job.plan.epoch} failed on 3 fresh readers")

    def processes(self) -> list[ReaderProcess]:
        import ray

        return [ReaderProcess(*ray.get([a.pid.remote(), a.node_id.remote()])) for a in self._actors]

    def close(self) -> None:
        if self._actors:
            import ray

            if self._open:  # let reads under way finish (a call each), rather than kill them mid-task
                refs = [c.ref for c in self._open]
                ray.wait(refs, num_returns=len(refs), timeout=5.0)
                self._open = []
            for a in self._actors:
                ray.kill(a)
            self._actors = []
            self._recipe = None
        if self._views is not None:
            self._views.close()
            self._views = None

    def _new_actor(self):
        import ray

        if self._recipe is None:
            self._recipe = ray.put(self.make_reader)
        return start_reader_actor(self.options.direct_io, self.options.cpus_per_reader, share_memory=self._views.prefix)
