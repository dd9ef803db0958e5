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


def scale(head_dim: int) -> float:
    """The softmax scale 1/sqrt(D); with D = 0 every logit is an empty sum, 0, and any scale
    gives it, so 1.0 there instead of a division by zero."""
    return 1.0 / math.sqrt(head_dim) if head_dim else 1.0


def attention_logits(
    q: Tensor, k: Tensor, *, softcap: float | None = None, out: Tensor | None = None
) -> Tensor:
    """``q k^T / sqrt(D)`` ``(N, H, L, S)`` for q ``(N, H, L, D)`` and k ``(N, Hkv, S, D)``,
    then ``softcap * tanh(logits / softcap)`` when ``softcap`` is set (Gemma-2).

    ``out``: a contiguous ``(N, H, L, S)`` buffer to write into (inference scratch).
    """
    n, h, q_len, d = q.shape
    kv_heads, key_len = k.shape[1], k.shape[2]
    q = q * scale(d)
    if kv_heads == h:
        logits = torch.matmul(q, k.transpose(-2, -1), out=out)  # (N, H, L, S)
    else:
        grouped_out = None if out is None else out.view(n, kv_heads, -1, key_len)
        logits = torch.matmul(_grouped(q, kv_heads), k.transpose(-2, -1), out=grouped_out)
        logits = logits.view(n, h, q_len, key_len)  # (N, H, L, S)
    return logits if softcap is None else soft_capped(logits, softcap)


# A cap at most this fraction of a dtype's largest value leaves room for the backward's
# ``gradient * softcap`` (autograd's product for ``tanh(x / c) * c``): gradients up to 2**16.
_HEADROOM = 2.0**-16


def soft_capped(logits: Tensor, softcap: float) -> Tensor:
    """``softcap * tanh(logits / softcap)`` (Gemma 2), for any finite ``softcap`` in
    ``(0, 1e300]`` (the range :func:`multihead.validation.check_softcap` allows).

    In the logits' own dtype when the cap lies well inside its range; otherwise in float32 or
    float64, the first whose range holds it: a cap beyond a dtype's range becomes inf or 0
    there and the formula NaN, and a cap near its top overflows the backward's
    ``gradient * softcap``. The result, at most ``|logits|`` in size, fits the logits' dtype.
    """
    bits = torch.finfo(logits.dtype).bits
    for dtype in (logits.dtype, torch.float32, torch.float64):
        info = torch.finfo(dtype)
        # From the smallest subnormal up: a tiny cap only needs to stay non-zero.
        if info.bits >= bits and info.tiny * info.eps <= softcap <= info.max * _HEADROOM:
            work = logits.to(dtype)
            return (torch.tanh(work / softcap) * softcap).to(logits.dtype)
    raise ValueError(f"softcap={softcap!r} is outside (0, 1e300]")  # refused at the boundary


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
