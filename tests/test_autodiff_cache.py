"""Autodiff reaches everything, on every kernel path; and the KV cache keeps its promises.

Kind A, against ``torch.nn.MultiheadAttention`` with identical parameters, in float64: a float
attn_mask that happens to be the causal pattern still gets its gradient; double backward
(a gradient penalty), ``gradgradcheck``, ``torch.func`` (grad, vmap, jacrev, jvp) and
forward-mode AD work on every path that :func:`multihead.functional.select_path` picks.
Big-size paths are forced by setting ``SMALL_SCORES`` to 0; a few cases are genuinely large.

torch's own layer has no double backward and no forward AD with ``need_weights=False`` (its
SDPA flash kernel); there the oracle is torch's layer with ``need_weights=True``, whose output
is the same function.

Each path test runs all its cases and reports every failing one, so one failure does not hide
another.

Kind B: the cache works under autocast and inference_mode, refuses what it cannot serve (wrong
dtype or device, another layer, autograd) with an error naming ``cache``, and a refused call
leaves it exactly as it was.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest
import torch
from helpers import DTYPE, Config, make_inputs, make_layers, make_masks
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call, jacrev, jvp, vmap

import multihead
import multihead.functional
import multihead.layer
from multihead import KVCache
from multihead.functional import SMALL_SCORES, attention

INF = float("-inf")
TOL = dict(atol=1e-8, rtol=1e-8)


# --------------------------------------------------------------------------------------------
# Kind A: the cases, one per path (and per weights option)


@dataclass(frozen=True)
class Case:
    """A layer call whose plain forward takes ``path``."""

    name: str
    path: str
    cfg: Config
    need_weights: bool
    average: bool = True
    forced: bool = False  # SMALL_SCORES patched to 0: the big-size paths at a small size
    grad: bool = True  # under autograd; False: under no_grad (the inference paths)
    # The layer's plain-call shortcut (MultiheadAttention._forward_plain) turned off, so that a
    # small unmasked self-attention call takes the full path it stands in for.
    full_path: bool = False


SMALL = Config(
    num_heads=2, head_dim=4, batch_first=True, batch=2, query_len=5, key_len=5, sharing="self"
)
DISTINCT = Config(num_heads=2, head_dim=4, kdim=3, vdim=5, batch=2, query_len=4, key_len=6)
LARGE = Config(
    num_heads=2, head_dim=4, batch_first=True, batch=1, query_len=100, key_len=100, sharing="self"
)
assert LARGE.batch * LARGE.num_heads * LARGE.query_len * LARGE.key_len > SMALL_SCORES
assert SMALL.batch * SMALL.num_heads * SMALL.query_len * SMALL.key_len <= SMALL_SCORES

CAUSAL, PADDING = dict(attn_mask="causal"), dict(key_padding_mask="bool")
SPA = "sdpa+averaged_weights"

GRAD_CASES = [
    Case("plain small", "plain", SMALL, False),
    Case("plain small averaged", "plain", SMALL, True),
    Case("plain small per-head", "plain", SMALL, True, False),
    Case("sdpa small", "sdpa", SMALL, False, full_path=True),
    Case("sdpa small causal", "sdpa", replace(SMALL, **CAUSAL), False),
    Case("explicit small averaged padding", "explicit", replace(SMALL, **PADDING), True),
    Case("explicit small per-head causal", "explicit", replace(SMALL, **CAUSAL), True, False),
    Case("sdpa forced kdim/vdim padding", "sdpa", replace(DISTINCT, **PADDING), False, forced=True),
    Case(f"{SPA} forced causal", SPA, replace(SMALL, **CAUSAL), True, forced=True),
    Case(
        f"{SPA} forced kdim/vdim float masks",
        SPA,
        replace(DISTINCT, attn_mask="float3d", key_padding_mask="float"),
        True,
        forced=True,
    ),
    Case(
        "explicit forced per-head padding",
        "explicit",
        replace(SMALL, **PADDING),
        True,
        False,
        forced=True,
    ),
    Case("sdpa large causal", "sdpa", replace(LARGE, **CAUSAL), False),
    Case(f"{SPA} large default call", SPA, LARGE, True),
    Case("explicit large per-head padding", "explicit", replace(LARGE, **PADDING), True, False),
]
INFERENCE_CASES = [
    Case(
        "blockwise forced averaged causal",
        "blockwise",
        replace(SMALL, **CAUSAL),
        True,
        forced=True,
        grad=False,
    ),
    Case(
        "blockwise forced per-head kdim/vdim padding",
        "blockwise",
        replace(DISTINCT, **PADDING),
        True,
        False,
        forced=True,
        grad=False,
    ),
    Case("blockwise large default call", "blockwise", LARGE, True, grad=False),
    Case("plain small no_grad", "plain", SMALL, False, grad=False),
    Case("plain small per-head no_grad", "plain", SMALL, True, False, grad=False),
    Case("sdpa small no_grad", "sdpa", SMALL, False, grad=False, full_path=True),
    Case(
        "explicit small per-head no_grad",
        "explicit",
        SMALL,
        True,
        False,
        grad=False,
        full_path=True,
    ),
]
ALL_CASES = GRAD_CASES + INFERENCE_CASES


@contextmanager
def recorded_paths(forced: bool, full_path: bool = False) -> Iterator[list[str]]:
    """Yields the list of paths select_path returns meanwhile, and "plain" for each call the
    layer's plain-call shortcut runs; ``forced``: SMALL_SCORES = 0; ``full_path``: the
    shortcut turned off."""
    seen: list[str] = []
    real = multihead.functional.select_path
    real_plain = multihead.layer.packed_self_attention

    def spy(**kwargs):
        seen.append(real(**kwargs))
        return seen[-1]

    def plain_spy(*args, **kwargs):
        seen.append("plain")
        return real_plain(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multihead.functional, "select_path", spy)
        mp.setattr(multihead.layer, "packed_self_attention", plain_spy)
        if forced:
            mp.setattr(multihead.functional, "SMALL_SCORES", 0)
        if full_path:
            mp.setattr(multihead.MultiheadAttention, "_forward_plain", lambda *args: None)
        yield seen


@contextmanager
def on_path(case: Case) -> Iterator[list[str]]:
    """The case's size regime and grad mode, recording the paths taken."""
    with recorded_paths(case.forced, case.full_path) as seen, torch.set_grad_enabled(case.grad):
        yield seen


