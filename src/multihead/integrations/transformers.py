"""A Hugging Face ``transformers`` attention backend on :func:`multihead.functional.attention`.

Shape legend: N batch, H query heads, Hkv key/value heads (Hkv divides H), L query length,
S key length, D head dim.

Usage (needs the ``hf`` extra, ``pip install 'multihead[hf]'``)::

    from multihead.integrations.transformers import register

    register()  # once per process; "multihead" is then a valid attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="multihead")

:func:`register` adds two functions to transformers' global registries, under one name:

- :func:`multihead_attention_forward` to ``transformers.AttentionInterface``: the attention
  itself, with the signature of transformers' ``sdpa_attention_forward`` and the models'
  ``eager_attention_forward``.
- :func:`multihead_mask` to ``transformers.masking_utils.AttentionMaskInterface``: transformers
  builds no mask at all for an attention name missing there (``_preprocess_mask_arguments``
  returns None, meant for paged / TGI back-ends), so this is required, not optional. It builds
  the mask as ``sdpa_mask`` does (None where SDPA would rely on ``is_causal``; the padding,
  sliding-window, chunked and packed-sequence patterns otherwise) and hands it over once per
  forward in the core's additive form: 0 = attend, -inf = masked.

What transformers passes to an attention function (transformers 5.x), and what is done with it:

- ``attention_mask``: whatever the mask function made, or a 4-D mask the caller built
  (``_preprocess_mask_arguments`` returns those untouched): None, a bool mask (True = attend,
  SDPA's polarity) or an additive float mask (eager's, masked = ``finfo(dtype).min``), of shape
  ``(N, 1, L, S)``. Bool masks become additive with -inf; float masks stay additive as they are
  (cast to the query's dtype).
- No mask: causal exactly when ``sdpa_attention_forward`` would be: ``L > 1`` and the module is
  causal (the ``is_causal`` keyword if given, else ``module.is_causal``, else True). The core's
  causal flag is top-left aligned as SDPA's, which is also right for the one case with S > L that
  transformers leaves maskless (prefill into an empty static cache).
- ``scaling``: the logit scale. The core always scales by 1/sqrt(D); for another ``scaling``
  (Gemma's ``query_pre_attn_scalar``, BERT-style models with a custom scale) the query is
  pre-multiplied by ``scaling * sqrt(D)`` (one extra rounding of q, nothing else).
- ``dropout``: applied only when ``module.training`` (models pass 0.0 in eval anyway).
- ``softcap`` (Gemma 2): on the scaled logits, before the mask, as the eager code.
- ``s_aux`` (gpt-oss and other sink models; ``module.sinks`` when ``s_aux`` is absent): one
  learned logit per head ``(H,)`` that joins the softmax normaliser and attends to no value.
- ``position_bias``: added to the mask, as ``sdpa_attention_forward`` does.
- ``output_attentions``: transformers records the attention module's second output with hooks;
  it tells the attention function only through ``kwargs["output_attentions"]`` (present when the
  caller passed it) and, failing that, ``module.config.output_attentions``. Per-head weights
  ``(N, H, L, S)`` are computed only then, from the same pass as the output (the returned
  weights are the ones that multiplied V, after dropout); otherwise the core's fused path runs
  and the weights are None.
- ``sliding_window``, ``position_ids``, ``cache_position`` and other keywords: ignored, as in
  ``sdpa_attention_forward`` (the window is already in the mask).

One deliberate difference from eager: a query row whose keys are all masked (a left-padding
position) gets a zero output here, where eager's ``finfo.min`` mask spreads it uniformly over
the masked keys. Those rows are padding; no real token reads them.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from .. import functional
from ..logits import scale as _default_scale
from ..masks import to_additive
from ..validation import check_dropout as _check_dropout
from ..validation import check_softcap as _check_softcap
from ..validation import describe as _describe
from ..validation import invalid as _invalid

__all__ = ["multihead_attention_forward", "multihead_mask", "register"]

_EXTRA_HINT = "pip install 'multihead[hf]'"

# A few float64 ulps: HF's ``head_dim**-0.5`` and ``1 / math.sqrt(head_dim)`` differ by one for
# many head dims (8, 32, 48, ...), which must not cost a rescale of the query.
_SCALE_RTOL = 4 * 2.0**-52

# Names transformers resolves itself: registering ours under them would replace transformers'
# own kernels for every model in the process ("eager" would even replace the reference path).
_RESERVED = frozenset(
    {
        "eager",
        "sdpa",
        "paged|eager",
        "flex_attention",
        "flash_attention_2",
        "flash_attention_3",
        "flash_attention_4",
    }
)


def register(name: str = "multihead") -> None:
    """Makes ``attn_implementation=name`` run :func:`multihead_attention_forward`.

    Adds :func:`multihead_attention_forward` to ``transformers.AttentionInterface`` and
    :func:`multihead_mask` to ``transformers.masking_utils.AttentionMaskInterface``, both
    globally (every model, loaded before or after). Calling it again with the same name does
    nothing.

    Raises:
        ImportError: transformers is not installed (the ``hf`` extra).
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is empty, is one of transformers' own implementations ("eager",
            "sdpa", "flex_attention", "flash_attention_*", "paged|eager"), or is already
            registered to another function.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as error:
        raise ImportError(
            "multihead.integrations.transformers needs the `transformers` package, "
            f"the `hf` extra: {_EXTRA_HINT}"
        ) from error
    if not isinstance(name, str):
        raise TypeError(f"Invalid argument `name`: expected a string. Received: {name!r}.")
    if not name or name in _RESERVED:
        raise ValueError(
            "Invalid argument `name`: expected a new, non-empty attention name, not one of "
            f"transformers' own ({', '.join(sorted(_RESERVED))}). Received: {name!r}."
        )
    registries = (
        (AttentionInterface, multihead_attention_forward),
        (AttentionMaskInterface, multihead_mask),
    )
    for registry, function in registries:
        current = registry._global_mapping.get(name)
        if current is not None and current is not function:
            raise ValueError(
                f"Invalid argument `name`: {name!r} is already registered in "
                f"{registry.__name__} to {getattr(current, '__qualname__', current)!r}."
            )
    for registry, function in registries:
        registry.register(name, function)


