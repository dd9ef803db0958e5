"""FlexAttention-style mods (issue 10): ``multihead.mods`` and the ``mask_mod`` / ``score_mod``
arguments of :func:`multihead.attention` and :class:`multihead.MultiheadAttention`.

Oracles: the dense float64 reference of tests/mod_reference.py (written from the formula, with
its own copies of the shipped mods), torch's own ``flex_attention`` (forward only: its backward
does not run on CPU), Hugging Face's T5 buckets and BLOOM's ALiBi slopes, and the layer's
existing options (window=, segment_ids=, softcap=, is_causal=).
"""

from __future__ import annotations

import math
import warnings

import mod_reference as ref
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import multihead
from multihead import mods

F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)
HEADS = 4


def close(ours, theirs, tol=TOL):
    torch.testing.assert_close(ours, theirs, **tol)


def randn(gen, *shape, dtype=F64, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=dtype) * scale


# --- mod specs: hypothesis draws a description; build_* turn it into (ours, reference) ------

LENGTHS = st.one_of(st.integers(1, 12), st.integers(100, 300))  # some past one 128-wide tile

MASK_LEAVES = st.one_of(
    st.just(("causal",)),
    st.tuples(st.just("window"), st.integers(1, 150), st.booleans()),
    st.tuples(st.just("document"), st.integers(1, 6), st.sampled_from(["1d", "2d", "shuffled"])),
    st.tuples(st.just("prefix"), st.integers(0, 200), st.booleans()),
    # hides every key of the rows q_idx % period == period - 1 (fully masked rows)
    st.tuples(st.just("rows_hidden"), st.integers(2, 5)),
    # depends on b and the query head h
    st.tuples(st.just("bh"), st.integers(2, 5)),
    # a captured random bool table indexed by all four indices
    st.tuples(st.just("table"), st.floats(0.05, 0.95)),
)
MASK_SPECS = (
    st.none() | MASK_LEAVES | st.tuples(st.sampled_from(["and", "or"]), MASK_LEAVES, MASK_LEAVES)
)

SCORE_LEAVES = st.one_of(
    st.just(("alibi",)),
    st.tuples(st.just("softcap"), st.sampled_from([0.5, 2.0, 30.0])),
    # (num_buckets, max_distance) with max_distance > num_buckets / 2, as T5's log needs
    st.tuples(
        st.just("rpb"),
        st.sampled_from([(8, 16), (8, 100), (32, 40), (32, 128)]),
        st.booleans(),
    ),
    st.just(("table",)),
)
SCORE_SPECS = st.none() | SCORE_LEAVES | st.tuples(st.just("chain"), SCORE_LEAVES, SCORE_LEAVES)


def uses(spec, name: str) -> bool:
    """Whether ``spec`` (a nested tuple) has a leaf called ``name``."""
    if spec is None:
        return False
    if spec[0] in ("and", "or", "chain"):
        return uses(spec[1], name) or uses(spec[2], name)
    return spec[0] == name


def document_ids(gen, n: int, length: int, docs: int, kind: str):
    if kind == "shuffled":  # any integer labels, not runs: the tile bounds must still hold
        return torch.randint(0, docs, (n, length), generator=gen)
    starts = torch.rand(n, length, generator=gen) < docs / max(length, 1)
    ids = starts.long().cumsum(-1) + 7  # runs of equal ids (packed documents)
    return ids[0] if kind == "1d" else ids


def build_mask(spec, gen, n: int, h: int, positions: int):
    """``(ours, reference)`` mask_mods for ``spec``; ``positions`` bounds q_idx and kv_idx."""
    if spec is None:
        return None, None
    kind = spec[0]
    if kind in ("and", "or"):
        a, ra = build_mask(spec[1], gen, n, h, positions)
        b, rb = build_mask(spec[2], gen, n, h, positions)
        if kind == "and":
            return mods.and_masks(a, b), ref.ref_and(ra, rb)
        return mods.or_masks(a, b), ref.ref_or(ra, rb)
    if kind == "causal":
        return mods.causal, ref.ref_causal
    if kind == "window":
        _, window, causal = spec
        return (
            mods.sliding_window(window, causal=causal),
            ref.ref_sliding_window(window, causal=causal),
        )
    if kind == "document":
        ids = document_ids(gen, n, positions, spec[1], spec[2])
        return mods.document(ids), ref.ref_document(ids.clone())
    if kind == "prefix":
        _, prefix, as_tensor = spec
        if as_tensor:
            prefix = torch.randint(0, prefix + 1, (n,), generator=gen)
            return mods.prefix_lm(prefix), ref.ref_prefix_lm(prefix.clone())
        return mods.prefix_lm(prefix), ref.ref_prefix_lm(prefix)
    if kind == "rows_hidden":
        period = spec[1]

        def rows_hidden(b, h, q_idx, kv_idx):
            return q_idx % period != period - 1  # (1, 1, B, 1): broadcasts to the tile

        return rows_hidden, rows_hidden
    if kind == "bh":
        m = spec[1]

        def bh(b, h, q_idx, kv_idx):
            return (b * 7 + h * 3 + q_idx + 2 * kv_idx) % m != 0

        return bh, bh
    if kind == "table":
        table = torch.rand(n, h, positions, positions, generator=gen) < spec[1]

        def table_mod(b, h, q_idx, kv_idx):
            return table[b, h, q_idx, kv_idx]

        return table_mod, table_mod
    raise AssertionError(spec)


def build_score(spec, gen, n: int, h: int, positions: int):
    """``(ours, reference, captured tensors that require grad)`` for a score_mod ``spec``."""
    if spec is None:
        return None, None, []
    kind = spec[0]
    if kind == "chain":
        a, ra, la = build_score(spec[1], gen, n, h, positions)
        b, rb, lb = build_score(spec[2], gen, n, h, positions)

        def chain(score, *idx):
            return b(a(score, *idx), *idx)

        def ref_chain(score, *idx):
            return rb(ra(score, *idx), *idx)

        return chain, ref_chain, la + lb
    if kind == "alibi":
        # learnable slopes: the paper's, perturbed so heads differ in more than a power of 2
        slopes = mods.alibi_slopes(h).to(F64) * (1 + 0.1 * torch.rand(h, generator=gen, dtype=F64))
        slopes.requires_grad_()
        return mods.alibi(slopes), ref.ref_alibi(slopes), [slopes]
    if kind == "softcap":
        return mods.tanh_softcap(spec[1]), ref.ref_tanh_softcap(spec[1]), []
    if kind == "rpb":
        _, (buckets, distance), bidirectional = spec
        bias = mods.RelativePositionBias(
            h, num_buckets=buckets, max_distance=distance, bidirectional=bidirectional, dtype=F64
        )
        with torch.no_grad():
            bias.weight.copy_(randn(gen, buckets, h))
        reference = ref.ref_relative_bias(
            bias.weight, bidirectional=bidirectional, max_distance=distance
        )
        return bias, reference, [bias.weight]
    if kind == "table":
        table = randn(gen, h, positions, positions, scale=0.5).requires_grad_()

        def table_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx, kv_idx] * (b + 1)

        return table_mod, table_mod, [table]
    raise AssertionError(spec)


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, materialize_grads=True)


