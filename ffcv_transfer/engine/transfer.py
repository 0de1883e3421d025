"""Transfer of source models to the target task, and what the store records per target test example:
margin (correct-class logit minus the largest other), correctness, prediction, and, as the reference
(MadryLab/data-transfer) records them, the softmax probability of the correct class and the raw
correct-class logit.

Modes (`transfer.mode`):
- `fixed_feature` (the reference): a new linear head trained through the frozen backbone with SGD on
  augmented target images, BatchNorm in train mode (its running statistics adapt to the target).
- `full_finetune`: a new head and every backbone parameter trained on the target.
- `cached_features`: each backbone in eval mode, target train and test features computed once, a linear
  head fitted on them by L-BFGS. Far cheaper, but a change of semantics: no augmentation, no BatchNorm
  adaptation, an exactly optimised head.
All K models share each pass of the target loaders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ffcv_transfer.engine.data import Batch, Loader
from ffcv_transfer.engine.train import SequentialTrainer
from ffcv_transfer.settings import TransferConfig


@dataclass
class TransferOutputs:
    margins: torch.Tensor  # (T,) float32
    is_correct: torch.Tensor  # (T,) bool
    predictions: torch.Tensor  # (T,) int64
    p_correct: torch.Tensor  # (T,) float32: softmax probability of the correct class
    correct_logit: torch.Tensor  # (T,) float32
    accuracy: float  # top-1
    mean_class_accuracy: float  # the mean over target classes of each class's accuracy


def margins_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Correct-class logit minus the largest other logit (> 0 iff the prediction is right, barring ties)."""
    correct = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], -torch.inf)
    return correct - others.max(1).values


def outputs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> TransferOutputs:
    logits = logits.float()
    predictions = logits.argmax(1)
    is_correct = predictions == labels
    p_correct = logits.softmax(1).gather(1, labels[:, None])[:, 0]
    per_class = torch.zeros(int(labels.max()) + 1, device=labels.device).index_add_(0, labels, is_correct.float())
    counts = torch.bincount(labels, minlength=len(per_class)).float()
    mean_class = float((per_class[counts > 0] / counts[counts > 0]).mean())
    return TransferOutputs(
        margins_of(logits, labels),
        is_correct,
        predictions,
        p_correct,
        logits.gather(1, labels[:, None])[:, 0],
        float(is_correct.float().mean()),
        mean_class,
    )


@torch.no_grad()
def _one_pass(
    models: Sequence[nn.Module],
    batches: Iterable[Batch],
    apply: Callable[[nn.Module, torch.Tensor], torch.Tensor],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    for model in models:
        model.eval()
    results: list[list[torch.Tensor]] = [[] for _ in models]
    labels = []
    for images, batch_labels in batches:
        for k, model in enumerate(models):
            results[k].append(apply(model, images).float())
        labels.append(batch_labels)
    return [torch.cat(r) for r in results], torch.cat(labels)


def extract_features(models: Sequence[nn.Module], batches: Iterable[Batch]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Penultimate features of every model over one pass of `batches`: ([K x (N, D)], labels (N,))."""
    return _one_pass(models, batches, lambda model, images: model.features(images))


def fit_linear_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int
) -> nn.Module:
    """Multinomial logistic regression on standardised features, L2-penalised, by full-batch L-BFGS."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    linear = nn.Linear(features.shape[1], num_classes).to(features.device)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")
    standardised = (features - mean) / std

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(standardised), labels) + weight_decay * linear.weight.square().sum()
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


def transfer_cached_features(
    models: Sequence[nn.Module],
    train_batches: Loader,
    test_batches: Loader,
    num_classes: int,
    config: TransferConfig,
) -> list[TransferOutputs]:
    """Fit a linear head per model on its cached target-train features; outputs on the target test set."""
    train_features, train_labels = extract_features(models, train_batches)
    test_features, test_labels = extract_features(models, test_batches)
    outputs = []
    for train_k, test_k in zip(train_features, test_features):
        head = fit_linear_head(train_k, train_labels, num_classes, config.weight_decay, config.head_max_iter)
        with torch.no_grad():
            outputs.append(outputs_from_logits(head(test_k), test_labels))
    return outputs


def transfer_by_training(
    models: Sequence[nn.Module],
    train_batches: Loader,
    test_batches: Loader,
    num_classes: int,
    config: TransferConfig,
    steps_per_epoch: int,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[str], None] = lambda stage: None,
    examples_per_epoch: int | None = None,
    compile: str = "none",
) -> tuple[list[TransferOutputs], dict[int, str]]:
    """fixed_feature or full_finetune: replace each model's head with a new `num_classes`-way linear layer
    and train all K in lockstep on the same target batches (`on_epoch` hears of each pass; with
    config.per_model_batch, `examples_per_epoch` is the training examples in one pass, and `compile`
    (settings.COMPILE_MODES) compiles each model's training forward, frozen backbone included, for its
    static batch). Returns the test outputs and the models whose loss diverged (index -> reason)."""
    if config.mode == "cached_features":
        raise ValueError("transfer_by_training trains the head: use transfer_cached_features for cached_features")
    for model in models:
        model.requires_grad_(config.mode == "full_finetune")
        model.fc = nn.Linear(model.fc.in_features, num_classes).to(device)  # trainable
    every_class = np.ones((len(models), num_classes), bool)
    trainer = SequentialTrainer(
        list(models),
        every_class,
        config,
        steps_per_epoch,
        device=device,
        compile=compile,
        examples_per_epoch=None if examples_per_epoch is None else [examples_per_epoch] * len(models),
    )
    trainer.fit(train_batches, config.epochs, on_epoch=on_epoch, stage="transfer epoch")
    logits, labels = _one_pass(models, test_batches, lambda model, images: _logits(model, images, trainer))
    return [outputs_from_logits(logit, labels) for logit in logits], trainer.failed


def _logits(model: nn.Module, images: torch.Tensor, trainer: SequentialTrainer) -> torch.Tensor:
    with trainer.autocast():
        return model(images)
