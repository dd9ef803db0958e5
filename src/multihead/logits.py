"""Attention logits and value mixing, grouped-query aware, never repeating keys or values.

Shape legend: N batch, H query heads, Hkv key/value heads (H = G * Hkv), G group size,
L query length, S key length, D head dim. Query head h reads key/value head h // G, as in
Hugging Face's ``repeat_kv`` and SDPA's ``enable_gqa``.

With G > 1, q ``(N, H, L, D)`` is viewed as ``(N, Hkv, G * L, D)``: each key/value head then
serves its G query heads in one matmul, and K / V are read once instead of copied G times.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _grouped(x: Tensor, kv_heads: int) -> Tensor:
    """``(N, H, R, C)`` -> ``(N, Hkv, G * R, C)`` (a copy only when x's layout requires one)."""
    n, h, rows, cols = x.shape
    return x.reshape(n, kv_heads, (h // kv_heads) * rows, cols)


def attention_logits(
    q: Tensor, k: Tensor, *, softcap: float | None = None, out: Tensor | None = None
) -> Tensor:
    """``q k^T / sqrt(D)`` ``(N, H, L, S)`` for q ``(N, H, L, D)`` and k ``(N, Hkv, S, D)``,
    then ``softcap * tanh(logits / softcap)`` when ``softcap`` is set (Gemma-2).

    ``out``: a contiguous ``(N, H, L, S)`` buffer to write into (inference scratch).
    """
    n, h, q_len, d = q.shape
    kv_heads, key_len = k.shape[1], k.shape[2]
    q = q * (1.0 / math.sqrt(d))
    if kv_heads == h:
        logits = torch.matmul(q, k.transpose(-2, -1), out=out)  # (N, H, L, S)
    else:
        grouped_out = None if out is None else out.view(n, kv_heads, -1, key_len)
        logits = torch.matmul(_grouped(q, kv_heads), k.transpose(-2, -1), out=grouped_out)
        logits = logits.view(n, h, q_len, key_len)  # (N, H, L, S)
    return logits if softcap is None else soft_capped(logits, softcap)


def soft_capped(logits: Tensor, softcap: float) -> Tensor:
    """``softcap * tanh(logits / softcap)`` (Gemma 2), for any finite ``softcap`` > 0.

    A cap outside the logits' dtype's normal range would become inf or 0 there, and the
    formula NaN; such a cap is applied in float64 instead: the result, at most ``|logits|`` in
    size, fits the dtype.
    """
    info = torch.finfo(logits.dtype)
    if info.tiny <= softcap <= info.max:
        return torch.tanh(logits / softcap) * softcap
    return (torch.tanh(logits.double() / softcap) * softcap).to(logits.dtype)


def weighted_values(probs: Tensor, v: Tensor) -> Tensor:
    """``probs v``: probs ``(N, H, L, S)``, v ``(N, Hkv, S, D)`` -> ``(N, H, L, D)``."""
    n, h, q_len, _ = probs.shape
    kv_heads = v.shape[1]
    if kv_heads == h:
        return torch.matmul(probs, v)
    return torch.matmul(_grouped(probs, kv_heads), v).view(n, h, q_len, v.shape[-1])


def summed_over_groups(grad_rows: Tensor, x: Tensor, kv_heads: int) -> Tensor:
    """``grad_rows^T x`` summed over each group: grad_rows ``(N, H, L, S)`` and x
    ``(N, H, L, D)`` -> ``(N, Hkv, S, D)`` (the gradient of keys / values shared by G heads)."""
    return torch.matmul(_grouped(grad_rows, kv_heads).transpose(-2, -1), _grouped(x, kv_heads))
