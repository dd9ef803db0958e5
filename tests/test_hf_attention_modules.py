"""Our layer's options (sinks, head_dim, GQA, QK-norm, sliding window, softcap, output gate)
against the attention modules of Hugging Face models that use them: GptOssAttention,
Qwen3Attention, Gemma2Attention, Gemma3Attention and Qwen3NextAttention (eager).

Each HF module is built from a tiny random config, its parameters are drawn from a seeded
generator and copied into ours (q / k / v stacked into ``in_proj_weight``, o_proj -> out_proj,
Gemma-style ``(1 + w)`` norms as ``1 + w``, Qwen3-Next's interleaved [query, gate] rows split
into the query rows and ``gate_proj``); both then run on the same inputs, with HF's own eager
mask (causal or sliding-window, with padding where asked) as its additive ``(N, 1, L, S)`` mask.

Float32 runs HF exactly as shipped (its own rotary embedding). Float64 needs two changes on
HF's side, because HF computes some steps in float32 whatever the model's dtype: the cos/sin
are computed here in float64 (HF's rotary classes compute them in float32; they are checked
against HF's to float32 precision), and for Qwen3, Gemma2, Gemma3 and Qwen3-Next the eager
softmax's ``dtype=torch.float32`` and the RMSNorms' float32 round trip are kept in float64
(:func:`_hf_in_float64`). GptOssAttention's eager path is float64 throughout already. The
unpatched float64 difference is recorded too, to show what the patch removes.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import multihead
from multihead.swap import to_torch  # the module's (multihead.swap is the swap function)

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    Qwen3Config,
    Qwen3NextConfig,
)
from transformers.masking_utils import (  # noqa: E402
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.models.gemma2 import modeling_gemma2  # noqa: E402
from transformers.models.gemma3 import modeling_gemma3  # noqa: E402
from transformers.models.gpt_oss import modeling_gpt_oss  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402
from transformers.models.qwen3_next import modeling_qwen3_next  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 16, 4, 2, 6  # head_dim != hidden / heads, GQA 2:1
BATCH, LENGTH, WINDOW, PAD = 2, 7, 3, 2  # the padded batch: row 1's last PAD tokens
SOFTCAP = 1.5  # small, so that tanh bends the logits drawn here
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
DTYPE_NAME = {torch.float32: "f32", torch.float64: "f64"}


@dataclass(frozen=True)
class Case:
    """One HF attention module (one layer type) and the options of ours that match it."""

    name: str
    module: type[nn.Module]
    make_config: Callable[[], object]
    layer_idx: int
    theta: float
    bias: bool
    sliding: bool = False
    norm: str | None = None  # "plain" (Qwen3: w * x) or "one_plus" (Gemma, Qwen3-Next)
    softcap: float | None = None
    sinks: bool = False
    gated: bool = False
    half_cos: bool = False  # gpt-oss's rotary gives (.., D / 2) cos / sin
    rotary: Callable = field(default=None)  # (config) -> HF's rotary embedding module
    rotary_layer_type: str | None = None  # Gemma3's rotary takes the layer type
    hf_fp32_steps: bool = True  # HF's eager softmax (and norms) run in float32

    @property
    def label(self) -> str:
        return f"HF {self.module.__name__}"

    def ours_kwargs(self) -> dict:
        return dict(
            bias=self.bias,
            batch_first=True,
            num_kv_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            rope=True,
            rope_base=self.theta,
            window=WINDOW if self.sliding else None,
            qk_norm=self.norm is not None,
            softcap=self.softcap,
            sinks=self.sinks,
            output_gate=self.gated,
        )


def _common(**extra) -> dict:
    return dict(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        **extra,
    )


def _gpt_oss_config() -> GptOssConfig:
    # Plain RoPE (gpt-oss ships yarn): its _apply_rotary_emb on the two halves is rotate-half.
    return GptOssConfig(
        **_common(),
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=WINDOW,
        attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 300.0},
    )


def _qwen3_config() -> Qwen3Config:
    return Qwen3Config(
        **_common(),
        num_hidden_layers=1,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )


def _gemma2_config() -> Gemma2Config:
    return Gemma2Config(
        **_common(),
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=WINDOW,
        query_pre_attn_scalar=HEAD_DIM,  # HF's scaling is then 1 / sqrt(D), as ours
        attn_logit_softcapping=SOFTCAP,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 200.0},
    )


def _gemma3_config() -> Gemma3TextConfig:
    return Gemma3TextConfig(
        **_common(),
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=WINDOW,
        query_pre_attn_scalar=HEAD_DIM,
        attention_bias=True,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000.0},
        },
    )


def _qwen3_next_config() -> Qwen3NextConfig:
    return Qwen3NextConfig(
        **_common(),
        num_hidden_layers=1,
        layer_types=["full_attention"],
        attention_bias=True,
        partial_rotary_factor=1.0,  # ours rotates the full head dim
        rope_parameters={"rope_type": "default", "rope_theta": 700.0},
    )


CASES = [
    Case(
        "gpt_oss_sliding",
        modeling_gpt_oss.GptOssAttention,
        _gpt_oss_config,
        layer_idx=0,
        theta=300.0,
        bias=True,
        sliding=True,
        sinks=True,
        half_cos=True,
        rotary=modeling_gpt_oss.GptOssRotaryEmbedding,
        hf_fp32_steps=False,
    ),
    Case(
        "gpt_oss_full",
        modeling_gpt_oss.GptOssAttention,
        _gpt_oss_config,
        layer_idx=1,
        theta=300.0,
        bias=True,
        sinks=True,
        half_cos=True,
        rotary=modeling_gpt_oss.GptOssRotaryEmbedding,
        hf_fp32_steps=False,
    ),
    Case(
        "qwen3",
        modeling_qwen3.Qwen3Attention,
        _qwen3_config,
        layer_idx=0,
        theta=500.0,
        bias=False,
        norm="plain",
        rotary=modeling_qwen3.Qwen3RotaryEmbedding,
    ),
    Case(
        "gemma2_sliding",
        modeling_gemma2.Gemma2Attention,
        _gemma2_config,
        layer_idx=0,
        theta=200.0,
        bias=False,
        sliding=True,
        softcap=SOFTCAP,
        rotary=modeling_gemma2.Gemma2RotaryEmbedding,
    ),
    Case(
        "gemma2_full",
        modeling_gemma2.Gemma2Attention,
        _gemma2_config,
        layer_idx=1,
        theta=200.0,
        bias=False,
        softcap=SOFTCAP,
        rotary=modeling_gemma2.Gemma2RotaryEmbedding,
    ),
    Case(
        "gemma3_sliding",
        modeling_gemma3.Gemma3Attention,
        _gemma3_config,
        layer_idx=0,
        theta=100.0,
        bias=True,
        sliding=True,
        norm="one_plus",
        rotary=modeling_gemma3.Gemma3RotaryEmbedding,
        rotary_layer_type="sliding_attention",
    ),
    Case(
        "gemma3_full",
        modeling_gemma3.Gemma3Attention,
        _gemma3_config,
        layer_idx=1,
        theta=1000.0,
        bias=True,
        norm="one_plus",
        rotary=modeling_gemma3.Gemma3RotaryEmbedding,
        rotary_layer_type="full_attention",
    ),
    Case(
        "qwen3_next",
        modeling_qwen3_next.Qwen3NextAttention,
        _qwen3_next_config,
        layer_idx=0,
        theta=700.0,
        bias=True,
        norm="one_plus",
        gated=True,
        rotary=modeling_qwen3_next.Qwen3NextRotaryEmbedding,
    ),
]
CASE_IDS = [case.name for case in CASES]


# --- building the pair ---------------------------------------------------------------------


def _config(case: Case):
    config = case.make_config()
    config._attn_implementation = "eager"
    return config


def build_hf(case: Case, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The HF module with every parameter drawn in float64 from a seeded generator, then cast
    (so both dtypes hold the same draw)."""
    hf = case.module(_config(case), layer_idx=case.layer_idx).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            draw = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            if name.endswith("norm.weight"):  # around 1 once in effect: w, or 1 + w
                param.copy_(1 + 0.3 * draw if case.norm == "plain" else 0.3 * draw)
            elif name == "sinks":
                param.copy_(draw)
            else:
                param.copy_(0.4 * draw)
    if case.sinks:
        assert hf.sinks.abs().min() > 0  # the draw reached them
    return hf.to(dtype)


