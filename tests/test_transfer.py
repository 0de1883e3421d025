"""Transfer: margins by hand; cached features (one loader pass for all models, informative features
transfer and uninformative ones do not); fixed-feature and full fine-tuning (what they train)."""

import pytest
import torch
from torch import nn

from ffcv_transfer.engine.transfer import (
    extract_features,
    margins_of,
    outputs_from_logits,
    transfer_by_training,
    transfer_cached_features,
)
from ffcv_transfer.settings import TransferConfig


def test_margins_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 5.0, 1.0]])
    labels = torch.tensor([0, 2, 1])
    torch.testing.assert_close(margins_of(logits, labels), torch.tensor([1.0, -2.0, 0.0]))


def test_the_reference_outputs_by_hand():
    """The correct class's softmax probability and raw logit, as MadryLab/data-transfer records them, and
    top-1 against mean-per-class accuracy (the reference's metric for Aircraft, Caltech, Flowers, Pets)."""
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0], [0.0, 2.0, 0.0]])
    labels = torch.tensor([0, 0, 2, 1])  # right, wrong, right, right
    out = outputs_from_logits(logits, labels)
    e = torch.e
    torch.testing.assert_close(
        out.p_correct, torch.tensor([e**2 / (e**2 + 2), 1 / (e + 2), e**3 / (e**3 + e + 1), e**2 / (e**2 + 2)])
    )
    torch.testing.assert_close(out.correct_logit, torch.tensor([2.0, 0.0, 3.0, 2.0]))
    assert out.is_correct.tolist() == [True, False, True, True] and out.accuracy == 0.75
    assert out.mean_class_accuracy == pytest.approx((0.5 + 1 + 1) / 3)  # class 0: 1 of 2


class MeanColour(nn.Module):
    """Features: each channel's mean (what the target classes differ by)."""

    def features(self, x):
        return x.mean(dim=(2, 3))


class Noise(nn.Module):
    """Features unrelated to the image."""

    def features(self, x):
        return torch.randn(len(x), 3, generator=torch.Generator().manual_seed(int(x.sum().abs() * 1000) % 2**31))


def colour_batches(seed, n=300, batch=50):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    images = torch.randn(n, 3, 8, 8, generator=generator)
    images[torch.arange(n), labels] += 0.8  # class c is brighter in channel c
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]


class CountingBatches:
    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_one_loader_pass_serves_every_model():
    batches = CountingBatches(colour_batches(0))
    features, labels = extract_features([MeanColour(), Noise(), MeanColour()], batches)
    assert batches.passes == 1 and len(features) == 3 and features[0].shape == (300, 3) and labels.shape == (300,)


def test_informative_features_transfer_and_noise_does_not():
    train, test = CountingBatches(colour_batches(1)), CountingBatches(colour_batches(2))
    good, noise = transfer_cached_features(
        [MeanColour(), Noise()], train, test, 3, TransferConfig(mode="cached_features", head_max_iter=100)
    )
    assert train.passes == test.passes == 1
    assert good.accuracy > 0.85 and noise.accuracy < 0.5
    assert good.margins.mean() > noise.margins.mean()
    torch.testing.assert_close(good.is_correct, good.margins > 0)
    assert good.predictions.shape == (300,) and good.accuracy == float(good.is_correct.float().mean())


class TinyNet(nn.Module):
    """A backbone with BatchNorm and a `fc` head, the interface transfer_by_training needs."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def features(self, x):
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


def trained_transfer(mode):
    models = [TinyNet(0), TinyNet(1)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    train, test = CountingBatches(colour_batches(3)), CountingBatches(colour_batches(4))
    config = TransferConfig(mode=mode, epochs=6, lr=0.2, lr_peak_epoch=1, batch_size=50, precision="fp32")
    outputs, failed = transfer_by_training(models, train, test, 3, config, steps_per_epoch=len(train.batches))
    assert train.passes == 6 and test.passes == 1 and failed == {}  # every pass served both models
    return models, before, outputs


def test_fixed_feature_trains_only_a_new_head_with_batchnorm_in_train_mode():
    models, before, outputs = trained_transfer("fixed_feature")
    for model, old, out in zip(models, before, outputs):
        assert model.fc.out_features == 3 and out.accuracy > 0.8
        torch.testing.assert_close(model.conv.weight, old["conv.weight"], rtol=0, atol=0)  # frozen
        torch.testing.assert_close(model.bn.weight, old["bn.weight"], rtol=0, atol=0)
        assert not torch.allclose(model.bn.running_mean, old["bn.running_mean"])  # BN statistics adapted
        torch.testing.assert_close(out.is_correct, out.margins > 0)


def test_full_finetune_trains_the_backbone_too():
    models, before, outputs = trained_transfer("full_finetune")
    for model, old, out in zip(models, before, outputs):
        assert not torch.allclose(model.conv.weight, old["conv.weight"]) and out.accuracy > 0.8
    with pytest.raises(ValueError, match="use transfer_cached_features"):
        transfer_by_training(models, [], [], 3, TransferConfig(mode="cached_features"), steps_per_epoch=1)
