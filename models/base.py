"""What every model shares: the loss dataclass and small helpers to read a loader batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DataSummary:
    """What a model may know about its data to size itself (`Config.resolve`): the engine fills it in."""

    n_genes: int  # width of the expression input after the transforms (genes the model sees)
    obs_categories: dict[str, int | None] = field(default_factory=dict)  # obs key -> categories (None: not categorical)
    tokeniser: str | None = None  # "binning" | "rank" | None: what the transforms turn values into
    n_bins: int | None = None  # value bins of the binning tokeniser
    token_offset: int = 0  # token ids = vocabulary positions + offset

    def n_categories(self, key: str, field_name: str) -> int:
        """Categories of obs column `key` plus one slot for missing values; `field_name` names the config field."""
        n = self.obs_categories.get(key)
        if n is None:
            known = sorted(k for k, v in self.obs_categories.items() if v is not None)
            raise ValueError(
                f"{field_name}: obs column {key!r} is not a categorical column of the data (categorical: {known})"
            )
        return n + 1


@dataclass
class Loss:
    """The objective to minimise (`loss`, a scalar tensor), its named terms and cells seen. A term is a float or a
    detached scalar tensor left where it was computed: reading it on the host would make a GPU step wait for the
    device (the training loop reads terms at reports only)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor | float] = field(default_factory=dict)
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
