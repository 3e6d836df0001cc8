"""Models in isolation: likelihood math against torch.distributions, training signal, embeddings, registry."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import models
from engine.store.synthetic import synthetic_counts
from models.vae import log_nb, log_zinb


def synthetic_batch(n_cells=256, n_genes=64, seed=0) -> dict:
    a = synthetic_counts(n_cells, n_genes, nnz_per_cell=20, n_cell_types=4, seed=seed)
    return {
        "X": torch.from_numpy(a.X.toarray()),
        "index": torch.arange(n_cells),
        "cell_type": torch.from_numpy(a.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)),
        "batch": torch.from_numpy(a.obs["batch"].cat.codes.to_numpy().astype(np.int64)),
    }


def test_nb_matches_torch_distribution():
    torch.manual_seed(0)
    mu = torch.rand(50, 7) * 20 + 0.1
    theta = torch.rand(7) * 5 + 0.2
    x = torch.poisson(mu)
    ref = torch.distributions.NegativeBinomial(total_count=theta, logits=torch.log(mu / theta)).log_prob(x)
    assert torch.allclose(log_nb(x, mu, theta), ref, atol=1e-4)


def test_zinb_is_the_zero_inflated_mixture():
    torch.manual_seed(1)
    mu = torch.rand(40, 5) * 10 + 0.1
    theta = torch.rand(5) * 3 + 0.2
    pi_logits = torch.randn(40, 5)
    x = torch.poisson(mu) * (torch.rand(40, 5) > 0.3)
    nb = torch.distributions.NegativeBinomial(total_count=theta, logits=torch.log(mu / theta)).log_prob(x)
    pi = torch.sigmoid(pi_logits)
    ref = torch.where(x == 0, torch.log(pi + (1 - pi) * nb.exp()), torch.log(1 - pi) + nb)
    assert torch.allclose(log_zinb(x, mu, theta, pi_logits), ref, atol=1e-4)


def debug_model(name: str, **kw):
    if name == "vae":
        return models.build(name, models.get(name).Config.debug(**kw))
    if name == "transformer":
        return models.build(name, models.get(name).Config.debug(**kw))
    return models.build(name, models.get(name).Config.debug(label_key="cell_type", **kw))


@pytest.mark.parametrize(
    "name,kw",
    [
        ("vae", {}),
        ("vae", {"likelihood": "zinb", "batch_key": "batch", "n_batch": 3}),
        ("vae", {"batch_key": "batch", "n_batch": 3, "batch_representation": "embedding", "norm": "batch"}),
        ("vae", {"batch_key": "batch", "n_batch": 3, "encode_batch": True}),
        ("transformer", {}),
        ("transformer", {"input": "rank", "pooling": "mean"}),
        ("transformer", {"input": "rank", "gene_values": True}),
        ("transformer", {"input": "rank", "batch_key": "batch", "n_batch": 3}),
        ("probe", {}),
    ],
)
def test_model_trains_and_embeds(name, kw):
    torch.manual_seed(0)
    batch = synthetic_batch()
    model = debug_model(name, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model.loss(batch, step=0)
    first.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient (DDP would hang on them): {missing}"
    assert first.n_cells == 256 and math.isfinite(first.loss.item())
    losses = []
    for step in range(40):
        opt.zero_grad()
        out = model.loss(batch, step=step)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    # a fixed batch: the objective must go down (VAE includes the KL warm-up, so compare NLL-dominated ends)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    model.eval()
    emb = model.embed(batch)
    assert emb.shape[0] == 256 and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert torch.equal(emb, model.embed(batch)), "embed must be deterministic in eval mode"


def test_vae_batch_conditions_the_decoder_and_the_encoder_only_when_asked():
    """batch_key: the decoder sees the batch, the encoder (so the embedding) only with encode_batch (scVI's
    encode_covariates), which checkpoints written before the field existed had."""
    torch.manual_seed(0)
    batch = synthetic_batch()
    other = dict(batch, batch=(batch["batch"] + 1) % 3)  # every cell moved to another batch
    decoded = debug_model("vae", batch_key="batch", n_batch=3)
    both = debug_model("vae", batch_key="batch", n_batch=3, encode_batch=True)
    for m in (decoded, both):
        m.eval()
    assert torch.equal(decoded.embed(batch), decoded.embed(other))
    assert not torch.allclose(both.embed(batch), both.embed(other))
    losses = []
    for b in (batch, batch, other):
        torch.manual_seed(1)  # the same draw of z each time
        losses.append(float(decoded.loss(b).loss))
    assert losses[0] == losses[1] != losses[2]  # the decoder reads the batch
    assert models.make_config("vae", {"batch_key": "batch"}, saved=True).encode_batch
    assert not models.make_config("vae", {"batch_key": "batch"}).encode_batch


def test_transformer_batch_offsets_the_mvc_reconstruction_not_the_embedding():
    """batch_key: each batch's own per-gene offset in the mvc prediction (scGPT's batch-conditioned MVC decoder);
    the cell embedding never reads the batch."""
    torch.manual_seed(0)
    batch = synthetic_batch()
    other = dict(batch, batch=(batch["batch"] + 1) % 3)
    model = debug_model("transformer", input="rank", batch_key="batch", n_batch=3)
    assert models.make_config("transformer", {"batch_key": "batch"}).obs_keys() == ("batch",)
    with torch.no_grad():
        model.mvc_batch.weight.normal_()  # trained offsets (they start at zero: every batch at the running mean)
    model.eval()
    assert torch.equal(model.embed(batch), model.embed(other))
    losses = []
    for b in (batch, batch, other):
        torch.manual_seed(1)  # the same mask each time
        losses.append(float(model.loss(b).terms["mvc"]))
    assert losses[0] == losses[1] != losses[2]
    plain = debug_model("transformer", input="rank")
    assert not hasattr(plain, "mvc_batch") and plain.config.obs_keys() == ()


def test_vae_embed_is_latent_mean_and_kl_warms_up():
    model = debug_model("vae", n_latent=5, kl_warmup_steps=10)
    assert model.embed(synthetic_batch(32)).shape == (32, 5)
    assert [model.kl_weight(s) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    assert model.loss(synthetic_batch(32), step=0).terms["kl_weight"] == 0.0
    beta = debug_model("vae", kl_warmup_steps=10, max_kl_weight=0.5)  # scVI's max_kl_weight
    assert [beta.kl_weight(s) for s in (0, 5, 10, 50, None)] == [0.0, 0.25, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="max_kl_weight"):
        models.make_config("vae", {"max_kl_weight": -1.0})


def test_vae_encoder_on_normalized_counts_ignores_depth():
    """encode_normalized: the encoder sees log1p(x / library * 1e4), so a cell sequenced twice as deep embeds the
    same; scVI's log1p(x) (the default) does not."""
    batch = synthetic_batch(32)
    deeper = {**batch, "X": batch["X"] * 2}
    for normalized in (True, False):
        torch.manual_seed(0)
        model = debug_model("vae", encode_normalized=normalized)
        model.eval()
        same = torch.allclose(model.embed(batch), model.embed(deeper), atol=1e-5)
        assert same == normalized


