"""A masked-expression transformer over gene tokens: scGPT-style value bins or Geneformer-style rank tokens.

A cell is a set of (gene token, value) pairs. The batch carries them as the loader's kernels produce them
(engine.preprocess.transforms):

- ``binning``: ``genes`` (B, G) = every output column, ``values`` (B, G) per-cell quantile bins in [0, n_bins)
  (bin 0 = zero);
- ``rank_tokens``: ``genes`` (B, L) in descending order of x / gene median, ``values`` (B, L) those ratios,
  ``lengths`` (B,); padding past each length (or any negative id);
- ``mask`` (optional, bool like ``genes``): positions to hide. Without it the model draws a fresh mask of
  ``mask_ratio`` of each cell's tokens every step (torch RNG); the kernel's mask is a pure function of the cell
  id, so a cell is masked the same way every epoch (fine for large corpora, less so for small ones).

Without ``genes`` the model takes a dense ``X`` (log-normalized for binned input, normalized for rank) and
tokenises it itself the same way (the binning transform's bins): handy in tests and notebooks.

The context holds at most ``max_len`` expressed genes per cell. Binned: zero bins are not tokens (scGPT's
non-zero mode; ``zero_genes`` fills the rest of the context with unexpressed genes, bin 0, as scGPT's
include_zero_gene does); a cell with more expressed genes keeps its highest bins (``context="highest"``, ties broken
at random each training step) or a random subset of them (``"random"``, scGPT's), and at inference the ties or the
subset are fixed pseudo-randomly (a hash of cell id and gene, so embeddings are deterministic and independent of the
batch). Bins are a cell's quantiles, so a random subset draws as many tokens from its lowest bins (genes seen once
or twice) as from its highest, which carry its type (zeisel kNN 0.68x -> 0.95x of PCA's with the highest,
bench/quality.py). Rank: the top ``max_len`` ranks. Padding is trimmed to the longest cell of the batch.

Token = gene embedding + value encoding (binned: an MLP of bin / (n_bins - 1), scGPT's continuous encoder, or a
vector per bin) or + rank-position embedding (rank); binned tokens also add bin / (n_bins - 1) x a vector of their
gene's (``gene_values``), so the mean token holds a linear encoding of the cell's values from the first step (the
shared value encoder says how high a value is, not which gene has it). Pre-LN blocks with torch's
scaled_dot_product_attention (flash / memory-efficient kernels on GPU). The cell embedding is a linear map of the
mean of the tokens (Geneformer) or of the CLS token (scGPT), ``pooling``. The gene embeddings start as each gene's
loadings on the principal axes of the training cells' expression (``gene_init="pca"``, `init_from_data`; liu kNN
0.83x -> 0.92x of PCA's in the same 300 steps, bench/quality.py) or at random (``"random"``).

Objectives (``loss`` returns their weighted sum and each term):

- ``mlm``, masked-token prediction. Binned: the masked values' bins by cross-entropy over bins
  (``value_loss="ce"``) or bin / (n_bins - 1) by MSE (``"mse"``). Rank: the masked gene ids by cross-entropy
  over the vocabulary (Geneformer).
- ``mvc``, a cell-level reconstruction from the cell embedding (scGPT's MVC / GEPC): every vocabulary gene's
  value predicted as m_g + <c, q_g> + b_g, q_g from the gene's embedding, m_g the running mean of the gene's target
  over the training batches (a buffer: the embedding carries how a cell differs from the mean profile, not the
  profile itself); with ``batch_key``, plus the cell's batch's own offset of gene g (scGPT's batch-conditioned MVC
  decoder: the embedding need not carry batch shifts, and never reads the batch). Target (``mvc_target``):
  ``"expression"``, every gene's log-normalized expression (the batch's X, which the tokenisers keep:
  log-normalized in the binned recipe, logged here for rank input, whose X is normalized counts), or ``"token"``,
  the tokens' own values scattered into the vocabulary, zeros elsewhere (binned: bin / (n_bins - 1), scGPT's;
  rank: log1p(x / gene median)). Token values keep no gene-to-gene magnitude: a cell's bins are its ranks (ties
  where it has ~15 expressed genes at one count each) and x / median is ~1 for every gene a shallow cell expresses.
  An embedding trained to rebuild them classified worm neurons at 0.43 / 0.27 kNN (binned / rank,
  bench/quality.py) where one trained on the expression reached 0.55 / 0.81.
  It is what trains the embedding: masked-token prediction alone leaves the pooled vector untrained, and at CPU
  scale such embeddings classify cells barely above chance (kNN 0.34 on pbmc68k where PCA-50 gets 0.79).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.base import DataSummary, Loss, dense_x, obs_codes


@dataclass(frozen=True)
class TransformerConfig:
    n_genes: int = 0  # vocabulary size; 0: filled in from the data
    input: str = "binned"  # binned | rank
    n_bins: int = 51
    max_len: int = 256  # expressed genes per cell in the context (without CLS)
    embed_max_len: int = 0  # the context of `embed` (training and validation keep max_len); 0: max_len
    zero_genes: bool = False  # binned: fill the context past a cell's expressed genes with unexpressed ones (bin 0)
    context: str = "highest"  # binned, a cell with more than max_len expressed genes: its highest bins | random
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 0  # 0: 4 * d_model
    dropout: float = 0.0
    mask_ratio: float = 0.25  # of each cell's tokens, when the batch has no kernel-made mask
    pooling: str = "mean"  # mean | cls: pooled into the cell embedding that the mvc objective trains
    value_encoder: str = "continuous"  # binned: continuous (MLP of bin / (n_bins - 1)) | category (a vector per bin)
    value_loss: str = "ce"  # binned mlm: ce over bins | mse on bin / (n_bins - 1)
    mlm_weight: float = 1.0
    mvc_weight: float = 10.0  # mvc is a mean squared error over every gene, most of them 0: weighted to be heard
    mvc_target: str = "expression"  # log-normalized expression (the batch's X) | token (the tokens' own values)
    # each token also adds its value x a vector of its gene's, so the mean token holds a linear encoding of the
    # values; None: on for binned input, off for rank (whose positions carry the order)
    gene_values: bool | None = None
    # how the gene embeddings start: "pca", the principal axes of the mvc target over `init_cells` training cells
    # (the training loop reads them before the first step: `init_from_data`), or "random" (GPT-2's N(0, 0.02))
    gene_init: str = "pca"
    init_cells: int = 4096
    # an obs key whose categories each get their own per-gene offset in the mvc reconstruction (scGPT's
    # batch-conditioned MVC decoder): the cell embedding need not carry how a batch's profile differs
    batch_key: str | None = None
    n_batch: int = 0  # categories of batch_key + 1 slot for missing; filled in from the store's obs schema

    # what checkpoints written before these fields existed did
    FORMER_DEFAULTS: ClassVar[dict] = {"context": "random", "gene_values": False, "gene_init": "random"}

    def __post_init__(self):
        if self.input not in ("binned", "rank"):
            raise ValueError(f"input is {self.input!r}, expected 'binned' or 'rank'")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling is {self.pooling!r}, expected 'cls' or 'mean'")
        if self.value_encoder not in ("continuous", "category"):
            raise ValueError(f"value_encoder is {self.value_encoder!r}, expected 'continuous' or 'category'")
        if self.mvc_target not in ("expression", "token"):
            raise ValueError(f"mvc_target is {self.mvc_target!r}, expected 'expression' or 'token'")
        if self.context not in ("random", "highest"):
            raise ValueError(f"context is {self.context!r}, expected 'random' or 'highest'")
        if self.gene_init not in ("pca", "random"):
            raise ValueError(f"gene_init is {self.gene_init!r}, expected 'pca' or 'random'")
        if self.init_cells < 2:
            raise ValueError(f"init_cells is {self.init_cells}, expected >= 2")
        if self.value_loss not in ("ce", "mse"):
            raise ValueError(f"value_loss is {self.value_loss!r}, expected 'ce' or 'mse'")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio is {self.mask_ratio}, expected within (0, 1)")
        if self.embed_max_len < 0:
            raise ValueError(f"embed_max_len is {self.embed_max_len}, expected >= 0 (0: max_len)")
        if self.zero_genes and self.input != "binned":
            raise ValueError("zero_genes needs input='binned' (rank tokens are a cell's expressed genes in order)")
        if self.input == "rank" and self.embed_max_len > self.max_len:
            raise ValueError("embed_max_len > max_len needs input='binned' (rank tokens have max_len positions)")
        if self.max_len < 1 or self.n_layers < 1 or self.n_bins < 3:
            raise ValueError("max_len and n_layers must be >= 1, n_bins >= 3")
        if self.mlm_weight < 0 or self.mvc_weight < 0 or self.mlm_weight + self.mvc_weight == 0:
            raise ValueError("mlm_weight and mvc_weight must be >= 0, and not both 0")

    def resolve(self, data: DataSummary) -> TransformerConfig:
        """Vocabulary size (token ids are vocabulary positions + the tokeniser's offset), bins and input kind."""
        updates: dict = {"n_genes": self.n_genes or data.n_genes + data.token_offset}
        if self.batch_key and not self.n_batch:
            updates["n_batch"] = data.n_categories(self.batch_key, "batch_key")
        if data.tokeniser == "binning":
            updates["input"] = "binned"
            updates["n_bins"] = data.n_bins or self.n_bins
        elif data.tokeniser == "rank":
            updates["input"] = "rank"
        return dataclasses.replace(self, **updates)

    def obs_keys(self) -> tuple[str, ...]:
        return (self.batch_key,) if self.batch_key else ()

    @classmethod
    def debug(cls, n_genes: int = 64, **kw) -> TransformerConfig:
        """A few thousand parameters: unit tests."""
        return cls(
            **{"n_genes": n_genes, "n_bins": 11, "max_len": 32, "d_model": 32, "n_heads": 2, "n_layers": 1, **kw}
        )

    @classmethod
    def small(cls, **kw) -> TransformerConfig:
        """Trains in minutes on 2 CPU cores (the bench/quality.py figures); sizes from the data."""
        return cls(**{"max_len": 128, "d_model": 64, "n_heads": 4, "n_layers": 2, **kw})

    @classmethod
    def gpu(cls, **kw) -> TransformerConfig:
        """One GPU per worker (bf16 autocast, flash attention): scGPT's width and depth (12 layers of 512, 8 heads)
        over a context of 1,024 expressed genes; about 38M parameters beside the gene embeddings."""
        return cls(**{"max_len": 1024, "d_model": 512, "n_heads": 8, "n_layers": 12, **kw})


class Block(nn.Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.ln1 = nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.ln2 = nn.LayerNorm(c.d_model)
        d_ff = c.d_ff or 4 * c.d_model
        self.ff = nn.Sequential(nn.Linear(c.d_model, d_ff), nn.GELU(), nn.Linear(d_ff, c.d_model))
        self.drop = nn.Dropout(c.dropout)
        self.dropout = c.dropout

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        attn_mask = keep[:, None, None, :]  # (B, 1, 1, T): attend only to real tokens
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, D)))
        return h + self.drop(self.ff(self.ln2(h)))


