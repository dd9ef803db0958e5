"""Context parallelism (ring attention) for :class:`multihead.MultiheadAttention`.

Shape legend: N batch, H query heads, Hkv key/value heads, D head dim, E embed dim, P ranks in
the group, L the global sequence length, Lr this rank's shard, Lp the padded shard (the
largest shard, the same on every rank).

:func:`context_parallel` turns a layer into one whose forward takes this rank's shard of the
sequence and returns this rank's shard of the output. Every rank projects its own tokens;
keys and values then go round the group (``comm="ring"``: P - 1 point-to-point hops, each
posted before the current block is computed, so that transfer and compute overlap; or
``comm="allgather"``: one differentiable all-gather), and each query block's partial result
``(out, lse)`` over one key block is merged by log-sum-exp in float32 (float64 stays
float64). Masks are built per block from global positions, so causality, windows,
``segment_ids``, ``key_padding_mask``, ``mask_mod`` and ``score_mod`` mean what they mean on
one process; RoPE rotates every token at its global position.

Layouts (``balance``), with torch.tensor_split sizes (the first ``L % pieces`` pieces one
longer):

- ``"contiguous"``: the sequence cut into P pieces; rank r holds piece r.
- ``"zigzag"``: cut into 2P pieces; rank r holds pieces r and 2P - 1 - r, in that order.
  Under a causal mask every rank then has the same amount of visible work.

A sequence whose shards differ in length is padded to Lp inside (padded keys are never seen,
padded queries are dropped): any L >= P (contiguous) or L >= 2P (zigzag) works.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import mods
from ..layer import MultiheadAttention
from ..logits import attention_logits, scale, summed_over_groups, weighted_values
from ..masks import position_mask, to_additive
from ..rotary import apply_rotary, rotary_cos_sin
from ..tiled import _FLASH_CPU, _FLASH_CPU_BACKWARD
from ..validation import describe, invalid

__all__ = [
    "CommBytes",
    "context_parallel",
    "count_bytes",
    "gather_sequence",
    "ring_bytes",
    "shard_sequence",
]

_BALANCES = ("zigzag", "contiguous")
_COMMS = ("ring", "allgather")
_KV_TAG, _GRAD_TAG = 71, 72

# Tests only: merge the ring's per-block partials (out, lse) in the input dtype, as a naive
# low-precision ring would, to show what the float32 merge buys (forward only).
_NAIVE_LOW_PRECISION = False


# -- layouts --------------------------------------------------------------------------------


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(invalid(name, " or ".join(repr(c) for c in choices), repr(value)))
    return value


def _pieces(world: int, balance: str) -> int:
    return 2 * world if balance == "zigzag" else world


def _check_length(name: str, length: int, world: int, balance: str) -> None:
    pieces = _pieces(world, balance)
    if length < pieces:
        rule = "2P" if balance == "zigzag" else "P"
        raise ValueError(
            invalid(
                name,
                f"a sequence of at least {pieces} positions ({rule} for balance={balance!r} "
                f"over P={world} ranks: every rank needs a piece)",
                f"a sequence of {length}",
            )
        )


@dataclass(frozen=True)
class _Layout:
    """Which global positions each rank holds: ``runs[r]`` is rank r's list of global
    ``(start, stop)`` runs, in local order."""

    length: int
    world: int
    balance: str
    runs: tuple[tuple[tuple[int, int], ...], ...]

    @classmethod
    def make(cls, length: int, world: int, balance: str) -> _Layout:
        pieces = _pieces(world, balance)
        base, extra = divmod(length, pieces)
        bounds = [0]
        for i in range(pieces):
            bounds.append(bounds[-1] + base + (i < extra))
        piece = [(bounds[i], bounds[i + 1]) for i in range(pieces)]
        if balance == "zigzag":
            runs = tuple((piece[r], piece[2 * world - 1 - r]) for r in range(world))
        else:
            runs = tuple((piece[r],) for r in range(world))
        return cls(length, world, balance, runs)

    @property
    def sizes(self) -> list[int]:
        return [sum(b - a for a, b in runs) for runs in self.runs]

    @property
    def padded(self) -> int:
        return max(self.sizes)

    def local_runs(self, rank: int, offset: int = 0) -> list[tuple[int, int, int]]:
        """Rank ``rank``'s runs as ``(local offset, global start, length)``."""
        out, at = [], offset
        for a, b in self.runs[rank]:
            out.append((at, a, b - a))
            at += b - a
        return out

    def positions(self, rank: int, device: torch.device) -> Tensor:
        """Global positions of rank ``rank``'s tokens ``(Lr,)`` int64."""
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.runs[rank]])

    def order(self, device: torch.device) -> Tensor:
        """``(L,)`` int64: for each global position, its column in the rank-major
        concatenation of the P padded shards ``(P * Lp)``."""
        cols = torch.empty(self.length, dtype=torch.long, device=device)
        for rank in range(self.world):
            for at, a, n in self.local_runs(rank, rank * self.padded):
                cols[a : a + n] = torch.arange(at, at + n, device=device)
        return cols


# -- the group --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Comm:
    group: object
    rank: int
    world: int
    next: int  # global ranks of the ring's neighbours
    prev: int

    @classmethod
    def of(cls, group: object) -> _Comm:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "multihead.parallel: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first"
            )
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if rank < 0:
            raise ValueError(invalid("group", "a group this process belongs to", "another"))

        def global_rank(r: int) -> int:
            return r if group is None else dist.get_global_rank(group, r)

        return cls(
            group, rank, world, global_rank((rank + 1) % world), global_rank((rank - 1) % world)
        )


def _all_gather_into(out: Tensor, x: Tensor, group: object) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def _reduce_scatter_into(out: Tensor, x: Tensor, group: object) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)


# -- byte counting ----------------------------------------------------------------------------


