"""Tensor parallelism over heads: :func:`shard_heads` splits a :class:`multihead.MultiheadAttention`
across the ranks of a ``torch.distributed`` process group (Megatron-LM's attention split).

Every rank holds the same full layer before the call (same seed or the same checkpoint) and
afterwards keeps ``H / P`` query heads: the rows of q, k and v that its heads read, taken from
each block of the packed ``in_proj_weight`` (rows q, then k, then v: a plain cut of the packed
weight would mix them), its columns of ``out_proj.weight``, its ``sinks`` and ``gate_proj``
rows, and the key/value heads its query heads read. The sharded layer *is* a
``MultiheadAttention`` with ``num_heads = H / P``, ``num_kv_heads`` its local key/value heads and
``head_dim`` D (``embed_dim`` stays E), so every option, mask and the KV cache work unchanged;
its forward adds the one collective:

- forward: every rank gets the full input, runs its heads, and its ``out_proj`` columns give a
  partial ``(N, L, E)`` output; ONE all-reduce (sum) of it (and of the averaged attention
  weights, in the same buffer) gives the output on every rank; ``out_proj.bias`` is added after
  the reduction, on every rank. Per-head weights (``average_attn_weights=False``) are
  all-gathered, only then.
- backward (Megatron's f / g pair): the all-reduce passes the gradient through unchanged (every
  rank computes the same loss from the same output), and ONE all-reduce sums what the ranks'
  heads contribute to the gradients of the inputs and of the parameters that several ranks
  hold (``q_norm`` / ``k_norm`` weights, and key/value heads shared by several ranks), so after
  ``backward()`` every rank holds exact gradients: its shard's, and the whole gradient of what
  it replicates. ``torch.distributed.nn.functional.all_reduce`` is not used: its backward
  all-reduces the gradient again, which multiplies every gradient by P when each rank computes
  the same loss.

Grouped-query attention: key/value heads are split when ``num_kv_heads`` is a multiple of P,
and replicated when P is a multiple of ``num_kv_heads`` (each rank keeps the one key/value head
its query heads read: query head h reads key/value head ``h // (H / Hkv)``); anything else
would give a rank query heads of two key/value groups in uneven numbers and is refused.

Rules of use: every rank runs the same calls (same shapes, same options, the same backward),
as for any collective; build optimizers after sharding (the parameters are new, smaller
tensors); dropout draws each rank's masks from that rank's RNG, so they are not the
single-process masks (seed the ranks differently for independent masks across heads).
``mask_mod`` / ``score_mod`` see the full layer's head index ``h``; a mod with learned
parameters of its own (``mods.RelativePositionBias``, learned ALiBi slopes) gets from each rank
only its heads' share of their gradient: sum it over the ranks yourself. Per-head
``attn_mask`` ``(N * H, L, S)`` is cut to each rank's heads. Nested tensors are refused; a
sharded layer does not pickle (its process group) but deep-copies (sharing the group);
``_reset_parameters`` on a sharded layer redraws local shards (initialise before sharding).

Checkpoints: :func:`full_state_dict` gathers the single-process state_dict on every rank (it
loads into ``torch.nn.MultiheadAttention`` when no option beyond torch's is used); a full
state_dict (ours or torch's) loads into the layer before sharding; :func:`checkpoint_state`
wraps the layer for ``torch.distributed.checkpoint`` (DCP) as DTensors, so a checkpoint saved
with P ranks loads with any other P, or into an unsharded layer.

Communication: :func:`count_comm` records each collective this module makes, and
:func:`comm_bytes` gives the bytes per rank of bandwidth-optimal ring algorithms
(all-reduce ``2 (P - 1) / P * n * b``, all-gather ``(P - 1) / P * n * b`` for ``n`` elements of
``b`` bytes).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import mods as _mods
from ..layer import MultiheadAttention
from ..validation import describe, invalid

__all__ = [
    "Collective",
    "CommLog",
    "HeadParallel",
    "HeadParallelMultiheadAttention",
    "checkpoint_state",
    "comm_bytes",
    "count_comm",
    "dcp_state_dict",
    "full_state_dict",
    "gather_full",
    "load_dcp_state_dict",
    "shard_heads",
]

# Segment modes: how one block of a parameter is laid out over the ranks.
_SPLIT = "split"  # rank r holds chunk r of P
_KV = "kv"  # rank r holds chunk kv_index of Hkv, shared by the P / Hkv ranks of that group
_REPLICATE = "replicate"  # every rank holds it all; gradients are summed over the ranks
_AFTER = "after"  # every rank holds it all, used after the reduction: gradients already whole


@dataclasses.dataclass(frozen=True)
class _Segment:
    size: int  # along the parameter's dim, in the full layout
    mode: str
    name: str = ""  # "q", "k", "v" for the blocks of a packed parameter


@dataclasses.dataclass(eq=False)
class HeadParallel:
    """How a sharded layer sits in its group (``layer.head_parallel``). ``num_heads``,
    ``num_kv_heads`` and ``head_dim`` are the full layer's."""

    group: dist.ProcessGroup
    rank: int
    world_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mesh: object | None = None  # the DeviceMesh given, or one made for DCP
    layout: dict = dataclasses.field(default_factory=dict, repr=False)  # set by shard_heads

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.world_size

    @property
    def head_start(self) -> int:
        return self.rank * self.local_heads

    @property
    def kv_split(self) -> bool:
        """Key/value heads split over the ranks (else replicated, one per rank)."""
        return self.num_kv_heads % self.world_size == 0

    @property
    def local_kv_heads(self) -> int:
        return self.num_kv_heads // self.world_size if self.kv_split else 1

    @property
    def kv_start(self) -> int:
        if self.kv_split:
            return self.rank * self.local_kv_heads
        return self.head_start // (self.num_heads // self.num_kv_heads)

    def parts(self, seg: _Segment) -> tuple[int, int]:
        """(number of chunks, this rank's chunk) of a segment."""
        if seg.mode == _SPLIT:
            return self.world_size, self.rank
        if seg.mode == _KV:
            return self.num_kv_heads, self.kv_start
        return 1, 0

    def owner_ranks(self, seg: _Segment) -> list[int]:
        """For each chunk of a segment, the first group rank holding it."""
        if seg.mode == _SPLIT:
            return list(range(self.world_size))
        if seg.mode == _KV:
            per = self.world_size // self.num_kv_heads
            return [j * per for j in range(self.num_kv_heads)]
        return [0]

    def __deepcopy__(self, memo: dict) -> HeadParallel:
        # A copied layer shares the process group (and mesh): handles, not data.
        return dataclasses.replace(self, layout=copy.deepcopy(self.layout, memo))

    def __repr__(self) -> str:
        return (
            f"HeadParallel(rank={self.rank}, world_size={self.world_size}, "
            f"heads={self.head_start}..{self.head_start + self.local_heads - 1} of "
            f"{self.num_heads}, kv_heads={self.kv_start}..{self.kv_start + self.local_kv_heads - 1}"
            f" of {self.num_kv_heads})"
        )


