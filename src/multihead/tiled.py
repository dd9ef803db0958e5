"""The tiled kernel: attention that skips the tiles a constraint hides, forward and backward.

Shape legend: N batch, H query heads, Hkv key/value heads, L query length, S real keys,
X extra key slots, D head dim, B rows of one block, C visible real key columns of that block.

For each block of query rows, :meth:`multihead.attention_mask.AttentionMask.row_blocks` names
the key tiles that are not hidden entirely and gives the block's additive mask over them (None
when every kept tile is shown entirely). Only those columns are computed: the cost follows the
number of visible tiles, and no ``(L, S)`` mask exists, only one block's ``(B, C)``.

Two ways to compute a block, both exact:

- SDPA on the block (``F.scaled_dot_product_attention`` with the block's mask), when there is
  no score transform and no weights are asked: its own backward (the flash kernel's, saving
  q, k, v, the output and the log-sum-exp) recomputes nothing.
- The formula (scores, score transforms, mask, softmax, dropout, weights), otherwise. Under
  autograd each block runs inside a non-reentrant activation checkpoint
  (``torch.utils.checkpoint``, preserving the RNG state so dropout replays exactly): backward
  recomputes the block's scores instead of keeping them, so memory stays one block of scores
  plus the inputs, and gradients reach q, k, v, the user mask and any tensor a score_mod
  captures (an ALiBi slope, a bias table) through plain autograd, twice-differentiable.

This is FlexAttention's block sparsity (its ``BlockMask`` of full and partial key blocks per
query block), evaluated eagerly per call, with a backward on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .attention_mask import AttentionMask, RowBlock, column_positions, take_columns
from .logits import attention_logits, weighted_values


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    *,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    average_weights: bool = True,
    functional_autodiff: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention of q ``(N, H, L, D)`` over k, v ``(N, Hkv, S + X, D)`` under ``mask``.

    Returns ``(out (N, H, L, D), weights)``, weights ``(N, L, S + X)`` averaged over heads or
    ``(N, H, L, S + X)``, zero on hidden keys, or None without ``need_weights``. Rows with no
    visible key have zero output and weights.

    ``functional_autodiff``: under torch.func transforms or forward-mode AD, plain ops only
    (no checkpoint, no fused kernel).
    """
    from .functional import sdpa  # the fused kernel, twice differentiable

    n, h, q_len, _ = q.shape
    key_len, extra = mask.key_len, mask.extra_keys
    formula = (
        need_weights
        or mask.score_mod is not None
        or mask.softcap is not None
        or functional_autodiff
    )
    grad = torch.is_grad_enabled() and not functional_autodiff
    outs: list[Tensor] = []
    weights = None
    if need_weights:
        shape = (n, q_len, key_len + extra) if average_weights else (n, h, q_len, key_len + extra)
        weights = q.new_zeros(shape)
    for block in mask.row_blocks(q.device, skip=not functional_autodiff):
        q_blk = q[..., block.start : block.stop, :]
        k_blk = take_columns(k, block.columns, key_len, extra)
        v_blk = take_columns(v, block.columns, key_len, extra)
        # Every key hidden: the formula over no key gives zeros that stay on the graph.
        if not formula and block.visible + extra > 0:
            out = sdpa(q_blk, k_blk, v_blk, block.mask, dropout_p=dropout_p, is_causal=False)
            outs.append(out if block.empty is None else out.masked_fill(block.empty, 0.0))
            continue
        run = _block_formula
        args = (q_blk, k_blk, v_blk, block.mask, block, mask, dropout_p, need_weights)
        if grad:
            out, probs = checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
        else:
            out, probs = run(*args)
        outs.append(out)
        if weights is not None:
            _place(weights, probs.mean(dim=1) if average_weights else probs, block, key_len)
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(n, h, 0, v.shape[-1])
    return out, weights


def _block_formula(
    q_blk: Tensor,
    k_blk: Tensor,
    v_blk: Tensor,
    block_mask: Tensor | None,
    block: RowBlock,
    mask: AttentionMask,
    dropout_p: float,
    need_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """softmax(transform(q k^T / sqrt(D)) + mask) v for one block: out ``(N, H, B, D)`` and,
    if asked, the probabilities ``(N, H, B, C + X)``."""
    scores = attention_logits(q_blk, k_blk)  # (N, H, B, C + X)
    kv_idx = column_positions(block.columns, q_blk.device)
    scores = mask.scores(scores, block.start, kv_idx)
    if block_mask is not None:
        # Hidden keys are set, not only added to: a score_mod (or an infinite logit) may give
        # them inf or NaN, which -inf added to would not hide.
        scores = (scores + block_mask).masked_fill(block_mask == float("-inf"), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if block.empty is not None:
        probs = probs.masked_fill(block.empty, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = weighted_values(probs, v_blk)
    if block.empty is not None:  # selected: hidden values may be NaN, and 0 * NaN is NaN
        out = out.masked_fill(block.empty, 0.0)
    return out, probs if need_weights else None


def _place(weights: Tensor, probs: Tensor, block: RowBlock, key_len: int) -> None:
    """Writes one block's weights ``(…, B, C + X)`` into their columns of ``weights``."""
    rows = weights[..., block.start : block.stop, :]
    visible = block.visible
    rows[..., block.columns] = probs[..., :visible]
    if probs.shape[-1] > visible:
        rows[..., key_len:] = probs[..., visible:]
