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

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend
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
    formula: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention of q ``(N, H, L, D)`` over k, v ``(N, Hkv, S + X, D)`` under ``mask``.

    Returns ``(out (N, H, L, D), weights)``, weights ``(N, L, S + X)`` averaged over heads or
    ``(N, H, L, S + X)``, zero on hidden keys, or None without ``need_weights``. Rows with no
    visible key have zero output and weights.

    ``functional_autodiff``: under torch.func transforms or forward-mode AD, plain ops only
    (no checkpoint, no fused kernel). ``formula``: the formula route for every block.
    """
    from .functional import sdpa  # the fused kernel, twice differentiable

    n, h, q_len, _ = q.shape
    key_len, extra = mask.key_len, mask.extra_keys
    formula = (
        formula
        or need_weights
        or mask.score_mod is not None
        or mask.softcap is not None
        or functional_autodiff
        or min(q.numel(), k.numel()) == 0
    )
    grad = torch.is_grad_enabled() and not functional_autodiff
    user_grad = grad and mask.user is not None and mask.user.requires_grad
    # A non-finite key or value at a hidden position would reach a kernel that adds -inf to
    # its logit (NaN) and multiplies its value by 0 (NaN); the formula sets hidden logits
    # and leaves hidden values out (_weighted_finite).
    # (The sum of all keys is finite when each is, unless it overflows, which only sends a
    # call to the formula: one pass, no key-sized temporary.)
    finite_values = functional_autodiff or bool(torch.isfinite(v.sum()))
    formula = formula or not finite_values or not bool(torch.isfinite(k.sum()))
    if not formula and dropout_p == 0.0 and not user_grad and _flash_direct(q, k, v):
        return _TiledFlash.apply(q, k, v, mask), None
    outs: list[Tensor] = []
    weights = None
    # Inference writes each block's weights into one buffer; under autograd or a torch.func
    # transform they are built out of place (in-place writes into a buffer that does not
    # require grad, or is not batched, are refused there) and concatenated.
    in_place = need_weights and not grad and not functional_autodiff
    rows_of_weights: list[Tensor] = []
    if in_place:
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
        args = (q_blk, k_blk, v_blk, block, mask, dropout_p, need_weights)
        if grad:
            recheck = _Fingerprint() if mask.score_mod is not None else None
            out, probs = checkpoint(
                _block_formula,
                *args,
                recheck,
                finite_values,
                use_reentrant=False,
                preserve_rng_state=True,
            )
        else:
            out, probs = _block_formula(*args, None, finite_values)
        outs.append(out)
        if need_weights:
            probs = probs.mean(dim=1) if average_weights else probs
            if in_place:
                _place(weights, probs, block, key_len)
            else:
                rows_of_weights.append(_full_width(probs, block, key_len))
    if need_weights and not in_place:
        weights = torch.cat(rows_of_weights, dim=-2) if rows_of_weights else None
    if not outs:  # no query: the formula over no row, still on the graph
        probs = torch.softmax(attention_logits(q, k), dim=-1)  # (N, H, 0, S + X)
        if need_weights and weights is None:
            weights = probs.mean(dim=1) if average_weights else probs
        return weighted_values(probs, v), weights
    return torch.cat(outs, dim=2), weights


# SDPA's CPU flash kernel and its backward (torch >= 2.3; None elsewhere), called directly.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)


def _flash_direct(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether SDPA itself would take its CPU flash kernel for q's dtype, device and layout
    with a mask (torch's own choice, ``_fused_sdp_choice``, which also honours the backends
    ``sdpa_kernel`` allows), so that calling the kernel directly computes what SDPA would."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if _FLASH_CPU is None or _FLASH_CPU_BACKWARD is None or choose is None:
        return False
    if q.device.type != "cpu" or torch.compiler.is_compiling() or v.shape[-1] != q.shape[-1]:
        return False
    if any(x.stride(-1) != 1 for x in (q, k, v)):  # the kernel reads rows as contiguous
        return False
    probe = q[:1, :1, :1]
    mask = q.new_zeros(1, 1, 1, 1)
    return choose(probe, probe, probe, mask, 0.0, False) == int(SDPBackend.FLASH_ATTENTION)


def _block_formula(
    q_blk: Tensor,
    k_blk: Tensor,
    v_blk: Tensor,
    block: RowBlock,
    mask: AttentionMask,
    dropout_p: float,
    need_weights: bool,
    fingerprint: _Fingerprint | None = None,
    finite_values: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """softmax(transform(q k^T / sqrt(D)) + mask) v for one block: out ``(N, H, B, D)`` and,
    if asked, the probabilities ``(N, H, B, C + X)``."""
    dtype = q_blk.dtype
    if dtype in (torch.float16, torch.bfloat16):
        # Scores, score transforms, softmax and the weighted sum in float32, as FlexAttention
        # computes them: a score_mod's bias (ALiBi over hundreds of positions) would lose
        # most of its digits in 8 bits of mantissa.
        q_blk, k_blk, v_blk = q_blk.float(), k_blk.float(), v_blk.float()
    scores = attention_logits(q_blk, k_blk)  # (N, H, B, C + X)
    kv_idx = column_positions(block.columns, q_blk.device)
    scores = mask.scores(scores, block.start, kv_idx)
    block_mask = block.mask
    if block_mask is not None:
        # Hidden keys are set, not only added to: a score_mod (or an infinite logit) may give
        # them inf or NaN, which -inf added to would not hide.
        scores = (scores + block_mask).masked_fill(block_mask == float("-inf"), float("-inf"))
    if fingerprint is not None:  # before any op that saves a tensor: see _Fingerprint
        fingerprint.check(scores)
    empty = block.empty
    if mask.score_mod is not None:  # a score_mod may hide every key of a row itself (-inf)
        gone = (scores == float("-inf")).all(dim=-1, keepdim=True)
        scores = scores.masked_fill(gone, 0.0)
        empty = gone if empty is None else empty | gone
    probs = torch.softmax(scores, dim=-1)
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    # finite_values: every value is finite (checked once per call; assumed under torch.func,
    # where a value's finiteness cannot steer Python), so the plain product is exact.
    out = weighted_values(probs, v_blk) if finite_values else _weighted_finite(probs, v_blk)
    if empty is not None:  # selected: hidden values may be NaN, and 0 * NaN is NaN
        out = out.masked_fill(empty, 0.0)
    return out.to(dtype), probs.to(dtype) if need_weights else None


def _weighted_finite(probs: Tensor, v: Tensor) -> Tensor:
    """``probs v`` ``(N, H, B, D)``, where a key with probability 0 (hidden) adds nothing even
    if its value is inf or NaN (``0 * NaN`` is NaN): only the columns holding a non-finite
    value are summed apart, with their zero-probability terms left out. A visible non-finite
    value still reaches the output, as in the formula."""
    bad = ~torch.isfinite(v)  # (N, Hkv, C, D)
    if not bool(bad.any()):
        return weighted_values(probs, v)
    columns = bad.any(dim=-1).flatten(0, 1).any(dim=0).nonzero().flatten()  # (k,)
    out = weighted_values(probs, v.masked_fill(bad, 0.0))
    group = probs.shape[1] // v.shape[1]
    p = probs[..., columns]  # (N, H, B, k)
    values = v[..., columns, :].repeat_interleave(group, dim=1)  # (N, H, k, D)
    # Selected before the product, so that backward has no 0 * NaN either.
    shown = torch.where(p[..., None] > 0, values[:, :, None], values.new_zeros(()))
    return out + (p[..., None] * shown).sum(dim=-2)  # (N, H, B, D)


class _Fingerprint:
    """The sum of a block's finite scores (after the score_mod and the mask) at their first
    computation; the checkpoint's recomputation in backward must give it again, bit for bit
    (the same ops on the same inputs). A score_mod that reads state changed since the forward
    (a late-bound closure variable, a refilled buffer) would otherwise give the gradient of
    another function: it raises instead. Checked before the block's first op that saves a
    tensor for backward, since the recomputation stops once it has them all (checkpoint's
    early stop)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def check(self, scores: Tensor) -> None:
        finite = torch.nan_to_num(scores.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        value = finite.sum(dtype=torch.float64)
        if self.value is None:
            self.value = value
        elif not torch.equal(value, self.value):
            raise RuntimeError(
                "score_mod: it gave other values in backward than in forward (the backward "
                "recomputes each block's scores with it); a mod must be a pure function of "
                "its arguments and of captured tensors left unchanged until backward (in a "
                "loop, bind loop variables as default arguments: lambda ..., w=w: ...)"
            )


def _full_width(probs: Tensor, block: RowBlock, key_len: int) -> Tensor:
    """One block's weights ``(…, B, C + X)`` spread over all ``S + X`` columns, out of place:
    zeros on the hidden keys."""
    visible, real = block.visible, probs[..., : block.visible]
    if isinstance(block.columns, slice):
        before, after = block.columns.start, key_len - block.columns.stop
        real = F.pad(real, (before, after))
    else:
        zeros = probs.new_zeros((*probs.shape[:-1], key_len))
        real = zeros.index_copy(-1, block.columns, real)
    return torch.cat([real, probs[..., visible:]], dim=-1) if probs.shape[-1] > visible else real


def _place(weights: Tensor, probs: Tensor, block: RowBlock, key_len: int) -> None:
    """Writes one block's weights ``(…, B, C + X)`` into their columns of ``weights``."""
    rows = weights[..., block.start : block.stop, :]
    visible = block.visible
    rows[..., block.columns] = probs[..., :visible]
    if probs.shape[-1] > visible:
        rows[..., key_len:] = probs[..., visible:]


class _TiledFlash(torch.autograd.Function):
    """The SDPA route of :func:`tiled_attention` as one autograd node: per block, SDPA's CPU
    flash kernel and its backward, called directly on the block's visible columns.

    Forward keeps only the output and its log-sum-exp ``(N, H, L)``; backward rebuilds each
    block's mask from the description (no block mask is kept) and adds each block's key and
    value gradients into their columns in place, so nothing ``(N, Hkv, S, D)``-sized is made per
    block. Grouped key/value heads are repeated per block, on the visible columns only, and
    their gradients summed back over each group. Under ``create_graph=True`` the backward
    differentiates the formula route instead (the same function), which autograd can
    differentiate again.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        n, h, q_len, _ = q.shape
        out = q.new_zeros(n, h, q_len, v.shape[-1])
        lse = None
        kept = []  # the blocks as evaluated now: backward never calls the mods again
        backward = any(ctx.needs_input_grad[:3])
        for block, q_blk, k_blk, v_blk in _flash_blocks(q, k, v, mask, mask.row_blocks(q.device)):
            if backward:
                kept.append(_kept(block, binary=mask.user is None))
            o, logsumexp = _FLASH_CPU(q_blk, k_blk, v_blk, 0.0, False, attn_mask=block.mask)
            if lse is None:
                lse = logsumexp.new_full((n, h, q_len), float("-inf"))
            if block.empty is not None:
                o = o.masked_fill(block.empty, 0.0)
            out[..., block.start : block.stop, :] = o
            lse[..., block.start : block.stop] = logsumexp
        if lse is None:  # no block with a visible key
            lse = q.new_full((n, h, q_len), float("-inf"))
        ctx.mask, ctx.blocks = mask, kept
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        mask = ctx.mask
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            needed = ctx.needs_input_grad[:3]
            again, _ = tiled_attention(q, k, v, mask, formula=True)
            wanted = [x for x, need in zip((q, k, v), needed, strict=True) if need]
            grads = iter(torch.autograd.grad(again, wanted, grad_out, create_graph=True))
            return (*(next(grads) if need else None for need in needed), None)
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        key_len, group = mask.key_len, q.shape[1] // k.shape[1]
        blocks = (_restored(block, q.dtype) for block in ctx.blocks)
        for block, q_blk, k_blk, v_blk in _flash_blocks(q, k, v, mask, blocks):
            rows = slice(block.start, block.stop)
            g_out = grad_out[..., rows, :]
            if block.empty is not None:  # constant zero rows: nothing flows back
                g_out = g_out.masked_fill(block.empty, 0.0)
            g_q, g_k, g_v = _FLASH_CPU_BACKWARD(
                g_out.contiguous(),
                q_blk,
                k_blk,
                v_blk,
                out[..., rows, :],
                lse[..., rows],
                0.0,
                False,
                attn_mask=block.mask,
            )
            grad_q[..., rows, :] = g_q
            _add_columns(grad_k, _grouped_sum(g_k, group), block, key_len)
            _add_columns(grad_v, _grouped_sum(g_v, group), block, key_len)
        return grad_q, grad_k, grad_v, None


def _kept(block: RowBlock, binary: bool) -> RowBlock:
    """``block`` as kept for backward. A ``binary`` mask (0 and -inf only: the mods' verdicts,
    no user mask) is kept as bool (True = hidden), a quarter of its float size."""
    if block.mask is None or not binary:
        return block
    return replace(block, mask=block.mask == float("-inf"))


def _restored(block: RowBlock, dtype: torch.dtype) -> RowBlock:
    """The additive mask of a :func:`_kept` block."""
    mask = block.mask
    if mask is None or mask.dtype != torch.bool:
        return block
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return replace(block, mask=torch.where(mask, zero - float("inf"), zero))


def _flash_blocks(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, blocks):
    """``(block, q_blk, k_blk, v_blk)`` for each of ``blocks`` with a visible key; k and v
    repeated to q's heads on the block's columns only."""
    group = q.shape[1] // k.shape[1]
    for block in blocks:
        if block.visible + mask.extra_keys == 0:
            continue
        k_blk = take_columns(k, block.columns, mask.key_len, mask.extra_keys)
        v_blk = take_columns(v, block.columns, mask.key_len, mask.extra_keys)
        if group > 1:
            k_blk, v_blk = k_blk.repeat_interleave(group, 1), v_blk.repeat_interleave(group, 1)
        yield block, q[..., block.start : block.stop, :], k_blk, v_blk


def _grouped_sum(grad: Tensor, group: int) -> Tensor:
    """``(N, H, C, D)`` -> ``(N, Hkv, C, D)``: the gradient of a key/value head shared by
    ``group`` query heads."""
    if group == 1:
        return grad
    n, h, c, d = grad.shape
    return grad.view(n, h // group, group, c, d).sum(dim=2)


def _add_columns(total: Tensor, grad: Tensor, block: RowBlock, key_len: int) -> None:
    """Adds a block's key/value gradient ``(N, Hkv, C + X, D)`` into its columns of
    ``total`` ``(N, Hkv, S + X, D)``."""
    visible = block.visible
    if isinstance(block.columns, slice):
        total[..., block.columns, :] += grad[..., :visible, :]
    else:
        total.index_add_(2, block.columns, grad[..., :visible, :])
    if grad.shape[2] > visible:
        total[..., key_len:, :] += grad[..., visible:, :]
