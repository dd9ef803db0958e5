"""Attention core: pure functions on per-head tensors.

Shape legend: N batch, H heads, L query length, S key length, D head dim.

``mask`` is always the canonical additive form made by :mod:`multihead.masks`: 0 = attend,
-inf = masked, broadcastable to ``(N, H, L, S)``. A query row whose keys are all masked attends
to nothing: its attention output and its weights are zero (never NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .logits import weighted_values
from .masks import causal_mask, split_empty_rows
from .weights import (
    averaged_attention_weights,
    block_probabilities,
    blockwise_attention_with_weights,
)


def attention_weights(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    *,
    is_causal: bool,
    softcap: float | None = None,
    empty: Tensor | None = None,
) -> Tensor:
    """Softmax attention weights ``(N, H, L, S)`` for q ``(N, H, L, D)`` and k ``(N, Hkv, S, D)``.

    Scale 1/sqrt(D), then the optional soft-cap, then the mask. ``is_causal`` masks keys j > i
    (top-left aligned). ``mask`` must have no fully masked rows here; :func:`attention` removes
    them first and passes them as ``empty`` (bool ``(..., L, 1)``), whose rows come back zero.
    """
    return block_probabilities(q, k, mask, empty, is_causal=is_causal, softcap=softcap)


# At or below this many per-head scores (N * H * L * S) a call is dominated by per-op overhead:
# the plain formula with the fewest ops wins, and materialising (N, H, L, S) costs nothing.
SMALL_SCORES = 16 * 1024


# SDPA shares key/value heads itself from torch 2.5 (enable_gqa); on 2.4 they are repeated.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def select_path(
    *,
    need_weights: bool,
    average_weights: bool,
    dropout_p: float,
    needs_grad: bool,
    score_elements: int,
    softcap: bool,
) -> str:
    """The one dispatch point; returns which kernel :func:`attention` runs.

    - ``"sdpa"``: ``need_weights=False``. ``F.scaled_dot_product_attention`` (flash / fused
      kernels, causal as a flag so it can skip blocks, key/value heads shared by the kernel),
      in training and inference alike.
    - ``"blockwise"``: weights, or soft-capped logits, without dropout or autograd (inference),
      above ``SMALL_SCORES``. One pass over query blocks computes each block's probabilities
      once and takes both output rows and weight rows from them: peak memory is the result plus
      one ``(N, H, B, S)`` block.
    - ``"sdpa+averaged_weights"``: averaged weights under autograd, without dropout, above
      ``SMALL_SCORES``. The output comes from SDPA and the weights from
      :func:`multihead.weights.averaged_attention_weights`, block by block, so no
      ``(N, H, L, S)`` tensor exists and the output's backward does not go through the weights.
    - ``"explicit"``: softmax(q k^T / sqrt(D) + mask) v, materialised, as torch does: per-head
      weights under autograd, weights under dropout (the returned weights are the ones after
      dropout, and the output must use exactly those), soft-capping under autograd or dropout,
      and small calls.
    """
    if softcap:  # SDPA has no logit transform
        if needs_grad or dropout_p > 0.0 or score_elements <= SMALL_SCORES:
            return "explicit"
        return "blockwise"
    if not need_weights:
        # Measured here for a one-query decode step over 1024 keys (E 512, H 8): SDPA 101 us
        # against 135 us for the explicit path in fp32, 55 against 154 in bf16, so one-query
        # steps stay on SDPA too.
        return "sdpa"
    if dropout_p > 0.0 or score_elements <= SMALL_SCORES:
        return "explicit"
    if not needs_grad:
        return "blockwise"
    if average_weights:
        return "sdpa+averaged_weights"
    return "explicit"


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
    softcap: float | None = None,
    may_mask_whole_rows: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention, optionally returning its weights.

    Every path (see :func:`select_path`) computes the same numbers, to rounding.

    Args:
        q: ``(N, H, L, D)``.
        k, v: ``(N, Hkv, S, D)``; Hkv divides H, and query head h reads key/value head
            h // (H / Hkv) (grouped-query attention; Hkv = 1 is multi-query).
        mask: additive, broadcastable to ``(N, H, L, S)``, or None.
        is_causal: mask keys j > i (top-left aligned, as SDPA).
        dropout_p: dropout on the attention weights; pass 0.0 in eval.
        need_weights: also return the weights.
        average_weights: return weights averaged over heads ``(N, L, S)`` instead of
            per head ``(N, H, L, S)``.
        softcap: logits become ``softcap * tanh(logits / softcap)`` before the mask.
        may_mask_whole_rows: False when the caller knows that every query keeps a key (causal,
            window and segment masks always leave a query its own position), which saves the
            search for empty rows: a per-token cost when decoding.

    Returns:
        ``(out, weights)``: out ``(N, H, L, D)``; weights as above, or None.
    """
    if is_causal and mask is not None:
        # One constraint form per call: the kernel's causal flag only ever comes alone, so that
        # rows emptied by causal and mask together are found by split_empty_rows.
        mask = mask + causal_mask(q.shape[-2], k.shape[-2], mask.dtype, mask.device)
        is_causal = False
    mask, empty = split_empty_rows(mask) if may_mask_whole_rows else (mask, None)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, mask)
    )
    path = select_path(
        need_weights=need_weights,
        average_weights=average_weights,
        dropout_p=dropout_p,
        needs_grad=needs_grad,
        score_elements=q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2],
        softcap=softcap is not None,
    )
    if path == "explicit":
        weights = attention_weights(q, k, mask, is_causal=is_causal, softcap=softcap, empty=empty)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = weighted_values(weights, v)  # (N, H, L, D)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_weights else weights
    if path == "blockwise":
        out, weights = blockwise_attention_with_weights(
            q,
            k,
            v,
            mask,
            empty,
            is_causal=is_causal,
            average_weights=average_weights,
            softcap=softcap,
        )
        return out, weights if need_weights else None

    out = _sdpa(q, k, v, mask, dropout_p=dropout_p, is_causal=is_causal)  # (N, H, L, D)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    weights = None
    if path == "sdpa+averaged_weights":
        weights = averaged_attention_weights(q, k, mask, empty, is_causal=is_causal)  # (N, L, S)
    return out, weights


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, dropout_p: float, is_causal: bool
) -> Tensor:
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
        )
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True
        )
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (N, H, S, D)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
    )
