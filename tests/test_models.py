"""ResNet-18 variants against known architecture facts."""

import copy

import pytest
import torch

from ffcv_transfer.engine.models import BlurPoolConv2d, ResNet18, build_model


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_imagenet_resnet18_has_the_standard_parameter_count():
    # torchvision's resnet18(num_classes=1000) has 11,689,512 parameters
    assert count(ResNet18(1000)) == 11_689_512


@pytest.mark.parametrize("stem,size,width,features", [("imagenet", 160, 1.0, 512), ("small", 32, 0.25, 128)])
def test_output_and_feature_shapes(stem, size, width, features):
    model = ResNet18(10, stem=stem, width=width).eval()
    x = torch.randn(2, 3, size, size)
    assert model(x).shape == (2, 10) and model.features(x).shape == (2, features)
    assert model.num_features == features


def test_blurpool_wraps_strided_convs_and_keeps_shapes():
    model = ResNet18(5, blurpool=True).eval()
    wrapped = [m for m in model.modules() if isinstance(m, BlurPoolConv2d)]
    assert len(wrapped) == 6  # layers 2-4: the strided 3x3 conv and the strided 1x1 shortcut (stem: 3 channels)
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 5)
    conv = torch.nn.Conv2d(16, 4, 3, 2, 1, bias=False)
    flat = torch.full((1, 16, 8, 8), 0.7)
    # the blur filter sums to one, so a constant image is unchanged away from the zero-padded border
    torch.testing.assert_close(BlurPoolConv2d(conv)(flat)[..., 1:-1, 1:-1], conv(flat)[..., 1:-1, 1:-1])


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = build_model(7, stem="small", width=0.25, memory_format=torch.channels_last).eval()
    reference = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    x = torch.randn(3, 3, 32, 32)
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        model(x.contiguous(memory_format=torch.channels_last)), reference(x), rtol=1e-4, atol=1e-5
    )


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="stem 'tiny'"):
        ResNet18(10, stem="tiny")
    with pytest.raises(ValueError, match="width > 0"):
        ResNet18(10, width=0)
