"""The CUDA paths: batches delivered on the device through pinned memory, and bf16 steps of the GPU preset. They
run where a GPU exists; the suite's CPU machines skip them, saying so (tests/models/test_models.py takes the GPU
preset's step in fp32 on CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
def test_loader_delivers_every_tensor_on_the_gpu(tiny_store):
    """Each batch on the device equals the host batch: X and obs codes, through pinned memory."""
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig

    def batches(device):
        with Loader(
            tiny_store,
            SamplerConfig(batch_size=64),
            transforms=[{"normalize_total": {"target_sum": 1e4}}, "log1p", "densify"],
            obs_keys=("cell_type",),
            mode="local",
            device=device,
        ) as loader:
            return list(loader)

    on_device, on_host = batches("cuda"), batches(None)
    assert len(on_device) == len(on_host) > 0
    for got, want in zip(on_device, on_host):
        assert got["X"].device.type == "cuda" and got["cell_type"].device.type == "cuda"
        assert torch.equal(got["X"].cpu(), want["X"]) and torch.equal(got["cell_type"].cpu(), want["cell_type"])


@CUDA
def test_gpu_preset_takes_bf16_steps_on_the_gpu():
    from engine.store.synthetic import synthetic_counts
    from models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    counts = synthetic_counts(64, 64, nnz_per_cell=20, n_cell_types=4, seed=0)
    batch = {"X": torch.from_numpy(np.log1p(counts.X.toarray())).cuda(), "index": torch.arange(64).cuda()}
    model = Transformer(TransformerConfig.gpu(input="rank", n_genes=64)).cuda()
    model.init_from_data(batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    losses = []
    for step in range(5):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.loss(batch, step=step)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    model.eval()
    embedding = model.embed(batch)
    assert embedding.is_cuda and embedding.dtype == torch.float32 and torch.isfinite(embedding).all()