# ---------------------------------------------------------------------------------------------
# Layout: for each parameter, the dim it is cut along and its blocks in the full layout.


def _layout(layer: MultiheadAttention, info: HeadParallel) -> dict[str, tuple[int, list[_Segment]]]:
    H, Hkv, D = info.num_heads, info.num_kv_heads, info.head_dim
    kv = _SPLIT if info.kv_split else _KV
    q_seg, k_seg = _Segment(H * D, _SPLIT, "q"), _Segment(Hkv * D, kv, "k")
    v_seg = _Segment(Hkv * D, kv, "v")
    packed = [q_seg, k_seg, v_seg]
    layout: dict[str, tuple[int, list[_Segment]]] = {
        "in_proj_weight": (0, packed),
        "q_proj_weight": (0, [q_seg]),
        "k_proj_weight": (0, [k_seg]),
        "v_proj_weight": (0, [v_seg]),
        "in_proj_bias": (0, packed),
        "out_proj.weight": (1, [_Segment(H * D, _SPLIT)]),
        "out_proj.bias": (0, [_Segment(layer.embed_dim, _AFTER)]),
        "bias_k": (2, [_Segment(Hkv * D, kv)]),
        "bias_v": (2, [_Segment(Hkv * D, kv)]),
        "q_norm.weight": (0, [_Segment(D, _REPLICATE)]),
        "k_norm.weight": (0, [_Segment(D, _REPLICATE)]),
        "sinks": (0, [_Segment(H, _SPLIT)]),
        "gate_proj.weight": (0, [_Segment(H * D, _SPLIT)]),
        "gate_proj.bias": (0, [_Segment(H * D, _SPLIT)]),
    }
    present = dict(layer.named_parameters())
    unknown = sorted(set(present) - set(layout))
    if unknown:
        raise ValueError(
            invalid(
                "layer",
                "a layer whose parameters shard_heads knows how to split over heads",
                f"unknown parameters {unknown}",
            )
        )
    return {key: spec for key, spec in layout.items() if key in present}


