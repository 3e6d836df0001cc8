"""Training metrics: per-rank windows between reports, the driver's run log, metrics.jsonl and loss.png.

Rank 0 sends each report to a small `RunLog` actor that the driver polls (progress bar, log lines; it works on
a remote cluster too). At the end the driver merges the reports with an earlier attempt's metrics.jsonl, so a
resumed run keeps its whole history, and writes metrics.jsonl and loss.png atomically.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.atomic import atomic_path, write_text_atomically
from engine.errors import TrainError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"


def allreduce_sum(values: list[float], world: int) -> torch.Tensor:
    """Sum a few float64 numbers over ranks (one tiny allreduce); the values themselves on one rank."""
    import torch.distributed as dist

    stats = torch.tensor(values, dtype=torch.float64)
    if world > 1 and dist.is_initialized():
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        stats = stats.to(device)
        dist.all_reduce(stats)
        stats = stats.cpu()
    return stats


class MetricsWindow:
    """Metrics of the steps since the last report, on this rank."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        # tensors, possibly on the GPU: read at the report, so that no step waits for the device
        self.losses: list[torch.Tensor] = []
        self.steps: list[int] = []  # the optimizer step each loss belongs to
        self.terms: dict[str, list[torch.Tensor | float]] = {}
        self.cells = 0
        self.t_data = 0.0
        self.t_total = 0.0
        self.start = time.perf_counter()

    def add(
        self,
        loss: torch.Tensor,
        terms: dict[str, torch.Tensor | float],
        n_cells: int,
        t_data: float,
        t_step: float,
        step: int,
    ) -> None:
        self.losses.append(loss.detach())
        self.steps.append(step)
        for k, v in terms.items():
            self.terms.setdefault(k, []).append(v)
        self.cells += n_cells
        self.t_data += t_data
        self.t_total += t_step

    def summary(
        self, world: int, step: int, epoch: int, lr: float, rank: int = 0, queue_depth: int = 0
    ) -> dict[str, Any]:
        """The window's metrics averaged over ranks (loss) or summed (cells), and each rank's data wait and loader
        queue depth (its own slots of the same allreduce: a rank slower to get data than the others shows);
        starts a new window. A loss that is not finite on any rank stops every rank here, together (the sum of
        losses over ranks is not finite: no rank is left waiting in a collective), naming the step where this rank
        saw it. The check reads the losses back at reports, not each step (a read-back would make a GPU step wait),
        and every checkpoint is saved after a report, so none holds the diverged weights."""
        losses = [float(v) for v in self.losses]
        elapsed = time.perf_counter() - self.start
        per_rank = [0.0] * (2 * world)
        per_rank[rank] = self.t_data / max(self.t_total, 1e-9)
        per_rank[world + rank] = float(queue_depth)
        s = allreduce_sum([sum(losses), len(losses), self.cells, self.t_data, self.t_total, *per_rank], world)
        if not math.isfinite(float(s[0])):
            bad = next(((at, v) for at, v in zip(self.steps, losses) if not math.isfinite(v)), None)
            where = (
                f"the loss is {bad[1]:g} at step {bad[0]}"
                if bad
                else f"another rank's loss is not finite by step {step}"
            )
            raise TrainError(f"{where}: training diverged (lower train.lr, or check the data's counts and transforms)")
        m = {
            "step": step,
            "epoch": epoch,
            "lr": lr,
            "loss": float(s[0] / max(1.0, float(s[1]))),
            "cells": int(s[2]),
            "cells_per_s": float(s[2]) / max(elapsed, 1e-9),
            "data_wait_frac": float(s[3] / max(float(s[4]), 1e-9)),
            "rank_data_wait_frac": [float(v) for v in s[5 : 5 + world]],
            "rank_queue_depth": [int(v) for v in s[5 + world :]],
            "world_size": world,
        }
        m.update({k: float(np.mean([float(x) for x in v])) for k, v in self.terms.items()})
        self.reset()
        return m


class RunLog:
    """Rank 0's metric reports for the driver (a Ray actor: `ray.remote(RunLog)`)."""

    def __init__(self, attempts_file: str | None = None):
        self.items: list[dict[str, Any]] = []
        self.attempts_file = Path(attempts_file) if attempts_file else None
        self.record = read_attempts(self.attempts_file) if self.attempts_file else {"attempts": 0, "requesters": []}

    def start_attempt(self, requester: str | None = None) -> int:
        """Called by rank 0 of each new worker group: its number, counted over every driver of the run (a rerun of
        the spec, a scheduler's next attempt) in `attempts_file`, with the group's Ray Train resource requester."""
        self.record["attempts"] += 1
        if requester:
            self.record["requesters"] = [*self.record["requesters"], requester][-20:]
        if self.attempts_file is not None:
            write_text_atomically(self.attempts_file, json.dumps(self.record))
        return self.record["attempts"]

    def add(self, metrics: dict[str, Any]) -> None:
        self.items.append(metrics)

    def since(self, n: int) -> list[dict[str, Any]]:
        return self.items[n:]


def read_attempts(path: Path) -> dict[str, Any]:
    """A run's worker-group count and their Ray Train resource requesters (see `RunLog.start_attempt`)."""
    return json.loads(path.read_text()) if path.exists() else {"attempts": 0, "requesters": []}


def merge_by_step(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per step: after a restart the redone steps replace the first attempt's."""
    by = {int(m["step"]): m for m in history}
    return [by[s] for s in sorted(by)]


def read_metrics(output: Path) -> list[dict[str, Any]]:
    path = Path(output) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_metrics(output: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl and (when matplotlib is there) loss.png, each written under a temporary name first."""
    write_text_atomically(output / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in history))
    if history:
        plot_loss(output, history)


def plot_loss(output: Path, history: list[dict[str, Any]]) -> None:
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
    with atomic_path(output / LOSS_PNG) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
