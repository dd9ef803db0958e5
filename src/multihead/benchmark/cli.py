"""The ``bench`` subcommand's flags, and its handler.

Importing this module is cheap (argparse only): ``python -m multihead demo`` builds the ``bench``
parser too, and must not pay for the benchmark's imports.

Where the reports go: a plain run writes :data:`LOCAL_OUT` (git-ignored), so trying the
benchmark never touches tracked files; ``--publish`` writes :data:`PUBLISHED_OUT`, the files the
README shows, and only for a full run; ``--out DIR`` writes anywhere.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

_MODES = ("infer", "infer_weights", "train", "causal")  # as cases.MODES, without importing it

# Relative to the working directory, which for --publish must be the repository's root.
LOCAL_OUT = Path("benchmarks/local")
PUBLISHED_OUT = Path("benchmarks/results")
QUICK = "about 2 minutes on 2 cores"


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(mode.strip() for mode in text.split(",") if mode.strip())
    unknown = [mode for mode in modes if mode not in _MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(_MODES)}; received {text!r}"
        )
    return modes


def positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds; received {text!r}"
        )
    return seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``bench`` flags to ``parser``."""
    parser.add_argument("--quick", action="store_true", help=f"small grid and budget ({QUICK})")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"output directory, created when missing (default: {LOCAL_OUT}, git-ignored)",
    )
    where.add_argument(
        "--publish",
        action="store_true",
        help=f"write {PUBLISHED_OUT}/, the tracked results and plots the README shows, "
        "replacing them; only a full run (no --quick, --modes or --no-* flags), from the "
        "repository's root",
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
    parser.add_argument(
        "--no-mods",
        action="store_true",
        help="skip the mask-mod section (sliding window, documents, causal against a dense mask "
        "and compiled flex_attention)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where both layers run (default: cpu; cuda needs a CUDA build of torch and a GPU)",
    )
    parser.add_argument(
        "--budget",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help="seconds of timed rounds per case (default: 8, or 1.5 with --quick)",
    )


def _refuse(message: str) -> int:
    print(f"multihead bench: error: {message}", file=sys.stderr)
    return 2


def output_dir(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    """``(directory, None)`` where the reports of ``args`` go, or ``(None, why not)``.

    Checked before anything runs: a full benchmark takes many minutes, and a path it cannot
    write must not end it. Creates and changes nothing.
    """
    try:
        return _output_dir(args)
    except OSError as error:  # a name too long, a folder we may not look into, ...
        flag = "--publish" if args.publish else "--out"
        return None, f"argument {flag}: {error.strerror or error}"


def _output_dir(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    if args.out is not None and not str(args.out).strip():
        return None, "argument --out: expected a directory; received an empty path"
    if args.publish:
        partial = [
            flag
            for flag, given in (
                ("--quick", args.quick),
                ("--modes", tuple(args.modes) != _MODES),
                ("--no-memory", args.no_memory),
                ("--no-onnx", args.no_onnx),
                ("--no-decode", args.no_decode),
                ("--no-mods", args.no_mods),
                ("--budget", args.budget is not None),
                ("--device", args.device != "cpu"),
            )
            if given
        ]
        if partial:
            return None, (
                f"argument --publish: replaces the README's results, so it needs the full run; "
                f"drop {', '.join(partial)} (or write elsewhere with --out DIR)"
            )
        if not (PUBLISHED_OUT.is_dir() and Path("src/multihead/__init__.py").is_file()):
            return None, (
                f"argument --publish: no {PUBLISHED_OUT}/ of multihead's repository here; run "
                "it from the repository's root"
            )
    out = PUBLISHED_OUT if args.publish else (args.out if args.out is not None else LOCAL_OUT)
    flag = "--publish" if args.publish else "--out"
    if out.exists() and not out.is_dir():
        return None, f"argument {flag}: {str(out)!r} is a file; expected a directory"
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir():
        return None, f"argument {flag}: {str(existing)!r} is a file, so {str(out)!r} cannot be made"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".multihead-bench-"):
            pass
    except OSError as error:
        return None, f"argument {flag}: cannot write into {str(existing)!r}: {error.strerror}"
    return out, None


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark that ``args`` describes and prints the Markdown table."""
    out, problem = output_dir(args)
    if problem is not None:
        return _refuse(problem)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return _refuse("argument --device: cuda, but torch.cuda.is_available() is False")

    from .report import markdown
    from .runner import Options, run

    options = Options(
        quick=args.quick,
        out=out,
        modes=args.modes,
        memory=not args.no_memory,
        onnx=not args.no_onnx,
        decode=not args.no_decode,
        mods=not args.no_mods,
        device=args.device,
        budget_s=args.budget,
    )
    try:
        rows, machine, paths = run(options)
    except ValueError as error:
        return _refuse(str(error))
    print(markdown(rows, machine))
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0