# --- the functional core against the dense reference -----------------------------------------


@st.composite
def functional_cases(draw):
    mask_spec = draw(MASK_SPECS)
    q_len = draw(LENGTHS)
    # document ids label positions shared by queries and keys (self-attention)
    k_len = q_len if uses(mask_spec, "document") else draw(LENGTHS)
    return dict(
        n=draw(st.integers(1, 2)),
        kv_heads=draw(st.sampled_from([1, 2, 4])),
        q_len=q_len,
        k_len=k_len,
        d=draw(st.sampled_from([4, 8])),
        mask_spec=mask_spec,
        score_spec=draw(SCORE_SPECS),
        is_causal=draw(st.booleans()),
        softcap=draw(st.sampled_from([None, None, 3.0])),
        additive=draw(st.sampled_from([None, "float", "float_grad", "padding"])),
        need_weights=draw(st.booleans()),
        average=draw(st.booleans()),
        grad=draw(st.sampled_from(["none", "qkv", "captured_only"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def additive_mask(kind, gen, n, h, q_len, k_len):
    if kind is None:
        return None
    if kind == "padding":  # -inf on some keys per batch row; every key of row 0 sometimes
        hidden = torch.rand(n, 1, 1, k_len, generator=gen) < 0.3
        if torch.rand((), generator=gen) < 0.3:
            hidden[0] = True
        return torch.zeros(n, 1, 1, k_len, dtype=F64).masked_fill(hidden, float("-inf"))
    shape = (1, h, q_len, k_len) if torch.rand((), generator=gen) < 0.5 else (n, 1, q_len, k_len)
    return randn(gen, *shape, scale=0.5).requires_grad_(kind == "float_grad")


@settings(max_examples=40, deadline=None)
@given(case=functional_cases())
def test_functional_matches_dense_reference(case):
    """Outputs, weights (averaged and per head) and gradients of q, k, v, the additive mask and
    every captured tensor (ALiBi slopes, RelativePositionBias.weight, a bias table), float64,
    to 1e-10, over mods, compositions, GQA, ragged tiles and fully masked rows."""
    gen = torch.Generator().manual_seed(case["seed"])
    n, hkv, q_len, k_len, d = case["n"], case["kv_heads"], case["q_len"], case["k_len"], case["d"]
    positions = max(q_len, k_len)
    q = randn(gen, n, HEADS, q_len, d)
    k = randn(gen, n, hkv, k_len, d)
    v = randn(gen, n, hkv, k_len, d)
    mask_mod, ref_mask_mod = build_mask(case["mask_spec"], gen, n, HEADS, positions)
    score_mod, ref_score_mod, captured = build_score(case["score_spec"], gen, n, HEADS, positions)
    mask = additive_mask(case["additive"], gen, n, HEADS, q_len, k_len)
    training = case["grad"] != "none"
    if case["grad"] == "qkv":
        for t in (q, k, v):
            t.requires_grad_()
    options = dict(is_causal=case["is_causal"], softcap=case["softcap"])
    with torch.set_grad_enabled(training):
        out, weights = multihead.attention(
            q,
            k,
            v,
            mask,
            need_weights=case["need_weights"],
            average_weights=case["average"],
            mask_mod=mask_mod,
            score_mod=score_mod,
            **options,
        )
        ref_out, ref_weights = ref.reference_attention(
            q, k, v, mask, mask_mod=ref_mask_mod, score_mod=ref_score_mod, **options
        )
    assert out.shape == (n, HEADS, q_len, d)
    close(out, ref_out)
    if not case["need_weights"]:
        assert weights is None
    else:
        close(weights, ref_weights.mean(1) if case["average"] else ref_weights)
    leaves = [t for t in (q, k, v, mask, *captured) if t is not None and t.requires_grad]
    if not training or not leaves:
        return
    assert out.requires_grad, "an input requires grad but the output is off the graph"
    g_out = randn(gen, *out.shape)
    loss, ref_loss = (out * g_out).sum(), (ref_out * g_out).sum()
    if case["need_weights"]:
        g_w = randn(gen, *weights.shape)
        loss = loss + (weights * g_w).sum()
        ref_w = ref_weights.mean(1) if case["average"] else ref_weights
        ref_loss = ref_loss + (ref_w * g_w).sum()
    for ours, theirs in zip(grads(loss, leaves), grads(ref_loss, leaves), strict=True):
        assert torch.isfinite(ours).all()
        close(ours, theirs)


def test_order_softcap_then_score_mod_then_mask():
    """The order is logits -> softcap= -> score_mod -> + mask -> mask_mod: with large logits,
    a cap, a score_mod and an additive mask, every other order gives other numbers (checked
    here), and ours equals the reference's."""
    gen = torch.Generator().manual_seed(37)
    q, k, v = (
        randn(gen, 2, 4, 30, 8, scale=2.0),
        randn(gen, 2, 2, 40, 8, scale=2.0),
        randn(gen, 2, 2, 40, 8),
    )
    slopes = torch.tensor([0.5, 0.2, 0.1, 0.05], dtype=F64)
    mask = randn(gen, 2, 1, 30, 40)
    window = mods.sliding_window(12, causal=False)
    out, w = multihead.attention(
        q,
        k,
        v,
        mask,
        softcap=2.0,
        score_mod=mods.alibi(slopes),
        mask_mod=window,
        need_weights=True,
        average_weights=False,
    )
    expected = ref.reference_attention(
        q,
        k,
        v,
        mask,
        softcap=2.0,
        score_mod=ref.ref_alibi(slopes),
        mask_mod=ref.ref_sliding_window(12, causal=False),
    )
    close(out, expected[0])
    close(w, expected[1])
    cap = ref.ref_tanh_softcap(2.0)

    def alibi_then_cap(score, *idx):
        return cap(ref.ref_alibi(slopes)(score, *idx), *idx)

    def cap_after_mask(score, *idx):  # the mask added inside, before the cap
        return cap(score + mask, *idx)

    wrong_orders = [
        ref.reference_attention(q, k, v, mask, score_mod=alibi_then_cap, mask_mod=window)[0],
        ref.reference_attention(
            q, k, v, None, softcap=2.0, score_mod=cap_after_mask, mask_mod=window
        )[0],
    ]
    for wrong in wrong_orders:
        assert (wrong - out).abs().max() > 1e-3


@pytest.mark.parametrize(("q_len", "k_len"), [(300, 300), (260, 300), (300, 200)])
def test_tile_skipping_at_tile_edges(q_len, k_len):
    """Block skipping decides per 128-wide tile whether a shipped mod hides or shows it
    entirely; windows, prefixes and document edges placed on and next to tile edges (and a
    sweep) must give the reference's weights exactly where a wrong bound would not."""
    gen = torch.Generator().manual_seed(41)
    q, k, v = randn(gen, 1, 2, q_len, 4), randn(gen, 1, 1, k_len, 4), randn(gen, 1, 1, k_len, 4)
    edges = {1, 2, 43, 127, 128, 129, 171, 172, 255, 256, 257, 299, 300}
    cases = []
    for w in sorted(edges | set(range(3, 300, 41))):
        for causal in (True, False):
            cases.append(
                (
                    mods.sliding_window(w, causal=causal),
                    ref.ref_sliding_window(w, causal=causal),
                )
            )
    for p in sorted(edges | {0}):
        cases.append((mods.prefix_lm(p), ref.ref_prefix_lm(p)))
    cases.append((mods.causal, ref.ref_causal))
    if q_len == k_len:
        ids = torch.zeros(q_len, dtype=torch.long)
        for edge in (127, 128, 129, 256):
            ids[edge:] += 1  # documents that start on and around tile edges
        cases.append((mods.document(ids), ref.ref_document(ids)))
        cases.append(
            (
                mods.or_masks(mods.document(ids), mods.sliding_window(3)),
                ref.ref_or(ref.ref_document(ids), ref.ref_sliding_window(3)),
            )
        )
    cases.append(
        (
            mods.and_masks(mods.prefix_lm(128), mods.sliding_window(129, causal=False)),
            ref.ref_and(ref.ref_prefix_lm(128), ref.ref_sliding_window(129, causal=False)),
        )
    )
    with torch.no_grad():
        for mod, ref_mod in cases:
            out, w = multihead.attention(
                q, k, v, mask_mod=mod, need_weights=True, average_weights=False
            )
            ref_out, ref_w = ref.reference_attention(q, k, v, mask_mod=ref_mod)
            assert torch.equal(w != 0, ref_w != 0), repr(mod)
            close(w, ref_w)
            close(out, ref_out)


def test_fully_masked_rows_are_zero_not_nan():
    """A mask_mod that hides every key of some rows: those rows' outputs, weights and
    gradients are zero and finite; the other rows still attend."""
    gen = torch.Generator().manual_seed(3)
    q = randn(gen, 2, HEADS, 150, 8).requires_grad_()
    k = randn(gen, 2, 2, 140, 8).requires_grad_()
    v = randn(gen, 2, 2, 140, 8).requires_grad_()

    def hide_odd_rows(b, h, q_idx, kv_idx):
        return (q_idx % 2 == 0) & (kv_idx >= 0)

    out, w = multihead.attention(
        q, k, v, mask_mod=hide_odd_rows, need_weights=True, average_weights=False
    )
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (out[:, :, 1::2] == 0).all() and (w[:, :, 1::2] == 0).all()
    close(w[:, :, 0::2].sum(-1), torch.ones(2, HEADS, 75, dtype=F64))
    gq, gk, gv = torch.autograd.grad(out.sum() + w.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (gq, gk, gv))
    assert (gq[:, :, 1::2] == 0).all()


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("length", [1, 150])
def test_every_key_hidden_keeps_the_graph(need_weights, length):
    """A mask_mod that hides every key of every row: zero output (and weights), still on the
    autograd graph like the additive-mask equivalent, so a training step's backward runs and
    gives zero gradients instead of raising."""
    gen = torch.Generator().manual_seed(43)
    q = randn(gen, 1, 2, length, 4).requires_grad_()
    k = randn(gen, 1, 1, length, 4).requires_grad_()
    v = randn(gen, 1, 1, length, 4).requires_grad_()
    out, w = multihead.attention(
        q, k, v, mask_mod=lambda b, h, q_idx, kv_idx: kv_idx < 0, need_weights=need_weights
    )
    hidden = torch.full((1, 1, length, length), float("-inf"), dtype=F64)
    out_additive, _ = multihead.attention(q, k, v, hidden)
    assert out_additive.requires_grad  # the existing behaviour for the same empty rows
    assert (out == 0).all()
    assert out.requires_grad
    loss = out.sum() + (w.sum() if need_weights else 0)
    for g in grads(loss, (q, k, v)):
        assert (g == 0).all()


def test_score_mod_gets_query_head_and_batch_index_with_gqa():
    """h is the query head (not the kv head) and b the batch row: a mask_mod hiding head 1
    of batch row 1 only zeroes exactly that (N, H) slice, with 2 kv heads for 4 query heads."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = randn(gen, 2, 4, 5, 4), randn(gen, 2, 2, 6, 4), randn(gen, 2, 2, 6, 4)

    def hide(b, h, q_idx, kv_idx):
        return ~((b == 1) & (h == 1))

    out, w = multihead.attention(q, k, v, mask_mod=hide, need_weights=True, average_weights=False)
    assert (out[1, 1] == 0).all() and (w[1, 1] == 0).all()
    for b, h in [(0, 0), (0, 1), (1, 0), (1, 2), (1, 3)]:
        close(w[b, h].sum(-1), torch.ones(5, dtype=F64))

    def per_head(score, b, h, q_idx, kv_idx):
        return score + 10.0 * (kv_idx == h + 2 * b)  # head h of row b favours key h + 2b

    _, w = multihead.attention(
        q, k, v, score_mod=per_head, need_weights=True, average_weights=False
    )
    favoured = w.argmax(-1)  # (N, H, L)
    expected = torch.arange(4).view(1, 4, 1) + 2 * torch.arange(2).view(2, 1, 1)
    assert torch.equal(favoured, expected.clamp(max=5).expand(2, 4, 5))


def test_user_mods_see_what_flex_gives_them_once_per_tile():
    """A user's mods are called as flex calls them, through torch.vmap on 0-dim int64 tensors
    (score a 0-dim float64), a few times per tile, not once per element; the result equals
    the reference over every (query, key) pair."""
    gen = torch.Generator().manual_seed(5)
    n, q_len, k_len = 2, 300, 270
    q, k, v = randn(gen, n, HEADS, q_len, 4), randn(gen, n, 2, k_len, 4), randn(gen, n, 2, k_len, 4)
    calls = []

    def band(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + 7

    def bias(score, b, h, q_idx, kv_idx):
        return score + 0.01 * h - 0.001 * (q_idx - kv_idx).abs()

    def mask_mod(b, h, q_idx, kv_idx):
        calls.append("mask")
        for t in (b, h, q_idx, kv_idx):
            assert t.dtype == torch.int64 and t.dim() == 0
        return band(b, h, q_idx, kv_idx)

    def score_mod(score, b, h, q_idx, kv_idx):
        calls.append("score")
        assert score.dim() == 0 and score.dtype == F64
        return bias(score, b, h, q_idx, kv_idx)

    with torch.no_grad():
        out, _ = multihead.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod)
    assert 0 < len(calls) < 100, f"{len(calls)} calls: not a few per tile"
    close(out, ref.reference_attention(q, k, v, mask_mod=band, score_mod=bias)[0])


def test_shipped_mods_take_broadcast_index_views():
    """The shipped mods (``broadcast_safe``) are called once on broadcast views b (N,1,1,1),
    h (1,H,1,1), q_idx (1,1,B,1), kv_idx (1,1,1,C), and agree with the per-element call."""
    seen = []

    def recording(b, h, q_idx, kv_idx):
        seen.append(tuple(t.shape for t in (b, h, q_idx, kv_idx)))
        return mods.sliding_window(3)(b, h, q_idx, kv_idx)

    recording.broadcast_safe = True
    grid = (torch.arange(2), torch.arange(3), torch.arange(5, 9), torch.arange(6))
    broadcast = mods.on_grid(recording, *grid)
    assert seen == [((2, 1, 1, 1), (1, 3, 1, 1), (1, 1, 4, 1), (1, 1, 1, 6))]
    per_element = mods.on_grid(lambda *idx: mods.sliding_window(3)(*idx), *grid)
    assert per_element.shape == (2, 3, 4, 6)
    assert torch.equal(broadcast.expand(2, 3, 4, 6), per_element)


def test_flex_semantics_for_chained_indexing_and_reductions():
    """What flex's per-element calls mean, here too: ``t[h][q_idx]`` indexes one element, and
    a reduction over an index (``q_idx.max()``) is that index itself."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (
        randn(gen, 2, HEADS, 150, 4),
        randn(gen, 2, HEADS, 140, 4),
        randn(gen, 2, HEADS, 140, 4),
    )
    table = randn(gen, HEADS, 150)
    out, _ = multihead.attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s + table[h][qi])
    close(out, multihead.attention(q, k, v, mask=table[None, :, :, None].expand(2, -1, -1, 140))[0])
    positions_q, positions_k = torch.arange(150)[:, None], torch.arange(140)[None, :]
    # int64 / int64 is float32 in torch, in flex's calls as in this grid.
    bias = -((positions_q - positions_k).abs() / (positions_q + 1)).to(F64)
    out, _ = multihead.attention(
        q, k, v, score_mod=lambda s, b, h, qi, ki: s - (qi - ki).abs() / (qi.max() + 1)
    )
    close(out, multihead.attention(q, k, v, mask=bias)[0])


def test_dropout_applies_to_the_weights_after_the_mods():
    """With dropout, every returned weight is 0 or the reference weight / (1 - p), the hidden
    keys stay 0, and the output is exactly those weights times v."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = randn(gen, 2, 4, 20, 4), randn(gen, 2, 2, 20, 4), randn(gen, 2, 2, 20, 4)
    slopes = mods.alibi_slopes(4).to(F64)
    p = 0.4
    torch.manual_seed(0)
    out, w = multihead.attention(
        q,
        k,
        v,
        dropout_p=p,
        need_weights=True,
        average_weights=False,
        mask_mod=mods.sliding_window(5),
        score_mod=mods.alibi(slopes),
    )
    _, ref_w = ref.reference_attention(
        q, k, v, mask_mod=ref.ref_sliding_window(5), score_mod=ref.ref_alibi(slopes)
    )
    kept = w != 0
    assert 0 < kept.sum() < (ref_w != 0).sum(), "dropout dropped nothing, or everything"
    assert not (kept & (ref_w == 0)).any()
    close(w[kept], ref_w[kept] / (1 - p))
    close(out, w @ v.repeat_interleave(2, dim=1))


# --- gradcheck ------------------------------------------------------------------------------


def _tiny(seed=7):
    gen = torch.Generator().manual_seed(seed)
    q = randn(gen, 1, 2, 3, 2).requires_grad_()
    k = randn(gen, 1, 1, 4, 2).requires_grad_()
    v = randn(gen, 1, 1, 4, 2).requires_grad_()
    table = randn(gen, 2, 3, 4, scale=0.5).requires_grad_()
    return q, k, v, table


def _with_captured_table(q, k, v, table, need_weights):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx, kv_idx]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + 1) & ~((h == 1) & (q_idx == 0))  # row 0 of head 1 empty

    out, w = multihead.attention(
        q,
        k,
        v,
        need_weights=need_weights,
        average_weights=False,
        mask_mod=mask_mod,
        score_mod=score_mod,
    )
    return (out, w) if need_weights else out


@pytest.mark.parametrize("need_weights", [False, True])
def test_gradcheck_with_a_captured_tensor(need_weights):
    inputs = _tiny()
    assert torch.autograd.gradcheck(
        lambda *t: _with_captured_table(*t, need_weights), inputs, eps=1e-6, atol=1e-7
    )


def test_gradgradcheck():
    inputs = _tiny(8)
    assert torch.autograd.gradgradcheck(
        lambda *t: _with_captured_table(*t, False), inputs, eps=1e-6, atol=1e-6
    )


# --- the layer ------------------------------------------------------------------------------


def build_layer(seed, **kwargs):
    torch.manual_seed(seed)
    layer = multihead.MultiheadAttention(batch_first=True, dtype=F64, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(randn(gen, *p.shape, scale=0.5))
    return layer


def project(layer, query, key, value):
    """q ``(N, H, L, D)``, k / v ``(N, Hkv, S, D)`` from the layer's own parameters."""
    e, hkv, d = layer.embed_dim, layer.num_kv_heads, layer.head_dim
    w_q, w_k, w_v = layer.in_proj_weight.split([e, hkv * d, hkv * d])
    if layer.in_proj_bias is None:
        b_q = b_k = b_v = None
    else:
        b_q, b_k, b_v = layer.in_proj_bias.split([e, hkv * d, hkv * d])
    n = query.shape[0]
    q = F.linear(query, w_q, b_q).view(n, -1, layer.num_heads, d).transpose(1, 2)
    k = F.linear(key, w_k, b_k).view(n, -1, hkv, d).transpose(1, 2)
    v = F.linear(value, w_v, b_v).view(n, -1, hkv, d).transpose(1, 2)
    return q, k, v


def finish(layer, out):
    """Heads ``(N, H, L, D)`` -> ``(N, L, E)`` through out_proj."""
    n, _, q_len, _ = out.shape
    out = out.transpose(1, 2).reshape(n, q_len, layer.embed_dim)
    return F.linear(out, layer.out_proj.weight, layer.out_proj.bias)


def layer_reference(
    layer,
    query,
    key,
    value,
    *,
    mask_mod=None,
    score_mod=None,
    is_causal=False,
    key_padding_mask=None,
    segment_ids=None,
):
    """The layer's forward from its parameters and the dense reference: (out, per-head w)."""
    q, k, v = project(layer, query, key, value)
    n, hkv, k_len, d = k.shape
    extra = 0
    if layer.bias_k is not None:
        k = torch.cat([k, layer.bias_k.view(1, hkv, 1, d).expand(n, -1, -1, -1)], 2)
        v = torch.cat([v, layer.bias_v.view(1, hkv, 1, d).expand(n, -1, -1, -1)], 2)
        extra += 1
    if layer.add_zero_attn:
        k = torch.cat([k, k.new_zeros(n, hkv, 1, d)], 2)
        v = torch.cat([v, v.new_zeros(n, hkv, 1, d)], 2)
        extra += 1
    mask = None
    if key_padding_mask is not None:
        mask = torch.zeros(n, 1, 1, k_len + extra, dtype=F64)
        mask[..., :k_len] = mask[..., :k_len].masked_fill(
            key_padding_mask.view(n, 1, 1, k_len), float("-inf")
        )
    constraints = [] if mask_mod is None else [mask_mod]
    if layer.window is not None:
        constraints.append(ref.ref_sliding_window(layer.window, causal=is_causal))
    if segment_ids is not None:
        constraints.append(ref.ref_document(segment_ids))
    out, w = ref.reference_attention(
        q,
        k,
        v,
        mask,
        is_causal=is_causal,
        softcap=layer.softcap,
        mask_mod=ref.ref_and(*constraints) if constraints else None,
        score_mod=score_mod,
        extra_keys=extra,
    )
    return finish(layer, out), w


@st.composite
def layer_cases(draw):
    self_attention = draw(st.booleans())
    segments = self_attention and draw(st.booleans())
    mask_spec = draw(MASK_SPECS)
    if not self_attention and uses(mask_spec, "document"):
        mask_spec = None
    q_len = draw(LENGTHS)
    return dict(
        kv_heads=draw(st.sampled_from([1, 2, 4])),
        head_dim=draw(st.sampled_from([2, 4])),
        bias=draw(st.booleans()),
        extra=draw(st.sampled_from(["none", "bias_kv", "zero_attn", "both"])),
        window=draw(st.none() | st.integers(1, 150)),
        softcap=draw(st.sampled_from([None, None, 2.0])),
        self_attention=self_attention,
        segments=segments,
        n=draw(st.integers(1, 2)),
        q_len=q_len,
        k_len=q_len if self_attention else draw(LENGTHS),
        padding=draw(st.booleans()),
        is_causal=draw(st.booleans()),
        mask_spec=mask_spec,
        score_spec=draw(SCORE_SPECS),
        need_weights=draw(st.booleans()),
        average=draw(st.booleans()),
        training=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=30, deadline=None)
@given(case=layer_cases())
def test_layer_matches_dense_reference(case):
    """MultiheadAttention with mask_mod / score_mod on top of num_kv_heads, window=,
    segment_ids=, is_causal, softcap=, key_padding_mask and the extra key slots (to which no
    mod applies) equals the reference built from its own parameters; gradients of the input,
    the parameters and the captured tensors too."""
    extra = case["extra"]
    layer = build_layer(
        case["seed"] % 1000,
        embed_dim=HEADS * case["head_dim"],
        num_heads=HEADS,
        num_kv_heads=case["kv_heads"],
        bias=case["bias"],
        add_bias_kv=extra in ("bias_kv", "both"),
        add_zero_attn=extra in ("zero_attn", "both"),
        window=case["window"],
        softcap=case["softcap"],
    )
    gen = torch.Generator().manual_seed(case["seed"])
    n, q_len, k_len, e = case["n"], case["q_len"], case["k_len"], layer.embed_dim
    positions = max(q_len, k_len)
    x = randn(gen, n, q_len, e)
    if case["self_attention"]:
        key = value = x
    else:
        key, value = randn(gen, n, k_len, e), randn(gen, n, k_len, e)
    segment_ids = document_ids(gen, n, q_len, 3, "2d") if case["segments"] else None
    padding = torch.rand(n, k_len, generator=gen) < 0.2 if case["padding"] else None
    mask_mod, ref_mask_mod = build_mask(case["mask_spec"], gen, n, HEADS, positions)
    score_mod, ref_score_mod, captured = build_score(case["score_spec"], gen, n, HEADS, positions)
    if case["training"]:
        x.requires_grad_()
    with torch.set_grad_enabled(case["training"]):
        out, w = layer(
            x,
            key,
            value,
            key_padding_mask=padding,
            need_weights=case["need_weights"],
            average_attn_weights=case["average"],
            is_causal=case["is_causal"],
            segment_ids=segment_ids,
            mask_mod=mask_mod,
            score_mod=score_mod,
        )
        ref_out, ref_w = layer_reference(
            layer,
            x,
            key,
            value,
            mask_mod=ref_mask_mod,
            score_mod=ref_score_mod,
            is_causal=case["is_causal"],
            key_padding_mask=padding,
            segment_ids=segment_ids,
        )
    close(out, ref_out)
    if case["need_weights"]:
        close(w, ref_w.mean(1) if case["average"] else ref_w)
    else:
        assert w is None
    if not case["training"]:
        return
    leaves = [x, *layer.parameters(), *captured]
    g_out = randn(gen, *out.shape)
    ours = grads((out * g_out).sum(), leaves)
    theirs = grads((ref_out * g_out).sum(), leaves)
    for a, b in zip(ours, theirs, strict=True):
        close(a, b)


@settings(max_examples=20, deadline=None)
@given(
    kv_heads=st.sampled_from([1, 2, 4]),
    mask_kind=st.sampled_from(["none", "window", "document", "prefix", "bh", "rows_hidden"]),
    score_kind=st.sampled_from(["none", "alibi", "rpb", "table"]),
    layer_window=st.none() | st.integers(1, 8),
    prefill=st.one_of(st.integers(1, 8), st.integers(129, 140)),
    steps=st.lists(st.integers(1, 3), min_size=1, max_size=5),
    spare=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_kv_cache_decoding_equals_one_causal_call(
    kv_heads, mask_kind, score_kind, layer_window, prefill, steps, spare, seed
):
    """Decoding with a KV cache (a prefill, then small steps) gives the rows and weights of one
    full causal call with the same mods: the mods see absolute positions (q_idx = fill level
    + i, kv_idx over the cache's max_len keys; unfilled slots get weight 0)."""
    layer = build_layer(
        seed % 1000, embed_dim=8, num_heads=HEADS, num_kv_heads=kv_heads, window=layer_window
    )
    gen = torch.Generator().manual_seed(seed)
    chunks = [prefill, *steps]
    total = sum(chunks)
    max_len = total + spare
    n = 2
    x = randn(gen, n, total, 8)
    mask_spec = {
        "none": None,
        "window": ("window", 5, True),
        "document": ("document", 3, "2d"),  # ids for every cache slot
        "prefix": ("prefix", 6, True),
        "bh": ("bh", 3),
        "rows_hidden": ("rows_hidden", 4),
    }[mask_kind]
    score_spec = {
        "none": None,
        "alibi": ("alibi",),
        "rpb": ("rpb", (32, 128), False),
        "table": ("table",),
    }[score_kind]
    mask_mod, _ = build_mask(mask_spec, gen, n, HEADS, max_len)
    score_mod, _, _ = build_score(score_spec, gen, n, HEADS, max_len)
    with torch.no_grad():
        full, full_w = layer(
            x,
            x,
            x,
            is_causal=True,
            average_attn_weights=False,
            mask_mod=mask_mod,
            score_mod=score_mod,
        )
        cache = layer.new_cache(n, max_len)
        start = 0
        for chunk in chunks:
            xs = x[:, start : start + chunk]
            out, w = layer(
                xs,
                xs,
                xs,
                cache=cache,
                average_attn_weights=False,
                mask_mod=mask_mod,
                score_mod=score_mod,
            )
            assert w.shape == (n, HEADS, chunk, max_len)
            close(out, full[:, start : start + chunk])
            close(w[..., :total], full_w[:, :, start : start + chunk])
            assert (w[..., total:] == 0).all()
            start += chunk


# --- the existing options are mods ----------------------------------------------------------


def _qkv_for(layer, x):
    q, k, v = project(layer, x, x, x)
    return q, k, v


@pytest.mark.parametrize(
    ("option", "value"),
    [("window", 3), ("window", 200), ("segment_ids", None), ("softcap", 1.5), ("is_causal", True)],
)
@pytest.mark.parametrize("length", [7, 150])
def test_layer_options_equal_their_mods(option, value, length):
    """window=w with is_causal == sliding_window(w); segment_ids=ids == document(ids);
    softcap=c == tanh_softcap(c); is_causal=True == causal: the layer with the option equals
    the functional call with the mod on the layer's own projections (and the same layer
    given the mod instead of the option)."""
    gen = torch.Generator().manual_seed(11)
    kwargs = dict(embed_dim=8, num_heads=HEADS, num_kv_heads=2)
    if option in ("window", "softcap"):
        kwargs[option] = value
    with_option = build_layer(12, **kwargs)
    plain = build_layer(12, embed_dim=8, num_heads=HEADS, num_kv_heads=2)
    x = randn(gen, 2, length, 8, scale=3.0)
    call, mod_kwargs, functional_kwargs = {}, {}, {}
    if option == "window":
        call["is_causal"] = True
        mod_kwargs["mask_mod"] = mods.sliding_window(value)
    elif option == "segment_ids":
        ids = document_ids(gen, 2, length, 4, "2d")
        call["segment_ids"] = ids
        mod_kwargs["mask_mod"] = mods.document(ids)
    elif option == "softcap":
        mod_kwargs["score_mod"] = mods.tanh_softcap(value)
    else:
        call["is_causal"] = True
        mod_kwargs["mask_mod"] = mods.causal
    functional_kwargs.update(mod_kwargs)
    out, w = with_option(x, x, x, average_attn_weights=False, **call)
    out_mod, w_mod = plain(x, x, x, average_attn_weights=False, **mod_kwargs)
    heads, w_fn = multihead.attention(
        *_qkv_for(plain, x), need_weights=True, average_weights=False, **functional_kwargs
    )
    close(out, finish(plain, heads))
    close(w, w_fn)
    close(out_mod, out)
    close(w_mod, w)
    # and the mod really does something here (a wrong no-op mod would not pass)
    out_none, _ = plain(x, x, x)
    assert (out_none - out).abs().max() > 1e-3


@pytest.mark.parametrize("length", [9, 140])
def test_functional_options_equal_their_mods(length):
    """attention(is_causal=True) == attention(mask_mod=causal), and attention(softcap=c) ==
    attention(score_mod=tanh_softcap(c)), outputs, weights and gradients."""
    gen = torch.Generator().manual_seed(13)
    q = randn(gen, 2, 4, length, 8, scale=2.0).requires_grad_()
    k = randn(gen, 2, 2, length + 3, 8, scale=2.0).requires_grad_()
    v = randn(gen, 2, 2, length + 3, 8).requires_grad_()
    for option, mod in (
        (dict(is_causal=True), dict(mask_mod=mods.causal)),
        (dict(softcap=1.5), dict(score_mod=mods.tanh_softcap(1.5))),
    ):
        a, wa = multihead.attention(q, k, v, need_weights=True, **option)
        b, wb = multihead.attention(q, k, v, need_weights=True, **mod)
        close(a, b)
        close(wa, wb)
        for ga, gb in zip(grads(a.sum(), (q, k, v)), grads(b.sum(), (q, k, v)), strict=True):
            close(ga, gb)


# --- torch's flex_attention -----------------------------------------------------------------


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:  # torch < 2.5
        pytest.skip("torch.nn.attention.flex_attention is missing (torch < 2.5)")
    return flex_attention, create_block_mask


_COMPILED: dict[str, object] = {}


def _compiled_flex():
    flex_attention, create_block_mask = _flex()
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"], create_block_mask


FLEX_N, FLEX_L = 2, 200  # two 128-wide tiles, the last ragged


def _flex_case(name):
    """``(mask_mod, score_mod, kv_heads)``: the seven shipped mods in four pairings, one compile
    each (a compile takes several seconds on CPU)."""
    gen = torch.Generator().manual_seed(17)
    if name == "causal+alibi":  # with GQA: 2 kv heads for 4 query heads
        return mods.causal, mods.alibi(mods.alibi_slopes(4)), 2
    if name == "sliding_window+tanh_softcap":
        return mods.sliding_window(37), mods.tanh_softcap(2.0), 4
    if name == "document+relative_position_bias":  # packed rows in a T5 encoder
        bias = mods.RelativePositionBias(4)
        with torch.no_grad():
            bias.weight.copy_(torch.randn(32, 4, generator=gen))
        return mods.document(document_ids(gen, FLEX_N, FLEX_L, 4, "2d")), bias, 4
    if name == "prefix_lm":  # one prefix length per batch row
        return mods.prefix_lm(torch.tensor([30, 150])), None, 1
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    [
        "causal+alibi",
        "sliding_window+tanh_softcap",
        "document+relative_position_bias",
        "prefix_lm",
    ],
)
def test_matches_torch_flex_attention(name):
    """Our attention with the shipped mods equals torch's compiled ``flex_attention`` with the
    same mod objects (flex calls them per element through vmap, we per tile), float32, to 1e-5,
    on two 128-wide tiles, the last one ragged; RelativePositionBias's weight requires grad, so
    this runs under no_grad.

    Forward only: flex_attention's backward does not run on CPU in torch 2.13 (it raises
    NotImplementedError "FlexAttention does not support backward on CPU" when an input
    requires grad), so gradients are checked against the dense reference instead.
    """
    flex_attention, create_block_mask = _compiled_flex()
    mask_mod, score_mod, kv_heads = _flex_case(name)
    gen = torch.Generator().manual_seed(19)
    scale = 3.0 if "tanh_softcap" in name else 1.0  # logits large enough for the cap to bite
    q = randn(gen, FLEX_N, 4, FLEX_L, 16, dtype=torch.float32, scale=scale)
    k = randn(gen, FLEX_N, kv_heads, FLEX_L, 16, dtype=torch.float32, scale=scale)
    v = randn(gen, FLEX_N, kv_heads, FLEX_L, 16, dtype=torch.float32)
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, FLEX_N, 4, FLEX_L, FLEX_L, device="cpu")
    with torch.no_grad():
        theirs = flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=kv_heads != 4
        )
        ours, _ = multihead.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod)
    close(ours, theirs, dict(atol=1e-5, rtol=1e-5))
    # the mod matters here: plain attention is far from flex's answer
    plain, _ = multihead.attention(q, k, v)
    assert (plain - theirs).abs().max() > 1e-2


