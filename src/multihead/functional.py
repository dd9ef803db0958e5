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
from torch.nn.attention import SDPBackend

from .attention_mask import AttentionMask, as_causal_flag
from .logits import attention_logits, weighted_values
from .logits import scale as logits_scale
from .masks import causal_mask, split_empty_rows, with_sink_logits
from .mods import MaskMod, ScoreMod
from .projection import append_zero_slot, merge_heads, packed_heads, split_packed_heads
from .tiled import _FLASH_CPU, _FLASH_CPU_BACKWARD, tiled_attention
from .transforms import functional_autodiff
from .validation import check_attention_arguments
from .weights import (
    averaged_attention_weights,
    block_probabilities,
    blockwise_attention_with_weights,
)


def attention_weights(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    softcap: float | None = None,
) -> Tensor:
    """Softmax attention weights ``(N, H, L, S)`` for q ``(N, H, L, D)`` and k ``(N, Hkv, S, D)``.

    Scale 1/sqrt(D), then the optional soft-cap, then the additive float ``mask`` (as
    :func:`attention`), then ``is_causal`` (keys j > i masked, top-left aligned). A row whose
    keys are all masked is zero.

    Raises:
        TypeError, ValueError: as :func:`attention`.
    """
    check_attention_arguments(q, k, None, mask, softcap=softcap)
    mask, is_causal = _fold_causal(q, k, _four_dims(mask), is_causal)
    mask, empty = split_empty_rows(mask)
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
    functional_autodiff: bool = False,
) -> str:
    """The one dispatch point; returns which kernel :func:`attention` runs.

    - ``"sdpa"``: ``need_weights=False``. ``F.scaled_dot_product_attention`` (flash / fused
      kernels, causal as a flag so it can skip blocks, key/value heads shared by the kernel),
      in training and inference alike; under autograd its backward is differentiable again
      (see :class:`_FusedAttention`).
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
      small calls, empty calls (a size of 0), and every call under torch.func transforms or
      forward-mode AD (plain ops only; see :func:`functional_autodiff`).
    """
    if functional_autodiff or score_elements == 0:
        return "explicit"
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
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention, optionally returning its weights.

    Every path (see :func:`select_path`) computes the same numbers, to rounding. A query row
    whose keys are all masked attends to nothing: its output and weights are zero (never NaN,
    whatever the masked keys and values hold).

    Args:
        q: ``(N, H, L, D)``.
        k, v: ``(N, Hkv, S, D)``; Hkv divides H, and query head h reads key/value head
            h // (H / Hkv) (grouped-query attention; Hkv = 1 is multi-query).
        mask: additive float mask (0 = attend, -inf = masked, other values added to the
            logits) of q's dtype, broadcastable to ``(N, H, L, S)``, or None. Bool masks are
            refused: torch gives them opposite meanings (SDPA: True = attend;
            MultiheadAttention: True = masked); convert with
            :func:`multihead.masks.to_additive` (True = masked).
        is_causal: mask keys j > i (top-left aligned, as SDPA).
        dropout_p: dropout on the attention weights, in [0, 1]; pass 0.0 in eval.
        need_weights: also return the weights.
        average_weights: return weights averaged over heads ``(N, L, S)`` instead of
            per head ``(N, H, L, S)``.
        softcap: logits become ``softcap * tanh(logits / softcap)`` before the mask (Gemma 2);
            a finite number > 0, or None.
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``, True = attend (FlexAttention's
            signature and polarity; see :mod:`multihead.mods`); q_idx in [0, L), kv_idx in
            [0, S). Tiles it hides entirely are skipped, forward and backward.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (FlexAttention's), on
            the scaled (and soft-capped) logits, before ``mask``. Gradients reach any tensor
            it captures.
        sinks: ``(H,)`` attention-sink logits (gpt-oss), or None: each head's softmax gets
            one more logit, ``sinks[h]``, that attends to no value, so a row's weights sum to
            less than 1 (a row whose keys are all masked gives all its weight to the sink:
            zero output and weights). Cast to q's dtype; gradients reach it. The returned
            weights cover the S real keys only. As HF's ``GptOssAttention`` (eager).

    The order: ``q k^T / sqrt(D)``, soft-cap, ``score_mod``, ``+ mask``, then ``mask_mod`` and
    ``is_causal`` hide keys, softmax, dropout.

    Returns:
        ``(out, weights)``: out ``(N, H, L, D)``; weights as above, or None.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, dtypes that differ, a bool mask, a mod
            that is not callable, or a mod returning the wrong kind of tensor.
        ValueError: ranks other than 4, mismatched sizes, head counts that do not divide, a
            mask that does not broadcast, dropout_p / softcap out of range, or a mod result
            that does not broadcast.
    """
    check_attention_arguments(
        q,
        k,
        v,
        mask,
        dropout_p=dropout_p,
        softcap=softcap,
        mask_mod=mask_mod,
        score_mod=score_mod,
        sinks=sinks,
    )
    mask = _four_dims(mask)
    mask_mod, is_causal = as_causal_flag(mask_mod, is_causal)
    tiled = mask_mod is not None or score_mod is not None
    folded, causal = (mask, is_causal) if tiled else _fold_causal(q, k, mask, is_causal)
    key_len = k.shape[2]
    # Sinks with no other constraint than causality: no mask is built (AttentionMask.sinks;
    # attention_core folds the sink in from the log-sum-exp, or builds its slot form).
    sink_alone = sinks is not None and mask is None and not tiled
    sinks_causal = sink_alone and causal
    if sinks is not None:
        # The sink is one more key slot (zero key, zero value) whose logit comes from the
        # mask. Alone, its causal flag goes to AttentionMask.sinks_causal; with a mask (not
        # tiled), _fold_causal has already put causality into it; tiled, it stays a mod.
        if sink_alone:
            causal = False
        else:
            if folded is not None:
                folded = F.pad(folded, (0, 1))
            folded = with_sink_logits(folded, sinks.to(q.dtype), key_len + 1)
        k, v = append_zero_slot(k), append_zero_slot(v)
    constraints = AttentionMask(
        batch=q.shape[0],
        heads=q.shape[1],
        query_len=q.shape[2],
        key_len=key_len,
        extra_keys=k.shape[2] - key_len,
        user=folded,
        causal=causal,
        mask_mod=mask_mod,
        score_mod=score_mod,
        softcap=softcap,
        dtype=q.dtype,
        rows_keep_a_key=mask is None and mask_mod is None,
        sink_slot=sinks is not None and not sink_alone,
        sinks=sinks.to(q.dtype) if sink_alone else None,
        sinks_causal=sinks_causal,
    )
    out, weights = attention_core(
        q,
        k,
        v,
        constraints,
        dropout_p=dropout_p,
        need_weights=need_weights,
        average_weights=average_weights,
    )
    if sinks is not None and weights is not None:
        weights = weights[..., :key_len]  # the real keys' weights, without the sink's
    return out, weights


def attention_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    *,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    average_weights: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """:func:`attention` without the argument checks (the layer has made them), for the
    constraints ``mask`` describes. The one dispatch point: constraints evaluated per tile go
    to :func:`multihead.tiled.tiled_attention`; the rest to the kernel :func:`select_path`
    picks."""
    autodiff = functional_autodiff(q, k, v, mask.user, mask.sinks)
    if mask.sinks is not None:
        if not autodiff:
            done = _sinks_on_flash(q, k, v, mask, dropout_p, need_weights, average_weights)
            if done is not None:
                return done
        mask = mask.sink_slot_form()
    if mask.needs_tiles:
        return tiled_attention(
            q,
            k,
            v,
            mask,
            dropout_p=dropout_p,
            need_weights=need_weights,
            average_weights=average_weights,
            functional_autodiff=autodiff,
        )
    tensor, is_causal = mask.sdpa_args()
    softcap = mask.softcap
    tensor, empty = (
        split_empty_rows(tensor, mask.sink_slot) if mask.may_empty_rows else (tensor, None)
    )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, tensor)
    )
    path = select_path(
        need_weights=need_weights,
        average_weights=average_weights,
        dropout_p=dropout_p,
        needs_grad=needs_grad,
        # D = 0 counts as empty too: no dot products, which the fused kernels do not take.
        score_elements=q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * min(q.shape[3], 1),
        softcap=softcap is not None,
        functional_autodiff=autodiff,
    )
    if path == "explicit":
        return explicit_attention(
            q,
            k,
            v,
            tensor,
            empty,
            is_causal=is_causal,
            softcap=softcap,
            dropout_p=dropout_p,
            need_weights=need_weights,
            average_weights=average_weights,
        )
    if path == "blockwise":
        out, weights = blockwise_attention_with_weights(
            q,
            k,
            v,
            tensor,
            empty,
            is_causal=is_causal,
            average_weights=average_weights,
            softcap=softcap,
        )
        return out, weights if need_weights else None

    out = _select_empty(sdpa(q, k, v, tensor, dropout_p=dropout_p, is_causal=is_causal), empty)
    weights = None
    if path == "sdpa+averaged_weights":
        weights = averaged_attention_weights(q, k, tensor, empty, is_causal=is_causal)
    return out, weights


def _sinks_on_flash(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    dropout_p: float,
    need_weights: bool,
    average_weights: bool,
) -> tuple[Tensor, Tensor | None] | None:
    """A call whose only constraints are sinks and causality (``mask.sinks``), on the
    flash route (:func:`_sink_flash`) where :func:`select_path` picks SDPA for its slot form;
    None otherwise (the caller then runs the slot form)."""
    sinks = mask.sinks
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, sinks))
    path = select_path(
        need_weights=need_weights,
        average_weights=average_weights,
        dropout_p=dropout_p,
        needs_grad=needs_grad,
        score_elements=q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * min(q.shape[3], 1),
        softcap=mask.softcap is not None,
    )
    if path not in ("sdpa", "sdpa+averaged_weights") or dropout_p != 0.0:
        return None
    out = _sink_flash(q, k, v, sinks.to(q.dtype), mask.sinks_causal)
    if out is None:
        return None
    if path == "sdpa":
        return out, None
    tensor, is_causal = mask.sink_slot_form().sdpa_args()  # the weights need the sink's column
    return out, averaged_attention_weights(q, k, tensor, None, is_causal=is_causal)


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    empty: Tensor | None,
    *,
    is_causal: bool,
    softcap: float | None,
    dropout_p: float,
    need_weights: bool,
    average_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """The ``"explicit"`` path of :func:`select_path`: softmax(q k^T / sqrt(D) + mask), dropout,
    then ``P v``, materialised as torch does. ``mask`` and ``empty`` are
    :func:`multihead.masks.split_empty_rows`'s; returns out ``(N, H, L, D)`` and the weights
    ``(N, [H,] L, S)`` or None."""
    weights = block_probabilities(q, k, mask, empty, is_causal=is_causal, softcap=softcap)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = _select_empty(weighted_values(weights, v), empty)  # (N, H, L, D)
    if not need_weights:
        return out, None
    return out, weights.mean(dim=1) if average_weights else weights


def packed_self_attention(
    proj: Tensor,
    num_heads: int,
    *,
    batch_first: bool,
    dropout_p: float,
    need_weights: bool,
    average_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """Unmasked self-attention from a packed projection, with the fewest eager ops: the
    layer's plain small call (``mha(x, x, x)`` on a layer with no option beyond torch's).

    Args:
        proj: the packed in-projection ``(N, L, 3E)`` (``batch_first``) or ``(L, N, 3E)``,
            features q, then k, then v.
        num_heads: H, dividing E.
        dropout_p: dropout on the weights (0.0 in eval).
        need_weights, average_weights: as :func:`attention`.

    Returns:
        the merged output ``(N, L, E)`` or ``(L, N, E)``, before the out-projection, and the
        weights ``(N, [H,] L, L)`` or None.

    The same formula and order as the ``"explicit"`` path (:func:`explicit_attention`) and,
    for ``need_weights=False``, the same SDPA call as :func:`attention_core` makes. With
    weights, q, k and v are copied out of the projection in one op and multiplied with
    ``bmm`` on ``(N * H, L, D)``: ``matmul`` on the head-split views copies each of them and
    folds the dims itself (measured on the seed example: 32 us against 44 us for this part).
    tests/test_plain_call.py checks it against the full path.
    """
    if not need_weights:
        q, k, v = split_packed_heads(proj, num_heads, batch_first)  # (N, H, L, D) views
        if not functional_autodiff(q, k, v):
            out = sdpa(q, k, v, None, dropout_p=dropout_p, is_causal=False)
            return merge_heads(out, batch_first), None
    qkv = packed_heads(proj, num_heads, batch_first)  # (3, N, H, L, D) view
    _, batch, _, length, head_dim = qkv.shape
    q, k, v = qkv.reshape(3, batch * num_heads, length, head_dim).unbind(0)  # one copy
    probs = torch.softmax(torch.bmm(q * logits_scale(head_dim), k.transpose(1, 2)), dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.bmm(probs, v).view(batch, num_heads, length, head_dim)  # (N, H, L, D)
    out = merge_heads(out, batch_first)
    if not need_weights:
        return out, None
    probs = probs.view(batch, num_heads, length, length)
    return out, probs.mean(dim=1) if average_weights else probs


def _fold_causal(
    q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool
) -> tuple[Tensor | None, bool]:
    """One constraint form per call: the kernels' causal flag only ever comes alone; with a
    mask, causality joins the mask, so that rows emptied by the two together are found by
    split_empty_rows."""
    if is_causal and mask is not None:
        return mask + causal_mask(q.shape[-2], k.shape[-2], mask.dtype, mask.device), False
    return mask, is_causal


def _four_dims(mask: Tensor | None) -> Tensor | None:
    """A mask broadcastable to ``(N, H, L, S)`` as a 4-D view (every kernel indexes dims -2 and
    -1 of a 4-D mask; a 1-D ``(S,)`` mask would not index)."""
    if mask is None or mask.dim() == 4:
        return mask
    return mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _select_empty(out: Tensor, empty: Tensor | None) -> Tensor:
    """Zeroes the output rows of queries that had no key, by selection: their masked values
    may hold NaN or inf, and 0 * NaN is NaN."""
    return out if empty is None else out.masked_fill(empty, 0.0)


def sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, dropout_p: float, is_causal: bool
) -> Tensor:
    """``F.scaled_dot_product_attention`` ``(N, H, L, D)`` with grouped key/value heads, whose
    backward can itself be differentiated (double backward, a gradient penalty).

    SDPA's CPU flash kernel (taken when there is no dropout and no mask gradient) has no
    derivative for its backward; :class:`_FusedAttention` keeps that kernel for the forward
    and the first backward, and gives a differentiable backward when one is asked for.
    """
    fused = (
        not torch.compiler.is_compiling()  # compiled graphs differentiate SDPA themselves
        and torch.is_grad_enabled()
        and dropout_p == 0.0
        and (mask is None or not mask.requires_grad)
        and any(t.requires_grad for t in (q, k, v))
    )
    if fused:
        return _FusedAttention.apply(q, k, v, mask, is_causal)
    return _sdpa(q, k, v, mask, dropout_p=dropout_p, is_causal=is_causal)


# SDPA's CPU flash kernel and its backward (_FLASH_CPU, _FLASH_CPU_BACKWARD, from .tiled) are
# called directly when SDPA itself would take them (torch >= 2.3; absent elsewhere): no inner
# graph, no nested autograd call (measured fwd+bwd overhead over plain SDPA: 25 us instead of
# 65 us per call).


def _direct_flash(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> bool:
    """Whether SDPA itself would run its CPU flash kernel here, so that calling the kernel
    directly computes exactly what SDPA computes: torch's own choice (``_fused_sdp_choice``,
    which checks strides, dtypes and the backends allowed by ``sdpa_kernel``), for one head
    per key/value head."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if _FLASH_CPU is None or _FLASH_CPU_BACKWARD is None or choose is None:
        return False
    if q.device.type != "cpu" or k.shape[1] != q.shape[1]:
        return False
    return choose(q, k, v, mask, 0.0, is_causal) == int(SDPBackend.FLASH_ATTENTION)


