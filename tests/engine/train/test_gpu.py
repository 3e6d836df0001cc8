"""The CUDA paths: batches delivered on the device through pinned memory, copied on a stream of their own while
the step before runs, a pretraining run fed that way, and bf16 steps of the GPU preset. They
run where a GPU exists; the suite's CPU machines skip them, saying so (tests/models/test_models.py takes the GPU
preset's step in fp32 on CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
@pytest.mark.parametrize("output", ["dense", "csr"])
def test_loader_delivers_every_tensor_on_the_gpu(tiny_store, output):
    """Each batch on the device equals the host batch: X (dense, or sparse CSR's three parts) and obs codes."""
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig

    transforms = [{"normalize_total": {"target_sum": 1e4}}, "log1p"] + (["densify"] if output == "dense" else [])

    def batches(device):
        with Loader(
            tiny_store,
            SamplerConfig(batch_size=64),
            transforms=transforms,
            output=output,
            obs_keys=("cell_type",),
            mode="local",
            device=device,
        ) as loader:
            return list(loader)

    on_device, on_host = batches("cuda"), batches(None)
    assert len(on_device) == len(on_host) > 0
    for got, want in zip(on_device, on_host):
        assert got["X"].device.type == "cuda" and got["cell_type"].device.type == "cuda"
        x = got["X"].to_dense() if output == "csr" else got["X"]
        want_x = want["X"].to_dense() if output == "csr" else want["X"]
        assert torch.equal(x.cpu(), want_x) and torch.equal(got["cell_type"].cpu(), want["cell_type"])


@CUDA
def test_loader_copies_the_next_batch_while_the_step_before_runs(tiny_store):
    """The copy runs on the loader's own stream: it is done while the model's stream is still busy with the step
    before (a kernel of about a second), and what the model's stream reads after it is the host batch."""
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig

    def loader(device):  # dense batches: the same sizes each time, so pinned host memory is reused, not allocated
        return Loader(tiny_store, SamplerConfig(batch_size=64), mode="local", device=device)

    with loader(None) as host:
        want = list(host)[3]
    with loader("cuda") as on_device:
        batches = iter(on_device)
        for _ in range(3):
            next(batches)
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # the step before (about a second), on the model's stream
        got = next(batches)
        on_device._copy_stream.synchronize()
        assert not torch.cuda.current_stream().query(), "the copy waited for the step before it"
        doubled = got["X"] * 2  # queued on the model's stream: after the copy, by its wait on the GPU
        assert torch.equal(doubled.cpu(), want["X"] * 2) and torch.equal(got["index"].cpu(), want["index"])


@CUDA
def test_pretrain_and_embed_on_the_gpu(tiny_store, ray_local, tmp_path):
    """workers: 0 on a GPU: the loop's Loader hands over batches on the device; the run trains and validates; its
    checkpoint embeds on the GPU as on the CPU."""
    from engine.train.checkpoint import load_checkpoint
    from engine.train.driver import pretrain
    from tests.engine.train.test_train import make_spec

    spec = make_spec(tiny_store, tmp_path / "run", "vae", workers=0, val_every=4, lr=3e-3)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"val_fraction": 0.2})})
    result = pretrain(spec)
    losses = [m["loss"] for m in result.history if "loss" in m]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert math.isfinite(result.history[-1]["val_loss"]) and 0.0 <= result.history[-1]["data_wait_frac"] < 1.0
    model, _ = load_checkpoint(result.output)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # the checkpoint embedded by an inference actor on the GPU (batches copied while the previous one computes,
    # outputs read back once a part) gives the embedding a CPU actor gives
    import anndata

    from engine.infer.embed import embed

    def embedding(gpus: float):
        out = tmp_path / f"emb-{gpus}.h5ad"
        embed(result.output, tiny_store, out, batch_size=64, resources={"workers": 1, "gpus_per_worker": gpus})
        return anndata.read_h5ad(out).obsm["X_cellray"]

    on_gpu, on_cpu = embedding(1.0), embedding(0.0)
    assert on_gpu.shape == on_cpu.shape and np.allclose(on_gpu, on_cpu, rtol=1e-3, atol=1e-4)


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