# --- T5 buckets and ALiBi slopes against Hugging Face -------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (16, 40), (8, 20), (64, 500)])
def test_relative_position_buckets_equal_hugging_face_t5(bidirectional, num_buckets, max_distance):
    """RelativePositionBias's buckets (read through a weight that stores each bucket's index)
    equal transformers' ``T5Attention._relative_position_bucket``, as does the reference."""
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    relative = torch.arange(-700, 701)
    theirs = t5.T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    bias = mods.RelativePositionBias(
        3,
        num_buckets=num_buckets,
        max_distance=max_distance,
        bidirectional=bidirectional,
        dtype=F64,
    )
    with torch.no_grad():
        bias.weight.copy_(torch.arange(num_buckets, dtype=F64)[:, None].expand(-1, 3))
    q_idx = torch.full((1, 1, 1, 1), 700)
    kv_idx = torch.arange(0, 1401).view(1, 1, 1, -1)  # kv_idx - q_idx = -700 .. 700
    score = torch.zeros(1, 3, 1, 1401, dtype=F64)
    got = bias(
        score,
        torch.zeros(1, 1, 1, 1, dtype=torch.long),
        torch.arange(3).view(1, 3, 1, 1),
        q_idx,
        kv_idx,
    )
    for head in range(3):
        assert torch.equal(got[0, head, 0].long(), theirs)
    mine = ref.t5_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert torch.equal(mine, theirs)
    assert len(theirs.unique()) > num_buckets // 4  # the range exercises many buckets