def test_transformer_takes_kernel_tokens():
    """genes/values/mask from the loader's kernels: padding (genes < 0) never attends and is never a target."""
    torch.manual_seed(0)
    model = debug_model("transformer")
    genes = torch.randint(0, 64, (8, 20))
    genes[:, 15:] = -1
    values = torch.randint(1, 11, (8, 20))
    values[:, 12] = 0  # a zero bin: not a token
    mask = torch.zeros(8, 20, dtype=torch.bool)
    mask[:, ::3] = True
    x = torch.zeros(8, 64).scatter_(1, genes.clamp(min=0), torch.log1p(values.float()))  # what the bins came from
    batch = {"genes": genes, "values": values, "mask": mask, "index": torch.arange(8), "X": x}
    out = model.loss(batch)
    assert out.terms["masked"] == float((mask & (genes >= 0) & (values > 0)).sum())
    model.eval()
    e1 = model.embed(batch)
    changed = dict(batch, values=torch.where(genes < 0, 7, values))  # change only padded positions
    assert torch.allclose(e1, model.embed(changed), atol=1e-6)
    changed = dict(batch, genes=torch.where(values == 0, 63, genes))  # or the genes of zero bins
    assert torch.allclose(e1, model.embed(changed), atol=1e-6)


def test_transformer_bins_a_dense_x_as_the_binning_transform_does():
    """The model's own tokenisation of a dense X gives the kernel's bins exactly, ties included (cells of a few
    counts have many equal values: they share a bin)."""
    from engine.preprocess.kernels import bin_values
    from models.transformer import Transformer, TransformerConfig

    counts = synthetic_counts(200, 300, nnz_per_cell=25, seed=3).X.toarray()
    counts[:50] = np.minimum(counts[:50], 2)  # shallow cells: ones and twos only
    counts[50] = 0  # and an empty one
    x = np.log1p(1e4 * counts / np.maximum(counts.sum(1, keepdims=True), 1)).astype(np.float32)
    for n_bins in (11, 51):
        want = bin_values(x, n_bins, np.empty(x.shape, dtype=np.int64))
        got = Transformer(TransformerConfig.debug(n_genes=300, n_bins=n_bins))._bin(torch.from_numpy(x))
        assert np.array_equal(got.numpy(), want)
    assert len(np.unique(want[0][x[0] == x[0][x[0] > 0].min()])) == 1  # ties share a bin


