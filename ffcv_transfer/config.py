"""Experiment configuration: the sections of settings.py become fastargs sections, so a YAML file in
rs_configs/, `--section.name=value` on the command line and Python code all set the same things.
`load_experiment` resolves and validates them all at once; every problem is a ConfigError naming the file
(or the command line) and the setting."""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ffcv_transfer.settings import (
    RENAMED,
    SECTIONS,
    DataConfig,
    LoaderConfig,
    MaskConfig,
    ModelConfig,
    RunConfig,
    SourceConfig,
    Target,
    TransferConfig,
)

TARGETS = "targets"  # the experiment file's list of further targets
TARGET_KEYS = ("data.target_name", "data.target_train", "data.target_test")  # what a target recipe must name


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the file and the setting."""


@dataclass(frozen=True)
class Experiment:
    data: DataConfig
    masks: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    run: RunConfig = field(default_factory=RunConfig)
    extra_targets: tuple[Target, ...] = ()  # the experiment file's `targets:` list

    @property
    def targets(self) -> tuple[Target, ...]:
        """Every target, the data section's first."""
        d = self.data
        return (Target(d.target_name, d.target_train, d.target_test, self.transfer), *self.extra_targets)

    def target(self, name: str | None = None) -> Target:
        """The target called `name` (default: the first); an unknown name is a ConfigError listing them."""
        for target in self.targets:
            if name is None or target.name == name:
                return target
        raise ConfigError(f"--target {name}: this experiment's targets are {', '.join(t.name for t in self.targets)}")

    @property
    def transfers(self) -> tuple[tuple[str, str], ...]:
        """(target name, transfer mode) of every transfer of each source model, in the order they run."""
        return tuple((target.name, mode) for target in self.targets for mode in target.transfer.modes)

    def for_target(self, name: str | None = None, mode: str | None = None) -> Experiment:
        """This experiment with the one target `name` (in the one mode `mode` if given): what a store of
        one target's transfers (transfer_only.py) is made with."""
        target = self.target(name)
        transfer = target.transfer.for_mode(mode) if mode else target.transfer
        data = replace(self.data, target_name=target.name, target_train=target.train, target_test=target.test)
        return replace(self, data=data, transfer=transfer, extra_targets=())

    def to_dict(self) -> dict[str, Any]:
        tree: dict[str, Any] = {name: asdict(getattr(self, name)) for name in SECTIONS}
        if self.extra_targets:
            tree[TARGETS] = [
                {
                    "data": {"target_name": t.name, "target_train": t.train, "target_test": t.test},
                    "transfer": asdict(t.transfer),
                }
                for t in self.extra_targets
            ]
        return tree

    def to_yaml(self) -> str:
        """The experiment file's text (`load_experiment` reads it back)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def _value_type(annotation: Any) -> type:
    """int from `int`, `int | None` or Optional[int]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _checker(kind: type, choices: tuple[str, ...] | None):
    from fastargs.validation import Checker, OneOf

    class Parse(Checker):
        def check(self, value: Any) -> Any:
            if kind is bool:
                text = str(value).strip().lower()
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return text in ("true", "1", "yes")
            if kind in (int, float) and isinstance(value, bool):
                raise ValueError(value)  # YAML's true is no number
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if kind is float and not math.isfinite(float(value)):  # inf and nan pass every range check
                raise ValueError(value)
            return kind(value)

        def help(self) -> str:
            return f"one of {', '.join(choices)}" if choices else f"a {kind.__name__}{' (finite)' * (kind is float)}"

    return OneOf(list(choices)) if choices else Parse()


def _declare():
    from fastargs import Config, Param, Section

    config = Config()
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        params = {
            f.name: Param(
                _checker(_value_type(hints[f.name]), f.metadata.get("choices")),
                f.metadata.get("help", ""),
                default=None if f.default is MISSING else f.default,
                required=f.default is MISSING,
            )
            for f in fields(cls)
        }
        Section(name, (cls.__doc__ or name).strip().splitlines()[0], config_descriptor=config).params(**params)
    return config


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_experiment(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Settings from a YAML file (if given), then `overrides` ({"source.epochs": 4, ...}), then defaults.
    The file's `targets:` list adds targets: each a target recipe (TARGET_KEYS and transfer settings; see
    `_target_recipe`) over the experiment's own transfer section."""
    where = " + ".join(filter(None, [str(path) if path else "", "command line" if overrides else ""])) or "defaults"
    settings, recipes = _read_file(path) if path is not None else ({}, [])
    settings |= dict(overrides or {})
    experiment = _resolve(settings, where)
    extra = []
    for n, entry in enumerate(recipes):
        recipe, origin = _target_recipe(entry, Path(path).parent, f"{path}: targets[{n}]")
        extra.append(_resolve(settings | recipe, origin).targets[0])
    names = [t.name for t in (*experiment.targets[:1], *extra)]
    if len(set(names)) < len(names):
        raise ConfigError(f"{where}: target names must differ, got {', '.join(names)}")
    return replace(experiment, extra_targets=tuple(extra))