@pytest.mark.parametrize("is_decoder", [False, True])
def test_relative_position_bias_equals_t5_compute_bias(is_decoder):
    """With T5's weight copied in, the mod's added bias is T5Attention.compute_bias."""
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    config = t5.T5Config(
        d_model=16, d_kv=4, num_heads=4, relative_attention_num_buckets=32, is_decoder=is_decoder
    )
    attn = t5.T5Attention(config, has_relative_attention_bias=True).double()
    torch.nn.init.normal_(attn.relative_attention_bias.weight)
    bias = mods.RelativePositionBias(4, bidirectional=not is_decoder, dtype=F64)
    with torch.no_grad():
        bias.weight.copy_(attn.relative_attention_bias.weight)
        expected = attn.compute_bias(150, 170)  # (1, H, L, S)
        grids = ref.index_grids(1, 4, 150, 170)
        got = bias(torch.zeros(1, 4, 150, 170, dtype=F64), *grids)
    close(got, expected)


def test_alibi_slopes_equal_paper_and_bloom():
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    for heads in range(1, 41):
        slopes = torch.as_tensor(mods.alibi_slopes(heads), dtype=F64)
        assert slopes.shape == (heads,)
        paper = torch.tensor(ref.ref_alibi_slopes(heads), dtype=F64)
        close(slopes, paper, dict(atol=0, rtol=1e-6))
        close(slopes, bloom._get_alibi_slopes(heads, "cpu").to(F64), dict(atol=0, rtol=1e-6))
    assert mods.alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]


