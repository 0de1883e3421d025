"""The `grouped` fusion (HFTA-style): the K models become one network whose convolutions have
K times the groups, whose BatchNorm keeps per-model statistics, and whose head is a batched matmul, so
each step is one forward and one backward instead of K.

Each model still sees exactly its own classes' examples: the sub-batches are padded to the longest and
stacked along channels (model k's images in channel block k); a per-example weight marks the real ones,
and BatchNorm statistics and losses count only those. With SGD (elementwise, with the same learning
rate for all), one optimiser over the stacked parameters equals K separate optimisers. The models agree
with the sequential fusion up to floating-point summation order, except in two corners: a model
with no example in a batch still gets a momentum and weight-decay step here (sequential skips it), and
fp16 shares one gradient scaler among the K models.

`compile` runs the grouped network through torch.compile (inductor; "reduce-overhead" adds CUDA graphs)
with static shapes: the padded sub-batch length is rounded up to a multiple of batch_size / 8, so each
resolution compiles at most 8 shapes instead of one per batch (padding rows carry weight 0).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ffcv_transfer.engine.data import Batch, to_device
from ffcv_transfer.engine.models import BlurPoolConv2d, memory_format_for
from ffcv_transfer.engine.train import LockstepTrainer, lr_at, momentum_sgd, refuse_silent_eager
from ffcv_transfer.settings import COMPILE_MODES, OptimConfig

SHAPE_BUCKETS = 8  # padded sub-batch lengths per resolution when compiled


class _Weights:
    """The per-example weights (n, K) of the batch being processed, shared by every grouped BatchNorm."""

    value: torch.Tensor | None = None


class _WeightedBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm whose statistics count only the rows with weight 1 in each channel.

    Two reductions give the per-channel weighted mean and E[x^2] (in float32 at least, as BatchNorm's
    statistics are), one fused F.batch_norm normalises; the backward is BatchNorm's with each channel's
    own count (on CUDA the kernels of SyncBatchNorm, whose counts are pre-divided in). Padding rows (weight
    0) pass no gradient back: their losses carry weight 0, so they have none to pass."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weights: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        stats = torch.promote_types(x.dtype, torch.float32)
        weights = weights.to(stats)  # (n, C)
        count = weights.sum(0) * (x.shape[2] * x.shape[3])
        per = count.clamp_min(1)
        mean = (weights * x.sum((2, 3), dtype=stats)).sum(0) / per
        squares = torch.linalg.vector_norm(x, 2, dim=(2, 3), dtype=stats).square()
        var = ((weights * squares).sum(0) / per - mean.square()).clamp_min(0)
        var = torch.where(count > 0, var, 1.0)  # a model without examples: keep its (padding) activations tame
        out = F.batch_norm(x, mean, var, gamma, beta, False, 0.0, eps)
        ctx.save_for_backward(x, weights, gamma, mean, torch.rsqrt(var + eps), per)
        ctx.mark_non_differentiable(mean, var, count)
        return out, mean, var, count

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_):
        x, weights, gamma, mean, invstd, per = ctx.saved_tensors
        grad = (
            grad.contiguous(memory_format=torch.channels_last)
            if x.is_contiguous(memory_format=torch.channels_last)
            else grad.contiguous()
        )
        if x.is_cuda:
            sum_dy, sum_dy_xmu, grad_gamma, grad_beta = torch.batch_norm_backward_reduce(
                grad, x, mean, invstd, gamma, True, True, True
            )
            one = torch.ones(1, dtype=torch.int32, device=x.device)  # the kernel divides by the counts' sum
            grad_x = torch.batch_norm_backward_elemt(grad, x, mean, invstd, gamma, sum_dy / per, sum_dy_xmu / per, one)
        else:
            g = grad.to(mean.dtype)
            centred = x.to(mean.dtype) - mean[None, :, None, None]
            grad_beta, sum_dy_xmu = g.sum((0, 2, 3)), (g * centred).sum((0, 2, 3))
            grad_gamma = sum_dy_xmu * invstd
            grad_x = (
                g
                - (grad_beta / per)[None, :, None, None]
                - centred * (invstd.square() * sum_dy_xmu / per)[None, :, None, None]
            )
            grad_x = (grad_x * (gamma * invstd)[None, :, None, None]).to(x.dtype)
        grad_x *= weights[:, :, None, None].to(grad_x.dtype)
        return grad_x, None, grad_gamma.to(gamma.dtype), grad_beta.to(gamma.dtype), None


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """K BatchNorms side by side; in training, statistics over the weighted (real) examples only."""

    def __init__(self, sources: list[nn.BatchNorm2d], weights: _Weights):
        first = sources[0]
        super().__init__(
            len(sources) * first.num_features,
            first.eps,
            first.momentum,
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        self.models, self.weights = len(sources), weights
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(self, name).copy_(torch.cat([getattr(s, name) for s in sources]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        weights = self.weights.value.repeat_interleave(self.num_features // self.models, dim=1)
        out, mean, var, count = _WeightedBatchNorm.apply(x, weights, self.weight, self.bias, self.eps)
        with torch.no_grad():
            seen = count > 1  # channels of models without examples keep their running statistics
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_mean[seen] += self.momentum * (mean[seen] - self.running_mean[seen])
            self.running_var[seen] += self.momentum * (unbiased[seen] - self.running_var[seen])
        return out


class GroupedLinear(nn.Module):
    """K linear heads: (n, K * D) -> (n, K, C)."""

    def __init__(self, sources: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([s.weight.detach() for s in sources]).clone())  # (K, C, D)
        self.bias = nn.Parameter(torch.stack([s.bias.detach() for s in sources]).clone())  # (K, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, _, d = self.weight.shape
        return torch.einsum("nkd,kcd->nkc", x.reshape(len(x), k, d), self.weight) + self.bias


def _grouped_conv(sources: list[nn.Conv2d]) -> nn.Conv2d:
    first, k = sources[0], len(sources)
    conv = nn.Conv2d(
        k * first.in_channels,
        k * first.out_channels,
        first.kernel_size,
        first.stride,
        first.padding,
        first.dilation,
        k * first.groups,
        first.bias is not None,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.cat([s.weight for s in sources]))
        if first.bias is not None:
            conv.bias.copy_(torch.cat([s.bias for s in sources]))
    return conv


def _stack(sources: list[nn.Module], weights: _Weights) -> nn.Module:
    """One module doing the work of `sources` (identical architectures) on channel-stacked inputs."""
    first = sources[0]
    if isinstance(first, nn.Conv2d):
        return _grouped_conv(sources)
    if isinstance(first, nn.BatchNorm2d):
        return GroupedBatchNorm2d(sources, weights)
    if isinstance(first, nn.Linear):
        return GroupedLinear(sources)
    if isinstance(first, BlurPoolConv2d):
        stacked = BlurPoolConv2d(_grouped_conv([s.conv for s in sources]))
        stacked.blur = torch.cat([s.blur for s in sources])
        return stacked
    if any(True for _ in first.parameters(recurse=False)) or any(True for _ in first.buffers(recurse=False)):
        raise TypeError(f"grouped fusion: no grouped version of {type(first).__name__}")
    import copy

    stacked = copy.copy(first)  # same class and settings (ReLU, pooling, containers); children replaced
    stacked._modules = {name: _stack([s._modules[name] for s in sources], weights) for name in first._modules}
    return stacked


def _unstack(stacked: nn.Module, targets: list[nn.Module]) -> None:
    """Copy the trained stacked parameters and statistics back into the K separate models."""
    k = len(targets)
    with torch.no_grad():
        for name, tensor in stacked.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            for i, target in enumerate(targets):
                own = target.state_dict()[name]
                own.copy_(tensor.reshape(k, *own.shape)[i])  # model i's block along the first axis


class GroupedTrainer(LockstepTrainer):
    """The `grouped` fusion: same interface as train.SequentialTrainer, the K models trained as one grouped
    network (copied back into `models` after every epoch)."""

    def __init__(
        self,
        models: list[nn.Module],
        masks: np.ndarray,
        config: OptimConfig,
        steps_per_epoch: int,
        device: str | torch.device = "cpu",
        example_labels: np.ndarray | None = None,
        compile: str = "none",
    ):
        super().__init__(models, masks, config, steps_per_epoch, device, example_labels)
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile {compile!r} is not one of {', '.join(COMPILE_MODES)}")
        self.weights = _Weights()
        self.memory_format = memory_format_for(self.device)
        self.network = _stack(models, self.weights).to(memory_format=self.memory_format)
        self.forward = self.network
        self.pad_to = 1
        if compile != "none":
            # every (resolution, padded length) pair is its own static graph: more than dynamo's default limit
            refuse_silent_eager(8 * SHAPE_BUCKETS)
            self.forward = torch.compile(self.network, mode=None if compile == "default" else compile, dynamic=False)
            self.pad_to = max(1, -(-config.batch_size // SHAPE_BUCKETS))
        self.optimizer = momentum_sgd(self.network, config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")

    def pack_sub_batches(
        self, images: torch.Tensor, labels: torch.Tensor, member: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n_max, K*3, H, W) images, (n_max, K) labels and (n_max, K) weights of the K sub-batches, from
        `member` (K, B) on the host (LockstepTrainer.members): laid out there, so packing needs no sync."""
        counts = member.sum(1)
        longest = min(-(-int(counts.max()) // self.pad_to) * self.pad_to, member.shape[1])
        # each row lists model k's positions in batch order, then the others; positions past its count are
        # padding and repeat its first row (a real image of its own, so padded activations stay ordinary)
        order = np.argsort(~member, axis=1, kind="stable")[:, :longest]
        real = np.arange(longest)[None, :] < counts[:, None]  # (K, n_max)
        index = to_device(np.where(real, order, order[:, :1]), self.device)
        weights = to_device(np.ascontiguousarray(real.T, np.float32), self.device)
        k, (_, c, h, w) = len(member), images.shape
        packed = images[index.flatten()].reshape(k, longest, c, h, w).transpose(0, 1)
        packed = packed.reshape(longest, k * c, h, w).contiguous(memory_format=self.memory_format)
        return packed, labels[index].T, weights

    def train_epoch(self, batches: Iterable[Batch], epoch: int) -> list[float]:
        k = len(self.models)
        loss_sums = torch.zeros(k, device=self.device)
        counts = torch.zeros(k, device=self.device)
        alive = torch.ones(k, dtype=torch.bool, device=self.device)
        alive[list(self.failed)] = False  # failures are decided at the end of an epoch
        self.network.train()
        for batch in batches:
            images, labels = batch[0], batch[1]
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step / self.steps_per_epoch, self.config)
            packed, packed_labels, weights = self.pack_sub_batches(images, labels, self.members(batch))
            self.weights.value = weights
            with self.autocast():
                logits = self.forward(packed)  # (n, K, C)
                losses = F.cross_entropy(
                    logits.permute(0, 2, 1),
                    packed_labels,
                    reduction="none",
                    label_smoothing=self.config.label_smoothing,
                )  # (n, K)
            per_model = torch.where(weights > 0, losses, 0.0).sum(0) / weights.sum(0).clamp_min(1)
            total = torch.where(alive, per_model, 0.0).sum()  # a diverged model's NaN must not reach the others
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sums += per_model.detach() * weights.sum(0)
            counts += weights.sum(0)
            self.step += 1
        self.weights.value = None
        _unstack(self.network, self.models)
        return self._mean_losses(loss_sums, counts, epoch)