def _split_gate_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next's q_proj rows (or bias) ``[q_0 (D), gate_0 (D), q_1, gate_1, ...]`` ->
    (query rows, gate rows), each ``(H * D, ...)``."""
    per_head = t.reshape(HEADS, 2, HEAD_DIM, *t.shape[1:])
    return (
        per_head[:, 0].reshape(HEADS * HEAD_DIM, *t.shape[1:]),
        per_head[:, 1].reshape(HEADS * HEAD_DIM, *t.shape[1:]),
    )


def _join_gate_rows(query: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_split_gate_rows`."""
    rest = query.shape[1:]
    both = torch.stack(
        [query.reshape(HEADS, HEAD_DIM, *rest), gate.reshape(HEADS, HEAD_DIM, *rest)], dim=1
    )
    return both.reshape(2 * HEADS * HEAD_DIM, *rest)


def build_ours(case: Case, hf: nn.Module, **overrides) -> multihead.MultiheadAttention:
    dtype = hf.o_proj.weight.dtype
    ours = multihead.MultiheadAttention(
        HIDDEN, HEADS, dtype=dtype, **{**case.ours_kwargs(), **overrides}
    )
    with torch.no_grad():
        q_weight, q_bias = hf.q_proj.weight, hf.q_proj.bias
        if case.gated:
            q_weight, gate_weight = _split_gate_rows(q_weight)
            ours.gate_proj.weight.copy_(gate_weight)
            if case.bias:
                q_bias, gate_bias = _split_gate_rows(q_bias)
                ours.gate_proj.bias.copy_(gate_bias)
        ours.in_proj_weight.copy_(torch.cat([q_weight, hf.k_proj.weight, hf.v_proj.weight]))
        ours.out_proj.weight.copy_(hf.o_proj.weight)
        if case.bias:
            ours.in_proj_bias.copy_(torch.cat([q_bias, hf.k_proj.bias, hf.v_proj.bias]))
            ours.out_proj.bias.copy_(hf.o_proj.bias)
        if ours.qk_norm:
            shift = 1.0 if case.norm == "one_plus" else 0.0
            ours.q_norm.weight.copy_(hf.q_norm.weight + shift)
            ours.k_norm.weight.copy_(hf.k_norm.weight + shift)
        if ours.sinks is not None:
            ours.sinks.copy_(hf.sinks)
    return ours.eval()


