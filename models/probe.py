"""A linear or MLP classifier of cell labels (e.g. cell type) on embeddings or expression."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import DataSummary, Loss, dense_x, obs_codes


@dataclass(frozen=True)
class ProbeConfig:
    n_input: int = 0  # input width; 0: filled in from the data
    n_classes: int = 0  # categories of label_key (+1 for missing); filled in from the store's obs schema
    label_key: str = "cell_type"
    input_key: str = "X"  # "X" (expression after the transforms) or an embedding key in the batch
    n_hidden: int = 0  # 0: linear probe
    dropout: float = 0.0
    log1p: bool = True  # log1p the input first (raw counts in X)

    def resolve(self, data: DataSummary) -> ProbeConfig:
        """Fill in the input width and the label's categories from the data."""
        return dataclasses.replace(
            self,
            n_input=self.n_input or data.n_genes,
            n_classes=self.n_classes or data.n_categories(self.label_key, "label_key"),
        )

    def obs_keys(self) -> tuple[str, ...]:
        return (self.label_key,)

    @classmethod
    def debug(cls, n_input: int = 64, n_classes: int = 4, **kw) -> ProbeConfig:
        """A few thousand parameters: unit tests."""
        return cls(**{"n_input": n_input, "n_classes": n_classes, "n_hidden": 16, **kw})

    @classmethod
    def small(cls, **kw) -> ProbeConfig:
        """A one-hidden-layer classifier that trains in seconds on 2 CPU cores; sizes from the data."""
        return cls(**{"n_hidden": 128, "dropout": 0.1, **kw})


class Probe(nn.Module):
    Config = ProbeConfig

    def __init__(self, config: ProbeConfig):
        super().__init__()
        if config.n_input < 1 or config.n_classes < 2:
            raise ValueError("ProbeConfig.n_input (>= 1) and n_classes (>= 2) must be set before building the model")
        self.config = c = config
        if c.n_hidden:
            self.net = nn.Sequential(
                nn.Linear(c.n_input, c.n_hidden), nn.ReLU(), nn.Dropout(c.dropout), nn.Linear(c.n_hidden, c.n_classes)
            )
        else:
            self.net = nn.Linear(c.n_input, c.n_classes)

    def _input(self, batch: dict) -> torch.Tensor:
        x = dense_x(batch) if self.config.input_key == "X" else batch[self.config.input_key].float()
        return torch.log1p(x.clamp(min=0)) if self.config.log1p else x

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net(self._input(batch))

    def loss(self, batch: dict, step: int | None = None) -> Loss:
        logits = self(batch).float()
        y = obs_codes(batch, self.config.label_key, self.config.n_classes)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean().detach()
        return Loss(loss, {"accuracy": acc}, n_cells=y.shape[0])

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        """Class probabilities, one row per cell."""
        return torch.softmax(self(batch).float(), dim=-1)