def _owner(layer: nn.Module, key: str) -> tuple[nn.Module, str]:
    *path, name = key.split(".")
    module = layer
    for part in path:
        module = getattr(module, part)
    return module, name


def _local_sizes(segments: list[_Segment], info: HeadParallel) -> list[int]:
    return [seg.size // info.parts(seg)[0] for seg in segments]


def _take_local(full: Tensor, dim: int, segments: list[_Segment], info: HeadParallel) -> Tensor:
    """This rank's pieces of a full-layout tensor, concatenated along ``dim``."""
    pieces, at = [], 0
    for seg in segments:
        count, index = info.parts(seg)
        chunk = seg.size // count
        pieces.append(full.narrow(dim, at + index * chunk, chunk))
        at += seg.size
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def _gather_segments(
    local: Tensor, dim: int, segments: list[_Segment], info: HeadParallel
) -> list[Tensor]:
    """The full-layout blocks of a tensor in the local layout (collective)."""
    blocks = []
    for piece, seg in zip(local.split(_local_sizes(segments, info), dim), segments, strict=True):
        if seg.mode in (_REPLICATE, _AFTER) or info.world_size == 1:
            blocks.append(piece.detach().clone())
            continue
        piece = piece.detach().contiguous()
        gathered = [torch.empty_like(piece) for _ in range(info.world_size)]
        dist.all_gather(gathered, piece, group=info.group)
        blocks.append(torch.cat([gathered[r] for r in info.owner_ranks(seg)], dim))
    return blocks


# ---------------------------------------------------------------------------------------------
# Communication accounting.


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective made by this module: ``numel`` elements of the whole tensor reduced or
    gathered (for an all-gather, the gathered result), ``element_size`` bytes each."""

    op: str  # "all_reduce" or "all_gather"
    phase: str  # "forward" or "backward"
    numel: int
    element_size: int
    world_size: int

    @property
    def bytes_per_rank(self) -> float:
        return comm_bytes(self.op, self.numel, self.element_size, self.world_size)


@dataclasses.dataclass
class CommLog:
    """The collectives recorded by :func:`count_comm`."""

    records: list[Collective] = dataclasses.field(default_factory=list)

    def bytes_per_rank(self, phase: str | None = None) -> float:
        """Bytes each rank sends (and, as many, receives) under the ring model."""
        return sum(c.bytes_per_rank for c in self.records if phase in (None, c.phase))

    def calls(self, phase: str | None = None) -> list[Collective]:
        return [c for c in self.records if phase in (None, c.phase)]


_LOGS: list[CommLog] = []


@contextlib.contextmanager
def count_comm() -> Iterator[CommLog]:
    """Records every collective the head-parallel forward and backward make inside the block
    (op, phase, elements, element size), e.g. ``with count_comm() as log: layer(x, x, x)``."""
    log = CommLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def comm_bytes(op: str, numel: int, element_size: int, world_size: int) -> float:
    """Bytes each rank sends (and receives) for one collective over a tensor of ``numel``
    elements of ``element_size`` bytes, with bandwidth-optimal ring algorithms:
    all-reduce (reduce-scatter then all-gather) ``2 (P - 1) / P * numel * element_size``;
    all-gather (``numel`` = the gathered tensor) ``(P - 1) / P * numel * element_size``.
    The head-parallel forward all-reduces ``N * L * E`` output elements per call."""
    P = world_size
    if op == "all_reduce":
        return 2 * (P - 1) * numel * element_size / P
    if op == "all_gather":
        return (P - 1) * numel * element_size / P
    raise ValueError(invalid("op", '"all_reduce" or "all_gather"', repr(op)))


def _record(op: str, phase: str, numel: int, element_size: int, info: HeadParallel) -> None:
    entry = Collective(op, phase, numel, element_size, info.world_size)
    for log in _LOGS:
        log.records.append(entry)


# ---------------------------------------------------------------------------------------------
# The differentiable collectives (Megatron's f and g).


class _SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce (sum) of the partial outputs. Backward: identity (every rank holds
    the same gradient of the replicated output)."""

    @staticmethod
    def forward(ctx, info: HeadParallel, partial: Tensor) -> Tensor:  # type: ignore[override]
        total = partial.clone(memory_format=torch.contiguous_format)
        _record("all_reduce", "forward", total.numel(), total.element_size(), info)
        dist.all_reduce(total, group=info.group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        return None, grad


class _GatherHeads(torch.autograd.Function):
    """Forward: all-gather of per-head tensors along the head dim. Backward: this rank's slice
    of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, info: HeadParallel, local: Tensor, dim: int) -> Tensor:  # type: ignore[override]
        local = local.contiguous()
        ctx.info, ctx.dim, ctx.size = info, dim, local.shape[dim]
        parts = [torch.empty_like(local) for _ in range(info.world_size)]
        _record(
            "all_gather", "forward", local.numel() * info.world_size, local.element_size(), info
        )
        dist.all_gather(parts, local, group=info.group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        return None, grad.narrow(ctx.dim, ctx.info.rank * ctx.size, ctx.size), None


class _Packer:
    """Which part of a gradient is summed over the ranks, as a flat buffer, and back."""

    def __init__(self, dim: int | None, segments: list[_Segment] | None, info: HeadParallel):
        self.dim, self.segments, self.info = dim, segments, info

    def pack(self, grad: Tensor) -> Tensor:
        if self.segments is None:  # an input: its whole gradient
            return grad.reshape(-1)
        parts = []
        sizes = _local_sizes(self.segments, self.info)
        for piece, seg in zip(grad.split(sizes, self.dim), self.segments, strict=True):
            if seg.mode == _REPLICATE:
                parts.append(piece.reshape(-1))
            elif seg.mode == _KV:  # zero-padded to every key/value head: owners sum theirs
                index = self.info.parts(seg)[1]
                shape = list(piece.shape)
                shape[self.dim] = seg.size
                full = piece.new_zeros(shape)
                full.narrow(self.dim, index * piece.shape[self.dim], piece.shape[self.dim]).copy_(
                    piece
                )
                parts.append(full.reshape(-1))
        return torch.cat(parts) if parts else grad.new_zeros(0)

    def unpack(self, flat: Tensor, grad: Tensor) -> Tensor:
        if self.segments is None:
            return flat.view(grad.shape)
        sizes = _local_sizes(self.segments, self.info)
        pieces = list(grad.split(sizes, self.dim))
        at = 0
        for i, seg in enumerate(self.segments):
            if seg.mode == _REPLICATE:
                n = pieces[i].numel()
                pieces[i] = flat[at : at + n].view(pieces[i].shape)
                at += n
            elif seg.mode == _KV:
                count, index = self.info.parts(seg)
                shape = list(pieces[i].shape)
                shape[self.dim] = seg.size
                n = pieces[i].numel() * count
                full = flat[at : at + n].view(shape)
                pieces[i] = full.narrow(self.dim, index * sizes[i], sizes[i])
                at += n
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.dim)


class _EnterHeads(torch.autograd.Function):
    """Forward: identity (views). Backward: ONE all-reduce (per dtype) that sums over the
    ranks the gradients of the inputs (each rank's heads give a part) and the parts of
    parameters that several ranks hold."""

    @staticmethod
    def forward(ctx, info: HeadParallel, packers: list[_Packer], *tensors: Tensor):  # type: ignore[override]
        ctx.info, ctx.packers = info, packers
        ctx.likes = [(t.shape, t.dtype, t.device) for t in tensors]
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    @once_differentiable  # its all-reduce has no derivative: a double backward is refused
    def backward(ctx, *grads: Tensor | None):  # type: ignore[override]
        info = ctx.info
        grads = [
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grads, ctx.likes, strict=True)
        ]
        packed = [p.pack(g) for p, g in zip(ctx.packers, grads, strict=True)]
        out = list(grads)
        for dtype in dict.fromkeys(g.dtype for g in grads):
            chosen = [i for i, g in enumerate(grads) if g.dtype == dtype]
            flat = torch.cat([packed[i] for i in chosen])
            _record("all_reduce", "backward", flat.numel(), flat.element_size(), info)
            dist.all_reduce(flat, group=info.group)
            at = 0
            for i in chosen:
                n = packed[i].numel()
                out[i] = ctx.packers[i].unpack(flat[at : at + n], grads[i])
                at += n
        return (None, None, *out)


# ---------------------------------------------------------------------------------------------
# mask_mod / score_mod: the local head h is the full layer's head h + head_start.


class _HeadOffset(_mods.TiledMaskMod):
    """A mod that sees the full layer's head index: ``mod(..., h + offset, ...)``. Tile
    classification (head-independent by contract) and ``visible_span`` are the mod's own."""

    def __init__(self, mod: Callable, offset: int, h_at: int) -> None:
        self.mod, self.offset, self.h_at = mod, offset, h_at
        self.broadcast_safe = getattr(mod, "broadcast_safe", False)
        self.exact_tiles = getattr(mod, "exact_tiles", False)
        span = getattr(mod, "visible_span", None)
        if span is not None:
            self.visible_span = span

    def __call__(self, *args: Tensor) -> Tensor:
        args_ = list(args)
        args_[self.h_at] = args[self.h_at] + self.offset
        return self.mod(*args_)

    def tile_states(self, q_first, q_last, k_first, k_last):
        return _mods.tile_states(self.mod, q_first, q_last, k_first, k_last)


# ---------------------------------------------------------------------------------------------
# The sharded layer.


@contextlib.contextmanager
def _swapped(swaps: dict[tuple[nn.Module, str], Tensor | None]) -> Iterator[None]:
    saved = {(m, n): m._parameters[n] for (m, n) in swaps}
    try:
        for (module, name), value in swaps.items():
            module._parameters[name] = value  # type: ignore[assignment]
        yield
    finally:
        for (module, name), value in saved.items():
            module._parameters[name] = value


class _HeadParallelMixin:
    """The forward of a layer sharded by :func:`shard_heads` (see the module docstring)."""

    head_parallel: HeadParallel

    def get_extra_state(self) -> Tensor:
        """Saved as ``_extra_state`` in the state_dict: which shard it holds, ``[rank,
        world_size]`` (a tensor, so code that treats every value as one keeps working). A
        plain ``state_dict()`` of a sharded layer is this rank's shard under the full layer's
        keys; loading another rank's shard (the same shapes) would silently mix heads."""
        info = self.head_parallel
        return torch.tensor([info.rank, info.world_size])

    def set_extra_state(self, state: object) -> None:
        info = self.head_parallel
        held = state.tolist() if isinstance(state, Tensor) else state
        if held != [info.rank, info.world_size]:
            raise ValueError(
                invalid(
                    "state_dict",
                    f"this rank's own shard (rank {info.rank} of {info.world_size}): save a "
                    "sharded layer's state_dict() on every rank and load each on its own, or "
                    "use full_state_dict / checkpoint_state",
                    f"the shard of [rank, world_size] = {held!r}",
                )
            )

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
        cache=None,
        segment_ids: Tensor | None = None,
        mask_mod=None,
        score_mod=None,
    ) -> tuple[Tensor, Tensor | None]:
        """``MultiheadAttention.forward`` over this rank's heads, then the all-reduce: every
        rank passes the same full inputs and gets the full output (and weights)."""
        info = self.head_parallel
        call = super().forward  # type: ignore[misc]
        if info.world_size == 1:
            return call(
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
                cache=cache,
                segment_ids=segment_ids,
                mask_mod=mask_mod,
                score_mod=score_mod,
            )
        for name, x in (("query", query), ("key", key), ("value", value)):
            if isinstance(x, Tensor) and x.is_nested:
                raise ValueError(
                    invalid(
                        name,
                        "a dense tensor (a head-parallel layer takes no nested ones)",
                        describe(x),
                    )
                )
        attn_mask = _local_attn_mask(attn_mask, info)
        if mask_mod is not None and callable(mask_mod):
            mask_mod = _HeadOffset(mask_mod, info.head_start, 1)
        if score_mod is not None and callable(score_mod):
            score_mod = _HeadOffset(score_mod, info.head_start, 2)
        query, key, value, swaps = self._enter_heads(query, key, value)
        swaps[(self.out_proj, "bias")] = None  # added once, after the reduction
        with _swapped(swaps):
            out, weights = call(
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
                cache=cache,
                segment_ids=segment_ids,
                mask_mod=mask_mod,
                score_mod=score_mod,
            )
        averaged = weights is not None and average_attn_weights
        if averaged:
            weights = weights * (info.local_heads / info.num_heads)  # this rank's share of the mean
        if averaged and weights.dtype == out.dtype:  # one all-reduce for both
            flat = _SumOverRanks.apply(info, torch.cat([out.reshape(-1), weights.reshape(-1)]))
            split = out.numel()
            out, weights = flat[:split].view(out.shape), flat[split:].view(weights.shape)
        else:
            out = _SumOverRanks.apply(info, out)
            if averaged:
                weights = _SumOverRanks.apply(info, weights)
            elif weights is not None:  # per head: (N, H, L, S) or (H, L, S)
                weights = _GatherHeads.apply(info, weights, weights.dim() - 3)
        bias = self.out_proj.bias
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out, weights

    def _enter_heads(self, query, key, value):
        """The inputs and the shared parameters through :class:`_EnterHeads` when gradients
        are recorded: (query, key, value, parameter swaps)."""
        info = self.head_parallel
        if not torch.is_grad_enabled():
            return query, key, value, {}
        tensors: list[Tensor] = []
        packers: list[_Packer] = []
        for x in (query, key, value):
            if isinstance(x, Tensor) and x.requires_grad and not any(x is t for t in tensors):
                tensors.append(x)
                packers.append(_Packer(None, None, info))
        inputs = len(tensors)
        owners = []
        for key_name, (dim, segments) in info.layout.items():
            if not any(seg.mode in (_REPLICATE, _KV) for seg in segments):
                continue
            module, name = _owner(self, key_name)
            param = module._parameters.get(name)
            if param is not None and param.requires_grad:
                tensors.append(param)
                packers.append(_Packer(dim, segments, info))
                owners.append((module, name))
        if not tensors:
            return query, key, value, {}
        outs = _EnterHeads.apply(info, packers, *tensors)
        entered = list(zip(tensors[:inputs], outs, strict=False))
        mapped = [next((o for t, o in entered if x is t), x) for x in (query, key, value)]
        swaps = dict(zip(owners, outs[inputs:], strict=True))
        return (*mapped, swaps)

    def options_beyond_torch(self) -> dict[str, object]:
        """As the full layer's: GQA and head_dim judged on the full head counts."""
        info = self.head_parallel
        options = super().options_beyond_torch()  # type: ignore[misc]
        options.pop("num_kv_heads", None)
        options.pop("head_dim", None)
        if info.num_kv_heads != info.num_heads:
            options["num_kv_heads"] = info.num_kv_heads
        if info.num_heads * info.head_dim != self.embed_dim:  # type: ignore[attr-defined]
            options["head_dim"] = info.head_dim
        return options

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}{', ' if super().extra_repr() else ''}{self.head_parallel!r}"  # type: ignore[misc]


class HeadParallelMultiheadAttention(_HeadParallelMixin, MultiheadAttention):
    """The class of a :class:`multihead.MultiheadAttention` after :func:`shard_heads`."""


_CLASSES: dict[type, type] = {MultiheadAttention: HeadParallelMultiheadAttention}


def _sharded_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"HeadParallel{cls.__name__}", (_HeadParallelMixin, cls), {})
    return _CLASSES[cls]


