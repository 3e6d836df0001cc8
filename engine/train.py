"""Distributed pretraining on Ray Train: one TorchTrainer run per job spec.

Each Ray Train worker builds the Loader for its rank, wraps the model in DDP (gloo on CPU, NCCL on GPU) and
trains with AdamW, linear warm-up + cosine decay, gradient clipping and accumulation, bf16 autocast on GPU.
Every `checkpoint_every` optimizer steps all ranks report one checkpoint directory (Ray Train merges them):

    state.pt         rank 0: model, optimizer, scheduler (torch.save)
    model.pt         rank 0: the bare model state_dict (what `cellray embed` loads, weights_only)
    meta.json        rank 0: step, epoch, model name + resolved config, the data section of the spec
    rank{r}.pt       every rank: its loader position and RNG states

A restarted worker group (FailureConfig(max_failures)) or a rerun of the same spec resumes from the latest
complete checkpoint under `train.output` (a local folder, or a pyarrow filesystem URI such as s3://... on a
cluster) and continues at the next unseen batch. Metrics (loss, cells/s, the data-wait fraction of each step)
go every `report_every` steps to a small actor the driver polls for the progress bar and the loss curve
(metrics.jsonl and loss.png in the output folder), and with every checkpoint to Ray Train: report() is a
barrier that the controller drains every few seconds, so it is called at checkpoints only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import models
from engine.errors import CellrayError

log = logging.getLogger(__name__)

META_FILE = "meta.json"
MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"


class TrainError(CellrayError):
    """A training run that cannot start or cannot resume."""


# ----------------------------------------------------------------------------------------------- driver side


@dataclass
class TrainResult:
    output: Path  # train.output: checkpoints, metrics.jsonl, loss.png
    checkpoint: Path | str | None  # the latest checkpoint directory (a URI string when train.output is one)
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per report, by step

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def resolve_model_config(spec, store) -> dict[str, Any]:
    """The spec's model config with the data-dependent sizes filled in from the store and the transforms."""
    from jobs.spec import build_pipeline

    name, cfg = spec.model.name, dict(spec.model.config)
    pipeline = build_pipeline(spec, store)
    width = pipeline.n_genes_out if pipeline is not None else store.n_genes
    schema = store.manifest.obs_schema

    def n_categories(key: str, where: str) -> int:
        if key not in schema or "categories" not in schema[key]:
            raise TrainError(f"{spec.where(where)}: obs column {key!r} is not categorical in {store.path}")
        return len(schema[key]["categories"]) + 1  # +1: a slot for missing values

    if name == "vae":
        cfg["n_genes"] = cfg.get("n_genes") or width
        if cfg.get("batch_key") and not cfg.get("n_batch"):
            cfg["n_batch"] = n_categories(cfg["batch_key"], "model.config.batch_key")
    if name == "transformer":
        tokeniser = pipeline and (pipeline.binning or pipeline.rank)
        offset = int(tokeniser.params["offset"]) if tokeniser else 0
        cfg["n_genes"] = cfg.get("n_genes") or width + offset  # token ids are vocabulary positions + the tokeniser's offset
        if pipeline is not None and pipeline.binning is not None:
            cfg.setdefault("n_bins", int(pipeline.binning.params["n_bins"]))
            cfg.setdefault("input", "binned")
        if pipeline is not None and pipeline.rank is not None:
            cfg.setdefault("input", "rank")
    if name == "probe":
        cfg["n_input"] = cfg.get("n_input") or width
        if not cfg.get("n_classes"):
            cfg["n_classes"] = n_categories(cfg.get("label_key", "cell_type"), "model.config.label_key")
    return dataclasses.asdict(models.make_config(name, cfg))


