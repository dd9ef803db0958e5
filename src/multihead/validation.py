"""Checks at the public boundary. Each error names the argument, what was expected and what came.

Shape legend: N batch, L query length, S key length, E embed dim, H heads.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .kv_cache import KVCache
from .transforms import functional_autodiff


def invalid(name: str, expected: str, received: object) -> str:
    """The one message format: argument, expectation, what was received."""
    return f"Invalid argument `{name}`: expected {expected}. Received: {received}."


def autocast_enabled(device: torch.device) -> bool:
    """Whether torch.autocast is on for ``device``'s type (False for types autocast does not
    know, such as ``meta``, where torch's query raises)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


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
                f"a multiple of num_heads={num_heads} (or pass head_dim= to size the heads "
                "apart from embed_dim)",
                f"embed_dim={embed_dim}",
            )
        )


def check_dropout(value: object) -> float:
    """Returns ``value`` as a float when it is a real number in [0, 1] (``F.dropout``'s range:
    1.0 drops every weight)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(invalid("dropout", "a float in [0, 1]", f"dropout={value!r}"))
    if not 0.0 <= value <= 1.0:
        raise ValueError(invalid("dropout", "a float in [0, 1]", f"dropout={value!r}"))
    return float(value)


def describe(x: object) -> str:
    if isinstance(x, Tensor) and x.is_nested:
        return f"a nested tensor of {x.size(0)} sequences and dtype {x.dtype}"
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"an object of type {type(x).__name__}"


def _require_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(invalid(name, "a torch.Tensor", describe(x)))
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
    autocast: bool,
) -> bool:
    """Checks query, key and value; returns whether the inputs are batched. ``autocast``:
    whether torch.autocast is on for the query's device (then dtypes may differ).

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


def check_parameter_dtypes(layer: torch.nn.Module, dtype: torch.dtype, autocast: bool) -> None:
    """Every weight forward uses must have the layer's dtype (``out_proj.weight``'s), as the
    inputs must; under autocast torch's ops cast for themselves. torch's layer fails deep in a
    matmul there ("self and mat2 must have the same dtype"); this names the parameter. Biases
    (``in_proj_bias``, ``out_proj.bias``, ``bias_k``, ``bias_v``) of another floating dtype
    are cast by the layer, as torch's layer adds them. Reads the registered parameters
    directly: this runs on every call, decoding steps included."""
    if autocast:
        return
    owners = [("", layer), ("out_proj.", layer.out_proj)]
    if layer.qk_norm:
        owners += [("q_norm.", layer.q_norm), ("k_norm.", layer.k_norm)]
    if getattr(layer, "output_gate", False):
        owners.append(("gate_proj.", layer.gate_proj))
    for prefix, module in owners:
        for name, param in module._parameters.items():
            if param is None:
                continue
            if "bias" in name:
                if not param.is_floating_point():
                    raise TypeError(
                        invalid(prefix + name, "a floating-point bias", f"dtype {param.dtype}")
                    )
            elif param.dtype != dtype:
                raise TypeError(
                    invalid(
                        prefix + name,
                        f"dtype {dtype}, as out_proj.weight and the inputs (convert the whole "
                        "layer with .to(dtype))",
                        f"dtype {param.dtype}",
                    )
                )


def _check_per_token_shape(
    name: str, x: Tensor, is_batched: bool, batch_size: int, length: int, letter: str
) -> None:
    """One value per token: ``(N, length)``, or ``(length,)`` for unbatched input."""
    expected = (batch_size, length) if is_batched else (length,)
    if tuple(x.shape) != expected:
        legend = f"(N, {letter})" if is_batched else f"({letter},) for unbatched input"
        raise ValueError(invalid(name, f"shape {expected} {legend}", f"shape {tuple(x.shape)}"))


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
                invalid("key_padding_mask", "a torch.Tensor or None", describe(key_padding_mask))
            )
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_per_token_shape(
            "key_padding_mask", key_padding_mask, is_batched, batch_size, key_len, "S"
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(invalid("attn_mask", "a torch.Tensor or None", describe(attn_mask)))
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


def check_kv_heads(num_kv_heads: object, num_heads: int) -> int:
    """Returns the number of key/value heads: ``num_heads`` when None, else a positive
    divisor of ``num_heads``."""
    if num_kv_heads is None:
        return num_heads
    num_kv_heads = check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            invalid(
                "num_kv_heads",
                f"a divisor of num_heads={num_heads}",
                f"num_kv_heads={num_kv_heads}",
            )
        )
    return num_kv_heads