def _local_attn_mask(attn_mask: object, info: HeadParallel) -> object:
    """A per-head ``(N * H, L, S)`` / ``(H, L, S)`` mask cut to this rank's heads; anything
    else as given (the layer checks it)."""
    if not isinstance(attn_mask, Tensor) or attn_mask.dim() != 3:
        return attn_mask
    rows, H = attn_mask.shape[0], info.num_heads
    if rows % H:
        return attn_mask
    per_head = attn_mask.reshape(rows // H, H, *attn_mask.shape[1:])
    local = per_head[:, info.head_start : info.head_start + info.local_heads]
    return local.reshape(-1, *attn_mask.shape[1:])


def _resolve_group(group: object) -> tuple[dist.ProcessGroup, object | None]:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            invalid(
                "group",
                "an initialized torch.distributed process group (init_process_group first)",
                "torch.distributed not initialized",
            )
        )
    if group is None:
        return dist.group.WORLD, None
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                invalid(
                    "group",
                    "a 1-D DeviceMesh (heads are split over one dimension), a ProcessGroup or None",
                    f"a {group.ndim}-D DeviceMesh of shape {tuple(group.shape)}",
                )
            )
        return group.get_group(), group
    if isinstance(group, dist.ProcessGroup):
        return group, None
    raise TypeError(
        invalid(
            "group", "a torch.distributed ProcessGroup, a 1-D DeviceMesh or None", describe(group)
        )
    )