def test_shipped_mods_equal_their_definitions_on_a_grid():
    """Each shipped mask_mod, evaluated on a broadcast grid, is the contract's formula."""
    n, h, q_len, k_len = 2, 3, 40, 45
    grids = ref.index_grids(n, h, q_len, k_len)
    b, _, i, j = grids
    ids = torch.randint(0, 4, (n, 45), generator=torch.Generator().manual_seed(0))
    prefix = torch.tensor([3, 20])
    cases = [
        (mods.causal, i >= j),
        (mods.sliding_window(4), (i - 4 < j) & (j <= i)),
        (mods.sliding_window(4, causal=False), (i - j).abs() < 4),
        (mods.document(ids[:, :45]), ids[b, i] == ids[b, j]),
        (mods.document(ids[0]), ids[0][i] == ids[0][j]),
        (mods.prefix_lm(5), (j <= i) | (j < 5)),
        (mods.prefix_lm(prefix), (j <= i) | (j < prefix[b])),
        (mods.and_masks(mods.causal, mods.sliding_window(3)), (j <= i) & (i - j < 3)),
        (
            mods.or_masks(mods.sliding_window(2, causal=False), mods.prefix_lm(4)),
            ((i - j).abs() < 2) | (j <= i) | (j < 4),
        ),
    ]
    for mod, expected in cases:
        got = torch.broadcast_to(mod(*grids), (n, h, q_len, k_len))
        assert got.dtype == torch.bool
        assert torch.equal(got, expected.expand(n, h, q_len, k_len)), repr(mod)
    score = torch.randn(n, h, q_len, k_len, dtype=F64)
    slopes = torch.tensor([0.5, 0.25, 0.125], dtype=F64)
    close(mods.alibi(slopes)(score, *grids), score + slopes.view(1, 3, 1, 1) * (j - i))
    close(mods.tanh_softcap(2.5)(score, *grids), 2.5 * torch.tanh(score / 2.5))


