"""Edge cases of two kinds, each on every kernel path.

Zero sizes: L = 0, S = 0, N = 0 (and unbatched L / S = 0) with every constructor option and mask
form, against ``torch.nn.MultiheadAttention`` in float64, forward and backward; the functional
core with a 0 in any of N, H, L, S, D; a KV cache step without new tokens.

Values that pass validation and then break the math: windows beyond int64, infinite and extreme
soft-caps, extreme rope bases, float masks whose finite values overflow the compute dtype, and
fully masked rows whose masked keys and values hold NaN or inf.

Paths are forced as in test_paths: ``SMALL_SCORES = 0`` sends every non-empty call to "sdpa"
(no weights), "blockwise" (weights, no autograd) or "sdpa+averaged_weights" (averaged weights
under autograd); per-head weights under autograd, and small calls, take "explicit".
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys

import pytest
import torch
from helpers import Config, make_inputs, make_layers, make_masks, to_batch_first
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from modern_reference import modern_reference
from test_modern import build
from test_paths import reference

import multihead
import multihead.functional
from multihead.functional import select_path

F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)
NAN, INF = float("nan"), float("inf")


def _runs(dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(2, 2, dtype=dtype)
        torch.softmax(a @ a, -1)
    except RuntimeError:
        return False
    return True


LOW = [d for d in (torch.float16, torch.bfloat16) if _runs(d)]  # what this CPU can run
LOW_TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2, F64: 1e-10}


@contextlib.contextmanager
def large_call_paths(large: bool):
    """``large``: every non-empty call takes the path a large call takes (see the module doc)."""
    with pytest.MonkeyPatch.context() as mp:
        if large:
            mp.setattr(multihead.functional, "SMALL_SCORES", 0)
        yield


def _grads(outputs, leaves):
    """Gradients of ``outputs`` (with fixed random cotangents) for ``leaves``; None -> zeros."""
    gen = torch.Generator().manual_seed(7)
    outs = [o for o in outputs if o is not None]
    cotangents = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves, cotangents, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]


def _unique(*tensors):
    return list({id(t): t for t in tensors}.values())


def _bias(layer) -> torch.Tensor:
    b = layer.out_proj.bias
    return torch.zeros(layer.embed_dim, dtype=layer.out_proj.weight.dtype) if b is None else b


# ---------------------------------------------------------------------------------------------
# Kind 1: zero sizes
# ---------------------------------------------------------------------------------------------

ZERO_CASES = ["L", "S", "LS", "N", "unbatched L", "unbatched S", "unbatched LS"]


@st.composite
def zero_size_configs(draw) -> Config:
    case = draw(st.sampled_from(ZERO_CASES))
    sizes = case.split()[-1]
    if sizes == "N":
        batch, query_len, key_len = 0, draw(st.integers(0, 3)), draw(st.integers(0, 3))
    else:
        batch = draw(st.integers(1, 3))
        query_len = 0 if "L" in sizes else draw(st.integers(1, 4))
        key_len = 0 if "S" in sizes else draw(st.integers(1, 4))
    num_heads, head_dim = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    embed = num_heads * head_dim
    kdim, vdim = draw(st.none() | st.integers(1, 5)), draw(st.none() | st.integers(1, 5))
    packed = (kdim or embed) == embed and (vdim or embed) == embed
    sharings = ["distinct"]
    if (kdim or embed) == (vdim or embed):
        sharings.append("kv")
    if packed and query_len == key_len:
        sharings.append("self")
    kinds = [None, "bool2d", "bool3d", "float2d", "float3d"]
    if query_len == key_len:
        kinds.append("causal")
    attn_mask = draw(st.sampled_from(kinds))
    return Config(
        num_heads=num_heads,
        head_dim=head_dim,
        bias=draw(st.booleans()),
        add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()),
        kdim=kdim,
        vdim=vdim,
        batch_first=draw(st.booleans()),
        batched=not case.startswith("unbatched"),
        batch=batch,
        query_len=query_len,
        key_len=key_len,
        sharing=draw(st.sampled_from(sharings)),
        key_padding_mask=draw(st.none() | st.sampled_from(["bool", "float"])),
        attn_mask=attn_mask,
        is_causal=attn_mask == "causal",
        need_weights=draw(st.booleans()),
        average_attn_weights=draw(st.booleans()),
        training=draw(st.booleans()),
    )


def _run_layer_against_torch(cfg: Config, large: bool, grad: bool) -> None:
    """Ours and torch's layer on ``cfg``: shapes exactly, values, and (``grad``) the gradients of
    the inputs and parameters. Where torch gives NaN (a row without keys), the documented
    result: output = out_proj.bias, weights 0."""
    ours, theirs, _ = make_layers(cfg)
    query, key, value = make_inputs(cfg)
    kpm, attn = make_masks(cfg, allow_empty_rows=True)  # a 0 in a size: no row can be emptied
    kwargs = dict(
        key_padding_mask=kpm,
        attn_mask=attn,
        need_weights=cfg.need_weights,
        average_attn_weights=cfg.average_attn_weights,
        is_causal=cfg.is_causal,
    )
    with torch.set_grad_enabled(grad):
        with large_call_paths(large):
            out, w = ours(query, key, value, **kwargs)
        try:
            ref, ref_w = theirs(query, key, value, **kwargs)
        except RuntimeError as error:
            # torch's need_weights=False branch cannot view an empty merged mask (N = 0 or
            # S + X = 0: "cannot reshape tensor of 0 elements"). With a 0 in N, L or S no mask
            # entry reaches a score (the extra slots are never masked), so torch without masks
            # is the same oracle.
            assert "reshape tensor of 0 elements" in str(error)
            assert not cfg.need_weights and (kpm is not None or attn is not None)
            kwargs.update(key_padding_mask=None, attn_mask=None, is_causal=False)
            ref, ref_w = theirs(query, key, value, **kwargs)

    n, h, e = cfg.batch, cfg.num_heads, cfg.embed_dim
    q_len = cfg.query_len
    s_all = cfg.key_len + cfg.add_bias_kv + cfg.add_zero_attn
    if cfg.batched:
        out_shape = (n, q_len, e) if cfg.batch_first else (q_len, n, e)
        w_shape = (n, q_len, s_all) if cfg.average_attn_weights else (n, h, q_len, s_all)
    else:
        out_shape = (q_len, e)
        w_shape = (q_len, s_all) if cfg.average_attn_weights else (h, q_len, s_all)
    assert out.shape == ref.shape == out_shape
    assert out.dtype == ref.dtype
    expected = torch.where(ref.isnan(), _bias(theirs).expand_as(ref), ref)
    torch.testing.assert_close(out, expected, **TOL)
    if cfg.need_weights and ref_w is None:
        # torch's native inference fast path (eval, no grad, self-attention, batch_first) drops
        # the weights of an empty call and returns None; ours are the documented empty shape.
        assert not grad and not ours.training and w.shape == w_shape and w.numel() == 0
    elif cfg.need_weights:
        assert w.shape == ref_w.shape == w_shape
        torch.testing.assert_close(w, torch.nan_to_num(ref_w, nan=0.0), **TOL)
    else:
        assert w is None and ref_w is None
    if grad:
        leaves = _unique(query, key, value)
        names = [name for name, _ in ours.named_parameters()]
        theirs_params = dict(theirs.named_parameters())
        got = _grads((out, w), leaves + list(ours.parameters()))
        want = _grads((ref, ref_w), leaves + [theirs_params[name] for name in names])
        for x, a, b in zip(leaves + names, got, want, strict=True):
            assert a.shape == b.shape
            if isinstance(x, torch.Tensor):
                assert a.shape == x.shape
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")
@settings(max_examples=150)
@given(cfg=zero_size_configs(), large=st.booleans(), grad=st.booleans())
@example(cfg=Config(num_heads=2, head_dim=2, query_len=0, key_len=3), large=False, grad=True)
def test_zero_sizes_match_torch(cfg, large, grad):
    """L / S / N = 0 (unbatched L / S = 0), every option and mask form, train and eval, with and
    without autograd: torch's shapes exactly, torch's values (output = out_proj.bias for S = 0
    without extra slots), and torch's input and parameter gradients."""
    _run_layer_against_torch(cfg, large, grad)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")