def shard_heads(layer: MultiheadAttention, group: object = None) -> MultiheadAttention:
    """Splits ``layer``'s heads over the ranks of ``group``, in place, and returns it.

    Every rank must call this with the same full layer (same parameters: same seed, or the same
    checkpoint loaded before). Rank r keeps query heads ``[r H/P, (r + 1) H/P)``; see the
    module docstring for the layout, the forward's collectives and the rules of use.

    Args:
        layer: a :class:`multihead.MultiheadAttention` (or subclass) not yet sharded.
        group: a ``torch.distributed`` ProcessGroup, a 1-D ``DeviceMesh`` (its group), or None
            for the default group. A group of one rank leaves the layer as it is (but marked).

    Returns:
        ``layer``, now of class ``HeadParallel<its class>``: ``num_heads`` and ``num_kv_heads``
        are the local counts, ``layer.head_parallel`` (:class:`HeadParallel`) the full ones.

    Raises:
        TypeError: ``layer`` not a MultiheadAttention, ``group`` of another type.
        ValueError: ``num_heads`` not divisible by the group's size, ``num_kv_heads`` neither a
            multiple nor a divisor of it, a layer already sharded, a DeviceMesh that is not 1-D,
            torch.distributed not initialized, this rank not in ``group``.
    """
    if not isinstance(layer, MultiheadAttention):
        raise TypeError(invalid("layer", "a multihead.MultiheadAttention", describe(layer)))
    if isinstance(layer, _HeadParallelMixin):
        raise ValueError(
            invalid(
                "layer",
                "a layer not sharded yet",
                f"a layer already sharded: {layer.head_parallel!r}",
            )
        )
    if getattr(layer, "_context_parallel", None) is not None:
        raise ValueError(
            invalid(
                "layer",
                "a layer that is not context parallel (shard_heads and context_parallel do "
                "not combine)",
                "a layer made context parallel by context_parallel",
            )
        )
    group, mesh = _resolve_group(group)
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError(invalid("group", "a process group this rank belongs to", "another group"))
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    if H % P:
        raise ValueError(
            invalid(
                "layer",
                f"num_heads divisible by the group's {P} ranks",
                f"a layer with num_heads={H}",
            )
        )
    if (Hkv >= P and Hkv % P) or (Hkv < P and P % Hkv):
        raise ValueError(
            invalid(
                "layer",
                f"num_kv_heads a multiple of the group's {P} ranks (split) or a divisor of it "
                "(replicated), so that each rank's query heads read whole key/value heads",
                f"a layer with num_kv_heads={Hkv} (num_heads={H})",
            )
        )
    info = HeadParallel(group, rank, P, H, Hkv, D, mesh)
    layout = info.layout = _layout(layer, info)
    with torch.no_grad():
        for key, (dim, segments) in layout.items():
            module, name = _owner(layer, key)
            param = module._parameters[name]
            local = _take_local(param.detach(), dim, segments, info).clone()
            module._parameters[name] = nn.Parameter(local, requires_grad=param.requires_grad)
    layer.num_heads = info.local_heads
    layer.num_kv_heads = info.local_kv_heads
    layer.head_parallel = info
    layer.__class__ = _sharded_class(type(layer))
    return layer