def test_transformer_mvc_target_is_the_expression_not_the_token_values():
    """mvc_target 'expression': every vocabulary gene's log-normalized expression (binned: the batch's X as the
    recipe logged it; rank: X is normalized counts, logged here), placed after the tokens' offset; 'token': the
    tokens' own values (bin / (n_bins - 1); log1p(x / median)). Without X the model says what it needs."""
    from models.transformer import Transformer, TransformerConfig

    x = torch.tensor([[0.0, 2.5, 0.7, 0.0], [1.2, 0.0, 0.0, 4.0]])
    bins = torch.tensor([[0, 10, 5, 0], [4, 0, 0, 10]])
    batch = {"genes": torch.arange(4).expand(2, -1), "values": bins, "X": x}
    assert torch.equal(Transformer(TransformerConfig.debug(n_genes=4))._target(batch), x)
    shifted = Transformer(TransformerConfig.debug(n_genes=6))._target(dict(batch, genes=batch["genes"] + 2))
    assert torch.equal(shifted[:, 2:], x) and not shifted[:, :2].any()  # token id = column + offset
    by_token = Transformer(TransformerConfig.debug(n_genes=4, mvc_target="token"))
    assert torch.allclose(by_token._target(batch), bins.float() / 10)
    counts = torch.tensor([[0.0, 30.0, 5.0, 0.0]])  # rank input: normalized counts, two tokens in rank order
    ranked = {"genes": torch.tensor([[1, 2]]), "values": torch.tensor([[3.0, 0.5]]), "lengths": torch.tensor([2])}
    rank = Transformer(TransformerConfig.debug(n_genes=4, input="rank"))
    assert torch.allclose(rank._target(dict(ranked, X=counts)), torch.log1p(counts))
    rank_token = Transformer(TransformerConfig.debug(n_genes=4, input="rank", mvc_target="token"))
    assert torch.allclose(rank_token._target(ranked), torch.tensor([[0.0, 3.0, 0.5, 0.0]]).log1p())
    with pytest.raises(KeyError, match="mvc_target='expression' needs the batch's 'X'"):
        Transformer(TransformerConfig.debug(n_genes=4)).loss({k: v for k, v in batch.items() if k != "X"})
    with pytest.raises(ValueError, match="X has 4 genes, the vocabulary 3"):
        Transformer(TransformerConfig.debug(n_genes=3))._target(batch)
    with pytest.raises(ValueError, match="mvc_target is 'bin'"):
        TransformerConfig.debug(mvc_target="bin")


def test_transformer_mvc_predicts_from_the_running_mean_of_its_target():
    """Training steps track each gene's mean mvc target (the mean of every batch so far, then an EMA), evaluation
    leaves it, the mvc prediction starts from it, and a checkpoint saved before the buffer existed loads with a zero
    mean (what such a model predicted with)."""
    from models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    model = Transformer(TransformerConfig.debug(n_genes=64))
    batches = [synthetic_batch(n_cells=64, seed=s) for s in range(3)]
    for b in batches:
        model.loss(b)
    targets = torch.cat([model._target(b) for b in batches])
    assert torch.allclose(model.mvc_mean, targets.mean(0), atol=1e-5) and int(model.mvc_batches) == 3
    cell = torch.zeros(2, model.config.d_model)
    assert torch.allclose(model._mvc(cell, {}), (model.mvc_mean + model.mvc_bias).expand(2, -1))
    model.eval()
    model.loss(synthetic_batch(n_cells=64, seed=9))
    assert int(model.mvc_batches) == 3  # held-out losses do not move it
    old = {k: v for k, v in model.state_dict().items() if k not in ("mvc_mean", "mvc_batches")}
    again = Transformer(TransformerConfig.debug(n_genes=64))
    again.load_state_dict(old)
    assert not again.mvc_mean.any() and torch.equal(again.mvc_bias, model.mvc_bias)


