"""`ffcv-transfer report STORE`: one self-contained HTML page of the findings (figures embedded as PNG
data, no external files): rankings with bar charts, the planted ground truth when there is one,
subpopulations, explained mistakes, counterfactuals and leaks when they were run, the config and the
store's status."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np

from ffcv_transfer.findings.evidence import Evidence, planted_evidence, twins_on_top, wordnet_evidence
from ffcv_transfer.findings.plots import (
    accuracy_versus_removed,
    image_grid,
    influence_bars,
    influence_scatter,
    reliability_curves,
)
from ffcv_transfer.findings.rankings import (
    explain_example,
    influence_by_target_class,
    ranking_stderr,
    subpopulation,
    top_and_bottom,
)
from ffcv_transfer.findings.reliability import GOALS, Reliability, assess

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left}th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}figcaption{font-size:.85em;
color:#555}.banner{background:#fff4ce;border:1px solid #e0b300;padding:.7em 1em}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}
.ok{color:#1d7a37}.bad{color:#b3261e}
.grid{display:flex;flex-wrap:wrap;gap:1em}.grid figure{flex:1 1 480px}"""


@dataclass
class Page:
    """An HTML page built section by section; figures are read from disk and embedded."""

    title: str
    parts: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def figures(self, paths: Sequence[Path], captions: Sequence[str]) -> None:
        items = [
            f'<figure><img alt="{html.escape(c)}" src="data:image/png;base64,'
            f'{base64.b64encode(Path(p).read_bytes()).decode()}"><figcaption>{html.escape(c)}</figcaption>'
            f"</figure>"
            for p, c in zip(paths, captions)
        ]
        self.parts.append(f'<div class="grid">{"".join(items)}</div>')

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def banner(self, text: str) -> None:
        self.parts.append(f'<p class="banner">{html.escape(text)}</p>')

    def preformatted(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        body = "\n".join(self.parts)
        path.write_text(
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}'
            f"</title><style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>\n{body}\n"
            "</body></html>\n"
        )
        return path


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return f'<span class="{"ok" if value else "bad"}">{"yes" if value else "no"}</span>'
    if isinstance(value, float):
        return f"{value:+.3f}"
    return html.escape(str(value))


@dataclass
class Findings:
    """What the report shows, computed from a store (see `gather`)."""

    store: Path
    pooled: list[Path]  # further stores read as one with `store`
    output: str  # the per-example output the influence is on (experiment_store.OUTPUTS)
    target: str  # ... of this target
    mode: str  # ... in this transfer mode
    transfers: tuple[tuple[str, str], ...]  # the store's (target, mode) pairs (config.Experiment.transfers)
    influence: np.ndarray  # (C_source, T)
    labels: np.ndarray  # (T,) target test labels
    mean_outputs: np.ndarray  # (T,) over models
    stderr: np.ndarray  # (C_source, target classes + 1): errors of the by-class influences, then the overall's
    source_names: list[str]
    target_names: list[str]
    betons: dict[str, Path]
    planted: dict | None
    reliability: Reliability | None  # of every ranking (None with fewer than 4 models)
    wordnet: dict | None  # semantic.wordnet_agreement, for an ImageNet-derived source and CIFAR-10-named target

    @cached_property
    def evidence(self) -> list[Evidence]:
        """The checks against a known truth that this store allows (planted twins, WordNet)."""
        found = [planted_evidence(self.by_class, self.planted)] if self.planted else []
        wordnet = wordnet_evidence(self.wordnet) if self.wordnet else None
        return found + ([wordnet] if wordnet else [])

    @cached_property
    def by_class(self) -> np.ndarray:
        """(C_source, target classes): each source class's mean influence over each target class's examples."""
        return influence_by_target_class(self.influence, self.labels, len(self.target_names))


