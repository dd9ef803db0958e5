"""Attention heatmaps from the weights :class:`multihead.MultiheadAttention` returns.

Shape legend: H heads, L query length, S key length (including any ``add_bias_kv`` /
``add_zero_attn`` slots the layer appended).

``(L, S)`` draws one map; ``(H, L, S)`` draws a grid with one map per head on one shared colour
scale. A leading batch dimension of size 1 is dropped, so ``layer(x, x, x)[1]`` for one
sequence can be passed as it is. Rows are queries, columns keys: row i shows where query i looks.
Needs matplotlib (the ``plot`` extra); figures are built without pyplot, so no window opens and
no global figure state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Inches per token along each axis of one map, and the bounds on one map's side (a long
# sequence gets smaller cells); the smallest label font, in points.
_CELL, _MIN_SIDE, _MAX_SIDE = 0.24, 1.8, 7.0
_MIN_FONT = 6.0


def _side(query_len: int, key_len: int) -> float:
    """Inches along the longer side of one map."""
    return min(_MAX_SIDE, max(_MIN_SIDE, _CELL * max(query_len, key_len)))


def _as_heads(weights: Tensor) -> Tensor:
    """``weights`` as ``(H, L, S)`` float on CPU; one map is one head."""
    if not isinstance(weights, Tensor):
        raise TypeError(
            f"Invalid argument `weights`: expected a tensor. Received: {type(weights).__name__}."
        )
    w = weights.detach().to("cpu", torch.float32)
    if w.dim() == 4 and w.shape[0] == 1:
        w = w[0]  # (H, L, S) from a batch of one
    if w.dim() == 2:
        w = w.unsqueeze(0)  # (1, L, S)
    if w.dim() != 3 or w.numel() == 0:
        raise ValueError(
            "Invalid argument `weights`: expected a non-empty (L, S) or (H, L, S) tensor "
            f"(or (1, H, L, S)). Received: shape {tuple(weights.shape)}."
        )
    return w


def _labels(name: str, labels: Sequence[str] | None, size: int, axis: str) -> list[str] | None:
    if labels is None:
        return None
    labels = [str(label) for label in labels]
    if len(labels) != size:
        raise ValueError(
            f"Invalid argument `{name}`: expected {size} labels ({axis}). "
            f"Received: {len(labels)} labels."
        )
    return labels


def heatmap(
    ax: Axes,
    weights: Tensor,
    *,
    query_tokens: Sequence[str] | None = None,
    key_tokens: Sequence[str] | None = None,
    vmax: float | None = None,
    title: str | None = None,
):
    """Draws one ``(L, S)`` map on ``ax`` and returns the image (for a colour bar).

    Args:
        ax: a matplotlib Axes.
        weights: ``(L, S)``.
        query_tokens, key_tokens: L row labels and S column labels, or None for indices.
        vmax: top of the colour scale (default the map's maximum); the bottom is 0.
        title: drawn above the map.
    """
    w = _as_heads(weights)
    if w.shape[0] != 1:
        raise ValueError(
            "Invalid argument `weights`: expected one (L, S) map. "
            f"Received: shape {tuple(weights.shape)}."
        )
    w = w[0]
    query_len, key_len = w.shape
    rows = _labels("query_tokens", query_tokens, query_len, "one per query, L")
    cols = _labels("key_tokens", key_tokens, key_len, "one per key, S")
    image = ax.imshow(
        w.numpy(),
        cmap="viridis",
        vmin=0.0,
        vmax=float(w.max()) if vmax is None else vmax,
        aspect="equal",
        interpolation="nearest",
    )
    # Labels as tall as a cell allows, within readable bounds; past that, every k-th label.
    cell = _side(query_len, key_len) / max(query_len, key_len)  # inches per token
    fontsize = min(9.0, cell * 72 * 0.55)
    step = math.ceil(_MIN_FONT / fontsize) if fontsize < _MIN_FONT else 1
    fontsize = max(fontsize, _MIN_FONT)
    if rows is not None:
        ax.set_yticks(range(0, query_len, step), rows[::step], fontsize=fontsize)
    if cols is not None:
        ax.set_xticks(range(0, key_len, step), cols[::step], fontsize=fontsize, rotation=90)
    ax.tick_params(length=0, labelsize=fontsize)
    if title:
        ax.set_title(title, fontsize=fontsize + 1)
    return image


def attention_figure(
    weights: Tensor,
    tokens: Sequence[str] | None = None,
    *,
    key_tokens: Sequence[str] | None = None,
    title: str | None = None,
    columns: int = 4,
) -> Figure:
    """A figure of one map or a grid of heads, with a shared colour bar.

    Args:
        weights: ``(L, S)`` or ``(H, L, S)`` (a leading batch of 1 is dropped).
        tokens: L query labels; also the key labels when ``key_tokens`` is None and L == S
            (self-attention).
        key_tokens: S key labels.
        title: the figure's title.
        columns: maps per row in a grid of heads.

    Returns:
        A matplotlib Figure (not registered with pyplot).

    Raises:
        ValueError: a shape other than the above, or label counts that do not match it.
    """
    from matplotlib.figure import Figure

    w = _as_heads(weights)
    heads, query_len, key_len = w.shape
    if key_tokens is None and tokens is not None and query_len == key_len:
        key_tokens = tokens
    columns = max(1, min(columns, heads))
    rows = math.ceil(heads / columns)
    side = _side(query_len, key_len)
    # Room for the rotated labels, the colour bar and the titles around the maps.
    width = columns * side * key_len / max(query_len, key_len) + 1.6 + (1.0 if tokens else 0)
    height = rows * side * query_len / max(query_len, key_len) + 1.0 + (1.0 if tokens else 0)
    figure = Figure(figsize=(width, height), layout="constrained", dpi=120)
    axes = figure.subplots(rows, columns, squeeze=False)
    vmax = float(w.max())
    for head, ax in enumerate(axes.flat):
        if head >= heads:
            ax.set_axis_off()
            continue
        image = heatmap(
            ax,
            w[head],
            query_tokens=tokens,
            key_tokens=key_tokens,
            vmax=vmax,
            title=f"head {head}" if heads > 1 else None,
        )
    for ax in axes[:, 0]:
        ax.set_ylabel("query")
    for ax in axes[-1, :]:
        ax.set_xlabel("key")
    colorbar = figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    colorbar.set_label("attention weight")
    if title:
        figure.suptitle(title)
    return figure


def save_attention(
    weights: Tensor,
    path: str | Path,
    tokens: Sequence[str] | None = None,
    **kwargs,
) -> Path:
    """Writes :func:`attention_figure` of ``weights`` to ``path`` as PNG and returns the path.

    ``kwargs`` go to :func:`attention_figure` (``key_tokens``, ``title``, ``columns``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    attention_figure(weights, tokens, **kwargs).savefig(path, format="png")
    return path