def test_transformer_embeds_with_its_inference_context():
    """embed_max_len: training and validation see max_len expressed genes of a cell, `embed` up to embed_max_len of
    them (every one here), the same embedding whatever the batch; rank tokens have max_len positions, so only binned
    input."""
    from models.transformer import Transformer, TransformerConfig

    genes = torch.arange(64).expand(4, -1)
    values = torch.randint(1, 11, (4, 64))  # 64 expressed genes a cell
    batch = {"genes": genes, "values": values, "index": torch.arange(4)}
    torch.manual_seed(0)
    small = Transformer(TransformerConfig.debug(max_len=16))
    torch.manual_seed(0)
    wide = Transformer(TransformerConfig.debug(max_len=16, embed_max_len=64))
    assert small.tokens(batch)[0].shape[1] == wide.tokens(batch)[0].shape[1] == 16  # training
    for m in (small, wide):
        m.eval()
    assert small.tokens(batch)[0].shape[1] == wide.tokens(batch)[0].shape[1] == 16  # validation: max_len
    assert wide.tokens(batch, wide.config.embed_max_len)[0].shape[1] == 64  # what embed asks for
    e = wide.embed(batch)
    assert torch.allclose(e[1:3], wide.embed({k: v[1:3] for k, v in batch.items()}), atol=1e-5)
    assert not torch.allclose(e, small.embed(batch), atol=1e-3)  # the same weights, more of each cell seen
    with pytest.raises(ValueError, match="embed_max_len is -1"):
        TransformerConfig.debug(embed_max_len=-1)
    with pytest.raises(ValueError, match="needs input='binned'"):
        TransformerConfig.debug(input="rank", max_len=16, embed_max_len=64)


def test_transformer_zero_genes_fill_the_context_after_every_expressed_gene():
    """zero_genes: a cell's expressed genes all stay in the context, unexpressed ones (bin 0) fill it to max_len,
    chosen by hash at inference (the same whatever the batch); they are tokens, so they change the embedding."""
    from models.transformer import Transformer, TransformerConfig

    genes = torch.arange(64).expand(4, -1)
    values = torch.zeros(4, 64, dtype=torch.long)
    values[:, [3, 10, 40]] = torch.tensor([5, 9, 2])  # 3 expressed genes a cell
    values[1, 50] = 7  # a 4th in cell 1
    batch = {"genes": genes, "values": values, "index": torch.arange(4), "X": values / 4.0}
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.debug(max_len=16, zero_genes=True))
    for training in (True, False):
        model.train(training)
        g, v, _ = model.tokens(batch)
        assert g.shape[1] == 16 and bool((g >= 0).all())  # every cell's context is full
        for i in range(4):
            kept = set(g[i][v[i] > 0].tolist())
            assert kept == set(torch.nonzero(values[i]).flatten().tolist())  # every expressed gene, once
            assert len(set(g[i].tolist())) == 16
    model.eval()
    e = model.embed(batch)
    assert torch.allclose(e[1:3], model.embed({k: x[1:3] for k, x in batch.items()}), atol=1e-5)
    plain = Transformer(TransformerConfig.debug(max_len=16))
    plain.load_state_dict(model.state_dict())
    plain.eval()
    assert plain.tokens(batch)[0].shape[1] == 4  # without: the longest cell's expressed genes only
    assert not torch.allclose(e, plain.embed(batch), atol=1e-3)
    assert model.loss(dict(batch)).terms["masked"] > 0
    with pytest.raises(ValueError, match="zero_genes needs input='binned'"):
        TransformerConfig.debug(input="rank", zero_genes=True)