# --- polarity -------------------------------------------------------------------------------


def test_flex_polarity_is_the_reverse_of_torch_bool_masks():
    """The same 0/1 matrix M: as a mask_mod (flex: True = attend) the weights are nonzero
    exactly where M is 1; as torch MultiheadAttention's bool attn_mask (True = masked) exactly
    where M is 0."""
    m = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)

    def from_matrix(b, h, q_idx, kv_idx):
        return m[q_idx, kv_idx]

    gen = torch.Generator().manual_seed(23)
    q, k = randn(gen, 1, 1, 3, 4), randn(gen, 1, 1, 3, 4)
    eye = torch.eye(3, dtype=F64).view(1, 1, 3, 3)  # v = I: the output is the weights
    out, w = multihead.attention(q, k, eye, mask_mod=from_matrix, need_weights=True)
    assert torch.equal(w[0] != 0, m)
    close(out[0, 0], w[0])

    torch_layer = torch.nn.MultiheadAttention(4, 1, batch_first=True, dtype=F64)
    ours = multihead.from_torch(torch_layer)
    x = randn(gen, 1, 3, 4)
    _, w_torch = torch_layer(x, x, x, attn_mask=m)
    assert torch.equal(w_torch[0] != 0, ~m)
    _, w_ours_torch_polarity = ours(x, x, x, attn_mask=m)
    _, w_ours_flex_polarity = ours(x, x, x, mask_mod=from_matrix)
    assert torch.equal(w_ours_flex_polarity[0] != 0, m)
    close(w_ours_torch_polarity, w_torch)
    _, w_reversed = ours(x, x, x, attn_mask=~m)
    close(w_ours_flex_polarity, w_reversed)


