"""Tensor parallelism over heads (multihead.parallel.heads.shard_heads): 2 and 4 gloo processes
on CPU against one process in float64.

One spawn per world size runs every case below in turn (a barrier after each); each rank
writes what failed, and the largest differences seen, to a JSON file that the test reads.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from multihead import MultiheadAttention, mods

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed gloo"
)

TOL = 1e-10
E, H, N, L, S = 16, 8, 2, 5, 6
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Helpers run inside the workers.

_DIFFS: dict[str, float] = {}
_KINDS = ("param grad", "input grad", "weights", "output")


def _close(label: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    """|ours - ref| <= tol; the largest difference is kept per kind (the label's last words
    after the case name, e.g. "output", "param grad")."""
    assert ours.shape == ref.shape, f"{label}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = float((ours.detach() - ref.detach()).abs().max()) if ref.numel() else 0.0
    kind = next((k for k in _KINDS if k in label), label)
    _DIFFS[kind] = max(_DIFFS.get(kind, 0.0), diff)
    assert diff <= tol, f"{label}: max |diff| {diff:.3e} > {tol}"


def _layer(seed: int = 0, **kwargs) -> MultiheadAttention:
    """A float64 layer with every parameter random (no zero bias hides a wrong slice)."""
    torch.manual_seed(seed)
    kwargs.setdefault("batch_first", True)
    layer = MultiheadAttention(
        kwargs.pop("embed_dim", E), kwargs.pop("num_heads", H), dtype=F64, **kwargs
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return layer


def _sharded(ref: MultiheadAttention, group=None) -> MultiheadAttention:
    from multihead.parallel.heads import shard_heads

    return shard_heads(copy.deepcopy(ref), group)


def _inputs(
    kind: str,
    batch_first: bool,
    unbatched: bool,
    kdim: int,
    vdim: int,
    seed: int = 1,
    embed: int = E,
):
    g = torch.Generator().manual_seed(seed)

    def rand(length: int, dim: int) -> torch.Tensor:
        if unbatched:
            shape = (length, dim)
        else:
            shape = (N, length, dim) if batch_first else (length, N, dim)
        return torch.randn(*shape, generator=g, dtype=F64)

    if kind == "self":
        x = rand(L, embed)
        return x, x, x
    if kind == "kv":  # key is value, both other than query
        q, kv = rand(L, embed), rand(S, kdim)
        return q, kv, kv
    return rand(L, embed), rand(S, kdim), rand(S, vdim)


def _leaf_copies(args: tuple) -> tuple:
    """Fresh leaves requiring grad, keeping which of query/key/value are the same object."""
    made: list[tuple[torch.Tensor, torch.Tensor]] = []
    out = []
    for x in args:
        twin = next((c for o, c in made if o is x), None)
        if twin is None:
            twin = x.detach().clone().requires_grad_(True)
            made.append((x, twin))
        out.append(twin)
    return tuple(out)


def _grads(layer: MultiheadAttention) -> dict[str, torch.Tensor]:
    return {
        k: torch.zeros_like(p) if p.grad is None else p.grad for k, p in layer.named_parameters()
    }


def _compare(name: str, ref, sharded, args: tuple, call: dict, *, grads: bool = True) -> None:
    """Outputs, weights, input gradients and every parameter's gradient (gathered back to the
    full layout) of the sharded layer against the single-process one."""
    from multihead.parallel.heads import gather_full

    ref_args, our_args = _leaf_copies(args), _leaf_copies(args)
    out_r, w_r = ref(*ref_args, **call)
    out_s, w_s = sharded(*our_args, **call)
    _close(f"{name} output", out_s, out_r)
    assert (w_r is None) == (w_s is None), name
    if w_r is not None:
        _close(f"{name} weights", w_s, w_r)
    if not grads:
        return
    g = torch.Generator().manual_seed(7)
    r_out = torch.randn(out_r.shape, generator=g, dtype=F64)
    r_w = None if w_r is None else torch.randn(w_r.shape, generator=g, dtype=F64)

    def loss(out, w):
        total = (out * r_out).sum()
        return total if w is None else total + (w * r_w).sum()

    loss(out_r, w_r).backward()
    loss(out_s, w_s).backward()
    seen = []
    for a, b in zip(ref_args, our_args, strict=True):
        if any(a is s for s in seen):
            continue
        seen.append(a)
        _close(f"{name} input grad", b.grad, a.grad)
    ref_grads = _grads(ref)
    full = gather_full(sharded, _grads(sharded))
    assert list(full) == list(ref_grads), f"{name}: grad keys {list(full)} != {list(ref_grads)}"
    for key, ref_grad in ref_grads.items():
        _close(f"{name} param grad {key}", full[key], ref_grad)


def _check_case(
    name: str,
    layer_kwargs: dict,
    call: dict | None = None,
    kind: str = "self",
    unbatched: bool = False,
    grads: bool = True,
) -> Callable[[int, int, str], None]:
    def run(rank: int, world: int, base: str) -> None:
        ref = _layer(**layer_kwargs)
        sharded = _sharded(ref)
        assert sharded.num_heads == ref.num_heads // world
        args = _inputs(kind, ref.batch_first, unbatched, ref.kdim, ref.vdim, embed=ref.embed_dim)
        kwargs = dict(call or {})
        for key, make in list(kwargs.items()):
            if key in ("attn_mask", "key_padding_mask", "segment_ids") and callable(make):
                kwargs[key] = make(unbatched)
        _compare(name, ref, sharded, args, kwargs, grads=grads)

    return run


def _kpm(unbatched: bool, length: int = L, floating: bool = False) -> torch.Tensor:
    mask = torch.zeros(N, length, dtype=torch.bool)
    mask[1, -2:] = True
    mask[0, 1] = True
    if floating:
        mask = torch.zeros(N, length, dtype=F64).masked_fill(mask, -2.5)
    return mask[0] if unbatched else mask


def _head_mask(unbatched: bool, heads: int = H, length: int = L) -> torch.Tensor:
    """A different bool mask per (batch, head) (True = masked), the diagonal kept."""
    g = torch.Generator().manual_seed(3)
    rows = heads if unbatched else N * heads
    mask = torch.rand(rows, L, length, generator=g) < 0.4
    mask[:, torch.arange(L), torch.arange(L)] = False
    return mask


# ---------------------------------------------------------------------------------------------
# The cases: name -> run(rank, world, checkpoint_dir).

CASES: dict[str, Callable[[int, int, str], None]] = {
    "plain": _check_case("plain", {}),
    "seq_first_per_head_weights": _check_case(
        "seq_first", {"batch_first": False}, {"average_attn_weights": False}
    ),
    "causal_padding": _check_case(
        "causal_padding", {}, {"is_causal": True, "key_padding_mask": _kpm}
    ),
    "per_head_mask_float_padding": _check_case(
        "per_head_mask",
        {},
        {
            "attn_mask": _head_mask,
            "key_padding_mask": lambda u: _kpm(u, floating=True),
            "average_attn_weights": False,
        },
    ),
    "unbatched_per_head_mask": _check_case(
        "unbatched", {}, {"attn_mask": _head_mask, "average_attn_weights": False}, unbatched=True
    ),
    "no_bias_need_weights_false": _check_case("no_bias", {"bias": False}, {"need_weights": False}),
    "gqa_split": _check_case("gqa_split", {"num_kv_heads": 4}, {"is_causal": True}),
    "gqa_two_kv": _check_case(  # split with 2 ranks, replicated with 4
        "gqa_two_kv", {"num_kv_heads": 2}, {"average_attn_weights": False}
    ),
    "mqa_replicated": _check_case("mqa", {"num_kv_heads": 1}, {"key_padding_mask": _kpm}),
    "rope_qk_norm": _check_case(
        "rope_qk_norm", {"rope": True, "qk_norm": True, "num_kv_heads": 2}, {"is_causal": True}
    ),
    "window_softcap": _check_case(
        "window_softcap", {"window": 2, "softcap": 3.0}, {"average_attn_weights": False}
    ),
    "sinks_output_gate": _check_case(
        "sinks_gate", {"sinks": True, "output_gate": True, "num_kv_heads": 1}, {"is_causal": True}
    ),
    "head_dim": _check_case("head_dim", {"embed_dim": 12, "head_dim": 4}, {}),
    "kdim_vdim": _check_case(
        "kdim_vdim",
        {"kdim": 10, "vdim": 7, "num_kv_heads": 2},
        {"key_padding_mask": lambda u: _kpm(u, S)},
        kind="cross",
    ),
    "packed_cross_attention": _check_case(
        "packed_cross", {"num_kv_heads": 2, "rope": True}, {"is_causal": True}, kind="kv"
    ),
    "bias_kv_zero_attn": _check_case(
        "bias_kv",
        {"add_bias_kv": True, "add_zero_attn": True, "num_kv_heads": 2},
        {"average_attn_weights": False, "key_padding_mask": _kpm},
    ),
    "everything": _check_case(
        "everything",
        {
            "num_kv_heads": 2,
            "rope": True,
            "qk_norm": True,
            "window": 3,
            "softcap": 4.0,
            "sinks": True,
            "output_gate": True,
            "head_dim": 4,
            "embed_dim": 12,
            "add_bias_kv": True,
            "add_zero_attn": True,
        },
        {"is_causal": True, "key_padding_mask": _kpm, "average_attn_weights": False},
    ),
    "segment_ids_mods": _check_case(
        "mods",
        {"num_kv_heads": 2},
        {
            "segment_ids": lambda u: torch.tensor([0, 0, 1, 1, 1]).expand((L,) if u else (N, L)),
            # Head-dependent: shows each rank the full layer's head index.
            "mask_mod": lambda b, h, q, k: (q >= k) | (h % 3 == 0),
            "score_mod": mods.alibi(mods.alibi_slopes(H).double()),
            "average_attn_weights": False,
        },
    ),
}


def _case(fn: Callable[[int, int, str], None]) -> Callable[[int, int, str], None]:
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


@_case
def case_dropout(rank: int, world: int, base: str) -> None:
    # p = 0 in training equals; p > 0: the shape, finite, every rank the same output (each
    # rank's heads drop with its own RNG), and eval mode equals the single-process layer.
    ref = _layer(dropout=0.0)
    sharded = _sharded(ref).train()
    _compare("dropout p=0", ref.train(), sharded, _inputs("self", True, False, E, E), {})
    ref = _layer(dropout=0.5)
    sharded = _sharded(ref)
    x = _inputs("self", True, False, E, E)[0]
    torch.manual_seed(100 + rank)
    out, w = sharded.train()(x, x, x)
    assert out.shape == (N, L, E) and w.shape == (N, L, L)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    everyone = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(everyone, out)
    assert all(torch.equal(o, out) for o in everyone)
    eval_out, _ = sharded.eval()(x, x, x)
    assert not torch.allclose(out, eval_out)
    _close("dropout eval output", eval_out, ref.eval()(x, x, x)[0])


@_case
def case_kv_cache(rank: int, world: int, base: str) -> None:
    # Prefill then token-by-token decoding: each rank caches its own key/value heads; equal to
    # the single-process layer's full causal pass and its own cached decoding.
    for kv_heads in (2, 8):
        ref = _layer(num_kv_heads=kv_heads, rope=True, qk_norm=True, window=4)
        sharded = _sharded(ref)
        x = _inputs("self", True, False, E, E)[0]
        steps = torch.cat([x, x[:, :2] * 0.5], dim=1)  # 7 tokens
        with torch.no_grad():
            full, _ = ref(steps, steps, steps, is_causal=True)
            cache = sharded.new_cache(N, 9)
            assert cache.k.shape == (N, sharded.num_kv_heads, 9, ref.head_dim)
            assert sharded.num_kv_heads == (kv_heads // world if kv_heads % world == 0 else 1)
            ref_cache = ref.new_cache(N, 9)
            prompt = steps[:, :3]
            out, _ = sharded(prompt, prompt, prompt, cache=cache, need_weights=False)
            ref(prompt, prompt, prompt, cache=ref_cache, need_weights=False)
            outs = [out]
            for t in range(3, 7):
                tok = steps[:, t : t + 1]
                out, w = sharded(tok, tok, tok, cache=cache)
                ref_out, ref_w = ref(tok, tok, tok, cache=ref_cache)
                _close("cache decode weights", w, ref_w)
                _close("cache decode vs cached ref", out, ref_out)
                outs.append(out)
        _close("cache decode vs full pass", torch.cat(outs, 1), full)
        # A rolling cache of window slots decodes the same.
        with torch.no_grad():
            rolling = sharded.new_cache(N, 4, rolling=True)
            outs = [sharded(t, t, t, cache=rolling)[0] for t in steps.split(1, dim=1)]
        _close("rolling cache decode vs full pass", torch.cat(outs, 1), full)


@_case
def case_naive_packed_cut_is_caught(rank: int, world: int, base: str) -> None:
    # The local in_proj_weight takes each rank's rows of the q, k and v blocks; a plain cut of
    # the packed weight (rows r/P of all 3E) mixes q, k and v, and the comparison catches it.
    ref = _layer()
    sharded = _sharded(ref)
    D, hl = ref.head_dim, H // world
    q, k, v = ref.in_proj_weight.detach().split(E)
    rows = slice(rank * hl * D, (rank + 1) * hl * D)
    assert torch.equal(sharded.in_proj_weight, torch.cat([q[rows], k[rows], v[rows]]))
    naive_rows = slice(rank * 3 * E // world, (rank + 1) * 3 * E // world)
    naive = copy.deepcopy(sharded)
    with torch.no_grad():
        naive.in_proj_weight.copy_(ref.in_proj_weight[naive_rows])
        naive.in_proj_bias.copy_(ref.in_proj_bias[naive_rows])
    x = _inputs("self", True, False, E, E)[0]
    with torch.no_grad():
        good, bad, want = sharded(x, x, x)[0], naive(x, x, x)[0], ref(x, x, x)[0]
    _close("naive check: correct cut", good, want)
    assert (bad - want).abs().max() > 1e-3, "a naive packed cut went unnoticed"


@_case
def case_comm_bytes(rank: int, world: int, base: str) -> None:
    # The collectives actually made (torch.distributed.all_reduce / all_gather wrapped and
    # their tensors counted) against count_comm's records and the ring formula.
    from multihead.parallel import heads

    wire: list[tuple[str, int]] = []
    real_reduce, real_gather = dist.all_reduce, dist.all_gather

    def all_reduce(tensor, *a, **k):
        wire.append(("all_reduce", tensor.numel() * tensor.element_size()))
        return real_reduce(tensor, *a, **k)

    def all_gather(tensors, tensor, *a, **k):
        wire.append(("all_gather", tensor.numel() * tensor.element_size() * len(tensors)))
        return real_gather(tensors, tensor, *a, **k)

    def ring(op: str, nbytes: int) -> float:
        return (2 if op == "all_reduce" else 1) * (world - 1) * nbytes / world

    ref = _layer(qk_norm=True, num_kv_heads=2)
    sharded = _sharded(ref)
    x = _inputs("self", True, False, E, E)[0].requires_grad_(True)
    D, b = ref.head_dim, 8
    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    try:
        with heads.count_comm() as log:
            with torch.no_grad():
                sharded(x, x, x, need_weights=False)
        assert wire == [("all_reduce", N * L * E * b)], wire
        assert [(c.op, c.phase, c.numel) for c in log.records] == [
            ("all_reduce", "forward", N * L * E)
        ]
        assert log.bytes_per_rank() == 2 * (world - 1) / world * N * L * E * b
        assert log.bytes_per_rank() == heads.comm_bytes("all_reduce", N * L * E, b, world)
        wire.clear()
        with heads.count_comm() as log:  # averaged weights ride in the same all-reduce
            with torch.no_grad():
                sharded(x, x, x)
        assert wire == [("all_reduce", (N * L * E + N * L * L) * b)], wire
        wire.clear()
        with heads.count_comm() as log:  # per-head weights: all-gathered, only then
            with torch.no_grad():
                sharded(x, x, x, average_attn_weights=False)
        assert wire == [("all_reduce", N * L * E * b), ("all_gather", N * H * L * L * b)], wire
        assert log.bytes_per_rank() == sum(ring(op, n) for op, n in wire)
        wire.clear()
        with heads.count_comm() as log:  # forward and backward
            out, _ = sharded(x, x, x, need_weights=False)
            out.sum().backward()
        # backward: ONE all-reduce of the input's gradient and the shared parameters' parts
        # (q_norm, k_norm; with 4 ranks the 2 key/value heads are replicated: their k and v
        # rows and biases, zero-padded to all heads).
        shared = 2 * D + (0 if 2 % world == 0 else 2 * (2 * D * E + 2 * D))
        assert wire == [("all_reduce", N * L * E * b), ("all_reduce", (N * L * E + shared) * b)], (
            wire
        )
        assert [c.phase for c in log.records] == ["forward", "backward"]
        assert log.bytes_per_rank("forward") == 2 * (world - 1) / world * N * L * E * b
        assert log.bytes_per_rank() == sum(ring(op, n) for op, n in wire)
    finally:
        dist.all_reduce, dist.all_gather = real_reduce, real_gather


@_case
def case_parameter_memory(rank: int, world: int, base: str) -> None:
    from multihead.parallel.heads import gather_full

    for kwargs in ({}, {"num_kv_heads": 2, "qk_norm": True}):
        ref = _layer(**kwargs)
        sharded = _sharded(ref)
        local = sum(p.numel() * p.element_size() for p in sharded.parameters())
        full = sum(p.numel() * p.element_size() for p in ref.parameters())
        if not kwargs:  # everything split but out_proj.bias
            assert local == (full - E * 8) // world + E * 8
        assert local < full
        assert (
            gather_full(sharded, dict(sharded.named_parameters())).keys()
            == dict(ref.named_parameters()).keys()
        )


@_case
def case_full_state_dict_and_torch(rank: int, world: int, base: str) -> None:
    from multihead.parallel.heads import full_state_dict

    for kwargs in ({}, {"add_bias_kv": True}, {"kdim": 10, "vdim": 7}):
        ref = _layer(**kwargs)
        sharded = _sharded(ref)
        full = full_state_dict(sharded)
        assert list(full) == list(ref.state_dict())
        for key, value in ref.state_dict().items():
            assert torch.equal(full[key], value), key
        theirs = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=F64, **kwargs)
        theirs.load_state_dict(full)  # strict
        args = _inputs("cross" if "kdim" in kwargs else "self", True, False, ref.kdim, ref.vdim)
        with torch.no_grad():
            _close("full_state_dict into torch", sharded(*args)[0], theirs(*args)[0])
    for kwargs in ({"num_kv_heads": 2, "sinks": True, "qk_norm": True, "output_gate": True},):
        ref = _layer(**kwargs)
        full = full_state_dict(_sharded(ref))
        assert list(full) == list(ref.state_dict())
        assert all(torch.equal(full[k], v) for k, v in ref.state_dict().items())
    # A torch checkpoint loads into our layer, which is then sharded.
    torch.manual_seed(5)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=F64)
    with torch.no_grad():
        theirs.in_proj_bias.normal_()
        theirs.out_proj.bias.normal_()
    ours = MultiheadAttention(E, H, batch_first=True, dtype=F64)
    ours.load_state_dict(theirs.state_dict())
    sharded = _sharded(ours)
    x = _inputs("self", True, False, E, E)[0]
    with torch.no_grad():
        out, w = sharded(x, x, x, key_padding_mask=_kpm(False))
        t_out, t_w = theirs(x, x, x, key_padding_mask=_kpm(False))
    _close("torch checkpoint output", out, t_out)
    _close("torch checkpoint weights", w, t_w)


@_case
def case_dcp_checkpoint(rank: int, world: int, base: str) -> None:
    import torch.distributed.checkpoint as dcp

    from multihead.parallel.heads import checkpoint_state, full_state_dict

    for tag, kwargs in (
        ("plain", {}),
        (
            "everything",
            {
                "num_kv_heads": 2,
                "qk_norm": True,
                "sinks": True,
                "output_gate": True,
                "add_bias_kv": True,
                "head_dim": 4,
                "embed_dim": 12,
            },
        ),
        ("kdim", {"kdim": 10, "vdim": 7, "num_kv_heads": 1}),
    ):
        path = os.path.join(base, f"dcp_{world}_{tag}")
        ref = _layer(**kwargs)
        dcp.save({"attn": checkpoint_state(_sharded(ref))}, checkpoint_id=path)
        other = _sharded(_layer(seed=9, **kwargs))  # other numbers, same shapes
        dcp.load({"attn": checkpoint_state(other)}, checkpoint_id=path)
        full = full_state_dict(other)
        assert all(torch.equal(full[k], v) for k, v in ref.state_dict().items()), tag
        unsharded = _layer(seed=11, **kwargs)  # every rank reads the whole layer
        dcp.load({"attn": checkpoint_state(unsharded)}, checkpoint_id=path)
        assert all(torch.equal(unsharded.state_dict()[k], v) for k, v in ref.state_dict().items())
    if world == 4:
        # Resharding: saved by 2 ranks (a subgroup), loaded by 4, and the reverse.
        kwargs = {"num_kv_heads": 2, "qk_norm": True, "add_bias_kv": True}
        pair = dist.new_group([0, 1])
        ref = _layer(**kwargs)
        two = os.path.join(base, "dcp_two_ranks")
        if rank < 2:
            dcp.save(
                {"attn": checkpoint_state(_sharded(ref, pair))},
                checkpoint_id=two,
                process_group=pair,
            )
        dist.barrier()
        four = _sharded(_layer(seed=9, **kwargs))
        dcp.load({"attn": checkpoint_state(four)}, checkpoint_id=two)
        full = full_state_dict(four)
        assert all(torch.equal(full[k], v) for k, v in ref.state_dict().items()), "2 -> 4"
        again = os.path.join(base, "dcp_four_ranks")
        dcp.save({"attn": checkpoint_state(four)}, checkpoint_id=again)
        if rank < 2:
            back = _sharded(_layer(seed=13, **kwargs), pair)
            dcp.load({"attn": checkpoint_state(back)}, checkpoint_id=again, process_group=pair)
            full = full_state_dict(back)
            assert all(torch.equal(full[k], v) for k, v in ref.state_dict().items()), "4 -> 2"
        dist.barrier()


@_case
def case_review_refusals(rank: int, world: int, base: str) -> None:
    # Each of these gave a silent wrong answer before (review of issue 13).
    from multihead.parallel import context_parallel, shard_heads

    ref = _layer()
    x = torch.randn(N, L, E, dtype=torch.float64, requires_grad=True)
    # A double backward through the sharded layer is refused (its all-reduce's backward has
    # no derivative; it gave wrong second-order gradients).
    sharded = _sharded(ref)
    out, _ = sharded(x, x, x, need_weights=False)
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    try:
        grad.sum().backward()
    except RuntimeError as error:
        assert "once_differentiable" in str(error)
    else:
        raise AssertionError("a double backward through shard_heads was not refused")
    # shard_heads and context_parallel do not combine (both orders were accepted).
    for first, second, word in (
        (shard_heads, context_parallel, "shard_heads"),
        (context_parallel, shard_heads, "context_parallel"),
    ):
        layer = first(copy.deepcopy(ref))
        try:
            second(layer)
        except ValueError as error:
            assert "do not combine" in str(error) and word in str(error)
        else:
            raise AssertionError(f"{second.__name__} after {first.__name__} was accepted")
    # A plain state_dict() is this rank's shard, tagged: another rank's shard is refused.
    state = sharded.state_dict()
    assert state["_extra_state"].tolist() == [rank, world]
    shards = [None] * world
    dist.all_gather_object(shards, state)
    mine = _sharded(ref)
    mine.load_state_dict(shards[rank])  # its own shard loads
    other = shards[(rank + 1) % world]
    try:
        mine.load_state_dict(other)
    except ValueError as error:
        assert "`state_dict`" in str(error) and f"rank {rank} of {world}" in str(error)
    else:
        raise AssertionError("another rank's shard loaded without an error")


@_case
def case_groups_and_meshes(rank: int, world: int, base: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    # A 1-D DeviceMesh is its group.
    mesh = init_device_mesh("cpu", (world,))
    ref = _layer(num_kv_heads=2)
    sharded = _sharded(ref, mesh)
    _compare("mesh", ref, sharded, _inputs("self", True, False, E, E), {"is_causal": True})
    # A group of one rank: sharding changes nothing.
    singles = [dist.new_group([r]) for r in range(world)]
    ref = _layer(rope=True)
    alone = _sharded(ref, singles[rank])
    assert alone.num_heads == H and alone.head_parallel.world_size == 1
    _compare("one rank", ref, alone, _inputs("self", True, False, E, E), {})
    # A sub-group of 2 ranks (with 4): each pair computes the same thing.
    if world == 4:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        ref = _layer(num_kv_heads=1)
        _compare(
            "pair", ref, _sharded(ref, pairs[rank // 2]), _inputs("self", True, False, E, E), {}
        )


@_case
def case_errors(rank: int, world: int, base: str) -> None:
    from multihead.parallel.heads import shard_heads

    def raises(exc: type, words: tuple[str, ...], fn: Callable, *args) -> None:
        try:
            fn(*args)
        except exc as e:
            assert all(w in str(e) for w in words), f"{words} not in {e}"
        else:
            raise AssertionError(f"no {exc.__name__} for {words}")

    raises(TypeError, ("layer",), shard_heads, torch.nn.MultiheadAttention(E, H))
    raises(TypeError, ("layer",), shard_heads, "layer")
    raises(TypeError, ("group",), shard_heads, _layer(), "world")
    bad_heads = 6 if world == 4 else 3
    layer = MultiheadAttention(12 if bad_heads == 6 else 9, bad_heads)
    raises(ValueError, ("layer", "num_heads"), shard_heads, layer)
    assert type(layer) is MultiheadAttention and layer.num_heads == bad_heads  # untouched
    # Key/value heads neither a multiple nor a divisor of the world size.
    for kv_heads in (3,) if world == 2 else (3, 6):
        layer = MultiheadAttention(24, 12, num_kv_heads=kv_heads)
        raises(ValueError, ("num_kv_heads",), shard_heads, layer)
    sharded = shard_heads(_layer())
    raises(ValueError, ("layer", "already sharded"), shard_heads, sharded)
    x = torch.nested.nested_tensor([torch.randn(3, E, dtype=F64)], layout=torch.jagged)
    raises(ValueError, ("query",), sharded, x, x, x)
    if world == 4:
        from torch.distributed.device_mesh import init_device_mesh

        mesh2d = init_device_mesh("cpu", (2, 2))
        raises(ValueError, ("group", "1-D"), shard_heads, _layer(), mesh2d)
    # The layer's own checks still run, before any collective.
    raises(
        ValueError,
        ("attn_mask",),
        sharded,
        *_inputs("self", True, False, E, E),
        None,
        True,
        torch.zeros(3, L, L, dtype=torch.bool),
    )


# ---------------------------------------------------------------------------------------------
# The spawned workers and the test.


def _worker(rank: int, world: int, port: int, base: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    failures, ran = [], []
    try:
        for name, case in CASES.items():
            try:
                case(rank, world, base)
            except BaseException:  # DCP's CheckpointException included
                failures.append(f"[rank {rank}] {name}: {traceback.format_exc()}")
            ran.append(name)
            dist.barrier()
    finally:
        with open(os.path.join(base, f"rank{rank}.json"), "w") as f:
            json.dump({"failures": failures, "ran": ran, "diffs": _DIFFS}, f)
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_head_parallel(world: int, tmp_path, record_error) -> None:
    mp.start_processes(
        _worker,
        args=(world, free_port(), str(tmp_path)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    for r in results:
        assert r["ran"] == list(CASES)
    for label, worst in results[0]["diffs"].items():
        record_error(f"heads P={world}: {label}", torch.tensor(worst), torch.tensor(0.0))
