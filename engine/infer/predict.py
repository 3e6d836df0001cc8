"""What a model writes per cell: its embedding and, for a model with a classifier head, predictions.

A classifier head is a model whose config names a `label_key` with `n_classes` (the probe; any model that
trains a label the same way). Its class probabilities are `predict_proba(batch)` when the model defines it,
else the softmax of `model(batch)` (the logits). The last class is the slot training used for cells without a
label (models.base.obs_codes); a cell predicted there gets a missing `cellray_pred`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OBSM_KEY = "X_cellray"  # the embedding
PRED_KEY = "cellray_pred"  # obs: the predicted label (categorical in the training categories)
PRED_PROB_KEY = "cellray_pred_prob"  # obs: its probability
PROBA_KEY = "cellray_pred_proba"  # obsm: every class's probability (columns: uns['cellray']['classes'])
UNLABELLED = "(unlabelled)"  # the name of the class slot that stands for "no label" in training


@dataclass(frozen=True)
class Head:
    """A classifier head: the obs column it predicts and the training categories of its classes."""

    label_key: str
    categories: list[str]  # the label's training categories; the model has len(categories) + 1 classes

    @property
    def classes(self) -> list[str]:
        return [*self.categories, UNLABELLED]


def classifier_head(model, categories: dict[str, list[str] | None]) -> Head | None:
    """The model's classifier head, if it has one (config.label_key and config.n_classes)."""
    config = getattr(model, "config", None)
    key = getattr(config, "label_key", None)
    n_classes = int(getattr(config, "n_classes", 0) or 0)
    if key is None or n_classes < 2:
        return None
    cats = categories.get(key) or []
    if len(cats) != n_classes - 1:  # the categories are unknown: name the classes by index
        cats = [str(i) for i in range(n_classes - 1)]
    return Head(key, list(cats))


def probabilities(model, batch):
    """Class probabilities (cells x classes) as a float32 tensor."""
    import torch

    if hasattr(model, "predict_proba"):
        return model.predict_proba(batch).float()
    return torch.softmax(model(batch).float(), dim=-1)


def predictions(proba: np.ndarray, n_categories: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, probability) of the most likely class; the unlabelled slot becomes code -1 (missing)."""
    codes = proba.argmax(axis=1)
    prob = proba[np.arange(len(codes)), codes].astype(np.float32)
    codes = np.where(codes >= n_categories, -1, codes).astype(np.int64)
    return codes, prob
