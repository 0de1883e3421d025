"""`ffcv-transfer` command line.

Sub-commands import their (slow) dependencies only when they run; each group of commands lives in its
own module (cli_data, cli_run, cli_findings)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from . import cli_data, cli_findings, cli_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffcv-transfer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (cli_data, cli_run, cli_findings):
        group.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_settings", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.settings = extra
    from beton_writers.common import BetonError

    from .config import ConfigError
    from .influence import InfluenceError
    from .launch import LaunchError
    from .store import StoreError

    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except (BetonError, StoreError, InfluenceError, ConfigError, LaunchError) as e:
        print(f"ffcv-transfer: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