@dataclass(frozen=True)
class Classes:
    """What a store's findings are about, read from its sidecars without computing anything: what a command
    checks its arguments against before any work (`read_classes`)."""

    stores: list[Path]  # the stores `gather` reads (a later transfer's when --target/--mode chose one)
    target: str | None  # of these stores' experiment (None: its first)
    mode: str | None
    source_names: list[str]
    target_names: list[str]
    betons: dict[str, Path]
    labels: np.ndarray  # (T,) target test labels

    def source_class(self, value: str) -> int:
        """The source class `value` names (an index or a name); a ConfigError when none does."""
        from ffcv_transfer.config import ConfigError
        from ffcv_transfer.findings.names import class_index

        c = class_index(self.source_names, value)
        if c is None:
            raise ConfigError(
                f"--source-class {value!r}: not an index below {len(self.source_names)} nor a class name "
                f"(e.g. {', '.join(self.source_names[:3])})"
            )
        return c

    def target_class(self, value: str) -> int:
        """The target class named `value`; a ConfigError listing them when none is."""
        from ffcv_transfer.config import ConfigError

        if value not in self.target_names:
            raise ConfigError(f"--target-class {value!r}: the target classes are {', '.join(self.target_names)}")
        return self.target_names.index(value)

    def example(self, j: int) -> int:
        """`j` when it is a target test example; a ConfigError otherwise."""
        from ffcv_transfer.config import ConfigError

        if not 0 <= j < len(self.labels):
            raise ConfigError(f"--example {j}: the target test examples are 0-{len(self.labels) - 1}")
        return j


def read_classes(
    store_dir: str | Path | Sequence[str | Path],
    names_file: str | Path | None = None,
    mode: str | None = None,
    target: str | None = None,
) -> Classes:
    """The classes, betons and target labels of what `gather` reads (same arguments), from the experiment
    and the sidecars alone; a missing beton, names file or unknown target is an error here."""
    from ffcv_transfer.findings.names import display_names
    from ffcv_transfer.store.betons import read_labels
    from ffcv_transfer.store.experiment import later_transfer_stores, pooled_experiment, read_sidecars, target_sidecars

    store_dirs = [Path(store_dir)] if isinstance(store_dir, (str, Path)) else [Path(p) for p in store_dir]
    if later := later_transfer_stores(store_dirs, target, mode):
        return read_classes(later, names_file)
    experiment = pooled_experiment(store_dirs)
    sidecars = read_sidecars(experiment)
    chosen = experiment.target(target)
    sidecars |= target_sidecars(experiment)[chosen.name]
    betons = {split: experiment.data.path(split) for split in ("source_train", "source_val")}
    betons |= {split: chosen.path(experiment.data.root, split) for split in ("target_train", "target_test")}
    source = sidecars["source_train"]
    return Classes(
        stores=store_dirs,
        target=target,
        mode=mode,
        source_names=display_names(source["class_names"], source.get("wnids"), names_file),
        target_names=list(sidecars["target_test"]["class_names"]),
        betons=betons,
        labels=read_labels(betons["target_test"]),
    )


def gather(
    store_dir: str | Path | Sequence[str | Path],
    names_file: str | Path | None = None,
    progress: bool = False,
    output: str = "margins",
    mode: str | None = None,
    target: str | None = None,
    classes: Classes | None = None,
) -> Findings:
    """The findings of a store, or of several stores of one experiment read as one
    (`experiment_store.pooled_experiment`; `Findings.store` is then the first), on one of its per-example
    outputs (`experiment_store.OUTPUTS`) of one of its transfers (default: the first target's first
    mode), or of a transfer made later by `ffcv-transfer transfer` (STORE/transfers/TARGET/MODE).
    `classes`: `read_classes` these arguments when a caller has read them already."""
    from ffcv_transfer.findings.influence import influence_from_store
    from ffcv_transfer.store.experiment import (
        MASKS,
        OUTPUTS,
        pooled_experiment,
        read_sidecars,
        target_sidecars,
        transfer_field,
    )
    from ffcv_transfer.store.results import StoreError, open_stores

    classes = classes or read_classes(store_dir, names_file, mode, target)
    store_dirs, target, mode = classes.stores, classes.target, classes.mode
    experiment = pooled_experiment(store_dirs)
    chosen = experiment.target(target)
    sidecars = read_sidecars(experiment) | target_sidecars(experiment)[chosen.name]
    store = open_stores(store_dirs)
    if output not in OUTPUTS:
        raise StoreError(f"output {output!r} is not one of {', '.join(OUTPUTS)}")
    key = transfer_field(output, experiment, chosen.name, mode)
    if key not in store.schema:
        raise StoreError(
            f"{store_dirs[0]}: made before {output} was recorded; its outputs are "
            f"{', '.join(name for name in OUTPUTS if name in store.schema)}"
        )
    if not len(store.completed_rows()):
        failed = store.failures()
        if failed:  # every model failed: the reason is the user's to fix, not a missing training run
            row, reason = min(failed.items())
            raise StoreError(f"{store_dirs[0]}: no completed rows; {len(failed)} failed, e.g. row {row}: {reason}")
        raise StoreError(f"{store_dirs[0]}: no completed rows yet; run `ffcv-transfer train --store {store_dirs[0]}`")
    influence = influence_from_store(store_dirs, key, progress=progress)
    _, values = store.read([MASKS, key])
    outputs = values[key].astype(np.float64)
    labels, target_names = classes.labels, classes.target_names
    reliability = assess(values[MASKS], outputs, labels, target_names) if len(outputs) >= 4 else None
    return Findings(
        store=store_dirs[0],
        pooled=store_dirs[1:],
        output=output,
        target=chosen.name,
        mode=mode or chosen.transfer.modes[0],
        transfers=experiment.transfers,
        influence=influence,
        labels=labels,
        mean_outputs=outputs.mean(0),
        stderr=ranking_stderr(values[MASKS], outputs, labels, len(target_names)),
        source_names=classes.source_names,
        target_names=target_names,
        betons=classes.betons,
        planted=sidecars["target_test"].get("extra", {}).get("planted"),
        reliability=reliability,
        wordnet=semantic_check(influence, labels, sidecars["source_train"].get("wnids"), target_names),
    )


