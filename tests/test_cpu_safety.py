"""The CPU models never reach torch 2.13's out-of-bounds oneDNN convolution backward (models.py's docstring).

Each check runs in a child process under `heap_checked` (glibc's own checks, which abort at the next free
when a write ran into a neighbouring chunk: `test_a_planted_heap_overflow_aborts_the_child` shows it on a
planted overflow) and a given torch thread count; the oneDNN bug kills the child, which the parent sees as
a non-zero exit status. Before the CPU layout became NCHW, the trainer
check died at 2 threads (SIGSEGV, or SIGABRT "free(): invalid next size")."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ffcv_transfer.engine.grouped import GroupedTrainer
from ffcv_transfer.engine.heap_check import heap_checked
from ffcv_transfer.engine.models import build_model
from ffcv_transfer.engine.train import SequentialTrainer
from ffcv_transfer.settings import OptimConfig

ROOT = Path(__file__).resolve().parent.parent
ODD_BATCHES = (1, 3, 7, 63, 65)  # the bug needs an odd batch; even ones for contrast
# (width, resolution) of every model the package trains on a CPU: the CPU configs and the leak trial
# (0.125 at 32 px), the tests (16-32 px, up to 0.25), and 64 px, where 1 thread already failed
CPU_SHAPES = ((0.125, 16), (0.125, 32), (0.125, 64), (0.25, 32))


def run_child(call: str, threads: int) -> subprocess.CompletedProcess:
    env = heap_checked({**os.environ, "OMP_NUM_THREADS": str(threads)})
    code = f"import torch; torch.set_num_threads({threads}); from tests.test_cpu_safety import *; {call}"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


PLANTED_OVERFLOW = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
chunk = libc.malloc({size})
ctypes.memset(chunk, 0x41, {size} + 2)  # two bytes past the end, into the next chunk's header
libc.free(chunk)
libc.free(libc.malloc({size}))
"""


@pytest.mark.parametrize("size", [1000, 2008, 5000])  # usable size = request: no slack to hide in
def test_a_planted_heap_overflow_aborts_the_child(size):
    """A write two bytes past a malloc'd chunk that reaches the next chunk's header (the kind of damage
    the oneDNN bug does) kills a child run under `heap_checked` with SIGABRT instead of going unnoticed."""
    done = subprocess.run(
        [sys.executable, "-c", PLANTED_OVERFLOW.format(size=size)],
        env=heap_checked(dict(os.environ)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGABRT, (done.returncode, done.stderr[-500:])


def every_convolution_forward_and_backward() -> None:
    """Each CPU model shape, from a channels-last batch (as ffcv delivers one), forward and backward at
    odd and even batch sizes, in float32 and bf16 autocast."""
    torch.manual_seed(0)
    for width, resolution in CPU_SHAPES:
        model = build_model(10, stem="small", width=width)
        for n in ODD_BATCHES:
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(n, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = model(x.requires_grad_()).float().sum()
                loss.backward()


def trainers_on_odd_sub_batches() -> None:
    """Both fusion backends at the demo's shapes (width 0.125, 32 px), 4 models on random halves of 7
    classes, batches of odd sizes: every model steps on odd and even sub-batches."""
    rng = np.random.default_rng(0)
    masks = rng.random((4, 7)) < 0.5
    masks[:, 0] = True
    for trainer_class in (SequentialTrainer, GroupedTrainer):
        models = [build_model(7, stem="small", width=0.125) for _ in masks]
        trainer = trainer_class(
            models, masks, OptimConfig(epochs=1, lr=0.05, lr_peak_epoch=0.5, precision="fp32"), steps_per_epoch=6
        )
        batches = [
            (
                torch.randn(n, 3, 32, 32).contiguous(memory_format=torch.channels_last),
                torch.as_tensor(rng.integers(0, 7, n)),
            )
            for n in (33, 65, 127, 7, 129, 63)
        ]
        losses = trainer.train_epoch(batches, epoch=0)
        assert np.isfinite(losses).all(), losses


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("check", ["every_convolution_forward_and_backward()", "trainers_on_odd_sub_batches()"])
def test_cpu_training_survives_with_heap_checks(check, threads):
    result = run_child(check, threads)
    assert result.returncode == 0, f"{check} at {threads} threads: exit {result.returncode}\n{result.stderr[-2000:]}"


def test_cpu_model_computes_in_nchw_whatever_the_batch_layout():
    """A CPU model's weights are NCHW and it converts a channels-last batch to NCHW before its first
    convolution (so the convolutions never take the channels-last path); the result is the same."""
    torch.manual_seed(0)
    model = build_model(5, stem="small", width=0.125).eval()
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    model.stem[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), model(x))
    assert seen == [True, True]
    reference = F.conv2d(x.double(), model.stem[0].weight.double(), padding=1)
    torch.testing.assert_close(model.stem[0](x).double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_train_command_at_the_shipped_cpu_recipe_survives_with_heap_checks(tmp_path):
    """`ffcv-transfer train` on demo_cpu.yaml's model and resolution (width 0.125, 32 px), 20 models on
    random class halves in two processes, one on 1 thread and one on 2 (ffcv sets torch's threads to
    loader.num_workers), a batch of 129 so that sub-batches are often odd: both complete every row."""
    from ffcv_transfer.writers.common import ImageOptions
    from ffcv_transfer.writers.synthetic import PlantedSpec, write_synthetic

    from .conftest import DEMO_CONFIG

    data = tmp_path / "data"
    write_synthetic(
        data,
        seed=0,
        spec=PlantedSpec(
            num_targets=2,
            num_unrelated=2,
            source_train_per_class=120,
            source_val_per_class=20,
            target_train_per_class=40,
            target_test_per_class=20,
        ),
        options=ImageOptions(write_mode="raw", num_workers=2),
    )
    cli = [sys.executable, "-m", "ffcv_transfer.cli"]
    store = tmp_path / "store"
    subprocess.run(
        [
            *cli,
            "masks",
            "--config",
            str(DEMO_CONFIG),
            "--store",
            str(store),
            f"--data.root={data}",
            "--masks.num_models=20",
            "--masks.design=random",
            "--source.epochs=3",
            "--source.batch_size=129",
            "--transfer.head_max_iter=20",
            "--transfer.mode=cached_features",
        ],
        check=True,
        cwd=ROOT,
    )
    runs = [
        subprocess.Popen(
            [
                *cli,
                "train",
                "--store",
                str(store),
                "--models",
                rows,
                "--k",
                "10",
                "--no-progress",
                f"--loader.num_workers={threads}",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=heap_checked(dict(os.environ)),
        )
        for rows, threads in (("0-9", 1), ("10-19", 2))
    ]
    for run, threads in zip(runs, (1, 2)):
        output = run.communicate(timeout=900)[0]
        assert run.returncode == 0, f"{threads} thread(s): exit {run.returncode}\n{output[-2000:]}"
    from ffcv_transfer.store.results import ResultStore

    status = ResultStore(store).status()
    assert (status["completed"], status["failed"], status["duplicates"]) == (20, 0, 0)