@pytest.mark.parametrize(
    "extra",
    [dict(add_bias_kv=True), dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True)],
    ids=["bias_kv", "zero_attn", "both"],
)
@pytest.mark.parametrize(
    ("need_weights", "average", "grad"),
    [
        (False, True, False),  # sdpa
        (False, True, True),  # sdpa under autograd
        (True, True, False),  # blockwise, averaged
        (True, False, False),  # blockwise, per head
        (True, True, True),  # sdpa+averaged_weights
        (True, False, True),  # explicit (per-head weights under autograd)
    ],
)
@pytest.mark.parametrize("batch_first", [False, True])
def test_no_keys_but_extra_slots_on_every_path(extra, need_weights, average, grad, batch_first):
    """The non-empty neighbour of S = 0: the extra slots alone are the keys, so the call is not
    empty and takes the large-call paths; every one equals torch (masks of shape (N, 0) and
    (N * H, L, 0) included)."""
    cfg = Config(
        num_heads=2,
        head_dim=3,
        batch=2,
        query_len=3,
        key_len=0,
        batch_first=batch_first,
        key_padding_mask="bool",
        attn_mask="float3d",
        need_weights=need_weights,
        average_attn_weights=average,
        training=grad,
        **extra,
    )
    _run_layer_against_torch(cfg, large=True, grad=grad)


