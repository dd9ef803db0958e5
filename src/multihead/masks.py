"""Torch-MHA masks -> one canonical additive mask, in one place.

Shape legend: N batch, L query length, S key length, H heads, X extra key slots
(``add_bias_kv`` and ``add_zero_attn``).

Polarity. ``torch.nn.MultiheadAttention`` takes bool masks where True means *ignore this key*,
and float masks that are *added* to the logits. Every accepted form becomes one additive float
mask, broadcastable to ``(N, H, L, S + X)``, where 0 means attend and -inf means masked::

    bool (True = masked)      additive
    [[F, T, T],               [[0, -inf, -inf],
     [F, F, T],       ->       [0,    0, -inf],
     [F, F, F]]                [0,    0,    0]]

(that one is the causal mask: query i sees keys j <= i). The extra key slots are always
attendable, so the mask is padded with zeros for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import mods
from .transforms import functional_autodiff
from .validation import invalid


def to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Turns a bool (True = masked) or float (additive) mask into an additive mask of ``dtype``.

    A float mask is cast as it is; :func:`canonical_mask` casts the sum of all constraints to a
    narrower compute dtype with :func:`narrowed` instead, so that large finite values keep
    their meaning.
    """
    if mask.dtype == torch.bool:
        # Out of place, so that a vmapped mask works and the caller's is untouched.
        zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return zeros.masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def narrowed(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive mask cast to ``dtype``, keeping its meaning where ``dtype``'s range is smaller.

    Every row (the last dim, over keys; it must hold every constraint in force, so this runs
    on the final sum) is first shifted so that its largest finite value is 0, which leaves the
    softmax unchanged, then cast. So a row of one large constant (-1e39, or -1e5 in a float16
    model) adds nothing, as in the formula, instead of overflowing to -inf and becoming an
    empty row; values that still overflow after the shift lie so far below the row's maximum
    that their weight is 0 anyway. Every row moves, not only those that would overflow, so
    that nearly equal masks give nearly equal results. The shift is a constant per row, so the
    mask's gradient is unchanged (it is detached). A cast to a dtype of the same or a larger
    range is a plain cast.
    """
    if torch.finfo(mask.dtype).max > torch.finfo(dtype).max:
        finite = torch.isfinite(mask)
        top = mask.detach().masked_fill(~finite, float("-inf")).amax(dim=-1, keepdim=True)
        mask = mask - top.masked_fill(~torch.isfinite(top), 0.0)  # rows with no finite value
    return mask.to(dtype)


def causal_mask(query_len: int, key_len: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive causal mask ``(L, S)``, aligned top-left as SDPA's ``is_causal``: i sees j <= i."""
    positions = torch.arange(max(query_len, key_len), device=device)
    return to_additive(
        position_mask(positions[:query_len], positions[:key_len], causal=True), dtype
    )


def is_causal_pattern(mask: Tensor) -> bool:
    """Whether a 2-D ``(L, S)`` mask is exactly the causal mask (bool True / float -inf on
    j > i, and attend / 0.0 elsewhere). Data-dependent, so never asked under torch.compile.

    A matrix that is constant along every diagonal is fixed by its first row and first column,
    so the check is those two plus ``M[1:, 1:] == M[:-1, :-1]``: one pass over two views, no
    reference mask built (about 11 ms for a float 4096 x 4096 mask here, against about 125 ms
    for the causal attention it lets the kernel skip half of).
    """
    if mask.dim() != 2 or mask.numel() == 0 or torch.compiler.is_compiling():
        return False
    if (mask.requires_grad and torch.is_grad_enabled()) or functional_autodiff(mask):
        return False  # the flag would drop the mask's gradient; transforms cannot branch on data
    is_bool = mask.dtype == torch.bool
    masked, attend = (True, False) if is_bool else (float("-inf"), 0.0)
    first_row_masked = bool((mask[0, 1:] == masked).all())
    first_column_attends = bool((mask[:, 0] == attend).all())
    return first_row_masked and first_column_attends and torch.equal(mask[1:, 1:], mask[:-1, :-1])


def position_mask(
    query_positions: Tensor, key_positions: Tensor, *, causal: bool, window: int | None = None
) -> Tensor:
    """Bool ``(L, S)`` mask (True = masked) from absolute positions, by the mask mods of
    :mod:`multihead.mods` (:data:`~multihead.mods.causal`, :func:`~multihead.mods.sliding_window`),
    where causality and windows are defined once.

    ``causal`` hides keys after the query (j > i). ``window`` keeps keys closer than ``window``:
    with causal, i - window < j <= i; without, |i - j| < window. For window=2, causal::

        [[0, 1, 1, 1],
         [0, 0, 1, 1],
         [1, 0, 0, 1],
         [1, 1, 0, 0]]
    """
    q_idx, kv_idx = query_positions[:, None], key_positions[None, :]  # (L, 1), (1, S)
    if window is not None:
        allowed = mods.sliding_window(window, causal=causal)(None, None, q_idx, kv_idx)
    elif causal:
        allowed = mods.causal(None, None, q_idx, kv_idx)
    else:
        return torch.zeros(q_idx.shape[0], kv_idx.shape[1], dtype=torch.bool, device=q_idx.device)
    return ~allowed


def effective_window(window: int | None, query_len: int, key_len: int) -> int | None:
    """``window``, or None where it hides nothing: no query is ``max(L, S)`` or more positions
    from a key (query positions, offset by a KV cache, stay below its max_len = S), so a window
    that long is no limit. Also keeps any Python int (2**63, 10**30) out of int64 arithmetic."""
    if window is None or window >= max(query_len, key_len):
        return None
    return window


def segment_mask(segment_ids: Tensor) -> Tensor:
    """Bool ``(N, 1, L, L)`` mask (True = masked) that keeps each token within its segment;
    ``segment_ids`` is ``(N, L)``, one integer label per token of a packed row (the rule of
    :func:`multihead.mods.document`)."""
    batch, length = segment_ids.shape
    positions = torch.arange(length, device=segment_ids.device)
    b = torch.arange(batch, device=segment_ids.device).view(-1, 1, 1, 1)
    return ~mods.document(segment_ids)(b, None, positions.view(1, 1, -1, 1), positions.view(-1))


def canonical_mask(
    *,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    batch_size: int,
    num_heads: int,
    query_len: int,
    key_len: int,
    extra_keys: int,
    dtype: torch.dtype,
    device: torch.device,
    query_offset: int | Tensor = 0,
    window: int | None = None,
    segment_ids: Tensor | None = None,
    narrow: bool = True,
    sinks: Tensor | None = None,
) -> tuple[Tensor | None, bool]:
    """Merges torch's masks and our positional constraints into one additive mask.

    Args:
        key_padding_mask: ``(N, S)`` (or ``(S,)`` with N = 1), bool or float.
        attn_mask: ``(L, S)`` or ``(N * H, L, S)`` (batch-major), bool or float.
        is_causal: also mask keys j > i, whether or not ``attn_mask`` is given.
        extra_keys: number of always-attendable key slots appended after the S real keys.
        query_offset: absolute position of the first query (a KV cache's fill level, possibly
            a 0-dim tensor); key j is at position j.
        window: sliding window, see :func:`position_mask`.
        segment_ids: ``(N, L)`` segment labels of a packed self-attention row (L == S).
        narrow: cast the sum to ``dtype`` with :func:`narrowed`. False leaves it in the widest
            float dtype given, for a caller that adds more constraints per tile and narrows
            each tile's sum itself.
        sinks: ``(H,)`` attention-sink logits, or None. The last extra slot is then the sink
            (the caller appends a zero key and value there): its column holds ``sinks[h]``
            (see :func:`with_sink_logits`), added before the sum is narrowed, so that the
            row shift of :func:`narrowed` moves the sink with the real logits.

    Returns:
        ``(mask, causal)``. ``mask`` is additive, broadcastable to ``(N, H, L, S + X)``, or None.
        ``causal`` is True only when causality is *not* in ``mask`` and the kernel must apply it;
        that happens when causal is the only constraint (from ``is_causal``, or an ``attn_mask``
        that is exactly the causal pattern), so a kernel can skip whole blocks.
    """
    if sinks is not None and (extra_keys < 1 or tuple(sinks.shape) != (num_heads,)):
        raise ValueError(
            invalid(
                "sinks",
                f"shape ({num_heads},) and extra_keys >= 1 (the last extra slot is the sink's)",
                f"shape {tuple(sinks.shape)}, extra_keys={extra_keys}",
            )
        )
    window = effective_window(window, query_len, key_len)
    no_offset = isinstance(query_offset, int) and query_offset == 0
    plain = no_offset and window is None and segment_ids is None
    if plain and key_padding_mask is None and extra_keys == 0:
        if attn_mask is not None and is_causal_pattern(attn_mask):
            # A causal mask given as a tensor runs as fast as is_causal: the kernel can skip
            # the blocks above the diagonal instead of adding -inf to them.
            attn_mask, is_causal = None, True
        if is_causal and attn_mask is None:
            return None, True

    # The constraints are summed in the widest float dtype given (a float64 mask on a float32
    # layer stays float64 until the end), then narrowed to the compute dtype in one place.
    work = dtype
    for given in (attn_mask, key_padding_mask, sinks):
        if given is not None and given.is_floating_point():
            work = torch.promote_types(work, given.dtype)
    mask: Tensor | None = None
    if attn_mask is not None:
        mask = to_additive(attn_mask, work)
        if mask.dim() == 3:
            mask = mask.view(batch_size, num_heads, query_len, key_len)  # (N, H, L, S)
    if key_padding_mask is not None:
        padding = to_additive(key_padding_mask, work).view(batch_size, 1, 1, key_len)
        mask = padding if mask is None else mask + padding  # (N, 1 or H, L or 1, S)
    if is_causal or window is not None:
        query_positions = torch.arange(query_len, device=device) + query_offset
        key_positions = torch.arange(key_len, device=device)
        positional = to_additive(
            position_mask(query_positions, key_positions, causal=is_causal, window=window), work
        )  # (L, S)
        mask = positional if mask is None else mask + positional
    if segment_ids is not None:
        segments = to_additive(segment_mask(segment_ids), work)  # (N, 1, L, S)
        mask = segments if mask is None else mask + segments
    if mask is not None and extra_keys:
        mask = F.pad(mask, (0, extra_keys))  # (..., S + X); the extra slots stay attendable
    if sinks is not None:
        mask = with_sink_logits(mask, sinks.to(work), key_len + extra_keys)
    if mask is None or not narrow:
        return mask, False
    return narrowed(mask, dtype), False


def with_sink_logits(mask: Tensor | None, sinks: Tensor, columns: int) -> Tensor:
    """An additive mask whose last column (of ``columns``, the sink slot) also holds each
    head's sink logit: ``mask`` ``(N|1, H|1, L|1, columns)`` or None, ``sinks`` ``(H,)`` ->
    ``(N|1, H, L|1, columns)``.

    An attention sink (gpt-oss; Xiao et al. 2023, "Efficient Streaming Language Models with
    Attention Sinks", learned as in OpenAI's gpt-oss reference) is one more logit per head in
    the softmax's normaliser that attends to no value. With a zero key and a zero value in that
    slot, its logit is ``q . 0 + sinks[h] = sinks[h]`` and its output is 0: every kernel that
    takes an additive mask and extra key slots computes it, gradients of ``sinks`` included
    (they flow through the mask)."""
    column = F.pad(sinks.view(1, -1, 1, 1), (columns - 1, 0))  # (1, H, 1, columns)
    return column if mask is None else mask + column


def split_empty_rows(
    mask: Tensor | None, sink_slot: bool = False
) -> tuple[Tensor | None, Tensor | None]:
    """Finds the query rows whose keys are all masked, and unmasks them for the kernel.

    Softmax over an empty set is undefined; we define the attention of such a row as zero.
    The kernel sees those rows fully unmasked (so nothing is NaN, in forward or backward), and
    the caller zeroes them afterwards with the returned ``empty`` mask.

    Args:
        mask: additive mask broadcastable to ``(N, H, L, S)``, or None.
        sink_slot: the last column is an attention sink's (see :func:`with_sink_logits`): a
            row whose other columns are all masked is empty too (its whole weight goes to the
            sink, which attends to nothing: output and real weights zero), so that its masked
            keys' values, NaN included, never reach the output.

    Returns:
        ``(mask, empty)``: the mask with empty rows set to 0, and a bool ``(..., L, 1)`` tensor
        that is True on empty rows (broadcastable to both weights and outputs), or ``(None, None)``.
    """
    if mask is None:
        return None, None
    keys = mask[..., :-1] if sink_slot else mask
    empty = (keys == float("-inf")).all(dim=-1, keepdim=True)  # (..., L, 1)
    return mask.masked_fill(empty, 0.0), empty