def check_resources(spec) -> None:
    """Refuse, before anything starts, a run the cluster cannot hold (Ray would wait forever instead)."""
    import ray

    r = spec.resources
    if r.workers == 0:
        return
    total = ray.cluster_resources()
    need_cpu = r.workers * (r.cpus_per_worker + r.readers_per_worker * r.cpus_per_reader)
    need_gpu = r.workers * r.gpus_per_worker
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if need_gpu > have_gpu:
        raise TrainError(
            f"{spec.where('resources')}: {r.workers} workers x {r.gpus_per_worker} GPUs need {need_gpu:g} GPUs; "
            f"the cluster has {have_gpu:g}"
        )
    if need_cpu > have_cpu + 1e-9:
        raise TrainError(
            f"{spec.where('resources')}: {r.workers} workers x ({r.cpus_per_worker:g} CPUs + {r.readers_per_worker} readers x "
            f"{r.cpus_per_reader:g} CPUs) need {need_cpu:g} CPUs; the cluster has {have_cpu:g} "
            "(lower resources.workers or cpus_per_worker, or start Ray with more CPUs)"
        )


def pretrain(
    spec,
    address: str | None = None,
    progress=None,
    *,
    trace_dir: str | os.PathLike | None = None,
    fault: dict[str, Any] | None = None,
) -> TrainResult:
    """Run a `kind: pretrain` spec on Ray Train; returns where its checkpoints and metrics are.

    `trace_dir` (tests, debugging) makes every rank log the cell ids of each step and its final parameters there.
    `fault={"rank": r, "step": s}` makes rank r exit hard once, at step s (a fault-tolerance drill).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from engine.runtime import ray_session
    from engine.store import Store
    from jobs.spec import check_data_section

    check_data_section(spec)
    store = Store.open(spec.data.store)
    model_config = resolve_model_config(spec, store)
    r = spec.resources
    uri = "://" in spec.train.output  # a pyarrow filesystem URI (s3://, gs://, ...): checkpoints go there
    if uri:
        storage_path, name = spec.train.output.rstrip("/").rsplit("/", 1)
        output = Path("runs", name).resolve()  # this machine keeps metrics.jsonl and loss.png
        if r.workers == 0:
            raise TrainError(f"{spec.where('train.output')}: resources.workers: 0 (in-process) needs a local output folder")
    else:
        output = Path(spec.train.output).resolve()
        storage_path, name = str(output.parent), output.name
    output.mkdir(parents=True, exist_ok=True)
    with ray_session(address):
        check_resources(spec)
        sink = RunLog.options(num_cpus=0).remote()
        loop_config = {
            "spec": spec.model_dump(mode="json"),
            "store": str(Path(spec.data.store).resolve()),
            "model_config": model_config,
            "sink": sink,
            "trace_dir": str(Path(trace_dir).resolve()) if trace_dir else None,
            "fault": dict(fault) if fault else None,
            "local_mode": r.workers == 0,  # Ray Train runs the loop in this process
            "output": str(output),
            "output_is_local": not uri,  # only then can workers look for checkpoints on disk
        }
        if fault:
            loop_config["fault"]["marker"] = str(output / f".fault-{fault['rank']}-{fault['step']}")
        per_worker = {"CPU": r.cpus_per_worker}
        if r.gpus_per_worker:
            per_worker["GPU"] = r.gpus_per_worker
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=per_worker if r.workers else None
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage_path,
                failure_config=FailureConfig(max_failures=spec.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
                # Ray Train logs a line per report() per worker at INFO; the driver prints its own summary.
                logging_config=LoggingConfig(log_level="DEBUG" if log.isEnabledFor(logging.DEBUG) else "WARNING"),
            ),
        )
        outcome: dict[str, Any] = {}

        def fit() -> None:
            try:
                outcome["result"] = trainer.fit()
            except BaseException as e:  # re-raised on the driver thread
                outcome["error"] = e

        thread = threading.Thread(target=fit, name="cellray-fit", daemon=True)
        thread.start()
        seen = 0
        while thread.is_alive():
            thread.join(0.5)
            seen = _drain(sink, seen, progress, spec.train.max_steps)
        history = ray.get(sink.history.remote())
        _drain(sink, seen, progress, spec.train.max_steps)
        ray.kill(sink)
    if "error" in outcome:
        e = outcome["error"]
        raise TrainError(f"{spec.where('train')}: training failed: {e}") from e
    result = outcome["result"]
    history = _by_step(_read_metrics(output) + history)  # a resumed run adds to the earlier steps
    write_metrics(output, history)
    if result.checkpoint is not None:
        ckpt = result.checkpoint.path if uri else Path(result.checkpoint.path)
    else:
        ckpt = None if uri else latest_checkpoint(output, required=False)
    return TrainResult(output=output, checkpoint=ckpt, history=history)


def _drain(sink, seen: int, progress, total: int) -> int:
    import ray

    new = ray.get(sink.since.remote(seen))
    for m in new:
        if progress is not None:
            progress("train", int(m["step"]), total)
        log.info(
            "step %d/%d  loss %.4f  %s%.0f cells/s  data-wait %.0f%%",
            m["step"], total, m["loss"],
            f"val {m['val_loss']:.4f}  " if "val_loss" in m else "",
            m.get("cells_per_s", 0.0), 100 * m.get("data_wait_frac", 0.0),
        )
    return seen + len(new)


def _by_step(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per step: after a restart the redone steps replace the first attempt's."""
    by = {int(m["step"]): m for m in history}
    return [by[s] for s in sorted(by)]


