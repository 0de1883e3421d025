"""What the `ffcv-transfer` command groups share: `--section.name=value` settings, row ranges, the
kernel's memory limit, and the experiment a command runs (a YAML file, or the one saved in its store).
Imports nothing slow."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

DATA_ENV = "FFCV_TRANSFER_DATA"
SETTINGS_HELP = "Any setting can be overridden as --section.name=value; `ffcv-transfer settings` lists them all."


def add_memory_option(parser: argparse.ArgumentParser, whole_process: bool) -> None:
    """--max-memory GIB: with `whole_process`, the process's resident memory (`influence`); else the
    kernel's working set, to which the process adds about 60 MiB (`leakage`)."""
    bounded = (
        "the whole process's resident memory in GiB (default: 2): what it holds before computing (Python and "
        "its libraries, about 60 MiB) and the store's read buffer are counted, and the kernel makes more passes "
        "over narrower blocks to stay within the rest"
        if whole_process
        else "the kernel's working set in GiB (default: 2); beyond it the kernel makes more passes over narrower "
        "blocks. The process holds about 60 MiB more: Python and its libraries, read buffers, BLAS's threads"
    )
    parser.add_argument(
        "--max-memory", type=float, default=2.0, metavar="GIB", help=f"{bounded} (docs/findings.md, Memory)"
    )


def add_output_option(parser: argparse.ArgumentParser, flags: tuple[str, ...] = ("--output",)) -> None:
    from ffcv_transfer.store.experiment import OUTPUTS

    parser.add_argument(
        *flags,
        dest="output",
        default="margins",
        choices=OUTPUTS,
        help="the per-example output influence is computed on (default: margins)",
    )
    add_mode_option(parser)


def add_mode_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        help="of a store with several targets (the experiment's `targets:`), or a "
        "target added by `ffcv-transfer transfer`, the one analysed (default: the first)",
    )
    parser.add_argument(
        "--mode", help="of that target's transfer modes (transfer.mode), the one analysed (default: the first)"
    )


def max_bytes_of(args: argparse.Namespace) -> int:
    """`--max-memory` in bytes, checked."""
    from ffcv_transfer.config import ConfigError

    if not (args.max_memory > 0 and math.isfinite(args.max_memory)):
        raise ConfigError(f"--max-memory {args.max_memory}: expected a positive, finite number of GiB")
    return int(args.max_memory * 2**30)


def check_at_least(value: float, least: float, option: str, what: str) -> None:
    """Refuse an option's value below `least` (what it counts: `what`) before any work."""
    from ffcv_transfer.config import ConfigError

    if not value >= least:
        raise ConfigError(f"{option} {value}: expected {what} of at least {least}")


def check_folder_can_be(path: str | Path, option: str) -> None:
    """Refuse a folder to be written that cannot be one: an existing file, or under one (before any work,
    so nothing is computed for an output that cannot be made)."""
    from ffcv_transfer.config import ConfigError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: is a file, not a folder")
    _check_not_under_a_file(path, option)


def check_file_can_be(path: str | Path, option: str) -> None:
    """Refuse a file to be written that cannot be one: an existing folder, or under a file (before any work)."""
    from ffcv_transfer.config import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder, not a file")
    _check_not_under_a_file(path, option)


def _check_not_under_a_file(path: Path, option: str) -> None:
    """Refuse a path one of whose folders is a file."""
    from ffcv_transfer.config import ConfigError

    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"{option} {path}: {blocking} is a file, not a folder")


def parse_settings(tokens: list[str]) -> dict[str, str]:
    """`--section.name=value` or `--section.name value` tokens -> {"section.name": "value"}."""
    from ffcv_transfer.config import ConfigError

    settings, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or "." not in token.split("=")[0]:
            raise ConfigError(f"command line: unexpected argument {token!r} (settings look like --source.epochs=4)")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(tokens):
            key, value = token[2:], tokens[i + 1]
            i += 2
        else:
            raise ConfigError(f"command line: setting {token} has no value")
        settings[key] = value
    return settings


def parse_rows(text: str, option: str = "--models") -> list[int]:
    """'0-63,100,120-127' -> [0, ..., 63, 100, 120, ..., 127]."""
    from ffcv_transfer.config import ConfigError

    rows: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            start, stop = int(first), int(last or first)
        except ValueError:
            raise ConfigError(f"{option} {text!r}: expected ranges like 0-63,100") from None
        if not 0 <= start <= stop:
            raise ConfigError(f"{option} {text!r}: {part} is no range of rows (first <= last, both >= 0)")
        rows.extend(range(start, stop + 1))
    return rows


def experiment_from_args(args: argparse.Namespace, config: str | Path | None = None):
    """The experiment of `config` (a YAML file; None: the defaults) with the command line's settings."""
    from ffcv_transfer.config import load_experiment

    return load_experiment(config, parse_settings(args.settings))


def store_experiment(args: argparse.Namespace):
    """The experiment of `args.config` if given, else the one saved in `args.store`, with the command
    line's settings."""
    from ffcv_transfer.store.experiment import open_experiment

    if getattr(args, "config", None):
        return experiment_from_args(args, args.config)
    return open_experiment(args.store, parse_settings(args.settings))