def _info(layer: object, name: str = "layer") -> HeadParallel | None:
    if not isinstance(layer, MultiheadAttention):
        raise TypeError(invalid(name, "a multihead.MultiheadAttention", describe(layer)))
    return layer.head_parallel if isinstance(layer, _HeadParallelMixin) else None


# ---------------------------------------------------------------------------------------------
# Full state dicts and checkpoints.


def gather_full(layer: MultiheadAttention, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensors in the sharded layer's local layout, keyed by parameter name (its state_dict,
    its gradients, an optimizer's moments), gathered into the full layer's layout on every rank
    (collective: every rank passes the same keys). Keys that are no parameter of the layer
    come back as given; an unsharded layer's tensors come back cloned."""
    info = _info(layer)
    if info is None:
        return {k: v.detach().clone() for k, v in tensors.items()}
    layout = info.layout
    full = {}
    for key, value in tensors.items():
        if key not in layout:
            full[key] = value
            continue
        dim, segments = layout[key]
        blocks = _gather_segments(value, dim, segments, info)
        full[key] = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim)
    return full


def full_state_dict(layer: MultiheadAttention) -> dict[str, Tensor]:
    """The full (single-process) layer's state_dict, gathered on every rank (collective): the
    same keys, order and values as before :func:`shard_heads`. Without options beyond torch's
    it loads strictly into ``torch.nn.MultiheadAttention``."""
    local = {k: v for k, v in layer.state_dict().items() if k != "_extra_state"}
    return gather_full(layer, local)