def multihead_mask(*args: Any, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Tensor | None:
    """The mask function registered in ``AttentionMaskInterface``: transformers'
    ``masking_utils.sdpa_mask`` (same arguments: batch_size, q_length, kv_length, q_offset,
    kv_offset, mask_function, attention_mask, local_size, allow_is_causal_skip, ...), turned
    additive once per forward.

    Returns:
        None where ``sdpa_mask`` returns None (a plain causal or bidirectional pattern without
        padding: :func:`multihead_attention_forward` then uses the causal flag), else an
        additive ``(N, 1, L, S)`` mask of ``dtype`` (the model's compute dtype, which
        transformers passes): 0 = attend, -inf = masked.
    """
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    return None if mask is None else to_additive(~mask, dtype)


def multihead_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """Attention for transformers' ``AttentionInterface``, run by
    :func:`multihead.functional.attention`.

    The drop-in for transformers' ``sdpa_attention_forward`` and the models'
    ``eager_attention_forward`` (same arguments, same result, to rounding). See the module
    docstring for how each argument is read.

    Args:
        module: the calling attention module; read for ``training`` (dropout),
            ``is_causal``, ``sinks`` and ``config.output_attentions``.
        query: ``(N, H, L, D)``.
        key, value: ``(N, Hkv, S, D)``, Hkv dividing H (grouped-query attention, no repeat).
        attention_mask: None, a bool mask (True = attend) or an additive float mask,
            broadcastable to ``(N, H, L, S)`` (transformers gives ``(N, 1, L, S)``).
        scaling: the logit scale; None means 1/sqrt(D).
        dropout: dropout on the weights, in [0, 1]; applied only when ``module.training``.
        **kwargs: read: ``softcap`` (float > 0 or None), ``s_aux`` (sinks ``(H,)``),
            ``is_causal`` (bool or None), ``position_bias`` (additive, broadcastable to
            ``(N, H, L, S)``), ``output_attentions`` (bool or None); the rest is ignored.

    Returns:
        ``(attn_output, attn_weights)``: attn_output ``(N, L, H, D)`` contiguous;
        attn_weights the per-head weights ``(N, H, L, S)`` when output_attentions is asked for
        (see the module docstring), else None.

    Raises:
        TypeError: query/key/value not tensors or of different dtypes, a mask that is neither
            bool nor floating (or not a tensor: a flex ``BlockMask``), a non-numeric
            ``scaling``/``dropout``/``softcap``, sinks that are not a tensor.
        ValueError: ranks other than 4, mismatched sizes, Hkv not dividing H, a mask or
            position bias that does not broadcast to ``(N, H, L, S)``, ``scaling`` not finite
            and > 0, ``dropout`` outside [0, 1], ``softcap`` not > 0, sinks not of shape (H,).
    """
    _check_qkv(query, key, value)
    batch, heads, query_len, head_dim = query.shape
    key_len = key.shape[2]
    target = (batch, heads, query_len, key_len)
    scaling = _check_scaling(scaling, head_dim)
    dropout = _check_dropout(dropout)
    softcap = _check_softcap(kwargs.get("softcap"))

    # As sdpa_attention_forward: the keyword wins over the module, causal by default, and the
    # flag only ever stands for a mask transformers chose not to build.
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    is_causal = query_len > 1 and attention_mask is None and bool(causal)

    mask = _additive_mask("attention_mask", attention_mask, query, target)
    bias = _additive_mask("position_bias", kwargs.get("position_bias"), query, target)
    if bias is not None:
        mask = bias if mask is None else mask + bias

    sinks = _sinks(module, kwargs.get("s_aux"), query)

    # HF's head_dim**-0.5 and the core's 1 / sqrt(D) may differ in the last bit: no rescale
    # for that. Otherwise q * (scaling * sqrt(D)) / sqrt(D) = q * scaling.
    if not math.isclose(scaling, _default_scale(head_dim), rel_tol=_SCALE_RTOL, abs_tol=0.0):
        query = query * (scaling * math.sqrt(head_dim))
    out, weights = functional.attention(
        query,
        key,
        value,
        mask,
        is_causal=is_causal,
        dropout_p=dropout if getattr(module, "training", False) else 0.0,
        need_weights=_wants_weights(module, kwargs),
        average_weights=False,
        softcap=softcap,
        sinks=sinks,
    )
    return out.transpose(1, 2).contiguous(), weights  # (N, L, H, D), (N, H, L, S) | None


def _wants_weights(module: object, kwargs: dict[str, Any]) -> bool:
    """Whether transformers will record this layer's weights: the ``output_attentions``
    keyword when the caller gave it (``capture_outputs`` lets it override the config), else
    ``module.config.output_attentions``."""
    flag = kwargs.get("output_attentions")
    if flag is None:
        flag = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(flag)


def _check_qkv(query: Tensor, key: Tensor, value: Tensor) -> None:
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise TypeError(_invalid(name, "a torch.Tensor", _describe(x)))
        if x.dim() != 4:
            raise ValueError(_invalid(name, "a 4-D tensor (N, heads, length, D)", _describe(x)))
        if not x.is_floating_point():
            raise TypeError(_invalid(name, "a floating-point tensor", _describe(x)))
    for name, x in (("key", key), ("value", value)):
        if x.dtype != query.dtype:
            raise TypeError(_invalid(name, f"the query's dtype {query.dtype}", _describe(x)))
    batch, heads, _, head_dim = query.shape
    if key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(
            _invalid("key", f"shape ({batch}, Hkv, S, {head_dim}) to match query", _describe(key))
        )
    kv_heads = key.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            _invalid("key", f"a head count Hkv dividing the query's {heads}", _describe(key))
        )
    if key.shape[:3] != value.shape[:3]:  # the value head size may differ (MLA: DeepSeek-V2/3)
        raise ValueError(
            _invalid("value", f"shape {tuple(key.shape[:3])} + (Dv,) (as key)", _describe(value))
        )