def findings_dir(store_dir: str | Path | Sequence[str | Path], out: str | Path | None = None) -> Path:
    """`out`, or else the (first) store's STORE/findings: the folder an analysis writes to, created."""
    first = store_dir if isinstance(store_dir, (str, Path)) else store_dir[0]
    folder = Path(out) if out else Path(first) / "findings"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_rankings(found: Findings, out: str | Path, k: int) -> tuple[dict[str, Any], list[Path], Path]:
    """The k most positive and most negative source classes over all target examples and for each target
    class, each with its standard errors and stated reliability, as bar charts OUT/rankings_N.png and
    OUT/rankings.json (with the WordNet agreement when there is one). Returns (the JSON's content, one
    chart per column in its order, the JSON's path)."""
    out = Path(out)
    columns = {"all target examples": (found.influence.mean(1), found.stderr[:, -1])}
    by_class = found.by_class
    columns |= {name: (by_class[:, t], found.stderr[:, t]) for t, name in enumerate(found.target_names)}
    stated = found.reliability.to_json()["columns"] if found.reliability else {}
    stated = {"all target examples": stated.get("overall"), **{name: stated.get(name) for name in found.target_names}}
    rankings: dict[str, Any] = {}
    charts = []
    for n, (name, (values, stderr)) in enumerate(columns.items()):
        rankings[name] = top_and_bottom(values, found.source_names, k, stderr) | {"reliability": stated[name]}
        charts.append(influence_bars(out / f"rankings_{n}.png", found.source_names, values, k, name, stderr))
    if found.wordnet:
        rankings["wordnet_agreement"] = found.wordnet
    (out / "rankings.json").write_text(json.dumps(rankings, indent=1) + "\n")
    return rankings, charts, out / "rankings.json"


def semantic_check(
    influence: np.ndarray, labels: np.ndarray, source_wnids: Sequence[str] | None, target_names: Sequence[str]
) -> dict | None:
    """The WordNet agreement of the rankings (semantic.wordnet_agreement) when the source classes are
    ImageNet wnids, some target class is a CIFAR-10 concept, and the hierarchy is at hand
    ($FFCV_TRANSFER_DATA/imagenet-meta); else None."""
    from ffcv_transfer.findings.wordnet import CIFAR10_CONCEPTS, load_hierarchy, wordnet_agreement

    if not source_wnids or not any(CIFAR10_CONCEPTS.get(name) for name in target_names):
        return None
    try:
        hierarchy = load_hierarchy()
    except ValueError:
        return None
    by_class = influence_by_target_class(influence, labels, len(target_names))
    return wordnet_agreement(by_class, source_wnids, target_names, hierarchy=hierarchy)