def test_flex_polarity_matches_eager_flex_attention():
    """The same mask_mod handed to flex_attention (eager) gives our weights (v = I)."""
    flex_attention, create_block_mask = _flex()
    m = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)

    def from_matrix(b, h, q_idx, kv_idx):
        return m[q_idx, kv_idx]

    gen = torch.Generator().manual_seed(23)
    q, k = randn(gen, 1, 1, 3, 4), randn(gen, 1, 1, 3, 4)
    eye = torch.eye(3, dtype=F64).view(1, 1, 3, 3)
    _, w = multihead.attention(q, k, eye, mask_mod=from_matrix, need_weights=True)
    block_mask = create_block_mask(from_matrix, 1, 1, 3, 3, device="cpu")
    q32, k32 = q.float(), k.float()
    v32 = torch.zeros(1, 1, 3, 4)
    v32[..., :3] = torch.eye(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is not compiled
        theirs = flex_attention(q32, k32, v32, block_mask=block_mask)
    assert torch.equal(theirs[0, 0, :, :3] != 0, m)
    close(w.float()[0], theirs[0, 0, :, :3], dict(atol=1e-6, rtol=1e-6))


# --- bad input ------------------------------------------------------------------------------


def _small():
    gen = torch.Generator().manual_seed(29)
    return randn(gen, 1, 2, 6, 4), randn(gen, 1, 2, 7, 4), randn(gen, 1, 2, 7, 4)


@pytest.mark.parametrize("name", ["mask_mod", "score_mod"])
@pytest.mark.parametrize("bad", [3, "causal", torch.ones(3)])
def test_non_callable_mods_are_refused(name, bad):
    with pytest.raises(TypeError, match=name):
        multihead.attention(*_small(), **{name: bad})
    layer = build_layer(0, embed_dim=8, num_heads=2)
    x = torch.randn(1, 5, 8, dtype=F64)
    with pytest.raises(TypeError, match=name):
        layer(x, x, x, **{name: bad})


@pytest.mark.parametrize(
    "mask_mod",
    [
        lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx).double(),  # not bool
        lambda b, h, q_idx, kv_idx: q_idx - kv_idx,  # int64, not bool
        lambda b, h, q_idx, kv_idx: torch.ones(5, dtype=torch.bool),  # does not broadcast
        lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx).unsqueeze(0).expand(3, -1, -1, -1, -1),
        lambda b, h, q_idx, kv_idx: (q_idx % 5 == 0).view(-1, 1),  # (1, 1) per call
    ],
    ids=["float", "int", "shape", "rank", "per_call_shape"],
)
def test_bad_mask_mod_results_are_refused(mask_mod):
    with pytest.raises((TypeError, ValueError), match="mask_mod"):
        multihead.attention(*_small(), mask_mod=mask_mod)


