"""What one timed call is, for each implementation of a case: layers, inputs and masks.

Shape legend: N batch, L query length, S key length (= L), E embed dim.

Implementations:

- ``ours``: :class:`multihead.MultiheadAttention` (causal: ``is_causal=True`` alone).
- ``torch``: ``torch.nn.MultiheadAttention`` with ours' state_dict (causal: torch's fastest
  call, the float mask of ``generate_square_subsequent_mask`` with ``is_causal=True``).
- ``ours_bool_mask`` / ``ours_float_mask`` (causal only): ours given the causal pattern as a
  bool or float ``attn_mask`` with ``is_causal=False``, to see whether it notices the pattern.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..layer import MultiheadAttention
from .cases import Case

CAUSAL_VARIANTS = ("ours_bool_mask", "ours_float_mask")


def implementations(case: Case) -> tuple[str, ...]:
    """The implementations timed for ``case`` (ORT aside): ours first."""
    return ("ours", "torch", *CAUSAL_VARIANTS) if case.causal else ("ours", "torch")


def build_layers(case: Case, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Ours and torch's layer for ``case``, with the same weights, in the case's mode."""
    torch.manual_seed(0)
    ours = MultiheadAttention(case.embed_dim, case.num_heads, batch_first=True, device=device)
    theirs = nn.MultiheadAttention(case.embed_dim, case.num_heads, batch_first=True, device=device)
    theirs.load_state_dict(ours.state_dict())
    for layer in (ours, theirs):
        layer.train(case.mode == "train")
    return ours, theirs


def build_input(case: Case, device: torch.device) -> Tensor:
    """The self-attention input ``(N, L, E)``; it requires grad in ``train`` mode."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, case.seq_len, case.embed_dim, generator=generator)  # (N, L, E)
    return x.to(device).requires_grad_(case.mode == "train")


def make_calls(
    case: Case,
    layers: dict[str, nn.Module],
    x: Tensor,
    names: tuple[str, ...],
) -> dict[str, Callable[[], Tensor]]:
    """One zero-argument call per name in ``names``; each returns the attention output.

    Args:
        case: the case; its mode decides grad mode, arguments and the backward.
        layers: ``{"ours": ..., "torch": ...}`` from :func:`build_layers`.
        x: the input ``(N, L, E)`` from :func:`build_input`.
        names: implementations to make calls for (see the module docstring).

    Returns:
        ``{name: call}``. Masks are built here, once, outside the calls.
    """
    if case.mode == "train":
        return {name: _train_call(layers[name], x) for name in names}
    kwargs = {name: _call_kwargs(case, name, x) for name in names}
    # Every name but "torch" is a way of calling our layer.
    owner = {name: "torch" if name == "torch" else "ours" for name in names}
    return {name: _infer_call(layers[owner[name]], x, kwargs[name]) for name in names}


def _call_kwargs(case: Case, name: str, x: Tensor) -> dict:
    if case.mode == "infer_weights":
        return {}
    if case.mode == "infer":
        return {"need_weights": False}
    length = case.seq_len
    if name == "ours":
        return {"need_weights": False, "is_causal": True}
    if name == "ours_bool_mask":
        above = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)  # (L, S)
        return {"need_weights": False, "attn_mask": above}
    float_mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device)  # (L, S)
    if name == "torch":
        return {"need_weights": False, "attn_mask": float_mask, "is_causal": True}
    return {"need_weights": False, "attn_mask": float_mask}


def _infer_call(layer: nn.Module, x: Tensor, kwargs: dict) -> Callable[[], Tensor]:
    def call() -> Tensor:
        with torch.no_grad():
            return layer(x, x, x, **kwargs)[0]

    return call


def _train_call(layer: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    def call() -> Tensor:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = layer(x, x, x)  # the default call: averaged weights are computed too
        out.sum().backward()
        return out.detach()

    return call
