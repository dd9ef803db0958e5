"""The rolling KV cache (issue 12): O(window) memory, decoding past any length, equal to
full-cache decoding with the window mask (and the StreamingLLM rule with sink tokens)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multihead

TOL = dict(atol=1e-10, rtol=1e-10)


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = multihead.MultiheadAttention(batch_first=True, dtype=torch.float64, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return layer.eval()


def streaming_mask(length: int, window: int, sink_tokens: int) -> torch.Tensor:
    """Bool (L, L), True = masked: query i sees key j when j <= i and (i - window < j or
    j < sink_tokens), written from the rule (StreamingLLM's with sink tokens)."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return ~((j <= i) & ((i - j < window) | (j < sink_tokens)))


def full_pass(layer, x, window, sink_tokens):
    """The whole sequence at once on an otherwise identical layer without a window, under
    the explicit position mask: the oracle for every decoding schedule."""
    options = {k: v for k, v in layer.options_beyond_torch().items() if k != "window"}
    plain = multihead.MultiheadAttention(
        layer.embed_dim,
        layer.num_heads,
        bias=layer.in_proj_bias is not None,
        batch_first=True,
        dtype=torch.float64,
        rope_base=layer.rope_base,
        **options,
    )
    plain.load_state_dict(layer.state_dict())
    mask = streaming_mask(x.shape[1], window, sink_tokens)
    with torch.no_grad():
        return plain(x, x, x, attn_mask=mask, average_attn_weights=False)


def schedule(draw_sizes, total):
    chunks, start = [], 0
    for size in draw_sizes:
        if start >= total:
            break
        stop = min(total, start + size)
        chunks.append((start, stop))
        start = stop
    if start < total:
        chunks += [(t, t + 1) for t in range(start, total)]
    return chunks


@settings(max_examples=40, deadline=None)
@given(
    window=st.integers(1, 5),
    extra=st.integers(0, 3),
    sink_tokens=st.integers(0, 3),
    kv_heads=st.sampled_from([None, 2, 1]),
    rope=st.booleans(),
    sinks=st.booleans(),
    sizes=st.lists(st.integers(1, 9), max_size=6),
    length=st.integers(1, 24),
    seed=st.integers(0, 100),
)
def test_rolling_decode_equals_the_full_pass(
    window, extra, sink_tokens, kv_heads, rope, sinks, sizes, length, seed
):
    """Any chunking (prefills longer than the ring included) gives the full pass's outputs,
    and the weights of each slot are those of the position it holds."""
    layer = build(
        seed,
        embed_dim=16,
        num_heads=4,
        num_kv_heads=kv_heads,
        rope=rope,
        window=window,
        sinks=sinks,
    )
    x = torch.randn(
        2, length, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    full, full_w = full_pass(layer, x, window, sink_tokens)
    cache = layer.new_cache(2, window + extra, rolling=True, sink_tokens=sink_tokens)
    slots = sink_tokens + window + extra
    assert cache.k.shape == (2, layer.num_kv_heads, slots, 4)
    pointer = cache.k.data_ptr()
    pieces = []
    with torch.no_grad():
        for start, stop in schedule(sizes, length):
            chunk = x[:, start:stop]
            positions = torch.cat([cache.slot_positions, torch.arange(start, stop)])
            out, w = layer(chunk, chunk, chunk, cache=cache, average_attn_weights=False)
            assert w.shape == (2, 4, stop - start, slots + stop - start)
            # Each column is the weight of the position its slot holds (0 for empty slots).
            held = positions >= 0
            expected = torch.zeros_like(w)
            expected[..., held] = full_w[:, :, start:stop][..., positions[held]]
            torch.testing.assert_close(w, expected, **TOL)
            pieces.append(out)
    assert cache.length == length and cache.k.data_ptr() == pointer
    torch.testing.assert_close(torch.cat(pieces, 1), full, **TOL)


def test_decoding_goes_on_past_max_len_and_keeps_sink_tokens():
    layer = build(embed_dim=8, num_heads=2, window=3)
    cache = layer.new_cache(1, 3, rolling=True, sink_tokens=2)
    x = torch.randn(1, 40, 8, dtype=torch.float64)
    with torch.no_grad():
        for t in range(40):
            token = x[:, t : t + 1]
            layer(token, token, token, cache=cache)
    assert cache.length == 40
    # Slots 0, 1 hold the first two tokens; the ring the last three.
    assert cache.slot_positions[:2].tolist() == [0, 1]
    assert sorted(cache.slot_positions[2:].tolist()) == [37, 38, 39]
    cache.reset()
    assert cache.length == 0 and (cache.slot_positions == -1).all()


def test_rolling_memory_is_o_window():
    layer = build(embed_dim=8, num_heads=2, window=4)
    rolling = layer.new_cache(1, 4, rolling=True)
    assert rolling.k.numel() == 1 * 2 * 4 * 4
    assert isinstance(rolling, multihead.RollingKVCache) and rolling.rolling


def test_rolling_cache_compiles_once_for_every_decode_step():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer = build(embed_dim=16, num_heads=4, num_kv_heads=2, rope=True, window=4, sinks=True)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    with torch.no_grad():
        eager, traced = (layer.new_cache(1, 4, rolling=True, sink_tokens=1) for _ in range(2))
        for start, stop in [(0, 6), *[(t, t + 1) for t in range(6, 20)]]:
            chunk = x[:, start:stop]
            ref, _ = layer(chunk, chunk, chunk, cache=eager, need_weights=False)
            out, _ = compiled(chunk, chunk, chunk, cache=traced, need_weights=False)
            torch.testing.assert_close(out, ref, **TOL)
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize(
    ("layer_kwargs", "cache_kwargs", "match"),
    [
        ({}, {"rolling": True}, r"`rolling`.*window"),
        ({"window": 4}, {"rolling": True, "max_len": 3}, r"`max_len`.*at least window=4"),
        ({"window": 4}, {"sink_tokens": 2}, r"`sink_tokens`.*rolling=True"),
        ({"window": 4}, {"rolling": True, "sink_tokens": -1}, r"`sink_tokens`.*>= 0"),
    ],
)
def test_new_cache_errors(layer_kwargs, cache_kwargs, match):
    layer = build(embed_dim=8, num_heads=2, **layer_kwargs)
    kwargs = {"max_len": 4, **cache_kwargs}
    with pytest.raises(ValueError, match=match):
        layer.new_cache(1, **kwargs)


def test_rolling_cache_refuses_mods_and_another_window_and_changes_nothing():
    layer = build(embed_dim=8, num_heads=2, window=3)
    cache = layer.new_cache(1, 3, rolling=True)
    x = torch.randn(1, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        layer(x, x, x, cache=cache)
        before = (cache.k.clone(), cache.slot_positions.clone(), cache.length)
        with pytest.raises(ValueError, match=r"`cache`.*mask_mod / score_mod"):
            layer(x, x, x, cache=cache, mask_mod=multihead.mods.sliding_window(2))
        layer.window = 2
        with pytest.raises(ValueError, match=r"`cache`.*window=2.*window=3"):
            layer(x, x, x, cache=cache)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.slot_positions, before[1])
    assert cache.length == before[2]


def test_a_cache_made_under_inference_mode_decodes_under_no_grad():
    layer = build(embed_dim=8, num_heads=2, window=3)
    x = torch.randn(1, 7, 8, dtype=torch.float64)
    with torch.inference_mode():
        made = layer.new_cache(1, 3, rolling=True, sink_tokens=1)
    fresh = layer.new_cache(1, 3, rolling=True, sink_tokens=1)
    with torch.no_grad():
        for t in range(7):
            token = x[:, t : t + 1]
            a, _ = layer(token, token, token, cache=made)
            b, _ = layer(token, token, token, cache=fresh)
            assert torch.equal(a, b)
    assert not any(buffer.is_inference() for buffer in made.buffers())
    assert torch.equal(made.slot_positions, fresh.slot_positions) and made.length == 7
