"""Rotary position embeddings, "rotate half" convention (Llama / GPT-NeoX in HF transformers).

Shape legend: N batch, H heads, L length, D head dim (even).

For position p and frequency f_i = base^(-2i / D), i < D / 2, the pair (x_i, x_{i + D/2}) is
rotated by the angle p * f_i:  x' = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_cos_sin(
    positions: Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin ``(L, D)`` for integer ``positions`` ``(L,)``.

    Computed in float32 (float64 for a float64 model) and cast last, as Hugging Face does: the
    model may run in bf16, whose 8-bit mantissa cannot hold large angles.
    """
    work = torch.promote_types(torch.float32, dtype)
    # The frequencies as HF computes them, in the work dtype; a base beyond its range (which
    # would become inf there, and every frequency but the first 0) goes through float64.
    freq_dtype = work if base <= torch.finfo(work).max else torch.float64
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=freq_dtype)
    inv_freq = (1.0 / (base ** (exponents / head_dim))).to(work)  # (D / 2,)
    angles = positions.to(work)[:, None] * inv_freq[None, :]  # (L, D / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates ``x`` ``(..., L, D)`` by ``cos``/``sin`` ``(L, D)``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # rotate_half(x)
    return x * cos + rotated * sin
