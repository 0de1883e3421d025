"""The fused loop: K source models trained in lockstep on one shared stream of batches.

Each batch is routed to the models whose class mask holds each example's class, so every model sees
each of its examples exactly once per epoch while decoding is paid once for all K. Per model: SGD with
momentum, weight decay on non-BatchNorm parameters, a cyclic learning rate stepped per iteration,
label smoothing, its own BatchNorm statistics, and mixed precision. Models keep full C-way heads
(labels stay global); accuracy on a model's own classes ignores the logits of the others.

Masks over source *examples* instead of classes (example-level influence): pass `example_labels` (the
label of each of the E examples the (K, E) masks cover) and give batches a third element, each example's
index in the beton (`ImageLoader(..., with_indices=True)`); routing then keys on that index while the
loss still uses the labels. Accuracy counts a model's classes as those it has any example of.

Routing happens on the host, on the batch's labels (or indices) as the loaders deliver them there too
(data.Batch.host): the step loop makes no device-to-host sync per batch, one per epoch for the losses.

Per-model batches (`per_model_batch` > 0, the sequential fusion): each model's rows of every shared batch
are appended to its own queue, and the model steps whenever the queue holds `per_model_batch` rows, so
every step of every model is exactly the reference's batch whatever the model's share of the classes,
each model's learning rate follows its own steps (of `examples_per_epoch[k] // per_model_batch` an
epoch), and each model sees each of its examples once per epoch, but for the rows left in its queue at
the epoch's end (fewer than a batch), which are dropped as the reference's per-model loaders drop their
last partial batch. Without it each model steps on its part of every shared batch (sizes vary with the
model's mask density).

`LockstepTrainer.fit` is the whole run (the epoch loop with the resolution schedule); each fusion's
`train_epoch` is the step loop: here `sequential` (the K models one after another on their
sub-batches, or on their queued per-model batches), in grouped.py `grouped` (one grouped network).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ffcv_transfer.engine.data import Batch, Loader, to_device
from ffcv_transfer.settings import OptimConfig, SourceConfig

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # settings.PRECISIONS


def resolution_at(
    epoch: int, start: int, end: int, start_ramp: int, end_ramp: int, step: int = 32, rounding: str = "down"
) -> int:
    """Progressive resizing: `start` px until start_ramp, linear to `end` px at end_ramp, rounded down
    (ffcv-imagenet) or to the nearest (MadryLab/data-transfer) multiple of `step`, kept within start..end."""
    if start == end:
        return start
    value = np.interp(epoch, [start_ramp, end_ramp], [start, end]) / step
    value = int(np.floor(value) if rounding == "down" else np.round(value)) * step
    return int(np.clip(value, min(start, end), max(start, end)))


def source_resolution(config: SourceConfig) -> Callable[[int], int]:
    """The source recipe's resolution schedule: epoch -> pixels."""
    return lambda epoch: resolution_at(
        epoch, config.min_res, config.max_res, config.start_ramp, config.end_ramp, rounding=config.ramp_rounding
    )