@st.composite
def zero_size_problems(draw):
    sizes = dict(
        N=draw(st.integers(1, 2)),
        H=draw(st.sampled_from([2, 4])),
        L=draw(st.integers(1, 4)),
        S=draw(st.integers(1, 4)),
        D=draw(st.integers(1, 3)),
    )
    zeros = draw(st.sets(st.sampled_from("NHLSD"), min_size=1, max_size=2))
    if "D" in zeros:  # D = 0 alone, and without weights: see test_zero_head_dim_with_weights
        zeros = {"D"}
    for name in zeros:
        sizes[name] = 0
    kv_heads = sizes["H"] if sizes["H"] == 0 else draw(st.sampled_from([sizes["H"], 1]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    n, h, q_len, s_len, d = (sizes[x] for x in "NHLSD")

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    kind = draw(st.sampled_from([None, "full", "padding", "2d"]))
    mask = None
    if kind is not None:
        shape = {"full": (n, h, q_len, s_len), "padding": (n, 1, 1, s_len), "2d": (q_len, s_len)}
        mask = t(*shape[kind]).masked_fill(torch.rand(shape[kind], generator=gen) < 0.3, -INF)
    q, k, v = t(n, h, q_len, d), t(n, kv_heads, s_len, d), t(n, kv_heads, s_len, d)
    return q, k, v, mask


@settings(max_examples=100)
@given(
    problem=zero_size_problems(),
    is_causal=st.booleans(),
    need_weights=st.booleans(),
    average=st.booleans(),
    large=st.booleans(),
    grad=st.booleans(),
)
def test_functional_attention_with_a_zero_size(
    problem, is_causal, need_weights, average, large, grad
):
    """``multihead.attention`` with 0 in N, H, L, S or D (grouped heads too): shapes
    ``(N, H, L, D)`` / ``(N, L, S)`` / ``(N, H, L, S)``, the formula's values, and input
    gradients of the inputs' shapes equal to the formula's. (D = 0 with weights: see
    test_zero_head_dim_with_weights.)"""
    q, k, v, mask = problem
    n, h, q_len, d = q.shape
    s_len = k.shape[2]
    if d == 0:
        need_weights = False
    leaves = [x.clone().requires_grad_(grad) for x in (q, k, v)]
    with torch.set_grad_enabled(grad), large_call_paths(large):
        out, w = multihead.attention(
            *leaves, mask, is_causal=is_causal, need_weights=need_weights, average_weights=average
        )
    assert out.shape == (n, h, q_len, d)
    if need_weights:
        assert w.shape == ((n, q_len, s_len) if average else (n, h, q_len, s_len))
    else:
        assert w is None
    group = 1 if k.shape[1] == 0 else h // k.shape[1]
    ref_leaves = [x.clone().requires_grad_(grad) for x in (q, k, v)]
    with torch.set_grad_enabled(grad):
        rk, rv = (x.repeat_interleave(group, dim=1) for x in ref_leaves[1:])
        ref, ref_w = reference(ref_leaves[0], rk, rv, mask, is_causal)
    torch.testing.assert_close(out, ref, **TOL)
    if need_weights:
        # The mean over H = 0 heads is NaN, as torch.mean's (and the formula's).
        torch.testing.assert_close(w, ref_w.mean(1) if average else ref_w, equal_nan=h == 0, **TOL)
    if grad:
        got = _grads((out, w), leaves)
        want = _grads(
            (ref, None if w is None else (ref_w.mean(1) if average else ref_w)), ref_leaves
        )
        for x, a, b in zip(leaves, got, want, strict=True):
            assert a.shape == x.shape
            torch.testing.assert_close(a, b, **TOL)


def test_zero_size_calls_take_the_explicit_path():
    """A call with no scores (a 0 in N, H, L or S) takes the explicit path whatever else is
    asked: the fused kernels are not asked about empty tensors."""
    for need_weights, average, dropout_p, needs_grad, softcap in itertools.product(
        (False, True), (False, True), (0.0, 0.5), (False, True), (False, True)
    ):
        path = select_path(
            need_weights=need_weights,
            average_weights=average,
            dropout_p=dropout_p,
            needs_grad=needs_grad,
            score_elements=0,
            softcap=softcap,
        )
        assert path == "explicit", (need_weights, average, dropout_p, needs_grad, softcap)


@st.composite
def chunkings(draw, total: int):
    """(start, stop) chunks covering [0, total), with empty chunks at the start, in the middle
    and at the end."""
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=1, max_size=4)))
    bounds = [0, 0, *cuts, cuts[len(cuts) // 2], total, total]
    bounds.sort()
    return list(itertools.pairwise(bounds))


@settings(max_examples=25)
@given(
    kv_heads=st.sampled_from([None, 2, 1]),
    rope=st.booleans(),
    window=st.none() | st.integers(1, 4),
    chunks=chunkings(7),
    max_len=st.sampled_from([7, 9]),
    need_weights=st.booleans(),
    large=st.booleans(),
)
def test_kv_cache_step_without_new_tokens(
    kv_heads, rope, window, chunks, max_len, need_weights, large
):
    """A cache step with x of shape (N, 0, E) returns (N, 0, E) (weights (N, 0, max_len)) and
    leaves cache.length as it was (a full cache included); the real steps around it equal the
    no-cache causal pass."""
    layer = build(embed_dim=16, num_heads=4, num_kv_heads=kv_heads, rope=rope, window=window)
    layer.eval()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad(), large_call_paths(large):
        full, _ = layer(x, x, x, is_causal=True)
        cache = layer.new_cache(2, max_len)
        pieces = []
        for start, stop in chunks:
            chunk = x[:, start:stop]
            out, w = layer(chunk, chunk, chunk, cache=cache, need_weights=need_weights)
            assert out.shape == (2, stop - start, 16)
            if need_weights:
                assert w.shape == (2, stop - start, max_len)
            assert cache.length == stop
            pieces.append(out)
    assert any(a == b for a, b in chunks)
    torch.testing.assert_close(torch.cat(pieces, 1), full, **TOL)


@pytest.mark.parametrize(
    ("shape", "need_weights"), [((1, 2, 3, 0), True), ((0, 2, 3, 0), False)], ids=["weights", "N=0"]
)
def test_zero_head_dim_with_weights(shape, need_weights):
    """q, k of head dim 0: every logit is an empty sum, 0, so the weights are uniform over the
    keys; a result of the right shape, never a ZeroDivisionError (1 / sqrt(0)) or NaN."""
    n, h, q_len, _ = shape
    q, k, v = torch.randn(shape), torch.randn(n, h, 4, 0), torch.randn(n, h, 4, 0)
    for softcap in (None, 1.0):
        out, w = multihead.attention(q, k, v, need_weights=need_weights, softcap=softcap)
        assert out.shape == shape
        assert w is None or (w.shape == (n, q_len, 4) and (w == 0.25).all())


# ---------------------------------------------------------------------------------------------
# Kind 2: values that pass validation and then break the math
# ---------------------------------------------------------------------------------------------

HUGE_WINDOWS = [2**62, 2**63 - 1, 2**63, 2**64, 10**30, 10**100]


@settings(max_examples=60)
@given(
    window=st.sampled_from([*HUGE_WINDOWS, "max(L, S)"]) | st.integers(6, 2**200),
    query_len=st.integers(1, 6),
    key_len=st.integers(1, 6),
    is_causal=st.booleans(),
    need_weights=st.booleans(),
    large=st.booleans(),
)
@example(2**63, 5, 5, False, True, False)
@example(10**30, 5, 3, True, False, True)
def test_window_at_least_the_sequence_length_is_no_limit(
    window, query_len, key_len, is_causal, need_weights, large
):
    """window >= max(L, S) (2**62, 2**63, 10**30, ...) is no limit: the same output and weights
    as window=None, bit for bit, never NaN nor OverflowError; L != S too."""
    if window == "max(L, S)":
        window = max(query_len, key_len)
    windowed = build(embed_dim=8, num_heads=2, window=window)
    plain = build(embed_dim=8, num_heads=2)
    gen = torch.Generator().manual_seed(query_len * 7 + key_len)
    q = torch.randn(2, query_len, 8, generator=gen, dtype=F64)
    kv = q if query_len == key_len else torch.randn(2, key_len, 8, generator=gen, dtype=F64)
    with torch.no_grad(), large_call_paths(large):
        out, w = windowed(q, kv, kv, is_causal=is_causal, need_weights=need_weights)
        ref, ref_w = plain(q, kv, kv, is_causal=is_causal, need_weights=need_weights)
    assert not out.isnan().any()
    assert torch.equal(out, ref)
    assert (w is None and ref_w is None) or torch.equal(w, ref_w)


@settings(max_examples=15)
@given(
    window=st.sampled_from(HUGE_WINDOWS),
    kv_heads=st.sampled_from([None, 1]),
    chunks=chunkings(8),
    need_weights=st.booleans(),
)
@example(2**63, None, [(0, 5), (5, 6), (6, 8)], True)
@example(10**30, 1, [(0, 1), (1, 8)], False)
def test_huge_window_with_a_kv_cache_is_no_limit(window, kv_heads, chunks, need_weights):
    """A rope + window layer decoding with a cache: a window past int64 equals window=None step
    for step, bit for bit, and the causal pass without cache."""
    kwargs = dict(embed_dim=16, num_heads=4, num_kv_heads=kv_heads, rope=True)
    windowed, plain = build(window=window, **kwargs).eval(), build(**kwargs).eval()
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(5), dtype=F64)
    with torch.no_grad():
        full, _ = plain(x, x, x, is_causal=True)
        caches = windowed.new_cache(2, 10), plain.new_cache(2, 10)
        pieces = []
        for start, stop in chunks:
            chunk = x[:, start:stop]
            out, w = windowed(chunk, chunk, chunk, cache=caches[0], need_weights=need_weights)
            ref, ref_w = plain(chunk, chunk, chunk, cache=caches[1], need_weights=need_weights)
            assert not out.isnan().any()
            assert torch.equal(out, ref)
            assert (w is None and ref_w is None) or torch.equal(w, ref_w)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), full, **TOL)


