"""Per-model batches (`per_model_batch`): the rows of the shared batches queue per model and each model
steps on exactly `per_model_batch` of them, its learning rate following its own steps; routing happens on
the host, with no device-to-host sync per batch; the worker and the counterfactual's removal models use it."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from ffcv_transfer.config import ConfigError, load_experiment
from ffcv_transfer.engine import worker as worker_module
from ffcv_transfer.engine.data import Batch
from ffcv_transfer.engine.train import SequentialTrainer, lr_at
from ffcv_transfer.experiments.removals import removal_design, run_removals
from ffcv_transfer.settings import OptimConfig
from ffcv_transfer.store.experiment import create_class_store
from ffcv_transfer.store.masks import random_class_masks

from .conftest import DEMO_CONFIG, IdRecorder, tiny_settings

EXAMPLES, CLASSES, SHARED, PER_MODEL = 500, 6, 64, 24


class StepRecorder(IdRecorder):
    """IdRecorder that also keeps the ids of each training step apart."""

    def __init__(self, classes):
        super().__init__(classes)
        self.steps = []

    def forward(self, x):
        if self.training:
            self.steps.append(x[:, 0, 0, 0].long().tolist())
        return super().forward(x)


def recording(step, rates: list, optimizer):
    """`step`, which first appends the optimizer's learning rate to `rates`."""

    def recorded(*args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    return recorded


def epoch_batches(labels: np.ndarray, rng) -> list[Batch]:
    """One epoch in a random order, shared batches of SHARED (the last one short), each image's pixel 0 its
    example id, the labels on the host too."""
    order = rng.permutation(len(labels))
    images = torch.zeros(len(labels), 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(float(len(labels)))
    return [
        Batch(
            (images[order[i : i + SHARED]], torch.as_tensor(labels[order[i : i + SHARED]])),
            [labels[order[i : i + SHARED]]],
        )
        for i in range(0, len(labels), SHARED)
    ]


def trained(labels, masks, epochs=2, seed=0):
    counts = np.bincount(labels, minlength=CLASSES)
    models = [StepRecorder(CLASSES) for _ in masks]
    config = OptimConfig(epochs=epochs, lr=0.2, lr_peak_epoch=1, precision="fp32", per_model_batch=PER_MODEL)
    trainer = SequentialTrainer(
        models, masks, config, steps_per_epoch=-(-len(labels) // SHARED), examples_per_epoch=masks.astype(int) @ counts
    )
    rates = [[] for _ in masks]
    for k, optimizer in enumerate(trainer.optimizers):  # the learning rate of each of model k's steps
        optimizer.step = recording(optimizer.step, rates[k], optimizer)
    rng = np.random.default_rng(seed)
    seen = []
    for epoch in range(epochs):
        trainer.train_epoch(epoch_batches(labels, rng), epoch)
        seen.append([list(model.seen) for model in models])
        for model in models:
            model.seen.clear()
    return trainer, models, seen, rates, masks.astype(int) @ counts


def test_every_step_is_the_per_model_batch_and_each_example_is_seen_at_most_once_an_epoch():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, CLASSES, EXAMPLES)
    masks = np.vstack([random_class_masks(4, CLASSES, 0.5, seed=0), np.ones((1, CLASSES), bool)])
    trainer, models, seen, rates, examples = trained(labels, masks)
    for k, (model, mask) in enumerate(zip(models, masks)):
        assert {len(step) for step in model.steps} == {PER_MODEL}  # every step exactly the per-model batch
        own = set(np.flatnonzero(mask[labels]).tolist())
        for epoch_seen in seen:
            # only its own examples, none twice; all but the last partial batch (dropped, < PER_MODEL)
            assert len(set(epoch_seen[k])) == len(epoch_seen[k]) and set(epoch_seen[k]) <= own
            assert len(epoch_seen[k]) == examples[k] // PER_MODEL * PER_MODEL
            assert len(own) - len(epoch_seen[k]) < PER_MODEL
        assert trainer.model_steps[k] == 2 * (examples[k] // PER_MODEL)
    # a model on every class and one on half take the same steps per example seen: one per PER_MODEL
    per_example = trainer.model_steps / np.array([sum(map(len, (epoch[k] for epoch in seen))) for k in range(5)])
    np.testing.assert_allclose(per_example, 1 / PER_MODEL)
    assert examples[4] > 1.5 * examples[:4].max()  # the all-class model did take far more rows


def test_each_models_learning_rate_follows_its_own_steps():
    """The cyclic schedule over each model's own steps: a model on more classes takes more steps an epoch,
    and its peak falls at the same fraction of them."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, CLASSES, EXAMPLES)
    masks = np.array([[True] * 2 + [False] * 4, [True] * 6])
    trainer, _, _, rates, examples = trained(labels, masks, epochs=3)
    config = trainer.config
    for k in range(2):
        per_epoch = examples[k] // PER_MODEL
        expected = [lr_at(step / per_epoch, config) for step in range(3 * per_epoch)]
        np.testing.assert_allclose(rates[k], expected)
        assert np.argmax(rates[k]) == per_epoch  # the peak at epoch 1 of its own steps


@pytest.mark.parametrize(
    "fusion, per_model_batch, precision",
    [
        ("sequential", 0, "fp32"),
        ("sequential", PER_MODEL, "fp32"),
        ("grouped", 0, "fp32"),
        ("sequential", PER_MODEL, "fp16"),
        ("grouped", 0, "fp16"),
    ],
)
def test_no_host_sync_per_batch(fusion, per_model_batch, precision, monkeypatch):
    """Counting .item(), .tolist(), .cpu() and nonzero on tensors while training and measuring accuracy: a
    fixed number per epoch, the same for 4 batches an epoch as for 8. Under fp16 too: the fused SGD step
    takes the gradient scaler's inf check on the device (an unfused step reads it back every step)."""
    from ffcv_transfer.engine.grouped import GroupedTrainer
    from ffcv_transfer.engine.models import build_model

    rng = np.random.default_rng(3)
    masks = random_class_masks(3, CLASSES, 0.5, seed=1)
    calls = []
    for name in ("item", "tolist", "cpu", "nonzero"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _o=original, _n=name, **kw: (calls.append(_n), _o(self, *a, **kw))[1]
        )
    counted = []
    for examples in (4 * SHARED, 8 * SHARED):
        labels = rng.integers(0, CLASSES, examples)
        models = [build_model(CLASSES, stem="small", width=0.125) for _ in masks]
        config = OptimConfig(epochs=2, lr=0.1, lr_peak_epoch=1, precision=precision, per_model_batch=per_model_batch)
        if fusion == "grouped":
            trainer = GroupedTrainer(models, masks, config, steps_per_epoch=examples // SHARED)
        else:
            trainer = SequentialTrainer(
                models,
                masks,
                config,
                steps_per_epoch=examples // SHARED,
                examples_per_epoch=masks.astype(int) @ np.bincount(labels, minlength=CLASSES),
            )
        batches = [
            Batch((torch.randn(SHARED, 3, 8, 8), torch.as_tensor(labels[i : i + SHARED])), [labels[i : i + SHARED]])
            for i in range(0, examples, SHARED)
        ]
        calls.clear()
        trainer.fit(batches, 2)
        trainer.accuracy(batches)
        counted.append(len(calls))
    assert counted[0] == counted[1] <= 2 * 4 + 1  # per epoch: the losses and counts read once; accuracy once


@pytest.mark.parametrize("per_model_batch", [0, PER_MODEL])
def test_cudnn_autotunes_the_static_training_steps_and_not_the_accuracy_pass(per_model_batch):
    """cudnn.benchmark, as each forward sees it: on in the training steps when every step has the per-model
    batch's shape, off in them otherwise and in the accuracy pass (sub-batches of every size); the setting
    before is restored after each."""
    from ffcv_transfer.engine.models import build_model

    rng = np.random.default_rng(4)
    masks = random_class_masks(2, CLASSES, 0.5, seed=3)
    labels = rng.integers(0, CLASSES, 4 * SHARED)
    models = [build_model(CLASSES, stem="small", width=0.125) for _ in masks]
    seen = []
    for model in models:
        model.register_forward_pre_hook(lambda m, i: seen.append((m.training, torch.backends.cudnn.benchmark)))
    config = OptimConfig(epochs=1, lr=0.1, lr_peak_epoch=0.5, precision="fp32", per_model_batch=per_model_batch)
    trainer = SequentialTrainer(
        models,
        masks,
        config,
        steps_per_epoch=4,
        examples_per_epoch=masks.astype(int) @ np.bincount(labels, minlength=CLASSES),
    )
    batches = [
        Batch((torch.randn(SHARED, 3, 8, 8), torch.as_tensor(labels[i : i + SHARED])), [labels[i : i + SHARED]])
        for i in range(0, len(labels), SHARED)
    ]
    before = torch.backends.cudnn.benchmark
    trainer.fit(batches, 1)
    trainer.accuracy(batches)
    assert torch.backends.cudnn.benchmark == before
    assert {flag for training, flag in seen if training} == {bool(per_model_batch)}
    assert {flag for training, flag in seen if not training} == {False}


def test_fused_sgd_under_the_gradient_scaler_steps_as_the_unfused_one():
    """fp16 on the CPU, 6 steps of a small model, one of them with an infinite gradient: the fused SGD
    (momentum_sgd's choice under fp16 and on CUDA) and torch's unfused SGD, each behind its own gradient
    scaler, skip the same step and end with the same weights and the same scale."""
    from ffcv_transfer.engine.models import build_model
    from ffcv_transfer.engine.train import momentum_sgd, param_groups

    config = OptimConfig(epochs=2, lr=0.1, lr_peak_epoch=1, precision="fp16", weight_decay=5e-4)
    torch.manual_seed(0)
    fused_model = build_model(CLASSES, stem="small", width=0.125)
    plain_model = build_model(CLASSES, stem="small", width=0.125)
    plain_model.load_state_dict(fused_model.state_dict())
    fused = momentum_sgd(fused_model, config, "cpu")
    plain = torch.optim.SGD(param_groups(plain_model, config), lr=0.0, momentum=config.momentum)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    assert not momentum_sgd(fused_model, replace(config, precision="fp32"), "cpu").defaults["fused"]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    rng = torch.Generator().manual_seed(1)
    images, labels = torch.randn(6, 16, 3, 8, 8, generator=rng), torch.randint(0, CLASSES, (6, 16), generator=rng)
    for step in range(6):
        for model, optimizer, scaler in zip((fused_model, plain_model), (fused, plain), scalers):
            for group in optimizer.param_groups:
                group["lr"] = 0.05
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(images[step]), labels[step])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss * (float("inf") if step == 3 else 1.0)).backward()
            scaler.step(optimizer)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**9  # halved once, at the inf step
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_worker_and_the_removal_models_step_on_the_per_model_batch(tiny_data, tmp_path, monkeypatch):
    """source.per_model_batch through the worker: every source step of every model, those of the
    counterfactual's removal models (every class but one) included, is exactly the per-model batch."""
    sizes = []

    class Recording(worker_module.SequentialTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for model in self.models:
                model.register_forward_pre_hook(
                    lambda module, inputs: (
                        sizes.append(len(inputs[0])) if module.training and module.fc.out_features == 5 else None
                    )
                )

    monkeypatch.setitem(worker_module.TRAINERS, "sequential", Recording)
    experiment = load_experiment(
        DEMO_CONFIG, tiny_settings(tiny_data, **{"source.per_model_batch": 16, "source.batch_size": 48})
    )
    store = create_class_store(tmp_path / "store", experiment)
    assert worker_module.run_worker(store.path, experiment, progress=False) == 4
    assert sizes and set(sizes) == {16}
    influence_steps = len(sizes)
    masks, removals = removal_design(np.arange(5.0), [1], 2, ["most_negative"])
    run_removals(tmp_path / "removals", experiment, masks, removals, progress=False)
    assert len(sizes) > influence_steps and set(sizes) == {16}


def test_per_model_batches_need_the_sequential_fusion(tiny_data):
    with pytest.raises(ConfigError, match="per_model_batch needs run.fusion sequential"):
        load_experiment(
            DEMO_CONFIG, tiny_settings(tiny_data, **{"source.per_model_batch": 16, "run.fusion": "grouped"})
        )


@pytest.mark.slow
def test_the_compiled_per_model_step_matches_eager():
    """run.compile with per-model batches: each model's forward compiled for its static batch. K = 2 models
    from equal seeds on equal batches: after their first two steps the weights equal eager's within 1e-5
    (float32 on a CPU; the compiled kernels sum in another order); over two epochs those differences grow
    through BatchNorm at batch 24, so the run is compared by its per-epoch mean losses, within 2%."""
    from ffcv_transfer.engine.models import build_model

    rng = np.random.default_rng(4)
    labels = rng.integers(0, CLASSES, 4 * SHARED)
    masks = np.array([[True, True, True, False, False, False], [True] * CLASSES])
    images = torch.as_tensor(rng.normal(size=(len(labels), 3, 16, 16)), dtype=torch.float32)
    batches = [
        Batch((images[i : i + SHARED], torch.as_tensor(labels[i : i + SHARED])), [labels[i : i + SHARED]])
        for i in range(0, len(labels), SHARED)
    ]
    examples = masks.astype(int) @ np.bincount(labels, minlength=CLASSES)
    config = OptimConfig(epochs=2, lr=0.05, lr_peak_epoch=1, precision="fp32", per_model_batch=PER_MODEL)
    early, losses = {}, {}
    for mode in ("none", "default"):
        torch.manual_seed(0)
        models = [build_model(CLASSES, stem="small", width=0.125) for _ in masks]
        trainer = SequentialTrainer(
            models, masks, config, steps_per_epoch=len(batches), compile=mode, examples_per_epoch=examples
        )
        trainer.train_epoch(batches[:1], 0)  # model 0 steps once, model 1 twice
        early[mode] = [torch.cat([p.detach().flatten() for p in model.parameters()]) for model in models]
        losses[mode] = [trainer.train_epoch(batches, epoch) for epoch in range(2)]
        assert not trainer.failed
    for eager, compiled in zip(early["none"], early["default"]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses["default"], losses["none"], rtol=0.02)


@pytest.mark.slow
def test_the_compiled_fixed_feature_transfer_matches_eager():
    """transfer.per_model_batch with compile: each model's training forward through its frozen backbone
    compiled for the static batch. K = 2 source models, heads from equal seeds: the test outputs of eager and
    compiled transfer agree within 1e-4 (only the head trains, so the summation-order differences stay
    small), and the backbones are untouched."""
    from ffcv_transfer.engine.models import build_model
    from ffcv_transfer.engine.transfer import transfer_by_training
    from ffcv_transfer.settings import TransferConfig

    rng = np.random.default_rng(6)
    labels = torch.as_tensor(rng.integers(0, 3, 3 * SHARED))
    images = (
        torch.as_tensor(rng.normal(size=(len(labels), 3, 16, 16)), dtype=torch.float32) + labels[:, None, None, None]
    )
    train = [(images[i : i + SHARED], labels[i : i + SHARED]) for i in range(0, 2 * SHARED, SHARED)]
    test = [(images[2 * SHARED :], labels[2 * SHARED :])]
    config = TransferConfig(
        mode="fixed_feature", epochs=2, lr=0.1, lr_peak_epoch=1, precision="fp32", per_model_batch=PER_MODEL
    )
    margins = {}
    for mode in ("none", "default"):
        torch.manual_seed(0)
        models = [build_model(CLASSES, stem="small", width=0.125) for _ in range(2)]
        backbone = [model.stem[0].weight.clone() for model in models]
        torch.manual_seed(1)
        torch._dynamo.utils.counters.clear()
        outputs, failed = transfer_by_training(
            models, train, test, 3, config, steps_per_epoch=len(train), examples_per_epoch=2 * SHARED, compile=mode
        )
        assert not failed
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == (mode != "none")  # it did compile
        for model, weight in zip(models, backbone):
            torch.testing.assert_close(model.stem[0].weight, weight, rtol=0, atol=0)
        margins[mode] = torch.stack([out.margins for out in outputs])
    torch.testing.assert_close(margins["default"], margins["none"], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_routing_and_queued_steps_make_no_cuda_sync(precision):
    """Under torch.cuda.set_sync_debug_mode("error"), routing a batch and the queued per-model steps run
    without a device-to-host sync: in bf16, and in fp16, whose gradient scaler the fused SGD step checks on
    the device."""
    from ffcv_transfer.engine.data import to_device
    from ffcv_transfer.engine.models import build_model
    from ffcv_transfer.engine.train import RowQueue

    device = torch.device("cuda")
    rng = np.random.default_rng(5)
    masks = random_class_masks(2, CLASSES, 0.5, seed=2)
    models = [build_model(CLASSES, stem="small", width=0.25, device=device) for _ in masks]
    config = OptimConfig(epochs=1, lr=0.1, lr_peak_epoch=0.5, precision=precision, per_model_batch=PER_MODEL)
    trainer = SequentialTrainer(models, masks, config, steps_per_epoch=8, device=device, examples_per_epoch=[256, 256])
    batches = []
    for _ in range(8):
        host = rng.integers(0, CLASSES, SHARED)
        batches.append(Batch((torch.randn(SHARED, 3, 16, 16, device=device), to_device(host, device)), [host]))
    queues = [RowQueue() for _ in masks]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            for k, rows in enumerate(trainer.routes(batch)):
                queues[k].append(batch[0][rows], batch[1][rows])
                while queues[k].count >= PER_MODEL:
                    trainer.step_model(k, *queues[k].take(PER_MODEL), 0.1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert trainer.model_steps.sum() > 0


def test_every_compiled_model_step_runs_a_compiled_graph(monkeypatch):
    """K=20 sequential models compiled (a counting backend in place of inductor, so that it runs in seconds),
    each stepped at 3 resolutions: every one of the 60 steps runs through a compiled graph, none falls back
    to eager past dynamo's recompile limit (8 per code object; the K models share one forward), and the
    graphs are one per shape, shared by the models (their parameters are the graph's inputs)."""
    graphs, calls = [], []

    def counting(graph, example_inputs):
        graphs.append(graph)
        return lambda *args: (calls.append(len(graphs)), graph.forward(*args))[1]

    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: original(model, **kw, backend=counting))
    config = torch._dynamo.config
    settings = {name: getattr(config, name) for name in ("recompile_limit", "fail_on_recompile_limit_hit")}
    with config.patch(settings):  # restored after the test, whatever the trainers set
        check_every_compiled_step(graphs, calls)


def check_every_compiled_step(graphs: list, calls: list) -> None:
    """The body of the test above, with its counting backend in place: `graphs` and `calls` fill as it runs."""
    from ffcv_transfer.engine.models import build_model

    torch._dynamo.reset()
    masks = np.ones((20, CLASSES), bool)
    models = [build_model(CLASSES, stem="small", width=0.125) for _ in masks]
    config = OptimConfig(epochs=1, lr=0.1, lr_peak_epoch=0.5, precision="fp32", per_model_batch=8)
    trainer = SequentialTrainer(models, masks, config, 1, examples_per_epoch=[8] * 20, compile="default")
    for resolution in (8, 12, 16):
        for k in range(20):
            trainer.step_model(k, torch.randn(8, 3, resolution, resolution), torch.randint(0, CLASSES, (8,)), 0.1)
    assert len(calls) == 60 and len(graphs) == 3, (len(calls), len(graphs))
    # more shapes than the limit allows: an error, not models quietly running eager
    torch._dynamo.reset()
    trainer = SequentialTrainer(models[:1], masks[:1], config, 1, examples_per_epoch=[8], compile="default")
    torch._dynamo.config.recompile_limit = 2
    with pytest.raises(Exception, match="recompile_limit"):
        for resolution in (8, 12, 16):
            trainer.step_model(0, torch.randn(8, 3, resolution, resolution), torch.randint(0, CLASSES, (8,)), 0.1)
    torch._dynamo.reset()  # no graph of this test's counting backend stays for later tests