def _read_metrics(output: Path) -> list[dict[str, Any]]:
    path = output / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_metrics(output: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl and (when matplotlib is there) loss.png, each written under a temporary name first."""
    from engine.store import temporary_sibling

    dest = output / METRICS_FILE
    tmp = temporary_sibling(dest)
    tmp.write_text("".join(json.dumps(m) + "\n" for m in history))
    os.replace(tmp, dest)
    if not history:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no %s", LOSS_PNG)
        return
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot([m["step"] for m in history], [m["loss"] for m in history], label="train")
    val = [m for m in history if "val_loss" in m]
    if val:
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(output.name)
    ax.legend()
    fig.tight_layout()
    dest = output / LOSS_PNG
    tmp = temporary_sibling(dest).with_suffix(".png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, dest)


def checkpoint_complete(path: Path) -> bool:
    """Every file of every rank is there (a rank that died while writing leaves an incomplete directory)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    names = [MODEL_FILE, STATE_FILE] + [f"rank{r}.pt" for r in range(int(meta.get("world_size", 1)))]
    return all((path / n).is_file() and (path / n).stat().st_size > 0 for n in names)


def latest_checkpoint(path: str | os.PathLike, required: bool = True) -> Path | None:
    """`path` itself when it is a checkpoint, else the complete checkpoint with the highest step under it."""
    path = Path(path)
    if (path / META_FILE).exists():
        return path
    best: tuple[int, Path] | None = None
    for meta in path.glob(f"checkpoint_*/{META_FILE}") if path.is_dir() else ():
        if not checkpoint_complete(meta.parent):
            continue
        step = json.loads(meta.read_text())["step"]
        if best is None or step > best[0]:
            best = (step, meta.parent)
    if best is None and required:
        raise TrainError(f"{path}: no checkpoint here (expected a run's train.output folder or a checkpoint_* directory)")
    return best[1] if best else None


def load_checkpoint(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a checkpoint (or of a run folder's latest one), in eval mode on CPU, and its meta."""
    ckpt = latest_checkpoint(path)
    meta = json.loads((ckpt / META_FILE).read_text())
    model = models.build(meta["model"]["name"], meta["model"]["config"])
    model.load_state_dict(torch.load(ckpt / MODEL_FILE, map_location="cpu", weights_only=True))
    model.eval()
    meta["path"] = str(ckpt)
    return model, meta


def _ray_actor(cls):
    import ray

    return ray.remote(cls)


class _RunLog:
    """Rank 0's metric reports, for the driver's progress bar and loss curve (works on a remote cluster too)."""

    def __init__(self):
        self.items: list[dict[str, Any]] = []

    def add(self, metrics: dict[str, Any]) -> None:
        self.items.append(metrics)

    def since(self, n: int) -> list[dict[str, Any]]:
        return self.items[n:]

    def history(self) -> list[dict[str, Any]]:
        return list(self.items)


RunLog = _ray_actor(_RunLog)


# ----------------------------------------------------------------------------------------------- worker side


class _Objective(torch.nn.Module):
    """DDP syncs gradients through forward(): route the model's loss() through it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, step: int):
        out = self.model.loss(batch, step=step)
        return out.loss, out.terms, out.n_cells


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _resume_point(cfg: dict):
    """The newest complete checkpoint: Ray Train's latest registered one, or a newer one on disk.

    Ray registers a checkpoint when its controller next polls the workers, so a worker lost right after
    report() can leave a complete checkpoint on disk that Ray does not know yet; local mode keeps none.
    """
    import ray.train

    registered = ray.train.get_checkpoint()
    if not cfg.get("output_is_local", True):
        return registered
    on_disk = latest_checkpoint(cfg["output"], required=False)
    if on_disk is None:
        return registered
    if registered is not None:
        with registered.as_directory() as d:
            if (Path(d) / META_FILE).exists() and json.loads((Path(d) / META_FILE).read_text())["step"] >= json.loads(
                (on_disk / META_FILE).read_text()
            )["step"]:
                return registered
    return ray.train.Checkpoint.from_directory(str(on_disk))


def _make_loader(cfg: dict, rank: int, world: int, split: str, ray_readers: bool):
    """This rank's Loader: Ray reader actors beside the worker (resources.readers_per_worker), else threads."""
    from engine.loader import Loader

    d, r = cfg["spec"]["data"], cfg["spec"]["resources"]
    readers = r["readers_per_worker"]
    extra = dict(d["loader"])
    if split == "val":
        extra.setdefault("remainder", "pad")  # a small split must still give every rank a batch
    return Loader(
        cfg["store"],
        batch_size=d["batch_size"],
        transforms=d["transforms"] or None,
        seed=d["seed"],
        rank=rank,
        world_size=world,
        mode="ray" if ray_readers and readers > 0 else "local",
        num_workers=max(1, readers),
        reader_cpus=r["cpus_per_reader"],
        obs_keys=tuple(d["obs_keys"]),
        split=split,
        val_fraction=d["val_fraction"],
        **extra,
    )


def train_loop_per_worker(cfg: dict) -> None:
    """The loop every Ray Train worker runs (in-process when resources.workers == 0)."""
    import ray.train
    import ray.train.torch

    _quiet_ray_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec, t = cfg["spec"], cfg["spec"]["train"]
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    use_bf16 = device.type == "cuda" and t["precision"] in ("auto", "bf16")
    ray_readers = ray.is_initialized() and not cfg.get("local_mode")

    torch.manual_seed(t["seed"])  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    name = spec["model"]["name"]
    model = models.build(name, cfg["model_config"])
    objective = _Objective(model)
    if world > 1 or device.type == "cuda":
        objective = ray.train.torch.prepare_model(objective)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t["lr"], fused=device.type == "cuda",
    )
    loader = _make_loader(cfg, rank, world, "train", ray_readers)
    # validation is small: read it with threads, not another set of reader actors
    val_loader = _make_loader(cfg, rank, world, "val", False) if spec["data"]["val_fraction"] > 0 else None
    accum = t["grad_accum"]
    total_steps = t["max_steps"]
    if t["epochs"]:
        total_steps = min(total_steps, max(1, t["epochs"] * len(loader) // accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(min(t["warmup_steps"], total_steps), total_steps, t["min_lr_ratio"])
    )

    step, epoch, resumed_in_epoch = 0, 0, False
    torch.manual_seed(t["seed"] * 1000 + 1 + rank)  # per-rank randomness (VAE sampling, masks, dropout)
    cfg["world_size"] = world
    checkpoint = _resume_point(cfg)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            d = Path(d)
            state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=False)
            mine = d / f"rank{rank}.pt"
            if not mine.exists():
                raise TrainError(f"{d}: no {mine.name}: the checkpoint was written by another number of workers")
            own = torch.load(mine, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(own["loader"])
        _set_rng_state(own["rng"])
        pos = loader.state_dict()
        step, epoch = state["step"], pos["epoch"]
        resumed_in_epoch = pos["batches_done"] < len(loader)
        if not resumed_in_epoch:  # the checkpoint closed an epoch
            epoch += 1
        log.info("rank %d resumed at step %d (epoch %d)", rank, step, epoch)

    trace = _Trace(cfg.get("trace_dir"), rank)
    fault = cfg.get("fault")
    window = _Window()
    micro = 0
    objective.train()
    while step < total_steps and (not t["epochs"] or epoch < t["epochs"]):
        if not resumed_in_epoch:  # a restored loader already stands at its next unseen batch
            loader.set_epoch(epoch)
        resumed_in_epoch = False
        it = iter(loader)
        while step < total_steps:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            batch = _to_device(batch, device)
            t_data = time.perf_counter() - t0
            micro += 1
            sync = micro % accum == 0
            # Accumulating micro-batches skip DDP's allreduce; the last one syncs the summed gradients.
            no_sync = objective.no_sync() if (not sync and hasattr(objective, "no_sync")) else contextlib.nullcontext()
            with no_sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, terms, n_cells = objective(batch, step)
            (loss / accum).backward()
            trace.cells(batch["index"])
            if sync:
                if t["grad_clip"] > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            window.add(float(loss.detach()), terms, n_cells, t_data, time.perf_counter() - t0)
            if not sync:
                continue
            step += 1
            trace.step(step, epoch)
            if fault and rank == fault["rank"] and step == fault["step"] and not os.path.exists(fault["marker"]):
                Path(fault["marker"]).touch()
                os._exit(1)  # a worker lost mid-run: Ray Train restarts the group from the last checkpoint
            last = step == total_steps
            do_ckpt = step % t["checkpoint_every"] == 0 or last
            do_val = val_loader is not None and (bool(t["val_every"]) and step % t["val_every"] == 0 or last)
            if do_ckpt or do_val or step % t["report_every"] == 0:
                metrics = window.summary(world, step, epoch, scheduler.get_last_lr()[0])
                if do_val:
                    metrics["val_loss"] = _validate(objective, val_loader, step, device, use_bf16, world)
                _report(cfg, rank, metrics, do_ckpt, model, optimizer, scheduler, loader, step, epoch)
        else:
            break  # max_steps reached mid-epoch
        epoch += 1
        if t["epochs"] and epoch >= t["epochs"] and step < total_steps:
            # the epochs ran out before max_steps: report and checkpoint where training stopped
            metrics = window.summary(world, step, epoch, scheduler.get_last_lr()[0])
            _report(cfg, rank, metrics, True, model, optimizer, scheduler, loader, step, epoch)
    loader.close()
    if val_loader is not None:
        val_loader.close()
    trace.final(model)


def _quiet_ray_train_reports() -> None:
    """Ray Train logs one INFO line per report() per worker from a logger named after its file (outside
    `ray.train`, so RunConfig's LoggingConfig misses it); the driver prints its own progress instead."""
    if log.isEnabledFor(logging.DEBUG):
        return
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:
        return
    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


class _Window:
    """Metrics of the steps since the last report, on this rank."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.terms: dict[str, list[float]] = {}
        self.cells = 0
        self.t_data = 0.0
        self.t_total = 0.0
        self.start = time.perf_counter()

    def add(self, loss: float, terms: dict[str, float], n_cells: int, t_data: float, t_step: float) -> None:
        self.losses.append(loss)
        for k, v in terms.items():
            self.terms.setdefault(k, []).append(float(v))
        self.cells += n_cells
        self.t_data += t_data
        self.t_total += t_step

    def summary(self, world: int, step: int, epoch: int, lr: float) -> dict[str, Any]:
        import torch.distributed as dist

        elapsed = time.perf_counter() - self.start
        # Mean loss over ranks: one tiny allreduce per report.
        stats = torch.tensor([sum(self.losses), len(self.losses), self.cells, self.t_data, self.t_total], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            stats = stats.to(_dist_device())
            dist.all_reduce(stats)
            stats = stats.cpu()
        m = {
            "step": step,
            "epoch": epoch,
            "lr": lr,
            "loss": float(stats[0] / max(1.0, float(stats[1]))),
            "cells": int(stats[2]),
            "cells_per_s": float(stats[2]) / max(elapsed, 1e-9),
            "data_wait_frac": float(stats[3] / max(float(stats[4]), 1e-9)),
        }
        m.update({k: float(np.mean(v)) for k, v in self.terms.items()})
        self.reset()
        return m


def _dist_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@torch.no_grad()
def _validate(objective, loader, step: int, device, use_bf16: bool, world: int) -> float:
    """Mean loss over this epoch's validation split, averaged over ranks; the training RNG stream is untouched."""
    import torch.distributed as dist

    objective.eval()
    total, n = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step)
        for batch in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = _unwrap(objective).model.loss(_to_device(batch, device), step=None)
            total += float(out.loss) * out.n_cells
            n += out.n_cells
    objective.train()
    stats = torch.tensor([total, n], dtype=torch.float64)
    if world > 1 and dist.is_initialized():
        stats = stats.to(_dist_device())
        dist.all_reduce(stats)
        stats = stats.cpu()
    return float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def _report(cfg, rank, metrics, do_ckpt, model, optimizer, scheduler, loader, step, epoch) -> None:
    import ray.train

    if rank == 0:
        cfg["sink"].add.remote(metrics)  # fire and forget: the progress bar and the loss curve
    if not do_ckpt:
        # ray.train.report() is a barrier the controller drains every few seconds, and Ray keeps only the
        # metrics of checkpoints anyway: between checkpoints, metrics go to the driver's RunLog alone.
        return
    if cfg.get("local_mode"):
        # Ray Train's local mode does not persist checkpoints: write them to output/ ourselves, atomically.
        from engine.store import temporary_sibling

        final = Path(cfg["output"]) / f"checkpoint_step{step:09d}"
        tmp = temporary_sibling(final)
        tmp.mkdir(parents=True)
        _write_checkpoint(tmp, cfg, rank, metrics, model, optimizer, scheduler, loader, step, epoch)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        keep = cfg["spec"]["train"]["keep_checkpoints"]
        for old in sorted(Path(cfg["output"]).glob("checkpoint_step*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(final)))
        return
    with tempfile.TemporaryDirectory(prefix="cellray-ckpt-") as d:
        _write_checkpoint(Path(d), cfg, rank, metrics, model, optimizer, scheduler, loader, step, epoch)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _write_checkpoint(d: Path, cfg, rank, metrics, model, optimizer, scheduler, loader, step, epoch) -> None:
    if rank == 0:
        spec = cfg["spec"]
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
            d / STATE_FILE,
        )
        torch.save(model.state_dict(), d / MODEL_FILE)
        meta = {
            "step": step,
            "epoch": epoch,
            "job": spec["name"],
            "world_size": cfg["world_size"],
            "model": {"name": spec["model"]["name"], "config": cfg["model_config"]},
            "data": spec["data"],
            "metrics": metrics,
        }
        (d / META_FILE).write_text(json.dumps(meta, indent=1))
    torch.save({"loader": loader.state_dict(), "rng": _rng_state(), "epoch": epoch, "step": step}, d / f"rank{rank}.pt")


class _Trace:
    """Optional per-rank log of the cells each optimizer step consumed (tests of exactly-once and resume)."""

    def __init__(self, trace_dir: str | None, rank: int):
        self.dir = Path(trace_dir) if trace_dir else None
        self.rank = rank
        self.pending: list[np.ndarray] = []
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)

    def cells(self, index: torch.Tensor) -> None:
        if self.dir:
            self.pending.append(index.detach().cpu().numpy())

    def step(self, step: int, epoch: int) -> None:
        if not self.dir:
            return
        cells = np.concatenate(self.pending).tolist() if self.pending else []
        self.pending = []
        with open(self.dir / f"rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "pid": os.getpid(), "cells": cells}) + "\n")

    def final(self, model: torch.nn.Module) -> None:
        if self.dir:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, self.dir / f"final-rank{self.rank}.pt")