def _dcp_mesh(info: HeadParallel, device_type: str):
    from torch.distributed.device_mesh import DeviceMesh

    if info.mesh is None or info.mesh.device_type != device_type:
        info.mesh = DeviceMesh.from_group(info.group, device_type)
    return info.mesh


def dcp_state_dict(layer: MultiheadAttention) -> dict[str, Tensor]:
    """The layer's parameters for ``torch.distributed.checkpoint``, in the full layer's layout:
    keys are the state_dict's, with the packed ``in_proj_weight`` / ``in_proj_bias`` split into
    ``<key>.q``, ``<key>.k``, ``<key>.v`` blocks (each of which shards as a whole over heads).

    A sharded layer gives ``DTensor`` views of its shards (``Shard(dim)`` on a 1-D mesh of its
    group; DCP reads and writes them in place and can reshard to another P), whole tensors for
    what every rank holds (saved once), and, for key/value heads replicated over several ranks,
    the gathered full block (collective). An unsharded layer gives plain views of its
    parameters under the same keys: a checkpoint saved with any P loads into it.
    Load with :func:`load_dcp_state_dict` after ``dcp.load`` (or use :func:`checkpoint_state`,
    which does both)."""
    info = _info(layer)
    params = dict(layer.named_parameters())
    out: dict[str, Tensor] = {}
    if info is None:
        for key, param in params.items():
            blocks = _packed_blocks(layer, key)
            if blocks is None:
                out[key] = param.detach()
            else:
                for name, block in zip("qkv", param.detach().split(blocks), strict=True):
                    out[f"{key}.{name}"] = block
        return out
    from torch.distributed.tensor import DTensor, Shard

    for key, (dim, segments) in info.layout.items():
        local = params[key].detach()
        mesh = _dcp_mesh(info, local.device.type)
        pieces = local.split(_local_sizes(segments, info), dim)
        for piece, seg in zip(pieces, segments, strict=True):
            name = f"{key}.{seg.name}" if seg.name and len(segments) > 1 else key
            full_shape = list(piece.shape)
            full_shape[dim] = seg.size
            if seg.mode == _SPLIT and info.world_size > 1:
                out[name] = DTensor.from_local(
                    piece,
                    mesh,
                    [Shard(dim)],
                    run_check=False,
                    shape=torch.Size(full_shape),
                    stride=torch.empty(full_shape, device="meta").stride(),
                )
            elif seg.mode == _KV:
                out[name] = _gather_segments(piece, dim, [seg], info)[0]
            else:
                out[name] = piece
    return out


