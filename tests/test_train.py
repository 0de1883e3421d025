"""The fused K-model loop: exact routing, the schedule, learning on planted data, divergence."""

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from ffcv_transfer.engine.data import Batch
from ffcv_transfer.engine.grouped import GroupedTrainer
from ffcv_transfer.engine.models import build_model, memory_format_for
from ffcv_transfer.engine.train import SequentialTrainer, lr_at, param_groups, source_resolution
from ffcv_transfer.settings import OptimConfig, SourceConfig
from ffcv_transfer.store.masks import random_class_masks
from ffcv_transfer.writers.synthetic import PlantedSpec, make_planted

from .conftest import IdRecorder

CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
)
SPEC = PlantedSpec(
    num_targets=4,
    num_unrelated=4,
    num_misleading=0,
    source_train_per_class=200,
    source_val_per_class=50,
    target_train_per_class=10,
    target_test_per_class=10,
)


def test_routes_give_each_model_exactly_its_examples_once_per_epoch():
    """Routing on the host keys of data.Batch, or on the labels of a plain batch: the same positions."""
    rng = np.random.default_rng(0)
    masks = rng.random((5, 12)) < 0.5
    labels = rng.integers(0, 12, 1000)
    config = OptimConfig(epochs=1, lr_peak_epoch=0.5, precision="fp32")
    trainer = SequentialTrainer([nn.Identity() for _ in masks], masks, config, steps_per_epoch=16)
    seen = [[] for _ in range(5)]
    for start in range(0, 1000, 64):  # one epoch in batches; positions -> example ids
        part = labels[start : start + 64]
        plain = (torch.zeros(len(part)), torch.as_tensor(part))
        for k, (rows, same) in enumerate(zip(trainer.routes(Batch(plain, [part])), trainer.routes(plain))):
            assert rows.tolist() == same.tolist()
            seen[k] += (rows + start).tolist()
    for k in range(5):
        expected = np.flatnonzero(masks[k][labels])
        assert sorted(seen[k]) == expected.tolist() and len(set(seen[k])) == len(seen[k])


def test_each_model_sees_all_and_only_its_classes_examples_once_per_epoch():
    rng = np.random.default_rng(1)
    labels = torch.as_tensor(rng.integers(0, 6, 500))
    images = torch.zeros(500, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(500.0)
    masks = random_class_masks(4, 6, 0.5, seed=0)
    models = [IdRecorder(6) for _ in range(4)]
    trainer = SequentialTrainer(models, masks, OptimConfig(epochs=2, lr=0.01, precision="fp32"), steps_per_epoch=8)
    for epoch in range(2):
        order = torch.as_tensor(rng.permutation(500))
        trainer.train_epoch([(images[order[i : i + 64]], labels[order[i : i + 64]]) for i in range(0, 500, 64)], epoch)
        for model, mask in zip(models, masks):
            assert sorted(model.seen) == np.flatnonzero(mask[labels.numpy()]).tolist()  # all, only, once
            model.seen.clear()


def test_fit_runs_the_epochs_at_the_scheduled_resolutions_and_reports_each():
    """fit: one train_epoch per epoch, the loader set to source_resolution's size before each (160 px until
    the ramp, 192 px after: ffcv-imagenet's schedule, rounded down to 32 px), the LR schedule over all the
    steps, a report per epoch."""

    class Recording(list):  # batches that record the resolution of each epoch
        def set_resolution(self, resolution):
            self.resolutions.append(resolution)

    images, labels = torch.zeros(8, 3, 2, 2), torch.arange(8) % 4
    batches = Recording([(images, labels)] * 2)
    batches.resolutions = []
    config = SourceConfig(
        epochs=5, lr=0.4, lr_peak_epoch=1, min_res=160, max_res=192, start_ramp=2, end_ramp=4, precision="fp32"
    )
    models = [IdRecorder(4)]
    trainer = SequentialTrainer(models, np.ones((1, 4), bool), config, steps_per_epoch=2)
    reports = []
    trainer.fit(batches, config.epochs, resolution=source_resolution(config), on_epoch=reports.append, stage="source")
    assert batches.resolutions == [160, 160, 160, 160, 192]
    assert reports == [f"source {e}/5" for e in range(1, 6)] and trainer.step == 10
    assert len(models[0].seen) == 5 * 16


@pytest.mark.parametrize("trainer_class", [SequentialTrainer, GroupedTrainer])
def test_a_model_that_never_steps_is_failed_with_the_reason(trainer_class):
    """Model 1's only class has no example in any batch (as when its examples fill no whole batch and
    drop_last drops them): after fit it is failed, not passed off as trained; model 0 is not."""
    images, labels = torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long)
    masks = np.array([[True, False], [False, True]])
    models = [build_model(2, stem="small", width=0.125) for _ in masks]
    trainer = trainer_class(
        models, masks, OptimConfig(epochs=2, lr=0.01, lr_peak_epoch=1, precision="fp32"), steps_per_epoch=1
    )
    trainer.fit([(images, labels)], 2)
    assert trainer.examples_seen.tolist() == [16, 0]
    assert trainer.failed == {
        1: "no training step: no batch held one of its classes' examples (batches of 1024; "
        "the last incomplete one is dropped)"
    }