@dataclass
class CommBytes:
    """Bytes this rank sent and received inside :func:`count_bytes`.

    ``forward_*``: keys and values in the forward; ``backward_*``: keys, values and their
    gradients in the backward (counted when the backward runs inside the block); ``other_*``:
    metadata (shard lengths, segment ids, key padding masks, gathered sequences). Point-to-point
    ring transfers are the exact sizes handed to ``isend`` / ``irecv``; a collective
    (all-gather, reduce-scatter) counts what a bandwidth-optimal ring algorithm moves per rank,
    ``(P - 1)`` times the per-rank chunk each way (the backend may move more). ``events``:
    ``(phase, what, step)`` in the order they happened (``post``, ``compute``, ``wait``).
    """

    forward_sent: int = 0
    forward_received: int = 0
    backward_sent: int = 0
    backward_received: int = 0
    other_sent: int = 0
    other_received: int = 0
    events: list[tuple[str, str, int]] = field(default_factory=list)


_COUNTERS: list[CommBytes] = []


@contextmanager
def count_bytes() -> Iterator[CommBytes]:
    """Counts this rank's traffic (see :class:`CommBytes`) while the block runs."""
    counter = CommBytes()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _record(kind: str, sent: int, received: int) -> None:
    for counter in _COUNTERS:
        setattr(counter, f"{kind}_sent", getattr(counter, f"{kind}_sent") + sent)
        setattr(counter, f"{kind}_received", getattr(counter, f"{kind}_received") + received)


def _event(phase: str, what: str, step: int) -> None:
    for counter in _COUNTERS:
        counter.events.append((phase, what, step))


def ring_bytes(
    *,
    batch: int,
    kv_heads: int,
    head_dim: int,
    seq_len: int,
    world: int,
    dtype: torch.dtype,
    balance: str = "zigzag",
    comm: str = "ring",
    backward: bool = False,
) -> int:
    """Key/value bytes one rank sends (and as many it receives) in one layer call.

    With ``Lp`` the padded shard (``L / P`` when P divides L; see the module docstring) and
    ``b`` the dtype's size, ``block = 2 * N * Hkv * Lp * D`` elements (K and V):

    - forward, either comm: ``(P - 1) * block * b``;
    - backward, ``"ring"``: ``(P - 1) * block * b`` (K and V go round again) plus
      ``P * block * b32`` (the dK / dV accumulators, in float32 for 16-bit inputs, ``b32`` =
      4, float64 for float64, travel P hops back to their owners); ``"allgather"``: the
      reduce-scatter of dK / dV, ``(P - 1) * block * b``.
    """
    _check_choice("balance", balance, _BALANCES)
    _check_choice("comm", comm, _COMMS)
    layout = _Layout.make(seq_len, world, balance)
    block = 2 * batch * kv_heads * layout.padded * head_dim
    item = torch.empty((), dtype=dtype).element_size()
    total = (world - 1) * block * item
    if backward and comm == "ring" and world > 1:
        total += world * block * torch.empty((), dtype=_work_dtype(dtype)).element_size()
    return total


# -- communication ----------------------------------------------------------------------------


def _exchange(send: Tensor, recv: Tensor, comm: _Comm, tag: int) -> list:
    """Posts ``send`` to the next rank and ``recv`` from the previous one; returns the works."""
    ops = [
        dist.P2POp(dist.isend, send, comm.next, comm.group, tag),
        dist.P2POp(dist.irecv, recv, comm.prev, comm.group, tag),
    ]
    return dist.batch_isend_irecv(ops)


def _pack(tensors: list[Tensor | None]) -> tuple[Tensor, list]:
    """One byte buffer holding the tensors (widest dtypes first, so that every view aligns)."""
    parts, chunks = [], []
    for x in tensors:
        if x is None:
            parts.append(None)
            continue
        x = x.contiguous()
        parts.append((tuple(x.shape), x.dtype, x.numel() * x.element_size()))
        chunks.append(x.reshape(-1).view(torch.uint8))
    return torch.cat(chunks), parts


def _unpack(buffer: Tensor, parts: list) -> list[Tensor | None]:
    out, at = [], 0
    for part in parts:
        if part is None:
            out.append(None)
            continue
        shape, dtype, size = part
        chunk = buffer[at : at + size]
        if at % torch.empty((), dtype=dtype).element_size():
            chunk = chunk.clone()
        out.append(chunk.view(dtype).view(shape))
        at += size
    return out


class _AllGather(torch.autograd.Function):
    """``x`` gathered from every rank along ``dim`` (rank-major); backward reduce-scatters
    (sums) the gradient back to each rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: _Comm, dim: int, kind: str) -> Tensor:
        ctx.comm, ctx.dim, ctx.kind = comm, dim, kind
        world = comm.world
        x = x.movedim(dim, 0).contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        if world > 1:
            _all_gather_into(out, x, comm.group)
        else:
            out.copy_(x)
        size = x.numel() * x.element_size() * (world - 1)
        _record(kind, size, size)
        return out.movedim(0, dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        comm, dim = ctx.comm, ctx.dim
        grad = grad.movedim(dim, 0).contiguous()
        out = grad.new_empty((grad.shape[0] // comm.world, *grad.shape[1:]))
        if comm.world > 1:
            _reduce_scatter_into(out, grad, comm.group)
        else:
            out.copy_(grad)
        size = out.numel() * out.element_size() * (comm.world - 1)
        _record("backward" if ctx.kind == "forward" else ctx.kind, size, size)
        return out.movedim(0, dim), None, None, None


def _lengths(comm: _Comm, values: list[int], device: torch.device) -> list[list[int]]:
    """``values`` of every rank (small ints, one all-gather)."""
    mine = torch.tensor(values, dtype=torch.long, device=device)
    if comm.world == 1:
        return [values]
    out = mine.new_empty(comm.world * len(values))
    _all_gather_into(out, mine, comm.group)
    size = mine.numel() * mine.element_size() * (comm.world - 1)
    _record("other", size, size)
    return out.view(comm.world, len(values)).tolist()


def _layout_of(comm: _Comm, name: str, local_len: int, balance: str, device, batch=None):
    """The global layout, from every rank's shard length (and batch size, checked equal)."""
    values = [local_len] if batch is None else [local_len, batch]
    rows = _lengths(comm, values, device)
    if batch is not None and len({row[1] for row in rows}) != 1:
        raise ValueError(
            invalid(name, "the same batch size on every rank", [row[1] for row in rows])
        )
    got = [row[0] for row in rows]
    length = sum(got)
    _check_length(name, length, comm.world, balance)
    layout = _Layout.make(length, comm.world, balance)
    if layout.sizes != got:
        raise ValueError(
            invalid(
                name,
                f"each rank's shard of a sequence of {length} positions in the "
                f"balance={balance!r} layout (shard_sequence's): {layout.sizes} positions "
                "per rank",
                f"shards of {got}",
            )
        )
    return layout


