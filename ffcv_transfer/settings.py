"""Every experiment setting, one frozen dataclass per section, validated when it is made (so a bad value
is refused when the experiment loads, with the section and the setting named, not mid-run). Torch-free:
config.py builds the command line and the YAML loading from these fields, and `--help` imports no
training code. The stages read their section: models.py `model`, train.py `source`, transfer.py
`transfer`, data.py and resident.py `loader`, the worker `run`.

    data:       the four betons and the folder they are read from
    masks:      the models' random class subsets
    model:      ResNet-18 stem, width, BlurPool
    source:     the source recipe (batch, epochs, LR schedule, resolutions, crops, precision)
    transfer:   the transfer mode and the target recipe
    loader:     how batches are made (ffcv or device-resident), order, threads
    run:        device, models per process (K), how the K models are fused
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, replace
from pathlib import Path
from typing import Any

STEMS = ("imagenet", "small")
PRECISIONS = ("fp32", "bf16", "fp16")
DESIGNS = ("random", "orthogonal")
TRANSFER_MODES = ("fixed_feature", "full_finetune", "cached_features")
ORDERS = ("random", "quasi_random", "sequential")
THREADING_LAYERS = ("workqueue", "omp", "tbb")
LOADER_KINDS = ("ffcv", "resident")
FUSIONS = ("sequential", "grouped")  # how the K models of a process run on each batch (train.py, grouped.py)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
LR_SCHEDULES = ("cyclic", "step")
RAMP_ROUNDINGS = ("down", "nearest")  # of the resolution ramp, to a multiple of 32
VAL_ACCURACIES = ("own_classes", "all_classes")
TRAIN_CROPS = ("random_resized", "center")  # of target training images: the reference's RRC or cc decoders
METRICS = ("top1", "mean_per_class")  # a target's headline accuracy (the reference's, per target)
# per-channel (mean, std) of 0-255 pixels, as MadryLab/data-transfer's datasets.py has them; none: pixels / 255
NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def option(default: Any = MISSING, help: str = "", choices: Sequence[str] | None = None) -> Any:
    """A dataclass field with a description and its allowed values (what config.py declares)."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_target_name(name: str) -> None:
    """Target names go into store field names and folder names."""
    check(
        bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)),
        f"target name {name!r} must be letters, digits, '_', '.' or '-', starting with a letter or digit",
    )


@dataclass(frozen=True)
class DataConfig:
    source_train: str = option(help="source training beton")
    source_val: str = option(help="source validation beton (the models' own-class accuracy)")
    target_train: str = option(help="target training beton")
    target_test: str = option(help="target test beton (one store column per example)")
    target_name: str = option(
        "target", "the target's name (--target NAME; further targets: the experiment file's `targets:` list)"
    )
    root: str = option("", "folder that relative beton paths are read from (default: working directory)")

    def path(self, split: str) -> Path:
        return Path(self.root) / getattr(self, split)

    def __post_init__(self) -> None:
        check_target_name(self.target_name)


@dataclass(frozen=True)
class MaskConfig:
    num_models: int = option(64, "source models (rows of the store)")
    alpha: float = option(0.5, "fraction of the source classes in each model's training set")
    seed: int = option(0, "seed of the random subsets and of the models' initial weights")
    design: str = option(
        "random",
        "random: each model a uniform random subset (the paper); orthogonal: "
        "a two-level orthogonal design (num_models a power of two, alpha 0.5) in which "
        "every class is in exactly half the models and the classes are pairwise balanced",
        DESIGNS,
    )

    def __post_init__(self) -> None:
        check_choice("masks.design", self.design, DESIGNS)
        check(self.num_models >= 1, f"masks.num_models must be >= 1, got {self.num_models}")
        check(0 < self.alpha < 1, f"masks.alpha {self.alpha} must lie strictly between 0 and 1")
        if self.design == "orthogonal":
            check(self.alpha == 0.5, f"masks.design orthogonal needs masks.alpha 0.5, got {self.alpha}")
            check(
                self.num_models >= 4 and self.num_models & (self.num_models - 1) == 0,
                f"masks.design orthogonal needs masks.num_models a power of two >= 4, got {self.num_models}",
            )


