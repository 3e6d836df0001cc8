"""Debug hooks of a run (the spec's `debug:` section): a per-step trace of cells and a fault drill."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from engine.train.config import DebugConfig


class StepTrace:
    """Per-rank log of the cells each optimizer step consumed (with data.sources, `sources`: each one's position in
    data.sources, beside `cells`, its row in that store), with the worker group's attempt and world size, and
    the final parameters (tests of exactly-once delivery, resume and resize). Does nothing without
    `debug.trace_dir`."""

    def __init__(self, trace_dir: str | None, rank: int, world_size: int = 1, attempt: int = 0):
        self.dir = Path(trace_dir) if trace_dir else None
        self.rank = rank
        self.world_size = world_size
        self.attempt = attempt
        self.pending: list[np.ndarray] = []
        self.sources: list[np.ndarray] = []  # data.sources: each cell's source, beside its row
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)

    def cells(self, index: torch.Tensor, source: torch.Tensor | None = None) -> None:
        if self.dir:
            self.pending.append(index.detach().cpu().numpy())
            if source is not None:
                self.sources.append(source.detach().cpu().numpy())

    def step(self, step: int, epoch: int) -> None:
        if not self.dir:
            return
        cells = np.concatenate(self.pending).tolist() if self.pending else []
        sources = {"sources": np.concatenate(self.sources).tolist()} if self.sources else {}
        self.pending, self.sources = [], []
        with open(self.dir / f"rank{self.rank}.jsonl", "a") as f:
            entry = {"step": step, "epoch": epoch, "attempt": self.attempt, "world_size": self.world_size,
                     "time": time.time()}  # fmt: skip
            f.write(json.dumps({**entry, "pid": os.getpid(), "cells": cells, **sources}) + "\n")

    def final(self, model: torch.nn.Module) -> None:
        if self.dir:
            torch.save(
                {k: v.detach().cpu() for k, v in model.state_dict().items()}, self.dir / f"final-rank{self.rank}.pt"
            )


class FaultDrill:
    """`debug.fault: {rank, step}`: that rank exits hard once, at that step, as a lost worker would. A marker
    file in the output folder makes it fire once per run, not again after Ray Train restarts the group.
    `debug.min_step_seconds` paces the steps, so that a drill killing the run from outside lands mid-run."""

    def __init__(self, debug: DebugConfig, output: str, rank: int):
        fault = debug.fault
        self.step = fault.step if fault is not None and fault.rank == rank else None
        self.marker = Path(output) / f".fault-{rank}-{self.step}"
        self.min_step_seconds = debug.min_step_seconds
        self.last = time.monotonic()

    def after_step(self, step: int) -> None:
        """Pace the step (`min_step_seconds`), then exit if this is the fault's rank and step."""
        if self.min_step_seconds:  # a paced run: a drill can kill it mid-way on any machine
            time.sleep(max(0.0, self.last + self.min_step_seconds - time.monotonic()))
            self.last = time.monotonic()
        if self.step is not None and step == self.step and not self.marker.exists():
            self.marker.touch()
            os._exit(1)  # a worker lost mid-run: Ray Train restarts the group from the last checkpoint
