"""ResNet-18 without torchvision: the ImageNet stem for 128-224 px, a small-image stem for 16-64 px,
a width multiplier for cheap runs, and optional BlurPool (as in FFCV's ResNet recipe).

Memory layout: channels-last on CUDA (what its convolution kernels want), plain NCHW on the CPU. In torch
2.13's CPU build, oneDNN's backward of a channels-last 1x1 strided convolution with few input channels
(4, 8 or 12 seen; the shortcut of width 0.125 has 8) writes out of bounds for odd batch sizes with 2 threads
(with 1 thread at 64 px), killing the process or corrupting its heap; no NCHW shape of the CPU models does
(tests/test_cpu_safety.py). A model converts its input to its own layout, so no caller can hand a CPU
model a channels-last batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ffcv_transfer.settings import STEMS, check_choice


class BlurPoolConv2d(nn.Module):
    """Blur with a fixed [1 2 1] x [1 2 1] / 16 filter before a strided convolution (anti-aliasing)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :]) / 16.0
        self.register_buffer("blur", kernel.expand(conv.in_channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.conv2d(x, self.blur, padding=1, groups=self.conv.in_channels))


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet18(nn.Module):
    """`features(x)` gives the pooled penultimate features (for fixed-feature transfer); `fc` is the head."""

    def __init__(self, num_classes: int, *, stem: str = "imagenet", width: float = 1.0, blurpool: bool = False):
        super().__init__()
        check_choice("stem", stem, STEMS)
        if width <= 0 or num_classes < 1:
            raise ValueError(f"need width > 0 and num_classes >= 1, got {width} and {num_classes}")
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, widths[0], 7, 2, 3, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
            )
        layers, inputs = [], widths[0]
        for index, outputs in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers.append(nn.Sequential(BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1)))
            inputs = outputs
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.num_features = widths[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if blurpool:
            _add_blurpool(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=layout_of(self.stem[0].weight))
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _add_blurpool(module: nn.Module) -> None:
    """Wrap every strided convolution with at least 16 input channels, as FFCV's recipe does."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
        else:
            _add_blurpool(child)


def memory_format_for(device: str | torch.device) -> torch.memory_format:
    """channels_last on CUDA, NCHW (contiguous) elsewhere: the layout of models and batches on `device`."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def layout_of(weight: torch.Tensor) -> torch.memory_format:
    """The memory format of a 4-d convolution weight (its model's layout)."""
    channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def build_model(
    num_classes: int,
    *,
    stem: str = "imagenet",
    width: float = 1.0,
    blurpool: bool = False,
    device: str | torch.device = "cpu",
    memory_format: torch.memory_format | None = None,
) -> ResNet18:
    """A ResNet18 on `device` in `memory_format` (default: memory_format_for(device))."""
    model = ResNet18(num_classes, stem=stem, width=width, blurpool=blurpool).to(device)
    return model.to(memory_format=memory_format or memory_format_for(device))