def ours_grads_in_hf_layout(case: Case, ours: multihead.MultiheadAttention) -> dict:
    """Our parameter gradients under HF's parameter names and shapes."""
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    grads = {}
    for kind in ("weight", "bias"):
        packed = getattr(ours, f"in_proj_{kind}")
        if packed is None:
            continue
        q, k, v = packed.grad.split([q_rows, kv_rows, kv_rows])
        if case.gated:
            q = _join_gate_rows(q, getattr(ours.gate_proj, kind).grad)
        grads[f"q_proj.{kind}"], grads[f"k_proj.{kind}"], grads[f"v_proj.{kind}"] = q, k, v
        grads[f"o_proj.{kind}"] = getattr(ours.out_proj, kind).grad
    if ours.qk_norm:  # w_ours = w_hf (+ 1): the same gradient
        grads["q_norm.weight"] = ours.q_norm.weight.grad
        grads["k_norm.weight"] = ours.k_norm.weight.grad
    if ours.sinks is not None:
        grads["sinks"] = ours.sinks.grad
    return grads


# --- inputs, HF's rotary and mask ----------------------------------------------------------


def inputs(dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, LENGTH, HIDDEN, generator=generator, dtype=torch.float64).to(dtype)


def padding(padded: bool) -> torch.Tensor | None:
    """HF's 2-D attention mask (1 = token, 0 = padding) or None. Right padding: every query
    keeps a real key even in a window of WINDOW > PAD."""
    if not padded:
        return None
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[1, LENGTH - PAD :] = 0
    return mask


