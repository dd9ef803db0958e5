"""One description of every masking constraint of a call, which the kernels ask.

Shape legend: N batch, H query heads, L query length, S real keys, X extra key slots
(``add_bias_kv`` / ``add_zero_attn``, always visible, after the real keys), B and C a tile's
rows and columns.

:class:`AttentionMask` is built once per call, after the KV cache update, and holds:

- ``user``: torch's ``attn_mask`` / ``key_padding_mask`` (or the functional ``mask``) in the
  canonical additive form of :mod:`multihead.masks` (the only tensor that may require grad;
  never replaced by a flag when it does), causality included when the kernels take it as a
  dense mask (see :attr:`needs_tiles`);
- causality with its query offset (a KV cache's fill level: positions are absolute), the
  sliding window, segment ids: as the mask mods of :mod:`multihead.mods`, built there and
  nowhere else;
- the user's ``mask_mod`` / ``score_mod`` (flex's signatures) and the ``softcap`` score
  transform.

Kernels ask it for SDPA's arguments (:meth:`sdpa_args`), or, tile by tile, which tiles are
hidden entirely (skipped), shown entirely (no mask add) or partly shown (:meth:`row_block`),
the dense additive mask of one tile, whether rows can end up empty, and the scores after the
score transforms (:meth:`scores`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from . import mods
from .logits import soft_capped
from .masks import canonical_mask, effective_window, narrowed
from .mods import MaskMod, ScoreMod

# Rows and columns of one tile (FlexAttention's default block size on CPU is 128 too).
TILE = 128


@dataclass(frozen=True)
class RowBlock:
    """What a kernel needs for the query rows ``[start, stop)``.

    ``columns``: the real key columns not hidden entirely, as one ``slice`` when they are
    contiguous, else an int64 index; the X extra slots follow them. ``mask``: additive
    ``(N|1, H|1, B|1, C + X)`` over those columns, or None when every visible tile is shown
    entirely and no user mask applies. ``empty``: bool ``(…, B, 1)`` rows without any key
    (their mask rows are unmasked so that nothing is NaN; the kernel zeroes them), or None.
    """

    start: int
    stop: int
    columns: slice | Tensor
    mask: Tensor | None
    empty: Tensor | None
    visible: int  # real key columns kept (C)


@dataclass
class AttentionMask:
    """Every constraint of one attention call (see the module docstring). Treated as
    immutable once built (not frozen only because a frozen dataclass's ``__init__`` costs
    microseconds per field on every call)."""

    batch: int
    heads: int
    query_len: int
    key_len: int  # S, the real keys
    extra_keys: int = 0  # X
    user: Tensor | None = None  # additive, (N|1, H|1, L|1, S + X); with tiles maybe wider
    causal: bool = False
    query_offset: int = 0
    window: int | None = None
    segments: Tensor | None = None  # (N, L) ids, L == S
    mask_mod: MaskMod | None = None
    score_mod: ScoreMod | None = None
    softcap: float | None = None
    dtype: torch.dtype = torch.float32  # of the additive tile masks (the compute dtype)
    # True when the mask cannot hide a query's every key (set by the builder).
    rows_keep_a_key: bool = field(default=False)
    # The sink logits (H,) and the causal flag, set only when they are a call's only
    # constraints (no other mask, no query offset, the sink the only extra slot). `user` is
    # then None: the SDPA path attends over the S real keys and folds the sink in from the
    # log-sum-exp (multihead.functional._SinkFlashAttention); every other kernel takes
    # sink_slot_form(), the sink as a masked key slot.
    sinks: Tensor | None = None
    sinks_causal: bool = False
    # The last extra slot is an attention sink's (in `user`): a row whose other columns are all
    # masked counts as empty (multihead.masks.split_empty_rows).
    sink_slot: bool = False

    @classmethod
    def build(
        cls,
        *,
        batch: int,
        heads: int,
        query_len: int,
        key_len: int,
        extra_keys: int,
        dtype: torch.dtype,
        device: torch.device,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        query_offset: int | Tensor = 0,
        window: int | None = None,
        segment_ids: Tensor | None = None,
        mask_mod: MaskMod | None = None,
        score_mod: ScoreMod | None = None,
        softcap: float | None = None,
        sinks: Tensor | None = None,
    ) -> AttentionMask:
        """From a layer call's arguments (torch's mask forms, validated by the caller).
        ``sinks`` ``(H,)``: attention-sink logits for the last of the ``extra_keys`` slots
        (see :func:`multihead.masks.with_sink_logits`)."""
        mask_mod, is_causal = as_causal_flag(mask_mod, is_causal)
        plain = attn_mask is None and key_padding_mask is None and extra_keys == 0
        plain = plain and sinks is None
        if plain and window is None and segment_ids is None and mask_mod is score_mod is None:
            if not is_causal or (isinstance(query_offset, int) and query_offset == 0):
                # No mask and no offset: what canonical_mask would return, without its work
                # (a per-call cost of small calls).
                return cls(
                    batch,
                    heads,
                    query_len,
                    key_len,
                    0,
                    None,
                    is_causal,
                    0,
                    softcap=softcap,
                    dtype=dtype,
                    rows_keep_a_key=True,
                )
        window = effective_window(window, query_len, key_len)
        tiled = (
            window is not None
            or segment_ids is not None
            or mask_mod is not None
            or score_mod is not None
        )
        if (
            sinks is not None
            and attn_mask is None
            and key_padding_mask is None
            and extra_keys == 1
            and not tiled
            and (not is_causal or (isinstance(query_offset, int) and query_offset == 0))
        ):
            # Sinks and causality alone: no mask is built here. The SDPA path folds the sink in
            # from the real keys' log-sum-exp; any other path asks sink_slot_form() for it.
            return cls(
                batch,
                heads,
                query_len,
                key_len,
                1,
                None,
                False,
                0,
                softcap=softcap,
                dtype=dtype,
                rows_keep_a_key=True,
                sinks=sinks,
                sinks_causal=bool(is_causal),
            )
        # Tiled: positions go to the mods, torch's masks alone become `user`, narrowed per
        # block once the block's constraints are added. Otherwise: one mask, SDPA's form.
        user, causal_flag = canonical_mask(
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal and not tiled,
            batch_size=batch,
            num_heads=heads,
            query_len=query_len,
            key_len=key_len,
            extra_keys=extra_keys,
            dtype=dtype,
            device=device,
            query_offset=0 if tiled else query_offset,
            narrow=not tiled,
            sinks=sinks,
        )
        # Tiles are chosen on the host, from the query offset; without tiles it is in `user`.
        offset = int(query_offset) if tiled else 0
        is_causal = is_causal if tiled else causal_flag
        # Causality, windows and segments never hide a query's own position (nor key 0 under
        # causality); only torch's masks, a user mask_mod, or a window with L != S can.
        keeps = attn_mask is None and key_padding_mask is None and mask_mod is None
        keeps = keeps and (window is None or query_len == key_len)
        return cls(
            batch=batch,
            heads=heads,
            query_len=query_len,
            key_len=key_len,
            extra_keys=extra_keys,
            user=None if user is None else _four_dims(user),
            causal=is_causal,
            query_offset=offset,
            window=window,
            segments=segment_ids,
            mask_mod=mask_mod,
            score_mod=score_mod,
            softcap=softcap,
            dtype=dtype,
            # A sink attends to nothing: only other extra slots keep a row's key.
            rows_keep_a_key=keeps or extra_keys > int(sinks is not None),
            sink_slot=sinks is not None,
        )

    # -- what the call needs ------------------------------------------------------------

    def sink_slot_form(self) -> AttentionMask:
        """A call whose only constraints are sinks and causality (:attr:`sinks` set, no
        ``user`` built yet) as every kernel takes it: the sink as the last key slot, its logit
        in the additive mask, causality folded in (what :meth:`build` makes for any other
        call with sinks). Any other mask is returned as it is."""
        if self.sinks is None or self.user is not None:
            return self
        user, _ = canonical_mask(
            key_padding_mask=None,
            attn_mask=None,
            is_causal=self.sinks_causal,
            batch_size=self.batch,
            num_heads=self.heads,
            query_len=self.query_len,
            key_len=self.key_len,
            extra_keys=self.extra_keys,
            dtype=self.dtype,
            device=self.sinks.device,
            sinks=self.sinks,
        )
        return dataclasses.replace(
            self, user=_four_dims(user), sinks=None, sinks_causal=False, sink_slot=True
        )

    @property
    def needs_tiles(self) -> bool:
        """Whether a constraint is evaluated per tile (window, segments, a mod): then only
        the tiled kernel runs the call; otherwise :meth:`sdpa_args` describes it whole."""
        return (
            self.window is not None
            or self.segments is not None
            or self.mask_mod is not None
            or self.score_mod is not None
        )

    @property
    def may_empty_rows(self) -> bool:
        """Whether some query row may have no visible key."""
        return not self.rows_keep_a_key

    def sdpa_args(self) -> tuple[Tensor | None, bool]:
        """``(attn_mask, is_causal)`` for ``F.scaled_dot_product_attention``: the additive
        mask (causality with an offset included) and the causal flag, which comes alone (top
        left, no offset). Only for calls without per-tile constraints."""
        if self.needs_tiles:
            raise RuntimeError("this call's constraints are evaluated per tile, not by SDPA")
        return self.user, self.causal

    @cached_property
    def constraint(self) -> MaskMod | None:
        """Every mask_mod in force (causal, window, segments, the user's), combined with
        AND; None when nothing hides any position."""
        parts: list[MaskMod] = []
        if self.window is not None:
            parts.append(mods.sliding_window(self.window, causal=self.causal))
        elif self.causal:
            parts.append(mods.causal)
        if self.segments is not None:
            parts.append(mods.document(self.segments))
        if self.mask_mod is not None:
            parts.append(self.mask_mod)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else mods.and_masks(*parts)

    # -- tiles ----------------------------------------------------------------------------

    def row_blocks(
        self, device: torch.device, rows: int = TILE, cols: int = TILE, *, skip: bool = True
    ):
        """Yields a :class:`RowBlock` for each block of ``rows`` query rows; blocks whose
        real keys are all hidden still come (with no real column), for their extra slots.

        ``skip=False`` (under torch.func transforms, where a mod's result may be batched and
        cannot steer Python) evaluates every tile and skips none: the same numbers."""
        L, S, offset = self.query_len, self.key_len, self.query_offset
        constraint = self.constraint
        starts = list(range(0, L, rows))
        span_of = getattr(constraint, "visible_span", None) if skip else None
        if span_of is not None:
            # One band of keys per block (causal, window): its exact bounds in Python ints,
            # and no tile analysis at all (the per-call cost of a decode step).
            for start in starts:
                stop = min(start + rows, L)
                (low, high), full = span_of(start + offset, stop - 1 + offset, S)
                spans = [(low, high)] if low < high else []
                yield self._row_block(start, stop, spans, not full, device, skip)
            return
        k_starts = list(range(0, S, cols))
        if constraint is not None and starts and k_starts and skip:
            q_first = torch.tensor(starts).view(-1, 1) + offset
            q_last = torch.tensor([min(s + rows, L) - 1 for s in starts]).view(-1, 1) + offset
            k_first = torch.tensor(k_starts).view(1, -1)
            k_last = torch.tensor([min(s + cols, S) - 1 for s in k_starts]).view(1, -1)
            empty, full = mods.tile_states(constraint, q_first, q_last, k_first, k_last)
            shape = (len(starts), len(k_starts))
            empty = empty.expand(shape).tolist()
            full = full.expand(shape).tolist()
        else:
            empty = [[False] * len(k_starts)] * len(starts)
            full = [[constraint is None] * len(k_starts)] * len(starts)
        for i, start in enumerate(starts):
            stop = min(start + rows, L)
            tiles = [j for j in range(len(k_starts)) if not empty[i][j]]
            partial = constraint is not None and not all(full[i][j] for j in tiles)
            spans = [(k_starts[j], min(k_starts[j] + cols, S)) for j in tiles]
            yield self._row_block(start, stop, spans, partial, device, skip)

    def _row_block(
        self,
        start: int,
        stop: int,
        spans: list[tuple[int, int]],
        partial: bool,
        device: torch.device,
        skip: bool,
    ) -> RowBlock:
        S, X = self.key_len, self.extra_keys
        allowed = None
        if partial and spans:
            allowed = self.allowed(start, stop, _column_index(spans, device), device)
            if skip and not getattr(self.constraint, "exact_tiles", False):
                # Tiles that the evaluation shows hidden for every row are dropped too.
                seen = allowed.reshape(-1, allowed.shape[-1]).any(0)  # (C,)
                keep, kept_spans, at = [], [], 0
                for a, z in spans:
                    if bool(seen[at : at + z - a].any()):
                        keep.append(torch.arange(at, at + z - a, device=device))
                        kept_spans.append((a, z))
                    at += z - a
                if len(kept_spans) < len(spans):
                    allowed = allowed[..., torch.cat(keep)] if keep else allowed[..., :0]
                    spans = kept_spans
        columns = _merged(spans, device)
        visible = sum(z - a for a, z in spans)
        mask = empty = None
        if allowed is not None:
            zero = torch.zeros((), dtype=self.dtype, device=device)
            mask = torch.where(allowed, zero, zero - float("inf"))  # (N|1, H|1, B, C)
            if X:
                mask = F.pad(mask, (0, X))
            elif self.user is None and self.may_empty_rows:  # found on the bool, cheaper
                empty = ~allowed.any(dim=-1, keepdim=True)  # (…, B, 1)
        if self.user is not None:
            user = self.user if self.user.shape[-2] == 1 else self.user[..., start:stop, :]
            user = _take_columns(user, columns, S, X)
            # Summed in the user mask's (wider) dtype, then narrowed with every constraint
            # in: a row's largest finite value is then on a key it may attend.
            mask = user if mask is None else mask.to(user.dtype) + user
            mask = narrowed(mask, self.dtype)
            if self.may_empty_rows:
                empty = (mask == float("-inf")).all(dim=-1, keepdim=True)  # (…, B, 1)
        if empty is not None:
            if skip and not bool(empty.any()):  # (not under torch.func: no data-dependent if)
                empty = None
            else:
                mask = mask.masked_fill(empty, 0.0)
        if visible == 0 and X == 0:  # every key hidden: an empty block
            empty = torch.ones(1, 1, stop - start, 1, dtype=torch.bool, device=device)
        return RowBlock(start, stop, columns, mask, empty, visible)

    def allowed(self, start: int, stop: int, kv_idx: Tensor, device: torch.device) -> Tensor:
        """The combined mask_mod on query rows ``[start, stop)`` and key positions ``kv_idx``
        ``(C,)``: bool ``(N|1, H|1, B, C)``, True = attend."""
        grid = (*self._indices(start, stop, device), kv_idx)
        mod = self.constraint
        if not getattr(mod, "broadcast_safe", False) and all(x.numel() for x in grid):
            _check_result("mask_mod", _called("mask_mod", mods.probe, mod, None, *grid), False)
        result = _called("mask_mod", mods.on_grid, mod, *grid)
        _check_result("mask_mod", result, floating=False)
        shape = (self.batch, self.heads, stop - start, kv_idx.numel())
        _check_broadcast("mask_mod", result, shape)
        if result.dim() < 4:
            result = result.view((1,) * (4 - result.dim()) + tuple(result.shape))
        return result.expand(result.shape[0], result.shape[1], *shape[2:])  # (N|1, H|1, B, C)

    def scores(self, scores: Tensor, start: int, kv_idx: Tensor | None) -> Tensor:
        """``scores`` ``(N, H, B, C + X)`` after the soft-cap and the user's score_mod (on the
        C real columns, at key positions ``kv_idx`` ``(C,)``; the extra slots have no
        position and keep their logits)."""
        if self.softcap is not None:
            scores = soft_capped(scores, self.softcap)
        mod = self.score_mod
        if mod is None or kv_idx is None or kv_idx.numel() == 0:
            return scores
        real = kv_idx.numel()
        grid = (*self._indices(start, start + scores.shape[-2], scores.device), kv_idx)
        if not getattr(mod, "broadcast_safe", False) and all(x.numel() for x in grid):
            _check_result("score_mod", _called("score_mod", mods.probe, mod, scores, *grid), True)
        modded = _called("score_mod", mods.on_grid, mod, *grid, score=scores[..., :real])
        _check_result("score_mod", modded, floating=True)
        target = (*scores.shape[:-1], real)
        _check_broadcast("score_mod", modded, target)
        modded = modded.to(scores.dtype).expand(target)
        return modded if real == scores.shape[-1] else torch.cat([modded, scores[..., real:]], -1)

    def _indices(self, start: int, stop: int, device: torch.device) -> tuple[Tensor, ...]:
        """b ``(N,)``, h ``(H,)`` and the absolute query positions ``(B,)``, int64."""
        offset = self.query_offset
        return (
            torch.arange(self.batch, device=device),
            torch.arange(self.heads, device=device),
            torch.arange(start + offset, stop + offset, device=device),
        )


def _called(name: str, evaluate, *args, **kwargs) -> object:
    """``evaluate(*args)``, where a torch error raised inside the user's mod (a shape that
    does not fit, an index out of range) becomes a ValueError that names the argument and
    says how it was called; the original error is its cause."""
    try:
        return evaluate(*args, **kwargs)
    except (RuntimeError, IndexError) as error:
        raise ValueError(
            f"{name}: calling it raised {type(error).__name__}: {error} (a mod is called as "
            "FlexAttention calls it, on 0-dim int64 tensors b, h, q_idx, kv_idx, through "
            "torch.vmap; it must return one value per call)"
        ) from error


def _check_result(name: str, result: object, floating: bool) -> None:
    """A mod's result is a tensor: floating for a score_mod, bool for a mask_mod."""
    if isinstance(result, Tensor) and (
        result.is_floating_point() if floating else result.dtype == torch.bool
    ):
        return
    expected = "a floating tensor" if floating else "a bool tensor (True = attend)"
    got = f"dtype {result.dtype}" if isinstance(result, Tensor) else type(result).__name__
    raise TypeError(f"{name}: expected a function returning {expected}, got {got}")