def _packed_blocks(layer: MultiheadAttention, key: str) -> list[int] | None:
    # in_proj_bias is packed (q, k, v) even when the weights are separate (kdim / vdim).
    if key not in ("in_proj_weight", "in_proj_bias"):  # (a key names a parameter present)
        return None
    q = layer.num_heads * layer.head_dim
    kv = layer.num_kv_heads * layer.head_dim
    return [q, kv, kv]


def load_dcp_state_dict(layer: MultiheadAttention, state_dict: dict[str, Tensor]) -> None:
    """Copies a state dict of :func:`dcp_state_dict`'s form, filled by ``dcp.load``, into the
    layer's parameters (its DTensor views were filled in place already; the gathered key/value
    blocks and any copies are taken here)."""
    info = _info(layer)
    params = dict(layer.named_parameters())

    def local(value: Tensor) -> Tensor:
        return value.to_local() if hasattr(value, "to_local") else value

    with torch.no_grad():
        if info is None:
            for key, param in params.items():
                blocks = _packed_blocks(layer, key)
                if blocks is None:
                    param.copy_(local(state_dict[key]).clone())
                else:
                    param.copy_(torch.cat([local(state_dict[f"{key}.{n}"]) for n in "qkv"]))
            return
        for key, (dim, segments) in info.layout.items():
            pieces = []
            for seg in segments:
                name = f"{key}.{seg.name}" if seg.name and len(segments) > 1 else key
                value = local(state_dict[name])
                if seg.mode == _KV:
                    value = _take_local(value, dim, [seg], info)
                pieces.append(value)
            params[key].copy_(torch.cat(pieces, dim))  # a copy: pieces may view the parameter


class _CheckpointState:
    """DCP's ``Stateful`` for a layer (see :func:`checkpoint_state`)."""

    def __init__(self, layer: MultiheadAttention) -> None:
        _info(layer)
        self.layer = layer

    def state_dict(self) -> dict[str, Tensor]:
        return dcp_state_dict(self.layer)

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        load_dcp_state_dict(self.layer, state_dict)


def checkpoint_state(layer: MultiheadAttention) -> _CheckpointState:
    """The layer (sharded or not) as a ``Stateful`` for ``torch.distributed.checkpoint``:
    ``dcp.save({"attn": checkpoint_state(layer)}, checkpoint_id=path)`` on every rank, and
    ``dcp.load({"attn": checkpoint_state(layer)}, checkpoint_id=path)`` with any number of
    ranks, or none (an unsharded layer). Tested on CPU with gloo in torch 2.13."""
    return _CheckpointState(layer)