def run_cases(check: Callable[[Case], None], cases: list) -> None:
    """Runs ``check`` on every case and reports all the failing ones together."""
    failures = []
    for case in cases:
        try:
            check(case)
        except Exception as error:
            failures.append(f"[{case.name}] {type(error).__name__}: {str(error)[:400]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def unique(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return list({id(t): t for t in tensors}.values())


def as_qkv(case: Case, args):
    """q, k, v from the distinct input tensors (one for self-attention)."""
    if case.cfg.sharing == "self":
        return args[0], args[0], args[0]
    return tuple(args)


def setup(case: Case, seed: int = 0):
    """Ours and torch's layer with identical parameters, the distinct inputs (leaves that
    require grad under autograd) and the case's masks."""
    ours, theirs, _ = make_layers(case.cfg, seed)
    if not case.grad:
        ours.requires_grad_(False)
        theirs.requires_grad_(False)
    inputs = unique(*make_inputs(case.cfg, seed))
    if not case.grad:
        inputs = [x.detach() for x in inputs]
    kpm, am = make_masks(case.cfg, seed)
    return ours, theirs, inputs, kpm, am


def ours_call(case, layer, args, kpm, am):
    q, k, v = as_qkv(case, args)
    return layer(
        q,
        k,
        v,
        key_padding_mask=kpm,
        attn_mask=am,
        need_weights=case.need_weights,
        average_attn_weights=case.average,
    )


def torch_call(case, layer, args, kpm, am):
    """torch's layer, always with weights (its only differentiable-twice / forward-AD path);
    the weights are dropped when the case does not ask for them."""
    q, k, v = as_qkv(case, args)
    out, w = layer(
        q,
        k,
        v,
        key_padding_mask=kpm,
        attn_mask=am,
        need_weights=True,
        average_attn_weights=case.average,
    )
    return out, (w if case.need_weights else None)


def cotangents(case, theirs, args, kpm, am, seed=0):
    with torch.no_grad():
        out, w = torch_call(case, theirs, [a.detach() for a in args], kpm, am)
    gen = torch.Generator().manual_seed(seed + 7)
    g_out = torch.randn(out.shape, generator=gen, dtype=DTYPE)
    g_w = None if w is None else torch.randn(w.shape, generator=gen, dtype=DTYPE)
    return g_out, g_w


def objective(out, w, g_out, g_w):
    loss = (out * g_out).sum()
    return loss if w is None else loss + (w * g_w).sum()


def assert_path(case, ours, args, kpm, am):
    """The case's plain forward (outside any transform) takes the path it is named for."""
    with on_path(case) as seen:
        ours_call(case, ours, args, kpm, am)
    assert seen == [case.path], f"expected path {case.path}, got {seen}"


def assert_close_or_zero(a, b, what):
    """None (not reached by the graph) counts as a zero gradient."""
    if a is None and b is None:
        return
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def as_function(case, layer, call, kpm, am):
    """The call as a function of the distinct inputs, returning only tensors (for torch.func)."""

    def fn(*xs):
        out, w = call(case, layer, xs, kpm, am)
        return (out, w) if case.need_weights else out

    return fn


def flat(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [leaf for sub in tree for leaf in flat(sub)]


# --------------------------------------------------------------------------------------------
# Kind A: a causal-pattern float mask that requires grad gets its gradient


@settings(max_examples=30)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 3),
    length=st.integers(1, 7),
    batch_first=st.booleans(),
    need_weights=st.booleans(),
    average=st.booleans(),
    forced=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_causal_pattern_float_mask_gets_torchs_gradient(
    batch, heads, head_dim, length, batch_first, need_weights, average, forced, seed
):
    """A float mask holding exactly the causal pattern is still a tensor the caller may
    differentiate: the causal-flag shortcut must not replace it."""
    cfg = Config(
        num_heads=heads,
        head_dim=head_dim,
        batch=batch,
        query_len=length,
        key_len=length,
        sharing="self",
        batch_first=batch_first,
    )
    ours, theirs, _ = make_layers(cfg, seed)
    x, _, _ = make_inputs(cfg, seed)
    pattern = torch.zeros(length, length, dtype=DTYPE).masked_fill(
        torch.ones(length, length, dtype=torch.bool).triu(1), INF
    )
    mask, ref_mask = pattern.clone().requires_grad_(), pattern.clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    kwargs = dict(need_weights=need_weights, average_attn_weights=average)
    with recorded_paths(forced):
        out, w = ours(x, x, x, attn_mask=mask, **kwargs)
        ref, ref_w = theirs(x_ref, x_ref, x_ref, attn_mask=ref_mask, **kwargs)
        torch.testing.assert_close(out, ref, **TOL)
        gen = torch.Generator().manual_seed(seed)
        g_out = torch.randn(out.shape, generator=gen, dtype=DTYPE)
        g_w = None if w is None else torch.randn(w.shape, generator=gen, dtype=DTYPE)
        objective(out, w, g_out, g_w).backward()
        objective(ref, ref_w, g_out, g_w).backward()
    assert mask.grad is not None, "the mask's gradient was dropped"
    torch.testing.assert_close(mask.grad, ref_mask.grad, **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)


# --------------------------------------------------------------------------------------------
# Kind A: double backward


def check_gradient_penalty(case: Case) -> None:
    """grad of the inputs with create_graph=True, then the backward of its squared norm: the
    second-order gradients of the inputs and of every parameter equal torch's."""
    ours, theirs, args, kpm, am = setup(case)
    g_out, g_w = cotangents(case, theirs, args, kpm, am)

    def penalty_grads(layer, call, params):
        out, w = call(case, layer, args, kpm, am)
        first = torch.autograd.grad(objective(out, w, g_out, g_w), args, create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        second = torch.autograd.grad(penalty, [*args, *params.values()], allow_unused=True)
        return out, w, first, second

    ours_params, torch_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert list(ours_params) == list(torch_params)
    with on_path(case) as seen:
        out, w, first, second = penalty_grads(ours, ours_call, ours_params)
    assert seen == [case.path], f"expected path {case.path}, got {seen}"
    ref, ref_w, ref_first, ref_second = penalty_grads(theirs, torch_call, torch_params)
    torch.testing.assert_close(out, ref, **TOL)
    if case.need_weights:
        torch.testing.assert_close(w, ref_w, **TOL)
    for a, b in zip(first, ref_first, strict=True):
        assert_close_or_zero(a, b, "first-order input gradient")
    names = [f"input {i}" for i in range(len(args))] + list(ours_params)
    for name, a, b in zip(names, second, ref_second, strict=True):
        assert_close_or_zero(a, b, f"second-order gradient of {name}")


def test_gradient_penalty_matches_torch_on_every_path():
    run_cases(check_gradient_penalty, GRAD_CASES)


# --------------------------------------------------------------------------------------------
# Kind A: gradgradcheck of the functional core on every autograd path


@dataclass(frozen=True)
class CoreCase:
    name: str
    path: str
    need_weights: bool
    average: bool = True
    forced: bool = False
    kv_heads: int = 2
    mask: str | None = None  # None, "const", "grad" (the mask is differentiated too)
    is_causal: bool = False


CORE_CASES = [
    CoreCase("sdpa causal GQA", "sdpa", False, kv_heads=1, is_causal=True),
    CoreCase("sdpa constant mask", "sdpa", False, mask="const"),
    CoreCase("sdpa mask gradient", "sdpa", False, mask="grad", forced=True),
    CoreCase("explicit averaged causal", "explicit", True, is_causal=True),
    CoreCase(
        "explicit per-head mask gradient GQA", "explicit", True, False, kv_heads=1, mask="grad"
    ),
    CoreCase(f"{SPA} causal", SPA, True, forced=True, is_causal=True),
    CoreCase(f"{SPA} constant mask GQA", SPA, True, forced=True, kv_heads=1, mask="const"),
    CoreCase(f"{SPA} mask gradient causal", SPA, True, forced=True, mask="grad", is_causal=True),
    CoreCase(
        "explicit forced per-head causal", "explicit", True, False, forced=True, is_causal=True
    ),
]


def check_core_gradgrad(case: CoreCase) -> None:
    gen = torch.Generator().manual_seed(len(case.name))

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    q, k, v = t(1, 2, 3, 2), t(1, case.kv_heads, 4, 2), t(1, case.kv_heads, 4, 2)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    mask = None
    if case.mask is not None:
        mask = t(1, 1, 3, 4)
        mask[..., 2, 1] = INF
        mask[..., 0, 3] = INF  # key 0 stays visible: no empty rows
        if case.mask == "grad":
            inputs.append(mask.requires_grad_())

    def f(*args):
        m = args[3] if len(args) > 3 else mask
        out, w = attention(
            *args[:3],
            m,
            is_causal=case.is_causal,
            need_weights=case.need_weights,
            average_weights=case.average,
        )
        return (out, w) if case.need_weights else out

    with recorded_paths(case.forced) as seen:
        f(*inputs)
        assert seen == [case.path], f"expected path {case.path}, got {seen}"
        assert torch.autograd.gradgradcheck(f, tuple(inputs))


def test_functional_attention_gradgradcheck_on_every_path():
    run_cases(check_core_gradgrad, CORE_CASES)


# --------------------------------------------------------------------------------------------
# Kind A: torch.func and forward-mode AD


def check_func_grad(case: Case) -> None:
    """torch.func.grad over the parameters through functional_call equals torch's gradient."""
    ours, theirs, args, kpm, am = setup(case)
    assert_path(case, ours, args, kpm, am)
    g_out, g_w = cotangents(case, theirs, args, kpm, am)
    args = [a.detach() for a in args]
    params = {name: p.detach() for name, p in ours.named_parameters()}
    q, k, v = as_qkv(case, args)
    kwargs = dict(
        key_padding_mask=kpm,
        attn_mask=am,
        need_weights=case.need_weights,
        average_attn_weights=case.average,
    )

    def loss(params):
        out, w = functional_call(ours, params, (q, k, v), kwargs)
        return objective(out, w, g_out, g_w)

    with on_path(case):
        grads = torch.func.grad(loss)(params)
    ref_out, ref_w = torch_call(case, theirs, args, kpm, am)
    named = dict(theirs.named_parameters())
    ref_grads = torch.autograd.grad(objective(ref_out, ref_w, g_out, g_w), list(named.values()))
    assert list(grads) == list(named)
    for (name, a), b in zip(grads.items(), ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_func_grad_over_parameters_matches_torch_on_every_path():
    run_cases(check_func_grad, GRAD_CASES)


def batched_masks(case: Case, count: int) -> torch.Tensor:
    """``count`` float attn_masks ``(L, S)``, one per vmapped example: the causal pattern plus
    finite noise for causal cases, else random -inf entries (key 0 always visible)."""
    cfg = case.cfg
    gen = torch.Generator().manual_seed(11)
    noise = torch.randn(count, cfg.query_len, cfg.key_len, generator=gen, dtype=DTYPE) * 0.5
    if cfg.attn_mask == "causal":
        hidden = torch.ones(cfg.query_len, cfg.key_len, dtype=torch.bool).triu(1)
    else:
        hidden = torch.rand(noise.shape, generator=gen) < 0.3
        hidden[..., 0] = False
    return noise.masked_fill(hidden, INF)


def check_vmap(case: Case) -> None:
    """vmap over an extra leading batch dim of the inputs and of a per-example float attn_mask
    (so nothing may branch on the mask's values) equals torch's layer example by example."""
    ours, theirs, args, kpm, am = setup(case)
    assert_path(case, ours, args, kpm, am)
    count = 2
    gen = torch.Generator().manual_seed(5)
    stacked = [torch.randn((count, *a.shape), generator=gen, dtype=DTYPE) for a in args]
    masks = batched_masks(case, count)
    if case.cfg.attn_mask == "float3d":  # per-head masks stay; the vmapped mask is 2-D
        masks = None

    def f(mask, *xs):
        out, w = ours_call(case, ours, xs, kpm, am if mask is None else mask)
        return (out, w) if case.need_weights else out

    with on_path(case):
        if masks is None:
            got = vmap(lambda *xs: f(None, *xs))(*stacked)
        else:
            got = vmap(f)(masks, *stacked)
    got = flat(got)
    with torch.set_grad_enabled(case.grad):
        for b in range(count):
            mask = am if masks is None else masks[b]
            q, k, v = as_qkv(case, [s[b] for s in stacked])
            ref, ref_w = theirs(
                q,
                k,
                v,
                key_padding_mask=kpm,
                attn_mask=mask,
                need_weights=case.need_weights,
                average_attn_weights=case.average,
            )
            torch.testing.assert_close(got[0][b], ref, **TOL)
            if case.need_weights:
                torch.testing.assert_close(got[1][b], ref_w, **TOL)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")
def test_vmap_over_an_extra_batch_dim_on_every_path():
    run_cases(check_vmap, ALL_CASES)


def check_jacrev(case: Case) -> None:
    """torch.func.jacrev with respect to every input equals torch's Jacobian."""
    ours, theirs, args, kpm, am = setup(case)
    assert_path(case, ours, args, kpm, am)
    args = [a.detach() for a in args]
    argnums = tuple(range(len(args)))

    with on_path(case):
        jac = jacrev(as_function(case, ours, ours_call, kpm, am), argnums=argnums)(*args)
    with torch.set_grad_enabled(case.grad):
        ref = jacrev(as_function(case, theirs, torch_call, kpm, am), argnums=argnums)(*args)
    for a, b in zip(flat(jac), flat(ref), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_jacrev_matches_torch_on_every_path():
    # The Jacobian of a large call is (L E)^2 entries: large calls are left to the others.
    run_cases(check_jacrev, [c for c in ALL_CASES if c.cfg.query_len < 100])


def check_jvp(case: Case) -> None:
    """torch.func.jvp equals torch's (torch with weights: its forward-AD-capable path)."""
    ours, theirs, args, kpm, am = setup(case)
    assert_path(case, ours, args, kpm, am)
    args = tuple(a.detach() for a in args)
    gen = torch.Generator().manual_seed(3)
    tangents = tuple(torch.randn(a.shape, generator=gen, dtype=DTYPE) for a in args)

    with on_path(case):
        primal, tangent = jvp(as_function(case, ours, ours_call, kpm, am), args, tangents)
    with torch.set_grad_enabled(case.grad):
        ref_primal, ref_tangent = jvp(
            as_function(case, theirs, torch_call, kpm, am), args, tangents
        )
    for a, b in zip(
        flat(primal) + flat(tangent), flat(ref_primal) + flat(ref_tangent), strict=True
    ):
        torch.testing.assert_close(a, b, **TOL)


def test_jvp_matches_torch_on_every_path():
    run_cases(check_jvp, ALL_CASES)


def check_forward_ad(case: Case) -> None:
    """Dual inputs under torch.autograd.forward_ad: the output's (and weights') tangents equal
    torch's."""
    ours, theirs, args, kpm, am = setup(case)
    assert_path(case, ours, args, kpm, am)
    gen = torch.Generator().manual_seed(4)
    tangents = [torch.randn(a.shape, generator=gen, dtype=DTYPE) for a in args]

    def tangents_of(layer, call):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(a, t) for a, t in zip(args, tangents, strict=True)]
            out, w = call(case, layer, duals, kpm, am)
            results = [fwAD.unpack_dual(out)]
            if w is not None:
                results.append(fwAD.unpack_dual(w))
            return [(r.primal.detach(), r.tangent) for r in results]

    with on_path(case):
        got = tangents_of(ours, ours_call)
    with torch.set_grad_enabled(case.grad):
        ref = tangents_of(theirs, torch_call)
    assert len(got) == len(ref)
    for (p, t), (ref_p, ref_t) in zip(got, ref, strict=True):
        torch.testing.assert_close(p, ref_p, **TOL)
        assert t is not None, "no tangent came out"
        torch.testing.assert_close(t, ref_t, **TOL)


def test_forward_mode_ad_matches_torch_on_every_path():
    run_cases(check_forward_ad, ALL_CASES)


# --------------------------------------------------------------------------------------------
# Kind B: the KV cache


def decode_layer(dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = multihead.MultiheadAttention(
        16, 4, batch_first=True, num_kv_heads=2, rope=True, dtype=dtype, **kwargs
    )
    return layer.eval()


def sequence(batch=2, length=9, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, 16, generator=gen, dtype=dtype)


def decode(layer, cache, x, bounds, **kwargs):
    pieces = []
    for start, stop in bounds:
        chunk = x[:, start:stop]
        pieces.append(layer(chunk, chunk, chunk, cache=cache, need_weights=False, **kwargs)[0])
    return torch.cat(pieces, 1)


def snapshot(cache: KVCache):
    return cache.length, cache.position.clone(), cache.k.clone(), cache.v.clone()


def assert_unchanged(cache: KVCache, before) -> None:
    length, position, k, v = before
    assert cache.length == length
    assert torch.equal(cache.position, position)
    assert cache.k.dtype == k.dtype and torch.equal(cache.k, k), "keys changed"
    assert cache.v.dtype == v.dtype and torch.equal(cache.v, v), "values changed"


CHUNKS = [(0, 4), (4, 5), (5, 6), (6, 9)]  # a chunked prefill, then decode steps


def test_autocast_decode_with_the_default_float32_cache():
    layer = decode_layer(torch.float32)
    x = sequence(dtype=torch.float32)
    cache = layer.new_cache(2, 12)
    assert cache.k.dtype == torch.float32
    with torch.no_grad():
        full, _ = layer(x, x, x, is_causal=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = decode(layer, cache, x, CHUNKS)
            amp_full, _ = layer(x, x, x, is_causal=True)
    assert cache.length == 9 and cache.k.dtype == torch.float32
    assert out.dtype == amp_full.dtype
    torch.testing.assert_close(out.float(), full, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), amp_full.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    "case",
    [
        "float64 cache, float32 layer",
        "bfloat16 cache, float32 layer",
        "cache made before layer.double()",
    ],
)
def test_cache_of_another_dtype_is_refused_outside_autocast(case):
    layer = decode_layer(torch.float32)
    x = sequence(dtype=torch.float32)
    if case.startswith("cache made before"):
        cache = layer.new_cache(2, 12)
        with torch.no_grad():
            decode(layer, cache, x, [(0, 3)])
        layer.double()
        x = x.double()
    else:
        cache = layer.new_cache(2, 12, dtype={"f": torch.float64, "b": torch.bfloat16}[case[0]])
    before = snapshot(cache)
    with torch.no_grad(), pytest.raises(ValueError, match=r"`cache`.*dtype"):
        layer(*[x[:, 3:5]] * 3, cache=cache)
    assert_unchanged(cache, before)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_cache_refuses_a_non_floating_dtype(dtype):
    layer = decode_layer()
    with pytest.raises(TypeError, match=r"`dtype`"):
        layer.new_cache(2, 12, dtype=dtype)
    with pytest.raises(TypeError, match=r"`dtype`"):
        KVCache(2, 2, 12, 4, dtype=dtype)


def test_cache_on_another_device_is_refused():
    """Without a second real device, the meta device stands in for one."""
    layer = decode_layer()
    cache = layer.new_cache(2, 12, device="meta")
    x = sequence()
    with torch.no_grad(), pytest.raises(ValueError, match=r"`cache`.*meta"):
        layer(x, x, x, cache=cache)
    assert cache.k.is_meta and cache.v.is_meta


def test_cache_used_by_one_layer_is_refused_by_another():
    owner, other = decode_layer(seed=0), decode_layer(seed=1)
    x = sequence()
    with torch.no_grad():
        full, _ = owner(x, x, x, is_causal=True, need_weights=False)
        cache = owner.new_cache(2, 12)
        first = decode(owner, cache, x, [(0, 4)])
        before = snapshot(cache)
        with pytest.raises(ValueError, match=r"`cache`.*another layer"):
            other(*[x[:, 4:5]] * 3, cache=cache)
        assert_unchanged(cache, before)
        rest = decode(owner, cache, x, CHUNKS[1:])  # the owner carries on, unaffected
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-12, rtol=1e-10)


def test_fresh_cache_belongs_to_the_layer_that_made_it():
    owner, other = decode_layer(seed=0), decode_layer(seed=1)
    cache = owner.new_cache(2, 12)
    x = sequence()
    before = snapshot(cache)
    with torch.no_grad(), pytest.raises(ValueError, match=r"`cache`"):
        other(x, x, x, cache=cache)
    assert_unchanged(cache, before)


def test_directly_built_cache_is_claimed_by_the_first_layer_that_uses_it():
    first_user, other = decode_layer(seed=1), decode_layer(seed=0)
    cache = KVCache(2, 2, 12, 4, dtype=torch.float64)
    x = sequence()
    with torch.no_grad():
        full, _ = first_user(x, x, x, is_causal=True, need_weights=False)
        head = decode(first_user, cache, x, [(0, 4)])
        before = snapshot(cache)
        with pytest.raises(ValueError, match=r"`cache`.*another layer"):
            other(*[x[:, 4:5]] * 3, cache=cache)
        assert_unchanged(cache, before)
        tail = decode(first_user, cache, x, CHUNKS[1:])
    torch.testing.assert_close(torch.cat([head, tail], 1), full, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_cache_has_no_owner(how):
    """A copy (or an unpickled cache) keeps the keys, values and fill level but no owner: the
    first layer to use it claims it; the original still belongs to its layer."""
    owner, other = decode_layer(seed=0), decode_layer(seed=1)
    x = sequence()
    with torch.no_grad():
        cache = owner.new_cache(2, 12)
        decode(owner, cache, x, [(0, 4)])
        copied = copy.deepcopy(cache) if how == "deepcopy" else pickle.loads(pickle.dumps(cache))
        assert copied.length == 4
        assert torch.equal(copied.k, cache.k) and torch.equal(copied.v, cache.v)
        other(*[x[:, 4:5]] * 3, cache=copied)  # no owner: accepted, claimed
        assert copied.length == 5
        before, before_original = snapshot(copied), snapshot(cache)
        with pytest.raises(ValueError, match=r"`cache`.*another layer"):
            owner(*[x[:, 5:6]] * 3, cache=copied)
        assert_unchanged(copied, before)
        with pytest.raises(ValueError, match=r"`cache`.*another layer"):
            other(*[x[:, 5:6]] * 3, cache=cache)
        assert_unchanged(cache, before_original)
        owner(*[x[:, 4:5]] * 3, cache=cache)  # the original: still its owner's
        assert cache.length == 5


def test_cache_refuses_an_input_that_requires_grad_with_frozen_parameters():
    layer = decode_layer().requires_grad_(False)
    cache = layer.new_cache(2, 12)
    x = sequence(length=3).requires_grad_()
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"`cache`.*no_grad"):
        layer(x, x, x, cache=cache)
    assert_unchanged(cache, before)
    # Nothing to differentiate: grad mode alone is no reason to refuse.
    plain = x.detach()
    out, _ = layer(plain, plain, plain, cache=cache)
    assert cache.length == 3 and not out.requires_grad


@pytest.mark.parametrize("prefill", ["no_grad", "inference_mode"])
def test_cache_made_under_inference_mode_works_under_no_grad(prefill):
    layer = decode_layer()
    x = sequence()
    with torch.no_grad():
        full, _ = layer(x, x, x, is_causal=True, need_weights=False)
        ordinary = decode(layer, layer.new_cache(2, 12), x, CHUNKS)
    with torch.inference_mode():
        cache = layer.new_cache(2, 12)
        head = decode(layer, cache, x, CHUNKS[:1]) if prefill == "inference_mode" else None
    with torch.no_grad():
        if head is None:
            head = decode(layer, cache, x, CHUNKS[:1])
        tail = decode(layer, cache, x, CHUNKS[1:])
    out = torch.cat([head, tail], 1)
    assert cache.length == 9
    torch.testing.assert_close(out, ordinary, atol=0, rtol=0)
    torch.testing.assert_close(out, full, atol=1e-12, rtol=1e-10)


# The refusals a cache call can meet: name -> (the call, its error, the message pattern). Each
# call gets (layer, another layer of the same shape, cache, fill level, generator).
MAX_LEN = 8


def _tokens(gen, count=1, batch=2, dtype=torch.float64, features=16):
    return torch.randn(batch, count, features, generator=gen, dtype=dtype)


def _self(layer, y, cache, **kwargs):
    return layer(y, y, y, cache=cache, **kwargs)


def _too_many_tokens(layer, other, cache, fill, gen):
    _self(layer, _tokens(gen, MAX_LEN - fill + 1), cache)


def _wrong_batch_size(layer, other, cache, fill, gen):
    _self(layer, _tokens(gen, batch=1), cache)


def _unbatched(layer, other, cache, fill, gen):
    _self(layer, _tokens(gen)[0], cache)


def _longer_key_value(layer, other, cache, fill, gen):
    layer(_tokens(gen), _tokens(gen, 2), _tokens(gen, 2), cache=cache)


def _key_padding_mask(layer, other, cache, fill, gen):
    _self(layer, _tokens(gen), cache, key_padding_mask=torch.zeros(2, 1, dtype=torch.bool))


def _attn_mask(layer, other, cache, fill, gen):
    _self(layer, _tokens(gen), cache, attn_mask=torch.zeros(1, 1, dtype=torch.bool))


def _segment_ids(layer, other, cache, fill, gen):
    _self(layer, _tokens(gen), cache, segment_ids=torch.zeros(2, 1, dtype=torch.long))


def _grad_enabled(layer, other, cache, fill, gen):
    with torch.enable_grad():
        _self(layer, _tokens(gen), cache)


def _input_requires_grad(layer, other, cache, fill, gen):
    layer.requires_grad_(False)
    try:
        with torch.enable_grad():
            _self(layer, _tokens(gen).requires_grad_(), cache)
    finally:
        layer.requires_grad_(True)


def _layer_in_another_dtype(layer, other, cache, fill, gen):
    state = {name: t.clone() for name, t in layer.state_dict().items()}
    layer.float()
    try:
        _self(layer, _tokens(gen, dtype=torch.float32), cache)
    finally:
        layer.double()
        layer.load_state_dict(state)


def _input_in_another_dtype(layer, other, cache, fill, gen):
    _self(layer, _tokens(gen, dtype=torch.float32), cache)


def _wrong_embedding_size(layer, other, cache, fill, gen):
    _self(layer, _tokens(gen, features=15), cache)


def _another_layer(layer, other, cache, fill, gen):
    _self(other, _tokens(gen), cache)


def _under_vmap(layer, other, cache, fill, gen):
    vmap(lambda z: _self(layer, z, cache)[0])(_tokens(gen)[None].expand(3, -1, -1, -1))


def _forward_ad(layer, other, cache, fill, gen):
    y = _tokens(gen)
    with fwAD.dual_level():
        _self(layer, fwAD.make_dual(y, torch.ones_like(y)), cache)


def _nested(layer, other, cache, fill, gen):
    y = torch.nested.nested_tensor([_tokens(gen)[0], _tokens(gen, 2)[0]])
    _self(layer, y, cache)


BAD_CALLS = {
    "too many tokens": (_too_many_tokens, ValueError, r"`cache`.*room"),
    "wrong batch size": (_wrong_batch_size, ValueError, r"`cache`.*batch size"),
    "unbatched input": (_unbatched, ValueError, r"`cache`.*batch size"),
    "key and value longer than query": (_longer_key_value, ValueError, r"`cache`.*S == L"),
    "key_padding_mask": (_key_padding_mask, ValueError, r"`cache`"),
    "attn_mask": (_attn_mask, ValueError, r"`cache`"),
    "segment_ids": (_segment_ids, ValueError, r"`(cache|segment_ids)`"),
    "grad enabled, trainable parameters": (_grad_enabled, ValueError, r"`cache`.*no_grad"),
    "input requires grad, frozen parameters": (
        _input_requires_grad,
        ValueError,
        r"`cache`.*no_grad",
    ),
    "layer in another dtype": (_layer_in_another_dtype, ValueError, r"`cache`.*dtype"),
    "input in another dtype": (_input_in_another_dtype, TypeError, r"dtype"),
    "wrong embedding size": (_wrong_embedding_size, ValueError, r"`query`"),
    "another layer": (_another_layer, ValueError, r"`cache`.*another layer"),
    "under vmap": (_under_vmap, ValueError, r"`cache`"),
    "forward-mode AD": (_forward_ad, ValueError, r"`cache`"),
    "nested tensors": (_nested, ValueError, r"`cache`"),
}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@settings(max_examples=60)
@given(
    prefix=st.integers(1, MAX_LEN),
    bad=st.sampled_from(sorted(BAD_CALLS)),
    seed=st.integers(0, 1000),
)
def test_a_refused_call_leaves_the_cache_as_it_was(prefix, bad, seed):
    """After a random prefix, a random refused call: the error names what was wrong, the
    cache (fill level, keys, values, owner) is bitwise what it was, and decoding carries on to
    the result of one causal pass."""
    layer, other = decode_layer(seed=seed), decode_layer(seed=seed + 1)
    x = sequence(length=MAX_LEN, seed=seed)
    make_call, error, pattern = BAD_CALLS[bad]
    with torch.no_grad():
        full, _ = layer(x, x, x, is_causal=True, need_weights=False)
        cache = layer.new_cache(2, MAX_LEN)
        head = decode(layer, cache, x, [(0, prefix)])
        before = snapshot(cache)
        gen = torch.Generator().manual_seed(seed + 2)
        with pytest.raises(error, match=pattern):
            make_call(layer, other, cache, prefix, gen)
    assert_unchanged(cache, before)
    with torch.no_grad():
        out = head
        if prefix < MAX_LEN:
            out = torch.cat([head, decode(layer, cache, x, [(prefix, MAX_LEN)])], 1)
    assert cache.length == MAX_LEN
    torch.testing.assert_close(out, full, atol=1e-12, rtol=1e-10)
