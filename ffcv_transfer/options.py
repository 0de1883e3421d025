"""`option(...)`: a dataclass field with a description and allowed values, from which config.py builds
the fastargs sections (so each setting is declared once, in the module that uses it)."""
from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any, Sequence


def option(default: Any = MISSING, help: str = "", choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")
