"""What every model shares: the loss dataclass and small helpers to read a loader batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Loss:
    """The objective to minimise (`loss`, a scalar tensor), its named terms (detached floats) and cells seen."""

    loss: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)
    n_cells: int = 0


def dense_x(batch: dict) -> torch.Tensor:
    """The batch's expression matrix as a dense float32 tensor (the loader may hand over sparse CSR)."""
    x = batch["X"]
    if x.layout != torch.strided:
        x = x.to_dense()
    return x.float()


def obs_codes(batch: dict, key: str, n_categories: int) -> torch.Tensor:
    """Integer codes of an obs column; missing values (negative codes) go to the last slot."""
    codes = batch[key].long()
    return torch.where(codes < 0, torch.full_like(codes, n_categories - 1), codes)