def test_cyclic_schedule_by_hand():
    config = OptimConfig(epochs=10, lr=0.4, lr_peak_epoch=2)
    assert [lr_at(e, config) for e in (0, 1, 2, 6, 10)] == pytest.approx([0.0, 0.2, 0.4, 0.2, 0.0])
    with pytest.raises(ValueError, match="lr_peak_epoch 12"):
        OptimConfig(epochs=10, lr_peak_epoch=12)


def test_step_schedule_by_hand():
    """torch's StepLR stepped once an epoch, as the reference's `steplr` (lr 0.01, step 10, gamma 0.1)."""
    config = OptimConfig(epochs=15, lr=0.01, lr_schedule="step", lr_step_size=10, lr_gamma=0.1)
    assert [lr_at(e, config) for e in (0, 9.9, 10, 14.5)] == pytest.approx([0.01, 0.01, 0.001, 0.001])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.1)
    for epoch in range(15):
        assert lr_at(epoch + 0.5, config) == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()


def test_weight_decay_on_batchnorm_only_when_asked():
    model = build_model(3, stem="small", width=0.125)
    decay, no_decay = param_groups(model, OptimConfig(weight_decay=5e-4))
    bn = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    assert sum(p.numel() for p in no_decay["params"]) == bn and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 5e-4 and len(decay["params"]) + len(no_decay["params"]) == len(
        list(model.parameters())
    )
    decay, no_decay = param_groups(model, OptimConfig(weight_decay=5e-4, bn_weight_decay=True))  # the reference
    assert len(decay["params"]) == len(list(model.parameters())) and not no_decay["params"]


def test_the_resolution_ramp_rounds_down_or_to_the_nearest_multiple_of_32():
    """160 -> 192 px over epochs 11-13: ffcv-imagenet's rounding down reaches 192 px at epoch 13, the
    reference's `int(np.round(res / 32)) * 32` at epoch 12."""
    down = SourceConfig(min_res=160, max_res=192, start_ramp=11, end_ramp=13)
    nearest = SourceConfig(min_res=160, max_res=192, start_ramp=11, end_ramp=13, ramp_rounding="nearest")
    assert [source_resolution(down)(e) for e in range(10, 16)] == [160, 160, 160, 192, 192, 192]
    assert [source_resolution(nearest)(e) for e in range(10, 16)] == [160, 160, 192, 192, 192, 192]