def as_causal_flag(mask_mod: MaskMod | None, is_causal: bool) -> tuple[MaskMod | None, bool]:
    """``mask_mod=multihead.mods.causal`` is ``is_causal=True``: the same rule (``q_idx >=
    kv_idx`` on absolute positions, as the causal flag with a cache offset), so that the
    kernels that skip causal blocks themselves (SDPA's ``is_causal``) run it. Only our own
    ``causal`` object qualifies; any other mod is evaluated."""
    if mask_mod is mods.causal:
        return None, True
    return mask_mod, is_causal


def _check_broadcast(name: str, result: Tensor, shape: tuple[int, ...]) -> None:
    try:
        ok = torch.broadcast_shapes(result.shape, shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name}: expected a result that broadcasts to {tuple(shape)} "
            "(b, h, q_idx, kv_idx come as broadcast index tensors), "
            f"got shape {tuple(result.shape)}"
        )


def _column_index(spans: list[tuple[int, int]], device: torch.device) -> Tensor:
    return torch.cat([torch.arange(a, z, device=device) for a, z in spans])


def _merged(spans: list[tuple[int, int]], device: torch.device) -> slice | Tensor:
    """Columns as one slice when the spans touch, else an index."""
    if not spans:
        return slice(0, 0)
    if all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)):
        return slice(spans[0][0], spans[-1][1])
    return _column_index(spans, device)