def test_non_finite_softcap_is_refused():
    """softcap = inf, -inf, NaN, or beyond 1e300 (where the backward's gradient * softcap
    overflows float64): a ValueError naming `softcap`, from the layer's constructor and from
    multihead.attention."""
    q = torch.randn(1, 2, 3, 4)
    for cap in (INF, -INF, NAN, 1.01e300, sys.float_info.max):
        with pytest.raises(ValueError, match="`softcap`"):
            multihead.MultiheadAttention(8, 2, softcap=cap)
        with pytest.raises(ValueError, match="`softcap`"):
            multihead.attention(q, q, q, softcap=cap)


HUGE_CAPS = [1e39, 1e200, 1e300]
TINY_CAPS = [1e-300, 5e-324]


@settings(max_examples=60)
@given(
    cap=st.sampled_from(HUGE_CAPS + TINY_CAPS),
    dtype=st.sampled_from([torch.float32, F64, *LOW]),
    mode=st.sampled_from(["small", "large", "grad"]),
    need_weights=st.booleans(),
)
@example(1e39, torch.float32, "small", True)
@example(1e300, torch.float32, "large", False)
@example(1e300, F64, "grad", False)
def test_extreme_finite_softcaps(cap, dtype, mode, need_weights):
    """Huge (1e39, 1e200, 1e300, the largest allowed) and tiny (1e-300, 5e-324) caps, float32 /
    float64 / float16 / bfloat16: finite outputs and weights, equal to c * tanh(logits / c)
    computed in float64 by hand; huge caps equal the uncapped layer (c * tanh(x / c) -> x);
    finite gradients."""
    exact = build(embed_dim=8, num_heads=2, softcap=cap)
    capped = copy.deepcopy(exact).to(dtype)
    uncapped = copy.deepcopy(capped)
    uncapped.softcap = None
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    x.requires_grad_(mode == "grad")
    with torch.set_grad_enabled(mode == "grad"), large_call_paths(mode == "large"):
        out, w = capped(x, x, x, need_weights=need_weights)
        plain, plain_w = uncapped(x, x, x, need_weights=need_weights)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert w is None or torch.isfinite(w).all()
    tol = dict(atol=LOW_TOL[dtype], rtol=LOW_TOL[dtype])
    x64 = x.detach().double()
    ref, ref_w = modern_reference(copy.deepcopy(capped).double(), x64, x64, x64)
    torch.testing.assert_close(out.double(), ref, **tol)
    if need_weights:
        torch.testing.assert_close(w.double(), ref_w.mean(1), **tol)
    if cap in HUGE_CAPS:
        torch.testing.assert_close(out, plain, **tol)
        if need_weights:
            torch.testing.assert_close(w, plain_w, **tol)
    if mode == "grad":
        grads = _grads((out, w), [x, *capped.parameters()])
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, F64, *LOW])
def test_gradients_at_the_largest_softcap(dtype):
    """With the largest allowed cap (1e300) the layer is the uncapped one, gradients included:
    the backward's gradient * softcap does not overflow."""
    capped = build(embed_dim=8, num_heads=2, softcap=1e300).to(dtype)
    uncapped = copy.deepcopy(capped)
    uncapped.softcap = None
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x.requires_grad_()
    grads = _grads(capped(x, x, x, need_weights=False), [x, *capped.parameters()])
    ref = _grads(uncapped(x, x, x, need_weights=False), [x, *uncapped.parameters()])
    for a, b in zip(grads, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=LOW_TOL[dtype], rtol=LOW_TOL[dtype])


