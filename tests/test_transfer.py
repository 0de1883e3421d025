"""Cached-feature transfer: margins by hand, one loader pass for all models, informative features
transfer and uninformative ones do not."""
import torch
from torch import nn

from ffcv_transfer.transfer import HeadConfig, extract_features, margins_of, transfer_cached_features


def test_margins_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 5.0, 1.0]])
    labels = torch.tensor([0, 2, 1])
    torch.testing.assert_close(margins_of(logits, labels), torch.tensor([1.0, -2.0, 0.0]))


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
    return [(images[i:i + batch], labels[i:i + batch]) for i in range(0, n, batch)]


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
    good, noise = transfer_cached_features([MeanColour(), Noise()], train, test, 3, HeadConfig(max_iter=100))
    assert train.passes == test.passes == 1
    assert good.accuracy > 0.85 and noise.accuracy < 0.5
    assert good.margins.mean() > noise.margins.mean()
    torch.testing.assert_close(good.is_correct, good.margins > 0)
    assert good.predictions.shape == (300,) and good.accuracy == float(good.is_correct.float().mean())
