"""The ``bench`` subcommand's flags, and its handler.

Importing this module is cheap (argparse only): ``python -m multihead demo`` builds the ``bench``
parser too, and must not pay for the benchmark's imports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_MODES = ("infer", "infer_weights", "train", "causal")  # as cases.MODES, without importing it


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(mode.strip() for mode in text.split(",") if mode.strip())
    unknown = [mode for mode in modes if mode not in _MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(_MODES)}; received {text!r}"
        )
    return modes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``bench`` flags to ``parser``."""
    parser.add_argument(
        "--quick", action="store_true", help="small grid and budget (under 2 minutes on 2 cores)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        help="output directory (default: benchmarks/results)",
    )
    parser.add_argument(
        "--modes",
        type=_modes,
        default=_MODES,
        help=f"comma-separated modes to run (default: {','.join(_MODES)})",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime column")
    parser.add_argument(
        "--no-decode", action="store_true", help="skip the KV-cache decode and GQA comparison"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds of timed rounds per case (default: 8, or 1.5 with --quick)",
    )


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark that ``args`` describes and prints the Markdown table."""
    from .report import markdown
    from .runner import Options, run

    options = Options(
        quick=args.quick,
        out=args.out,
        modes=args.modes,
        memory=not args.no_memory,
        onnx=not args.no_onnx,
        decode=not args.no_decode,
        device=args.device,
        budget_s=args.budget,
    )
    try:
        rows, machine, paths = run(options)
    except ValueError as error:
        print(f"multihead bench: {error}", file=sys.stderr)
        return 2
    print(markdown(rows, machine))
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0
