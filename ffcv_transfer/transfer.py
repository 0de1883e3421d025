"""Transfer of source models to the target task, and what the store records per target test example:
margin (correct-class logit minus the largest other), correctness and prediction.

Mode here: `cached_features`: each backbone in eval mode, features of the target train and test sets
computed once (one pass of each loader for all K models), then a linear head fitted on them. Far
cheaper than the reference fixed-feature transfer (which trains the head through the frozen backbone
with augmentation and BatchNorm in train mode): a documented change of semantics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadConfig:
    weight_decay: float = 5e-4
    max_iter: int = 200  # L-BFGS iterations on the full (cached) training features


@dataclass
class TransferOutputs:
    margins: torch.Tensor  # (T,) float32
    is_correct: torch.Tensor  # (T,) bool
    predictions: torch.Tensor  # (T,) int64
    accuracy: float


def margins_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Correct-class logit minus the largest other logit (> 0 iff the prediction is right, barring ties)."""
    correct = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], -torch.inf)
    return correct - others.max(1).values


@torch.no_grad()
def extract_features(models: Sequence[nn.Module], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Penultimate features of every model over one pass of `batches`: ([K x (N, D)], labels (N,))."""
    for model in models:
        model.eval()
    features: list[list[torch.Tensor]] = [[] for _ in models]
    labels = []
    for images, batch_labels in batches:
        for k, model in enumerate(models):
            features[k].append(model.features(images).float())
        labels.append(batch_labels)
    return [torch.cat(f) for f in features], torch.cat(labels)


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, config: HeadConfig) -> nn.Module:
    """Multinomial logistic regression on standardised features, L2-penalised, by full-batch L-BFGS."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    linear = nn.Linear(features.shape[1], num_classes).to(features.device)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=config.max_iter, line_search_fn="strong_wolfe")
    standardised = (features - mean) / std

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(standardised), labels) + config.weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return nn.Sequential(_Standardise(mean, std), linear)


class _Standardise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def transfer_cached_features(models: Sequence[nn.Module], train_batches: Iterable, test_batches: Iterable,
                             num_classes: int, config: HeadConfig = HeadConfig()) -> list[TransferOutputs]:
    """Fit a linear head per model on its cached target-train features; outputs on the target test set."""
    train_features, train_labels = extract_features(models, train_batches)
    test_features, test_labels = extract_features(models, test_batches)
    outputs = []
    for train_k, test_k in zip(train_features, test_features):
        head = fit_linear_head(train_k, train_labels, num_classes, config)
        with torch.no_grad():
            logits = head(test_k)
        predictions = logits.argmax(1)
        is_correct = predictions == test_labels
        outputs.append(TransferOutputs(margins_of(logits, test_labels), is_correct, predictions,
                                       float(is_correct.float().mean())))
    return outputs
