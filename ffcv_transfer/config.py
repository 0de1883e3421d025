"""Experiment configuration: the sections of settings.py become fastargs sections, so a YAML file in
rs_configs/, `--section.name=value` on the command line and Python code all set the same things.
`load_experiment` resolves and validates them all at once; every problem is a ConfigError naming the file
(or the command line) and the setting."""
from __future__ import annotations

import difflib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .settings import (RENAMED, SECTIONS, DataConfig, LoaderConfig, MaskConfig, ModelConfig, RunConfig, SourceConfig,
                       TransferConfig)


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

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(getattr(self, name)) for name in SECTIONS}

    def save(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


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
            return kind(value)

        def help(self) -> str:
            return f"one of {', '.join(choices)}" if choices else f"a {kind.__name__}"

    return OneOf(list(choices)) if choices else Parse()


def _declare():
    from fastargs import Config, Param, Section

    config = Config()
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        params = {f.name: Param(_checker(_value_type(hints[f.name]), f.metadata.get("choices")),
                                f.metadata.get("help", ""), default=None if f.default is MISSING else f.default,
                                required=f.default is MISSING)
                  for f in fields(cls)}
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
    """Settings from a YAML file (if given), then `overrides` ({"source.epochs": 4, ...}), then defaults."""
    import yaml
    from fastargs.exceptions import MissingValueError

    where = " + ".join(filter(None, [str(path) if path else "", "command line" if overrides else ""])) or "defaults"
    known = {f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in fields(cls)}
    settings: dict[str, Any] = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: cannot read the configuration: {error}") from None
        if not isinstance(tree, Mapping):
            raise ConfigError(f"{path}: expected sections (data:, source:, ...), found {type(tree).__name__}")
        settings |= {RENAMED.get(key, key): value for key, value in _flatten(tree).items()}
    settings |= dict(overrides or {})
    unknown = sorted(set(settings) - known)
    if unknown:
        hints = [f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(key, known, 1)) else key
                 for key in unknown]
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(hints)}; `ffcv-transfer settings` lists them")

    config = _declare()
    config.collect(settings)
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