def test_transformer_highest_context_keeps_a_cells_highest_bins():
    """context='highest' (the default): a cell with more expressed genes than max_len keeps its highest bins (ties
    broken at random in training, by hash at inference), where 'random' draws any of its expressed genes."""
    from models.transformer import Transformer, TransformerConfig

    genes = torch.arange(64).expand(4, -1)
    values = torch.arange(64).remainder(10).add(1).expand(4, -1).clone()  # bins 1..10, 64 expressed genes a cell
    batch = {"genes": genes, "values": values, "index": torch.arange(4), "X": values / 4.0}
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.debug(max_len=16, context="highest"))
    for training in (True, False):
        model.train(training)
        g, v, _ = model.tokens(batch)
        assert g.shape[1] == 16 and bool((v >= 8).all())  # 18 genes have bins 8-10: the 16 come from them
        assert bool(((v == 10).sum(1) == 6).all()) and bool(((v == 9).sum(1) == 6).all())  # every 10 and 9
    model.eval()
    assert torch.equal(model.tokens(batch)[0][1:3], model.tokens({k: x[1:3] for k, x in batch.items()})[0])
    random = Transformer(TransformerConfig.debug(max_len=16, context="random"))
    random.eval()
    assert bool((random.tokens(batch)[1] < 8).any())
    # a checkpoint written before the field existed sampled at random, and loads that way
    assert models.make_config("transformer", {"n_genes": 64}, saved=True).context == "random"
    assert models.make_config("transformer", {"n_genes": 64}).context == "highest"
    with pytest.raises(ValueError, match="context is 'top'"):
        TransformerConfig.debug(context="top")


def test_transformer_gene_values_encode_each_visible_value_by_its_gene():
    """gene_values (on for binned input by default): each token adds bin / (n_bins - 1) x its gene's vector, the same
    token without it is otherwise unchanged, and a masked token's value stays hidden. Off by default for rank input,
    and for checkpoints written before the field existed."""
    from models.transformer import Transformer, TransformerConfig

    def tokens_in(model, values, mask=None):  # the tokens the first block sees
        seen = []
        hook = model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        model._encode(genes, values, mask)
        hook.remove()
        return seen[0][:, 1:]  # without CLS

    torch.manual_seed(0)
    model = Transformer(TransformerConfig.debug(max_len=16))
    off = Transformer(TransformerConfig.debug(max_len=16, gene_values=False))
    off.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("gene_value.")})
    assert model.gene_values and not off.gene_values
    assert not Transformer(TransformerConfig.debug(input="rank")).gene_values
    genes = torch.arange(8).expand(2, -1)
    values = torch.tensor([[5, 1, 9, 0, 3, 7, 2, 10], [4, 4, 4, 4, 4, 4, 4, 4]])
    extra = tokens_in(model, values) - tokens_in(off, values)
    expected = values[..., None] / 10 * model.gene_value.weight[genes]
    assert torch.allclose(extra, expected, atol=1e-6)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 2] = True
    extra = tokens_in(model, values, mask) - tokens_in(off, values, mask)
    assert torch.allclose(extra[:, 2], torch.zeros(2, 32)) and torch.allclose(extra[:, 3:], expected[:, 3:], atol=1e-6)
    assert not models.make_config("transformer", {"n_genes": 64}, saved=True).gene_values
    with pytest.raises(RuntimeError, match="gene_value"):
        model.load_state_dict(off.state_dict())


def test_transformer_gene_init_pca_starts_each_gene_on_the_principal_axes_of_the_data():
    """gene_init "pca" (the default): `init_from_data` sets each expressed gene's embedding to its loadings on the
    top d_model principal axes of the mvc target (the batch's X for binned input), so the embedding matrix has
    orthonormal columns whose first ones span the data's dominant axes; a gene the cells never express keeps its
    random start. "random" asks for no cells; checkpoints written before the field existed started at random."""
    from models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    n, g, r = 512, 64, 3
    axes = torch.linalg.qr(torch.randn(g - 1, r)).Q  # the data's dominant axes over the expressed genes
    x = 3.0 + (torch.randn(n, r) * torch.tensor([6.0, 4.0, 3.0])) @ axes.T + 0.05 * torch.randn(n, g - 1)
    x = torch.cat([x, torch.zeros(n, 1)], 1)  # the last gene is never expressed
    model = Transformer(TransformerConfig.debug(n_genes=g))
    assert model.init_cells == 4096 and Transformer(TransformerConfig.debug(gene_init="random")).init_cells == 0
    before = model.gene_embedding.weight.detach().clone()
    model.init_from_data({"X": x})
    w = model.gene_embedding.weight.detach()
    assert torch.equal(w[g - 1], before[g - 1]) and torch.equal(w[g:], before[g:])  # unexpressed, special tokens
    gram = w[: g - 1].T @ w[: g - 1]
    assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-3), "orthonormal loadings"
    overlap = torch.linalg.svdvals(axes.T @ w[: g - 1, :r])  # cosines between the two r-dim subspaces
    assert overlap.min() > 0.99, overlap
    assert models.make_config("transformer", {"n_genes": 64}, saved=True).gene_init == "random"
    with pytest.raises(ValueError, match="gene_init is 'svd'"):
        TransformerConfig.debug(gene_init="svd")