def test_rope_base_must_be_finite_and_at_least_one():
    """rope_base that is not finite or below 1 (inf, -inf, NaN, 0.999, 0.5, 1e-300, 0) is
    refused at construction with a ValueError naming `rope_base`; 1.0 and 1e300 are accepted
    and give finite outputs (float32, float64) equal to the formula (float64)."""
    for base in (INF, -INF, NAN, 0.999, 0.5, 1e-300, 0.0):
        with pytest.raises(ValueError, match="`rope_base`"):
            multihead.MultiheadAttention(8, 2, rope=True, rope_base=base)
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    for base in (1.0, 1e300):
        layer = build(embed_dim=8, num_heads=2, rope=True, rope_base=base)
        for dtype in (torch.float32, F64):
            out, _ = copy.deepcopy(layer).to(dtype)(x.to(dtype), x.to(dtype), x.to(dtype))
            assert torch.isfinite(out).all()
        out, w = layer(x, x, x, is_causal=True)
        ref, ref_w = modern_reference(layer, x, x, x, is_causal=True)
        torch.testing.assert_close(out, ref, **TOL)
        torch.testing.assert_close(w, ref_w.mean(1), **TOL)


# (layer dtype, mask dtype): the mask's dtype holds finite values beyond the layer dtype's range.
CAST_PAIRS = [
    (torch.float32, F64),
    *[(low, torch.float32) for low in LOW],
    *[(low, F64) for low in LOW],
]
CAST_WHERE = {"key_padding_mask": "float", "attn_mask 2d": "float2d", "attn_mask 3d": "float3d"}


