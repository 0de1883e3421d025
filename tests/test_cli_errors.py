"""Every command-line mistake ends in one line `ffcv-transfer: error: ...` naming the file or option and the
problem, with exit status 2, before any work: nothing computed, nothing written, earlier outputs left
byte-identical. Runs on a store whose outputs are planted (no training)."""

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from ffcv_transfer.cli import main as cli_main
from ffcv_transfer.config import load_experiment
from ffcv_transfer.store.experiment import create_class_store
from ffcv_transfer.store.results import ResultStore

from .conftest import DEMO_CONFIG
from .test_report import write_planted_store


@pytest.fixture(scope="module")
def work(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """A planted store, a store whose every row failed, outside checkpoints one of which is junk, a config
    and earlier outputs (a file, a folder, an influence) that no mistake may touch."""
    root = tmp_path_factory.mktemp("mistakes")
    store = write_planted_store(root / "store", tiny_data)[0]
    config = root / "config.yaml"
    config.write_text(DEMO_CONFIG.read_text().replace("out/demo/data", str(tiny_data)))
    failed = create_class_store(
        root / "failed", load_experiment(config, {"masks.num_models": 4, "masks.design": "random"})
    )
    for row in range(4):
        failed.writer().fail(row, "NaN loss at epoch 1")
    checkpoints = root / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "model0.pt").write_bytes(b"not a checkpoint")
    np.save(checkpoints / "masks.npy", np.ones((1, 5), bool))
    (root / "a_file").write_text("an earlier output\n")
    (root / "a_folder").mkdir()
    np.save(root / "influence.npy", np.arange(6.0).reshape(2, 3))
    (root / "names.tsv").write_text("# a space, not a tab\ncat kitty\n")
    (root / "names.tsv.gz").write_bytes(b"cat\tkitty\n")  # not compressed
    return {"root": root, "store": store, "failed": failed.path, "config": config, "checkpoints": checkpoints}


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under `root` by relative path: a file's sha256, a folder's mark."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        for path in sorted(root.rglob("*"))
    }


