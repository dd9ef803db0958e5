"""A dense float64 reference for FlexAttention-style mods (issue 10), written from the formula.

Independent of src/: nothing from ``multihead`` is imported. Every mod is evaluated once on the
full ``(N, H, L, S)`` index grids (broadcast int64 index tensors, as the contract promises the
tiles get them), then the order of the math is applied in one place:

    logits = (q @ k^T) / sqrt(D)                      (query head h reads kv head h // (H / Hkv))
    logits = softcap * tanh(logits / softcap)         (the ``softcap=`` option, every key)
    logits = score_mod(logits, b, h, q_idx, kv_idx)   (the S - X real keys only)
    logits = logits + mask                            (additive float mask)
    logits = -inf where mask_mod is False, or is_causal hides the key (kv_idx > q_idx)
    P = softmax(logits) per row; a row with no finite logit attends to nothing: P row = 0
    out = P @ v

``q_idx`` = ``query_offset`` + i (a KV cache's fill level), ``kv_idx`` = j over the real keys;
the last ``extra_keys`` keys (add_bias_kv / add_zero_attn slots) are always visible and no mod
sees them. ``h`` given to the mods is the query head.

Also here: reference mods (flex polarity: True = attend) written from the contract's text,
ALiBi's slopes from the paper's code, and T5's relative-position buckets from the paper /
Mesh TensorFlow formula.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def index_grids(n: int, h: int, q_len: int, k_len: int, *, query_offset: int = 0):
    """Broadcast int64 index tensors ``b (N,1,1,1)``, ``h (1,H,1,1)``, ``q_idx (1,1,L,1)``,
    ``kv_idx (1,1,1,S)``."""
    return (
        torch.arange(n).view(n, 1, 1, 1),
        torch.arange(h).view(1, h, 1, 1),
        (torch.arange(q_len) + query_offset).view(1, 1, q_len, 1),
        torch.arange(k_len).view(1, 1, 1, k_len),
    )


def dense_mask(mask_mod, n: int, h: int, q_len: int, k_len: int, *, query_offset: int = 0):
    """``mask_mod`` on the whole grid, as a bool ``(N, H, L, S)`` tensor (True = attend)."""
    grids = index_grids(n, h, q_len, k_len, query_offset=query_offset)
    return torch.broadcast_to(mask_mod(*grids), (n, h, q_len, k_len))


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    softcap: float | None = None,
    mask_mod=None,
    score_mod=None,
    query_offset: int = 0,
    extra_keys: int = 0,
) -> tuple[Tensor, Tensor]:
    """q ``(N, H, L, D)``, k / v ``(N, Hkv, S, D)`` -> out ``(N, H, L, D)`` and per-head weights
    ``(N, H, L, S)``. Differentiable in every input and in anything the mods capture.

    ``mask``: additive, broadcastable to ``(N, H, L, S)`` (all S keys, extras included).
    """
    n, heads, q_len, d = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)  # query head h -> kv head h // group
    v = v.repeat_interleave(group, dim=1)
    real = k_len - extra_keys
    logits = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d))  # (N, H, L, S)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    b, h, q_idx, kv_idx = index_grids(n, heads, q_len, real, query_offset=query_offset)
    if score_mod is not None:
        modded = torch.broadcast_to(
            score_mod(logits[..., :real], b, h, q_idx, kv_idx), (n, heads, q_len, real)
        )
        logits = torch.cat([modded, logits[..., real:]], dim=-1)
    if mask is not None:
        logits = logits + mask
    hidden = torch.zeros(n, heads, q_len, real, dtype=torch.bool)
    if mask_mod is not None:
        hidden = hidden | ~torch.broadcast_to(mask_mod(b, h, q_idx, kv_idx), hidden.shape)
    if is_causal:
        hidden = hidden | (kv_idx > q_idx)
    hidden = torch.cat([hidden, torch.zeros(n, heads, q_len, extra_keys, dtype=torch.bool)], -1)
    logits = logits.masked_fill(hidden, float("-inf"))
    empty = (logits == float("-inf")).all(dim=-1, keepdim=True)  # (N, H, L, 1)
    weights = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return weights @ v, weights


# --- reference mods, flex polarity (True = attend), written from the contract ---------------


def ref_causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def ref_sliding_window(window: int, *, causal: bool = True):
    def mod(b, h, q_idx, kv_idx):
        if causal:
            return (q_idx - window < kv_idx) & (kv_idx <= q_idx)
        return (q_idx - kv_idx).abs() < window

    return mod


def ref_document(ids: Tensor):
    ids2 = ids.reshape(-1, ids.shape[-1])

    def mod(b, h, q_idx, kv_idx):
        row = b if ids2.shape[0] > 1 else torch.zeros_like(b)
        return ids2[row, q_idx] == ids2[row, kv_idx]

    return mod


def ref_prefix_lm(prefix):
    def mod(b, h, q_idx, kv_idx):
        p = prefix[b] if isinstance(prefix, Tensor) else prefix
        return (kv_idx <= q_idx) | (kv_idx < p)

    return mod


def ref_and(*mods):
    def mod(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for other in mods[1:]:
            out = out & other(b, h, q_idx, kv_idx)
        return out

    return mod


def ref_or(*mods):
    def mod(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for other in mods[1:]:
            out = out | other(b, h, q_idx, kv_idx)
        return out

    return mod


def ref_alibi(slopes: Tensor):
    def mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return mod


def ref_tanh_softcap(cap: float):
    def mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return mod


def ref_relative_bias(weight: Tensor, *, bidirectional: bool, max_distance: int):
    """T5's bias ``score + weight[bucket(kv_idx - q_idx), h]``, weight ``(num_buckets, H)``."""
    num_buckets = weight.shape[0]

    def mod(score, b, h, q_idx, kv_idx):
        bucket = t5_bucket(
            kv_idx - q_idx,
            bidirectional=bidirectional,
            num_buckets=num_buckets,
            max_distance=max_distance,
        )
        return score + weight[bucket, h]

    return mod


def ref_alibi_slopes(num_heads: int) -> list[float]:
    """Press et al.'s ``get_slopes`` (the paper's repository), in Python floats."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + ref_alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def t5_bucket(
    relative_position: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bucket of ``relative_position = key position - query position`` (int64 tensor).

    From the T5 paper (Raffel et al. 2020, section 2.1) and Mesh TensorFlow's
    ``_relative_position_bucket``: with ``bidirectional`` half the buckets are for keys after
    the query (offset by num_buckets / 2) and half for keys at or before it; without, keys
    after the query all fall into bucket 0. Within a half of ``nb`` buckets, distances below
    ``nb / 2`` get a bucket each, and larger distances ``n`` get
    ``nb/2 + floor(log(n / (nb/2)) / log(max_distance / (nb/2)) * (nb - nb/2))``, capped at
    ``nb - 1``. The log is taken in float32, as Mesh TensorFlow (and so the released T5
    checkpoints) computes it.
    """
    nb = num_buckets
    offset = torch.zeros_like(relative_position)
    if bidirectional:
        nb = nb // 2
        offset = torch.where(relative_position > 0, nb, 0)
        distance = relative_position.abs()
    else:
        distance = torch.where(relative_position < 0, -relative_position, 0)
    exact = nb // 2
    safe = torch.where(distance < exact, exact, distance).to(torch.float32)
    log_ratio = torch.log(safe / exact) / math.log(max_distance / exact) * (nb - exact)
    large = torch.clamp(exact + log_ratio.to(torch.int64), max=nb - 1)
    return offset + torch.where(distance < exact, distance, large)
