"""The analyses and the HTML report on a store whose outputs are planted (no training): margins are a known
linear function of the class masks, so every ranking has an exact expected answer. The page is opened in
headless Chromium, which must load every image without a script error."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from ffcv_transfer.config import load_experiment
from ffcv_transfer.findings.rankings import explain_example, influence_by_target_class, subpopulation, top_and_bottom
from ffcv_transfer.findings.report import gather, write_report
from ffcv_transfer.store.betons import read_labels, read_sidecar
from ffcv_transfer.store.experiment import create_class_store
from ffcv_transfer.store.results import ResultStore

from .conftest import DEMO_CONFIG, row_values
from .system_packages import apt_install

MODELS = 16


def write_planted_store(store_dir, tiny_data, seed: int = 0):
    """Margins = 2 x (expected sign of each included class for the example's target class) + small noise."""
    experiment = load_experiment(
        DEMO_CONFIG,
        {"data.root": str(tiny_data), "masks.num_models": MODELS, "masks.design": "orthogonal", "masks.seed": seed},
    )
    store = create_class_store(store_dir, experiment)
    planted = read_sidecar(tiny_data / "target_test.beton")["extra"]["planted"]
    labels = read_labels(tiny_data / "target_test.beton")
    masks = store.fixed("masks")
    effect = 2.0 * np.asarray(planted["expected_sign"], float)[:, labels]  # (C, T)
    margins = masks @ effect + np.random.default_rng(seed).normal(0, 0.1, (MODELS, len(labels)))
    store.writer().write_many(
        range(MODELS),
        **row_values(store, MODELS, margins=margins, is_correct=margins > 0, target_acc=(margins > 0).mean(1)),
    )
    return store_dir, planted, labels, effect


@pytest.fixture(scope="module")
def planted_store(tiny_data, tmp_path_factory):
    return write_planted_store(tmp_path_factory.mktemp("report") / "store", tiny_data)


def test_two_stores_of_one_experiment_read_as_one(planted_store, tiny_data, tmp_path):
    """`rankings S1 S2` and `report S1 S2`: the influence of both stores' 32 models, outputs beside S1."""
    from ffcv_transfer.cli import main as cli_main
    from ffcv_transfer.findings.kernel import class_influence

    first, planted, labels, effect = planted_store
    second = write_planted_store(tmp_path / "second", tiny_data, seed=1)[0]
    found = gather([first, second])
    values = [ResultStore(path).read(["masks", "margins"])[1] for path in (first, second)]
    both = class_influence(
        np.concatenate([v["masks"] for v in values]), np.concatenate([v["margins"] for v in values]).astype(np.float64)
    )
    np.testing.assert_allclose(found.influence, both, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(found.influence, effect, atol=0.2)
    out = tmp_path / "findings"
    assert cli_main(["rankings", str(first), str(second), "--out", str(out)]) == 0 and (out / "rankings.json").exists()
    page = write_report([first, second], tmp_path / "pooled.html").read_text()
    assert "32 models completed (0 failed)" in page and "read as one" in page


def test_rankings_recover_the_planted_effects(planted_store):
    store_dir, planted, labels, effect = planted_store
    from ffcv_transfer.findings.influence import influence_from_store

    influence = influence_from_store(str(store_dir), "margins")
    np.testing.assert_allclose(influence, effect, atol=0.2)  # orthogonal design: each effect exactly, plus noise
    by_class = influence_by_target_class(influence, labels, len(planted["target_names"]))
    for t, twin in planted["twin"].items():
        assert top_and_bottom(by_class[:, int(t)], planted["source_names"], 2)["positive"][0]["index"] == twin
    first_of_target0 = int(np.flatnonzero(labels == 0)[0])
    assert planted["twin"]["0"] not in explain_example(influence, first_of_target0, 2)
    chosen = subpopulation(influence, planted["twin"]["1"], 5)
    assert (labels[chosen] == 1).all()  # the twin of target 1 influences target-1 images only
    found = gather(store_dir)  # the rankings' standard errors: two-group errors of the per-model class means
    _, values = ResultStore(store_dir).read(["masks", "margins"])
    twin, means = planted["twin"]["0"], values["margins"].astype(np.float64)[:, labels == 0].mean(1)
    inside, outside = means[values["masks"][:, twin]], means[~values["masks"][:, twin]]
    assert found.stderr.shape == (len(planted["source_names"]), len(planted["target_names"]) + 1)
    assert found.stderr[twin, 0] == pytest.approx(
        np.sqrt(inside.var(ddof=1) / len(inside) + outside.var(ddof=1) / len(outside)), rel=1e-4
    )


def test_any_recorded_output_can_be_the_influences_output(planted_store, tiny_data, tmp_path, capsys):
    """`--output is_correct`: the influence on being right (chosen in every analysis); a store made before
    p_correct was recorded says so."""
    import json

    from ffcv_transfer.cli import main as cli_main
    from ffcv_transfer.findings.kernel import class_influence
    from ffcv_transfer.store.experiment import create_store
    from ffcv_transfer.store.results import StoreError

    store_dir = planted_store[0]
    found = gather(store_dir, output="is_correct")
    _, values = ResultStore(store_dir).read(["masks", "is_correct"])
    np.testing.assert_allclose(
        found.influence, class_influence(values["masks"], values["is_correct"].astype(float)), atol=1e-6
    )
    assert found.output == "is_correct" and np.allclose(found.mean_outputs, values["is_correct"].mean(0))
    out = tmp_path / "findings"
    assert cli_main(["rankings", str(store_dir), "--output", "is_correct", "--out", str(out)]) == 0
    overall = json.loads((out / "rankings.json").read_text())["all target examples"]
    assert overall["positive"][0]["influence"] == pytest.approx(float(found.influence.mean(1).max()), abs=1e-3)
    with pytest.raises(SystemExit):  # not a choice: argparse's usage error
        cli_main(["rankings", str(store_dir), "--output", "logits"])
    assert "invalid choice: 'logits'" in capsys.readouterr().err

    create_store(tmp_path / "old", ResultStore(store_dir).fixed("masks")[:4], len(planted_store[2]))
    (tmp_path / "old" / "experiment.yaml").write_text((store_dir / "experiment.yaml").read_text())
    spec = json.loads((tmp_path / "old" / "spec.json").read_text())
    for name in ("p_correct", "correct_logit", "target_mean_class_acc"):  # as stores were before these fields
        del spec["schema"][name]
    (tmp_path / "old" / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(StoreError, match="made before p_correct was recorded; its outputs are margins, is_correct"):
        gather(tmp_path / "old", output="p_correct")


@pytest.fixture(scope="module")
def report_page(planted_store, tmp_path_factory):
    return write_report(planted_store[0], tmp_path_factory.mktemp("page") / "report.html")


def test_report_is_self_contained_and_shows_every_twin_on_top(planted_store, report_page):
    text = report_page.read_text()
    assert 'src="data:image/png;base64,' in text and not re.search(r'src="(?!data:)', text)
    assert text.count('<td><span class="ok">yes</span></td>') == len(planted_store[1]["twin"])


@pytest.mark.system
def test_report_renders_in_chromium_with_every_image_and_no_script_error(report_page, tmp_path):
    text = report_page.read_text()
    try:
        apt_install(["chromium"], ["chromium"])
    except PermissionError as e:
        pytest.skip(f"no browser for the report test: {e}")
    browser = shutil.which("chromium")
    checked = tmp_path / "checked.html"
    probe = (
        "<script>window.__errors=[];addEventListener('error',e=>__errors.push(e.message));"
        "addEventListener('load',()=>{const bad=[...document.images].filter(i=>!(i.complete&&i.naturalWidth>0));"
        "document.body.dataset.images=document.images.length;document.body.dataset.broken=bad.length;"
        "document.body.dataset.errors=__errors.length;});</script>"
    )
    checked.write_text(text.replace("<head>", "<head>" + probe, 1))
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
            checked.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    body = re.search(r"<body([^>]*)>", result.stdout)
    assert body, f"chromium printed no page: {result.stderr[-2000:]}"
    attributes = dict(re.findall(r'data-(\w+)="(\d+)"', body.group(1)))
    assert int(attributes["images"]) == text.count("<img") > 5
    assert attributes["broken"] == "0" and attributes["errors"] == "0"


def test_the_findings_state_how_far_their_rankings_can_be_trusted(planted_store, tiny_data, tmp_path, capsys):
    """Planted effects 20x the noise: in every ranking the planted classes are significant (the order of the
    null classes between them, and so the split-half reliability, stays noise), no banner. The same masks
    with margins of pure noise: the report and `rankings` carry the banner, and rankings.json says which
    rankings are not reliable."""
    import json

    from ffcv_transfer.cli import main as cli_main

    first, planted = planted_store[:2]
    found = gather(first)
    assert found.reliability.banner(found.evidence) is None
    assert found.reliability.verdict(found.evidence).level == "reliable"
    for t, twin in planted["twin"].items():
        assert twin in found.reliability.significant[int(t)]
    page = write_report(first, tmp_path / "planted.html", found=found).read_text()
    assert "How far the rankings can be trusted" in page and 'class="banner"' not in page

    noise = tmp_path / "noise"
    store = create_class_store(noise, load_experiment(first / "experiment.yaml"))
    margins = np.random.default_rng(5).normal(0, 1, (MODELS, store.schema["margins"][0][0]))
    store.writer().write_many(range(MODELS), **row_values(store, MODELS, margins=margins))
    page = write_report(noise, tmp_path / "noise.html").read_text()
    assert 'class="banner"' in page and "No signal shown yet: with 16 models these rankings" in page
    capsys.readouterr()
    assert cli_main(["rankings", str(noise), "--out", str(tmp_path / "findings")]) == 0
    assert "No signal shown yet: with 16 models" in capsys.readouterr().out
    saved = json.loads((tmp_path / "findings" / "rankings.json").read_text())
    assert saved["all target examples"]["reliability"]["reliable"] is False


def test_a_store_whose_every_model_failed_says_why(planted_store, tmp_path):
    """No completed row: with failures, `gather` names one and its reason instead of asking for training."""
    from ffcv_transfer.store.results import StoreError

    store = create_class_store(tmp_path / "failed", load_experiment(planted_store[0] / "experiment.yaml"))
    with pytest.raises(StoreError, match="no completed rows yet; run `ffcv-transfer train"):
        gather(store.path)
    writer = store.writer()
    for row in range(MODELS):
        writer.claim(1, rows=[row])
        writer.fail(
            row,
            "source training: no training step: fewer of its classes' examples in an epoch than "
            "one per-model batch (64)",
        )
    writer.close()
    with pytest.raises(StoreError, match=f"{MODELS} failed, e.g. row 0: source training: no training step"):
        gather(store.path)


def test_a_source_class_by_name_or_index_and_a_wrong_one_is_a_one_line_error(planted_store, tmp_path, capsys):
    from ffcv_transfer.cli import main as cli_main
    from ffcv_transfer.findings.names import class_index

    names = ["cat", "dog", "7"]
    assert [class_index(names, value) for value in ("0", "dog", "2", "7", "3", "emu")] == [0, 1, 2, 2, None, None]
    store_dir = planted_store[0]
    found = gather(store_dir)
    out = tmp_path / "findings"
    for value in ("1", found.source_names[1]):
        assert cli_main(["subpopulation", str(store_dir), "--source-class", value, "--k", "4", "--out", str(out)]) == 0
        assert f"images: {out / 'subpopulation_1.png'}" in capsys.readouterr().out
    assert cli_main(["subpopulation", str(store_dir), "--source-class", "emu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffcv-transfer: error: --source-class 'emu': not an index below") and err.count("\n") == 1


def test_influence_of_a_transfer_mode_is_read_from_its_field(planted_store, tmp_path):
    """`ffcv-transfer influence --mode M`: the experiment's own mode is a field of the store (the first mode
    the bare name); a mode it does not have is a ConfigError naming its modes."""
    from ffcv_transfer.config import ConfigError
    from ffcv_transfer.findings.influence import transfer_outputs, write_influence
    from ffcv_transfer.findings.kernel import class_influence
    from ffcv_transfer.store.experiment import open_experiment

    store_dir = planted_store[0]
    first_mode = open_experiment(store_dir).targets[0].transfer.modes[0]
    assert transfer_outputs([store_dir], "margins", mode=first_mode) == ([store_dir], "margins")
    with pytest.raises(ConfigError, match="--mode nope: this store's transfer modes are"):
        transfer_outputs([store_dir], "margins", mode="nope")
    [written] = write_influence([store_dir], tmp_path / "infl.npy", mode=first_mode, backend="numpy")
    values = ResultStore(store_dir).read(["masks", "margins"])[1]
    expected = class_influence(values["masks"], values["margins"].astype(np.float64), backend="numpy")
    np.testing.assert_allclose(np.load(written), expected, rtol=1e-5, atol=1e-6)


def test_counterfactual_command_removes_the_most_negative_class_and_reports_each_arm(
    planted_store, tmp_path, monkeypatch, capsys
):
    """`counterfactual` without training: the worker is replaced by one that scores each removal model 0.6
    when the class it lacks is the most negative by mean influence (float64 reference), else 0.5."""
    from ffcv_transfer.cli import main as cli_main
    from ffcv_transfer.engine import worker
    from ffcv_transfer.findings.counterfactual import KINDS

    from .conftest import influence_reference

    store_dir = planted_store[0]
    values = ResultStore(store_dir).read(["masks", "margins"])[1]
    harmful = int(np.argmin(influence_reference(values["masks"], values["margins"]).mean(1)))

    def scored(path, experiment, **kwargs):
        removal = ResultStore(path)
        masks = removal.fixed("masks")
        accuracy = np.where(masks.all(1), 0.55, np.where(~masks[:, harmful], 0.6, 0.5)).astype(np.float32)
        removal.writer().write_many(
            range(removal.num_rows), **row_values(removal, removal.num_rows, target_acc=accuracy)
        )
        return removal.num_rows

    monkeypatch.setattr(worker, "run_worker", scored)
    out = tmp_path / "cf"
    argv = ["counterfactual", str(store_dir), "--ks", "1", "--seeds", "2", "--kinds", "most_negative", "random"]
    assert cli_main([*argv, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    removal = ResultStore(out / "counterfactual")
    kinds = removal.fixed("removal")[:, 0]
    negative = removal.fixed("masks")[kinds == KINDS.index("most_negative")]
    assert (negative.sum(1) == negative.shape[1] - 1).all() and not negative[:, harmful].any()
    assert "all classes: 0.5500 target accuracy (2 models)" in printed
    assert "without 1 most negative: 0.6000 (2 models; against all classes, seed by seed: +0.0500" in printed
    assert (out / "counterfactual.png").exists() and (out / "counterfactual.json").exists()


def test_influence_pools_stores_as_rankings_and_report_do(planted_store, tiny_data, tmp_path, capsys):
    """`influence S1 S2` writes the influence of both stores' models; a store given twice, or two stores that
    drew the same masks (equal masks.seed), are refused before anything is written, as `rankings` refuses."""
    from ffcv_transfer.cli import main as cli_main

    from .conftest import influence_reference

    first = planted_store[0]
    second = write_planted_store(tmp_path / "second", tiny_data, seed=1)[0]
    same_seed = write_planted_store(tmp_path / "same_seed", tiny_data, seed=0)[0]
    out = tmp_path / "infl.npy"
    assert cli_main(["influence", str(first), str(second), "--out", str(out)]) == 0
    values = [ResultStore(path).read(["masks", "margins"])[1] for path in (first, second)]
    expected = influence_reference(*(np.concatenate([v[k] for v in values]) for k in ("masks", "margins")))
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-4, atol=1e-4)
    before = out.read_bytes()
    capsys.readouterr()
    for stores, message in [([first, first], "given twice"), ([first, same_seed], "drew the same masks")]:
        assert cli_main(["influence", *map(str, stores), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert cli_main(["rankings", *map(str, stores), "--out", str(tmp_path / "r")]) == 2
        assert message in capsys.readouterr().err
    assert out.read_bytes() == before
