"""``python -m multihead show``: MiniLM's attention heads for one sentence, as a picture and text.

Shape legend: H heads, T tokens.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

DEFAULT_OUT = Path("attention.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sentence", help="the text to run through all-MiniLM-L6-v2")
    parser.add_argument(
        "--layer",
        type=int,
        default=0,
        help="which of the 6 layers to draw, from 0 (negative counts from the end; default 0)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})"
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


def main(args: argparse.Namespace) -> int:
    from .models import minilm
    from .plot import save_attention

    model = minilm.load()
    tokens, maps = model.attention_maps(args.sentence)  # (layers, H, T, T)
    layers = maps.shape[0]
    if not -layers <= args.layer < layers:
        raise SystemExit(
            f"Invalid argument `--layer`: expected an integer in [{-layers}, {layers}). "
            f"Received: --layer {args.layer}."
        )
    layer = args.layer % layers
    title = f"all-MiniLM-L6-v2, layer {layer} of {layers}: {args.sentence!r}"
    if len(title) > 110:
        title = title[:107] + "..."
    path = save_attention(maps[layer], args.out, tokens, title=title)
    print(f"layer {layer} of {layers}, {maps.shape[1]} heads, {len(tokens)} tokens -> {path}")
    print("each token -> the token it attends to most:")
    for head, pairs in enumerate(most_attended(maps[layer], tokens)):
        print(f"head {head:2d}: " + "  ".join(f"{a}->{b}" for a, b in pairs))
    return 0