def test_gpu_preset_is_scgpt_sized_and_trains():
    """TransformerConfig.gpu(): 12 blocks of width 512 (about 38M parameters beside the gene embeddings) that take a
    step on CPU too; the same run on a GPU is tests/engine/train/test_gpu.py."""
    from models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    config = TransformerConfig.gpu(input="rank", n_genes=64)
    assert (config.d_model, config.n_heads, config.n_layers, config.max_len) == (512, 8, 12, 1024)
    model = Transformer(config)
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks."))
    assert 37e6 < blocks < 39e6, blocks
    batch = synthetic_batch(n_cells=8)
    model.init_from_data(batch)  # a vocabulary narrower than d_model: loadings on every axis the data has
    first = model.loss(batch, step=0)
    first.loss.backward()
    assert math.isfinite(first.loss.item())
    assert all(p.grad is not None for p in model.parameters())


def test_registry_and_config_errors():
    assert models.names() == ["probe", "transformer", "vae"]
    assert models.get("vae") is models.VAE
    with pytest.raises(models.ModelError, match="unknown model 'gpt'"):
        models.get("gpt")
    with pytest.raises(models.ModelError, match="no config field"):
        models.make_config("vae", {"n_latnet": 3})
    with pytest.raises(models.ModelError, match="likelihood"):
        models.make_config("vae", {"likelihood": "poisson"})
    cfg = models.make_config("vae", {"n_latent": 3, "n_genes": 10})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_latent = 4  # frozen


def test_transformer_reads_engine_transform_outputs(tiny_store):
    """The kernels' own outputs: full-width bins (kept: max_len of each cell's expressed genes), and rank tokens
    padded past `lengths`."""
    from engine.preprocess.transforms import Pipeline
    from engine.store.format import Store

    store = Store.open(tiny_store)
    block = store.read_csr(0, 0, 32)
    index = np.arange(32)
    binned = Pipeline.from_spec(
        [{"normalize_total": {"target_sum": 1e4}}, "log1p", {"binning": {"n_bins": 11}}, "mask"], store
    )
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in binned(block, index).items()}
    model = models.build("transformer", models.get("transformer").Config.debug(n_genes=store.n_genes, max_len=16))
    genes, values, mask = model.tokens(out)
    assert genes.shape == values.shape == mask.shape == (32, 16)
    # every kept token is an expressed gene of the cell, with its own bin; a cell keeps min(max_len, expressed)
    assert ((values > 0) == (genes >= 0)).all()
    assert torch.equal(values[genes >= 0], out["values"].gather(1, genes.clamp(min=0))[genes >= 0])
    assert torch.equal((genes >= 0).sum(1), (out["values"] > 0).sum(1).clamp(max=16))
    assert np.isfinite(model.loss(out).loss.item()) and model.embed(out).shape == (32, 32)

    lengths = torch.tensor([3, 0, 5])
    genes = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 0, 0, 0], [1, 2, 3, 4, 9]])
    rank = models.build("transformer", models.get("transformer").Config.debug(n_genes=12, input="rank", max_len=8))
    g, _, _ = rank.tokens({"genes": genes, "lengths": lengths})
    assert (g >= 0).sum(1).tolist() == [3, 0, 5]
    e = rank.embed({"genes": genes, "lengths": lengths})
    e2 = rank.embed({"genes": torch.where(g < 0, 11, genes), "lengths": lengths})  # padded ids do not matter
    assert torch.allclose(e, e2, atol=1e-6)
