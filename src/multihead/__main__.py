"""Command line: ``python -m multihead demo``."""

from __future__ import annotations

import argparse
import sys

import torch

from .demo import seed_example
from .layer import MultiheadAttention


def _demo(_: argparse.Namespace) -> int:
    print(f"multihead demo (torch {torch.__version__})")
    print(seed_example(MultiheadAttention))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m multihead``."""
    parser = argparse.ArgumentParser(prog="multihead", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the seed example with multihead.MultiheadAttention")
    args = parser.parse_args(argv)
    handlers = {"demo": _demo}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