# -- public sequence helpers ------------------------------------------------------------------


def shard_sequence(x: Tensor, group: object = None, *, dim: int, balance: str = "zigzag") -> Tensor:
    """This rank's shard of ``x`` along ``dim`` (``x`` is the whole sequence, the same on
    every rank), in the ``balance`` layout: for ``"contiguous"`` piece r of
    ``torch.tensor_split(x, P, dim)``, for ``"zigzag"`` pieces r and 2P - 1 - r of
    ``torch.tensor_split(x, 2P, dim)``, concatenated. Differentiable.

    Raises:
        ValueError: ``balance`` unknown, or ``x`` shorter than P (contiguous) / 2P (zigzag)
            along ``dim``.
    """
    _check_choice("balance", balance, _BALANCES)
    comm = _Comm.of(group)
    dim = dim % x.dim()
    _check_length("x", x.shape[dim], comm.world, balance)
    layout = _Layout.make(x.shape[dim], comm.world, balance)
    runs = layout.runs[comm.rank]
    if len(runs) == 1:
        return x.narrow(dim, runs[0][0], runs[0][1] - runs[0][0])
    return torch.cat([x.narrow(dim, a, b - a) for a, b in runs], dim)


def gather_sequence(
    y: Tensor, group: object = None, *, dim: int, balance: str = "zigzag"
) -> Tensor:
    """The whole sequence, in order, on every rank, from each rank's shard ``y`` (the inverse
    of :func:`shard_sequence`). Differentiable: the gradient of each rank's copy flows back,
    summed over ranks, to the shard it came from.

    Raises:
        ValueError: ``balance`` unknown, or shards that are not one layout's.
    """
    _check_choice("balance", balance, _BALANCES)
    comm = _Comm.of(group)
    dim = dim % y.dim()
    layout = _layout_of(comm, "y", y.shape[dim], balance, y.device)
    moved = y.movedim(dim, 0)
    moved = F.pad(moved, (0, 0) * (moved.dim() - 1) + (0, layout.padded - moved.shape[0]))
    gathered = _AllGather.apply(moved, comm, 0, "other")  # (P * Lp, ...)
    return gathered.index_select(0, layout.order(y.device)).movedim(0, dim)


# -- block math -------------------------------------------------------------------------------


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(torch.float32, dtype)


@dataclass
class _Spec:
    """One call's constraints and where it runs (everything a block needs but its tensors)."""

    comm: _Comm
    layout: _Layout
    causal: bool
    window: int | None
    softcap: float | None
    mask_mod: object
    score_mod: object
    segments: Tensor | None  # (N, Lp) this rank's ids (its queries' and its keys')
    padding: Tensor | None  # (N, Lp) additive, this rank's keys
    work: torch.dtype
    extras: list[Tensor] = field(default_factory=list)  # what score_mod holds, needing grad
    scores: dict | None = None  # src rank -> (N, H, Lp, Lp) scores, when weights are asked


def _hidden(spec: _Spec, qa: int, qn: int, ka: int, kn: int) -> bool:
    """Whether no query in ``[qa, qa + qn)`` may see any key in ``[ka, ka + kn)`` by
    positions alone (causality, window, a shipped mask_mod's tile knowledge)."""
    q_first, q_last, k_first, k_last = qa, qa + qn - 1, ka, ka + kn - 1
    if spec.causal and k_first > q_last:
        return True
    w = spec.window
    if w is not None and (k_last <= q_first - w or (not spec.causal and k_first >= q_last + w)):
        return True
    if isinstance(spec.mask_mod, mods.TiledMaskMod):
        bounds = [torch.tensor([[x]]) for x in (q_first, q_last, k_first, k_last)]
        empty, _ = mods.tile_states(spec.mask_mod, *bounds)
        return bool(empty.all())
    return False


def _mod_result(name: str, result: object, floating: bool) -> Tensor:
    ok = isinstance(result, Tensor) and (
        result.is_floating_point() if floating else result.dtype == torch.bool
    )
    if not ok:
        expected = "a floating tensor" if floating else "a bool tensor (True = attend)"
        got = f"dtype {result.dtype}" if isinstance(result, Tensor) else type(result).__name__
        raise TypeError(invalid(name, f"a function returning {expected}", got))
    return result


def _tile_scores(
    spec: _Spec,
    q: Tensor,
    k: Tensor,
    qa: int,
    ka: int,
    q_seg: Tensor | None,
    k_seg: Tensor | None,
    k_pad: Tensor | None,
) -> Tensor:
    """Masked scores ``(N, H, B, C)`` of queries at global ``[qa, qa + B)`` against keys at
    ``[ka, ka + C)``: scale, soft-cap, score_mod, + key padding, then every hiding
    constraint (-inf), in the layer's order."""
    n, h, rows, _ = q.shape
    device = q.device
    q_idx = torch.arange(qa, qa + rows, device=device)
    kv_idx = torch.arange(ka, ka + k.shape[2], device=device)
    b_idx, h_idx = torch.arange(n, device=device), torch.arange(h, device=device)
    s = attention_logits(q, k, softcap=spec.softcap)
    if spec.score_mod is not None:
        modded = mods.on_grid(spec.score_mod, b_idx, h_idx, q_idx, kv_idx, score=s)
        s = _mod_result("score_mod", modded, True).to(s.dtype).expand(s.shape)
    if k_pad is not None:
        s = s + k_pad[:, None, None, :].to(s.dtype)
    allowed = None
    if spec.causal or spec.window is not None:
        allowed = ~position_mask(q_idx, kv_idx, causal=spec.causal, window=spec.window)
    if q_seg is not None:
        same = q_seg[:, None, :, None] == k_seg[:, None, None, :]
        allowed = same if allowed is None else allowed & same
    if spec.mask_mod is not None:
        shown = mods.on_grid(spec.mask_mod, b_idx, h_idx, q_idx, kv_idx)
        shown = _mod_result("mask_mod", shown, False)
        allowed = shown if allowed is None else allowed & shown
    return s if allowed is None else s.masked_fill(~allowed, float("-inf"))


