"""Readable class names for findings: the beton's own names, ImageNet short names for wnids (the writer
stores them), WordNet words for other wnids, or a user-given file."""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ffcv_transfer.config import ConfigError

WNID = re.compile(r"^n\d{8}$")
DATA_ENV = "FFCV_TRANSFER_DATA"
WORDNET_WORDS = Path("imagenet-meta") / "wordnet30_words.txt.gz"


class NamesFileError(ConfigError, ValueError):
    """A names file that is missing or is not KEY<TAB>NAME lines; the message names the file (and line)."""


def read_names_file(path: str | Path) -> dict[str, str]:
    """KEY<TAB>NAME per line (WordNet's words.txt format; .gz allowed): KEY a class name or a wnid."""
    path = Path(path)
    if not path.is_file():
        raise NamesFileError(f"--names {path}: no such names file")
    opener = gzip.open if path.suffix == ".gz" else open
    names = {}
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip() or line.startswith("#"):
                    continue
                key, sep, name = line.rstrip("\n").partition("\t")
                if not sep or not name.strip():
                    raise NamesFileError(f"{path}:{number}: expected KEY<TAB>NAME, got {line.strip()!r}")
                names[key.strip()] = name.strip()
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        kind = "gzip-compressed UTF-8 text" if opener is gzip.open else "UTF-8 text"
        raise NamesFileError(f"{path}: not {kind} of KEY<TAB>NAME lines ({e})") from None
    return names


def default_wordnet_words() -> Path | None:
    """WordNet's words file in the shared data folder ($FFCV_TRANSFER_DATA), when there is one."""
    root = os.environ.get(DATA_ENV)
    path = Path(root) / WORDNET_WORDS if root else None
    return path if path and path.is_file() else None


def display_names(
    class_names: Sequence[str], wnids: Sequence[str] | None = None, names_file: str | Path | None = None
) -> list[str]:
    """One label per class: the user's file first (keyed by class name or wnid), then WordNet's first
    lemma for a wnid the beton writer could not name, else the beton's own name."""
    user = read_names_file(names_file) if names_file else {}
    words = {}
    if any(WNID.match(name) for name in class_names) and (path := default_wordnet_words()):
        words = read_names_file(path)
    labels = []
    for k, name in enumerate(class_names):
        keys = [name] + ([wnids[k]] if wnids else [])
        label = next((user[key] for key in keys if key in user), None)
        if label is None and name in words:
            label = words[name].split(",")[0]
        labels.append(label or name)
    return labels


def class_index(names: Sequence[str], value: str) -> int | None:
    """The class that `value` names, given as an index below len(names) or as one of the names; None when
    it is neither."""
    if value.isdigit() and int(value) < len(names):
        return int(value)
    if value in names:
        return list(names).index(value)
    return None
