"""Context parallel (ring attention): multihead.parallel.ring against one process.

Gloo on CPU, one ``torch.multiprocessing.spawn`` per world size (2 and 4 processes). Every
rank runs every case of ``CASES`` and writes what happened to a JSON file; each case is then
its own pytest test. Each case compares, in float64 to 1e-10, a context-parallel copy of a
layer with the layer itself on the whole sequence: output shards, weight rows, input
gradients and parameter gradients (each rank's parameter gradient is its part: their sum,
all-reduced, is the one-process gradient).
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

TOL = 1e-10
CASES: dict[str, Callable[[int, int], dict | None]] = {}


def case(fn: Callable[[int, int], dict | None]) -> Callable[[int, int], dict | None]:
    CASES[fn.__name__] = fn
    return fn


def _ring():
    from multihead.parallel import ring  # imported in the workers, after init

    return ring


def _diff(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: not finite"
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= TOL, f"{what}: max |cp - one process| = {err:.3e}"
    return err


def _compare(
    rank: int,
    world: int,
    *,
    balance: str = "zigzag",
    comm: str = "ring",
    causal: bool = False,
    length: int = 13,
    batch: int = 2,
    embed: int = 16,
    heads: int = 4,
    batch_first: bool = True,
    unbatched: bool = False,
    need_weights: bool = True,
    average: bool = True,
    layer: dict | None = None,
    masks: Callable[[torch.Generator], dict] | None = None,
    mods_: Callable[[], dict] | None = None,
    seed: int = 0,
) -> dict:
    """One configuration: forward, weights, backward, parameter gradients."""
    ring = _ring()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ref = MultiheadAttention(
        embed, heads, batch_first=batch_first, dtype=torch.float64, **(layer or {})
    )
    with torch.no_grad():  # move every parameter off its init (zero sinks, unit norms, ...)
        for p in ref.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    cp = ring.context_parallel(copy.deepcopy(ref), balance=balance, comm=comm)
    if unbatched:
        shape, seq_dim = (length, embed), 0
    elif batch_first:
        shape, seq_dim = (batch, length, embed), 1
    else:
        shape, seq_dim = (length, batch, embed), 0
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    full = {} if masks is None else masks(gen)
    extra = {} if mods_ is None else mods_()
    captures_ref = extra.pop("_grads", {})
    x_ref = x.clone().requires_grad_()
    out_ref, w_ref = ref(
        x_ref,
        x_ref,
        x_ref,
        is_causal=causal,
        need_weights=need_weights,
        average_attn_weights=average,
        **full,
        **extra,
    )
    g_out = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64)
    weights_grad = need_weights and comm == "allgather"
    g_w = torch.randn(w_ref.shape, generator=gen, dtype=torch.float64) if need_weights else None
    loss = (out_ref * g_out).sum()
    if weights_grad:
        loss = loss + (w_ref * g_w).sum()
    loss.backward()

    def shard(t: torch.Tensor, dim: int) -> torch.Tensor:
        return ring.shard_sequence(t, dim=dim, balance=balance)

    x_loc = shard(x, seq_dim).clone().requires_grad_()
    local = {name: shard(t, -1) for name, t in full.items()}
    extra_cp = {} if mods_ is None else mods_()  # fresh captures for the parallel layer
    captures = extra_cp.pop("_grads", {})
    out, w = cp(
        x_loc,
        x_loc,
        x_loc,
        is_causal=causal,
        need_weights=need_weights,
        average_attn_weights=average,
        **local,
        **extra_cp,
    )
    loss = (out * shard(g_out, seq_dim)).sum()
    if weights_grad:
        loss = loss + (w * shard(g_w, -2)).sum()
    loss.backward()
    grads = {}
    for (name, p), (_, p_ref) in zip(cp.named_parameters(), ref.named_parameters(), strict=True):
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads[name] = (g, p_ref.grad)
    captured = []
    for (name, t), t_ref in zip(captures.items(), captures_ref.values(), strict=True):
        g = t.grad.clone()
        dist.all_reduce(g)
        captured.append((name, g, t_ref.grad))
    err = _diff(out, shard(out_ref, seq_dim), "output")
    if need_weights:
        err = max(err, _diff(w, shard(w_ref, -2), "weights"))
        if comm == "ring":
            assert w.grad_fn is None
    else:
        assert w is None
    err = max(err, _diff(x_loc.grad, shard(x_ref.grad, seq_dim), "input grad"))
    for name, (g, g_ref) in grads.items():
        err = max(err, _diff(g, g_ref if g_ref is not None else torch.zeros_like(g), name))
    for name, g, g_ref in captured:
        err = max(err, _diff(g, g_ref, f"score_mod capture {name}"))
    return {"max_diff": err}


# -- cases ----------------------------------------------------------------------------------


def _basic(balance: str, comm: str, causal: bool, **kwargs) -> Callable[[int, int], dict]:
    def run(rank: int, world: int) -> dict:
        return _compare(rank, world, balance=balance, comm=comm, causal=causal, **kwargs)

    return run


for _i, (_balance, _comm, _causal) in enumerate(
    (b, c, k)
    for b in ("zigzag", "contiguous")
    for c in ("ring", "allgather")
    for k in (True, False)
):
    CASES[f"basic_{_balance}_{_comm}_{'causal' if _causal else 'full'}"] = _basic(
        _balance,
        _comm,
        _causal,
        length=(13, 16, 19, 8 + 3)[_i % 4],  # uneven and even lengths
        batch_first=_i % 2 == 0,
        average=_i % 3 != 0,
    )


@case
def gqa_rope_qknorm_ring(rank: int, world: int) -> dict:
    # One key/value head: fewer kv heads than ranks.
    layer = {"num_kv_heads": 1, "rope": True, "qk_norm": True}
    return _compare(rank, world, causal=True, length=19, layer=layer, average=False)


@case
def gqa_rope_allgather_contiguous(rank: int, world: int) -> dict:
    layer = {"num_kv_heads": 2, "rope": True, "rope_base": 100.0}
    return _compare(rank, world, balance="contiguous", comm="allgather", causal=True, layer=layer)


@case
def window_causal(rank: int, world: int) -> dict:
    return _compare(rank, world, causal=True, length=19, layer={"window": 3}, average=False)


@case
def window_bidirectional_contiguous(rank: int, world: int) -> dict:
    return _compare(rank, world, balance="contiguous", length=17, layer={"window": 4})


@case
def softcap_sinks_ring(rank: int, world: int) -> dict:
    layer = {"softcap": 1.5, "sinks": True}
    return _compare(rank, world, causal=True, layer=layer, average=False)


@case
def softcap_sinks_allgather_weights_grad(rank: int, world: int) -> dict:
    layer = {"softcap": 1.5, "sinks": True, "num_kv_heads": 2}
    return _compare(rank, world, comm="allgather", causal=False, layer=layer, average=False)


def _segments_padding(gen: torch.Generator, batch: int = 2, length: int = 16) -> dict:
    segments = torch.cumsum(torch.rand(batch, length, generator=gen) < 0.25, dim=1)
    padding = torch.rand(batch, length, generator=gen) < 0.2
    return {"segment_ids": segments, "key_padding_mask": padding}


@case
def segments_padding_ring(rank: int, world: int) -> dict:
    return _compare(rank, world, causal=True, length=16, masks=_segments_padding)


@case
def segments_padding_allgather_contiguous(rank: int, world: int) -> dict:
    return _compare(
        rank, world, balance="contiguous", comm="allgather", length=16, masks=_segments_padding
    )


@case
def float_padding_ring(rank: int, world: int) -> dict:
    def masks(gen: torch.Generator) -> dict:
        return {"key_padding_mask": torch.randn(2, 13, generator=gen, dtype=torch.float64)}

    return _compare(rank, world, causal=False, masks=masks, batch_first=False)


@case
def empty_rows(rank: int, world: int) -> dict:
    # Batch row 1 hides every key: zero output, as one process, and no NaN in the gradients.
    def masks(gen: torch.Generator) -> dict:
        padding = torch.zeros(2, 13, dtype=torch.bool)
        padding[1] = True
        padding[0, :3] = True  # the first queries see nothing under causality either
        return {"key_padding_mask": padding}

    return _compare(rank, world, causal=True, masks=masks, layer={"sinks": True})


def _mask_mod_alibi() -> dict:
    slopes = torch.tensor([0.5, -0.25, 0.125, 1.0], dtype=torch.float64, requires_grad=True)

    def mask_mod(b, h, q_idx, kv_idx):  # not broadcast-safe: called through vmap
        return (q_idx - kv_idx) % 3 != 1

    return {"mask_mod": mask_mod, "score_mod": mods.alibi(slopes), "_grads": {"slopes": slopes}}


@case
def mask_mod_score_mod_ring(rank: int, world: int) -> dict:
    return _compare(rank, world, causal=True, length=16, mods_=_mask_mod_alibi)


@case
def mask_mod_score_mod_allgather(rank: int, world: int) -> dict:
    return _compare(rank, world, comm="allgather", length=13, mods_=_mask_mod_alibi)


@case
def prefix_lm_relative_bias_ring(rank: int, world: int) -> dict:
    def make() -> dict:
        torch.manual_seed(3)
        bias = mods.RelativePositionBias(4, num_buckets=8, max_distance=16, dtype=torch.float64)
        return {"mask_mod": mods.prefix_lm(5), "score_mod": bias, "_grads": {"weight": bias.weight}}

    return _compare(rank, world, balance="contiguous", length=19, mods_=make)


def _score_mods_held_indirectly() -> dict:
    """Tensors a score_mod reaches only through functools.partial, a list in a closure, and a
    bound method (the ring's backward gave them no gradient before; review of issue 13)."""
    import functools

    scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    held = [torch.tensor([0.5, -0.25, 0.125, 1.0], dtype=torch.float64, requires_grad=True)]
    torch.manual_seed(5)
    bias = mods.RelativePositionBias(4, num_buckets=8, max_distance=16, dtype=torch.float64)

    def scaled(score, b, h, q_idx, kv_idx, *, t):
        return score * (1 + t) - held[0][h] * (q_idx - kv_idx).abs()

    partial = functools.partial(scaled, t=scale)

    def score_mod(score, b, h, q_idx, kv_idx):
        return bias.forward(partial(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)

    grads = {"scale": scale, "held": held[0], "weight": bias.weight}
    return {"score_mod": score_mod, "_grads": grads}


@case
def score_mod_held_indirectly_ring(rank: int, world: int) -> dict:
    return _compare(rank, world, causal=True, length=16, mods_=_score_mods_held_indirectly)


@case
def gate_head_dim_unbatched(rank: int, world: int) -> dict:
    layer = {"output_gate": True, "head_dim": 6, "rope": True}
    return _compare(rank, world, causal=True, unbatched=True, batch_first=False, layer=layer)


@case
def no_weights_gqa(rank: int, world: int) -> dict:
    layer = {"num_kv_heads": 2}
    return _compare(rank, world, causal=True, need_weights=False, layer=layer, length=16)


class _Spy:
    """Counts the ring's calls of its flash kernels and of its masked-formula tiles, and sets
    its tile budget, for the duration of a ``with``."""

    def __init__(self, tile_elements: int | None = None) -> None:
        self.calls = {"_FLASH_CPU": 0, "_FLASH_CPU_BACKWARD": 0, "_tile_scores": 0}
        self.tile_elements = tile_elements

    def __enter__(self) -> _Spy:
        ring = _ring()
        self.saved = {name: getattr(ring, name) for name in [*self.calls, "_TILE_ELEMENTS"]}
        for name in self.calls:

            def spy(*args, _name=name, **kwargs):
                self.calls[_name] += 1
                return self.saved[_name](*args, **kwargs)

            setattr(ring, name, spy)
        if self.tile_elements is not None:
            ring._TILE_ELEMENTS = self.tile_elements
        return self

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            setattr(_ring(), name, value)


@case
def flash_route_causal(rank: int, world: int) -> dict:
    """A plain causal call (no weights) takes the CPU flash kernel forward and backward for
    every visible tile, and no masked-formula tile, and equals one process; with sinks (a
    gradient through the ring's lse) and GQA too."""
    calls = {}
    for name, layer in (("plain", {}), ("sinks_gqa", {"sinks": True, "num_kv_heads": 2})):
        with _Spy() as spy:
            _compare(rank, world, causal=True, length=19, need_weights=False, layer=layer)
        assert spy.calls["_FLASH_CPU"] > 0, spy.calls
        assert spy.calls["_FLASH_CPU_BACKWARD"] > 0, spy.calls
        assert spy.calls["_tile_scores"] == 0, spy.calls
        calls[name] = spy.calls
    return calls


@case
def flash_route_window_contiguous(rank: int, world: int) -> dict:
    """A window: tiles wholly inside it take the kernel, tiles it cuts the masked formula."""
    with _Spy() as spy:
        _compare(
            rank,
            world,
            balance="contiguous",
            length=24,
            need_weights=False,
            layer={"window": 12},
        )
    assert spy.calls["_FLASH_CPU"] > 0 and spy.calls["_tile_scores"] > 0, spy.calls
    return spy.calls


@case
def chunked_tiles(rank: int, world: int) -> dict:
    """A tiny tile budget: the masked formula in row and column chunks (mods, segments,
    padding, weights), still exact."""
    with _Spy(tile_elements=8) as spy:  # N * H = 8: one row of one column per chunk
        _compare(rank, world, causal=True, length=16, mods_=_mask_mod_alibi, average=False)
        _compare(rank, world, causal=True, length=16, masks=_segments_padding)
    with _Spy(tile_elements=40) as spy:  # five columns, one row
        _compare(rank, world, causal=True, length=19, layer={"window": 3})
    with _Spy(tile_elements=8 * 30) as spy:  # several rows of whole runs
        _compare(rank, world, length=19, layer={"softcap": 1.5, "sinks": True})
    assert spy.calls["_FLASH_CPU"] == 0, spy.calls
    return spy.calls


@case
def bytes_and_overlap(rank: int, world: int) -> dict:
    """Counted bytes equal ring_bytes' formula; each hop is posted before its block's compute."""
    ring = _ring()
    n, e, h, hkv, length = 2, 16, 4, 2, 19
    counted = {}
    for comm in ("ring", "allgather"):
        for balance in ("zigzag", "contiguous"):
            torch.manual_seed(0)
            layer = MultiheadAttention(
                e, h, batch_first=True, num_kv_heads=hkv, dtype=torch.float64
            )
            ring.context_parallel(layer, balance=balance, comm=comm)
            x = torch.randn(n, length, e, dtype=torch.float64)
            x = ring.shard_sequence(x, dim=1, balance=balance).requires_grad_()
            with ring.count_bytes() as c:
                out, _ = layer(x, x, x, is_causal=True, need_weights=False)
                out.sum().backward()
            sizes = {"batch": n, "kv_heads": hkv, "head_dim": e // h, "seq_len": length}
            sizes.update(world=world, dtype=torch.float64, balance=balance, comm=comm)
            fwd = ring.ring_bytes(**sizes)
            bwd = ring.ring_bytes(**sizes, backward=True)
            assert c.forward_sent == c.forward_received == fwd, (comm, balance, c, fwd)
            assert c.backward_sent == c.backward_received == bwd, (comm, balance, c, bwd)
            pieces = [len(p) for p in torch.tensor_split(torch.arange(length), 2 * world)]
            if balance == "zigzag":
                lp = max(pieces[r] + pieces[2 * world - 1 - r] for r in range(world))
            else:
                lp = -(-length // world)
            assert fwd == (world - 1) * 2 * n * hkv * lp * (e // h) * 8
            assert c.other_sent == (world - 1) * 2 * 8  # the shard lengths and batch size
            counted[f"{comm}_{balance}"] = (fwd, bwd)
            if comm == "ring":
                forward = [(what, step) for phase, what, step in c.events if phase == "forward"]
                for step in range(world - 1):
                    post = forward.index(("post", step))
                    assert post < forward.index(("compute", step)) < forward.index(("wait", step))
    # Segment ids and key padding travel with K/V, counted apart.
    torch.manual_seed(0)
    layer = ring.context_parallel(MultiheadAttention(e, h, batch_first=True, dtype=torch.float64))
    x = ring.shard_sequence(torch.randn(n, 16, e, dtype=torch.float64), dim=1)
    segments = ring.shard_sequence(torch.zeros(n, 16, dtype=torch.long), dim=1)
    with ring.count_bytes() as c:
        layer(x, x, x, segment_ids=segments, need_weights=False)
    assert c.other_sent == (world - 1) * (2 * 8 + n * (16 // world) * 8)
    return {"bytes": counted}


@case
def bf16_merge(rank: int, world: int) -> dict:
    """Errors of bf16 inputs against a float64 reference: the float32 merge and a naive bf16
    merge of the ring's partials (compared across world sizes by the parent)."""
    ring = _ring()
    torch.manual_seed(1)
    e, h, length = 64, 4, 256
    ref = MultiheadAttention(e, h, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        ref.in_proj_weight.mul_(4.0)  # peakier softmax: the merge matters
        for p in ref.parameters():
            p.copy_(p.bfloat16().double())
    x = torch.randn(1, length, e, dtype=torch.float64).bfloat16().double()
    with torch.no_grad():
        expected, _ = ref(x, x, x, is_causal=True, need_weights=False)
    low = ring.context_parallel(copy.deepcopy(ref).bfloat16())
    local = ring.shard_sequence(x.bfloat16(), dim=1)
    want = ring.shard_sequence(expected, dim=1)
    errors = {}
    for naive in (False, True):
        ring._NAIVE_LOW_PRECISION = naive
        try:
            with torch.no_grad():
                out, _ = low(local, local, local, is_causal=True, need_weights=False)
        finally:
            ring._NAIVE_LOW_PRECISION = False
        assert out.dtype == torch.bfloat16
        err = (out.double() - want).abs()
        total = torch.stack([err.sum(), torch.tensor(float(err.numel()), dtype=torch.float64)])
        top = err.max().reshape(1)
        dist.all_reduce(total)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        errors["naive" if naive else "fp32"] = {
            "max": float(top),
            "mean": float(total[0] / total[1]),
        }
    with torch.no_grad():  # one process in bf16, for scale
        one, _ = copy.deepcopy(ref).bfloat16()(
            x.bfloat16(), x.bfloat16(), x.bfloat16(), is_causal=True, need_weights=False
        )
    errors["one_process"] = {"mean": float((one.double() - expected).abs().mean())}
    return errors


@case
def round_trip(rank: int, world: int) -> dict:
    ring = _ring()
    for balance in ("zigzag", "contiguous"):
        for length, dim in ((13, 1), (16, 0), (2 * world + 1, -1)):
            shape = [3, 3, 3]
            shape[dim] = length
            x = torch.arange(float(torch.Size(shape).numel())).view(shape)
            mine = ring.shard_sequence(x, dim=dim, balance=balance)
            pieces = torch.tensor_split(
                torch.arange(length), 2 * world if balance == "zigzag" else world
            )
            index = (
                pieces[rank]
                if balance == "contiguous"
                else torch.cat([pieces[rank], pieces[2 * world - 1 - rank]])
            )
            assert torch.equal(mine, x.index_select(dim, index))
            y = mine.clone().requires_grad_()
            back = ring.gather_sequence(y, dim=dim, balance=balance)
            assert torch.equal(back, x)
            weight = torch.randn(back.shape, generator=torch.Generator().manual_seed(5))
            (back * weight).sum().backward()  # every rank's copy sends its gradient home
            assert torch.allclose(y.grad, world * weight.index_select(dim, index))
    return None


@case
def bad_inputs(rank: int, world: int) -> dict:
    ring = _ring()
    layer = MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)

    def raises(match: str, fn: Callable[[], object]) -> None:
        with pytest.raises(ValueError, match=match):
            fn()

    raises("`balance`", lambda: ring.context_parallel(copy.deepcopy(layer), balance="zig-zag"))
    raises("`comm`", lambda: ring.context_parallel(copy.deepcopy(layer), comm="ulysses"))
    with pytest.raises(TypeError, match="`layer`"):
        ring.context_parallel(torch.nn.MultiheadAttention(8, 2))
    raises(
        "`layer`",
        lambda: ring.context_parallel(MultiheadAttention(8, 2, add_bias_kv=True)),
    )
    raises("`balance`", lambda: ring.shard_sequence(torch.zeros(8, 4), dim=0, balance="even"))
    raises("`x`", lambda: ring.shard_sequence(torch.zeros(2 * world - 1, 4), dim=0))
    raises(
        "`x`", lambda: ring.shard_sequence(torch.zeros(world - 1, 4), dim=0, balance="contiguous")
    )
    cp = ring.context_parallel(copy.deepcopy(layer))
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    raises("`key`", lambda: cp(x, x.clone(), x.clone()))
    raises("`key`", lambda: cp(x, x, x.clone()))
    raises("`attn_mask`", lambda: cp(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool)))
    cp.dropout = 0.1
    raises("`dropout`", lambda: cp(x, x, x))
    cp.dropout = 0.0
    # A sequence shorter than 2P (zigzag) or P (contiguous): every rank holds one token.
    one = torch.randn(1, 1, 8, dtype=torch.float64)
    raises("`query`.*at least", lambda: cp(one, one, one))
    contiguous = ring.context_parallel(copy.deepcopy(layer), balance="contiguous")
    empty = torch.randn(1, 1 if rank == 0 else 0, 8, dtype=torch.float64)
    raises("`query`.*at least", lambda: contiguous(empty, empty, empty))
    # Shards that are not the layout's (rank 0 one token too many).
    wrong = torch.randn(1, 6 if rank == 0 else 4, 8, dtype=torch.float64)
    raises("`query`.*layout", lambda: cp(wrong, wrong, wrong))
    return None


# -- the processes ----------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    for name, fn in CASES.items():
        try:
            results[name] = {"ok": True, "info": fn(rank, world)}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


_RUNS: dict[int, list[dict] | str] = {}


def _results(world: int, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every rank's results for ``world`` processes, spawned once (a failed spawn is not
    retried by every test)."""
    if world not in _RUNS:
        out_dir = str(tmp_path_factory.mktemp(f"ring{world}"))
        try:
            mp.spawn(_worker, args=(world, free_port(), out_dir), nprocs=world, join=True)
            runs = []
            for rank in range(world):
                with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                    runs.append(json.load(f))
            _RUNS[world] = runs
        except Exception as error:
            _RUNS[world] = f"{type(error).__name__}: {error}"
    runs = _RUNS[world]
    if isinstance(runs, str):
        pytest.fail(f"the {world} processes failed: {runs}")
    return runs


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_case(name: str, world: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    runs = _results(world, tmp_path_factory)
    failures = [
        f"rank {r}:\n{run[name]['error']}" for r, run in enumerate(runs) if not run[name]["ok"]
    ]
    assert not failures, "\n".join(failures)


def test_bf16_merge_error_does_not_grow(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The float32 merge gives the same error at P = 2 and P = 4 (the partials lose nothing);
    merging the partials in bf16 is worse, and worse with more ranks."""
    errors = {world: _results(world, tmp_path_factory)[0]["bf16_merge"]["info"] for world in (2, 4)}
    fp32 = {w: errors[w]["fp32"]["mean"] for w in errors}
    naive = {w: errors[w]["naive"]["mean"] for w in errors}
    assert fp32[4] <= 1.02 * fp32[2], errors  # measured: equal to 4 digits
    assert fp32[4] <= 1.1 * errors[4]["one_process"]["mean"], errors
    assert naive[4] > 1.3 * fp32[4], errors  # measured: 1.57x
    assert naive[4] > 1.1 * naive[2], errors  # measured: 1.23x