def write_report(
    store_dir: str | Path,
    out: str | Path | None = None,
    *,
    k: int = 5,
    counterfactual_dir: str | Path | None = None,
    names_file: str | Path | None = None,
    progress: bool = False,
    found: Findings | None = None,
    output: str = "margins",
    mode: str | None = None,
    target: str | None = None,
) -> Path:
    """Write the report (default STORE/report.html, figures in a folder beside it); returns its path.
    `found`: this store's findings when already gathered (the store is not read again)."""
    from ffcv_transfer.store.betons import BetonRecords
    from ffcv_transfer.store.results import ResultStore, format_status

    found = found or gather(store_dir, names_file, progress, output, mode, target)
    out = Path(out) if out else found.store / "report.html"
    figures = out.parent / f"{out.stem}_figures"
    page = Page(f"ffcv-transfer findings: {found.store.name}")
    stores = [found.store, *found.pooled]
    statuses = [ResultStore(path).status() for path in stores]
    completed, failed = sum(s["completed"] for s in statuses), sum(s["failed"] for s in statuses)
    where = f"store {found.store}" if not found.pooled else f"stores {', '.join(map(str, stores))}, read as one"
    page.text(
        f"{completed} models completed ({failed} failed) in {where}; "
        f"{found.influence.shape[0]} source classes, {found.influence.shape[1]} target test examples. "
        f"Influence of a source class on a target example: its mean {found.output} over the models "
        "trained with the class minus over those without."
    )
    if found.reliability and (banner := found.reliability.banner(found.evidence)):
        page.banner(banner)

    by_class = found.by_class
    overall = found.influence.mean(1)
    page.heading("Most helpful and most harmful source classes")
    paths = [
        influence_bars(
            figures / "overall.png", found.source_names, overall, k, "whole target test set", found.stderr[:, -1]
        )
    ]
    paths += [
        influence_bars(
            figures / f"target_{t}.png",
            found.source_names,
            by_class[:, t],
            k,
            f"target class {name}",
            found.stderr[:, t],
        )
        for t, name in enumerate(found.target_names)
    ]
    page.figures(
        paths,
        ["mean over all target test examples"]
        + [f"mean over the test examples of {name}" for name in found.target_names],
    )
    best = top_and_bottom(overall, found.source_names, k)
    page.table(
        ["most positive", "influence", "most negative", "influence"],
        [
            (p["source"], p["influence"], n["source"], n["influence"])
            for p, n in zip(best["positive"], best["negative"])
        ],
    )
    if found.reliability:
        _reliability_section(page, found.reliability, figures)
    if found.wordnet:
        _wordnet_section(page, found.wordnet)
    if found.planted:
        _planted_section(page, found, by_class)
    if len(found.transfers) > 1:
        _transfers_section(page, found, overall, figures, k)

    target_images, source_images = BetonRecords(found.betons["target_test"]), BetonRecords(found.betons["source_val"])
    _subpopulations(page, found, overall, target_images, figures, k)
    _mistakes(page, found, target_images, source_images, figures)
    if counterfactual_dir and (Path(counterfactual_dir) / "spec.json").exists():
        _counterfactual_section(page, Path(counterfactual_dir), figures)
    page.heading("Run")
    for path, status in zip(stores, statuses):
        page.preformatted(format_status(status, path))
    page.preformatted((found.store / "experiment.yaml").read_text())
    return page.write(out)


def _reliability_section(page: Page, reliability: Reliability, figures: Path) -> None:
    """Per ranking: split-half reliability, significant source classes, models for each goal, and the
    projected curves (docs/reliability.md)."""
    page.heading("How far the rankings can be trusted")
    page.text(
        f"Split-half reliability: the Spearman correlation of a ranking between two random halves of the "
        f"{reliability.num_models} models ({reliability.splits} splits), projected to all of them "
        f"(Spearman-Brown); significant: source classes whose influence differs from zero at a "
        f"Benjamini-Hochberg false-discovery rate of {reliability.q_level}; models needed: where the "
        "projected reliability reaches each goal, noise falling as 1/sqrt(models)."
    )
    rows = []
    for k, name in enumerate(reliability.columns):
        needed = [reliability.models_needed[goal][k] for goal in GOALS]
        rows.append(
            (
                name,
                f"{reliability.reliability[k]:.2f}",
                len(reliability.significant[k]),
                *("not measurable" if n is None else n for n in needed),
                "yes" if k not in reliability.flagged() else "not yet",
            )
        )
    page.table(
        [
            "ranking",
            f"reliability at {reliability.num_models} models",
            "significant source classes",
            *(f"models for {goal}" for goal in GOALS),
            "reliable",
        ],
        rows,
    )
    page.figures(
        [
            reliability_curves(
                figures / "reliability.png",
                reliability.columns,
                reliability.reliability,
                reliability.num_models,
                reliability.threshold,
                GOALS[0],
            )
        ],
        ["each ranking's reliability against the number of models (projected)"],
    )


