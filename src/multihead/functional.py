"""Attention core: pure functions on per-head tensors.

Shape legend: N batch, H heads, L query length, S key length, D head dim.

``mask`` is always the canonical additive form made by :mod:`multihead.masks`: 0 = attend,
-inf = masked, broadcastable to ``(N, H, L, S)``. A query row whose keys are all masked attends
to nothing: its attention output and its weights are zero (never NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import causal_mask, split_empty_rows


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None, *, is_causal: bool) -> Tensor:
    """Softmax attention weights ``(N, H, L, S)`` for q ``(N, H, L, D)`` and k ``(N, H, S, D)``.

    Scale 1/sqrt(D). ``is_causal`` masks keys j > i (top-left aligned). ``mask`` must have no
    fully masked rows here; :func:`attention` removes them first.
    """
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))  # (N, H, L, S)
    if mask is not None:
        scores = scores + mask
    if is_causal:
        above = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu_(1)
        scores = scores.masked_fill(above, float("-inf"))
    return torch.softmax(scores, dim=-1)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    average_weights: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention, optionally returning its weights.

    This is the one dispatch point that chooses the kernel:

    - ``need_weights=False``: ``F.scaled_dot_product_attention`` (flash / fused kernels).
    - ``need_weights=True``: the explicit softmax(q k^T / sqrt(D) + mask) v, whose weights are
      returned after dropout, as torch does.

    Args:
        q: ``(N, H, L, D)``.
        k, v: ``(N, H, S, D)``.
        mask: additive, broadcastable to ``(N, H, L, S)``, or None.
        is_causal: mask keys j > i (top-left aligned, as SDPA).
        dropout_p: dropout on the attention weights; pass 0.0 in eval.
        need_weights: also return the weights.
        average_weights: return weights averaged over heads ``(N, L, S)`` instead of
            per head ``(N, H, L, S)``.

    Returns:
        ``(out, weights)``: out ``(N, H, L, D)``; weights as above, or None.
    """
    if is_causal and mask is not None:
        # One constraint form per call: the kernel's causal flag only ever comes alone, so that
        # rows emptied by causal and mask together are found by split_empty_rows.
        mask = mask + causal_mask(q.shape[-2], k.shape[-2], mask.dtype, mask.device)
        is_causal = False
    mask, empty = split_empty_rows(mask)
    weights = None
    if need_weights:
        weights = attention_weights(q, k, mask, is_causal=is_causal)
        if empty is not None:
            weights = weights.masked_fill(empty, 0.0)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.matmul(weights, v)  # (N, H, L, D)
        if average_weights:
            weights = weights.mean(dim=1)  # (N, L, S)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
        )  # (N, H, L, D)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
    return out, weights
