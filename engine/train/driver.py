"""Distributed pretraining on Ray Train: one TorchTrainer run per `PretrainConfig`.

The driver checks the data and the cluster before anything starts, assembles a TorchTrainer whose workers run
`engine.train.loop.train_loop_per_worker`, polls the run log for progress while `fit()` runs in a thread, and
finally writes metrics.jsonl and loss.png covering every step of the run (earlier attempts included).

Failures: a lost worker, reader or node (a process that died) is retried up to `train.max_failures` times, each
retry a new fit() that resumes from the latest complete checkpoint under `train.output` (a local folder, or a
pyarrow filesystem URI such as s3://... on a cluster) at the next unseen batch. A CellrayError raised in a worker
(bad bytes in the store, a bad spec) is deterministic: it ends the run at once with its own one-line message, as
Ray Train's own retry policy cannot tell the two apart. A rerun of the same spec resumes the same way, and
metrics.jsonl (rewritten as reports arrive) keeps the whole history across attempts and reruns.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.atomic import write_text_atomically, writer_lock
from engine.errors import TrainError, cellray_cause
from engine.objects import cache_dir, exists, is_uri, location, read_bytes, upload_file
from engine.progress import Progress, silent
from engine.runtime import ray_session
from engine.train.checkpoint import checkpoint_metrics, latest_checkpoint
from engine.train.config import PretrainConfig
from engine.train.data import open_run_data
from engine.train.loop import LoopContext, train_loop_per_worker
from engine.train.metrics import (
    LOSS_PNG,
    METRICS_FILE,
    RunLog,
    merge_by_step,
    read_attempts,
    read_metrics,
    write_metrics,
)

log = logging.getLogger(__name__)

ATTEMPTS_FILE = ".attempts"  # worker groups started for this output folder so far (the step trace's attempt numbers)

OnReport = Callable[[dict[str, Any]], None]  # sees each metrics report as it arrives (e.g. dashboard gauges)


@dataclass
class TrainResult:
    output: Path  # train.output: checkpoints, metrics.jsonl, loss.png
    checkpoint: Path | str | None  # the latest checkpoint directory (a URI string when train.output is one)
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per report, by step

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def check_resources(config: PretrainConfig) -> None:
    """Refuse, before anything starts, a run the cluster cannot hold (Ray would wait forever instead)."""
    import ray

    r = config.resources
    n = r.min_workers  # an elastic run starts at what fits, from its minimum on
    if n == 0:
        return
    total = ray.cluster_resources()
    need_cpu = n * r.per_worker()["CPU"]
    need_gpu = n * r.gpus_per_worker
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if need_gpu > have_gpu:
        raise TrainError(
            f"{config.where('resources')}: {n} workers x {r.gpus_per_worker} GPUs need {need_gpu:g} GPUs; "
            f"the cluster has {have_gpu:g}"
        )
    if need_cpu > have_cpu + 1e-9:
        raise TrainError(
            f"{config.where('resources')}: {n} workers x ({r.cpus_per_worker:g} CPUs + {r.readers_per_worker} "
            f"readers x {r.cpus_per_reader:g} CPUs) need {need_cpu:g} CPUs; the cluster has {have_cpu:g} "
            "(lower resources.workers or cpus_per_worker, or start Ray with more CPUs)"
        )


def pretrain(
    config: PretrainConfig,
    address: str | None = None,
    progress: Progress | None = None,
    on_report: OnReport | None = None,
) -> TrainResult:
    """Run a pretraining config on Ray Train; returns where its checkpoints and metrics are. `on_report` sees
    each report (step, loss, cells_per_s, data_wait_frac, ...) as it arrives (e.g. dashboard gauges)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    progress = progress or silent
    data = open_run_data(config)
    r = config.resources
    uri = is_uri(config.train.output)  # checkpoints go to the bucket (Ray Train uploads them through pyarrow)
    if uri:
        remote = location(config.train.output)
        if not remote.key:
            raise TrainError(f"{config.where('train.output')}: {remote} needs a prefix (s3://BUCKET/RUN)")
        storage_path, name = str(remote.parent), remote.name
        output = cache_dir() / "runs" / remote.scheme / remote.bucket / remote.key  # this node's metrics and plot
        if r.max_workers == 0:
            raise TrainError(
                f"{config.where('train.output')}: resources.workers: 0 (in-process) needs a local output folder"
            )
    else:
        output = Path(config.train.output).resolve()
        storage_path, name = str(output.parent), output.name
    output.mkdir(parents=True, exist_ok=True)
    if uri and exists(remote / METRICS_FILE):  # an earlier run's history, to continue it
        write_text_atomically(output / METRICS_FILE, read_bytes(remote / METRICS_FILE).decode())
    if config.debug.trace_dir:
        config = config.model_copy(
            update={"debug": config.debug.model_copy(update={"trace_dir": str(Path(config.debug.trace_dir).resolve())})}
        )
    # one driver per output folder: a second `cellray run` of the same spec fails at once instead of racing
    with writer_lock(output), ray_session(address):
        check_resources(config)
        # On the driver's own node: the log must outlive the loss of any worker node (a node-loss drill found it
        # placed on the node it then removed).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        run_log = ray.remote(RunLog).options(num_cpus=0, scheduling_strategy=here).remote(str(output / ATTEMPTS_FILE))
        ctx = LoopContext(
            config=config,
            store=data.source,
            pipeline=data.pipeline,
            model_config=data.model_config,
            output=str(output),
            checkpoints=config.train.output if uri else str(output),
            local_mode=r.max_workers == 0,
            run_log=run_log,
        )
        trainer = _trainer(ctx, storage_path, name)
        # a resumed run adds to the steps of earlier attempts, including reports only its checkpoints kept
        earlier = merge_by_step(checkpoint_metrics(output) + read_metrics(output))
        history: list[dict[str, Any]] = []
        stale = read_attempts(output / ATTEMPTS_FILE)["requesters"]  # earlier drivers' (a stopped one's linger)
        look = _ClusterView(r.resize_interval_s, stale) if r.elastic else None
        for attempt in range(config.train.max_failures + 1):
            outcome = _fit_in_thread(
                trainer, run_log, history, earlier, output, progress, config.train.max_steps, on_report, look
            )
            if "result" in outcome:
                break
            error = outcome["error"]
            data_error = cellray_cause(error)
            if data_error is not None:  # deterministic: retrying reads the same bad bytes again
                raise data_error from None
            if attempt == config.train.max_failures:
                raise TrainError(
                    f"{config.where('train')}: training failed after {attempt + 1} attempt(s) "
                    f"(train.max_failures: {config.train.max_failures}): {_first_line(error)}"
                ) from error
            log.warning(
                "training attempt %d lost a process (%s); resuming from the last checkpoint",
                attempt + 1,
                _first_line(error),
            )
        ray.kill(run_log)
    result = outcome["result"]
    history = merge_by_step(earlier + history)
    write_metrics(output, history)
    if uri:
        for name in (METRICS_FILE, LOSS_PNG):
            if (output / name).exists():
                upload_file(remote / name, output / name)
    if result.checkpoint is not None:
        ckpt = f"{remote.scheme}://{result.checkpoint.path}" if uri else Path(result.checkpoint.path)
    else:
        ckpt = None if uri else latest_checkpoint(output, required=False)
    return TrainResult(output=output, checkpoint=ckpt, history=history)