@dataclass(frozen=True)
class ModelConfig:
    stem: str = option("imagenet", "imagenet: 7x7/2 conv + max-pool (128-224 px); small: 3x3/1 conv (16-64 px)", STEMS)
    width: float = option(1.0, "channel multiplier (1: the standard 64-128-256-512)")
    blurpool: bool = option(False, "anti-aliased strided convolutions, as in FFCV's recipe")

    def __post_init__(self) -> None:
        check_choice("model.stem", self.stem, STEMS)
        check(self.width > 0, f"model.width must be > 0, got {self.width}")


@dataclass(frozen=True)
class OptimConfig:
    """Defaults: the reference ImageNet recipe (MadryLab/data-transfer)."""

    batch_size: int = option(
        1024,
        "examples per shared batch: the decode batch of the one loader of the K models; "
        "without per_model_batch also each step's batch (each model steps on its classes' part)",
    )
    per_model_batch: int = option(
        0,
        "examples per step of each model (the reference's batch): the shared batches' "
        "rows queue per model and a model steps whenever its queue holds this many, the "
        "last partial batch of an epoch dropped; 0: each model steps on its part of every "
        "shared batch",
    )
    epochs: int = option(16, "passes over the data")
    lr: float = option(0.5, "peak learning rate of the cyclic schedule (the step schedule's first)")
    lr_peak_epoch: float = option(2.0, "epoch at which the linear warm-up reaches the peak")
    lr_schedule: str = option(
        "cyclic",
        "cyclic: linear up to the peak and down to 0; step: lr x lr_gamma every lr_step_size epochs",
        LR_SCHEDULES,
    )
    lr_step_size: int = option(10, "epochs between the step schedule's decays")
    lr_gamma: float = option(0.1, "the step schedule's decay factor")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-5, "L2 penalty on all parameters except BatchNorm's (see bn_weight_decay)")
    bn_weight_decay: bool = option(False, "apply weight_decay to BatchNorm's parameters too (the reference does)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy")
    precision: str = option("bf16", "autocast dtype (fp16 adds a gradient scaler)", PRECISIONS)

    section = "source"  # the name its settings go by in messages

    def __post_init__(self) -> None:
        s = self.section
        check_choice(f"{s}.precision", self.precision, PRECISIONS)
        check_choice(f"{s}.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check(
            self.lr_step_size >= 1 and 0 < self.lr_gamma <= 1,
            f"{s}.lr_step_size must be >= 1 and {s}.lr_gamma in (0, 1], got {self.lr_step_size} and {self.lr_gamma}",
        )
        check(
            self.batch_size >= 1 and self.epochs >= 1,
            f"{s}.batch_size and {s}.epochs must be >= 1, got {self.batch_size} and {self.epochs}",
        )
        check(self.per_model_batch >= 0, f"{s}.per_model_batch must be >= 0, got {self.per_model_batch}")
        check(
            0 <= self.lr_peak_epoch <= self.epochs,
            f"{s}.lr_peak_epoch {self.lr_peak_epoch} must lie in 0..{s}.epochs ({self.epochs})",
        )
        check(
            self.lr >= 0 and self.weight_decay >= 0,
            f"{s}.lr and {s}.weight_decay must be >= 0, got {self.lr} and {self.weight_decay}",
        )
        check(0 <= self.momentum < 1, f"{s}.momentum {self.momentum} must lie in [0, 1)")
        check(0 <= self.label_smoothing <= 1, f"{s}.label_smoothing {self.label_smoothing} must lie in [0, 1]")