def check_rope(rope: bool, rope_base: object, head_dim: int) -> float:
    """Returns ``rope_base`` as a float; rotary embeddings need an even head_dim.

    The base must be finite and at least 1, so that every frequency base**(-2i/D) lies in
    (0, 1]: a smaller base makes frequencies that overflow float32 (1e-300 gives inf angles,
    hence NaN), and no model uses one.
    """
    expected = "a finite number >= 1"
    if isinstance(rope_base, bool) or not isinstance(rope_base, numbers.Real):
        raise TypeError(invalid("rope_base", expected, f"rope_base={rope_base!r}"))
    if not (rope_base >= 1 and math.isfinite(rope_base)):
        raise ValueError(invalid("rope_base", expected, f"rope_base={rope_base!r}"))
    if rope and head_dim % 2:
        raise ValueError(
            invalid(
                "head_dim",
                "an even head_dim (head_dim, or embed_dim / num_heads) for rotary embeddings "
                "(rope=True rotates pairs of dims)",
                f"head_dim={head_dim}",
            )
        )
    return float(rope_base)


def check_softcap(softcap: object) -> float | None:
    """Returns ``softcap`` as a float in (0, 1e300], or None (no cap; an infinite cap is None).

    Above 1e300 the backward's ``gradient * softcap`` overflows float64 itself, and such a cap
    is the identity on any logit below 1e290 anyway.
    """
    if softcap is None:
        return None
    expected = "a positive number at most 1e300, or None for no cap"
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(invalid("softcap", expected, f"softcap={softcap!r}"))
    if not 0 < softcap <= 1e300:
        raise ValueError(invalid("softcap", expected, f"softcap={softcap!r}"))
    return float(softcap)


def check_attention_arguments(
    q: object,
    k: object,
    v: object,
    mask: object,
    *,
    dropout_p: object = 0.0,
    softcap: object = None,
    mask_mod: object = None,
    score_mod: object = None,
    sinks: object = None,
) -> None:
    """Checks :func:`multihead.attention`'s arguments: q ``(N, H, L, D)``, k ``(N, Hkv, S, D)``,
    v ``(N, Hkv, S, Dv)`` (None when only weights are asked for), Hkv dividing H, one floating
    dtype and device, and an additive float mask broadcastable to ``(N, H, L, S)``."""
    named = [("q", q), ("k", k)] + ([] if v is None else [("v", v)])
    for name, x in named:
        _require_tensor(name, x)
        if not x.is_floating_point():
            raise TypeError(invalid(name, "a floating-point tensor", f"dtype {x.dtype}"))
        if x.dim() != 4:
            raise ValueError(
                invalid(name, "a 4-D tensor (N, heads, length, head_dim)", describe(x))
            )
        if x.dtype != q.dtype or x.device != q.device:
            raise TypeError(
                invalid(name, f"dtype {q.dtype} on {q.device} (as q)", f"{x.dtype} on {x.device}")
            )
    n, heads, q_len, head_dim = q.shape
    kv_heads, key_len = k.shape[1], k.shape[2]
    if k.shape[0] != n or k.shape[3] != head_dim:
        raise ValueError(
            invalid("k", f"shape ({n}, Hkv, S, {head_dim}) (N and D as q)", tuple(k.shape))
        )
    if (kv_heads == 0 and heads != 0) or (kv_heads and heads % kv_heads):
        raise ValueError(
            invalid("k", f"a number of heads (dim 1) dividing q's {heads}", f"{kv_heads} heads")
        )
    if v is not None and v.shape[:3] != k.shape[:3]:
        raise ValueError(
            invalid("v", f"shape ({n}, {kv_heads}, {key_len}, Dv) (N, Hkv, S as k)", tuple(v.shape))
        )
    if mask is not None:
        _require_tensor("mask", mask)
        if mask.dtype == torch.bool:
            raise TypeError(
                invalid(
                    "mask",
                    "an additive float mask (0 = attend, -inf = masked); a bool mask is "
                    "ambiguous (True means attend in SDPA, masked in MultiheadAttention): "
                    "convert it with multihead.masks.to_additive(mask, dtype) (True = masked)",
                    "a bool tensor",
                )
            )
        if mask.dtype != q.dtype or mask.device != q.device:
            raise TypeError(
                invalid(
                    "mask",
                    f"a floating-point additive mask of dtype {q.dtype} on {q.device} (as q)",
                    f"{mask.dtype} on {mask.device}",
                )
            )
        scores = (n, heads, q_len, key_len)
        try:
            fits = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, scores) == scores
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                invalid("mask", f"a shape broadcastable to {scores} (N, H, L, S)", mask.shape)
            )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(invalid("dropout_p", "a float in [0, 1]", f"dropout_p={dropout_p!r}"))
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(invalid("dropout_p", "a float in [0, 1]", f"dropout_p={dropout_p!r}"))
    check_softcap(softcap)
    check_mods(mask_mod, score_mod)
    if sinks is not None:
        _require_tensor("sinks", sinks)
        if not sinks.is_floating_point() or sinks.device != q.device:
            raise TypeError(
                invalid(
                    "sinks",
                    f"a floating-point tensor on {q.device} (as q)",
                    f"dtype {sinks.dtype} on {sinks.device}",
                )
            )
        if tuple(sinks.shape) != (heads,):
            raise ValueError(
                invalid("sinks", f"shape ({heads},) (one logit per query head)", sinks.shape)
            )
        check_finite_sinks(sinks.to(q.dtype))  # as they are used: a cast may overflow