def lr_at(epoch: float, config: OptimConfig) -> float:
    """Cyclic: linear from 0 to the peak at lr_peak_epoch, then linear down to 0 at the end. Step: lr,
    times lr_gamma after every lr_step_size whole epochs (torch's StepLR stepped once an epoch)."""
    if config.lr_schedule == "step":
        return float(config.lr * config.lr_gamma ** (int(epoch) // config.lr_step_size))
    return float(np.interp(epoch, [0.0, config.lr_peak_epoch, config.epochs], [0.0, config.lr, 0.0]))


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Weight decay on every trainable parameter, BatchNorm's only with config.bn_weight_decay."""
    weight_decay = config.weight_decay
    batchnorm = (
        set()
        if config.bn_weight_decay
        else {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if id(p) not in batchnorm]
    no_decay = [p for p in trainable if id(p) in batchnorm]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@contextmanager
def cudnn_autotune(enabled: bool) -> Iterator[None]:
    """torch.backends.cudnn.benchmark set to `enabled` for what runs inside, the previous setting restored
    after: on for training steps of static shapes (each shape's fastest convolution is searched for once),
    off for passes whose batch sizes vary (each new shape would be searched for again). No effect off CUDA."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def refuse_silent_eager(graphs: int = 64) -> None:
    """Let dynamo keep `graphs` graphs per code object (at least; the default is 8, and one process may
    compile several model shapes at several resolutions) and make a compiled forward that still hits the
    limit raise, instead of running eager from then on without a word (dynamo's default)."""
    from torch import _dynamo

    _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, graphs)
    _dynamo.config.fail_on_recompile_limit_hit = True


def momentum_sgd(model: nn.Module, config: OptimConfig, device: str | torch.device) -> torch.optim.SGD:
    """SGD with momentum over `param_groups`, its learning rate set per step. Fused on CUDA and under
    fp16: the fused step takes the gradient scaler's inf check on the device, where the unfused one reads
    it back with .item() (a host sync every step); one kernel per step instead of one per parameter."""
    fused = torch.device(device).type == "cuda" or config.precision == "fp16"
    return torch.optim.SGD(param_groups(model, config), lr=0.0, momentum=config.momentum, fused=fused)


class LockstepTrainer:
    """What the fusions share: K models, their masks, the step count, failures.

    `masks` (K, C) holds each model's classes; with `example_labels` (E,), `masks` (K, E) holds its examples
    instead: batches must carry each example's index as a third element, and `class_masks` (K, C) becomes
    the classes each model has examples of."""

    def __init__(
        self,
        models: list[nn.Module],
        masks: np.ndarray,
        config: OptimConfig,
        steps_per_epoch: int,
        device: str | torch.device = "cpu",
        example_labels: np.ndarray | None = None,
    ):
        masks = np.asarray(masks, bool)
        if masks.ndim != 2 or len(masks) != len(models):
            raise ValueError(f"need one mask row per model: {len(models)} models, masks {masks.shape}")
        self.models, self.config, self.steps_per_epoch = models, config, steps_per_epoch
        self.device = torch.device(device)
        self.masks = masks  # (K, C), or (K, E) over examples: what routing keys on
        self.by_example = example_labels is not None
        self.class_masks = masks  # (K, C): the classes each model has examples of
        if self.by_example:
            example_labels = np.asarray(example_labels, np.int64)
            if example_labels.shape != (masks.shape[1],):
                raise ValueError(f"example masks {masks.shape} need one label per example, got {example_labels.shape}")
            num_classes = int(example_labels.max()) + 1 if len(example_labels) else 0
            self.class_masks = np.zeros((len(models), num_classes), bool)
            for k, row in enumerate(masks):
                self.class_masks[k, example_labels[row]] = True
        # whole batches for every model, no routing: with masks over every class (or every example)
        self.takes_everything = {False: bool(self.masks.all()), True: bool(self.class_masks.all())}  # by by_class
        self.failed: dict[int, str] = {}
        self.step = 0
        self.examples_seen = np.zeros(len(models), np.int64)  # over every epoch so far

    def members(self, batch: tuple[torch.Tensor, ...], by_class: bool = False) -> np.ndarray:
        """(K, B) bool on the host: which models train on each example of `batch`, keyed on its labels (with
        example masks, on its example indices; `by_class`: its labels against the classes each model has).
        The keys come from data.Batch.host, or for batches without them are copied off the device (a sync
        on a GPU)."""
        column = 2 if self.by_example and not by_class else 1
        if len(batch) <= column:
            raise ValueError(
                "example masks route on example indices: batches need a third element "
                "(ImageLoader(..., with_indices=True))"
            )
        host = getattr(batch, "host", None)
        keys = host[column - 1] if host is not None else batch[column].cpu().numpy()
        return (self.class_masks if by_class else self.masks)[:, keys]

    def routes(self, batch: tuple[torch.Tensor, ...], by_class: bool = False) -> list[torch.Tensor | slice]:
        """For each model, the positions in the batch of its examples (`by_class`: see members), as views of
        one device tensor copied once per batch (the whole batch when every model takes every example)."""
        if self.takes_everything[by_class]:
            return [slice(None)] * len(self.models)
        member = self.members(batch, by_class)
        _, positions = np.nonzero(member)  # row-major: model 0's positions in batch order, then model 1's, ...
        return list(to_device(positions, self.device).split(member.sum(1).tolist()))

    def fit(
        self,
        batches: Loader,
        epochs: int,
        resolution: Callable[[int], int] | None = None,
        on_epoch: Callable[[str], None] = lambda stage: None,
        stage: str = "epoch",
    ) -> None:
        """The whole run: `epochs` passes over `batches` (an iterable that makes a new epoch each time it is
        iterated), each at `resolution(epoch)` pixels when given (`batches.set_resolution`), reporting
        "STAGE e/EPOCHS" to `on_epoch` after each; the learning rate follows the step count (lr_at). With
        per-model batches every step has one shape per resolution, so cuDNN autotunes them (`cudnn_autotune`)."""
        with cudnn_autotune(bool(self.config.per_model_batch)):
            for epoch in range(epochs):
                if resolution is not None:
                    batches.set_resolution(resolution(epoch))
                self.train_epoch(batches, epoch)
                on_epoch(f"{stage} {epoch + 1}/{epochs}")
        own = "examples" if self.by_example else "classes' examples"
        why = (
            f"fewer of its {own} in an epoch than one per-model batch ({self.config.per_model_batch})"
            if self.config.per_model_batch
            else f"no batch held one of its {own} (batches of {self.config.batch_size}; the last incomplete one "
            "is dropped)"
        )
        for k in np.flatnonzero(self.examples_seen == 0):  # e.g. fewer examples than one batch, dropped as the last
            self.failed.setdefault(int(k), f"no training step: {why}")

    def train_epoch(self, batches: Iterable[Batch], epoch: int) -> list[float]:
        """One pass (the step loop): each fusion's own."""
        raise NotImplementedError

    def autocast(self) -> torch.autocast:
        dtype = AUTOCAST_DTYPES[self.config.precision]
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    @torch.no_grad()
    @cudnn_autotune(False)  # routed sub-batches of every size: nothing to gain from a search per shape
    def accuracy(self, batches: Loader, among_own: bool = True) -> list[float]:
        """Each model's accuracy on its own classes' examples, choosing among its classes or, with
        `among_own` false, among every logit (source.val_accuracy; MadryLab/data-transfer measures it so).
        Routed on the host like training: one sync at the end."""
        correct = torch.zeros(len(self.models), device=self.device)
        counts = torch.zeros(len(self.models), device=self.device)
        others = ~torch.as_tensor(self.class_masks, device=self.device)
        for model in self.models:
            model.eval()
        for batch in batches:
            images, labels = batch[0], batch[1]
            for k, (model, rows) in enumerate(zip(self.models, self.routes(batch, by_class=True))):
                if not isinstance(rows, slice) and len(rows) == 0:
                    continue
                with self.autocast():
                    logits = model(images[rows]).float()
                if among_own:
                    logits = logits.masked_fill(others[k], -torch.inf)
                correct[k] += (logits.argmax(1) == labels[rows]).sum()
                counts[k] += len(logits)
        return (correct / counts.clamp_min(1)).tolist()

    def _mean_losses(self, loss_sums: torch.Tensor, counts: torch.Tensor, epoch: int) -> list[float]:
        """Each model's mean loss over the epoch; a non-finite one marks the model failed."""
        means = (loss_sums / counts.clamp_min(1)).tolist()
        self.examples_seen += counts.cpu().numpy().astype(np.int64)
        for k, mean in enumerate(means):
            if k not in self.failed and not np.isfinite(mean):
                self.failed[k] = f"non-finite loss at epoch {epoch}"
        return means


class SequentialTrainer(LockstepTrainer):
    """The `sequential` fusion: each batch is routed, then the K models step one after another on their
    sub-batches, or on their queued per-model batches, each with its own optimiser (and gradient scaler for
    fp16). `examples_per_epoch` (K,): each model's examples in one pass of the loader, which sets its steps
    per epoch with per_model_batch. `compile` (settings.COMPILE_MODES, with per_model_batch): each model's
    forward torch.compiled for its static batch shape."""

    def __init__(
        self,
        models: list[nn.Module],
        masks: np.ndarray,
        config: OptimConfig,
        steps_per_epoch: int,
        device: str | torch.device = "cpu",
        example_labels: np.ndarray | None = None,
        examples_per_epoch: Sequence[int] | None = None,
        compile: str = "none",
    ):
        super().__init__(models, masks, config, steps_per_epoch, device, example_labels)
        if compile != "none" and not config.per_model_batch:
            raise ValueError("compiling the sequential step needs per_model_batch: static batch shapes")
        # one graph per resolution, shared by the K models (dynamic=False: the per-model batch never changes
        # size; dynamo passes each model's parameters as the graph's inputs)
        if compile != "none":
            refuse_silent_eager()
        self.forwards = (
            models
            if compile == "none"
            else [
                torch.compile(model, mode=None if compile == "default" else compile, dynamic=False) for model in models
            ]
        )
        self.optimizers = [momentum_sgd(m, config, self.device) for m in models]
        self.scalers = [torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16") for _ in models]
        self.model_steps = np.zeros(len(models), np.int64)
        self.loss_sums = torch.zeros(len(models), device=self.device)  # of the current epoch, per model
        self.counts = torch.zeros(len(models), device=self.device)
        if config.per_model_batch:
            if examples_per_epoch is None or len(examples_per_epoch) != len(models):
                raise ValueError("per_model_batch needs examples_per_epoch: each model's examples in one pass")
            self.steps_per_epoch_of = np.maximum(np.asarray(examples_per_epoch) // config.per_model_batch, 1)

    def train_epoch(self, batches: Iterable[Batch], epoch: int) -> list[float]:
        """One pass over `batches` (images already normalised, on the device); returns each model's
        mean loss. A model whose loss turns NaN/inf is recorded in `failed` and trained no further."""
        self.loss_sums.zero_()
        self.counts.zero_()
        for model in self.models:
            model.train()
        size = self.config.per_model_batch
        queues = [RowQueue() for _ in self.models]
        for batch in batches:
            images, labels = batch[0], batch[1]
            lr = lr_at(self.step / self.steps_per_epoch, self.config)
            for k, rows in enumerate(self.routes(batch)):
                if k in self.failed:
                    continue
                if not size:
                    self.step_model(k, images[rows], labels[rows], lr)
                    continue
                queues[k].append(images[rows], labels[rows])
                while queues[k].count >= size:
                    self.step_model(
                        k, *queues[k].take(size), lr_at(self.model_steps[k] / self.steps_per_epoch_of[k], self.config)
                    )
            self.step += 1
        return self._mean_losses(self.loss_sums, self.counts, epoch)  # a queue's remainder is dropped

    def step_model(self, k: int, images: torch.Tensor, labels: torch.Tensor, lr: float) -> None:
        """One SGD step of model k on (images, labels) at learning rate lr; its loss summed for the epoch."""
        if len(labels) == 0:
            return
        optimizer, scaler = self.optimizers[k], self.scalers[k]
        for group in optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            loss = F.cross_entropy(self.forwards[k](images), labels, label_smoothing=self.config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        self.loss_sums[k] += loss.detach().float() * len(labels)  # checked once per epoch: no sync per step
        self.counts[k] += len(labels)
        self.model_steps[k] += 1


class RowQueue:
    """One model's routed rows waiting for its step: appended per shared batch, taken a batch at a time."""

    def __init__(self):
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.count = 0

    def append(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images.append(images)
        self.labels.append(labels)
        self.count += len(labels)

    def take(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `size` rows (images, labels), in arrival order."""
        images, labels = torch.cat(self.images), torch.cat(self.labels)
        self.images, self.labels, self.count = [images[size:]], [labels[size:]], self.count - size
        return images[:size], labels[:size]