def _check_scaling(scaling: object, head_dim: int) -> float:
    if scaling is None:
        return _default_scale(head_dim)
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(_invalid("scaling", "a float > 0 or None", f"scaling={scaling!r}"))
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(_invalid("scaling", "a finite float > 0 or None", f"scaling={scaling!r}"))
    return float(scaling)


def _additive_mask(
    name: str, mask: object, query: Tensor, target: tuple[int, int, int, int]
) -> Tensor | None:
    """``mask`` (None, bool True = attend, or additive float) as an additive mask of the
    query's dtype, after checking that it broadcasts to ``target`` ``(N, H, L, S)``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(
            _invalid(
                name,
                "None or a torch.Tensor (bool with True = attend, or additive float); "
                "a flex_attention BlockMask is not taken",
                _describe(mask),
            )
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(_invalid(name, "a bool or floating-point tensor", _describe(mask)))
    expected = f"a 4-D tensor broadcastable to (N, H, L, S) = {target}"
    if mask.dim() != 4 or any(m not in (1, t) for m, t in zip(mask.shape, target, strict=True)):
        raise ValueError(_invalid(name, expected, _describe(mask)))
    if mask.dtype == torch.bool:
        return to_additive(~mask, query.dtype)
    return mask.to(device=query.device, dtype=query.dtype)


def _sinks(module: object, s_aux: object, query: Tensor) -> Tensor | None:
    """The attention sinks ``(H,)``: the ``s_aux`` keyword, else ``module.sinks`` (a tensor)."""
    if s_aux is None:
        sinks = getattr(module, "sinks", None)
        if not isinstance(sinks, Tensor):
            return None
        _check_sinks("module.sinks", sinks, query)
        return sinks
    _check_sinks("s_aux", s_aux, query)
    return s_aux


def _check_sinks(name: str, sinks: object, query: Tensor) -> None:
    if not isinstance(sinks, Tensor) or not sinks.is_floating_point():
        raise TypeError(_invalid(name, "a floating-point tensor of shape (H,)", _describe(sinks)))
    heads = query.shape[1]
    if sinks.shape != (heads,):
        raise ValueError(_invalid(name, f"shape ({heads},), one logit per head", _describe(sinks)))