@pytest.mark.parametrize(
    "score_mod",
    [
        lambda score, b, h, q_idx, kv_idx: torch.zeros(5, dtype=F64),
        lambda score, b, h, q_idx, kv_idx: score.unsqueeze(0).expand(2, -1, -1, -1, -1),
        lambda score, b, h, q_idx, kv_idx: score > 0,  # not floating
    ],
    ids=["shape", "rank", "bool"],
)
def test_bad_score_mod_results_are_refused(score_mod):
    with pytest.raises((TypeError, ValueError), match="score_mod"):
        multihead.attention(*_small(), score_mod=score_mod)


def test_score_mod_result_may_broadcast_smaller():
    """A score_mod may return something that broadcasts to the tile (a per-key bias row)."""
    q, k, v = _small()
    bias = torch.linspace(-1, 1, 7, dtype=F64)

    def per_key(score, b, h, q_idx, kv_idx):
        return score + bias[kv_idx]

    out, _ = multihead.attention(q, k, v, score_mod=per_key)
    close(out, ref.reference_attention(q, k, v, bias.view(1, 1, 1, 7))[0])
    assert not math.isnan(float(out.sum()))


@pytest.mark.parametrize(
    "mask_mod",
    [
        lambda b, h, q_idx, kv_idx: q_idx % 3 != 1,  # depends on the row only
        lambda b, h, q_idx, kv_idx: kv_idx % 4 != 0,  # on the column only
        lambda b, h, q_idx, kv_idx: (b == 0) | (h != 1),  # on batch and head only
        lambda b, h, q_idx, kv_idx: torch.tensor(True),  # on nothing
    ],
    ids=["rows", "columns", "batch_head", "scalar"],
)
@pytest.mark.parametrize(("q_len", "k_len"), [(1, 129), (150, 200), (5, 7)])
def test_mask_mod_results_may_broadcast_smaller(mask_mod, q_len, k_len):
    """A mask_mod result that broadcasts to the tile (fewer dims, or size 1 along some) is
    a valid mask, over several tiles too: outputs, weights and gradients as the reference."""
    gen = torch.Generator().manual_seed(31)
    q = randn(gen, 2, 4, q_len, 4).requires_grad_()
    k = randn(gen, 2, 2, k_len, 4).requires_grad_()
    v = randn(gen, 2, 2, k_len, 4).requires_grad_()
    out, w = multihead.attention(
        q, k, v, mask_mod=mask_mod, need_weights=True, average_weights=False
    )
    ref_out, ref_w = ref.reference_attention(q, k, v, mask_mod=mask_mod)
    close(out, ref_out)
    close(w, ref_w)
    for ours, theirs in zip(
        grads(out.sum() + w.sum(), (q, k, v)),
        grads(ref_out.sum() + ref_w.sum(), (q, k, v)),
        strict=True,
    ):
        close(ours, theirs)
    with torch.no_grad():
        out, _ = multihead.attention(q, k, v, mask_mod=mask_mod)
    close(out, ref_out)