def check_finite_sinks(sinks: Tensor) -> None:
    """Sink logits must be finite: +inf or NaN would make every output NaN, -inf a row whose
    keys are all masked NaN. Data-dependent, so not asked under torch.func transforms or
    torch.compile, which cannot branch on it."""
    if functional_autodiff(sinks) or torch.compiler.is_compiling() or sinks.is_meta:
        return
    if not bool(torch.isfinite(sinks).all()):
        raise ValueError(invalid("sinks", "finite sink logits", "a non-finite value"))


def check_mods(mask_mod: object, score_mod: object) -> None:
    """``mask_mod`` and ``score_mod`` are callables (flex's signatures) or None. What they
    return is checked where they are called, on the first tile."""
    if type(mask_mod).__name__ == "BlockMask" and callable(getattr(mask_mod, "mask_mod", None)):
        raise TypeError(
            invalid(
                "mask_mod",
                "a mask_mod callable; for a flex BlockMask pass its mask_mod (block_mask."
                "mask_mod): tiles are found per call here",
                "a torch.nn.attention.flex_attention.BlockMask",
            )
        )
    for name, mod, signature in (
        ("mask_mod", mask_mod, "mask_mod(b, h, q_idx, kv_idx) -> bool tensor"),
        ("score_mod", score_mod, "score_mod(score, b, h, q_idx, kv_idx) -> tensor"),
    ):
        if mod is not None and not callable(mod):
            raise TypeError(invalid(name, f"a callable {signature}, or None", describe(mod)))


