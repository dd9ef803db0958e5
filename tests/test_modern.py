"""The modern options (issue 5) against the float64 formula reference, and their contracts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from modern_reference import modern_reference

import multihead
import multihead.functional

TOL = dict(atol=1e-10, rtol=1e-10)


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = multihead.MultiheadAttention(batch_first=True, dtype=torch.float64, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return layer


@st.composite
def modern_configs(draw):
    heads = draw(st.sampled_from([1, 2, 4, 6]))
    kv_heads = draw(st.sampled_from([d for d in (1, 2, 3, 4, 6) if heads % d == 0]))
    head_dim = draw(st.sampled_from([2, 4]))
    # Issue 12: head_dim apart from embed_dim / num_heads (then E is free), sinks, the gate.
    decoupled = draw(st.booleans())
    return dict(
        embed_dim=draw(st.sampled_from([3, 5, 8])) if decoupled else heads * head_dim,
        head_dim=head_dim if decoupled else None,
        sinks=draw(st.booleans()),
        output_gate=draw(st.booleans()),
        num_heads=heads,
        num_kv_heads=kv_heads,
        bias=draw(st.booleans()),
        rope=draw(st.booleans()),
        rope_base=draw(st.sampled_from([10000.0, 100.0])),
        window=draw(st.none() | st.integers(1, 4)),
        qk_norm=draw(st.booleans()),
        softcap=draw(st.none() | st.sampled_from([0.5, 5.0])),
        kdim=draw(st.none() | st.integers(1, 5)),
    )


@settings(max_examples=120)
@given(
    kwargs=modern_configs(),
    length=st.integers(1, 6),
    batch=st.integers(1, 2),
    is_causal=st.booleans(),
    packed=st.booleans(),
    padding=st.booleans(),
    need_weights=st.booleans(),
    average=st.booleans(),
    small_calls_explicit=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_matches_formula_reference(
    kwargs,
    length,
    batch,
    is_causal,
    packed,
    padding,
    need_weights,
    average,
    small_calls_explicit,
    seed,
    count_case,
    record_error,
):
    layer = build(seed, **kwargs)
    gen = torch.Generator().manual_seed(seed + 2)
    e = layer.embed_dim
    x = torch.randn(batch, length, e, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(batch, length, layer.kdim, generator=gen, dtype=torch.float64)
    key.requires_grad_()
    value = torch.randn(batch, length, layer.vdim, generator=gen, dtype=torch.float64)
    value.requires_grad_()
    if layer.in_proj_weight is not None and packed:
        key = value = x  # self-attention
    segments = None
    if packed and key is x:
        segments = torch.sort(torch.randint(0, 3, (batch, length), generator=gen), dim=1).values
    kpm = (torch.rand(batch, length, generator=gen) < 0.3) if padding else None
    with pytest.MonkeyPatch.context() as mp:
        if not small_calls_explicit:
            mp.setattr(multihead.functional, "SMALL_SCORES", 0)
        out, w = layer(
            x,
            key,
            value,
            key_padding_mask=kpm,
            need_weights=need_weights,
            average_attn_weights=average,
            is_causal=is_causal,
            segment_ids=segments,
        )
    ref, ref_w = modern_reference(
        layer, x, key, value, key_padding_mask=kpm, is_causal=is_causal, segment_ids=segments
    )
    count_case("modern options vs formula")
    torch.testing.assert_close(out, ref, **TOL)
    record_error("modern: output", out, ref)
    if need_weights:
        torch.testing.assert_close(w, ref_w.mean(1) if average else ref_w, **TOL)
    leaves = [t for t in {id(t): t for t in (x, key, value)}.values()]
    params = list(layer.parameters())
    g = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves + params, g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, leaves + params, g, allow_unused=True)
    for a, b in zip(grads, ref_grads, strict=True):
        if a is None or b is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, **TOL)
        record_error("modern: gradients", a, b)


@pytest.mark.parametrize("is_causal", [False, True])
def test_window_equals_the_explicit_banded_mask(is_causal):
    windowed = build(window=3, embed_dim=8, num_heads=2)
    plain = build(embed_dim=8, num_heads=2)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    if is_causal:
        banded = (j > i) | (i - j >= 3)
    else:
        banded = (i - j).abs() >= 3
    out, w = windowed(x, x, x, is_causal=is_causal)
    ref, ref_w = plain(x, x, x, attn_mask=banded)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)


def test_segment_ids_equal_the_explicit_block_diagonal_mask():
    layer = build(embed_dim=8, num_heads=2)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 9]])
    out, w = layer(x, x, x, segment_ids=segments, is_causal=True, average_attn_weights=False)
    block = segments[:, :, None] != segments[:, None, :]  # (N, L, L)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    per_head = (block | causal).repeat_interleave(2, dim=0)  # (N * H, L, L), batch-major
    ref, ref_w = layer(x, x, x, attn_mask=per_head, average_attn_weights=False)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)
    # Packed rows equal the documents run one at a time.
    alone, _ = layer(x[:1, 3:5], x[:1, 3:5], x[:1, 3:5], is_causal=True)
    torch.testing.assert_close(out[:1, 3:5], alone, **TOL)


def test_mqa_and_gqa_layout_and_parameter_shapes():
    gqa = multihead.MultiheadAttention(32, 8, num_kv_heads=2)
    assert gqa.in_proj_weight.shape == (32 + 2 * 8, 32)
    assert gqa.in_proj_bias.shape == (48,)
    mqa = multihead.MultiheadAttention(32, 8, num_kv_heads=1, kdim=5, vdim=7, add_bias_kv=True)
    assert mqa.k_proj_weight.shape == (4, 5) and mqa.v_proj_weight.shape == (4, 7)
    assert mqa.bias_k.shape == (1, 1, 4)
    default = multihead.MultiheadAttention(32, 8)
    assert list(default.state_dict()) == list(torch.nn.MultiheadAttention(32, 8).state_dict())


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize(
    "issue12",
    [{}, {"sinks": True, "output_gate": True, "head_dim": 6}],
    ids=["torch-heads", "sinks-gate-head_dim"],
)
def test_kv_cache_decode_equals_one_causal_pass(kv_heads, rope, window, issue12):
    layer = build(
        embed_dim=16, num_heads=4, num_kv_heads=kv_heads, rope=rope, window=window, **issue12
    )
    layer.eval()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        full, full_w = layer(x, x, x, is_causal=True)
        cache = layer.new_cache(2, 12)
        pieces = []
        for start, stop in [(0, 4), (4, 6), (6, 7), (7, 8), (8, 9)]:  # chunked prefill, decode
            chunk = x[:, start:stop]
            out, w = layer(chunk, chunk, chunk, cache=cache)
            assert w.shape == (2, stop - start, 12)  # over the cache's static max_len
            torch.testing.assert_close(w[..., :9], full_w[:, start:stop], **TOL)
            assert (w[..., stop:] == 0).all()
            pieces.append(out)
        assert cache.length == 9
    torch.testing.assert_close(torch.cat(pieces, 1), full, **TOL)


def test_kv_cache_keeps_static_shapes_and_resets():
    layer = build(embed_dim=8, num_heads=2).eval()
    cache = layer.new_cache(1, 5)
    assert cache.k.shape == (1, 2, 5, 4) and cache.v.shape == (1, 2, 5, 4)
    assert "k" not in layer.state_dict() and list(cache.state_dict()) == []
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        first, _ = layer(x, x, x, cache=cache, need_weights=False)
        pointer = cache.k.data_ptr()
        cache.reset()
        again, _ = layer(x, x, x, cache=cache, need_weights=False)
    assert cache.k.data_ptr() == pointer
    torch.testing.assert_close(first, again, **TOL)


CACHE_ERRORS = [
    ("full", dict(tokens=4), ValueError, r"`cache`.*room for 4 more tokens.*holds 3 of max_len=5"),
    ("batch", dict(batch=2), ValueError, r"`cache`.*batch size 2"),
    ("grad", dict(grad=True), ValueError, r"`cache`.*torch.no_grad\(\)"),
    ("mask", dict(mask=True), ValueError, r"`cache`.*no key_padding_mask"),
    ("type", dict(cache="x"), TypeError, r"`cache`.*KVCache"),
]


@pytest.mark.parametrize(
    ("case", "error", "match"), [c[1:] for c in CACHE_ERRORS], ids=[c[0] for c in CACHE_ERRORS]
)
def test_cache_misuse_is_reported_and_changes_nothing(case, error, match):
    layer = build(embed_dim=8, num_heads=2).eval()
    cache = layer.new_cache(1, 5)
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        layer(x, x, x, cache=cache)
    before = cache.k.clone()
    tokens = case.get("tokens", 1)
    y = torch.randn(case.get("batch", 1), tokens, 8, dtype=torch.float64)
    kwargs = dict(cache=case.get("cache", cache))
    if case.get("mask"):
        kwargs["key_padding_mask"] = torch.zeros(1, tokens, dtype=torch.bool)
    with torch.set_grad_enabled(case.get("grad", False)), pytest.raises(error, match=match):
        layer(y, y, y, **kwargs)
    assert cache.length == 3 and torch.equal(cache.k, before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_kv_heads=3), ValueError, r"`num_kv_heads`.*divisor of num_heads=4.*3"),
        (dict(num_kv_heads=0), ValueError, r"`num_kv_heads`.*positive"),
        (dict(window=0), ValueError, r"`window`.*positive integer.*window=0"),
        (dict(window=1.5), TypeError, r"`window`.*window=1.5"),
        (dict(softcap=0.0), ValueError, r"`softcap`.*positive.*softcap=0.0"),
        (dict(softcap=-1), ValueError, r"`softcap`.*softcap=-1"),
        (dict(softcap="3"), TypeError, r"`softcap`.*'3'"),
        (dict(rope_base=0.0), ValueError, r"`rope_base`.*finite number >= 1"),
    ],
)
def test_constructor_errors_for_the_modern_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        multihead.MultiheadAttention(16, 4, **kwargs)


def test_rope_needs_an_even_head_dim():
    with pytest.raises(ValueError, match=r"`head_dim`.*even head_dim.*rope=True.*head_dim=3"):
        multihead.MultiheadAttention(6, 2, rope=True)
    with pytest.raises(ValueError, match=r"`head_dim`.*even head_dim.*rope=True.*head_dim=5"):
        multihead.MultiheadAttention(8, 2, rope=True, head_dim=5)


@pytest.mark.parametrize(
    ("segment_ids", "error", "match"),
    [
        (torch.zeros(2, 5, dtype=torch.float32), TypeError, r"`segment_ids`.*integer dtype"),
        (torch.zeros(2, 4, dtype=torch.int64), ValueError, r"`segment_ids`.*\(2, 5\) \(N, L\)"),
        ([[0] * 5] * 2, TypeError, r"`segment_ids`.*torch.Tensor"),
    ],
)
def test_segment_ids_errors(segment_ids, error, match):
    layer = multihead.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(error, match=match):
        layer(x, x, x, segment_ids=segment_ids)


def test_segment_ids_need_self_attention():
    layer = multihead.MultiheadAttention(8, 2, batch_first=True)
    with pytest.raises(ValueError, match=r"`segment_ids`.*S == L"):
        layer(
            torch.randn(1, 3, 8),
            torch.randn(1, 4, 8),
            torch.randn(1, 4, 8),
            segment_ids=torch.zeros(1, 3, dtype=torch.long),
        )


def test_qk_norm_registers_learnable_scales_after_torchs_parameters():
    layer = multihead.MultiheadAttention(16, 4, qk_norm=True)
    names = list(layer.state_dict())
    assert names[-2:] == ["q_norm.weight", "k_norm.weight"]
    assert layer.q_norm.weight.shape == (4,) and layer.q_norm.eps == 1e-6


def test_defaults_keep_torchs_initialisation():
    torch.manual_seed(3)
    ours = multihead.MultiheadAttention(
        16, 4, qk_norm=True, rope=True, window=4, softcap=30.0, sinks=True, output_gate=True
    )
    torch.manual_seed(3)
    theirs = torch.nn.MultiheadAttention(16, 4)
    for name, p in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], p), name


def test_kv_cache_decode_compiles_once_for_every_step():
    """Static shapes and a tensor fill level: torch.compile traces one graph for the prefill
    and one for all decode steps, and matches eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer = build(embed_dim=16, num_heads=4, num_kv_heads=2, rope=True).eval()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    with torch.no_grad():
        eager_cache, compiled_cache = layer.new_cache(1, 20), layer.new_cache(1, 20)
        for start, stop in [(0, 6), *[(t, t + 1) for t in range(6, 20)]]:
            chunk = x[:, start:stop]
            ref, _ = layer(chunk, chunk, chunk, cache=eager_cache, need_weights=False)
            out, _ = compiled(chunk, chunk, chunk, cache=compiled_cache, need_weights=False)
            torch.testing.assert_close(out, ref, **TOL)
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("is_causal", [False, True])
def test_window_with_fewer_keys_than_queries_leaves_some_queries_without_keys(is_causal):
    layer = build(embed_dim=8, num_heads=2, window=2)
    q, kv = torch.randn(1, 6, 8, dtype=torch.float64), torch.randn(1, 2, 8, dtype=torch.float64)
    out, w = layer(q, kv, kv, is_causal=is_causal)
    ref, ref_w = modern_reference(layer, q, kv, kv, is_causal=is_causal)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(w, ref_w.mean(1), **TOL)
    assert (w[0, 5] == 0).all()  # query 5 is 4+ positions from both keys


@pytest.mark.parametrize("which", ["key", "value", "both", "equal copies"])
def test_cache_refuses_keys_and_values_other_than_the_query(which):
    """The cache holds the new tokens' own keys and values: a key or value from another
    tensor (which would silently become causal cross-attention over the cache) is refused
    with an error naming `cache`, and the cache is unchanged."""
    layer = build(embed_dim=16, num_heads=4).eval()
    cache = layer.new_cache(1, 8)
    x, other = (
        torch.randn(1, 3, 16, dtype=torch.float64),
        torch.randn(1, 3, 16, dtype=torch.float64),
    )
    key, value = {
        "key": (other, x),
        "value": (x, other),
        "both": (other, other),
        "equal copies": (x.clone(), x.clone()),
    }[which]
    with torch.no_grad(), pytest.raises(ValueError, match=r"`cache`.*query itself"):
        layer(x, key, value, cache=cache)
    assert cache.length == 0 and not cache.k.any()
