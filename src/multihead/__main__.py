"""Command line: ``python -m multihead demo``, ``bench`` and ``show``."""

from __future__ import annotations

import argparse
import sys

from . import show
from .benchmark import cli as bench_cli
from .demo import demo


def _demo(_: argparse.Namespace) -> int:
    print(demo())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m multihead``."""
    parser = argparse.ArgumentParser(prog="multihead", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the seed example with multihead.MultiheadAttention")
    bench_cli.add_arguments(
        commands.add_parser(
            "bench",
            help="benchmark against torch.nn.MultiheadAttention (time, memory, FLOP/s, ORT)",
            description="Benchmark multihead.MultiheadAttention against "
            "torch.nn.MultiheadAttention; writes benchmarks/results/.",
        )
    )
    show.add_arguments(
        commands.add_parser(
            "show",
            help="draw MiniLM's attention heads for a sentence (needs the models, plot extras)",
            description="Runs all-MiniLM-L6-v2 on SENTENCE, writes one layer's heads as a PNG "
            "grid and prints, per head, the token each token attends to most.",
        )
    )
    args = parser.parse_args(argv)
    handlers = {"demo": _demo, "bench": bench_cli.main, "show": show.main}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