@dataclass(frozen=True)
class SourceConfig(OptimConfig):
    """Source training: the optimiser recipe plus progressive resizing and augmentation."""

    min_res: int = option(160, "training resolution until start_ramp")
    max_res: int = option(192, "training resolution from end_ramp on")
    start_ramp: int = option(11, "epoch at which the resolution starts to grow")
    end_ramp: int = option(13, "epoch at which it reaches max_res")
    val_res: int = option(256, "resolution of the source validation images")
    val_crop_ratio: float = option(224 / 256, "centre-crop fraction of the shorter side for validation")
    crop_min_scale: float = option(0.08, "smallest area fraction of the random-resized crop (1: flips only)")
    ramp_rounding: str = option(
        "down",
        "resolutions during the ramp rounded down (ffcv-imagenet) or to the nearest multiple of 32 (the reference)",
        RAMP_ROUNDINGS,
    )
    val_accuracy: str = option(
        "own_classes",
        "source accuracy on the model's own classes' validation images, "
        "choosing among its classes (own_classes) or among every source class "
        "(all_classes, the reference)",
        VAL_ACCURACIES,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("source.ramp_rounding", self.ramp_rounding, RAMP_ROUNDINGS)
        check_choice("source.val_accuracy", self.val_accuracy, VAL_ACCURACIES)
        check(
            0 < self.crop_min_scale <= 1 and 0 < self.val_crop_ratio <= 1,
            f"source.crop_min_scale {self.crop_min_scale} and source.val_crop_ratio {self.val_crop_ratio} "
            "must lie in (0, 1]",
        )
        check(
            0 < self.min_res <= self.max_res and self.val_res > 0,
            f"source resolutions need 0 < min_res <= max_res and val_res > 0, got min_res {self.min_res}, "
            f"max_res {self.max_res}, val_res {self.val_res}",
        )
        check(
            0 <= self.start_ramp <= self.end_ramp,
            f"source.start_ramp {self.start_ramp} must lie in 0..source.end_ramp ({self.end_ramp})",
        )


@dataclass(frozen=True)
class TransferConfig(OptimConfig):
    """Defaults: the reference CIFAR-10 transfer (15 epochs, peak LR 0.1 at epoch 5, wd 5e-4, 224 px)."""

    mode: str = option(
        "fixed_feature",
        "how each source model is transferred; several, comma-separated (e.g. "
        "cached_features,fixed_feature), each transfer the same source models and are stored "
        "side by side, the first being what analyses read unless told --mode "
        f"({', '.join(TRANSFER_MODES)})",
    )
    resolution: int = option(224, "target images are resized (upsampled) to this many pixels")
    upsample_from: int = option(
        0,
        "decode target images at this many pixels and upsample them on the device, "
        "nearest-neighbour, to transfer.resolution (the reference's CIFAR: 32); 0: decode "
        "at transfer.resolution",
    )
    test_crop_ratio: float = option(
        1.0,
        "centre-crop fraction of the shorter side of target images in evaluation "
        "(the reference: 224/256 for most targets)",
    )
    normalization: str = option(
        "imagenet",
        f"per-channel statistics target images are normalised with ({', '.join(NORMALIZATIONS)}; none: pixels / 255)",
        tuple(NORMALIZATIONS),
    )
    crop_min_scale: float = option(
        0.08, "smallest area fraction of the random-resized crop when training the head (1: flips only)"
    )
    train_crop: str = option(
        "random_resized",
        "target training images: random-resized crops (crop_min_scale) or "
        "the evaluation's centre crop (test_crop_ratio), flipped at random either way",
        TRAIN_CROPS,
    )
    metric: str = option(
        "top1",
        "the target's headline accuracy: top-1, or the mean of the per-class accuracies "
        "(the reference's for Aircraft, Caltech, Flowers, Pets); both are stored",
        METRICS,
    )
    batch_size: int = option(
        512, "target examples per shared batch (the decode batch; without per_model_batch also each step's batch)"
    )
    epochs: int = option(15, "passes over the target training set (fixed_feature, full_finetune)")
    lr: float = option(0.1, "peak learning rate (fixed_feature, full_finetune)")
    lr_peak_epoch: float = option(5.0, "epoch of the learning-rate peak (fixed_feature, full_finetune)")
    weight_decay: float = option(5e-4, "L2 penalty (all modes; cached_features: on the head's weights)")
    head_max_iter: int = option(200, "L-BFGS iterations of the cached_features head")

    section = "transfer"

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.mode.split(","))

    def for_mode(self, mode: str) -> TransferConfig:
        """This recipe with the one mode `mode`."""
        return replace(self, mode=mode)

    def __post_init__(self) -> None:
        super().__post_init__()
        for mode in self.modes:
            check_choice("transfer.mode", mode, TRANSFER_MODES)
        check(len(set(self.modes)) == len(self.modes), f"transfer.mode {self.mode!r} names a mode twice")
        check(
            self.resolution > 0 and self.head_max_iter >= 1,
            f"transfer.resolution and transfer.head_max_iter must be >= 1, got {self.resolution} and "
            f"{self.head_max_iter}",
        )
        check(0 < self.crop_min_scale <= 1, f"transfer.crop_min_scale {self.crop_min_scale} must lie in (0, 1]")
        check(0 < self.test_crop_ratio <= 1, f"transfer.test_crop_ratio {self.test_crop_ratio} must lie in (0, 1]")
        check(
            0 <= self.upsample_from <= self.resolution,
            f"transfer.upsample_from {self.upsample_from} must lie in 0..transfer.resolution ({self.resolution})",
        )
        check_choice("transfer.normalization", self.normalization, NORMALIZATIONS)
        check_choice("transfer.train_crop", self.train_crop, TRAIN_CROPS)
        check_choice("transfer.metric", self.metric, METRICS)