def check_extras(
    layer: torch.nn.Module,
    cache: object,
    segment_ids: object,
    *,
    is_batched: bool,
    batch_size: int,
    query_len: int,
    key_len: int,
    has_masks: bool,
    inputs: tuple[Tensor, Tensor, Tensor],
    autocast: bool,
) -> None:
    """Checks forward's ``cache`` and ``segment_ids`` against the layer and the inputs, before
    anything is written: a refused call leaves the cache as it was."""
    if cache is not None:
        if not isinstance(cache, KVCache):
            raise TypeError(
                invalid("cache", "a KVCache from layer.new_cache(...) or None", describe(cache))
            )
        if not cache.owned_by(layer):
            raise ValueError(
                invalid(
                    "cache",
                    "a cache made by this layer (layer.new_cache): each layer keeps its own "
                    "keys and values",
                    "a cache that belongs to another layer",
                )
            )
        query = inputs[0]
        if cache.k.device != query.device:
            raise ValueError(
                invalid(
                    "cache", f"a cache on {query.device} (as query)", f"one on {cache.k.device}"
                )
            )
        layer_dtype = layer.out_proj.weight.dtype
        if cache.k.dtype != layer_dtype and not autocast:
            raise ValueError(
                invalid(
                    "cache",
                    f"dtype {layer_dtype} (the layer's; only under autocast may the cache keep "
                    "another precision); make a new cache with layer.new_cache(...)",
                    f"a cache of dtype {cache.k.dtype}",
                )
            )
        if functional_autodiff(*inputs):
            raise ValueError(
                invalid(
                    "cache",
                    "no cache under torch.func transforms or forward-mode AD",
                    "a call traced by them",
                )
            )
        expected = (layer.num_kv_heads, layer.head_dim)
        if (cache.k.shape[1], cache.k.shape[3]) != expected:
            raise ValueError(
                invalid(
                    "cache",
                    f"num_kv_heads={expected[0]} and head_dim={expected[1]} (this layer's)",
                    f"a cache with {cache.k.shape[1]} heads of {cache.k.shape[3]} dims",
                )
            )
        if cache.batch_size != batch_size:
            raise ValueError(
                invalid("cache", f"batch size {batch_size} (as query)", cache.batch_size)
            )
        if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *layer.parameters())):
            raise ValueError(
                invalid(
                    "cache",
                    "a call under torch.no_grad() or torch.inference_mode() (a KV cache "
                    "holds no autograd history)",
                    "a call with gradients enabled",
                )
            )
        if query_len != key_len:
            raise ValueError(
                invalid(
                    "cache",
                    "key and value holding the same new tokens as query (S == L)",
                    f"L={query_len}, S={key_len}",
                )
            )
        if inputs[1] is not query or inputs[2] is not query:
            # The cache holds each token's own keys and values (self-attention decoding); keys
            # from another sequence would silently become causal cross-attention.
            raise ValueError(
                invalid(
                    "cache",
                    "key and value that are query itself, the same tensor object "
                    "(layer(x, x, x, cache=cache); a slice made three times, x[:, i:j], is "
                    "three objects: name it once): the cache holds the new tokens' own keys "
                    "and values",
                    "a key or value tensor other than query",
                )
            )
        if has_masks or layer.bias_k is not None or layer.add_zero_attn:
            raise ValueError(
                invalid(
                    "cache",
                    "no key_padding_mask / attn_mask and no add_bias_kv / add_zero_attn "
                    "(not supported with a cache)",
                    "a call or layer that uses them",
                )
            )
        # Reading the fill level is data-dependent; under torch.compile the check is skipped.
        # A rolling cache never fills (it keeps the window's keys only).
        full = not cache.rolling and cache.length + key_len > cache.max_len
        if not torch.compiler.is_compiling() and full:
            raise ValueError(
                invalid(
                    "cache",
                    f"room for {key_len} more tokens: it holds {cache.length} of "
                    f"max_len={cache.max_len}",
                    f"{cache.length + key_len - cache.max_len} tokens too many; make the cache "
                    "larger or call cache.reset()",
                )
            )
    if segment_ids is not None:
        if not isinstance(segment_ids, Tensor):
            raise TypeError(
                invalid("segment_ids", "an integer torch.Tensor or None", describe(segment_ids))
            )
        if (
            segment_ids.is_floating_point()
            or segment_ids.is_complex()
            or (segment_ids.dtype == torch.bool)
        ):
            raise TypeError(invalid("segment_ids", "an integer dtype", segment_ids.dtype))
        _check_per_token_shape("segment_ids", segment_ids, is_batched, batch_size, query_len, "L")
        if query_len != key_len or cache is not None:
            raise ValueError(
                invalid(
                    "segment_ids",
                    "self-attention over one packed row (S == L) without a cache",
                    f"L={query_len}, S={key_len}, cache={'set' if cache is not None else None}",
                )
            )