def positions() -> torch.Tensor:
    return torch.arange(LENGTH)[None].expand(BATCH, -1)


def hf_cos_sin(case: Case, config, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's own rotary embedding (computed in float32, cast to x's dtype)."""
    rotary = case.rotary(config)
    if case.rotary_layer_type is not None:
        return rotary(x, positions(), case.rotary_layer_type)
    return rotary(x, positions())


def float64_cos_sin(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's default-RoPE formula, in float64: inv_freq = 1 / theta^(2i / D)."""
    exponents = torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM
    inv_freq = 1.0 / (case.theta**exponents)
    angles = positions().to(torch.float64)[..., None] * inv_freq  # (N, L, D / 2)
    if not case.half_cos:
        angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def hf_mask(case: Case, config, x: torch.Tensor, attention_mask) -> torch.Tensor:
    """HF's eager mask: additive, (N, 1, L, S), in x's dtype."""
    make = create_sliding_window_causal_mask if case.sliding else create_causal_mask
    mask = make(
        config=config,
        inputs_embeds=x,
        attention_mask=attention_mask,
        cache=None,
        position_ids=positions(),
        allow_is_causal_skip=False,
    )
    assert mask.shape == (BATCH, 1, LENGTH, LENGTH) and mask.dtype == x.dtype
    return mask