def take_columns(x: Tensor, columns: slice | Tensor, key_len: int, extra: int) -> Tensor:
    """``x[..., cols, :]`` along dim -2 for keys / values ``(N, Hkv, S + X, D)``: the chosen
    real columns, then the X extra slots (a view when they are contiguous)."""
    if isinstance(columns, slice):
        if columns.stop == key_len:
            return x[..., columns.start : key_len + extra, :]
        if not extra:
            return x[..., columns, :]
        return torch.cat([x[..., columns, :], x[..., key_len:, :]], dim=-2)
    chosen = x.index_select(-2, columns)
    return torch.cat([chosen, x[..., key_len:, :]], dim=-2) if extra else chosen


def _take_columns(mask: Tensor, columns: slice | Tensor, key_len: int, extra: int) -> Tensor:
    """The same columns of an additive mask ``(…, S + X)``; a mask broadcast over keys
    (last dim 1) is the same for every column, and is kept whole."""
    if mask.shape[-1] == 1 and key_len + extra != 1:
        return mask
    return take_columns(mask.unsqueeze(-1), columns, key_len, extra).squeeze(-1)


def _four_dims(mask: Tensor) -> Tensor:
    return mask if mask.dim() == 4 else mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))


def column_positions(columns: slice | Tensor, device: torch.device) -> Tensor:
    """The real key positions ``(C,)`` that ``columns`` selects."""
    if isinstance(columns, slice):
        return torch.arange(columns.start, columns.stop, device=device)
    return columns
