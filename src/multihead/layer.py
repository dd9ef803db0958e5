"""MultiheadAttention: a drop-in for ``torch.nn.MultiheadAttention`` over our functional core.

Shape legend: N batch, L query length, S key length, E embed dim, H heads, D head dim (E / H,
or ``head_dim``),
X extra key slots (``add_bias_kv`` and ``add_zero_attn``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_

# torch's own out_proj class: a Linear that dynamic quantization leaves alone, because forward
# reads out_proj.weight directly. Using it keeps quantization behaviour identical to torch's.
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from . import functional
from .attention_mask import AttentionMask
from .functional import attention_core, packed_self_attention
from .kv_cache import KVCache, RollingKVCache
from .mods import MaskMod, ScoreMod
from .projection import (
    append_extra_keys,
    append_zero_slot,
    merge_heads,
    packed_in_projection,
    separate_in_projection,
    split_heads,
    split_packed_heads,
)
from .rotary import apply_rotary, rotary_cos_sin
from .validation import (
    autocast_enabled,
    check_dropout,
    check_extras,
    check_finite_sinks,
    check_heads,
    check_inputs,
    check_kv_heads,
    check_masks,
    check_mods,
    check_optional_dim,
    check_parameter_dtypes,
    check_positive_int,
    check_rope,
    check_softcap,
    describe,
    invalid,
)


def _any_autocast_fallback() -> bool:
    return True  # unknown: the plain call's shortcut stands aside and the checks run


# Whether torch.autocast is on for any device type (one call; absent from some torch builds).
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", _any_autocast_fallback)


def _nested(x: object) -> bool:
    return isinstance(x, Tensor) and x.is_nested


def _bias_like(bias: Tensor | None, weight: Tensor) -> Tensor | None:
    """``bias`` in its weight's dtype. torch's layer adds a bias of another floating dtype (a
    half ``in_proj_bias`` in a float64 layer, as torch's own tests build) in the output's
    dtype, so we cast it; weights of another dtype are refused
    (:func:`multihead.validation.check_parameter_dtypes`), as torch's matmuls refuse them."""
    return bias if bias is None or bias.dtype == weight.dtype else bias.to(weight.dtype)


class _Call(NamedTuple):
    """One dense forward call once validated: its sizes and its constraints' inputs."""

    is_batched: bool
    batch_first: bool  # of the inputs as projected (unbatched inputs become (1, L, E))
    batch_size: int
    query_len: int
    key_len: int
    segment_ids: Tensor | None  # (N, L)
    attn_mask: Tensor | None
    key_padding_mask: Tensor | None
    mask_mod: MaskMod | None
    score_mod: ScoreMod | None


def _batch_row(mod: Callable, row: int, b_at: int) -> Callable:
    """``mod`` for one sequence of a nested batch, run alone: it sees batch index ``row``
    (``b`` is argument ``b_at``: 0 for a mask_mod, 1 for a score_mod)."""

    def for_row(*args: Tensor) -> Tensor:
        shifted = list(args)
        shifted[b_at] = args[b_at] + row
        return mod(*shifted)

    return for_row


def _declines_fused_encoder_kernel(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing, carried by the :class:`_FusedKernelGuard`
    child of every layer of ours.

    torch's ``nn.TransformerEncoderLayer`` (in eval, under no_grad) may skip its attention's
    forward and run its fused ``torch._transformer_encoder_layer_fwd`` from
    ``in_proj_weight``, which knows nothing of our options (RoPE, window, QK-norm, softcap,
    GQA) nor of our deliberate differences; it declines whenever any module inside it has
    forward hooks. This hook is that signal, so our forward runs everywhere (the choice was
    measured: see the README, "Swapping into existing models").
    """
    return None


class _FusedKernelGuard(nn.Module):
    """A parameter-free child of each layer of ours that only carries
    :func:`_declines_fused_encoder_kernel` (no state_dict keys; never called).

    Not on the layer itself: a hook there sends every call of ours through nn.Module's slower
    hook path (8 us of the seed example's ~70 us call). Not on ``out_proj`` either: module
    replacers (quantization, adapters) swap ``out_proj`` through ``_modules`` and would drop
    the hook, and a TorchScript ``out_proj`` takes no hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_pre_hook(_declines_fused_encoder_kernel)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Registered afresh, never kept under its pickled key: a new process numbers hook
        # handles from 0 again, and a later hook would take that key and replace it.
        _unmark_declining(self)
        self.register_forward_pre_hook(_declines_fused_encoder_kernel)

    def forward(self) -> None:
        return None


def _unmark_declining(module: nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _declines_fused_encoder_kernel:
            del module._forward_pre_hooks[key]


class MultiheadAttention(nn.Module):
    """Multi-head attention with the constructor, parameters, state_dict and numbers of
    ``torch.nn.MultiheadAttention``.

    Args:
        embed_dim: E, the model width; must be divisible by ``num_heads`` unless ``head_dim``
            is given.
        num_heads: H, the number of heads; each has D = E / H dims (or ``head_dim``).
        dropout: dropout probability on the attention weights in training, in [0, 1].
        bias: add biases to the input and output projections.
        add_bias_kv: append a learnt key and value slot ``(1, 1, E)`` to every sequence.
        add_zero_attn: append an all-zero key and value slot to every sequence.
        kdim, vdim: Ek, Ev, the key / value embedding dims (default E).
        batch_first: inputs and outputs are ``(N, L, E)`` instead of ``(L, N, E)``.
        device, dtype: where and in what dtype the parameters are created.

    Keyword-only options beyond torch (all off by default; see the README for each):
        num_kv_heads, rope, rope_base, window, qk_norm, softcap: grouped-query attention,
            rotary embeddings, a sliding window, QK-norm, logit soft-capping.
        head_dim: D, with q projecting E -> H * D, k and v E -> Hkv * D and ``out_proj``
            H * D -> E (Qwen3 / Gemma / gpt-oss).
        sinks: a learned attention-sink logit per head, ``sinks`` ``(H,)`` (gpt-oss): one more
            term in each softmax's normaliser that attends to no value; returned weights cover
            the real keys only.
        output_gate: multiply the merged heads by ``sigmoid(gate_proj(query))`` before
            ``out_proj`` (Qwen3-Next), ``gate_proj`` an ``nn.Linear(E, H * D)``.

    Differences from torch (deliberate): ``is_causal=True`` always applies the causal mask, on
    top of ``attn_mask`` if given; a query whose keys are all masked gets zero attention and
    zero weights instead of NaN; bad input raises a ``ValueError`` / ``TypeError`` that names
    the argument.
    """

    __constants__: ClassVar[list[str]] = ["batch_first"]
    bias_k: Tensor | None
    bias_v: Tensor | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_kv_heads: int | None = None,
        rope: bool = False,
        rope_base: float = 10000.0,
        window: int | None = None,
        qk_norm: bool = False,
        softcap: float | None = None,
        head_dim: int | None = None,
        sinks: bool = False,
        output_gate: bool = False,
    ) -> None:
        embed_dim = check_positive_int("embed_dim", embed_dim)
        num_heads = check_positive_int("num_heads", num_heads)
        if head_dim is None:
            check_heads(embed_dim, num_heads)
            head_dim = embed_dim // num_heads
        else:
            head_dim = check_positive_int("head_dim", head_dim)
        dropout = check_dropout(dropout)
        kdim = check_optional_dim("kdim", kdim)
        vdim = check_optional_dim("vdim", vdim)
        num_kv_heads = check_kv_heads(num_kv_heads, num_heads)
        rope_base = check_rope(rope, rope_base, head_dim)
        window = check_optional_dim("window", window)
        softcap = check_softcap(softcap)
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = head_dim
        # Beyond torch, all off by default (see the README for each).
        self.num_kv_heads = num_kv_heads
        self.rope = bool(rope)
        self.rope_base = rope_base
        self.window = window
        self.qk_norm = bool(qk_norm)
        self.softcap = softcap
        self.output_gate = bool(output_gate)
        q_dim = num_heads * head_dim  # = embed_dim unless head_dim is set
        kv_dim = num_kv_heads * head_dim  # = q_dim unless key/value heads are shared

        # Registration order is torch's, so state_dict keys come in the same order.
        if self.kdim == embed_dim and self.vdim == embed_dim:  # one packed weight, as torch
            self.in_proj_weight = nn.Parameter(
                torch.empty(q_dim + 2 * kv_dim, embed_dim, **factory_kwargs)
            )
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(q_dim, embed_dim, **factory_kwargs))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_dim, self.kdim, **factory_kwargs))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_dim, self.vdim, **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(q_dim + 2 * kv_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        # Linear's own init draws here (weight, then bias), before _reset_parameters, as in torch.
        self.out_proj = NonDynamicallyQuantizableLinear(
            q_dim, embed_dim, bias=bias, **factory_kwargs
        )
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, kv_dim, **factory_kwargs))
            self.bias_v = nn.Parameter(torch.empty(1, 1, kv_dim, **factory_kwargs))
        else:
            # Plain attributes, not registered parameters: torch's state_dict has no such keys.
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        if self.qk_norm:
            # After torch's parameters, so a default layer's state_dict is torch's exactly.
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6, **factory_kwargs)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6, **factory_kwargs)
        if sinks:
            # One sink logit per query head (gpt-oss), zero to start (see _reset_parameters).
            self.sinks = nn.Parameter(torch.empty(num_heads, **factory_kwargs))
        else:
            self.sinks = None  # a plain attribute: no state_dict key
        if self.output_gate:
            # Qwen3-Next's gate, sigmoid(query W_gate + b) on the merged heads before out_proj.
            # Made on meta, so without a random draw: torch's parameters draw what torch's draw
            # (the gate's own draw comes after theirs, in _reset_parameters).
            self.gate_proj = nn.Linear(
                embed_dim, q_dim, bias=bias, device="meta", dtype=dtype
            ).to_empty(device=torch.get_default_device() if device is None else device)
        # Last, so that torch's children keep their order; it adds no state_dict key.
        self._fused_kernel_guard = _FusedKernelGuard()
        self._reset_parameters()

    def options_beyond_torch(self) -> dict[str, object]:
        """The options set here that change the math away from ``torch.nn.MultiheadAttention``
        (name -> value); empty for a layer that computes exactly what torch's computes.
        ``rope_base`` without ``rope`` changes nothing, so it is not listed."""
        changed = {
            "num_kv_heads": self.num_kv_heads if self.num_kv_heads != self.num_heads else None,
            "rope": self.rope or None,
            "window": self.window,
            "qk_norm": self.qk_norm or None,
            "softcap": self.softcap,
            "head_dim": self.head_dim if self.head_dim * self.num_heads != self.embed_dim else None,
            "sinks": True if self.sinks is not None else None,
            "output_gate": self.output_gate or None,
        }
        return {name: value for name, value in changed.items() if value is not None}

    @property
    def is_torch_compatible(self) -> bool:
        """Whether this layer computes what ``torch.nn.MultiheadAttention`` computes (see
        :meth:`options_beyond_torch`)."""
        return not self.options_beyond_torch()

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """torch's attribute: q, k and v share one packed ``in_proj_weight`` (derived, so it
        cannot go stale; code that reads it to pick the weights, torch's own tests included,
        sees torch's meaning)."""
        return self.in_proj_weight is not None

    def _reset_parameters(self) -> None:
        """Redraws the parameters in torch's order: xavier-uniform weights, zero biases,
        xavier-normal bias_k then bias_v (out_proj.weight keeps its Linear init); then ours,
        after every draw of torch's: zero sinks, and a xavier-uniform gate weight with a zero
        bias."""
        if self.in_proj_weight is not None:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)
        if self.sinks is not None:
            constant_(self.sinks, 0.0)
        if self.output_gate:
            xavier_uniform_(self.gate_proj.weight)
            if self.gate_proj.bias is not None:
                constant_(self.gate_proj.bias, 0.0)

    def __setstate__(self, state: dict) -> None:
        # _qkv_same_embed_dim is derived (a property); pickles that stored it (ours before, and
        # torch's) or predate it (torch 1.1) load the same way.
        state.pop("_qkv_same_embed_dim", None)
        super().__setstate__(state)
        # Options beyond torch's, absent from pickles of torch's layer: their defaults.
        for name, default in (
            ("num_kv_heads", self.num_heads),
            ("rope", False),
            ("rope_base", 10000.0),
            ("window", None),
            ("qk_norm", False),
            ("softcap", None),
            ("sinks", None),
            ("output_gate", False),
        ):
            if not hasattr(self, name):
                setattr(self, name, default)
        # Pickles of torch's layer have no guard, and ours from before it carry the hook on
        # the layer itself (every call then takes nn.Module's hook path): moved to a guard.
        _unmark_declining(self)
        if "_fused_kernel_guard" not in self._modules:
            self._fused_kernel_guard = _FusedKernelGuard()

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        cache: KVCache | None = None,
        segment_ids: Tensor | None = None,
        mask_mod: MaskMod | None = None,
        score_mod: ScoreMod | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attends from ``query`` to ``key`` / ``value``.

        Args:
            query: ``(L, N, E)``, ``(N, L, E)`` with ``batch_first``, or ``(L, E)`` unbatched.
            key: ``(S, N, Ek)``, ``(N, S, Ek)`` or ``(S, Ek)``.
            value: ``(S, N, Ev)``, ``(N, S, Ev)`` or ``(S, Ev)``.
            key_padding_mask: ``(N, S)`` or ``(S,)``; bool (True = ignore that key) or float
                (added to the logits).
            need_weights: also return the attention weights.
            attn_mask: ``(L, S)`` or ``(N * H, L, S)`` (``(H, L, S)`` unbatched), batch-major;
                bool (True = not allowed to attend) or float (added to the logits).
            average_attn_weights: average the returned weights over heads.
            is_causal: apply the causal mask (query i sees keys j <= i), together with
                ``attn_mask`` when one is given.
            cache: a :class:`multihead.KVCache` from :meth:`new_cache` (inference only). The new
                keys and values (S == L tokens) are appended, and the queries attend causally
                over everything cached: the query at position p sees keys at positions <= p.
            segment_ids: ``(N, L)`` (``(L,)`` unbatched) integer labels for packed rows of
                self-attention (S == L): tokens attend only within their own segment.
            mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``, True = attend
                (FlexAttention's signature and polarity; :mod:`multihead.mods` ships the
                standard ones). Positions are absolute (with a cache, the query at cache slot
                p has q_idx p); the extra ``add_bias_kv`` / ``add_zero_attn`` slots are always
                visible. Tiles it hides entirely are skipped, forward and backward.
            score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (FlexAttention's),
                on the scaled, soft-capped logits of the real keys, before ``attn_mask`` and
                ``key_padding_mask`` are added. Gradients reach any tensor it captures.

        Returns:
            ``(attn_output, attn_weights)``: output shaped like ``query`` with E features;
            weights ``(N, L, S + X)`` averaged or ``(N, H, L, S + X)`` per head (without N when
            unbatched; S is the cache's max_len with a cache), or None when
            ``need_weights=False``.

        Raises:
            TypeError: a non-tensor input, a mask of a non-bool non-float dtype, an input
                dtype that differs from the layer's, or a wrong cache / segment_ids type.
            ValueError: a wrong rank, embedding size, sequence or batch size, mask shape, or
                cache misuse (full, wrong batch, with gradients, with masks).
        """
        if (
            query is key
            and key is value
            and key_padding_mask is None
            and attn_mask is None
            and not is_causal
            and cache is None
            and segment_ids is None
            and mask_mod is None
            and score_mod is None
        ):
            plain = self._forward_plain(query, need_weights, average_attn_weights)
            if plain is not None:
                return plain
        if _nested(query) or _nested(key) or _nested(value):
            return self._forward_nested(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
                cache=cache,
                segment_ids=segment_ids,
                mask_mod=mask_mod,
                score_mod=score_mod,
            )
        return self._forward_dense(
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
            cache=cache,
            segment_ids=segment_ids,
            mask_mod=mask_mod,
            score_mod=score_mod,
        )

    def _forward_plain(
        self, x: Tensor, need_weights: bool, average_weights: bool
    ) -> tuple[Tensor, Tensor | None] | None:
        """The commonest small call, ``mha(x, x, x)`` with no mask on a layer with no option
        beyond torch's, without the per-call work that cannot change its result: no
        validation (every check :meth:`_check_call` makes holds here; they are re-stated
        below), no :class:`AttentionMask`, no path search. It runs the very kernels
        :meth:`_forward_dense` picks for this call (:func:`select_path`: ``"explicit"`` at
        most ``SMALL_SCORES`` scores, or SDPA for ``need_weights=False``): the same formula
        in the same order, with q, k and v copied once and multiplied by ``bmm``
        (tests/test_plain_call.py: outputs, weights and gradients equal the full path's to
        1e-12 in float64; outputs and weights were bitwise equal in every configuration
        tried, gradients differ by rounding). Returns None for any other call, which
        :meth:`_forward_dense` then checks and runs."""
        # Registered parameters read from their dicts: nn.Module's __getattr__ costs a
        # microsecond per look-up, and this call is only a few tens of them.
        # A parameter replaced by something else (a parametrization, weight_norm's computed
        # attribute, a wrapper module) is not in these dicts: the full path then runs.
        # Only torch's six registered parameters (no one added, so the dtype checks the full
        # path makes on every parameter are the ones made here), and an nn.Linear out_proj
        # (a TorchScript or wrapper module has other parameter containers).
        params, heads = self._parameters, self.num_heads
        weight = params.get("in_proj_weight")
        out_proj = self._modules.get("out_proj")
        out_params = out_proj._parameters if isinstance(out_proj, nn.Linear) else {}
        if (
            type(x) is not Tensor  # not a subclass, not a non-tensor (those get checked)
            or weight is None
            or len(params) != 5  # in_proj_weight, q/k/v_proj_weight (None), in_proj_bias
            or "in_proj_bias" not in params
            or len(out_params) != 2
            or out_params.get("weight") is None
            or "bias" not in out_params
            or x.dim() != 3
            or x.is_nested
            or _ANY_AUTOCAST()  # autocast lets dtypes differ: the checks decide
            or self.num_kv_heads != heads
            or self.rope
            or self.qk_norm
            or self.window is not None
            or self.softcap is not None
            or self.bias_k is not None
            or self.add_zero_attn
            or self.output_gate  # (sinks is a parameter: the count above declines it)
            or self.head_dim * heads != self.embed_dim
        ):
            return None
        out_weight, out_bias = out_params["weight"], out_params["bias"]
        bias = params["in_proj_bias"]
        batch_first = self.batch_first
        size = x.shape
        length, batch = (size[1], size[0]) if batch_first else (size[0], size[1])
        dtype = x.dtype
        if (
            size[2] != self.embed_dim
            or not 0 < batch * heads * length * length <= functional.SMALL_SCORES
            or weight.dtype != dtype
            or out_weight.dtype != dtype
            or not (bias is None or bias.is_floating_point())
            or not (out_bias is None or out_bias.is_floating_point())
        ):
            return None
        proj = F.linear(x, weight, _bias_like(bias, weight))  # (.., 3E)
        out, weights = packed_self_attention(
            proj,
            heads,
            batch_first=batch_first,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
            average_weights=average_weights,
        )
        return F.linear(out, out_weight, _bias_like(out_bias, out_weight)), weights

    def _forward_dense(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
        *,
        cache: KVCache | None,
        segment_ids: Tensor | None,
        mask_mod: MaskMod | None = None,
        score_mod: ScoreMod | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """forward for ordinary (non-nested) tensors: validate, project, norm, rope, cache,
        mask, attend, merge, project."""
        call = self._check_call(
            query, key, value, key_padding_mask, attn_mask, cache, segment_ids, mask_mod, score_mod
        )
        q, k, v = self._project_heads(query, key, value, call.is_batched, call.batch_first)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = 0 if cache is None else cache.position.clone()  # before update() moves it
        if self.rope:
            q, k = self._rotate(q, k, offset)
        key_len = call.key_len
        undo = None  # a user's mod may raise after the update: then the cache is restored
        rolled = new = None
        if cache is not None and cache.rolling:
            # Slots and new tokens together, under their positions' mask; the new tokens are
            # written only once the call has succeeded (see RollingKVCache).
            new = (k, v)
            k, v, rolled = cache.attended(k, v)  # (N, Hkv, C + T, D), mask (T, C + T)
            key_len, is_causal = k.shape[2], False
        elif cache is not None:
            undo = cache.undo_point(call.query_len) if call.mask_mod or call.score_mod else None
            k, v = cache.update(k, v)  # (N, Hkv, max_len, D): static shapes
            key_len, is_causal = k.shape[2], True
        if k.dtype != q.dtype:  # under autocast the cache may hold another precision
            k, v = k.to(q.dtype), v.to(q.dtype)
        k, v = append_extra_keys(k, v, self.bias_k, self.bias_v, self.add_zero_attn)
        sinks = self.sinks
        if sinks is not None:
            k, v = append_zero_slot(k), append_zero_slot(v)  # the sink's slot, last
        mask = self._mask(call, q, key_len, k.shape[2] - key_len, is_causal, offset, sinks, rolled)
        out, weights = self._attend(q, k, v, mask, cache, undo, need_weights, average_attn_weights)
        if new is not None:
            cache.commit(*new)
        if sinks is not None and weights is not None:
            weights = weights[..., :-1]  # the sink attends to nothing: no column of its own
        return self._output(out, weights, query, call)

    def _output(
        self, out: Tensor, weights: Tensor | None, query: Tensor, call: _Call
    ) -> tuple[Tensor, Tensor | None]:
        """Heads ``(N, H, L, D)`` -> the call's output: merged, gated (``output_gate``),
        out-projected, and unbatched again for an unbatched call (the weights too)."""
        out = merge_heads(out, call.batch_first)  # (N, L, H * D) or (L, N, H * D)
        if self.output_gate:
            out = out * self._gate(query, call.is_batched)
        out_proj = self.out_proj
        out = F.linear(out, out_proj.weight, _bias_like(out_proj.bias, out_proj.weight))
        if not call.is_batched:
            out = out.squeeze(0)  # (L, E)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _mask(
        self,
        call: _Call,
        q: Tensor,
        key_len: int,
        extra_keys: int,
        is_causal: bool,
        offset: int | Tensor,
        sinks: Tensor | None,
        rolled: Tensor | None = None,
    ) -> AttentionMask:
        """The call's one constraint description (see :mod:`multihead.attention_mask`).
        ``rolled``: a rolling cache's position mask, which holds causality and the window."""
        return AttentionMask.build(
            batch=call.batch_size,
            heads=self.num_heads,
            query_len=call.query_len,
            key_len=key_len,
            extra_keys=extra_keys,
            dtype=q.dtype,
            device=q.device,
            attn_mask=call.attn_mask if rolled is None else rolled,
            key_padding_mask=call.key_padding_mask,
            is_causal=is_causal,
            query_offset=offset if rolled is None else 0,
            window=self.window if rolled is None else None,
            segment_ids=call.segment_ids,
            mask_mod=call.mask_mod,
            score_mod=call.score_mod,
            softcap=self.softcap,
            sinks=sinks,
        )

    def _gate(self, query: Tensor, is_batched: bool) -> Tensor:
        """Qwen3-Next's output gate ``sigmoid(query W_gate^T + b)``, ``(N, L, H * D)`` or
        ``(L, N, H * D)`` as the merged heads (HF ``Qwen3NextAttention``)."""
        weight = self.gate_proj.weight
        gate = torch.sigmoid(F.linear(query, weight, _bias_like(self.gate_proj.bias, weight)))
        return gate if is_batched else gate.unsqueeze(0)

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: AttentionMask,
        cache: KVCache | None,
        undo: tuple | None,
        need_weights: bool,
        average_weights: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """out ``(N, H, L, D)`` and weights ``(N, [H,] L, S + X)`` or None. If a user's mod
        raises (or the call is interrupted), the cache is restored from ``undo``: the call
        changed nothing. The cache becomes this layer's only once the call has succeeded."""
        try:
            result = attention_core(
                q,
                k,
                v,
                mask,
                dropout_p=self.dropout if self.training else 0.0,
                need_weights=need_weights,
                average_weights=average_weights,
            )
        except BaseException:
            if undo is not None:
                cache.undo(undo)
            raise
        if cache is not None:
            cache.claim(self)
        return result

    def _check_call(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        cache: KVCache | None,
        segment_ids: Tensor | None,
        mask_mod: object,
        score_mod: object,
    ) -> _Call:
        """Every check of a dense call, before anything changes (the cache included), and
        the call's sizes."""
        autocast = isinstance(query, Tensor) and autocast_enabled(query.device)  # asked once
        is_batched = check_inputs(
            query,
            key,
            value,
            embed_dim=self.embed_dim,
            kdim=self.kdim,
            vdim=self.vdim,
            dtype=self.out_proj.weight.dtype,
            batch_first=self.batch_first,
            autocast=autocast,
        )
        check_parameter_dtypes(self, self.out_proj.weight.dtype, autocast)
        seq_dim = 1 if (self.batch_first and is_batched) else 0
        batch_size = query.shape[1 - seq_dim] if is_batched else 1
        query_len, key_len = query.shape[seq_dim], key.shape[seq_dim]
        check_masks(
            key_padding_mask,
            attn_mask,
            is_batched=is_batched,
            batch_size=batch_size,
            num_heads=self.num_heads,
            query_len=query_len,
            key_len=key_len,
        )
        check_extras(
            self,
            cache,
            segment_ids,
            is_batched=is_batched,
            batch_size=batch_size,
            query_len=query_len,
            key_len=key_len,
            has_masks=key_padding_mask is not None or attn_mask is not None,
            inputs=(query, key, value),
            autocast=autocast,
        )
        check_mods(mask_mod, score_mod)
        if self.sinks is not None:
            check_finite_sinks(self.sinks)
        if cache is not None and cache.rolling:
            if mask_mod is not None or score_mod is not None:
                raise ValueError(
                    invalid(
                        "cache",
                        "a full cache (new_cache without rolling) with mask_mod / score_mod: "
                        "a rolling cache's key columns are ring slots, not positions",
                        "a rolling cache and a mod",
                    )
                )
            if cache.window != self.window:
                raise ValueError(
                    invalid(
                        "cache",
                        f"a rolling cache made for window={self.window} (this layer's)",
                        f"one made for window={cache.window}",
                    )
                )
        return _Call(
            is_batched=is_batched,
            batch_first=self.batch_first or not is_batched,  # unbatched becomes (1, L, E)
            batch_size=batch_size,
            query_len=query_len,
            key_len=key_len,
            segment_ids=None if segment_ids is None else segment_ids.reshape(batch_size, query_len),
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            mask_mod=mask_mod,
            score_mod=score_mod,
        )

    def _forward_nested(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
        cache: KVCache | None,
        segment_ids: Tensor | None,
        mask_mod: MaskMod | None,
        score_mod: ScoreMod | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Nested-tensor inputs ``(N, *, E)`` (torch's ``TransformerEncoder`` makes them from a
        padded batch): each sequence runs alone, as an unbatched call, and the outputs (and
        weights) come back nested in the query's layout. The padding is the nesting itself, so
        masks, a cache and segment ids are refused. Mods see each sequence's own batch index
        ``b``. Weights come back as a strided nested tensor (ragged in both L and S, which the
        jagged layout cannot hold)."""
        check_mods(mask_mod, score_mod)
        if not (_nested(query) and _nested(key) and _nested(value)):
            raise ValueError(
                invalid(
                    "query",
                    "query, key and value all nested tensors, or none of them",
                    ", ".join(
                        f"{name} {'nested' if _nested(x) else 'not'}"
                        for name, x in (("query", query), ("key", key), ("value", value))
                    ),
                )
            )
        if not self.batch_first:
            raise ValueError(
                invalid(
                    "query",
                    "batch_first=True for nested tensors, which are (N, *, E)",
                    "a nested tensor for a layer with batch_first=False",
                )
            )
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != 3:
                raise ValueError(
                    invalid(name, "a nested tensor (N, *, E) of 2-D sequences", f"{x.dim()}-D")
                )
        for name, given in (
            ("key_padding_mask", key_padding_mask),
            ("attn_mask", attn_mask),
            ("cache", cache),
            ("segment_ids", segment_ids),
        ):
            if given is not None:
                raise ValueError(
                    invalid(
                        name,
                        "None with nested-tensor inputs (the nesting is the padding)",
                        describe(given),
                    )
                )
        queries = query.unbind()
        keys = queries if key is query else key.unbind()
        values = keys if value is key else value.unbind()
        if not len(queries) == len(keys) == len(values):
            raise ValueError(
                invalid(
                    "key",
                    f"{len(queries)} sequences (as query)",
                    f"{len(keys)} keys and {len(values)} values",
                )
            )
        results = [  # not __call__ / forward: the caller's hooks fire once, not per sequence
            self._forward_dense(
                q_i,
                k_i,
                v_i,
                None,
                need_weights,
                None,
                average_attn_weights,
                is_causal,
                cache=None,
                segment_ids=None,
                mask_mod=None if mask_mod is None else _batch_row(mask_mod, i, 0),
                score_mod=None if score_mod is None else _batch_row(score_mod, i, 1),
            )
            for i, (q_i, k_i, v_i) in enumerate(zip(queries, keys, values, strict=True))
        ]
        out = torch.nested.as_nested_tensor([o for o, _ in results], layout=query.layout)
        if not need_weights:
            return out, None
        # Weights are ragged in both L and S: only the strided layout holds them.
        return out, torch.nested.as_nested_tensor([w for _, w in results], layout=torch.strided)

    def merge_masks(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, query: Tensor
    ) -> tuple[Tensor | None, int | None]:
        """torch's mask merger, which torch's ``TransformerEncoderLayer`` inference fast path
        calls on its ``self_attn`` (kept for API compatibility: that path declines our layers,
        but code written against torch's layer may call it): attn_mask ``(L, L)`` or
        ``(N * H, L, L)`` and
        key_padding_mask ``(N, L)`` -> ``(merged, mask_type)``, where mask_type is 1 for the
        padding mask alone and 2 for a ``(N, H, L, L)`` sum; ``(None, None)`` without masks."""
        if attn_mask is None:
            return key_padding_mask, None if key_padding_mask is None else 1
        batch_size, seq_len, _ = query.shape
        if attn_mask.dim() == 3:
            merged = attn_mask.view(batch_size, -1, seq_len, seq_len)  # (N, H, L, L)
        else:
            merged = attn_mask.view(1, 1, seq_len, seq_len).expand(
                batch_size, self.num_heads, -1, -1
            )
        if key_padding_mask is not None:
            merged = merged + key_padding_mask.view(batch_size, 1, 1, seq_len)
        return merged, 2

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        rolling: bool = False,
        sink_tokens: int = 0,
    ) -> KVCache:
        """A preallocated :class:`multihead.KVCache` for ``batch_size`` rows of up to
        ``max_len`` tokens: keys and values ``(N, Hkv, max_len, D)``, in the layer's dtype and
        device unless given.

        ``rolling=True`` (a layer with ``window`` only): a :class:`multihead.RollingKVCache`
        that keeps the first ``sink_tokens`` tokens and the last ``max_len`` others (at least
        ``window``; ``max_len=window`` is the natural size), ``(N, Hkv, sink_tokens + max_len,
        D)``, and decodes past any length.

        Raises:
            ValueError: a size that is not a positive int (``sink_tokens``: >= 0), ``rolling``
                on a layer without ``window``, ``max_len < window`` with ``rolling``, or
                ``sink_tokens`` without ``rolling``.
        """
        weight = self.out_proj.weight
        batch_size = check_positive_int("batch_size", batch_size)
        max_len = check_positive_int("max_len", max_len)
        dtype = weight.dtype if dtype is None else dtype
        device = weight.device if device is None else device
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(invalid("sink_tokens", "an int >= 0", f"sink_tokens={sink_tokens!r}"))
        if not rolling:
            if sink_tokens:
                raise ValueError(
                    invalid(
                        "sink_tokens",
                        "0 unless rolling=True (a full cache keeps every token anyway)",
                        f"sink_tokens={sink_tokens}",
                    )
                )
            cache = KVCache(
                batch_size, self.num_kv_heads, max_len, self.head_dim, dtype=dtype, device=device
            )
        else:
            if self.window is None:
                raise ValueError(
                    invalid(
                        "rolling",
                        "a layer with window= (a rolling cache forgets keys older than the window)",
                        "rolling=True on a layer without window",
                    )
                )
            if max_len < self.window:
                raise ValueError(
                    invalid(
                        "max_len",
                        f"at least window={self.window} with rolling=True (the keys a query "
                        "can still see)",
                        f"max_len={max_len}",
                    )
                )
            cache = RollingKVCache(
                batch_size,
                self.num_kv_heads,
                max_len,
                self.head_dim,
                window=self.window,
                sink_tokens=sink_tokens,
                dtype=dtype,
                device=device,
            )
        cache.claim(self)  # it belongs to this layer; any other refuses it
        return cache

    def _rotate(self, q: Tensor, k: Tensor, offset: int | Tensor) -> tuple[Tensor, Tensor]:
        """RoPE on q ``(N, H, L, D)`` and k ``(N, Hkv, S, D)``, positions from ``offset``."""
        length = max(q.shape[2], k.shape[2])
        positions = torch.arange(length, device=q.device) + offset
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_base, q.dtype)  # (L, D)
        q = apply_rotary(q, cos[: q.shape[2]], sin[: q.shape[2]])
        return q, apply_rotary(k, cos[: k.shape[2]], sin[: k.shape[2]])

    def _project_heads(
        self, query: Tensor, key: Tensor, value: Tensor, is_batched: bool, batch_first: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections split into heads: q ``(N, H, L, D)``, k and v ``(N, Hkv, S, D)``."""
        same_heads = self.num_kv_heads == self.num_heads
        if same_heads and self.in_proj_weight is not None and query is key and key is value:
            # Self-attention: one GEMM, then one view and one permute for all of q, k and v.
            weight = self.in_proj_weight
            proj = F.linear(query, weight, _bias_like(self.in_proj_bias, weight))  # (.., 3E)
            if not is_batched:
                proj = proj.unsqueeze(0)  # (1, L, 3E)
            return split_packed_heads(proj, self.num_heads, batch_first)
        q, k, v = self._in_projection(query, key, value)  # (..., E or Ekv), caller's layout
        if not is_batched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # (1, L or S, ·)
        return (
            split_heads(q, self.num_heads, batch_first),
            split_heads(k, self.num_kv_heads, batch_first),
            split_heads(v, self.num_kv_heads, batch_first),
        )

    def _in_projection(
        self, query: Tensor, key: Tensor, value: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        weight = self.in_proj_weight
        if weight is not None:
            bias = _bias_like(self.in_proj_bias, weight)
            q_rows = self.num_heads * self.head_dim
            return packed_in_projection(query, key, value, weight, bias, q_rows)
        q_weight = self.q_proj_weight
        return separate_in_projection(
            query,
            key,
            value,
            q_weight,
            self.k_proj_weight,
            self.v_proj_weight,
            _bias_like(self.in_proj_bias, q_weight),
        )