def _hash_scores(genes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random score in [0, 1) per (cell id, gene): the same subset of genes on every call."""
    x = (genes * 2654435761 + index[:, None] * 40503 + 12345) % 2147483647
    x = (x ^ (x >> 13)) * 1103515245 % 2147483647
    x = x ^ (x >> 16)
    return (x % 1048576).float() / 1048576.0


class Transformer(nn.Module):
    Config = TransformerConfig

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.n_genes < 1:
            raise ValueError("TransformerConfig.n_genes must be set (>= 1) before building the model")
        self.config = c = config
        self.pad_id, self.cls_id, self.mask_id = c.n_genes, c.n_genes + 1, c.n_genes + 2
        self.gene_embedding = nn.Embedding(c.n_genes + 3, c.d_model, padding_idx=self.pad_id)
        self.gene_values = c.input == "binned" if c.gene_values is None else c.gene_values
        if self.gene_values:
            self.gene_value = nn.Embedding(c.n_genes + 3, c.d_model, padding_idx=self.pad_id)
        if c.input == "binned":
            if c.value_encoder == "category":
                self.value_embedding = nn.Embedding(c.n_bins + 1, c.d_model)  # last index: masked value
            else:
                self.value_encoder = nn.Sequential(nn.Linear(1, c.d_model), nn.ReLU(), nn.Linear(c.d_model, c.d_model))
                self.value_mask = nn.Parameter(torch.zeros(c.d_model))
            n_out = c.n_bins if c.value_loss == "ce" else 1
            self.head = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.GELU(), nn.Linear(c.d_model, n_out))
        else:
            self.position_embedding = nn.Embedding(c.max_len + 1, c.d_model)  # 0: CLS
            self.head = nn.Linear(c.d_model, c.n_genes)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.cell_head = nn.Linear(c.d_model, c.d_model)  # pooled tokens -> the cell embedding
        # mvc: gene queries from the gene embeddings, dotted with the cell embedding, plus a per-gene bias
        self.mvc_query = nn.Linear(c.d_model, c.d_model)
        self.mvc_bias = nn.Parameter(torch.zeros(c.n_genes))
        # each gene's mean mvc target over the training batches seen (a buffer, like BatchNorm's running mean): the
        # mvc prediction is this + <c, q_g> + b_g, so neither the embedding nor the first steps have to learn the mean
        # expression profile (Adam moves b_g by ~lr a step: 300 steps could not reach gene means of 1-3)
        self.register_buffer("mvc_mean", torch.zeros(c.n_genes))
        self.register_buffer("mvc_batches", torch.zeros((), dtype=torch.long))
        self._register_load_state_dict_pre_hook(_zero_mvc_mean)
        self.apply(_init_weights)
        self.use_batch = c.batch_key is not None and c.n_batch > 0
        if self.use_batch:  # per batch, per gene, added to the mvc prediction; batches start at the running mean
            self.mvc_batch = nn.Embedding(c.n_batch, c.n_genes)
            nn.init.zeros_(self.mvc_batch.weight)
        # The feed-forward branches start at zero: each token starts as its gene + value embedding plus what
        # attention mixes in (linear in the cell's tokens), so the pooled vector starts as a bag of gene
        # embeddings, which the linear cell head + mvc turn into a PCA-like embedding within ~100 steps.
        for block in self.blocks:
            nn.init.zeros_(block.ff[-1].weight)

    # -- a start from the data

    @property
    def init_cells(self) -> int:
        """Training cells `init_from_data` wants before the first step (0: none; `gene_init: random`)."""
        return self.config.init_cells if self.config.gene_init == "pca" else 0

    @torch.no_grad()
    def init_from_data(self, batch: dict) -> None:
        """The gene embeddings start as each gene's loadings on the top d_model principal axes of the mvc target
        over `batch`'s cells (unit-norm axes: entries ~1 / sqrt(genes), GPT-2's 0.02 at 2,000 genes). The mvc
        queries are made from these embeddings, so the decoder starts with PCA's gene geometry and the cell embedding
        can take up the expression's fine directions from the first step, where from random embeddings it learned
        them roughly in order of their variance (liu's T-cell subsets last). Co-expression as a start for gene
        tokens is scBERT's gene2vec idea; here it comes from the training data itself. Genes the batch never
        expresses (and ids below the tokeniser's offset) keep their random start."""
        x = self._target(batch).float()
        seen = (x != 0).any(0)
        x = x - x.mean(0)
        k = min(self.config.d_model, *x.shape)
        with torch.random.fork_rng(devices=[]):  # the randomized SVD leaves the training RNG stream as it was
            torch.manual_seed(0)
            _, _, v = torch.svd_lowrank(x, q=min(2 * k, *x.shape), niter=4)
        w = self.gene_embedding.weight
        w[: self.config.n_genes, :k] = torch.where(seen[:, None], v[:, :k].to(w.dtype), w[: self.config.n_genes, :k])

    # -- inputs

    def tokens(
        self, batch: dict, limit: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(genes, values, mask) of at most `limit` (default max_len) tokens per cell, trimmed to the longest cell;
        genes < 0 pad."""
        genes, values, mask = self._full_tokens(batch)
        c = self.config
        real = genes >= 0
        if c.input == "binned":
            expressed = values > 0
            if not c.zero_genes:
                real &= expressed  # zero bins are not tokens
            if self.training:
                score = torch.rand(genes.shape, device=genes.device)
            else:
                index = batch.get("index")
                index = (
                    torch.zeros(genes.shape[0], dtype=torch.long, device=genes.device)
                    if index is None
                    else index.long()
                )
                score = _hash_scores(genes.clamp(min=0), index)
            if c.context == "highest":  # the highest bins first, ties broken by the score
                score = score.clamp(0, 1 - 1e-6) + values.to(score.dtype)
            elif c.zero_genes:  # expressed genes first (scores in [1, 2)), unexpressed ones fill what is left
                score = score.clamp(0, 1 - 1e-6) + expressed.to(score.dtype)
        else:  # rank tokens come in rank order: keep the first ones
            score = -torch.arange(genes.shape[1], device=genes.device, dtype=torch.float).expand(genes.shape)
        score = torch.where(real, score, torch.full_like(score, -1e9))
        width = max(1, min(limit or c.max_len, genes.shape[1], int(real.sum(1).max()) if genes.numel() else 1))
        keep = torch.topk(score, width, dim=1).indices
        if c.input == "binned":
            keep = keep.sort(dim=1).values  # a stable order (binned tokens have no positions)
        genes = torch.where(real.gather(1, keep), genes.gather(1, keep), torch.full_like(keep, -1))
        values = None if values is None else values.gather(1, keep)
        mask = None if mask is None else mask.gather(1, keep)
        return genes, values, mask

    def _full_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Every token of each cell as the batch holds it (binned: full width; rank: up to the kernel's max_len)."""
        c = self.config
        if "genes" in batch:
            genes = batch["genes"].long()
            values = batch.get("values")
            if c.input == "binned":
                if values is None:
                    raise KeyError("input='binned' needs 'values' in the batch (the binning transform) or a dense 'X'")
                values = values.long()
            if "lengths" in batch:  # rank tokens pad past each cell's length
                pos = torch.arange(genes.shape[1], device=genes.device)[None, :]
                genes = torch.where(pos < batch["lengths"][:, None], genes, torch.full_like(genes, -1))
            return genes, values, batch.get("mask")
        x = dense_x(batch)
        if c.input == "binned":
            genes = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            return genes, self._bin(x), batch.get("mask")
        k = min(x.shape[1], 2048)
        top, genes = torch.topk(x, k, dim=1)  # descending: rank order when x is normalized / gene median
        return torch.where(top > 0, genes, torch.full_like(genes, -1)), top, None

    def _bin(self, x: torch.Tensor) -> torch.Tensor:
        """Per-cell quantile bins of a dense matrix, as the `binning` transform cuts them (scGPT's): edges =
        np.quantile(a cell's non-zeros, linspace(0, 1, n_bins - 1)), bin = np.digitize(x, edges) for non-zeros, 0
        for zeros; equal values share a bin."""
        nb = self.config.n_bins
        nz = x > 0
        m = nz.sum(1, keepdim=True)
        s = torch.sort(torch.where(nz, x, torch.full_like(x, torch.inf)), dim=1).values  # non-zeros first, ascending
        q = torch.arange(nb - 1, dtype=torch.float64, device=x.device) * (1.0 / (nb - 2))  # np.linspace's steps
        q[-1] = 1.0
        vi = (m - 1).clamp(min=0).double() * q
        lo = vi.floor().long()
        hi = torch.minimum(lo + 1, (m - 1).clamp(min=0))
        t = vi - lo.double()
        a, b = s.gather(1, lo), s.gather(1, hi)
        d = (b - a).double()  # in x's dtype first, as numpy's quantile subtracts
        edges = torch.where(t >= 0.5, b.double() - d * (1.0 - t), a.double() + d * t)
        bins = torch.searchsorted(edges.contiguous(), x.double().contiguous(), right=True)
        return torch.where(nz, bins, torch.zeros_like(bins))

    def _target(self, batch: dict) -> torch.Tensor:
        """The mvc target (B, n_genes): every vocabulary gene's log-normalized expression (mvc_target "expression":
        the batch's X, logged for rank input, whose X is normalized counts), or each cell's token values scattered
        into the vocabulary, zeros elsewhere ("token")."""
        c = self.config
        if c.mvc_target == "expression":
            if "X" not in batch:
                raise KeyError("mvc_target='expression' needs the batch's 'X' beside its tokens (tokenisers keep it)")
            x = dense_x(batch)
            offset = c.n_genes - x.shape[1]  # token id = column + offset
            if offset < 0:
                raise ValueError(f"mvc_target='expression': X has {x.shape[1]} genes, the vocabulary {c.n_genes}")
            return F.pad(torch.log1p(x.clamp(min=0)) if c.input == "rank" else x, (offset, 0))
        genes, values, _ = self._full_tokens(batch)
        if c.input == "binned":
            v = values.float() / (c.n_bins - 1)
        elif values is None:  # rank tokens without their values: presence
            v = torch.ones(genes.shape, device=genes.device)
        else:
            v = torch.log1p(values.float().clamp(min=0))
        real = genes >= 0
        out = torch.zeros(genes.shape[0], c.n_genes + 1, device=genes.device)
        out.scatter_(1, torch.where(real, genes, torch.full_like(genes, c.n_genes)), torch.where(real, v, 0.0))
        return out[:, :-1]

    # -- the network

    def _encode(
        self, genes: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        keep = genes >= 0
        tok = torch.where(keep, genes, torch.full_like(genes, self.pad_id))
        if c.input == "rank" and mask is not None:
            tok = torch.where(mask, torch.full_like(tok, self.mask_id), tok)
        h = self.gene_embedding(tok)
        if c.input == "binned":
            v = values.long().clamp(0, c.n_bins - 1)
            if c.value_encoder == "category":
                if mask is not None:
                    v = torch.where(mask, torch.full_like(v, c.n_bins), v)
                h = h + self.value_embedding(v)
            else:
                e = self.value_encoder((v.to(h.dtype) / (c.n_bins - 1))[..., None])
                if mask is not None:
                    e = torch.where(mask[..., None], self.value_mask.to(e.dtype), e)
                h = h + e
        else:
            pos = torch.arange(1, genes.shape[1] + 1, device=genes.device)
            h = h + self.position_embedding(pos)[None]
        if self.gene_values and values is not None:
            if c.input == "binned":
                v = values.to(h.dtype) / (c.n_bins - 1)
            else:
                v = torch.log1p(values.to(h.dtype).clamp(min=0))
            hidden = ~keep if mask is None else (mask | ~keep)  # a masked token's value (and gene) stay hidden
            h = h + v.masked_fill(hidden, 0.0)[..., None] * self.gene_value(tok)
        B = genes.shape[0]
        cls = self.gene_embedding(torch.full((B, 1), self.cls_id, device=genes.device, dtype=torch.long))
        if c.input == "rank":
            cls = cls + self.position_embedding.weight[0]
        h = torch.cat([cls, h], dim=1)
        keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=genes.device), keep], dim=1)
        for block in self.blocks:
            h = block(h, keep)
        return self.ln_f(h), keep

    def cell_embedding(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The CLS token or the mean of the real tokens, through a linear head: what `embed` returns and the mvc
        objective decodes (so the geometry kNN sees is the one reconstruction shapes)."""
        if self.config.pooling == "cls":
            pooled = h[:, 0]
        else:
            w = keep[:, 1:, None].to(h.dtype)
            pooled = (h[:, 1:] * w).sum(1) / w.sum(1).clamp(min=1)
        return self.cell_head(pooled)

    def _mvc(self, cell: torch.Tensor, batch: dict) -> torch.Tensor:
        """Every vocabulary gene's predicted value from the cell embedding (and its batch's offsets): (B, n_genes)."""
        # unit-scale queries, small cell projection: the product starts near the bias yet learns at once (with
        # both factors small, as GPT-style init makes them, the gradient of each is the other: it stalls at zero)
        c = self.config
        q = F.layer_norm(self.mvc_query(self.gene_embedding.weight[: c.n_genes]), (c.d_model,))
        pred = cell @ q.T.to(cell.dtype) + self.mvc_bias + self.mvc_mean
        if self.use_batch:
            pred = pred + self.mvc_batch(obs_codes(batch, c.batch_key, c.n_batch)).to(pred.dtype)
        return pred

    @torch.no_grad()
    def _track_mvc_mean(self, target: torch.Tensor) -> None:
        """The running mean of the mvc target: the mean of every batch so far for 100 batches, then an EMA (0.01)."""
        # the weight computed on the device: reading the count back would make a GPU step wait
        weight = (1.0 / (self.mvc_batches + 1).to(self.mvc_mean.dtype)).clamp(min=0.01)
        self.mvc_mean.lerp_(target.mean(0).to(self.mvc_mean.dtype), weight)
        self.mvc_batches += 1

    def loss(self, batch: dict, step: int | None = None) -> Loss:
        c = self.config
        genes, values, mask = self.tokens(batch)
        real = genes >= 0
        if mask is None:
            mask = torch.rand(genes.shape, device=genes.device) < c.mask_ratio
        mask = mask.bool() & real
        h, keep = self._encode(genes, values, mask)
        terms: dict[str, torch.Tensor | float] = {}
        total = h.new_zeros(()).float()
        # masked-token prediction
        hm = h[:, 1:][mask]
        n_masked = int(mask.sum())
        terms["masked"] = float(n_masked)
        if n_masked:
            out = self.head(hm).float()
            if c.input == "rank":
                target = genes[mask]
                mlm = F.cross_entropy(out, target)
                terms["mlm_acc"] = (out.detach().argmax(1) == target).float().mean()
            else:
                target = values[mask].long()
                if c.value_loss == "ce":
                    mlm = F.cross_entropy(out, target)
                    pred_bin = out.detach().argmax(1).float()
                    terms["mlm_acc"] = (pred_bin == target).float().mean()
                else:
                    mlm = F.mse_loss(out.squeeze(-1), target.float() / (c.n_bins - 1))
                    pred_bin = out.detach().squeeze(-1) * (c.n_bins - 1)
                terms["mlm_bin_mae"] = (pred_bin - target.float()).abs().mean()
            terms["mlm"] = mlm.detach()
            total = total + c.mlm_weight * mlm
        # cell-level reconstruction from the cell embedding
        target = self._target(batch)
        if self.training:
            self._track_mvc_mean(target)
        pred = self._mvc(self.cell_embedding(h, keep), batch).float()
        mvc = F.mse_loss(pred, target)
        terms["mvc"] = mvc.detach()
        terms["mvc_r"] = _row_pearson(pred.detach(), target).mean()
        total = total + c.mvc_weight * mvc
        # DDP (without find_unused_parameters) needs every parameter in the graph, even those unused this step
        # (the mask token without masked positions, the mlm head): a zero-weighted sum keeps them there
        total = total + 0.0 * sum(p.sum() for p in self.parameters())
        return Loss(total, terms, n_cells=genes.shape[0])

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        """The pooled cell embedding (CLS token or mean over real tokens), from every token unmasked."""
        genes, values, _ = self.tokens(batch, self.config.embed_max_len or None)
        h, keep = self._encode(genes, values, None)
        return self.cell_embedding(h, keep).float()


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: small embeddings and weights, so the heads start near their biases (torch's default
    N(0, 1) embeddings make the mvc dot products start at +-sqrt(d_model) and training first has to undo that)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _zero_mvc_mean(state_dict, prefix, *args) -> None:
    """Checkpoints made before the running mean existed: a zero mean, which is what those models predicted with."""
    if prefix + "mvc_bias" in state_dict and prefix + "mvc_mean" not in state_dict:
        state_dict[prefix + "mvc_mean"] = torch.zeros_like(state_dict[prefix + "mvc_bias"])
        state_dict[prefix + "mvc_batches"] = torch.zeros((), dtype=torch.long)


def _row_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-8)
