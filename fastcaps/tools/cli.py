"""The ``fastcaps`` command line: each tool adds its own subcommand."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import aot, check
from .bench import command as bench
from .train import command as train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcaps", description="fastcaps: fused capsule routing, "
                                     "checked against a paper-faithful reference")
    commands = parser.add_subparsers(dest="command", required=True)
    for tool in (check, bench, train, aot):
        tool.add_parser(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
