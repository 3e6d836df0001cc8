"""A masked-expression transformer over gene tokens (scGPT-style values or Geneformer-style ranks).

A cell is a set of (gene token, value) pairs. The batch carries them as the loader's kernels produce them:

- ``genes``: int64 (B, L) gene ids in the model vocabulary; padding is a negative id, or every position past
  ``lengths`` (B,) when the batch has it (engine.preprocess.transforms rank_tokens);
- ``values``: (B, L) value bins in [0, n_bins) (bin 0 = zero), used when ``input == "binned"``;
- ``mask``: bool (B, L), True where the value (binned) or the gene token (rank) is hidden and predicted.
  When the batch has no mask, one is drawn here with ``mask_ratio`` (torch RNG, so seeded runs repeat).

Without ``genes`` the model takes a dense ``X`` and keeps each cell's ``max_len`` largest genes in descending
order: the Geneformer rank order when X holds normalized values, a handy default for tests.

``input="binned"``: token = gene embedding + value embedding, loss = MSE on masked values (scGPT).
``input="rank"``: token = gene embedding + position embedding, loss = cross-entropy of masked genes (Geneformer).
Attention is torch's scaled_dot_product_attention (flash/memory-efficient kernels on GPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import DataSummary, Loss, dense_x


@dataclass(frozen=True)
class TransformerConfig:
    n_genes: int = 0  # vocabulary size; 0: filled in from the data
    input: str = "binned"  # binned | rank
    n_bins: int = 51
    max_len: int = 256  # tokens per cell (without CLS)
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 0  # 0: 4 * d_model
    dropout: float = 0.0
    mask_ratio: float = 0.15
    pooling: str = "cls"  # cls | mean

    def __post_init__(self):
        if self.input not in ("binned", "rank"):
            raise ValueError(f"input is {self.input!r}, expected 'binned' or 'rank'")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling is {self.pooling!r}, expected 'cls' or 'mean'")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio is {self.mask_ratio}, expected within (0, 1)")

    def resolve(self, data: DataSummary) -> TransformerConfig:
        """Vocabulary size (token ids are vocabulary positions + the tokeniser's offset), bins and input kind."""
        updates: dict = {"n_genes": self.n_genes or data.n_genes + data.token_offset}
        if data.tokeniser == "binning":
            updates["input"] = "binned"
            updates["n_bins"] = data.n_bins or self.n_bins
        elif data.tokeniser == "rank":
            updates["input"] = "rank"
        return dataclasses.replace(self, **updates)

    def obs_keys(self) -> tuple[str, ...]:
        return ()

    @classmethod
    def debug(cls, n_genes: int = 64, **kw) -> TransformerConfig:
        return cls(
            **{"n_genes": n_genes, "n_bins": 11, "max_len": 32, "d_model": 32, "n_heads": 2, "n_layers": 1, **kw}
        )


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
        self.dropout = c.dropout

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        attn_mask = keep[:, None, None, :]  # (B, 1, 1, T): attend only to real tokens
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        h = h + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return h + self.ff(self.ln2(h))


class Transformer(nn.Module):
    Config = TransformerConfig

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.n_genes < 1:
            raise ValueError("TransformerConfig.n_genes must be set (>= 1) before building the model")
        self.config = c = config
        self.pad_id, self.cls_id, self.mask_id = c.n_genes, c.n_genes + 1, c.n_genes + 2
        self.gene_embedding = nn.Embedding(c.n_genes + 3, c.d_model, padding_idx=self.pad_id)
        if c.input == "binned":
            self.value_embedding = nn.Embedding(c.n_bins + 1, c.d_model)  # last index: masked value
            self.head = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.GELU(), nn.Linear(c.d_model, 1))
        else:
            self.position_embedding = nn.Embedding(c.max_len + 1, c.d_model)
            self.head = nn.Linear(c.d_model, c.n_genes)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)

    # -- inputs
    def tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(genes, values, mask) of at most max_len tokens per cell; genes < 0 are padding."""
        c = self.config
        mask = batch.get("mask")
        if "genes" in batch:
            genes = batch["genes"].long()
            values = batch.get("values")
            if "lengths" in batch:  # kernel tokens pad with pad_id past each cell's length
                pos = torch.arange(genes.shape[1], device=genes.device)[None, :]
                genes = torch.where(pos < batch["lengths"][:, None], genes, torch.full_like(genes, -1))
            if genes.shape[1] > c.max_len:
                if c.input == "binned" and values is not None:
                    # full-width bins (every gene of the vocabulary): keep each cell's highest bins
                    score = torch.where(genes >= 0, values.float(), torch.full_like(values, -1, dtype=torch.float))
                    keep = torch.topk(score, c.max_len, dim=1).indices.sort(dim=1).values
                else:  # rank tokens are already in descending order
                    keep = torch.arange(c.max_len, device=genes.device).expand(genes.shape[0], -1)
                genes = genes.gather(1, keep)
                values = None if values is None else values.gather(1, keep)
                mask = None if mask is None else mask.gather(1, keep)
            return genes, values, mask
        x = dense_x(batch)
        k = min(c.max_len, x.shape[1])
        top, genes = torch.topk(x, k, dim=1)  # descending: rank order
        genes = torch.where(top > 0, genes, torch.full_like(genes, -1))
        values = self._bin(top) if c.input == "binned" else None
        return genes, values, None

    def _bin(self, top: torch.Tensor) -> torch.Tensor:
        """Per-cell quantile bins of non-zero values (bin 0 = zero), for dense input without kernel-made bins."""
        nb = self.config.n_bins
        nz = top > 0
        rank = nz.sum(1, keepdim=True) - 1 - torch.arange(top.shape[1], device=top.device)[None, :]  # 0 = smallest
        n = nz.sum(1, keepdim=True).clamp(min=1)
        bins = 1 + (rank.clamp(min=0) * (nb - 1)) // n
        return torch.where(nz, bins, torch.zeros_like(bins))

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
            if mask is not None:
                v = torch.where(mask, torch.full_like(v, c.n_bins), v)
            h = h + self.value_embedding(v)
        else:
            pos = torch.arange(1, genes.shape[1] + 1, device=genes.device)
            h = h + self.position_embedding(pos)[None]
        B = genes.shape[0]
        cls = self.gene_embedding(torch.full((B, 1), self.cls_id, device=genes.device, dtype=torch.long))
        if c.input == "rank":
            cls = cls + self.position_embedding.weight[0]
        h = torch.cat([cls, h], dim=1)
        keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=genes.device), keep], dim=1)
        for block in self.blocks:
            h = block(h, keep)
        return self.ln_f(h), keep

    def loss(self, batch: dict, step: int | None = None) -> Loss:
        c = self.config
        genes, values, mask = self.tokens(batch)
        if c.input == "binned" and values is None:
            raise KeyError("input='binned' needs 'values' in the batch (a binning transform) or a dense 'X'")
        if mask is None:
            mask = torch.rand(genes.shape, device=genes.device) < c.mask_ratio
        mask = mask.bool() & (genes >= 0)
        h, _ = self._encode(genes, values, mask)
        h = h[:, 1:][mask]
        n_masked = int(mask.sum())
        if n_masked == 0:  # keep the graph (DDP needs every parameter to receive a gradient)
            loss = sum(p.sum() for p in self.parameters()) * 0.0
            return Loss(loss, {"masked": 0.0}, n_cells=genes.shape[0])
        if c.input == "binned":
            pred = self.head(h).squeeze(-1).float()
            loss = F.mse_loss(pred, values[mask].float())
        else:
            loss = F.cross_entropy(self.head(h).float(), genes[mask])
        # Unused-branch guard: DDP without find_unused_parameters needs every parameter in the graph.
        loss = loss + 0.0 * self.gene_embedding.weight[self.mask_id].sum()
        return Loss(loss, {"masked": float(n_masked)}, n_cells=genes.shape[0])

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        """A pooled cell embedding: the CLS token or the mean over real tokens."""
        genes, values, _ = self.tokens(batch)
        h, keep = self._encode(genes, values, None)
        if self.config.pooling == "cls":
            return h[:, 0].float()
        w = keep[:, 1:, None].to(h.dtype)
        return ((h[:, 1:] * w).sum(1) / w.sum(1).clamp(min=1)).float()