def _partial(s: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of masked scores ``s`` over values ``v``: out normalised over these keys,
    lse their log-sum-exp; a row with no visible key gives 0 and -inf (no NaN, forward or
    backward)."""
    top = s.detach().amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    e = torch.exp(s - top)
    total = e.sum(dim=-1)
    ok = total > 0
    safe = torch.where(ok, total, 1.0)
    lse = torch.where(ok, top.squeeze(-1) + torch.log(safe), float("-inf"))
    return weighted_values(e, v) / safe[..., None], lse


def _merge(acc: tuple[Tensor, Tensor] | None, part: tuple[Tensor, Tensor]):
    """Two partials over disjoint keys -> one, by log-sum-exp (in their dtype)."""
    if acc is None:
        return part
    (o1, l1), (o2, l2) = acc, part
    top = torch.maximum(l1, l2).detach()
    top = torch.where(torch.isfinite(top), top, 0.0)
    w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
    total = w1 + w2
    ok = total > 0
    safe = torch.where(ok, total, 1.0)
    lse = torch.where(ok, top + torch.log(safe), float("-inf"))
    return o1 * (w1 / safe)[..., None] + o2 * (w2 / safe)[..., None], lse


def _merge_into(out: Tensor, lse: Tensor, part: tuple[Tensor, Tensor]) -> None:
    """:func:`_merge` of ``(out, lse)`` and ``part``, written into ``out`` and ``lse`` (views
    of the running result; no autograd)."""
    o2, l2 = part
    top = torch.maximum(lse, l2)
    top = torch.where(torch.isfinite(top), top, 0.0)
    w1, w2 = torch.exp(lse - top), torch.exp(l2 - top)
    total = w1 + w2
    ok = total > 0
    safe = torch.where(ok, total, 1.0)
    out.mul_((w1 / safe)[..., None]).add_(o2 * (w2 / safe)[..., None])
    lse.copy_(torch.where(ok, top + torch.log(safe), float("-inf")))


# Largest score tile (N * H * rows * cols elements) the masked-formula route computes at
# once: longer runs are cut into row (and, for very long key runs, column) chunks, so that
# its temporaries stay a few MiB whatever the sequence length.
_TILE_ELEMENTS = 1 << 18


def _flash_ok(spec: _Spec, q: Tensor, v: Tensor) -> bool:
    """Whether tiles of this call may go through SDPA's CPU flash kernel: nothing but
    positions (causality, a window) constrains a score, and nothing changes one."""
    return (
        _FLASH_CPU is not None
        and _FLASH_CPU_BACKWARD is not None
        and q.device.type == "cpu"
        and q.shape[-1] > 0
        and v.shape[-1] == q.shape[-1]
        and spec.softcap is None
        and spec.score_mod is None
        and spec.mask_mod is None
        and spec.segments is None
        and spec.padding is None
    )


def _plain(spec: _Spec, qa: int, qn: int, ka: int, kn: int) -> bool | None:
    """For a tile not hidden, of a call where only positions constrain: False when every
    query sees every key, True when it is a diagonal tile under plain causality (the
    kernel's top-left ``is_causal``), None when a window cuts through it."""
    q_first, q_last, k_first, k_last = qa, qa + qn - 1, ka, ka + kn - 1
    w = spec.window
    if spec.causal:
        if w is not None and q_last - k_first >= w:
            return None
        if k_last <= q_first:
            return False
        return True if (qa == ka and qn == kn) else None
    if w is not None and (q_last - k_first >= w or k_last - q_first >= w):
        return None
    return False


def _repeat_heads(x: Tensor, heads: int) -> Tensor:
    """``(N, Hkv, S, D)`` -> ``(N, H, S, D)``, each key/value head for its G query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _fold_heads(x: Tensor, kv_heads: int) -> Tensor:
    """``(N, H, S, D)`` gradients of repeated heads -> ``(N, Hkv, S, D)``, summed per group."""
    n, h, s, d = x.shape
    return x if h == kv_heads else x.view(n, kv_heads, h // kv_heads, s, d).sum(dim=2)


def _chunks(spec: _Spec, qa: int, qn: int, ka: int, kn: int, step: tuple):
    """Row and column chunks ``(r0, r1, c0, c1)`` (local to the tile) of at most
    ``_TILE_ELEMENTS`` scores, skipping those hidden by positions."""
    rows, cols = step
    for r0 in range(0, qn, rows):
        r1 = min(qn, r0 + rows)
        for c0 in range(0, kn, cols):
            c1 = min(kn, c0 + cols)
            if not _hidden(spec, qa + r0, r1 - r0, ka + c0, c1 - c0):
                yield r0, r1, c0, c1


def _steps(width: int, longest: int) -> tuple[int, int]:
    """``(rows, cols)`` per chunk for ``width = N * H`` and key runs up to ``longest``."""
    cols = max(1, min(longest, _TILE_ELEMENTS // max(width, 1)))
    return max(1, _TILE_ELEMENTS // max(width * cols, 1)), cols


def _block(
    spec: _Spec,
    q: Tensor,
    q_runs: list,
    k: Tensor,
    v: Tensor,
    k_runs: list,
    k_seg: Tensor | None,
    k_pad: Tensor | None,
    keep_scores: bool,
    into: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """This rank's queries ``(N, H, Lp, D)`` against one block of keys: ``(out, lse)``, and
    with ``keep_scores`` the masked scores ``(N, H, Lp, C)`` (-inf where hidden). Tiles of
    runs hidden by positions are skipped; tiles only positions constrain go through the CPU
    flash kernel (no grad, no weights asked); the others are computed by the masked formula
    in chunks of at most ``_TILE_ELEMENTS`` scores. Under autograd when the caller is.

    ``into``: a running ``(out, lse)`` over earlier blocks, merged with this block in place
    (no autograd) and returned."""
    n, h, rows, _ = q.shape
    if into is None:
        out = q.new_zeros(n, h, rows, v.shape[-1])
        lse = q.new_full((n, h, rows), float("-inf"))
    else:
        out, lse = into
    scores = q.new_full((n, h, rows, k.shape[2]), float("-inf")) if keep_scores else None
    flash = not keep_scores and not torch.is_grad_enabled() and _flash_ok(spec, q, v)
    kf = vf = None
    q_seg = spec.segments
    step = _steps(n * h, max((kn for _, _, kn in k_runs), default=1))
    for qo, qa, qn in q_runs:
        whole = None  # the flash tiles' partial over all qn rows
        chunked: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (r0, r1) -> partial
        for ko, ka, kn in k_runs:
            if _hidden(spec, qa, qn, ka, kn):
                continue
            causal = _plain(spec, qa, qn, ka, kn) if flash else None
            if causal is not None:
                if kf is None:
                    kf, vf = _repeat_heads(k, h), _repeat_heads(v, h)
                o, s = _FLASH_CPU(
                    q[:, :, qo : qo + qn],
                    kf[:, :, ko : ko + kn],
                    vf[:, :, ko : ko + kn],
                    0.0,
                    causal,
                    scale=scale(q.shape[-1]),
                )[:2]
                whole = _merge(whole, (o, s))
                continue
            for r0, r1, c0, c1 in _chunks(spec, qa, qn, ka, kn, step):
                r, c = slice(qo + r0, qo + r1), slice(ko + c0, ko + c1)
                s = _tile_scores(
                    spec,
                    q[:, :, r],
                    k[:, :, c],
                    qa + r0,
                    ka + c0,
                    None if q_seg is None else q_seg[:, r],
                    None if k_seg is None else k_seg[:, c],
                    None if k_pad is None else k_pad[:, c],
                )
                chunked[r0, r1] = _merge(chunked.get((r0, r1)), _partial(s, v[:, :, c]))
                if scores is not None:
                    scores[:, :, r, c] = s
                del s
        if chunked:
            outs, lses = [], []
            for r0 in range(0, qn, step[0]):
                r1 = min(qn, r0 + step[0])
                part = chunked.get((r0, r1))
                if part is None:
                    part = (
                        q.new_zeros(n, h, r1 - r0, v.shape[-1]),
                        q.new_full((n, h, r1 - r0), float("-inf")),
                    )
                outs.append(part[0])
                lses.append(part[1])
            whole = _merge(whole, (torch.cat(outs, dim=2), torch.cat(lses, dim=2)))
        if whole is not None and into is not None:
            _merge_into(out[:, :, qo : qo + qn], lse[:, :, qo : qo + qn], whole)
        elif whole is not None:
            out[:, :, qo : qo + qn] = whole[0]
            lse[:, :, qo : qo + qn] = whole[1]
        del whole, chunked
    return out, lse, scores


def _scores_like(a: Tensor, b: Tensor) -> Tensor:
    """``a b^T`` ``(N, H, B, C)`` for a ``(N, H, B, D)`` and b ``(N, Hkv, C, D)``, grouped."""
    n, h, rows, _ = a.shape
    kv_heads = b.shape[1]
    if kv_heads == h:
        return torch.matmul(a, b.transpose(-2, -1))
    grouped = a.reshape(n, kv_heads, (h // kv_heads) * rows, a.shape[-1])
    return torch.matmul(grouped, b.transpose(-2, -1)).view(n, h, rows, b.shape[2])


@dataclass
class _FlashGrad:
    """What the flash backward of a block needs of this rank's queries: q, dO and the final
    output, and the final log-sum-exp. With ``dlse`` (a gradient reaching the ring's lse,
    from sinks) one more head column carries it: q and k get a zero column, v a zero, dO a
    one and the output ``-dlse``, so that the kernel's ``rowsum(dO * O)`` is ``delta``
    (``rowsum(dO * O) - dlse``) and every other product is unchanged."""

    q: Tensor
    dout: Tensor
    out: Tensor
    lse: Tensor
    softmax_scale: float
    extra: bool

    @classmethod
    def make(cls, q: Tensor, dout: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None):
        extra = dlse is not None and bool((dlse != 0).any())
        if extra:
            q = F.pad(q, (0, 1))
            dout = F.pad(dout, (0, 1), value=1.0)
            out = torch.cat([out, -dlse.to(out.dtype)[..., None]], dim=-1)
        return cls(q, dout, out, lse, scale(q.shape[-1] - extra), extra)

    def keys(self, x: Tensor, heads: int) -> Tensor:
        return _repeat_heads(F.pad(x, (0, 1)) if self.extra else x, heads)


def _block_backward(
    spec, q, q_runs, k, v, k_runs, k_seg, k_pad, dout, delta, lse, flash, dq, dk, dv
):
    """Gradients of this rank's loss with respect to q, one key block's k and v (added into
    ``dq``, ``dk``, ``dv``), and the tensors score_mod holds (returned), from the saved
    log-sum-exp (flash attention's backward; through the CPU flash kernel's backward, given
    ``flash`` (:class:`_FlashGrad`), for the tiles only positions constrain)."""
    n, h = q.shape[:2]
    dextras: list[Tensor | None] = [None] * len(spec.extras)
    kf = vf = None
    d = q.shape[-1]
    q_seg = spec.segments
    step = _steps(n * h, max((kn for _, _, kn in k_runs), default=1))
    for qo, qa, qn in q_runs:
        for ko, ka, kn in k_runs:
            if _hidden(spec, qa, qn, ka, kn):
                continue
            causal = None if flash is None else _plain(spec, qa, qn, ka, kn)
            if causal is not None:
                if kf is None:
                    kf, vf = flash.keys(k, h), flash.keys(v, h)
                rows, cols = slice(qo, qo + qn), slice(ko, ko + kn)
                g_q, g_k, g_v = _FLASH_CPU_BACKWARD(
                    flash.dout[:, :, rows],
                    flash.q[:, :, rows],
                    kf[:, :, cols],
                    vf[:, :, cols],
                    flash.out[:, :, rows],
                    flash.lse[:, :, rows],
                    0.0,
                    causal,
                    scale=flash.softmax_scale,
                )
                dq[:, :, rows] += g_q[..., :d]
                dk[:, :, cols] += _fold_heads(g_k[..., :d], k.shape[1])
                dv[:, :, cols] += _fold_heads(g_v[..., : v.shape[-1]], v.shape[1])
                continue
            for r0, r1, c0, c1 in _chunks(spec, qa, qn, ka, kn, step):
                rows, cols = slice(qo + r0, qo + r1), slice(ko + c0, ko + c1)
                with torch.enable_grad():
                    q_t = q[:, :, rows].detach().requires_grad_()
                    k_t = k[:, :, cols].detach().requires_grad_()
                    s = _tile_scores(
                        spec,
                        q_t,
                        k_t,
                        qa + r0,
                        ka + c0,
                        None if q_seg is None else q_seg[:, rows],
                        None if k_seg is None else k_seg[:, cols],
                        None if k_pad is None else k_pad[:, cols],
                    )
                p = torch.exp(s.detach() - lse[:, :, rows, None])  # 0 where hidden
                do = dout[:, :, rows]
                dv[:, :, cols] += summed_over_groups(p, do, v.shape[1])
                ds = p * (_scores_like(do, v[:, :, cols]) - delta[:, :, rows, None])
                del p
                grads = torch.autograd.grad(s, [q_t, k_t, *spec.extras], ds, allow_unused=True)
                del s, ds
                dq[:, :, rows] += grads[0]
                dk[:, :, cols] += grads[1]
                for i, g in enumerate(grads[2:]):
                    if g is not None:
                        dextras[i] = g if dextras[i] is None else dextras[i] + g
                del grads
    return dextras


class _RingAttention(torch.autograd.Function):
    """Ring attention: ``(out, lse)`` ``(N, H, Lp, D)``, ``(N, H, Lp)`` in the work dtype for
    this rank's queries over every rank's keys. Forward: K/V (with their segment ids and
    padding) go round the ring, each hop posted before the current block is computed.
    Backward: K/V go round again with dK / dV accumulators that end at their owners.

    Memory per rank stays O(L / P): the forward runs without autograd and saves q, the packed
    K/V buffer it sends (k and v are views of it), out and lse; the K/V buffers and the three
    dK / dV accumulators are reused round the ring, and no tile outlives its step (tiles only
    positions constrain go through the CPU flash kernel, the others in bounded chunks)."""

    @staticmethod
    def forward(ctx, spec: _Spec, q: Tensor, k: Tensor, v: Tensor, *extras: Tensor):
        comm, layout, work = spec.comm, spec.layout, spec.work
        q_runs = layout.local_runs(comm.rank)
        own, parts = _pack([spec.segments, spec.padding, k, v])  # saved: k, v are views
        kv_bytes = k.numel() * k.element_size() + v.numel() * v.element_size()
        other_bytes = own.numel() - kv_bytes
        qw = q.to(work)
        n, h, rows, _ = q.shape
        naive = _NAIVE_LOW_PRECISION
        acc = None
        if not naive:  # the running result, merged with each block in place
            acc = (qw.new_zeros(n, h, rows, v.shape[-1]), qw.new_full((n, h, rows), float("-inf")))
        buffer, spare = own, []  # the block computed now; received buffers free again
        for step in range(comm.world):
            src = (comm.rank - step) % comm.world
            works, incoming = [], None
            if step < comm.world - 1:
                incoming = spare.pop() if spare else torch.empty_like(own)
                _event("forward", "post", step)
                works = _exchange(buffer, incoming, comm, _KV_TAG)
                _record("forward", kv_bytes, kv_bytes)
                _record("other", other_bytes, other_bytes)
            _event("forward", "compute", step)
            seg, pad, kb, vb = _unpack(buffer, parts)
            out, lse, scores = _block(
                spec,
                qw,
                q_runs,
                kb.to(work),
                vb.to(work),
                layout.local_runs(src),
                seg,
                pad,
                spec.scores is not None,
                into=None if naive else acc,
            )
            if spec.scores is not None:
                spec.scores[src] = scores
            if naive:
                acc = _merge(acc, (out.to(q.dtype), lse.to(q.dtype)))
            del out, lse, scores, seg, pad, kb, vb
            for work_item in works:
                work_item.wait()
            if works:
                _event("forward", "wait", step)
                if buffer is not own:
                    spare.append(buffer)
                buffer = incoming
        del buffer, spare
        acc = (acc[0].to(work), acc[1].to(work))
        ctx.spec, ctx.parts, ctx.kv_dtypes = spec, parts, (k.dtype, v.dtype)
        ctx.save_for_backward(q, own, *acc)
        return acc

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        spec, parts = ctx.spec, ctx.parts
        comm, layout, work = spec.comm, spec.layout, spec.work
        q, own, out, lse = ctx.saved_tensors
        _, _, k, v = _unpack(own, parts)
        dout = torch.zeros_like(out) if dout is None else dout.to(work)
        delta = (dout * out).sum(dim=-1)
        if dlse is not None:
            delta = delta - dlse.to(work)
        lse = torch.where(torch.isfinite(lse), lse, 0.0)
        q_runs = layout.local_runs(comm.rank)
        qw = q.to(work)
        flash = _FlashGrad.make(qw, dout, out, lse, dlse) if _flash_ok(spec, qw, v) else None
        dq = torch.zeros_like(qw)
        dextras: list[Tensor | None] = [None] * len(spec.extras)
        kv_bytes = k.numel() * k.element_size() + v.numel() * v.element_size()
        other_bytes = own.numel() - kv_bytes
        # dK / dV accumulators (2, N, Hkv, Lp, D): the one this block adds into, the one in
        # flight to the next rank, the one arriving from the previous; reused round the ring.
        shape = (2, *k.shape)
        contribution = torch.zeros(shape, dtype=work, device=q.device)
        grad_works: list = []
        grads = sending = None
        free: list[Tensor] = []
        buffer, spare = own, []
        for step in range(comm.world):
            src = (comm.rank - step) % comm.world
            works, incoming = [], None
            if step < comm.world - 1:
                incoming = spare.pop() if spare else torch.empty_like(own)
                _event("backward", "post", step)
                works = _exchange(buffer, incoming, comm, _KV_TAG)
                _record("backward", kv_bytes, kv_bytes)
                _record("other", other_bytes, other_bytes)
            _event("backward", "compute", step)
            seg, pad, kb, vb = _unpack(buffer, parts)
            dex_b = _block_backward(
                spec,
                qw,
                q_runs,
                kb.to(work),
                vb.to(work),
                layout.local_runs(src),
                seg,
                pad,
                dout,
                delta,
                lse,
                flash,
                dq,
                contribution[0],
                contribution[1],
            )
            del seg, pad, kb, vb
            for i, g in enumerate(dex_b):
                if g is not None:
                    dextras[i] = g if dextras[i] is None else dextras[i] + g
            if step > 0:  # the accumulator this block brought from the previous rank
                for work_item in grad_works:
                    work_item.wait()
                contribution += grads
                free += [grads, sending]
            if comm.world > 1:
                sending, grads = (
                    contribution,
                    free.pop() if free else torch.empty(shape, dtype=work, device=q.device),
                )
                grad_works = _exchange(sending, grads, comm, _GRAD_TAG)
                size = sending.numel() * sending.element_size()
                _record("backward", size, size)
                if step < comm.world - 1:
                    contribution = free.pop().zero_() if free else torch.zeros_like(sending)
            else:
                grads = contribution
            for work_item in works:
                work_item.wait()
            if works:
                if buffer is not own:
                    spare.append(buffer)
                buffer = incoming
        del buffer, spare, free
        for work_item in grad_works:  # the last hop brings each rank its own dK / dV
            work_item.wait()
        del sending
        k_dtype, v_dtype = ctx.kv_dtypes
        return (
            None,
            dq.to(q.dtype),
            grads[0].to(k_dtype),
            grads[1].to(v_dtype),
            *dextras,
        )


def _allgather_attention(spec: _Spec, q: Tensor, k: Tensor, v: Tensor, keep_scores: bool):
    """K/V gathered once (differentiable), then this rank's queries against all of them."""
    comm, layout, work = spec.comm, spec.layout, spec.work
    gathered = _AllGather.apply(torch.stack([k, v]), comm, 3, "forward")  # (2, N, Hkv, P*Lp, D)
    meta = [x for x in (spec.segments, spec.padding) if x is not None]
    metas = iter(_AllGather.apply(x.detach(), comm, 1, "other") for x in meta)
    seg = next(metas) if spec.segments is not None else None
    pad = next(metas) if spec.padding is not None else None
    k_runs = [run for r in range(comm.world) for run in layout.local_runs(r, r * layout.padded)]
    out, lse, scores = _block(
        spec,
        q.to(work),
        layout.local_runs(comm.rank),
        gathered[0].to(work),
        gathered[1].to(work),
        k_runs,
        seg,
        pad,
        keep_scores,
    )
    return out, lse, scores


def _graph_leaves(result: Tensor) -> list[Tensor]:
    """The leaf tensors ``result``'s autograd graph reaches (its AccumulateGrad nodes)."""
    leaves: list[Tensor] = []
    seen: set[int] = set()
    stack = [result.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            leaves.append(variable)
            continue
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def _captured(mod: object, like: Tensor | None = None) -> list[Tensor]:
    """Floating tensors needing grad that ``mod`` holds: an nn.Module's parameters, tensors
    (and modules) in its closure or attributes, and every leaf its result's autograd graph
    reaches when called once on a point (``like``'s dtype and device; this finds tensors held
    through ``functools.partial``, lists, wrappers and bound methods too). The ring's backward
    returns their gradients."""
    found: list[Tensor] = []

    def add(x: object) -> None:
        if isinstance(x, nn.Module):
            found.extend(p for p in x.parameters() if p.requires_grad)
        elif isinstance(x, Tensor) and x.is_floating_point() and x.requires_grad:
            found.append(x)

    if mod is None:
        return found
    add(mod)
    for cell in getattr(mod, "__closure__", None) or ():
        try:
            add(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    if not isinstance(mod, nn.Module):
        for value in getattr(mod, "__dict__", {}).values():
            add(value)
    if like is not None and callable(mod) and torch.is_grad_enabled():
        index = torch.zeros((), dtype=torch.long, device=like.device)
        score = torch.zeros((), dtype=like.dtype, device=like.device)
        try:
            result = mod(score, index, index, index, index)
        except Exception:
            result = None
        if isinstance(result, Tensor) and result.requires_grad:
            found.extend(
                x for x in _graph_leaves(result) if x.is_floating_point() and x.requires_grad
            )
    unique: dict[int, Tensor] = {}
    for x in found:
        unique.setdefault(id(x), x)
    return list(unique.values())


# -- the layer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    group: object
    balance: str
    comm: str


class _ContextParallel:
    """Mixin whose forward runs the layer over a sharded sequence (see
    :func:`context_parallel`)."""

    _context_parallel: _Config

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        cache: object = None,
        segment_ids: Tensor | None = None,
        mask_mod: object = None,
        score_mod: object = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The layer's forward on this rank's shard (see :func:`context_parallel`)."""
        config = self._context_parallel
        if not (query is key and key is value):
            raise ValueError(
                invalid(
                    "key",
                    "self-attention under context parallel: query, key and value the same "
                    "tensor (this rank's shard of one sequence)",
                    "a key or value that is not the query",
                )
            )
        for name, given in (("attn_mask", attn_mask), ("cache", cache)):
            if given is not None:
                hint = " (express it as a mask_mod on global positions)" * (name == "attn_mask")
                raise ValueError(
                    invalid(name, f"None under context parallel{hint}", describe(given))
                )
        if isinstance(query, Tensor) and query.is_nested:
            raise ValueError(invalid("query", "a dense tensor", describe(query)))
        if self.training and self.dropout > 0.0:
            raise ValueError(
                invalid(
                    "dropout",
                    "0.0 in training under context parallel (or call layer.eval())",
                    self.dropout,
                )
            )
        call = self._check_call(
            query, key, value, key_padding_mask, None, None, segment_ids, mask_mod, score_mod
        )
        comm = _Comm.of(config.group)
        device = query.device
        layout = _layout_of(
            comm, "query", call.query_len, config.balance, device, batch=call.batch_size
        )
        local, padded = call.query_len, layout.padded
        q, k, v = self._project_heads(query, key, value, call.is_batched, call.batch_first)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            positions = layout.positions(comm.rank, device)
            cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_base, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        work = _work_dtype(q.dtype)
        grow = (0, 0, 0, padded - local)
        q, k, v = F.pad(q, grow), F.pad(k, grow), F.pad(v, grow)  # (N, H|Hkv, Lp, D)
        segments = padding = None
        if call.segment_ids is not None:
            segments = F.pad(call.segment_ids.long(), (0, padded - local))
        if key_padding_mask is not None:
            mask = key_padding_mask.reshape(call.batch_size, local).detach()
            padding = F.pad(to_additive(mask, work), (0, padded - local))
        window = self.window
        if window is not None and window >= layout.length:
            window = None  # no limit (and no huge ints in int64 arithmetic)
        spec = _Spec(
            comm=comm,
            layout=layout,
            causal=bool(is_causal),
            window=window,
            softcap=self.softcap,
            mask_mod=mask_mod,
            score_mod=score_mod,
            segments=segments,
            padding=padding,
            work=work,
        )
        if config.comm == "ring":
            spec.extras = _captured(score_mod, q)
            spec.scores = {} if need_weights else None
            out, lse = _RingAttention.apply(spec, q, k, v, *spec.extras)
            scores = norm = None
            if need_weights:  # the ring's weights carry no gradient
                scores = torch.cat([spec.scores[src] for src in range(comm.world)], dim=-1)
                spec.scores, norm = None, lse.detach()
        else:
            out, lse, scores = _allgather_attention(spec, q, k, v, need_weights)
            norm = lse
        sinks = self.sinks
        if sinks is not None:
            sink = sinks.to(q.dtype).to(work).view(1, -1, 1)
            out = out * torch.sigmoid(lse - sink)[..., None]  # one more term in the normaliser
            if need_weights:
                norm = torch.logaddexp(norm, sink.detach() if config.comm == "ring" else sink)
        out = out[:, :, :local].to(q.dtype)
        weights = None
        if need_weights:
            scores = scores[:, :, :local].index_select(-1, layout.order(device))
            top = torch.where(torch.isfinite(norm), norm, 0.0)[:, :, :local, None]
            weights = torch.exp(scores - top).to(q.dtype)  # (N, H, Lr, L)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        return self._output(out, weights, query, call)


class ContextParallelMultiheadAttention(_ContextParallel, MultiheadAttention):
    """A :class:`multihead.MultiheadAttention` after :func:`context_parallel`."""


_CLASSES: dict[type, type] = {MultiheadAttention: ContextParallelMultiheadAttention}


def context_parallel(
    layer: MultiheadAttention,
    group: object = None,
    *,
    balance: str = "zigzag",
    comm: str = "ring",
) -> MultiheadAttention:
    """Makes ``layer`` context parallel over ``group`` (None: the default group), in place,
    and returns it.

    Afterwards ``layer(x, x, x, ...)`` takes this rank's shard ``x`` of the sequence
    (:func:`shard_sequence`'s layout for ``balance``; ``(Lr, N, E)``, ``(N, Lr, E)`` with
    batch_first, or ``(Lr, E)``) and returns this rank's shard of the output, and with
    ``need_weights`` the weights of this rank's query rows over all L keys in global order
    (``(N, Lr, L)`` averaged or ``(N, H, Lr, L)``). ``key_padding_mask`` and ``segment_ids``
    come sharded like the sequence (``(N, Lr)``); ``is_causal``, the layer's window, RoPE,
    ``mask_mod`` and ``score_mod`` use global positions. Every rank must call the layer
    together (it communicates).

    Args:
        balance: ``"zigzag"`` (2P pieces, rank r holds r and 2P - 1 - r: balanced causal
            work) or ``"contiguous"`` (P pieces).
        comm: ``"ring"`` (K/V blocks go round the group with ``batch_isend_irecv``, each hop
            overlapping the current block's compute; a custom backward runs the reverse
            ring, memory per rank O(L / P)) or ``"allgather"`` (one differentiable all-gather
            of K/V; memory O(L) per rank).

    Parameter gradients on each rank are that rank's part: sum them over the group (as data
    parallel does). Returned weights are differentiable with ``"allgather"`` only; with
    ``"ring"`` they carry no gradient. Under ``"ring"``, gradients reach tensors a score_mod
    holds as module parameters, closure variables or attributes.

    Not supported (ValueError): cross-attention, ``attn_mask`` (use a mask_mod), a KV cache,
    dropout in training, ``add_bias_kv`` / ``add_zero_attn``.

    Raises:
        TypeError: ``layer`` not a :class:`multihead.MultiheadAttention`.
        ValueError: ``balance`` or ``comm`` unknown, or the layer has extra key slots.
        RuntimeError: torch.distributed not initialised.
    """
    if not isinstance(layer, MultiheadAttention):
        raise TypeError(invalid("layer", "a multihead.MultiheadAttention", describe(layer)))
    if getattr(layer, "head_parallel", None) is not None:
        raise ValueError(
            invalid(
                "layer",
                "a layer not sharded over heads (context_parallel and shard_heads do not combine)",
                "a layer made head parallel by shard_heads",
            )
        )
    _check_choice("balance", balance, _BALANCES)
    _check_choice("comm", comm, _COMMS)
    if layer.bias_k is not None or layer.add_zero_attn:
        raise ValueError(
            invalid(
                "layer",
                "a layer without add_bias_kv / add_zero_attn under context parallel",
                "a layer with extra key slots",
            )
        )
    _Comm.of(group)
    layer._context_parallel = _Config(group, balance, comm)
    cls = type(layer)
    if not issubclass(cls, _ContextParallel):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"ContextParallel{cls.__name__}", (_ContextParallel, cls), {})
        layer.__class__ = _CLASSES[cls]
    return layer