def _keep_float64_softmax(original: Callable) -> Callable:
    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and input.dtype == torch.float64:
            dtype = None  # HF asks for float32 to upcast half precision; keep float64
        return original(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    return softmax


def _float64_rms_norm(one_plus: bool) -> Callable:
    """HF's RMSNorm formula (Qwen3RMSNorm, or Gemma3 / Qwen3-Next's ``1 + w``) without the
    float32 round trip those classes make."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if one_plus else self.variance_epsilon
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return normed * (1.0 + self.weight) if one_plus else self.weight * normed

    return forward


@contextlib.contextmanager
def _hf_in_float64(case: Case, hf: nn.Module) -> Iterator[None]:
    """Runs HF's float32 steps (eager softmax, QK RMSNorms) in float64 for the duration."""
    if not case.hf_fp32_steps:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        functional = torch.nn.functional
        patch.setattr(functional, "softmax", _keep_float64_softmax(functional.softmax))
        if case.norm is not None:
            forward = _float64_rms_norm(case.norm == "one_plus")
            for norm in (hf.q_norm, hf.k_norm):
                patch.setattr(norm, "forward", types.MethodType(forward, norm))
        yield


def run_hf(case: Case, hf: nn.Module, x: torch.Tensor, padded: bool, *, exact64: bool = True):
    """HF's (output, per-head weights). In float64, with ``exact64``, its float32 steps run in
    float64 and the cos/sin are float64 (see the module docstring)."""
    config = hf.config
    mask = hf_mask(case, config, x, padding(padded))
    if x.dtype == torch.float64 and exact64:
        cos_sin = float64_cos_sin(case)
        with _hf_in_float64(case, hf):
            return hf(x, position_embeddings=cos_sin, attention_mask=mask)
    return hf(x, position_embeddings=hf_cos_sin(case, config, x), attention_mask=mask)


def run_ours(ours: multihead.MultiheadAttention, x: torch.Tensor, padded: bool):
    attention_mask = padding(padded)
    key_padding_mask = None if attention_mask is None else attention_mask == 0  # True = pad
    return ours(
        x,
        x,
        x,
        key_padding_mask=key_padding_mask,
        need_weights=True,
        average_attn_weights=False,
        is_causal=True,
    )


def close(record_error, label: str, ours: torch.Tensor, theirs: torch.Tensor, tol: float):
    record_error(label, ours, theirs)
    assert ours.shape == theirs.shape, label
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=0, msg=lambda m: f"{label}: {m}")


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_hf(case, dtype, padded, record_error):
    """Outputs and per-head weights of ours equal the HF module's (and the SDPA path's output,
    need_weights=False, equals it too)."""
    hf = build_hf(case, dtype)
    ours = build_ours(case, hf)
    x = inputs(dtype)
    tol, name = TOLERANCE[dtype], DTYPE_NAME[dtype]
    with torch.no_grad():
        ref, ref_w = run_hf(case, hf, x, padded)
        out, w = run_ours(ours, x, padded)
        fast, none = ours(
            x,
            x,
            x,
            key_padding_mask=None if not padded else padding(True) == 0,
            need_weights=False,
            is_causal=True,
        )
    assert none is None
    close(record_error, f"{case.label} output {name}", out, ref, tol)
    close(record_error, f"{case.label} weights {name}", w, ref_w, tol)
    close(record_error, f"{case.label} output {name} (need_weights=False)", fast, ref, tol)
    if padded:  # the padded keys carry no weight, in either
        assert w[1, ..., LENGTH - PAD :].abs().max() == 0
    if dtype == torch.float64:
        # HF's rotary cos/sin (float32) agree with the float64 ones used for it here ...
        for hf_part, part in zip(
            hf_cos_sin(case, hf.config, x), float64_cos_sin(case), strict=True
        ):
            torch.testing.assert_close(hf_part, part, atol=1e-6, rtol=0)
        # ... and HF as shipped (float32 steps) stays within float32 rounding of ours.
        with torch.no_grad():
            shipped, _ = run_hf(case, hf, x, padded, exact64=False)
        close(record_error, f"{case.label} output f64 vs HF unpatched", out, shipped, 1e-5)


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_match_hf(case, dtype, padded, record_error):
    """d(loss)/d(input) and d(loss)/d(every HF parameter), ours mapped back to HF's layout,
    for a loss on both the output and the per-head weights."""
    hf = build_hf(case, dtype)
    ours = build_ours(case, hf)
    generator = torch.Generator().manual_seed(2)
    cotangent = torch.randn(BATCH, LENGTH, HIDDEN, generator=generator, dtype=torch.float64)
    weight_cotangent = torch.randn(BATCH, HEADS, LENGTH, LENGTH, generator=generator).double()
    cotangent, weight_cotangent = cotangent.to(dtype), weight_cotangent.to(dtype)

    x_ours = inputs(dtype).requires_grad_()
    out, w = run_ours(ours, x_ours, padded)
    ((out * cotangent).sum() + (w * weight_cotangent).sum()).backward()

    x_hf = inputs(dtype).requires_grad_()
    ref, ref_w = run_hf(case, hf, x_hf, padded)
    ((ref * cotangent).sum() + (ref_w * weight_cotangent).sum()).backward()

    tol, name = GRAD_TOLERANCE[dtype], DTYPE_NAME[dtype]
    close(record_error, f"{case.label} grad input {name}", x_ours.grad, x_hf.grad, tol)
    ours_grads = ours_grads_in_hf_layout(case, ours)
    hf_names = {param_name for param_name, _ in hf.named_parameters()}
    assert set(ours_grads) == hf_names  # every HF parameter has its counterpart
    for param_name, param in hf.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, param_name
        close(
            record_error,
            f"{case.label} grad params {name}",
            ours_grads[param_name],
            param.grad,
            tol,
        )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cache_decoding_matches_full_pass(case, record_error):
    """Prefill 4 tokens, then 3 single-token steps with our KV cache: the outputs and weights
    (over the cache's max_len columns) are the full causal pass's rows."""
    hf = build_hf(case, torch.float64)
    ours = build_ours(case, hf)
    x = inputs(torch.float64)
    with torch.no_grad():
        full, full_w = ours(x, x, x, need_weights=True, average_attn_weights=False, is_causal=True)
        cache = ours.new_cache(BATCH, LENGTH)
        steps = [x[:, :4]] + [x[:, i : i + 1] for i in range(4, LENGTH)]
        outs, weights = [], []
        for chunk in steps:
            out, w = ours(
                chunk,
                chunk,
                chunk,
                need_weights=True,
                average_attn_weights=False,
                is_causal=True,
                cache=cache,
            )
            assert w.shape == (BATCH, HEADS, chunk.shape[1], LENGTH)
            outs.append(out)
            weights.append(w)
    assert cache.length == LENGTH
    label = f"{case.label} cache decode vs full f64"
    close(record_error, f"{label} output", torch.cat(outs, dim=1), full, 1e-10)
    close(record_error, f"{label} weights", torch.cat(weights, dim=2), full_w, 1e-10)


