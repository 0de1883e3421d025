"""`ffcv-transfer` command line.

Sub-commands import their (slow) dependencies only when they run; each group of commands lives in its
own module (data, run, findings); `common` holds what they share. Parsing needs numpy alone, so under the
light core (`pip install ffcv-transfer`, no extras) `--help` works and a command that needs the training
stack says which extra to install instead of failing with a traceback."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

from ffcv_transfer.cli import data, findings, run

# The `engine` extra's distributions (setup.py) by the name they are imported as.
ENGINE_MODULES = frozenset({"torch", "ffcv", "numba", "fastargs", "yaml", "PIL", "scipy", "tqdm", "matplotlib"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffcv-transfer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (data, run, findings):
        group.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_settings", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.settings = extra
    from ffcv_transfer.config import ConfigError
    from ffcv_transfer.engine.launch import LaunchError
    from ffcv_transfer.findings.kernel import InfluenceError
    from ffcv_transfer.store.betons import BetonError
    from ffcv_transfer.store.results import StoreError

    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except (BetonError, StoreError, InfluenceError, ConfigError, LaunchError) as e:
        print(f"ffcv-transfer: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in ENGINE_MODULES:  # a submodule missing from an installed package is no missing extra
            raise
        print(
            f'ffcv-transfer: error: {args.command} needs the engine extra: pip install "ffcv-transfer[engine]" '
            f"(missing: {e.name})",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"ffcv-transfer: error: {disk_full_message(e)}", file=sys.stderr)
        return 2
    return 0


def disk_full_message(error: OSError) -> str:
    """One line for a write refused for want of space: the file, the reason, what to do. The commands
    write their outputs whole or not at all (`store.files.atomic_path`, `ResultStore.create`), and a store
    writer leaves a row it could not write pending, so running the command again after freeing space
    finishes the work."""
    reason = "disk quota exceeded" if error.errno == errno.EDQUOT else "no space left on device"
    return f"{error.filename or 'a file'}: {reason}: free some space and run the command again"
