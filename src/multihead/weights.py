"""Attention weights averaged over heads, in query blocks: never all heads' (N, H, L, S) at once.

Shape legend: N batch, H heads, L query length, S key length, D head dim, B query block.

Forward computes softmax(q k^T / sqrt(D) + mask) one block of B query rows at a time and keeps
only the head average ``(N, L, S)``. Nothing is saved for backward but q, k and the mask; the
backward recomputes each block's probabilities. So a caller who ignores the weights pays no
memory for their graph, and one who puts them in a loss still gets exact gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .logits import attention_logits, summed_over_groups, weighted_values
from .logits import scale as logits_scale
from .masks import position_mask
from .transforms import functional_autodiff

# Scratch for one block of per-head scores, in elements (8 MiB of fp32). Big enough for GEMM
# efficiency, small enough to stay near the cache and far below (N, H, L, S) at long L. Measured
# (E512 H8, eval, ours/torch): 1M / 2M / 4M / 8M elements gave 1.09 / 1.06 / 1.08 / 1.42 at
# N1 L512, 0.84 / 0.86 / 1.14 / 1.41 at N1 L1024 and 1.18 / 1.02 / 1.07 / 1.20 at N16 L256.
BLOCK_ELEMENTS = 2 * 1024 * 1024


def block_rows(batch: int, heads: int, key_len: int, query_len: int | None = None) -> int:
    """Query rows per block so that one block of scores holds about BLOCK_ELEMENTS.

    With ``query_len``: scores of at least BLOCK_ELEMENTS / 2 in all are cut into two blocks
    or more, so that the one scratch block is at most half of the ``(N, H, L, S)`` scores that
    torch materialises (N1 L512 E512 H8: peak 23.3 -> 19 MiB against torch's 20.3, at the same
    speed, 1.015 against 1.017 of torch's time, interleaved)."""
    per_row = max(1, batch * heads * key_len)
    rows = max(1, BLOCK_ELEMENTS // per_row)
    if query_len is not None and query_len > 1 and query_len * per_row >= BLOCK_ELEMENTS // 2:
        rows = min(rows, -(-query_len // 2))
    return rows


def _rows(mask: Tensor | None, start: int, stop: int) -> Tensor | None:
    """The mask rows for queries [start, stop); a mask broadcast over L (dim -2 == 1) is whole."""
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., start:stop, :]


def block_probabilities(
    q_blk: Tensor,
    k: Tensor,
    mask_blk: Tensor | None = None,
    empty_blk: Tensor | None = None,
    *,
    start: int = 0,
    is_causal: bool = False,
    softcap: float | None = None,
    scratch: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T / sqrt(D), soft-capped, + mask) ``(N, H, B, S)`` for the query rows
    [start, start + B) (all of them with the defaults); rows marked in ``empty_blk`` (all keys
    masked) are zero. The one place every path computes probabilities.

    ``scratch`` (inference only) receives the scores, so that blocks reuse one buffer instead
    of faulting in fresh pages each time.
    """
    scores = attention_logits(q_blk, k, softcap=softcap, out=scratch)  # (N, H, B, S)
    # In place: scores is fresh, and matmul does not keep its output for backward.
    if mask_blk is not None:
        # Out of place under torch.func: a batched mask cannot be added into unbatched scores.
        scores = scores + mask_blk if functional_autodiff(mask_blk) else scores.add_(mask_blk)
    if is_causal:
        rows = torch.arange(start, start + q_blk.shape[-2], device=q_blk.device)
        above = position_mask(rows, torch.arange(k.shape[-2], device=q_blk.device), causal=True)
        scores.masked_fill_(above, float("-inf"))  # (B, S) broadcast
    if scratch is not None and _in_place_softmax_ok(scores):
        probs = _softmax_in_place(scores)  # inference: the scores become the probabilities
        return probs if empty_blk is None else probs.masked_fill_(empty_blk, 0.0)
    probs = torch.softmax(scores, dim=-1)
    # Out of place: softmax keeps its output for backward (a double backward needs it intact).
    return probs if empty_blk is None else probs.masked_fill(empty_blk, 0.0)


def _in_place_softmax_ok(scores: Tensor) -> bool:
    """CPU only (the aliasing is checked on the CPU kernels), and not under autocast, whose
    float32 softmax policy covers ``softmax`` but not ``_softmax.out``."""
    return scores.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


def _softmax_in_place(scores: Tensor) -> Tensor:
    """``softmax(scores, -1)`` written over ``scores`` (a contiguous inference buffer): no
    second ``(N, H, B, S)`` block is allocated. aten's softmax reads each row (its max, then
    each element) before it writes that element, so its out= form may alias its input;
    tests/test_weights_memory.py checks the result bitwise against the out-of-place call."""
    return torch.ops.aten._softmax.out(scores, -1, False, out=scores)


def _probability_blocks(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    empty: Tensor | None,
    is_causal: bool,
    softcap: float | None = None,
):
    """Yields ``(start, stop, probs)`` for each block of query rows; ``probs`` ``(N, H, B, S)``
    lives in one scratch buffer that the next block overwrites."""
    batch, heads, q_len, _ = q.shape
    key_len = k.shape[-2]
    step = block_rows(batch, heads, key_len, q_len)
    if step < q_len:
        # Made contiguous once, not by every block's matmul (a head-split view of the packed
        # projection is strided; profiled at N16 L256: 15 of 20 ms of copies per call).
        k = k.contiguous()
    # matmul(out=...) cannot record autograd, so a double backward allocates per block.
    scratch = None if torch.is_grad_enabled() else q.new_empty(batch * heads * step * key_len)
    for start in range(0, q_len, step):
        stop = min(start + step, q_len)
        scores = None
        if scratch is not None:
            scores = scratch[: batch * heads * (stop - start) * key_len]
            scores = scores.view(batch, heads, stop - start, key_len)
        q_blk, mask_blk, empty_blk = (
            q[..., start:stop, :],
            _rows(mask, start, stop),
            _rows(empty, start, stop),
        )
        yield (
            start,
            stop,
            block_probabilities(
                q_blk,
                k,
                mask_blk,
                empty_blk,
                start=start,
                is_causal=is_causal,
                softcap=softcap,
                scratch=scores,
            ),
        )


class _AveragedWeights(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, mask: Tensor | None, empty: Tensor | None, is_causal: bool
    ) -> Tensor:
        out = q.new_empty(q.shape[0], q.shape[2], k.shape[2])  # (N, L, S)
        for start, stop, probs in _probability_blocks(q, k, mask, empty, is_causal):
            out[:, start:stop] = probs.mean(dim=1)  # (N, B, S)
        ctx.save_for_backward(q, k, mask, empty)
        ctx.is_causal = is_causal
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, mask, empty = ctx.saved_tensors
        heads, scale = q.shape[1], logits_scale(q.shape[-1])
        need_q, need_k, need_mask = ctx.needs_input_grad[:3]
        grad_q = torch.zeros_like(q) if need_q else None
        grad_k = torch.zeros_like(k) if need_k else None
        grad_mask = torch.zeros_like(mask) if need_mask else None
        for start, stop, probs in _probability_blocks(q, k, mask, empty, ctx.is_causal):
            grad_probs = (grad_out[:, None, start:stop] / heads).expand_as(probs)  # (N, H, B, S)
            # Softmax backward: dS = P * (dP - sum(dP * P)).
            grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
            if need_q:
                grad_q[..., start:stop, :] = weighted_values(grad_scores, k) * scale
            if need_k:
                q_blk = q[..., start:stop, :]
                grad_k += summed_over_groups(grad_scores, q_blk, k.shape[1]) * scale
            if need_mask:
                if mask.shape[-2] == 1:  # broadcast over L: every block adds to the one row
                    grad_mask += grad_scores.sum_to_size(mask.shape)
                else:
                    rows = grad_mask[..., start:stop, :]
                    rows += grad_scores.sum_to_size(rows.shape)
        return grad_q, grad_k, grad_mask, None, None


def averaged_attention_weights(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None = None,
    empty: Tensor | None = None,
    *,
    is_causal: bool = False,
) -> Tensor:
    """Head-averaged softmax attention weights ``(N, L, S)``, computed in query blocks.

    Args:
        q: ``(N, H, L, D)``.
        k: ``(N, Hkv, S, D)``, Hkv dividing H (grouped-query attention).
        mask: additive, broadcastable to ``(N, H, L, S)``, with no fully masked rows, or None.
        empty: bool ``(..., L or 1, 1)``, True on rows whose keys were all masked (see
            :func:`multihead.masks.split_empty_rows`); their weights are zero.
        is_causal: mask keys j > i (top-left aligned).

    Peak memory: the ``(N, L, S)`` result plus one block of ``(N, H, B, S)`` scores.
    """
    return _AveragedWeights.apply(q, k, mask, empty, is_causal)


def blockwise_attention_with_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    empty: Tensor | None = None,
    *,
    is_causal: bool = False,
    average_weights: bool = True,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention output and weights in one pass over query blocks, for inference (no autograd).

    Each block's probabilities give both its output rows (``P v``) and its weight rows, so the
    scores are computed once and only one ``(N, H, B, S)`` block exists at a time.

    Args:
        q: ``(N, H, L, D)``; k, v: ``(N, Hkv, S, D)``, Hkv dividing H.
        mask, empty: as :func:`averaged_attention_weights`.
        average_weights: return ``(N, L, S)`` head-averaged weights, else ``(N, H, L, S)``.
        softcap: logits become ``softcap * tanh(logits / softcap)`` before the mask.

    Returns:
        out ``(N, H, L, D)`` and the weights.
    """
    batch, heads, q_len, _ = q.shape
    key_len = k.shape[-2]
    if block_rows(batch, heads, key_len, q_len) < q_len:
        k, v = k.contiguous(), v.contiguous()  # once, not per block (see _probability_blocks)
    # Written as (N, L, H, D) and returned as its (N, H, L, D) view, so merging heads after is
    # free. Blocks go through assignment, not matmul(out=...): an out= slice that is not
    # contiguous sends matmul down a much slower path (torch 2.13, CPU).
    out = q.new_empty(batch, q_len, heads, v.shape[-1])  # (N, L, H, D)
    weights = q.new_empty(
        (batch, q_len, key_len) if average_weights else (batch, heads, q_len, key_len)
    )
    for start, stop, probs in _probability_blocks(q, k, mask, empty, is_causal, softcap):
        out[:, start:stop] = weighted_values(probs, v).transpose(1, 2)  # (N, B, H, D)
        if average_weights:
            weights[:, start:stop] = probs.mean(dim=1)  # (N, B, S)
        else:
            weights[..., start:stop, :] = probs
    out = out.transpose(1, 2)  # (N, H, L, D)
    if empty is not None:
        # Selected, not multiplied: the masked values of an empty row may be NaN or inf.
        out.masked_fill_(empty, 0.0)
    return out, weights