@st.composite
def overflowing_mask_rows(draw):
    """A layer and mask dtype, where the rows go, and per chosen row a finite negative constant
    that overflows to -inf in the layer's dtype (and optionally some keys at -inf)."""
    layer_dtype, mask_dtype = draw(st.sampled_from(CAST_PAIRS))
    info = torch.finfo(layer_dtype)
    # Beyond max * (1 + eps / 2) a value rounds to inf in the layer's dtype.
    lo, hi = -torch.finfo(mask_dtype).max, -info.max * (1 + info.eps / 2)
    where = draw(st.sampled_from(sorted(CAST_WHERE)))
    n_rows = {"key_padding_mask": 2, "attn_mask 2d": 3, "attn_mask 3d": 2 * 2 * 3}[where]
    rows = sorted(draw(st.sets(st.integers(0, n_rows - 1), min_size=1)))
    constants = [draw(st.floats(lo, hi)) for _ in rows]
    hidden = [draw(st.sets(st.integers(1, 3), max_size=2)) for _ in rows]  # key 0 stays
    return layer_dtype, mask_dtype, where, rows, constants, hidden


@settings(max_examples=60)
@given(case=overflowing_mask_rows(), need_weights=st.booleans(), large=st.booleans())
@example((torch.float32, F64, "key_padding_mask", [1], [-1e300], [set()]), True, False)
@example((torch.float32, F64, "attn_mask 2d", [0, 2], [-1e39, -1e39], [set(), {2}]), False, True)
def test_large_finite_negative_mask_rows_keep_their_meaning(case, need_weights, large):
    """A float mask row whose finite entries are one large negative constant (-1e300 or -1e39
    in float64 on a float32 layer; beyond float16 / bfloat16's range in float32 or float64 on a
    low-precision layer) equals that row at 0: uniform over the row's logits, not an empty row
    (output = bias). Keys at -inf in the row stay masked. key_padding_mask and 2-D / 3-D
    attn_mask; the inference paths (explicit, sdpa, blockwise)."""
    layer_dtype, mask_dtype, where, rows, constants, hidden = case
    for c in constants:
        assume(torch.tensor(c, dtype=mask_dtype).to(layer_dtype).isinf())
    cfg_mask = CAST_WHERE[where]
    cfg = Config(
        num_heads=2,
        head_dim=4,
        batch=2,
        query_len=3,
        key_len=4,
        batch_first=True,
        key_padding_mask=cfg_mask if where == "key_padding_mask" else None,
        attn_mask=None if where == "key_padding_mask" else cfg_mask,
    )
    kpm, attn = make_masks(cfg)  # float64, key 0 never -inf
    base = (kpm if kpm is not None else attn).to(mask_dtype)
    big, zero = base.clone(), base.clone()
    flat_big, flat_zero = big.view(-1, 4), zero.view(-1, 4)
    for row, c, keys in zip(rows, constants, hidden, strict=True):
        flat_big[row], flat_zero[row] = c, 0.0
        for j in keys:
            flat_big[row, j] = flat_zero[row, j] = -INF
    layer = copy.deepcopy(build(embed_dim=8, num_heads=2)).to(layer_dtype)
    gen = torch.Generator().manual_seed(4)
    x, kv = (torch.randn(2, n, 8, generator=gen, dtype=F64).to(layer_dtype) for n in (3, 4))
    name = "key_padding_mask" if where == "key_padding_mask" else "attn_mask"
    with torch.no_grad(), large_call_paths(large):
        out, w = layer(x, kv, kv, need_weights=need_weights, **{name: big})
        ref, ref_w = layer(x, kv, kv, need_weights=need_weights, **{name: zero})
    tol = dict(atol=LOW_TOL[layer_dtype], rtol=LOW_TOL[layer_dtype])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **tol)
    if need_weights:
        torch.testing.assert_close(w, ref_w, **tol)