def with_target(experiment: Experiment, recipe_file: str | Path) -> Experiment:
    """`experiment` with the target of a recipe file (`_target_recipe`) added last, over its transfer
    section; a target of that name must not exist already, unless it is the same."""
    settings = _flatten({name: values for name, values in experiment.to_dict().items() if name != TARGETS})
    recipe, origin = _target_recipe(str(recipe_file), Path("."), str(recipe_file))
    added = _resolve(settings | recipe, origin).targets[0]
    known = {target.name: target for target in experiment.targets}
    if added.name in known:
        if known[added.name] != replace(added, transfer=replace(added.transfer, mode=known[added.name].transfer.mode)):
            raise ConfigError(f"{recipe_file}: target {added.name} exists in this experiment with another recipe")
        return experiment
    return replace(experiment, extra_targets=(*experiment.extra_targets, added))


def _read_file(path: str | Path) -> tuple[dict[str, Any], list]:
    """A YAML file's flattened settings and its `targets:` entries."""
    tree = _read_yaml(path)
    targets = tree.pop(TARGETS, None) or []
    if not isinstance(targets, list):
        raise ConfigError(f"{path}: targets: expected a list of target recipes (files or mappings)")
    return {RENAMED.get(key, key): value for key, value in _flatten(tree).items()}, targets


def _read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the configuration: {error}") from None
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{path}: expected sections (data:, source:, ...), found {type(tree).__name__}")
    return dict(tree)


def _target_recipe(entry: Any, folder: Path, where: str) -> tuple[dict[str, Any], str]:
    """(settings, origin) of one `targets:` entry: a recipe file's path (relative to the experiment file's
    folder, else the working directory; e.g. rs_configs/targets/flowers102.yaml) or an inline mapping of
    the same shape, optionally starting from a file named by its `recipe:` key. A recipe holds TARGET_KEYS
    and transfer settings, nothing else."""
    recipe: dict[str, Any] = {}
    if isinstance(entry, Mapping) and "recipe" in entry:
        entry = dict(entry)
        recipe, where = _target_recipe(entry.pop("recipe"), folder, where)
    if isinstance(entry, str):
        file = folder / entry if (folder / entry).is_file() else Path(entry)
        entry, where = _read_yaml(file), str(file)
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: a target is a recipe file's path or a mapping (data:, transfer:), got {entry!r}")
    recipe |= _flatten(entry)
    stray = sorted(key for key in recipe if key not in TARGET_KEYS and not key.startswith("transfer."))
    missing = [key for key in TARGET_KEYS if key not in recipe]
    if stray or missing:
        raise ConfigError(
            f"{where}: a target recipe holds {', '.join(TARGET_KEYS)} and transfer settings"
            + (f"; unexpected: {', '.join(stray)}" if stray else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    return recipe, where


def _resolve(settings: Mapping[str, Any], where: str) -> Experiment:
    """The experiment (one target) of flat settings over the defaults, every problem one ConfigError."""
    from fastargs.exceptions import MissingValueError

    known = {f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        hints = [
            f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(key, known, 1)) else key
            for key in unknown
        ]
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(hints)}; `ffcv-transfer settings` lists them")

    config = _declare()
    config.collect(dict(settings))
    problems = []
    for key, error in config.validate(mode="errordict").items():
        name = ".".join(key)
        if isinstance(error, MissingValueError):
            problems.append(f"{name} is required")
        else:
            problems.append(f"{name}: expected {config.entries[key].checker.help()}, got {settings.get(name)!r}")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    sections = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = cls(**{f.name: config[(name, f.name)] for f in fields(cls)})
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
    run, source = sections["run"], sections["source"]
    if run.fusion == "grouped" and source.per_model_batch:
        raise ConfigError(
            f"{where}: source.per_model_batch needs run.fusion sequential: the grouped network steps "
            "the K models together, on equal shares of each shared batch"
        )
    if run.compile != "none" and run.fusion == "sequential" and not source.per_model_batch:
        raise ConfigError(
            f"{where}: run.compile {run.compile} with run.fusion sequential needs "
            "source.per_model_batch (else each model's sub-batch changes size every step)"
        )
    return Experiment(**sections)


def describe_settings() -> str:
    """Every setting with its default and meaning, for --help."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        for f in fields(cls):
            default = "(required)" if f.default is MISSING else repr(f.default)
            choices = f.metadata.get("choices")
            extra = f" [{'|'.join(choices)}]" if choices else ""
            lines.append(f"  --{name + '.' + f.name:<26} {default:<14} {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)
