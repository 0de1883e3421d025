"""The fused loop: K source models trained in lockstep on one shared stream of batches.

Each batch is routed to the models whose class mask holds each example's class, so every model sees
each of its examples exactly once per epoch while decoding is paid once for all K. Per model: SGD with
momentum, weight decay on non-BatchNorm parameters, a cyclic learning rate stepped per iteration,
label smoothing, its own BatchNorm statistics, and mixed precision. Models keep full C-way heads
(labels stay global); accuracy on a model's own classes ignores the logits of the others.

Backend here: `sequential` (the K models one after another on their sub-batches).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class OptimConfig:
    """Defaults: the reference ImageNet recipe (MadryLab/data-transfer)."""

    epochs: int = 16
    lr: float = 0.5
    lr_peak_epoch: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    precision: str = "bf16"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 0 <= self.lr_peak_epoch <= self.epochs:
            raise ValueError(f"lr_peak_epoch {self.lr_peak_epoch} must lie in 0..epochs ({self.epochs})")


def lr_at(epoch: float, config: OptimConfig) -> float:
    """Cyclic schedule: linear from 0 to the peak at lr_peak_epoch, then linear down to 0 at the end."""
    return float(np.interp(epoch, [0.0, config.lr_peak_epoch, config.epochs], [0.0, config.lr, 0.0]))


def route(labels: torch.Tensor, membership: torch.Tensor) -> list[torch.Tensor]:
    """For each of K models, the positions in the batch of the examples whose class it trains on.
    membership: (K, C) bool; labels: (B,) int."""
    return [torch.nonzero(row, as_tuple=True)[0] for row in membership[:, labels]]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every parameter except BatchNorm's."""
    batchnorm = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters()}
    decay = [p for p in model.parameters() if id(p) not in batchnorm]
    no_decay = [p for p in model.parameters() if id(p) in batchnorm]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class FusedTrainer:
    """Train `models[k]` on the classes in `class_masks[k]` from one shared stream of batches."""

    def __init__(self, models: list[nn.Module], class_masks: np.ndarray, config: OptimConfig,
                 steps_per_epoch: int, device: str | torch.device = "cpu"):
        class_masks = np.asarray(class_masks, bool)
        if class_masks.ndim != 2 or len(class_masks) != len(models):
            raise ValueError(f"need one mask row per model: {len(models)} models, masks {class_masks.shape}")
        self.models, self.config, self.steps_per_epoch = models, config, steps_per_epoch
        self.device = torch.device(device)
        self.membership = torch.as_tensor(class_masks, device=self.device)
        self.optimizers = [torch.optim.SGD(param_groups(m, config.weight_decay), lr=0.0, momentum=config.momentum)
                           for m in models]
        self.scalers = [torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16") for _ in models]
        self.failed: dict[int, str] = {}
        self.step = 0

    def _autocast(self) -> torch.autocast:
        dtype = PRECISIONS[self.config.precision]
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def train_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], epoch: int) -> list[float]:
        """One pass over `batches` (images already normalised, on the device); returns each model's
        mean loss. A model whose loss turns NaN/inf is recorded in `failed` and trained no further."""
        loss_sums = torch.zeros(len(self.models), device=self.device)
        counts = torch.zeros(len(self.models), device=self.device)
        for model in self.models:
            model.train()
        for images, labels in batches:
            lr = lr_at(self.step / self.steps_per_epoch, self.config)
            for k, (model, optimizer, scaler, rows) in enumerate(
                    zip(self.models, self.optimizers, self.scalers, route(labels, self.membership))):
                if k in self.failed or len(rows) == 0:
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with self._autocast():
                    loss = F.cross_entropy(model(images[rows]), labels[rows],
                                           label_smoothing=self.config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sums[k] += loss.detach().float() * len(rows)  # checked once per epoch: no sync per step
                counts[k] += len(rows)
            self.step += 1
        means = (loss_sums / counts.clamp_min(1)).tolist()
        for k, mean in enumerate(means):
            if k not in self.failed and not np.isfinite(mean):
                self.failed[k] = f"non-finite loss at epoch {epoch}"
        return means

    @torch.no_grad()
    def accuracy(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        """Each model's accuracy on the examples of its own classes, choosing among its classes only."""
        correct = torch.zeros(len(self.models), device=self.device)
        counts = torch.zeros(len(self.models), device=self.device)
        for model in self.models:
            model.eval()
        for images, labels in batches:
            for k, (model, rows) in enumerate(zip(self.models, route(labels, self.membership))):
                if len(rows) == 0:
                    continue
                with self._autocast():
                    logits = model(images[rows]).float()
                logits[:, ~self.membership[k]] = -torch.inf
                correct[k] += (logits.argmax(1) == labels[rows]).sum()
                counts[k] += len(rows)
        return (correct / counts.clamp_min(1)).tolist()