class _FusedAttention(torch.autograd.Function):
    """SDPA forward; backward by SDPA's own kernel, or, under ``create_graph=True``, by
    differentiating the explicit formula (the same function, so the same gradient to rounding),
    which autograd can differentiate again.

    Only for calls without dropout (the explicit formula could not replay SDPA's dropout) and
    without mask gradients; torch.func and forward-mode AD never reach it (see
    :func:`select_path`). Where SDPA takes its CPU flash kernel, the kernel and its backward
    are called directly; elsewhere SDPA's own graph is kept, on detached inputs.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool):
        ctx.mask, ctx.is_causal = mask, is_causal
        ctx.direct = _direct_flash(q, k, v, mask, is_causal)
        if ctx.direct:
            out, logsumexp = _FLASH_CPU(q, k, v, 0.0, is_causal, attn_mask=mask)
            ctx.save_for_backward(q, k, v, out, logsumexp)
            return out
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(x.requires_grad) for x in (q, k, v)]
            out = _sdpa(*leaves, mask, dropout_p=0.0, is_causal=is_causal)
        ctx.leaves, ctx.out = leaves, out
        ctx.save_for_backward(q, k, v)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        needed = ctx.needs_input_grad[:3]
        saved = ctx.saved_tensors  # once: checkpointing lets each be unpacked only once
        q, k, v = saved[:3]
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            probs = block_probabilities(q, k, ctx.mask, is_causal=ctx.is_causal)
            inputs, out = (q, k, v), weighted_values(probs, v)
        elif ctx.direct:
            out, logsumexp = saved[3:]
            grads = _FLASH_CPU_BACKWARD(
                grad_out,
                q,
                k,
                v,
                out,
                logsumexp,
                0.0,
                ctx.is_causal,
                attn_mask=ctx.mask,
            )
            return (
                *(g if need else None for g, need in zip(grads, needed, strict=True)),
                None,
                None,
            )
        else:
            inputs, out = ctx.leaves, ctx.out
        wanted = [x for x, need in zip(inputs, needed, strict=True) if need]
        grads = iter(
            torch.autograd.grad(
                out, wanted, grad_out, retain_graph=True, create_graph=torch.is_grad_enabled()
            )
        )
        return (*(next(grads) if need else None for need in needed), None, None)


def _sink_flash(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, is_causal: bool) -> Tensor | None:
    """Attention with sinks over keys / values ``(N, H, S + 1, D)`` whose last slot is the
    sink's (zero key and value): SDPA's CPU flash kernel over the S real keys, the sink folded
    in from its log-sum-exp (:class:`_SinkFlashAttention`). None where that kernel would not
    run (other devices, grouped heads, strides it refuses, torch.compile): the caller then
    runs the sink as a masked key slot, the same numbers to rounding."""
    if torch.compiler.is_compiling():
        return None
    k, v = k[:, :, :-1], v[:, :, :-1]
    if not _direct_flash(q, k, v, None, is_causal):
        return None
    return _SinkFlashAttention.apply(q, k, v, sinks, is_causal)


class _SinkFlashAttention(torch.autograd.Function):
    """softmax([q k^T / sqrt(D) (causal), sinks[h]]) without the sink's column, times v,
    ``(N, H, L, D)``, from SDPA's CPU flash kernel on the real keys.

    With the kernel's log-sum-exp ``lse`` over the real keys and ``total = logaddexp(lse,
    sink)``, the sink's share of each row is ``exp(sink - total)`` and the output is the
    kernel's times ``exp(lse - total)``. Backward: the flash backward given that output and
    ``total`` computes the gradients of the sink-inclusive softmax for q, k and v exactly
    (its ``rowsum(dO * O)`` term is then the full softmax's, and ``exp(s - total)`` the
    probabilities over every slot); the sink's gradient is ``-sum(exp(sink - total) *
    rowsum(dO * O))`` over batch and queries (its value is zero, so ``dP`` is zero there).
    Under ``create_graph=True`` the backward differentiates the explicit formula instead.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, is_causal: bool):
        out, lse = _FLASH_CPU(q, k, v, 0.0, is_causal)
        sink = sinks.to(lse.dtype).view(1, -1, 1)
        total = torch.logaddexp(lse, sink)  # (N, H, L)
        out = out * torch.exp(lse - total).unsqueeze(-1).to(out.dtype)
        ctx.is_causal = is_causal
        ctx.save_for_backward(q, k, v, sinks, out, total)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, sinks, out, total = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            logits = attention_logits(q, k)
            if ctx.is_causal:
                above = causal_mask(q.shape[2], k.shape[2], logits.dtype, logits.device)
                logits = logits + above
            column = sinks.to(logits.dtype).view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
            probs = torch.softmax(torch.cat([logits, column], dim=-1), dim=-1)[..., :-1]
            formula = weighted_values(probs, v)
            needed = ctx.needs_input_grad[:4]
            inputs = [x for x, need in zip((q, k, v, sinks), needed, strict=True) if need]
            grads = iter(torch.autograd.grad(formula, inputs, grad_out, create_graph=True))
            return (*(next(grads) if need else None for need in needed), None)
        dq, dk, dv = _FLASH_CPU_BACKWARD(grad_out, q, k, v, out, total, 0.0, ctx.is_causal)
        share = torch.exp(sinks.to(total.dtype).view(1, -1, 1) - total)  # (N, H, L)
        delta = (grad_out.to(total.dtype) * out.to(total.dtype)).sum(-1)  # rowsum(dO * O)
        dsinks = -(share * delta).sum(dim=(0, 2)).to(sinks.dtype)
        return dq, dk, dv, dsinks, None


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
