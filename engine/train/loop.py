"""The training loop every Ray Train worker runs, top to bottom (in-process when resources.workers == 0).

Build this rank's Loader (reader actors beside the worker), the model (DDP-wrapped across ranks), AdamW with
linear warm-up + cosine decay; restore the newest checkpoint if there is one; then step: read a batch, forward
under bf16 autocast on GPU, backward (accumulating micro-batches without DDP's allreduce), clip, step. Every
`report_every` steps rank 0 sends metrics to the driver; every `checkpoint_every` steps all ranks save a
checkpoint; validation runs every `val_every` steps and at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import models
from engine.errors import TrainError
from engine.loading.loader import Loader
from engine.loading.mixing import Mix
from engine.loading.readers import ReadOptions
from engine.preprocess.transforms import Pipeline
from engine.train.checkpoint import Checkpointer, TrainState, training_vocabulary
from engine.train.config import PretrainConfig
from engine.train.data import sampler_config
from engine.train.debug import FaultDrill, StepTrace
from engine.train.metrics import MetricsWindow, allreduce_sum

log = logging.getLogger(__name__)

WORKER_ERRORS_LOG = "worker-errors.log"  # in the run's output folder: tracebacks of errors in the workers


@dataclass
class LoopContext:
    """What the driver hands every worker: the typed config plus what it resolved from the data."""

    config: PretrainConfig
    store: str | Mix  # absolute store path, or the mix of data.sources (absolute paths)
    pipeline: Pipeline | None  # data.transforms bound to the store (built once by the driver)
    model_config: dict[str, Any]  # the model config with data-dependent sizes filled in
    output: str  # absolute local output folder (metrics, local-mode checkpoints)
    checkpoints: str  # where checkpoints live: `output`, or train.output when it is a URI (Ray Train uploads them)
    local_mode: bool  # resources.workers == 0: Ray Train runs the loop in the driver's process
    run_log: Any  # the driver's RunLog actor


def train_loop_per_worker(ctx: LoopContext) -> None:
    import ray.train
    import ray.train.torch

    _quiet_ray_train_reports(ctx.output)
    cfg, t = ctx.config, ctx.config.train
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    use_bf16 = device.type == "cuda" and t.precision in ("auto", "bf16")

    # model and optimizer: the same initial weights on every rank (DDP also broadcasts rank 0's)
    torch.manual_seed(t.seed)
    model = models.build(cfg.model.name, ctx.model_config)
    checkpointer = _checkpointer(ctx, rank, world)
    _init_from_data(ctx, model, rank, checkpointer)
    objective = _Objective(model)
    if world > 1 or device.type == "cuda":
        objective = ray.train.torch.prepare_model(objective)
    optimizer = adamw(model, t.lr, t.weight_decay, fused=device.type == "cuda")

    # data: this rank's slice of every epoch; validation is small, so it reads with threads
    ray_readers = ray.is_initialized() and not ctx.local_mode
    loader = _make_loader(ctx, rank, world, "train", ray_readers, device)
    val_loader = _make_loader(ctx, rank, world, "val", False, device) if cfg.data.val_fraction > 0 else None
    total_steps = t.max_steps
    if t.epochs:
        total_steps = min(total_steps, max(1, t.epochs * len(loader) // t.grad_accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(min(t.warmup_steps, total_steps), total_steps, t.min_lr_ratio)
    )

    # resume from the newest complete checkpoint, at the next unseen batch
    torch.manual_seed(t.seed * 1000 + 1 + rank)  # per-rank randomness (VAE sampling, masks, dropout)
    state = TrainState(model, optimizer, scheduler, loader)
    resumed_in_epoch = _resume(checkpointer, state, rank)

    attempt = _attempt(ctx, rank, world) if cfg.debug.trace_dir or cfg.resources.elastic else 0
    trace = StepTrace(cfg.debug.trace_dir, rank, world, attempt)
    drill = FaultDrill(cfg.debug, ctx.output, rank)
    window = MetricsWindow()
    micro = 0
    objective.train()
    while state.step < total_steps and (not t.epochs or state.epoch < t.epochs):
        if not resumed_in_epoch:  # a restored loader already stands at its next unseen batch
            loader.set_epoch(state.epoch)
        resumed_in_epoch = False
        batches = iter(loader)
        while state.step < total_steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break  # the epoch is over
            t_data = time.perf_counter() - t0
            micro += 1
            sync = micro % t.grad_accum == 0
            # Accumulating micro-batches skip DDP's allreduce; the last one syncs the summed gradients.
            no_sync = objective.no_sync() if (not sync and hasattr(objective, "no_sync")) else contextlib.nullcontext()
            with no_sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, terms, n_cells = objective(batch, state.step)
            # a rank's share of a global batch may be a cell more or less than the others': weigh its mean loss
            # so that DDP's average over ranks is the mean over the global batch
            (loss * (loader.sampler.loss_weight / t.grad_accum)).backward()
            trace.cells(batch["index"], batch.get("source"))
            if sync:
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            window.add(loss, terms, n_cells, t_data, time.perf_counter() - t0, state.step + 1)
            if not sync:
                continue
            state.step += 1
            trace.step(state.step, state.epoch)
            drill.after_step(state.step)
            last = state.step == total_steps
            do_ckpt = state.step % t.checkpoint_every == 0 or last
            do_val = val_loader is not None and (bool(t.val_every) and state.step % t.val_every == 0 or last)
            if do_ckpt or do_val or state.step % t.report_every == 0:
                metrics = window.summary(
                    world, state.step, state.epoch, scheduler.get_last_lr()[0], rank, loader.metrics.queue_depth
                )
                if do_val:
                    metrics["val_loss"] = _validate(objective, val_loader, state.step, device, use_bf16, world)
                _report(ctx, rank, metrics, checkpointer, state, save=do_ckpt)
        else:
            break  # max_steps reached mid-epoch
        state.epoch += 1
        if t.epochs and state.epoch >= t.epochs and state.step < total_steps:
            # the epochs ran out before max_steps: report and checkpoint where training stopped
            metrics = window.summary(
                world, state.step, state.epoch, scheduler.get_last_lr()[0], rank, loader.metrics.queue_depth
            )
            _report(ctx, rank, metrics, checkpointer, state)
    loader.close()
    if val_loader is not None:
        val_loader.close()
    _buffers_of_rank0(model, world)
    trace.final(model)


def _buffers_of_rank0(model: torch.nn.Module, world: int) -> None:
    """DDP hands rank 0's buffers to every rank at each forward, and each rank then updates its own (running means):
    after the last step, end on rank 0's, as the next forward would, so every rank holds the model rank 0 saves."""
    if world > 1:
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _resume(checkpointer: Checkpointer, state: TrainState, rank: int) -> bool:
    """Restore the newest complete checkpoint into `state`; whether it left the loader inside an epoch."""
    if not checkpointer.restore(state):
        return False
    in_epoch = state.loader.state_dict()["batches_done"] < len(state.loader)
    if not in_epoch:  # the checkpoint closed an epoch
        state.epoch += 1
    log.info("rank %d resumed at step %d (epoch %d)", rank, state.step, state.epoch)
    return in_epoch