@dataclass(frozen=True)
class Target:
    """One target of an experiment: its name, its two betons (relative to data.root) and its transfer
    recipe. The first is data.target_* with the transfer section; further ones come from the experiment
    file's `targets:` list (config.py)."""

    name: str
    train: str
    test: str
    transfer: TransferConfig

    def path(self, root: str, split: str) -> Path:
        """The beton of `split`, "target_train" or "target_test"."""
        return Path(root) / {"target_train": self.train, "target_test": self.test}[split]


@dataclass(frozen=True)
class LoaderConfig:
    kind: str = option(
        "ffcv",
        "ffcv: decode every epoch; resident: the beton's pixels held in device memory, "
        "crops and flips on the device (low resolution, one image size)",
        LOADER_KINDS,
    )
    num_workers: int = option(
        0, "decoding threads; 0: every core beside a CPU device, all but 2 beside a CUDA device (the training thread's)"
    )
    order: str = option(
        "random", "example order; quasi_random (with os_cache false) for betons larger than memory", ORDERS
    )
    os_cache: bool = option(True, "read the beton through the OS page cache (it fits in memory)")
    drop_last: bool = option(True, "drop the last incomplete training batch")
    seed: int | None = option(None, "seed of the example order (flips stay random)")
    threading: str = option(
        "workqueue",
        "numba threading layer of the decoding threads, one per process, fixed "
        "by the first loader (docs/engine.md#loaders)",
        THREADING_LAYERS,
    )

    def __post_init__(self) -> None:
        check_choice("loader.kind", self.kind, LOADER_KINDS)
        check_choice("loader.order", self.order, ORDERS)
        check_choice("loader.threading", self.threading, THREADING_LAYERS)
        check(self.num_workers >= 0, f"loader.num_workers must be >= 0, got {self.num_workers}")
        check(
            not (self.order == "quasi_random" and self.os_cache),
            "loader.order quasi_random needs loader.os_cache false (ffcv pages the beton itself)",
        )


@dataclass(frozen=True)
class RunConfig:
    device: str = option("cpu", "cpu, cuda or cuda:N (one device per worker process)")
    models_per_process: int = option(8, "K: source models trained in lockstep on one shared loader")
    fusion: str = option(
        "sequential", "how the K models run on each batch: one after another, or as one grouped network", FUSIONS
    )
    compile: str = option(
        "none",
        "torch.compile the training step (reduce-overhead: with CUDA graphs), static "
        "shapes: the grouped network, or each model of the sequential fusion with "
        "source.per_model_batch; the fixed_feature and full_finetune transfer steps too where "
        "transfer.per_model_batch is set (else they run eager)",
        COMPILE_MODES,
    )
    checkpoints: bool = option(
        False,
        "keep each source model's weights (bf16, STORE/checkpoints/ROW.pt; about "
        "23 MB for a ResNet-18) for `ffcv-transfer transfer`",
    )

    def __post_init__(self) -> None:
        check_choice("run.fusion", self.fusion, FUSIONS)
        check_choice("run.compile", self.compile, COMPILE_MODES)
        check(self.models_per_process >= 1, f"run.models_per_process must be >= 1, got {self.models_per_process}")
        kind, _, index = self.device.partition(":")
        check(
            kind in ("cpu", "cuda") and (not index or (kind == "cuda" and index.isdigit())),
            f"run.device {self.device!r} is not cpu, cuda or cuda:N",
        )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "masks": MaskConfig,
    "model": ModelConfig,
    "source": SourceConfig,
    "transfer": TransferConfig,
    "loader": LoaderConfig,
    "run": RunConfig,
}
RENAMED = {"run.backend": "run.fusion", "loader.backend": "loader.kind"}  # older experiment files still load
