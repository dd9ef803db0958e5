"""Hostile review of the mods (issue 10): regression tests for bugs found by attacking
``mask_mod`` / ``score_mod`` on :func:`multihead.attention` and :class:`MultiheadAttention`,
and edge cases that already work, checked against the dense float64 reference of
tests/mod_reference.py (mask materialised, score transform applied elementwise).

Each test that documents a bug says in its docstring what is wrong and what the right answer
is.
"""

from __future__ import annotations

import contextlib

import mod_reference as ref
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import multihead
from multihead import KVCache, MultiheadAttention, mods

F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)


def close(ours, theirs, **tol):
    torch.testing.assert_close(ours, theirs, **(tol or TOL))


def randn(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def qkv(seed, n, h, q_len, k_len, d, *, kv_heads=None, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = randn(gen, n, h, q_len, d)
    k = randn(gen, n, kv_heads or h, k_len, d)
    v = randn(gen, n, kv_heads or h, k_len, d)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def f64_layer(seed, embed_dim=8, num_heads=2, **kwargs):
    torch.manual_seed(seed)
    layer = MultiheadAttention(embed_dim, num_heads, batch_first=True, dtype=F64, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(randn(gen, *p.shape) * 0.5)
    return layer


# --- bugs: silent wrong answers -------------------------------------------------------------


def test_keys_and_values_with_a_non_unit_last_stride():
    """BUG (silent wrong answer): k and v whose last dim is not contiguous (a transposed
    ``(N, H, D, S)`` buffer, e.g. a stored K^T) give garbage on the tiled flash route. The
    route asks SDPA's kernel choice about a probe of q only, then calls the CPU flash kernel
    directly on k / v views it never checked (SDPA itself would refuse them); with GQA the
    keys are copied by repeat_interleave and the answer is right. Expected: the reference,
    whatever the strides."""
    q, k, v = qkv(0, 1, 2, 200, 200, 8)
    k = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) == S
    v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    mask_mod = mods.sliding_window(50, causal=False)
    out, _ = multihead.attention(q, k, v, mask_mod=mask_mod)
    expected, _ = ref.reference_attention(q, k, v, mask_mod=mask_mod)
    close(out, expected)


def test_score_mod_hiding_every_key_of_a_row_gives_zero_not_nan():
    """BUG (silent NaN): flex's classic masking idiom, a score_mod returning -inf
    (``torch.where(cond, score, -inf)``), that leaves a row no finite logit gives NaN output
    and weights. The project's rule, the dense reference and torch's flex_attention (which
    returns 0 there) all give a zero row: rows are only checked for emptiness when a mask or
    mask_mod is given (``rows_keep_a_key``), never after the score_mod."""
    q, k, v = qkv(1, 1, 2, 6, 6, 4)

    def odd_rows_see_nothing(score, b, h, q_idx, kv_idx):
        return torch.where((q_idx % 2 == 0) & (kv_idx <= q_idx), score, float("-inf"))

    expected, expected_w = ref.reference_attention(q, k, v, score_mod=odd_rows_see_nothing)
    for need_weights in (False, True):
        out, w = multihead.attention(
            q,
            k,
            v,
            score_mod=odd_rows_see_nothing,
            need_weights=need_weights,
            average_weights=False,
        )
        close(out, expected)
        if need_weights:
            close(w, expected_w)


def test_layer_score_mod_hiding_every_key_of_a_row_gives_zero_not_nan():
    """BUG (silent NaN), the layer's side of the previous test: with no mask and no
    mask_mod, a score_mod that sends a row's every logit to -inf makes the output and the
    weights NaN instead of zero rows."""
    layer = f64_layer(2)
    x = randn(torch.Generator().manual_seed(3), 1, 6, 8)

    def odd_rows_see_nothing(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx % 2 == 0, score, float("-inf"))

    out, w = layer(x, x, x, score_mod=odd_rows_see_nothing)
    assert not out.isnan().any() and not w.isnan().any()
    assert (w[0, 1::2] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_keys_at_hidden_positions_stay_hidden_on_every_route(bad):
    """BUG (silent NaN, route-dependent): a NaN or inf key hidden by the mask_mod inside a
    partly visible tile poisons the output on the SDPA/flash route (``q k^T + (-inf)`` is NaN
    there), while the formula route (need_weights=True), the reference and torch's
    flex_attention all hide it (the kernel's own comment says hidden keys are *set* to -inf,
    not added to). Same call, different answer by route."""
    q, k, v = qkv(4, 1, 2, 6, 6, 4)
    k = k.clone()
    k[..., 5, :] = bad

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < 5

    expected, _ = ref.reference_attention(q, k, v, mask_mod=mask_mod)
    assert torch.isfinite(expected).all()
    with_weights, _ = multihead.attention(q, k, v, mask_mod=mask_mod, need_weights=True)
    close(with_weights, expected)
    without, _ = multihead.attention(q, k, v, mask_mod=mask_mod)
    close(without, expected)


def test_mask_mod_is_not_evaluated_again_in_backward():
    """BUG (silent wrong gradients): the tiled flash route rebuilds each block's mask in
    backward by calling the mask_mod again. A closure that changed between forward and
    backward (Python's late binding in a loop, or a reused ids buffer filled for the next
    micro-batch) then gives the gradient of a different mask: here the first call's
    gradient is computed with the second window. Dense autograd and flex (block mask built
    once, in forward) differentiate the mask that the forward used."""
    q, k, v = qkv(5, 1, 1, 200, 200, 4, grad=True)
    outs = []
    for window in (16, 64):
        out, _ = multihead.attention(
            q,
            k,
            v,
            mask_mod=lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() < window,  # noqa: B023 (late binding on purpose)
        )
        outs.append(out)
    (grad,) = torch.autograd.grad(outs[0].sum(), q)
    expected, _ = ref.reference_attention(
        q, k, v, mask_mod=lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() < 16
    )
    close(outs[0], expected)
    (expected_grad,) = torch.autograd.grad(expected.sum(), q)
    close(grad, expected_grad)


def test_document_ids_buffer_reused_before_backward():
    """BUG (silent wrong gradients), the realistic form of the previous test: a document-ids
    buffer refilled for the next micro-batch before backward (gradient accumulation) changes
    the gradient of the first micro-batch, because backward calls mods.document's mod again
    on the buffer's new contents."""
    q, k, v = qkv(6, 1, 2, 200, 200, 4, grad=True)
    ids = torch.arange(200) // 50
    first_ids = ids.clone()
    out, _ = multihead.attention(q, k, v, mask_mod=mods.document(ids))
    ids.copy_(torch.arange(200) // 20)  # the next micro-batch's packing
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected, _ = ref.reference_attention(q, k, v, mask_mod=ref.ref_document(first_ids))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for ours, theirs in zip(grads, expected_grads, strict=True):
        close(ours, theirs)


def test_score_mod_changed_before_backward_is_refused_not_silently_used():
    """Was a silent wrong gradient: the formula route recomputes each block under an
    activation checkpoint, calling the score_mod again in backward, and a closure over a
    variable that changed since forward (a temperature loop) gave the gradient of another
    function. The recomputation is now checked bit for bit against the forward's block
    output: such a backward raises, naming score_mod; an unchanged mod keeps the forward's
    gradient."""
    q, k, v = qkv(7, 1, 1, 200, 200, 4, grad=True)
    outs = []
    for temperature in (0.5, 2.0):
        out, _ = multihead.attention(
            q,
            k,
            v,
            score_mod=lambda s, b, h, q_idx, kv_idx: s / temperature,  # noqa: B023 (on purpose)
        )
        outs.append(out)
    with pytest.raises(RuntimeError, match="score_mod"):
        torch.autograd.grad(outs[0].sum(), q)
    (grad,) = torch.autograd.grad(outs[1].sum(), q)  # its mod is what it was in forward
    expected, _ = ref.reference_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s / 2.0)
    (expected_grad,) = torch.autograd.grad(expected.sum(), q)
    close(grad, expected_grad)


# --- bugs: valid input refused, wrong error, state changed ----------------------------------


@pytest.mark.parametrize("shape", [(400, 1), (1,), (1, 2, 400, 1)])
def test_mask_broadcast_over_keys_with_a_mod(shape):
    """BUG (crash on valid input): an additive mask broadcast over the keys (last dim 1,
    accepted as "broadcastable to (N, H, L, S)") crashes with a RuntimeError / IndexError
    once a mod skips the first key tile: the kernel slices the mask's key columns as if it
    had S of them. Expected: the reference."""
    q, k, v = qkv(8, 1, 2, 400, 400, 4)
    mask = randn(torch.Generator().manual_seed(9), *shape)
    for mask_mod in (mods.sliding_window(40), lambda b, h, qi, ki: (ki < 100) | (ki > 300)):
        out, _ = multihead.attention(q, k, v, mask, mask_mod=mask_mod)
        expected, _ = ref.reference_attention(q, k, v, mask, mask_mod=mask_mod)
        close(out, expected)


def test_zero_queries_keep_the_output_on_the_graph():
    """BUG: with L = 0 and a mod, the output is a fresh zeros tensor off the graph, so
    ``out.sum().backward()`` raises "element 0 of tensors does not require grad"; without a
    mod the same call works and gives zero gradients."""
    q, k, v = qkv(10, 2, 2, 0, 5, 4, grad=True)
    for kwargs in (
        dict(mask_mod=lambda b, h, qi, ki: qi >= ki),
        dict(score_mod=lambda s, b, h, qi, ki: s * 2),
    ):
        for need_weights in (False, True):
            out, _ = multihead.attention(q, k, v, need_weights=need_weights, **kwargs)
            assert out.shape == (2, 2, 0, 4)
            out.sum().backward()
            assert q.grad is not None and k.grad is not None
            assert (k.grad == 0).all()
            q.grad = k.grad = v.grad = None


@pytest.mark.parametrize("n, h", [(0, 2), (2, 0)])
def test_zero_batch_or_zero_heads_with_mods(n, h):
    """Zero batch rows or zero heads with a mod: an empty result, as without a mod (the
    mods are called on an empty grid or not at all), never an IndexError."""
    q, k, v = qkv(11, n, h, 5, 5, 4)
    for kwargs in (
        dict(mask_mod=lambda b, hh, qi, ki: qi >= ki),
        dict(score_mod=lambda s, b, hh, qi, ki: s + 1.0),
        dict(mask_mod=mods.sliding_window(2)),
    ):
        out, w = multihead.attention(q, k, v, need_weights=True, **kwargs)
        assert out.shape == (n, h, 5, 4) and w.shape == (n, 5, 5)


def test_layer_zero_batch_with_mods():
    """The layer with N = 0 and a user mod returns empty results, as it does without one."""
    layer = f64_layer(12)
    x = torch.zeros(0, 5, 8, dtype=F64)
    for kwargs in (
        dict(mask_mod=lambda b, h, qi, ki: qi >= ki),
        dict(score_mod=lambda s, b, h, qi, ki: s + 1.0),
    ):
        out, w = layer(x, x, x, **kwargs)
        assert out.shape == (0, 5, 8) and w.shape == (0, 5, 5)


@pytest.mark.parametrize("combine", ["is_causal", "and_masks", "or_masks"])
def test_non_bool_mask_mod_is_a_type_error_when_combined(combine):
    """BUG (wrong error): a mask_mod returning a float tensor raises the promised TypeError
    naming mask_mod when alone, but a NotImplementedError ("bitwise_and_cpu" not implemented
    for 'Double') once it is combined with causality (is_causal=True, the layer's window,
    segment_ids or a KV cache) or through and_masks / or_masks."""
    q, _, _ = qkv(13, 1, 2, 5, 5, 4)

    def float_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx).double()

    kwargs = {
        "is_causal": dict(is_causal=True, mask_mod=float_mod),
        "and_masks": dict(mask_mod=mods.and_masks(float_mod, mods.causal)),
        "or_masks": dict(mask_mod=mods.or_masks(mods.causal, float_mod)),
    }[combine]
    with pytest.raises(TypeError, match="mask_mod"):
        multihead.attention(q, q, q, **kwargs)


def _snapshot(cache):
    return cache.position.clone(), cache.k.clone(), cache.v.clone()


def _assert_unchanged(cache, before):
    position, k, v = before
    assert torch.equal(cache.position, position)
    assert torch.equal(cache.k, k), "keys changed"
    assert torch.equal(cache.v, v), "values changed"


def test_a_mod_that_raises_leaves_the_kv_cache_bitwise_unchanged():
    """BUG (state changed by a failed call): when a mod raises, the layer rolls the fill
    level back but leaves the new tokens' keys and values written into the cache's buffers
    (and a cache without an owner now belongs to this layer). The project's own standard
    (tests/test_autodiff_cache.py, assert_unchanged) is a cache bitwise as it was."""
    layer = f64_layer(14)
    other = f64_layer(15)
    cache = KVCache(1, 2, 50, 4, dtype=F64)  # no owner yet
    x = randn(torch.Generator().manual_seed(16), 1, 5, 8)

    def raises(b, h, q_idx, kv_idx):
        raise RuntimeError("boom")

    before = _snapshot(cache)
    with torch.no_grad(), pytest.raises(Exception, match="boom"):
        layer(x, x, x, cache=cache, mask_mod=raises)
    _assert_unchanged(cache, before)
    assert cache.owned_by(other), "a failed call claimed the cache"


def test_an_interrupt_inside_a_mod_rolls_the_cache_back():
    """BUG (state changed by a failed call): the roll-back catches ``Exception`` only, so a
    KeyboardInterrupt (any BaseException) raised while a slow mod runs leaves the fill level
    advanced past tokens that were never attended: the next decode step sees them."""
    layer = f64_layer(17)
    cache = layer.new_cache(1, 50)
    x = randn(torch.Generator().manual_seed(18), 1, 5, 8)

    def interrupted(b, h, q_idx, kv_idx):
        raise KeyboardInterrupt

    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        layer(x, x, x, cache=cache, mask_mod=interrupted)
    assert cache.length == 0


@pytest.mark.parametrize("extra", ["add_zero_attn", "add_bias_kv"])
def test_extra_slots_over_no_keys_with_weights_under_grad(extra):
    """BUG (crash on valid input): cross-attention over an empty key sequence (S = 0) with an
    extra key slot, a mod and the default need_weights=True under autograd raises "a leaf
    Variable that requires grad is being used in an in-place operation" while placing the
    weights; without a mod the same call works. Expected: every query attends to the extra
    slot alone (weight 1)."""
    layer = f64_layer(19, **{extra: True})
    x = randn(torch.Generator().manual_seed(20), 1, 5, 8).requires_grad_()
    memory = torch.zeros(1, 0, 8, dtype=F64)
    out, w = layer(x, memory, memory, mask_mod=lambda b, h, qi, ki: qi >= ki)
    close(w, torch.ones(1, 5, 1, dtype=F64))
    out.sum().backward()
    assert x.grad is not None


def test_vmap_over_a_captured_tensor_with_weights():
    """BUG (refused under torch.func): vmap over a tensor a score_mod captures (ALiBi slopes)
    works without weights but raises "vmap: inplace arithmetic ... is not possible" with
    need_weights=True: the weights are written in place into an unbatched zeros tensor."""
    q, k, v = qkv(21, 1, 2, 140, 140, 4)
    slopes = randn(torch.Generator().manual_seed(22), 3, 2)

    def weights_for(s):
        return multihead.attention(q, k, v, score_mod=mods.alibi(s), need_weights=True)[1]

    weights = torch.func.vmap(weights_for)(slopes)
    for i in range(3):
        _, expected = ref.reference_attention(q, k, v, score_mod=ref.ref_alibi(slopes[i]))
        close(weights[i], expected.mean(1))


def test_bfloat16_score_mod_keeps_float32_scores():
    """BUG (precision): in bfloat16 the score_mod's result is rounded back to bfloat16 before
    the softmax (an ALiBi bias of -50 is then only good to 0.25), so the output is 0.13 off
    the float64 answer on 200 positions, where torch's flex_attention (float32 scores) is
    within 0.0074 on the same inputs. Expected: float32 scores, as flex, within 0.03."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 200, 16, generator=gen).to(torch.bfloat16) for _ in range(3))
    slopes = mods.alibi_slopes(4)
    out, _ = multihead.attention(q, k, v, score_mod=mods.alibi(slopes))
    expected, _ = ref.reference_attention(
        q.double(), k.double(), v.double(), score_mod=ref.ref_alibi(slopes.double())
    )
    assert (out.double() - expected).abs().max() < 0.03


def test_document_over_no_positions():
    """``mods.document`` of an empty ids tensor (a packed row of length 0) raises a bare
    RuntimeError from a reshape; an L = 0 call with it should simply return an empty
    result (or, at worst, a ValueError naming document_ids)."""
    q, k, v = qkv(23, 1, 2, 0, 0, 4)
    out, _ = multihead.attention(q, k, v, mask_mod=mods.document(torch.zeros(0, dtype=torch.long)))
    assert out.shape == (1, 2, 0, 4)


# --- edge cases that work (coverage) --------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mask_mod=mods.sliding_window(50)),
        dict(mask_mod=lambda b, h, qi, ki: (qi - ki) % 3 != 0),
        dict(score_mod=mods.alibi(torch.tensor([0.1, 0.2], dtype=F64))),
    ],
    ids=["window", "user_mask_mod", "alibi"],
)
def test_dropout_weights_and_gradients_use_one_dropout_mask(kwargs):
    """Dropout with mods: the returned per-head weights are the ones after dropout and the
    output is exactly weights @ v; gradients (with RNG consumed between forward and backward)
    are those of that same dropout mask; the call without weights draws the same mask."""
    q, k, v = qkv(24, 2, 2, 300, 300, 4, grad=True)
    p = 0.3
    torch.manual_seed(5)
    out, w = multihead.attention(
        q, k, v, dropout_p=p, need_weights=True, average_weights=False, **kwargs
    )
    close(out, w @ v)
    _, probs = ref.reference_attention(q, k, v, **kwargs)
    kept = (w != 0) | (probs == 0)
    dropped = probs * kept / (1 - p)
    close(w, dropped.detach(), atol=1e-12, rtol=1e-9)
    torch.manual_seed(5)
    out_alone, _ = multihead.attention(q, k, v, dropout_p=p, **kwargs)
    close(out_alone, out)
    torch.randn(1000)  # RNG moves on before backward
    g_out = randn(torch.Generator().manual_seed(25), *out.shape)
    expected = torch.autograd.grad((dropped @ v * g_out).sum(), (q, k, v))
    for result in (out, out_alone):
        grads = torch.autograd.grad((result * g_out).sum(), (q, k, v))
        for ours, theirs in zip(grads, expected, strict=True):
            close(ours, theirs)


@pytest.mark.parametrize("prefill", [127, 128, 129])
def test_cache_decoding_across_a_tile_edge_with_mods(prefill):
    """A KV cache made under inference_mode, then used under no_grad: prefill 127 / 128 /
    129 tokens and decode past the tile edge with a sliding window and T5's bias; every
    step equals the rows and weights of one causal call (absolute positions)."""
    layer = f64_layer(26, embed_dim=16, num_heads=4, num_kv_heads=2)
    bias = mods.RelativePositionBias(4, dtype=F64)
    x = randn(torch.Generator().manual_seed(27), 2, 140, 16)
    kwargs = dict(score_mod=bias, mask_mod=mods.sliding_window(7))
    with torch.inference_mode():
        cache = layer.new_cache(2, 140)
        full, full_w = layer(x, x, x, is_causal=True, **kwargs)
    with torch.no_grad():
        head = x[:, :prefill]
        out, _ = layer(head, head, head, cache=cache, **kwargs)
        close(out, full[:, :prefill])
        for t in range(prefill, prefill + 3):
            step = x[:, t : t + 1]
            out, w = layer(step, step, step, cache=cache, **kwargs)
            close(out, full[:, t : t + 1])
            close(w, full_w[:, t : t + 1])


@pytest.mark.parametrize("backend", [None, SDPBackend.MATH])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_backends_and_layouts_with_mods(backend, layout, kv_heads):
    """sdpa_kernel restricted to MATH, (N, L, H, D) buffers seen as (N, H, L, D) views, GQA:
    outputs and q / k / v gradients equal the reference."""
    gen = torch.Generator().manual_seed(28)
    n, h, q_len, k_len, d = 2, 4, 200, 260, 8
    if layout == "transposed":
        q = randn(gen, n, q_len, h, d).transpose(1, 2)
        k = randn(gen, n, k_len, kv_heads, d).transpose(1, 2)
        v = randn(gen, n, k_len, kv_heads, d).transpose(1, 2)
    else:
        q = randn(gen, n, h, q_len, d)
        k, v = randn(gen, n, kv_heads, k_len, d), randn(gen, n, kv_heads, k_len, d)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def mask_mod(b, hh, qi, ki):
        return (qi % 5 != 0) & ((ki + b + hh) % 3 != 0)

    ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
    with ctx:
        out, _ = multihead.attention(q, k, v, mask_mod=mask_mod)
    expected, _ = ref.reference_attention(q, k, v, mask_mod=mask_mod)
    close(out, expected)
    g_out = randn(gen, *out.shape)
    ours = torch.autograd.grad((out * g_out).sum(), (q, k, v))
    theirs = torch.autograd.grad((expected * g_out).sum(), (q, k, v))
    for a, b in zip(ours, theirs, strict=True):
        close(a, b)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided])
def test_nested_inputs_see_their_own_batch_index(layout):
    """Nested inputs with mods that read b and h: each sequence equals a dense call whose
    mods see b shifted to that sequence's index (weights too)."""
    layer = f64_layer(29)
    gen = torch.Generator().manual_seed(30)
    seqs = [randn(gen, n, 8) for n in (5, 140, 3)]
    nested = torch.nested.nested_tensor(seqs, layout=layout)
    reach = torch.tensor([1, 2, 3])

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & (ki >= qi - reach[b] - h)

    def score_mod(s, b, h, qi, ki):
        return s + 0.1 * b + 0.01 * h

    out, w = layer(nested, nested, nested, mask_mod=mask_mod, score_mod=score_mod)
    for i, seq in enumerate(seqs):
        expected, expected_w = layer(
            seq[None],
            seq[None],
            seq[None],
            mask_mod=lambda b, h, qi, ki, i=i: mask_mod(b + i, h, qi, ki),
            score_mod=lambda s, b, h, qi, ki, i=i: score_mod(s, b + i, h, qi, ki),
        )
        close(out.unbind()[i], expected[0])
        close(w.unbind()[i], expected_w[0])


def test_huge_float64_mask_on_a_float32_layer_with_a_window():
    """A float64 attn_mask of -1e300 (beyond float32) on a float32 layer with window=: the
    per-block narrowing equals the dense path on the same constraints, and the float64 layer
    on the row-shifted mask (softmax is shift invariant)."""
    torch.manual_seed(31)
    length = 200
    windowed = MultiheadAttention(8, 2, batch_first=True, window=30)
    dense = MultiheadAttention(8, 2, batch_first=True)
    dense.load_state_dict(windowed.state_dict())
    x = torch.randn(1, length, 8)
    mask = torch.zeros(length, length, dtype=F64)
    mask[100:] = -1e300
    mask[150:, 140:150] = 0.0  # only where the window hides them, for rows >= 179
    mask[:50, 10:20] = 1e200
    i = torch.arange(length)
    band = (i[None] <= i[:, None]) & (i[None] > i[:, None] - 30)
    combined = mask.masked_fill(~band, float("-inf"))
    out, w = windowed(x, x, x, attn_mask=mask, is_causal=True)
    out_dense, w_dense = dense(x, x, x, attn_mask=combined)
    close(out, out_dense, atol=1e-6, rtol=1e-5)
    close(w, w_dense, atol=1e-6, rtol=1e-5)
    mod_out, _ = dense(x, x, x, attn_mask=mask, mask_mod=mods.sliding_window(30))
    close(mod_out, out_dense, atol=1e-6, rtol=1e-5)


def test_gradient_only_on_the_bias_table_and_inference_mode():
    """requires_grad only on RelativePositionBias.weight (q, k, v plain): the gradient
    reaches the table, through the output and through the returned weights; inference_mode
    gives what no_grad gives."""
    q, k, v = qkv(32, 2, 4, 200, 200, 8)
    bias = mods.RelativePositionBias(4, dtype=F64)
    window = mods.sliding_window(50)
    out, w = multihead.attention(
        q, k, v, score_mod=bias, mask_mod=window, need_weights=True, average_weights=False
    )
    expected, expected_w = ref.reference_attention(q, k, v, score_mod=bias, mask_mod=window)
    close(out, expected)
    close(w, expected_w)
    g_out = randn(torch.Generator().manual_seed(33), *out.shape)
    (ours,) = torch.autograd.grad((out * g_out).sum() + w.sum(), bias.weight)
    (theirs,) = torch.autograd.grad((expected * g_out).sum() + expected_w.sum(), bias.weight)
    close(ours, theirs)
    with torch.inference_mode():
        inf_out, _ = multihead.attention(q, k, v, score_mod=bias, mask_mod=window)
    with torch.no_grad():
        ng_out, _ = multihead.attention(q, k, v, score_mod=bias, mask_mod=window)
    close(inf_out, ng_out)


@pytest.mark.parametrize("need_weights", [False, True])
def test_torch_func_with_mods(need_weights):
    """torch.func.grad / jvp through the functional API with a window and ALiBi, over two
    tiles (every tile evaluated, none skipped), and jacrev with respect to the slopes."""
    q, k, v = qkv(34, 1, 2, 140, 140, 4)
    slopes = torch.tensor([0.3, 0.1], dtype=F64)
    window = mods.sliding_window(20)

    def ours(q1, s=slopes):
        return multihead.attention(
            q1, k, v, mask_mod=window, score_mod=mods.alibi(s), need_weights=need_weights
        )[0]

    def theirs(q1, s=slopes):
        return ref.reference_attention(q1, k, v, mask_mod=window, score_mod=ref.ref_alibi(s))[0]

    close(
        torch.func.grad(lambda x: ours(x).pow(2).sum())(q),
        torch.func.grad(lambda x: theirs(x).pow(2).sum())(q),
    )
    tangent = randn(torch.Generator().manual_seed(35), *q.shape)
    close(torch.func.jvp(ours, (q,), (tangent,))[1], torch.func.jvp(theirs, (q,), (tangent,))[1])
    close(
        torch.func.jacrev(lambda s: ours(q, s).sum((-1, -2)))(slopes),
        torch.func.jacrev(lambda s: theirs(q, s).sum((-1, -2)))(slopes),
    )


@pytest.mark.parametrize(
    "kv_heads, extra, masks",
    [
        (4, "none", "bool3d"),
        (2, "add_bias_kv", "float3d"),
        (2, "add_zero_attn", "kpm"),
        (1, "none", "float3d"),
    ],
)
def test_layer_mods_equal_the_same_constraint_as_an_attn_mask(kv_heads, extra, masks):
    """The layer with a b- and h-dependent mask_mod (which empties some rows) and torch's
    masks (3-D bool / float attn_mask, key_padding_mask), GQA and the extra key slots, equals
    the same layer given the mod materialised into a float attn_mask; weights per head and
    input gradients included."""
    kwargs = {} if extra == "none" else {extra: True}
    n, h, q_len, k_len, e = 2, 4, 150, 270, 16
    layer = f64_layer(36, embed_dim=e, num_heads=h, num_kv_heads=kv_heads, **kwargs)
    gen = torch.Generator().manual_seed(37)
    x, memory = randn(gen, n, q_len, e), randn(gen, n, k_len, e)

    def mask_mod(b, hh, qi, ki):
        return ((ki + 3 * hh + 5 * b) % 4 != 0) & (qi % 11 != 3)

    grid = ref.index_grids(n, h, q_len, k_len)
    allowed = torch.broadcast_to(mask_mod(*grid), (n, h, q_len, k_len))
    attn_mask = key_padding_mask = None
    additive = torch.zeros(n, h, q_len, k_len, dtype=F64)
    if masks == "bool3d":
        attn_mask = randn(gen, n * h, q_len, k_len) > 1.2
        additive = additive.masked_fill(attn_mask.view(n, h, q_len, k_len), float("-inf"))
    elif masks == "float3d":
        attn_mask = randn(gen, n * h, q_len, k_len)
        attn_mask = attn_mask.masked_fill(randn(gen, n * h, q_len, k_len) > 1.2, float("-inf"))
        additive = additive + attn_mask.view(n, h, q_len, k_len)
    else:
        key_padding_mask = randn(gen, n, k_len) > 1.0
        additive = additive.masked_fill(key_padding_mask.view(n, 1, 1, k_len), float("-inf"))
    combined = additive.masked_fill(~allowed, float("-inf")).reshape(n * h, q_len, k_len)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, w = layer(
        x1,
        memory,
        memory,
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        mask_mod=mask_mod,
        average_attn_weights=False,
    )
    expected, expected_w = layer(x2, memory, memory, attn_mask=combined, average_attn_weights=False)
    close(out, expected)
    close(w, expected_w)
    assert not out.isnan().any()
    g_out = randn(gen, *out.shape)
    (ours,) = torch.autograd.grad((out * g_out).sum(), x1)
    (theirs,) = torch.autograd.grad((expected * g_out).sum(), x2)
    close(ours, theirs)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_value_of_a_key_hidden_from_some_rows(need_weights, bad):
    """A key's value is NaN / inf and a window hides that key from most rows: those rows
    (output and their gradients) equal the reference with the value zeroed, on every route
    (it was NaN: 0 * NaN in the product with the values); the rows that see the key get the
    non-finite value, as in the formula."""
    q, k, v = qkv(21, 1, 2, 300, 300, 4)
    v = v.clone()
    v[:, :, 150] = bad
    q.requires_grad_()
    mod = mods.sliding_window(20)
    out, _ = multihead.attention(q, k, v, mask_mod=mod, need_weights=need_weights)
    sees = (torch.arange(300) >= 150) & (torch.arange(300) < 170)
    clean = v.clone()
    clean[:, :, 150] = 0.0
    expected, _ = ref.reference_attention(q, k, clean, mask_mod=mod)
    close(out[:, :, ~sees], expected[:, :, ~sees])
    assert not torch.isfinite(out[:, :, sees]).all()
    # The gradient of the rows that do not see the key (a row that sees a NaN value has a
    # NaN gradient term, 0 * NaN, in any formula).
    (grad,) = torch.autograd.grad(out[:, :, ~sees].sum(), q)
    (expected_grad,) = torch.autograd.grad(expected[:, :, ~sees].sum(), q)
    close(grad[:, :, ~sees], expected_grad[:, :, ~sees])