def _attempt(ctx: LoopContext, rank: int, world: int) -> int:
    """This worker group's number within the run (1, 2, ...: a restart or a resize starts a new group), from the
    driver's run log, the same on every rank."""
    import ray

    mine = ray.get(ctx.run_log.start_attempt.remote(_requester())) if rank == 0 else 0
    return int(allreduce_sum([mine], world)[0])


def _requester() -> str | None:
    """The id under which this run's Ray Train controller reserves elastic resources (see driver._ClusterView)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return f"train-{get_train_context().train_run_context.run_id}"
    except Exception:  # another Ray version, or local mode
        return None


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def _checkpointer(ctx: LoopContext, rank: int, world: int) -> Checkpointer:
    cfg = ctx.config
    return Checkpointer(
        ctx.checkpoints,
        rank=rank,
        world_size=world,
        keep=cfg.train.keep_checkpoints,
        local_mode=ctx.local_mode,
        meta={
            "job": cfg.name,
            "model": {"name": cfg.model.name, "config": ctx.model_config},
            "data": cfg.data.model_dump(mode="json"),
            "vocabulary": training_vocabulary(ctx.store, cfg.data.obs_keys, ctx.pipeline),
        },
    )


class _Objective(torch.nn.Module):
    """DDP syncs gradients through forward(): route the model's loss() through it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, step: int):
        out = self.model.loss(batch, step=step)  # a diverged loss stops the run at the next report (MetricsWindow)
        return out.loss, out.terms, out.n_cells


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` of the peak at `total`."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _report(
    ctx: LoopContext,
    rank: int,
    metrics: dict[str, Any],
    checkpointer: Checkpointer,
    state: TrainState,
    save: bool = True,
) -> None:
    """Metrics to the driver's run log (rank 0, fire and forget) and, at checkpoints (`save`), a checkpoint to Ray
    Train. report() is a barrier the controller drains every few seconds, so it is called at checkpoints only. The
    checkpoint also keeps every report since the previous one: a driver killed before it wrote them to
    metrics.jsonl loses none (its rerun resumes after that checkpoint and takes them from it)."""
    if rank == 0:
        ctx.run_log.add.remote(metrics)
        checkpointer.reports.append(metrics)
    if save:
        checkpointer.save(state, metrics)


def _make_loader(
    ctx: LoopContext, rank: int, world: int, split: str, ray_readers: bool, device: torch.device
) -> Loader:
    """This rank's Loader: Ray reader actors beside the worker (resources.readers_per_worker), else threads; on
    a GPU it delivers batches on the device (copied while the previous step runs)."""
    d, r = ctx.config.data, ctx.config.resources
    source = ctx.store.unweighted() if split == "val" and isinstance(ctx.store, Mix) else ctx.store
    loader = Loader(
        source,
        sampler_config(d, split),
        rank=rank,
        world_size=world,
        transforms=ctx.pipeline,
        obs_keys=tuple(d.obs_keys),
        mode="ray" if ray_readers and r.readers_per_worker > 0 else "local",
        reading=ReadOptions(
            readers=max(1, r.readers_per_worker), cpus_per_reader=r.cpus_per_reader, prefetch=d.loader.prefetch
        ),
        device=device if device.type == "cuda" else None,
    )
    if len(loader) == 0:
        loader.close()
        raise TrainError(
            f"{ctx.config.where('data.batch_size')}: rank {rank} of {world} gets no full batch of {d.batch_size} "
            f"cells of the {split} split per epoch: lower data.batch_size or resources.workers"
        )
    return loader


def _init_from_data(ctx: LoopContext, model: torch.nn.Module, rank: int, checkpointer: Checkpointer) -> None:
    """A model's start from its data (`init_cells` > 0: `init_from_data`, the transformer's gene embeddings): one
    batch of that many training cells as the loop reads them (transforms included; the whole training split as one
    rank reads it, with the spec's seed; a smaller split repeats cells). Rank 0 only: DDP's wrapping then copies its
    weights to every rank. Not when the run resumes (a restart, a resize): its checkpoint replaces the start."""
    n = getattr(model, "init_cells", 0)
    if not n or rank > 0 or checkpointer.resume_point is not None:
        return
    d = ctx.config.data
    plan = sampler_config(d, "train").model_copy(update={"batch_size": n, "remainder": "pad", "global_batch": False})
    t0 = time.perf_counter()
    with Loader(ctx.store, plan, transforms=ctx.pipeline, obs_keys=tuple(d.obs_keys), mode="local") as loader:
        batch = next(iter(loader))
    model.init_from_data(batch)
    log.info("model initialised from %d training cells in %.1f s", len(batch["index"]), time.perf_counter() - t0)


@torch.no_grad()
def _validate(objective, loader: Loader, step: int, device, use_bf16: bool, world: int) -> float:
    """Mean loss over this epoch's validation split, averaged over ranks; the training RNG stream is untouched."""
    objective.eval()
    model = getattr(objective, "module", objective).model
    total, n = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step)
        for batch in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model.loss(batch, step=None)
            total += float(out.loss) * out.n_cells
            n += out.n_cells
    objective.train()
    s = allreduce_sum([total, n], world)
    return float(s[0] / s[1]) if s[1] > 0 else float("nan")


def _quiet_ray_train_reports(output: str) -> None:
    """Ray Train logs one INFO line per report() per worker from a logger named after its file (outside
    `ray.train`, so RunConfig's LoggingConfig misses it); the driver prints its own progress instead. It also logs
    the traceback of an error in the training function, which Ray streams to the driver's terminal before the
    driver's own one-line error: that goes to the run's `worker-errors.log` instead (debugging keeps both)."""
    if log.isEnabledFor(logging.DEBUG):
        return
    try:
        from ray.train.v2._internal import util
        from ray.train.v2._internal.execution import context, storage
    except ImportError:
        return
    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)
    errors = logging.getLogger(util.__name__)
    if not any(isinstance(h, logging.FileHandler) for h in errors.handlers):
        Path(output).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(output) / WORKER_ERRORS_LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s pid %(process)d %(levelname)s %(message)s"))
        errors.addHandler(handler)
        errors.propagate = False