# Each option of ours, changed: the comparison with HF must then fail (the tests above are
# sensitive to every option they claim to check).
MUTATIONS = {
    "rope_base": lambda case: dict(rope_base=case.theta * 2),
    "window": lambda case: dict(window=None) if case.sliding else dict(window=WINDOW),
    "softcap": lambda case: dict(softcap=None) if case.softcap else None,
    "qk_norm": lambda case: dict(qk_norm=False) if case.norm else None,
    "sinks": lambda case: dict(sinks=False) if case.sinks else None,
    "output_gate": lambda case: dict(output_gate=False) if case.gated else None,
}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_changed_option_breaks_the_match(case):
    hf = build_hf(case, torch.float64)
    x = inputs(torch.float64)
    with torch.no_grad():
        ref, ref_w = run_hf(case, hf, x, padded=False)
    tried = 0
    for option, mutate in MUTATIONS.items():
        overrides = mutate(case)
        if overrides is None:
            continue
        tried += 1
        reference_layer = build_ours(case, hf)
        changed = multihead.MultiheadAttention(
            HIDDEN, HEADS, dtype=torch.float64, **{**case.ours_kwargs(), **overrides}
        )
        changed.load_state_dict(reference_layer.state_dict(), strict=False)
        with torch.no_grad():
            out, w = run_ours(changed.eval(), x, padded=False)
        worst = max((out - ref).abs().max().item(), (w - ref_w).abs().max().item())
        assert worst > 1e-3, f"{case.name}: changing {option} ({overrides}) still matches HF"
    if case.norm == "one_plus":  # the (1 + w) mapping matters: w alone does not match
        tried += 1
        wrong = build_ours(case, hf)
        with torch.no_grad():
            wrong.q_norm.weight.sub_(1.0)
            wrong.k_norm.weight.sub_(1.0)
            out, _ = run_ours(wrong, x, padded=False)
        assert (out - ref).abs().max() > 1e-3
    assert tried >= 2


@pytest.mark.parametrize("option", ["sinks", "output_gate"])
def test_to_torch_refuses_options_torch_lacks(option):
    layer = multihead.MultiheadAttention(8, 2, **{option: True})
    with pytest.raises(ValueError, match=option):
        to_torch(layer)
    assert to_torch is multihead.to_torch
    plain = multihead.MultiheadAttention(8, 2)
    assert isinstance(to_torch(plain), nn.MultiheadAttention)


def test_rope_with_an_odd_head_dim_names_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        multihead.MultiheadAttention(8, 2, rope=True, head_dim=5)
