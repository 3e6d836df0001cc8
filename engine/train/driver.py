"""Distributed pretraining on Ray Train: one TorchTrainer run per `PretrainConfig`.

The driver checks the data and the cluster before anything starts, assembles a TorchTrainer whose workers run
`engine.train.loop.train_loop_per_worker`, polls the run log for progress while `fit()` runs in a thread, and
finally writes metrics.jsonl and loss.png covering every step of the run (earlier attempts included).

A restarted worker group (FailureConfig(max_failures)) or a rerun of the same spec resumes from the latest
complete checkpoint under `train.output` (a local folder, or a pyarrow filesystem URI such as s3://... on a
cluster) and continues at the next unseen batch.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.errors import TrainError
from engine.progress import Progress, silent
from engine.runtime import ray_session
from engine.train.checkpoint import latest_checkpoint
from engine.train.config import PretrainConfig
from engine.train.data import open_run_data
from engine.train.loop import LoopContext, train_loop_per_worker
from engine.train.metrics import RunLog, merge_by_step, read_metrics, write_metrics

log = logging.getLogger(__name__)


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
    if r.workers == 0:
        return
    total = ray.cluster_resources()
    need_cpu = r.workers * (r.cpus_per_worker + r.readers_per_worker * r.cpus_per_reader)
    need_gpu = r.workers * r.gpus_per_worker
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if need_gpu > have_gpu:
        raise TrainError(
            f"{config.where('resources')}: {r.workers} workers x {r.gpus_per_worker} GPUs need {need_gpu:g} GPUs; "
            f"the cluster has {have_gpu:g}"
        )
    if need_cpu > have_cpu + 1e-9:
        raise TrainError(
            f"{config.where('resources')}: {r.workers} workers x ({r.cpus_per_worker:g} CPUs + {r.readers_per_worker} "
            f"readers x {r.cpus_per_reader:g} CPUs) need {need_cpu:g} CPUs; the cluster has {have_cpu:g} "
            "(lower resources.workers or cpus_per_worker, or start Ray with more CPUs)"
        )


def pretrain(config: PretrainConfig, address: str | None = None, progress: Progress | None = None,
             on_report: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Run a pretraining config on Ray Train; returns where its checkpoints and metrics are. `on_report` sees
    each report (step, loss, cells_per_s, data_wait_frac, ...) as it arrives (e.g. dashboard gauges)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    progress = progress or silent
    data = open_run_data(config)
    r = config.resources
    uri = "://" in config.train.output  # a pyarrow filesystem URI (s3://, gs://, ...): checkpoints go there
    if uri:
        storage_path, name = config.train.output.rstrip("/").rsplit("/", 1)
        output = Path("runs", name).resolve()  # this machine keeps metrics.jsonl and loss.png
        if r.workers == 0:
            raise TrainError(f"{config.where('train.output')}: resources.workers: 0 (in-process) needs a local output folder")
    else:
        output = Path(config.train.output).resolve()
        storage_path, name = str(output.parent), output.name
    output.mkdir(parents=True, exist_ok=True)
    if config.debug.trace_dir:
        config = config.model_copy(update={"debug": config.debug.model_copy(
            update={"trace_dir": str(Path(config.debug.trace_dir).resolve())})})
    with ray_session(address):
        check_resources(config)
        run_log = ray.remote(RunLog).options(num_cpus=0).remote()
        ctx = LoopContext(
            config=config,
            store=str(data.store.path.resolve()),
            model_config=data.model_config,
            output=str(output),
            output_is_local=not uri,
            local_mode=r.workers == 0,
            run_log=run_log,
        )
        per_worker = {"CPU": r.cpus_per_worker}
        if r.gpus_per_worker:
            per_worker["GPU"] = r.gpus_per_worker
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=ctx,
            scaling_config=ScalingConfig(
                num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=per_worker if r.workers else None
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage_path,
                failure_config=FailureConfig(max_failures=config.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
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
        history: list[dict[str, Any]] = []
        while thread.is_alive():
            thread.join(0.5)
            _drain(run_log, history, progress, config.train.max_steps, on_report)
        _drain(run_log, history, progress, config.train.max_steps, on_report)
        ray.kill(run_log)
    if "error" in outcome:
        e = outcome["error"]
        raise TrainError(f"{config.where('train')}: training failed: {e}") from e
    result = outcome["result"]
    history = merge_by_step(read_metrics(output) + history)  # a resumed run adds to the earlier steps
    write_metrics(output, history)
    if result.checkpoint is not None:
        ckpt = result.checkpoint.path if uri else Path(result.checkpoint.path)
    else:
        ckpt = None if uri else latest_checkpoint(output, required=False)
    return TrainResult(output=output, checkpoint=ckpt, history=history)


def _drain(run_log, history: list[dict[str, Any]], progress: Progress, total: int,
           on_report: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Append the run log's new reports to `history`, advancing the progress bar and logging each."""
    import ray

    for m in ray.get(run_log.since.remote(len(history))):
        history.append(m)
        progress("train", int(m["step"]), total)
        if on_report is not None:
            on_report(m)
        log.info(
            "step %d/%d  loss %.4f  %s%.0f cells/s  data-wait %.0f%%",
            m["step"], total, m["loss"],
            f"val {m['val_loss']:.4f}  " if "val_loss" in m else "",
            m.get("cells_per_s", 0.0), 100 * m.get("data_wait_frac", 0.0),
        )