MASKED_ROW = 2  # the query row that attn_mask empties


@settings(max_examples=120)
@given(
    form=st.sampled_from(["kpm", "attn2d", "attn2d+kpm", "attn3d"]),
    mask_kind=st.sampled_from(["bool", "float"]),
    poison=st.sampled_from([None, NAN, INF, -INF]),
    need_weights=st.booleans(),
    average=st.booleans(),
    grad=st.booleans(),
    large=st.booleans(),
    batch_first=st.booleans(),
    seed=st.integers(0, 1000),
)
@example("kpm", "bool", NAN, True, True, False, False, True, 0)
@example("attn3d", "float", INF, True, False, True, False, False, 1)
def test_fully_masked_rows_give_the_output_bias(
    form, mask_kind, poison, need_weights, average, grad, large, batch_first, seed
):
    """A query row with every key masked (bool True or -inf; key_padding_mask, 2-D attn_mask,
    per-head 3-D attn_mask) has output = out_proj.bias exactly and weights exactly 0, on every
    path, even when the keys and values at positions masked for every query hold NaN / inf
    (batch item 1, all of whose keys are masked). Other rows and items equal torch (on clean
    inputs), gradients included where torch's are finite; ours are finite everywhere."""
    poisonable = form != "attn2d"
    assume(poison is None or poisonable)
    masks_2d = {"attn2d": "2d", "attn2d+kpm": "2d", "attn3d": "3d"}
    cfg = Config(
        num_heads=2,
        head_dim=2,
        batch=3,
        query_len=4,
        key_len=5,
        batch_first=batch_first,
        sharing="distinct",
        key_padding_mask=mask_kind if "kpm" in form else None,
        attn_mask=mask_kind + masks_2d[form] if form in masks_2d else None,
        need_weights=need_weights,
        average_attn_weights=average,
        training=grad,
    )
    ours, theirs, _ = make_layers(cfg, seed)
    query, key, value = make_inputs(cfg, seed)
    kpm, attn = make_masks(cfg, seed)  # key 0 never masked: no row is empty yet
    masked = True if mask_kind == "bool" else -INF
    h = cfg.num_heads
    if kpm is not None:
        kpm[1] = masked
    if form.startswith("attn2d"):
        attn[MASKED_ROW] = masked
    if form == "attn3d":
        attn[h : 2 * h] = masked  # item 1, every head and row
        attn[:h, MASKED_ROW] = masked  # item 0, one row in every head

    def hidden(m):
        return m if m.dtype == torch.bool else m == -INF

    n, q_len, s_len = cfg.batch, cfg.query_len, cfg.key_len
    hides = torch.zeros(n, h, q_len, s_len, dtype=torch.bool)
    if kpm is not None:
        hides |= hidden(kpm).view(n, 1, 1, s_len)
    if attn is not None:
        hides |= hidden(attn).view(-1, h, q_len, s_len) if attn.dim() == 3 else hidden(attn)
    empty_heads = hides.all(-1)  # (N, H, L)
    empty = empty_heads.all(1)  # (N, L)
    assert torch.equal(empty_heads.any(1), empty) and empty.any()

    key_in, value_in = key, value
    if poison is not None:
        key_in, value_in = (x.detach().clone() for x in (key, value))
        for x in (key_in, value_in):
            to_batch_first(x, cfg)[1] = poison  # item 1: keys masked for every query
        key_in.requires_grad_()
        value_in.requires_grad_()
    kwargs = dict(
        key_padding_mask=kpm,
        attn_mask=attn,
        need_weights=need_weights,
        average_attn_weights=average,
    )
    with torch.set_grad_enabled(grad):
        with large_call_paths(large):
            out, w = ours(query, key_in, value_in, **kwargs)
        ref, ref_w = theirs(query, key, value, **kwargs)

    bias = _bias(ours)
    assert not out.isnan().any()
    rows = to_batch_first(out, cfg)[empty]  # (rows, E)
    assert torch.equal(rows, bias.expand_as(rows))
    expected = torch.where(ref.isnan(), _bias(theirs).expand_as(ref), ref)
    torch.testing.assert_close(out, expected, **TOL)
    if need_weights:
        assert not w.isnan().any()
        per_row = w if average else w.transpose(1, 2)  # (N, L, [H,] S)
        assert (per_row[empty] == 0).all()
        torch.testing.assert_close(w, torch.nan_to_num(ref_w, nan=0.0), **TOL)
    if grad and poison is None:
        leaves = [query, key, value]
        got = _grads((out, w), leaves)
        want = _grads((ref, ref_w), leaves)
        for a, b in zip(got, want, strict=True):
            assert torch.isfinite(a).all()
            finite = torch.isfinite(b)
            torch.testing.assert_close(a[finite], b[finite], **TOL)
        if form == "kpm":  # item 1 has no key at all: its output does not depend on its query
            assert (to_batch_first(got[0], cfg)[1] == 0).all()


@pytest.mark.parametrize("average", [True, False])
def test_blockwise_path_with_nan_values_of_fully_masked_rows(average):
    """Minimal form of the above on the blockwise path (weights, no autograd, a large call):
    a query without keys gets output 0 and weights 0, whatever its masked values hold."""
    q, k = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 2, 4)
    v = torch.full((1, 1, 2, 4), NAN)  # values of keys that every query masks
    mask = torch.full((1, 1, 1, 2), -INF)  # the one query has no key
    with torch.no_grad(), large_call_paths(True):
        out, w = multihead.attention(q, k, v, mask, need_weights=True, average_weights=average)
    assert (w == 0).all()
    assert (out == 0).all()