def test_source_accuracy_among_own_or_all_classes():
    """A model whose largest logit is a class it was not trained on: wrong among all classes (the
    reference's argmax), right among its own."""

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[2.0, 0.0, 3.0]]).expand(len(x), 3)

    trainer = SequentialTrainer([Fixed()], np.array([[True, True, False]]), OptimConfig(precision="fp32"), 1)
    batch = [(torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long))]
    assert trainer.accuracy(batch) == [1.0] and trainer.accuracy(batch, among_own=False) == [0.0]


def batches(images, labels, batch_size, rng=None):
    order = rng.permutation(len(labels)) if rng is not None else np.arange(len(labels))
    for start in range(0, len(order), batch_size):
        pick = order[start : start + batch_size]
        x = torch.as_tensor(images[pick]).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25)
        if rng is not None and rng.random() < 0.5:
            x = x.flip(3)
        yield x.contiguous(memory_format=torch.channels_last), torch.as_tensor(labels[pick])


@pytest.fixture(scope="module")
def planted():
    return make_planted(SPEC, seed=1)


def test_two_models_learn_their_own_classes(planted):
    torch.manual_seed(0)
    (train_x, train_y), (val_x, val_y) = planted["source_train"], planted["source_val"]
    classes = SPEC.num_sources
    masks = np.zeros((2, classes), bool)
    masks[0, ::2] = masks[1, 1::2] = True  # disjoint halves: 4 classes each, chance 0.25
    models = [build_model(classes, stem="small", width=0.125) for _ in range(2)]
    config = OptimConfig(epochs=8, lr=0.1, lr_peak_epoch=1, weight_decay=5e-4, precision="fp32")
    trainer = SequentialTrainer(models, masks, config, steps_per_epoch=-(-len(train_y) // 128))
    rng = np.random.default_rng(0)
    for epoch in range(config.epochs):
        losses = trainer.train_epoch(batches(train_x, train_y, 128, rng), epoch)
    accuracy = trainer.accuracy(batches(val_x, val_y, 512))
    assert not trainer.failed and all(np.isfinite(losses))
    assert min(accuracy) > 0.7, accuracy  # chance is 0.25 (4 classes each); measured 0.90 and 0.90


@pytest.mark.parametrize("trainer_class", [SequentialTrainer, GroupedTrainer])
def test_diverged_model_is_marked_failed_and_the_others_go_on(planted, trainer_class):
    (train_x, train_y) = planted["source_train"]
    classes = SPEC.num_sources
    models = [build_model(classes, stem="small", width=0.125) for _ in range(2)]
    with torch.no_grad():
        models[1].fc.weight.fill_(float("nan"))
    config = OptimConfig(epochs=1, lr=0.05, lr_peak_epoch=0.5, precision="bf16")
    trainer = trainer_class(models, np.ones((2, classes), bool), config, steps_per_epoch=4)
    losses = trainer.train_epoch(batches(train_x[:512], train_y[:512], 128), epoch=0)
    assert trainer.failed == {1: "non-finite loss at epoch 0"}
    assert np.isfinite(losses[0])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("compile", ["none", pytest.param("default", marks=pytest.mark.slow)])
def test_grouped_fusion_matches_sequential_per_model(planted, device, compile):
    """Same seeds, same batches, in float64 (so that only the order of summation differs): after three
    steps every parameter and BatchNorm statistic of each model agrees between the fusions, eager and
    compiled (torch.compile, sub-batches padded to static lengths; minutes on a CPU), to 1e-9 relative,
    and each model's epoch loss (accumulated in float32) to 1e-6."""
    (train_x, train_y) = planted["source_train"]
    pick = np.random.default_rng(0).choice(len(train_y), 384, replace=False)  # every class in every batch
    classes = SPEC.num_sources
    masks = random_class_masks(3, classes, 0.5, seed=2)
    config = OptimConfig(epochs=1, lr=0.2, lr_peak_epoch=0.3, weight_decay=5e-4, precision="fp32")
    runs = []
    for trainer_class in (SequentialTrainer, partial(GroupedTrainer, compile=compile)):
        torch.manual_seed(0)
        models = [
            build_model(classes, stem="small", width=0.125, blurpool=True, device=device).double() for _ in range(3)
        ]
        initial = models[0].stem[0].weight.clone()
        trainer = trainer_class(models, masks, config, steps_per_epoch=3, device=device)
        data = [
            (x.to(device, torch.float64), y.to(device))
            for x, y in batches(train_x[pick], train_y[pick], 128, np.random.default_rng(1))
        ]
        runs.append((models, trainer.train_epoch(data, 0)))
        assert (models[0].stem[0].weight - initial).abs().max() > 1e-3  # the models did train
    (sequential, seq_losses), (grouped, grp_losses) = runs
    np.testing.assert_allclose(grp_losses, seq_losses, rtol=1e-6)  # epoch losses are summed in float32
    for a, b in zip(sequential, grouped):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            if x.is_floating_point():
                assert ((x - y).abs().max() / x.abs().max().clamp_min(1e-6)).item() < 1e-9, name


def test_compiled_grouped_fusion_pads_to_static_lengths():
    masks = random_class_masks(3, 6, 0.5, seed=0)
    models = [torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1)) for _ in range(3)]
    eager = GroupedTrainer(models, masks, OptimConfig(epochs=1, lr_peak_epoch=0.5, batch_size=64, precision="fp32"), 5)
    compiled = GroupedTrainer(
        models, masks, OptimConfig(epochs=1, lr_peak_epoch=0.5, batch_size=64, precision="fp32"), 5, compile="default"
    )
    lengths = set()
    for seed in range(20):
        labels = torch.as_tensor(np.random.default_rng(seed).integers(0, 6, 64))
        images = torch.zeros(64, 3, 1, 1)
        member = masks[:, labels.numpy()]
        plain, (packed, _, weights) = (
            eager.pack_sub_batches(images, labels, member),
            compiled.pack_sub_batches(images, labels, member),
        )
        assert len(packed) % 8 == 0 and len(plain[0]) <= len(packed) < len(plain[0]) + 8
        np.testing.assert_array_equal(weights[: len(plain[2])], plain[2])  # the same real rows, then padding
        assert weights[len(plain[2]) :].sum() == 0
        lengths.add(len(packed))
    assert len(lengths) <= 8
    with pytest.raises(ValueError, match="compile"):
        GroupedTrainer(models, masks, OptimConfig(epochs=1, lr_peak_epoch=0.5, precision="fp32"), 5, compile="fastest")


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("trainer_class", [SequentialTrainer, GroupedTrainer])
def test_mixed_precision_steps_in_the_device_layout(planted, device, trainer_class):
    """bf16 autocast on models in their device's layout (channels-last on CUDA, NCHW on the CPU), fed
    channels-last batches: finite losses and parameters that move."""
    (train_x, train_y) = planted["source_train"]
    models = [build_model(SPEC.num_sources, stem="small", width=0.125, device=device) for _ in range(2)]
    assert models[0].stem[0].weight.is_contiguous(memory_format=memory_format_for(device))
    before = models[1].stem[0].weight.detach().clone()
    masks = random_class_masks(2, SPEC.num_sources, 0.5, seed=0)
    trainer = trainer_class(
        models,
        masks,
        OptimConfig(epochs=1, lr=0.1, lr_peak_epoch=0.2, precision="bf16"),
        steps_per_epoch=2,
        device=device,
    )
    pick = np.random.default_rng(0).choice(len(train_y), 256, replace=False)
    losses = trainer.train_epoch(
        [(x.to(device), y.to(device)) for x, y in batches(train_x[pick], train_y[pick], 128)], epoch=0
    )
    assert all(np.isfinite(losses)) and not trainer.failed
    assert (models[1].stem[0].weight - before).abs().max() > 0
