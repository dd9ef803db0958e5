"""Checks at the public boundary. Each error names the argument, what was expected and what came.

Shape legend: N batch, L query length, S key length, E embed dim, H heads.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def invalid(name: str, expected: str, received: object) -> str:
    """The one message format: argument, expectation, what was received."""
    return f"Invalid argument `{name}`: expected {expected}. Received: {received}."


def check_positive_int(name: str, value: object) -> int:
    """Returns ``value`` when it is an int > 0 (bool is not accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(invalid(name, "a positive integer", f"{name}={value!r}"))
    if value <= 0:
        raise ValueError(invalid(name, "a positive integer", f"{name}={value!r}"))
    return int(value)


def check_optional_dim(name: str, value: object) -> int | None:
    """Returns ``value`` when it is None or a positive int."""
    return None if value is None else check_positive_int(name, value)


def check_heads(embed_dim: int, num_heads: int) -> None:
    """``embed_dim`` must split evenly into ``num_heads`` heads."""
    if embed_dim % num_heads:
        raise ValueError(
            invalid(
                "embed_dim",
                f"a multiple of num_heads={num_heads}",
                f"embed_dim={embed_dim}",
            )
        )


def check_dropout(value: object) -> float:
    """Returns ``value`` as a float when it is a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(invalid("dropout", "a float in [0, 1)", f"dropout={value!r}"))
    if not 0.0 <= value < 1.0:
        raise ValueError(invalid("dropout", "a float in [0, 1)", f"dropout={value!r}"))
    return float(value)


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"an object of type {type(x).__name__}"


def _require_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(invalid(name, "a torch.Tensor", _describe(x)))
    return x


def check_inputs(
    query: object,
    key: object,
    value: object,
    *,
    embed_dim: int,
    kdim: int,
    vdim: int,
    dtype: torch.dtype,
    batch_first: bool,
) -> bool:
    """Checks query, key and value; returns whether the inputs are batched.

    Batched: query ``(L, N, E)``, key ``(S, N, Ek)``, value ``(S, N, Ev)``, or ``(N, L, E)`` ...
    with ``batch_first``. Unbatched: ``(L, E)``, ``(S, Ek)``, ``(S, Ev)``.
    """
    query, key, value = (
        _require_tensor("query", query),
        _require_tensor("key", key),
        _require_tensor("value", value),
    )
    if query.dim() not in (2, 3):
        raise ValueError(
            invalid(
                "query",
                "a 3-D batched tensor or a 2-D unbatched tensor",
                f"a {query.dim()}-D tensor of shape {tuple(query.shape)}",
            )
        )
    is_batched = query.dim() == 3
    rank = "3-D (batched, as query)" if is_batched else "2-D (unbatched, as query)"
    for name, x in (("key", key), ("value", value)):
        if x.dim() != query.dim():
            raise ValueError(invalid(name, f"a {rank} tensor", f"a {x.dim()}-D tensor"))
    for name, x, size in (("query", query, embed_dim), ("key", key, kdim), ("value", value, vdim)):
        if x.shape[-1] != size:
            dim_name = {"query": "embed_dim", "key": "kdim", "value": "vdim"}[name]
            raise ValueError(
                invalid(
                    name,
                    f"a last dimension of {dim_name}={size}",
                    f"shape {tuple(x.shape)}",
                )
            )
    # Under autocast, torch's ops cast for themselves, so a mixed dtype is the user's intent.
    autocast = torch.is_autocast_enabled(query.device.type)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.dtype != dtype and not autocast:
            raise TypeError(
                invalid(name, f"dtype {dtype}, the layer's parameter dtype", f"dtype {x.dtype}")
            )
    seq_dim = 1 if (batch_first and is_batched) else 0
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            invalid(
                "value",
                f"the same batch and sequence sizes as key, {tuple(key.shape[:-1])}",
                f"shape {tuple(value.shape)}",
            )
        )
    if is_batched:
        batch_dim = 1 - seq_dim
        if key.shape[batch_dim] != query.shape[batch_dim]:
            raise ValueError(
                invalid(
                    "key",
                    f"batch size {query.shape[batch_dim]} (as query) in dim {batch_dim}",
                    f"batch size {key.shape[batch_dim]} (shape {tuple(key.shape)})",
                )
            )
    return is_batched


def _check_mask_dtype(name: str, mask: Tensor) -> None:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            invalid(name, "a bool (True = masked) or floating-point (additive) mask", mask.dtype)
        )


def check_masks(
    key_padding_mask: object,
    attn_mask: object,
    *,
    is_batched: bool,
    batch_size: int,
    num_heads: int,
    query_len: int,
    key_len: int,
) -> None:
    """Checks ``key_padding_mask`` ``(N, S)`` / ``(S,)`` and ``attn_mask`` ``(L, S)`` /
    ``(N * H, L, S)`` (``(H, L, S)`` unbatched)."""
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(
                invalid("key_padding_mask", "a torch.Tensor or None", _describe(key_padding_mask))
            )
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        expected = (batch_size, key_len) if is_batched else (key_len,)
        if tuple(key_padding_mask.shape) != expected:
            legend = "(N, S)" if is_batched else "(S,) for unbatched input"
            raise ValueError(
                invalid(
                    "key_padding_mask",
                    f"shape {expected} {legend}",
                    f"shape {tuple(key_padding_mask.shape)}",
                )
            )
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(invalid("attn_mask", "a torch.Tensor or None", _describe(attn_mask)))
        _check_mask_dtype("attn_mask", attn_mask)
        shape_2d = (query_len, key_len)
        shape_3d = (batch_size * num_heads, query_len, key_len)
        if tuple(attn_mask.shape) not in (shape_2d, shape_3d):
            legend = "(N * num_heads, L, S)" if is_batched else "(num_heads, L, S)"
            raise ValueError(
                invalid(
                    "attn_mask",
                    f"shape {shape_2d} (L, S) or {shape_3d} {legend}",
                    f"shape {tuple(attn_mask.shape)}",
                )
            )