def _wordnet_section(page: Page, agreement: dict) -> None:
    """Where the source classes WordNet files under each target class rank in its ranking."""
    page.heading("Agreement with WordNet")
    page.text(
        f"For each target class, the source classes WordNet places under its concept "
        f"(semantic.CIFAR10_CONCEPTS), and the AUC of their influence against the other source classes "
        f"(0.5: chance). Mean AUC over the {len(agreement['scored'])} classes with members "
        f"{_number(agreement['mean_auc'])}, one-sided permutation p = {_number(agreement['p_value'], 4)} "
        f"({agreement['permutations']} joint relabellings of the source classes)."
    )
    page.table(
        ["target class", "AUC", "p", "members"],
        [
            (name, _number(entry["auc"]), _number(entry["p_value"], 4), ", ".join(entry["member_names"]) or "none")
            for name, entry in agreement["classes"].items()
        ],
    )


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _transfers_section(page: Page, found: Findings, overall: np.ndarray, figures: Path, k: int) -> None:
    """Each transfer's (target, mode) target accuracy and most positive / negative source classes, and,
    for the other modes of the shown target, how their overall influence agrees with the shown one's
    (Spearman correlation, scatter plot)."""
    from ffcv_transfer.findings.influence import influence_from_store
    from ffcv_transfer.store.experiment import ACCURACY_FIELDS, pooled_experiment, transfer_field
    from ffcv_transfer.store.results import open_stores

    stores = [found.store, *found.pooled]
    experiment = pooled_experiment(stores)
    targets = {name for name, _ in found.transfers}
    page.heading("Transfers")
    page.text(
        f"The same source models, transferred {len(found.transfers)} ways ({len(targets)} target"
        f"{'s' * (len(targets) > 1)}). Above: {found.target}, {found.mode}."
    )
    rows, paths, captions = [], [], []
    for target, mode in found.transfers:
        field = partial(transfer_field, experiment=experiment, target=target, mode=mode)
        shown = (target, mode) == (found.target, found.mode)
        values = overall if shown else influence_from_store(stores, field(found.output)).mean(1)
        metric = experiment.target(target).transfer.metric
        name = field(ACCURACY_FIELDS[metric])
        accuracy = open_stores(stores).read([name])[1][name]
        best = top_and_bottom(values, found.source_names, k)
        same_target = target == found.target
        rows.append(
            (
                target,
                mode,
                f"{accuracy.mean():.3f} ({metric})",
                _spearman(values, overall) if same_target else "",
                ", ".join(p["source"] for p in best["positive"]),
                ", ".join(n["source"] for n in best["negative"]),
            )
        )
        if same_target and not shown:
            paths.append(
                influence_scatter(
                    figures / f"modes_{target}_{mode}.png",
                    overall,
                    values,
                    found.source_names,
                    f"{found.mode}",
                    f"{mode}",
                    f"overall influence on {found.output}",
                )
            )
            captions.append(f"each source class's overall influence on {target}: {found.mode} against {mode}")
    page.table(
        ["target", "mode", "target accuracy", f"Spearman with {found.mode}", "most positive", "most negative"], rows
    )
    page.figures(paths, captions)


def _spearman(a: np.ndarray, b: np.ndarray) -> str:
    ranks = [np.argsort(np.argsort(v, kind="stable"), kind="stable") for v in (a, b)]
    return f"{np.corrcoef(*ranks)[0, 1]:.2f}"


