"""Distributed pretraining on real Ray Train (2 gloo DDP workers on CPU), real stores, real reader actors."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from engine.errors import TrainError
from engine.loading.loader import Loader
from engine.loading.sampler import SamplerConfig
from engine.store.format import Store
from engine.train.checkpoint import latest_checkpoint, load_checkpoint
from engine.train.config import DebugConfig
from engine.train.driver import pretrain
from jobs.spec import parse_spec

STEPS, EVERY, BATCH = 12, 4, 64


def make_spec(
    store: Path, output: Path, model: str = "vae", config: dict | None = None, workers: int = 2, **train
) -> object:
    configs = {
        "vae": {"n_latent": 4, "n_hidden": 16, "dropout": 0.0, "kl_warmup_steps": 4},
        "transformer": {"max_len": 32, "d_model": 32, "n_heads": 2, "n_layers": 1},
        "probe": {"label_key": "cell_type", "n_hidden": 16},
    }
    transforms = {
        "vae": [],
        "transformer": [
            {"normalize_total": {"target_sum": 1e4}},
            "log1p",
            {"binning": {"n_bins": 11}},
            {"mask": {"fraction": 0.3}},
        ],
        "probe": [],
    }
    return parse_spec(
        {
            "kind": "pretrain",
            "name": output.name,
            "data": {
                "store": str(store),
                "batch_size": BATCH,
                "transforms": transforms[model],
                "obs_keys": ["cell_type", "batch"],
            },
            "model": {"name": model, "config": {**configs[model], **(config or {})}},
            "train": {
                "max_steps": STEPS,
                "lr": 1e-2,
                "checkpoint_every": EVERY,
                "report_every": EVERY,
                "output": str(output),
                "max_failures": 2,
                **train,
            },
            "resources": {"workers": workers, "cpus_per_worker": 0.5, "readers_per_worker": 1, "cpus_per_reader": 0.5},
        }
    )


def traced(spec, trace_dir: Path, fault: dict | None = None):
    """The spec with its debug section set: a per-step cell trace, and optionally a fault drill."""
    return spec.model_copy(update={"debug": DebugConfig(trace_dir=str(trace_dir), fault=fault)})


def read_trace(trace: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (trace / f"rank{rank}.jsonl").read_text().splitlines()]


def planned_cells(store: Path, rank: int, steps: int, transforms=None) -> list[list[int]]:
    """What the plan gives `rank` for `steps` steps: the Loader itself, in-process."""
    out: list[list[int]] = []
    with Loader(
        store, SamplerConfig(batch_size=BATCH), rank=rank, world_size=2, mode="local", obs_keys=("cell_type", "batch")
    ) as loader:
        epoch = 0
        while len(out) < steps:
            loader.set_epoch(epoch)
            for batch in loader:
                out.append(batch["index"].tolist())
                if len(out) == steps:
                    break
            epoch += 1
    return out


@pytest.fixture(scope="module")
def vae_run(tiny_store, ray_local, tmp_path_factory):
    d = tmp_path_factory.mktemp("vae_run")
    result = pretrain(traced(make_spec(tiny_store, d / "run"), d / "trace"))
    return result, d / "trace"


def test_vae_two_workers_loss_params_and_plan(vae_run, tiny_store):
    result, trace = vae_run
    losses = [m["loss"] for m in result.history]
    assert [m["step"] for m in result.history] == list(range(EVERY, STEPS + 1, EVERY))
    assert losses[-1] < losses[0], losses
    # DDP keeps both ranks' parameters identical
    p0, p1 = (torch.load(trace / f"final-rank{r}.pt") for r in (0, 1))
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    # each rank saw exactly its planned cells, step by step, and the ranks never share a cell within an epoch
    for rank in (0, 1):
        seen = read_trace(trace, rank)
        assert [s["step"] for s in seen] == list(range(1, STEPS + 1))
        assert [s["cells"] for s in seen] == planned_cells(tiny_store, rank, STEPS)
    e0 = [c for s in read_trace(trace, 0) if s["epoch"] == 0 for c in s["cells"]]
    e1 = [c for s in read_trace(trace, 1) if s["epoch"] == 0 for c in s["cells"]]
    assert not set(e0) & set(e1) and len(set(e0)) == len(e0)
    # checkpoint directory: merged files of both ranks, and the run's own outputs
    ckpt = latest_checkpoint(result.output)
    assert ckpt == result.checkpoint
    assert {"meta.json", "model.pt", "state.pt", "rank0.pt", "rank1.pt"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "meta.json").read_text())["step"] == STEPS
    assert (result.output / "metrics.jsonl").exists() and (result.output / "loss.png").stat().st_size > 1000
    model, meta = load_checkpoint(result.output)
    assert all(torch.equal(model.state_dict()[k], p0[k]) for k in p0)


def test_killed_worker_resumes_from_checkpoint_exactly(vae_run, tiny_store, tmp_path):
    """Rank 1 dies at step 7: the group restarts from step 4, redoes steps 5-7 only, and ends where an
    uninterrupted run ends (bit-identical on CPU: same batches, same RNG streams, same allreduce order)."""
    clean, clean_trace = vae_run
    fail_step = 7
    result = pretrain(
        traced(make_spec(tiny_store, tmp_path / "run"), tmp_path / "trace", fault={"rank": 1, "step": fail_step})
    )
    resumed_from = (fail_step // EVERY) * EVERY  # the last checkpoint before the failure
    for rank in (0, 1):
        seen = read_trace(tmp_path / "trace", rank)
        pids = list(dict.fromkeys(s["pid"] for s in seen))
        assert len(pids) == 2, "one restart of the worker group"
        first = [s for s in seen if s["pid"] == pids[0]]
        second = [s for s in seen if s["pid"] == pids[1]]
        assert [s["step"] for s in second] == list(range(resumed_from + 1, STEPS + 1))
        redone = [s for s in first if s["step"] > resumed_from]
        # rank 1 died right after step 7; rank 0 may have finished step 7 or 8 before the group stopped
        assert len(redone) >= (fail_step - resumed_from if rank == 1 else 0)
        by_step = {s["step"]: s["cells"] for s in second}
        assert all(s["cells"] == by_step[s["step"]] for s in redone), "a redone step replays the same cells"
        final = {s["step"]: s["cells"] for s in first + second}  # later attempts overwrite
        assert [final[s] for s in range(1, STEPS + 1)] == planned_cells(tiny_store, rank, STEPS)
    # resume determinism: the same parameters as the uninterrupted run
    a = torch.load(clean_trace / "final-rank0.pt")
    b = torch.load(tmp_path / "trace" / "final-rank0.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert [m["step"] for m in result.history] == [4, 8, 12]


def test_transformer_two_workers(tiny_store, ray_local, tmp_path):
    result = pretrain(traced(make_spec(tiny_store, tmp_path / "run", model="transformer", lr=3e-3), tmp_path / "trace"))
    losses = [m["loss"] for m in result.history]
    assert losses[-1] < losses[0], losses
    p0, p1 = (torch.load(tmp_path / "trace" / f"final-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    for rank in (0, 1):
        assert [len(s["cells"]) for s in read_trace(tmp_path / "trace", rank)] == [BATCH] * STEPS
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["model"]["config"]["n_bins"] == 11 and meta["model"]["config"]["input"] == "binned"


def test_transformer_gene_embeddings_start_from_the_training_cells(tiny_store, ray_local, tmp_path):
    """gene_init "pca" (the default): before the first step the loop reads `init_cells` training cells through the
    spec's transforms and the transformer's gene embeddings start as the principal axes of their expression
    (orthonormal columns); "random" keeps GPT-2's small random start. One step at a negligible learning rate keeps
    the start in the checkpoint."""

    def start(gene_init: str) -> torch.Tensor:
        config = {"gene_init": gene_init, "init_cells": 512}
        spec = make_spec(tiny_store, tmp_path / gene_init, "transformer", config, workers=0, max_steps=1, lr=1e-9)
        model, _ = load_checkpoint(pretrain(spec).output)
        w = model.gene_embedding.weight[: model.config.n_genes].detach()
        return w.T @ w

    eye = torch.eye(32)
    assert torch.allclose(start("pca"), eye, atol=0.05)
    assert not torch.allclose(start("random"), eye, atol=0.5)


def test_transformer_batch_offsets_train_from_the_stores_batch_column(tiny_store, ray_local, tmp_path):
    """model.config.batch_key: the loop hands the model the column's codes, its categories come from the store's obs
    schema (plus one slot for cells without one: an input of the tiny store has no batch column), and each batch's
    mvc offsets train apart from their start at zero."""
    spec = make_spec(tiny_store, tmp_path / "run", "transformer", {"batch_key": "batch"}, workers=0, max_steps=4)
    model, _ = load_checkpoint(pretrain(spec).output)
    categories = Store.open(tiny_store).manifest.obs_schema["batch"]["categories"]
    assert model.config.n_batch == len(categories) + 1
    offsets = model.mvc_batch.weight.detach()
    assert offsets.abs().amax(1).min() > 0
    assert not torch.allclose(offsets[0], offsets[1]) and not torch.allclose(offsets[0], offsets[-1])


def test_a_resumed_run_skips_the_start_from_the_data(tiny_store, ray_local, tmp_path, caplog):
    """The start's cells are read once per run: a rerun that resumes from a checkpoint (as a restart or a resize
    does) loads it without reading them again. The loop says, at INFO, what the start read."""
    config = {"init_cells": 256}
    with caplog.at_level(logging.INFO, logger="engine.train.loop"):
        pretrain(make_spec(tiny_store, tmp_path / "run", "transformer", config, workers=0, max_steps=2))
        assert re.search(r"model initialised from 256 training cells in [\d.]+ s", caplog.text), caplog.text
        caplog.clear()
        pretrain(make_spec(tiny_store, tmp_path / "run", "transformer", config, workers=0, max_steps=4))
    assert "resumed at step 2" in caplog.text and "model initialised" not in caplog.text, caplog.text


def test_local_mode_probe_with_accumulation_validation_and_rerun(tiny_store, ray_local, tmp_path):
    """workers: 0 runs the loop in-process; grad accumulation, validation; a rerun resumes, not restarts."""
    spec = make_spec(tiny_store, tmp_path / "run", model="probe", workers=0, grad_accum=2, val_every=6, lr=3e-2)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"val_fraction": 0.2})})
    result = pretrain(traced(spec, tmp_path / "trace"))
    h = result.history
    assert h[-1]["step"] == STEPS and h[-1]["accuracy"] > h[0]["accuracy"] - 0.05
    assert [m["step"] for m in h if "val_loss" in m] == [6, 12]
    seen = read_trace(tmp_path / "trace", 0)
    assert all(len(s["cells"]) == 2 * BATCH for s in seen), "two micro-batches per optimizer step"
    val = SamplerConfig(batch_size=BATCH, split="val", val_fraction=0.2, remainder="pad", shuffle=False)
    with Loader(tiny_store, val, mode="local") as val_loader:
        val_cells = {c for b in val_loader for c in b["index"].tolist()}
    assert val_cells and not val_cells & {c for s in seen for c in s["cells"]}, "training never reads the val split"
    assert latest_checkpoint(result.output).name == f"checkpoint_step{STEPS:09d}"
    # a second run of the same spec with more steps continues from step 12
    more = spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 16})})
    result2 = pretrain(traced(more, tmp_path / "trace2"))
    assert [s["step"] for s in read_trace(tmp_path / "trace2", 0)] == [13, 14, 15, 16]
    assert result2.history[-1]["step"] == 16


def test_more_workers_than_the_cluster_holds_fails_before_starting(tiny_store, ray_local, tmp_path):
    spec = make_spec(tiny_store, tmp_path / "run")
    spec = spec.model_copy(
        update={
            "resources": spec.resources.model_copy(update={"workers": 64}),
            "data": spec.data.model_copy(update={"batch_size": 8}),  # every rank still gets a batch: resources decide
        }
    )
    with pytest.raises(TrainError, match=r"resources: 64 workers .* need 64 CPUs; the cluster has 4"):
        pretrain(spec)
    gpu = spec.model_copy(update={"resources": spec.resources.model_copy(update={"workers": 2, "gpus_per_worker": 1})})
    with pytest.raises(TrainError, match="need 2 GPUs; the cluster has 0"):
        pretrain(gpu)
