"""Checkpoints from real (tiny, in-process) pretraining runs on the tiny store, shared by the inference tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.train.driver import pretrain
from jobs.spec import parse_spec

REPO = Path(__file__).resolve().parents[3]


def _pretrain(store: Path, out: Path, model: dict, obs_keys: list[str], transforms: list | None = None) -> Path:
    spec = parse_spec(
        {
            "kind": "pretrain",
            "name": out.name,
            "data": {"store": str(store), "batch_size": 128, "obs_keys": obs_keys, "transforms": transforms or []},
            "model": model,
            "train": {"max_steps": 4, "checkpoint_every": 2, "lr": 1e-2, "output": str(out)},
            "resources": {"workers": 0},
        }
    )
    return pretrain(spec).output


@pytest.fixture(scope="session")
def vae_checkpoint(tiny_store, ray_local, tmp_path_factory) -> Path:
    """A VAE with a batch covariate, trained in-process (resources.workers: 0) for a few steps."""
    return _pretrain(
        tiny_store,
        tmp_path_factory.mktemp("ckpt") / "vae",
        {"name": "vae", "config": {"n_latent": 3, "n_hidden": 16, "batch_key": "batch"}},
        ["batch"],
    )


@pytest.fixture(scope="session")
def probe_checkpoint(tiny_store, ray_local, tmp_path_factory) -> Path:
    """A classifier of cell_type (the probe) on log-normalized expression."""
    return _pretrain(
        tiny_store,
        tmp_path_factory.mktemp("ckpt") / "probe",
        {"name": "probe", "config": {"label_key": "cell_type", "n_hidden": 8, "log1p": False}},
        ["cell_type"],
        [{"normalize_total": {"target_sum": 1e4}}, "log1p"],
    )


@pytest.fixture(scope="session")
def reference_output(vae_checkpoint, tiny_store, ray_local, tmp_path_factory) -> Path:
    """An uninterrupted run (150-cell parts: they straddle the 400-cell shards): its output directory. In-process
    (executor auto on a tiny store): the tests that compare with it run their parts on Ray actors."""
    from engine.infer.embed import embed

    out = tmp_path_factory.mktemp("reference") / "emb.zarr"
    embed(vae_checkpoint, tiny_store, out, part_cells=150)
    return out


@pytest.fixture(scope="session")
def reference_embedding(reference_output):
    """The uninterrupted run, read with plain anndata."""
    import anndata as ad

    return ad.read_zarr(reference_output)


def store_obs(store) -> pd.DataFrame:
    return pd.concat([store.read_obs(s) for s in range(store.n_shards)])


def driver_subprocess(script: str, env: dict | None = None) -> subprocess.Popen:
    """A Python driver in its own process, connected to this session's Ray (it never starts or stops one)."""
    import ray

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAY_AUTH_MODE": "token",
        **(env or {}),
    }
    prologue = "import ray, logging; ray.init(address='auto', logging_level=logging.WARNING)\n"
    return subprocess.Popen(
        [sys.executable, "-c", prologue + script],
        env=env,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def direct_vae_embedding(checkpoint: Path, store) -> np.ndarray:
    """The VAE applied to every cell of `store` directly (dense counts and batch codes), in store order."""
    import torch

    from engine.train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    out = []
    for shard in range(store.n_shards):
        x = torch.from_numpy(store.read_csr(shard).to_scipy().toarray().astype(np.float32))
        codes = torch.from_numpy(store.read_obs(shard, ["batch"])["batch"].cat.codes.to_numpy().astype(np.int64))
        with torch.no_grad():
            out.append(model.embed({"X": x, "batch": codes}).numpy())
    return np.concatenate(out)


@pytest.fixture(scope="session")
def helpers():
    """The helpers above, for test modules (tests are not a package: they cannot import this file)."""
    import types

    return types.SimpleNamespace(
        store_obs=store_obs,
        driver_subprocess=driver_subprocess,
        direct_vae_embedding=direct_vae_embedding,
        pretrain=_pretrain,
    )
