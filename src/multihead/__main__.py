"""Command line: python -m multihead demo, bench, show and view."""

from __future__ import annotations

import argparse
import sys

from . import show, view
from .benchmark import cli as bench_cli
from .demo import demo

DESCRIPTION = (
    "multihead.MultiheadAttention from the command line: the seed example (demo), the benchmark "
    "against torch.nn.MultiheadAttention (bench), MiniLM's attention heads as a picture (show) "
    "and as an interactive HTML viewer (view)."
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, exit status 2:
    ``PROG: error: MESSAGE (python -m PROG --help for more)``.

    argparse's own errors print the usage first; a newcomer then reads a wall of flags before
    the line that says what was wrong. ``--help`` still shows the usage.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (python -m {self.prog} --help for more)\n")


def _demo(_: argparse.Namespace) -> int:
    print(demo())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m multihead`` and its subcommands."""
    parser = _Parser(prog="multihead", description=DESCRIPTION)
    commands = parser.add_subparsers(
        dest="command", metavar="{demo,bench,show,view}", required=True, parser_class=_Parser
    )
    parser.commands = commands  # main() finds each subcommand's parser here
    commands.add_parser(
        "demo",
        help="run the seed example with multihead.MultiheadAttention; it prints the same text "
        "torch.nn.MultiheadAttention prints for the same script",
        description="Runs the seed example (E=16, H=4, batch 2, sequence 5) with "
        "multihead.MultiheadAttention and prints its shapes and tensors: the same text "
        "torch.nn.MultiheadAttention prints for the same script.",
    )
    bench_cli.add_arguments(
        commands.add_parser(
            "bench",
            help="benchmark against torch.nn.MultiheadAttention (time, memory, FLOP/s, ORT)",
            description="Benchmark multihead.MultiheadAttention against "
            f"torch.nn.MultiheadAttention. Writes {bench_cli.LOCAL_OUT}/ (git-ignored) unless "
            f"--publish (writes {bench_cli.PUBLISHED_OUT}/, the README's results) or --out "
            "says otherwise.",
        )
    )
    show.add_arguments(
        commands.add_parser(
            "show",
            help="draw MiniLM's attention heads for a sentence (needs the models and plot extras)",
            description="Runs all-MiniLM-L6-v2 on SENTENCE, writes one layer's heads as an image "
            "grid and prints, per head, the token each token attends to most. Arguments and the "
            "extras are checked before the model loads.",
        )
    )
    view.add_arguments(
        commands.add_parser(
            "view",
            help="write an interactive HTML viewer of MiniLM's attention, all six layers "
            "(needs the models extra)",
            description="Runs all-MiniLM-L6-v2 on TEXT (and --pair) and writes one "
            "self-contained HTML file (no network) with head, grid and model views of every "
            "layer and head. Arguments and the extra are checked before the model loads.",
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m multihead``."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand they were given to, as its own errors are
        parser.commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    handlers = {
        "demo": _demo,
        "bench": bench_cli.main,
        "show": show.main,
        "view": view.main,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