def _trainer(ctx: LoopContext, storage_path: str, name: str):
    """The TorchTrainer of the run: its workers run the loop; checkpoints go to storage_path/name."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = ctx.config.resources
    per_worker = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker:
        per_worker["GPU"] = r.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=ctx,
        scaling_config=ScalingConfig(
            # elastic: Ray Train starts as many as fit in [min, max], restarts the group smaller when a worker is
            # lost and larger when room appears (checked every resize_interval_s), each time from the newest checkpoint
            num_workers=(r.min_workers, r.max_workers) if r.elastic else r.workers,
            elastic_resize_monitor_interval_s=r.resize_interval_s,
            use_gpu=r.gpus_per_worker > 0,
            resources_per_worker=per_worker if r.max_workers else None,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=0),  # retries are ours: see the module docstring
            checkpoint_config=CheckpointConfig(num_to_keep=ctx.config.train.keep_checkpoints),
            # Ray Train logs a line per report() per worker at INFO; the driver prints its own summary.
            logging_config=LoggingConfig(log_level="DEBUG" if log.isEnabledFor(logging.DEBUG) else "WARNING"),
        ),
    )


class _ClusterView:
    """Keeps the cluster view of Ray Train's elastic policy fresh. The policy sizes a worker group from the nodes that
    Ray's AutoscalingCoordinator actor lists, and that actor looks at the cluster only every 20 s: a lost node stays
    listed (a restart then asks for a worker that cannot be placed and waits out the placement timeout) and an added
    one stays unlisted. Asking it to recompute (a `ray.nodes()` call) every `interval_s` bounds both delays.

    A run's earlier drivers that were stopped (a scheduler resizing or preempting the job) could not withdraw their
    controllers' resource requests, which the actor keeps for 180 s and counts against this run: the first call
    withdraws them (`stale`: their requester ids, recorded by the run log)."""

    def __init__(self, interval_s: float, stale: list[str] = ()):
        self.interval_s = interval_s
        self.last = float("-inf")
        self.stale = list(stale)

    def __call__(self, now: float) -> None:
        if now - self.last < self.interval_s:
            return
        self.last = now
        import ray

        try:
            from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                get_or_create_autoscaling_coordinator,
            )

            coordinator = get_or_create_autoscaling_coordinator()
            ray.get([coordinator.cancel_request.remote(r) for r in self.stale], timeout=10)
            self.stale = []
            ray.get(coordinator.get_reserved_resources.remote("cellray", recompute=True), timeout=10)
        except Exception as e:  # a Ray without this actor: resizes wait for its own refresh
            log.debug("could not refresh the elastic cluster view: %s", e)


def _fit_in_thread(
    trainer,
    run_log,
    history,
    earlier,
    output: Path,
    progress: Progress,
    total: int,
    on_report: OnReport | None,
    look: _ClusterView | None = None,
) -> dict[str, Any]:
    """trainer.fit() in a thread while this one polls the run log: progress, and metrics.jsonl rewritten as reports
    arrive (a driver killed mid-run loses at most the last half second of history)."""
    import time

    outcome: dict[str, Any] = {}
    if look is not None:
        look(time.monotonic())

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handled on the driver thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="cellray-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        if look is not None:
            look(time.monotonic())
        if _drain(run_log, history, progress, total, on_report):
            write_text_atomically(
                output / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in merge_by_step(earlier + history))
            )
    _drain(run_log, history, progress, total, on_report)
    return outcome


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _drain(
    run_log, history: list[dict[str, Any]], progress: Progress, total: int, on_report: OnReport | None = None
) -> int:
    """Append the run log's new reports to `history`, advancing the progress bar and logging each."""
    import ray

    new = ray.get(run_log.since.remote(len(history)))
    for m in new:
        history.append(m)
        progress("train", int(m["step"]), total)
        if on_report is not None:
            on_report(m)
        log.info(
            "step %d/%d  loss %.4f  %s%.0f cells/s  data-wait %.0f%%",
            m["step"],
            total,
            m["loss"],
            f"val {m['val_loss']:.4f}  " if "val_loss" in m else "",
            m.get("cells_per_s", 0.0),
            100 * m.get("data_wait_frac", 0.0),
        )
    return len(new)
