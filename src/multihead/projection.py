"""Input and head projections: embeddings -> per-head q, k, v, and back.

Shape legend: N batch, L query length, S key length, E embed dim, H heads, D head dim (E / H),
Ek / Ev the key / value embedding dims (``kdim`` / ``vdim``).

Layouts: torch's inputs are ``(L, N, E)`` by default and ``(N, L, E)`` with ``batch_first``.
We project in the caller's layout (a GEMM does not care) and go to ``(N, H, L, D)`` once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _sizes(weight: Tensor, q_rows: int | None) -> list[int]:
    """Rows of a packed ``(Eq + 2 Ekv, E)`` weight: q ``Eq``, k ``Ekv``, v ``Ekv``
    (``Eq = H * D``, ``Ekv = Hkv * D``; both E for torch's layer). ``q_rows`` None: ``Eq`` is
    E, the weight's width."""
    q_rows = weight.shape[1] if q_rows is None else q_rows
    kv_rows = (weight.shape[0] - q_rows) // 2
    return [q_rows, kv_rows, kv_rows]


def packed_in_projection(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    q_rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Projects q, k, v with one packed weight ``(Eq + 2 Ekv, E)`` whose rows are q, then k,
    then v (``(3E, E)`` as torch's, unless key/value heads are shared or ``head_dim`` is set:
    ``q_rows`` = Eq = H * D, default E).

    Self-attention (``query is key is value``) runs one GEMM; encoder-decoder attention
    (``key is value``) runs two. Inputs ``(..., E)``; outputs q ``(..., E)``, k and v
    ``(..., Ekv)``.
    """
    sizes = _sizes(weight, q_rows)
    if query is key and key is value:
        return F.linear(query, weight, bias).split(sizes, dim=-1)  # (..., E), 2 x (..., Ekv)
    w_q, w_kv = weight.split([sizes[0], 2 * sizes[1]])
    b_q, b_kv = (None, None) if bias is None else bias.split([sizes[0], 2 * sizes[1]])
    q = F.linear(query, w_q, b_q)
    if key is value:
        k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)  # 2 x (..., Ekv)
        return q, k, v
    w_k, w_v = w_kv.chunk(2)
    b_k, b_v = (None, None) if b_kv is None else b_kv.chunk(2)
    return q, F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def separate_in_projection(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Projects q ``(..., E)``, k ``(..., Ek)`` and v ``(..., Ev)`` to ``(..., E)``,
    ``(..., Ekv)`` and ``(..., Ekv)``.

    ``bias`` is the packed ``(E + 2 Ekv,)`` in-projection bias (q, k, v), or None.
    """
    sizes = [q_weight.shape[0], k_weight.shape[0], v_weight.shape[0]]
    b_q, b_k, b_v = (None, None, None) if bias is None else bias.split(sizes)
    return (
        F.linear(query, q_weight, b_q),
        F.linear(key, k_weight, b_k),
        F.linear(value, v_weight, b_v),
    )


def split_heads(x: Tensor, num_heads: int, batch_first: bool) -> Tensor:
    """``(N, L, E)`` (batch_first) or ``(L, N, E)`` -> ``(N, H, L, D)``, as a view."""
    # D is given, not inferred (-1): a view cannot infer it when N or L is 0.
    x = x.view(x.shape[0], x.shape[1], num_heads, x.shape[2] // num_heads)  # (N, L, H, D) ...
    return x.transpose(1, 2) if batch_first else x.permute(1, 2, 0, 3)  # (N, H, L, D)


def packed_heads(proj: Tensor, num_heads: int, batch_first: bool) -> Tensor:
    """A packed projection ``(N, L, 3E)`` (batch_first) or ``(L, N, 3E)``, whose features are
    q, then k, then v, -> its ``(3, N, H, L, D)`` view (q, k, v stacked)."""
    head_dim = proj.shape[2] // (3 * num_heads)
    proj = proj.view(proj.shape[0], proj.shape[1], 3, num_heads, head_dim)  # (N, L, 3, H, D) ...
    return proj.permute((2, 0, 3, 1, 4) if batch_first else (2, 1, 3, 0, 4))


def split_packed_heads(
    proj: Tensor, num_heads: int, batch_first: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`packed_heads` as q, k, v ``(N, H, L, D)`` each, views."""
    q, k, v = packed_heads(proj, num_heads, batch_first).unbind(0)
    return q, k, v


def merge_heads(x: Tensor, batch_first: bool) -> Tensor:
    """``(N, H, L, D)`` -> ``(N, L, E)`` (batch_first) or ``(L, N, E)``."""
    x = x.transpose(1, 2) if batch_first else x.permute(2, 0, 1, 3)  # (N, L, H, D) or (L, N, H, D)
    return x.flatten(-2)  # (N, L, E) or (L, N, E)


def append_extra_keys(
    k: Tensor, v: Tensor, bias_k: Tensor | None, bias_v: Tensor | None, add_zero_attn: bool
) -> tuple[Tensor, Tensor]:
    """Appends the learnt bias key/value slot, then the all-zero slot, as torch does.

    Args:
        k, v: ``(N, H, S, D)``.
        bias_k, bias_v: ``(1, 1, E)`` or None (both or neither).

    Returns:
        k, v: ``(N, H, S + X, D)`` where X counts the slots added.
    """
    batch, heads, _, head_dim = k.shape
    if bias_k is not None and bias_v is not None:
        # In k's dtype: under autocast k is low precision while the parameters are not.
        bias_k, bias_v = bias_k.to(k.dtype), bias_v.to(v.dtype)
        k = torch.cat([k, bias_k.view(1, heads, 1, head_dim).expand(batch, -1, -1, -1)], dim=2)
        v = torch.cat([v, bias_v.view(1, heads, 1, head_dim).expand(batch, -1, -1, -1)], dim=2)
    if add_zero_attn:
        k, v = append_zero_slot(k), append_zero_slot(v)  # (N, H, S + X, D)
    return k, v


def append_zero_slot(x: Tensor) -> Tensor:
    """Keys or values ``(N, Hkv, S, D)`` -> ``(N, Hkv, S + 1, D)``, the new slot all zeros
    (``add_zero_attn``'s slot, and the attention sink's: see
    :func:`multihead.masks.with_sink_logits`)."""
    return torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])], dim=2)