S, R = "{store}", "{root}"
CASES = {
    "explain --example out of range": (["explain", S, "--example", "9999"], "--example 9999: the target test examples"),
    "explain --k 0": (["explain", S, "--example", "0", "--k", "0"], "--k 0: expected a count of at least 1"),
    "subpopulation unknown --source-class": (["subpopulation", S, "--source-class", "nope"], "--source-class 'nope'"),
    "subpopulation unknown --target-class": (
        ["subpopulation", S, "--source-class", "0", "--target-class", "nope"],
        "--target-class 'nope': the target classes are target0",
    ),
    "subpopulation --k -1": (["subpopulation", S, "--source-class", "0", "--k", "-1"], "--k -1: expected a count"),
    "counterfactual --ks 99": (["counterfactual", S, "--ks", "99"], "--ks 99: the source set has 5 classes"),
    "counterfactual --seeds 0": (["counterfactual", S, "--seeds", "0"], "--seeds 0: expected a number of models"),
    "influence --max-memory inf": (["influence", S, "--max-memory", "inf", "--out", f"{R}/i.npy"], "--max-memory inf"),
    "influence --out a folder": (["influence", S, "--out", f"{R}/a_folder"], "a_folder: is a folder"),
    "influence --backend cupy without it": (
        ["influence", S, "--backend", "cupy", "--out", f"{R}/influence.npy"],
        "backend cupy: not available here",
    ),
    "rankings --names missing": (["rankings", S, "--names", f"{R}/missing.tsv"], "missing.tsv: no such names file"),
    "rankings --names with a malformed line": (
        ["rankings", S, "--names", f"{R}/names.tsv"],
        "{root}/names.tsv:2: expected KEY<TAB>NAME, got 'cat kitty'",
    ),
    "rankings --names .gz that is not gzip": (
        ["rankings", S, "--names", f"{R}/names.tsv.gz"],
        "{root}/names.tsv.gz: not gzip-compressed UTF-8 text of KEY<TAB>NAME lines",
    ),
    "report --names with a malformed line": (
        ["report", S, "--names", f"{R}/names.tsv", "--out", f"{R}/report.html"],
        "names.tsv:2: expected KEY<TAB>NAME",
    ),
    "rankings --out a file": (["rankings", S, "--out", f"{R}/a_file"], "a_file: is a file, not a folder"),
    "rankings --k 0": (["rankings", S, "--k", "0", "--out", f"{R}/rankings"], "--k 0: expected a count"),
    "report --counterfactual missing": (
        ["report", S, "--counterfactual", f"{R}/missing", "--out", f"{R}/report.html"],
        "--counterfactual",
    ),
    "report --k -3": (["report", S, "--k", "-3", "--out", f"{R}/report.html"], "--k -3: expected a count"),
    "leakage --top 0": (["leakage", S, "--top", "0"], "--top 0: expected a number of source images"),
    "leakage --min-similarity 2": (["leakage", S, "--min-similarity", "2"], "--min-similarity 2.0: a correlation"),
    "train --run.device=cuda without a GPU": (
        ["train", "--store", S, "--run.device=cuda"],
        "run.device cuda: this machine has no CUDA device",
    ),
    "train --model.width=inf": (["train", "--store", S, "--model.width=inf"], "model.width: expected a float (finite)"),
    "settings source.lr=inf": (
        ["settings", "--config", "{config}", "--source.lr=inf"],
        "source.lr: expected a float (finite), got 'inf'",
    ),
    "launch --poll-s -1": (["launch", "--store", S, "--poll-s", "-1"], "--poll-s -1.0: expected a positive number"),
    "masks --store under a file": (
        ["masks", "--config", "{config}", "--store", f"{R}/a_file/sub"],
        "a_file/sub: " + "{root}/a_file is a file, not a folder",
    ),
    "masks a count beyond memory": (
        [
            "masks",
            "--config",
            "{config}",
            "--store",
            f"{R}/huge",
            "--masks.num_models=10000000000000",
            "--masks.design=random",
        ],
        "masks.num_models 10000000000000: drawing their masks over 5 classes needs about",
    ),
    "masks whose models cannot take one step": (
        ["masks", "--config", "{config}", "--store", f"{R}/stuck", "--source.per_model_batch=1000"],
        "32 of 32 models (rows 0, 1, 2, 3, 4, 5, 6, 7 and 24 more) cannot take one training step",
    ),
    "transfer --checkpoints with a junk .pt": (
        ["transfer", "--store", f"{R}/imported", "--checkpoints", "{checkpoints}", "--config", "{config}"],
        "model0.pt: not a readable checkpoint",
    ),
    "write synthetic --noise -1": (["write", "synthetic", f"{R}/synthetic", "--noise", "-1"], "noise -1.0"),
    "write synthetic OUTDIR under a file": (
        ["write", "synthetic", f"{R}/a_file/synthetic"],
        "OUTDIR {root}/a_file/synthetic: {root}/a_file is a file, not a folder",
    ),
    "write imagefolder OUT under a file": (
        ["write", "imagefolder", f"{R}/a_folder", f"{R}/a_file/x.beton"],
        "OUT {root}/a_file/x.beton: {root}/a_file is a file, not a folder",
    ),
    "write imagefolder OUT a folder": (
        ["write", "imagefolder", f"{R}/a_folder", f"{R}/a_folder"],
        "OUT {root}/a_folder: is a folder, not a file",
    ),
    "write imagefolder --per-class -1": (
        ["write", "imagefolder", f"{R}/a_folder", f"{R}/x.beton", "--per-class", "-1"],
        "--per-class -1: expected a number of images of at least 1",
    ),
    "write cifar --chunk-size 0": (
        ["write", "cifar", f"{R}/a_folder", f"{R}/x.beton", "--split", "test", "--chunk-size", "0"],
        "--chunk-size 0: expected a number of examples of at least 1",
    ),
    "write target --num-workers -1": (
        ["write", "target", "cifar10", f"{R}/a_folder", f"{R}/target", "--num-workers", "-1"],
        "--num-workers -1: expected a number of writer processes of at least 0",
    ),
    "write target: an archive that is no archive": (
        ["write", "target", "cifar10", f"{R}/a_file", f"{R}/target_out"],
        "a_file: unreadable or truncated",
    ),
    "write cifar: an archive that is no archive": (
        ["write", "cifar", f"{R}/a_file", f"{R}/x.beton", "--split", "test"],
        "a_file: unreadable or truncated",
    ),
    "write imagenet OUTDIR a file": (
        ["write", "imagenet", f"{R}/a_file", "--val", f"{R}/a_folder"],
        "OUTDIR {root}/a_file: is a file, not a folder",
    ),
    "demo --workers -1": (["demo", "--out", f"{R}/demo", "--workers", "-1"], "--workers -1: expected a number"),
    "demo --data-dir missing": (
        ["demo", "--out", f"{R}/demo", "--data", "tiny-imagenet", "--data-dir", f"{R}/missing"],
        "missing: --data tiny-imagenet needs tiny-imagenet-200-300pc-jpg.tar.gz and cifar10-jpg.tar.gz",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_one_line_and_exit_2_before_any_work(case, work, capsys):
    argv, message = CASES[case]
    paths = {name: str(path) for name, path in work.items()}
    before = tree_digest(work["root"])
    assert cli_main([arg.format(**paths) for arg in argv]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ffcv-transfer: error: "), err
    assert message.format(**paths) in lines[0] and "Traceback" not in err, err
    assert tree_digest(work["root"]) == before


@pytest.mark.parametrize("command", [["train", "--no-progress"], ["launch"]])
def test_a_run_in_which_every_row_failed_exits_2_with_the_reasons(command, work, capsys):
    """Not a success: the reasons are named in one line (the status table is on stdout)."""
    assert cli_main([*command, "--store", str(work["failed"])]) == 2
    captured = capsys.readouterr()
    assert (
        captured.err
        == f"ffcv-transfer: error: {work['failed']}: every finished row failed (4): 4 x NaN loss at epoch 1\n"
    )
    assert "  completed        0\n" in captured.out and "  failed           4\n" in captured.out, captured.out


def test_store_status_skips_what_is_no_claim_and_names_a_claim_it_cannot_read(tmp_path, capsys):
    """Stray files in claims/ (a name that is no row, content that is no claim) are not live claims; a
    folder in a claim's place blocks its row, so it is one line naming it."""
    store = tmp_path / "s"
    ResultStore.create(store, 4, {"x": ((), "float32")})
    long_ago = time.time() - 60
    for name, text in {"notes": "a note", "9": "beyond the rows", "1": '{"worker": 5}', "2": '{"pid": 1}'}.items():
        (store / "claims" / f"{name}.claim").write_text(text)
        os.utime(store / "claims" / f"{name}.claim", (long_ago, long_ago))
    assert cli_main(["store", "status", str(store)]) == 0
    out = capsys.readouterr().out
    assert "  claimed          0\n  pending          4\n" in out, out
    (store / "claims" / "3.claim").mkdir()
    assert cli_main(["store", "status", str(store)]) == 2
    assert capsys.readouterr().err == (
        f"ffcv-transfer: error: {store}/claims/3.claim: not a readable claim file (Is a directory); remove it\n"
    )