def _planted_section(page: Page, found: Findings, by_class: np.ndarray) -> None:
    planted = found.planted
    page.heading("Planted ground truth (synthetic data)")
    page.text(
        "Each target class has a source 'twin' that shares its visual feature: it should be the target's "
        "most positive source class. A misleading class teaches a shortcut that fails on the test set: "
        "it should be negative for its target."
    )
    rows = []
    on_top = twins_on_top(by_class, planted)
    for t, twin in sorted(planted["twin"].items(), key=lambda item: int(item[0])):
        rows.append(
            (
                found.target_names[int(t)],
                found.source_names[twin],
                float(by_class[twin, int(t)]),
                found.source_names[int(np.nanargmax(by_class[:, int(t)]))],
                on_top[t],
            )
        )
    page.table(["target class", "planted twin", "twin's influence", "most positive class", "twin on top"], rows)
    for m in planted["misleading"]:
        value = float(by_class[m["source"], m["target"]])
        page.text(
            f"{found.source_names[m['source']]} on {found.target_names[m['target']]}: {value:+.3f} "
            f"({'negative, as planted' if value < 0 else 'NOT negative'})"
        )


def _subpopulations(page: Page, found: Findings, overall: np.ndarray, images, figures: Path, k: int) -> None:
    page.heading("Subpopulations: the target images each helpful source class influences most")
    paths, captions = [], []
    for c in np.argsort(-overall, kind="stable")[: min(3, k)]:
        chosen = subpopulation(found.influence, int(c), 8)
        paths.append(
            image_grid(
                figures / f"subpopulation_{c}.png",
                [images.image(int(j)) for j in chosen],
                [f"#{j} {found.target_names[found.labels[j]]}\n{found.influence[c, j]:+.2f}" for j in chosen],
                f"most influenced by {found.source_names[c]}",
            )
        )
        captions.append(f"source class {found.source_names[c]}")
    page.figures(paths, captions)


def _mistakes(page: Page, found: Findings, target_images, source_images, figures: Path, count: int = 3) -> None:
    page.heading("Explaining mistakes: target examples and their most negative source classes")
    worst = np.argsort(found.mean_outputs, kind="stable")[:count]
    rows, paths, captions = [], [], []
    for j in worst:
        negative = explain_example(found.influence, int(j), 3)
        rows.append(
            (
                int(j),
                found.target_names[found.labels[j]],
                float(found.mean_outputs[j]),
                ", ".join(f"{found.source_names[c]} ({found.influence[c, j]:+.2f})" for c in negative),
            )
        )
        paths.append(
            explanation_grid(
                figures / f"mistake_{j}.png", found, int(j), negative, target_images, source_images, per_class=3
            )
        )
        captions.append(f"target example {j}")
    page.table(["example", "true class", f"mean {found.output}", "most negative source classes"], rows)
    page.figures(paths, captions)


def explanation_grid(
    path: Path, found: Findings, example: int, classes: Sequence[int], target_images, source_images, per_class: int
) -> Path:
    """Target test example `example` followed by `per_class` source images of each of `classes`."""
    shown, captions = [target_images.image(example)], [f"target #{example}"]
    for c in classes:
        for i in np.flatnonzero(source_images.labels == c)[:per_class]:
            shown.append(source_images.image(int(i)))
            captions.append(found.source_names[c])
    return image_grid(
        path, shown, captions, f"target example {example} and its most negative source classes", columns=5
    )


def _counterfactual_section(page: Page, path: Path, figures: Path) -> None:
    from ffcv_transfer.findings.counterfactual import (
        accuracy_by_arm,
        accuracy_by_removal,
        changes_against_all,
        format_gain,
    )
    from ffcv_transfer.store.results import ResultStore

    arms = accuracy_by_arm(ResultStore(path))
    baseline, curves = accuracy_by_removal(arms)
    changes = changes_against_all(arms)
    page.heading("Counterfactuals: retrained without chosen source classes")
    plot = accuracy_versus_removed(
        figures / "counterfactual.png", curves, baseline, "target accuracy after removing k source classes", changes
    )
    page.figures([plot], [f"store {path}"])
    page.table(
        [
            "removed",
            "k",
            "models",
            "mean target accuracy",
            "change against all classes, seed by seed (± standard error)",
        ],
        [("none", 0, len(baseline), float(np.mean(baseline)), "")]
        + [
            (kind, k, len(accuracies), float(np.mean(accuracies)), format_gain(changes[kind][k]))
            for kind, by_k in curves.items()
            for k, accuracies in sorted(by_k.items())
        ],
    )
    (figures / "counterfactual.json").write_text(json.dumps({"baseline": baseline, "curves": curves}, indent=1))
