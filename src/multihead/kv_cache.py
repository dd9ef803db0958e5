"""A preallocated key/value cache for incremental decoding.

Shape legend: N batch, Hkv key/value heads, M max_len, T new tokens, D head dim.

The buffers keep one static shape ``(N, Hkv, M, D)``; the layer always attends over all M slots
with a causal mask from the fill level, so the shapes that torch.compile sees never change from
token to token. Slots past the fill level are masked by causality (a query at position p sees
keys at positions <= p).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of the tokens seen so far, ``(N, Hkv, M, D)`` each, and the fill level.

    Made by :meth:`multihead.MultiheadAttention.new_cache`; pass it as ``cache=`` to forward.
    The buffers are not part of the state_dict. A cache belongs to one layer: the layer that
    made it, or the first one it is passed to (a cache built directly, or copied / unpickled,
    has no owner until then); another layer refuses it.
    """

    rolling = False  # see RollingKVCache

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(
                f"Invalid argument `dtype`: expected a floating-point dtype for the keys and "
                f"values. Received: dtype={dtype}."
            )
        self._owner: weakref.ref | None = None  # the layer, held weakly; see owned_by
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # The fill level: a tensor, not a Python int, so that torch.compile traces one graph
        # for every step instead of specialising on (and recompiling for) each position.
        position = torch.zeros((), dtype=torch.long, device=device)
        self.register_buffer("position", position, persistent=False)

    @property
    def length(self) -> int:
        """Tokens seen so far: the next token's position (for a full cache, the slots
        filled; a rolling cache goes on counting past its slots)."""
        return int(self.position)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        """Key slots in the buffers (for a rolling cache: ``sink_tokens`` + its ring)."""
        return self.k.shape[2]

    def owned_by(self, layer: nn.Module) -> bool:
        """Whether ``layer`` may use this cache: it is the owner, or the cache has none yet."""
        owner = None if self._owner is None else self._owner()
        return owner is None or owner is layer

    def claim(self, layer: nn.Module) -> None:
        """Makes ``layer`` the owner when the cache has none (the caller has checked
        :meth:`owned_by`); a no-op on every later step."""
        if self._owner is None or self._owner() is None:
            self._owner = weakref.ref(layer)

    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Writes ``(N, Hkv, T, D)`` new keys and values at the fill level and advances it.

        Returns the whole buffers ``(N, Hkv, M, D)``. The caller checks the room, device and
        shapes first; values are stored in the cache's dtype (under autocast the new keys may
        come in a lower precision).
        """
        self._writable()
        slots = self.position + torch.arange(k_new.shape[2], device=self.position.device)
        if k_new.dtype != self.k.dtype:  # under autocast: stored in the cache's precision
            k_new, v_new = k_new.to(self.k.dtype), v_new.to(self.v.dtype)
        self.k.index_copy_(2, slots, k_new)
        self.v.index_copy_(2, slots, v_new)
        self.position += k_new.shape[2]
        return self.k, self.v

    def _writable(self) -> None:
        """Made under inference_mode, used outside it: inference tensors cannot be written
        there, so the buffers become ordinary tensors (one copy, once)."""
        if (
            not torch.compiler.is_compiling()
            and self.k.is_inference()
            and not torch.is_inference_mode_enabled()
        ):
            for name, buffer in self._buffers.items():
                self._buffers[name] = buffer.clone()

    def undo_point(self, tokens: int) -> tuple:
        """What :meth:`undo` needs to take back the next :meth:`update` of ``tokens`` tokens
        and a :meth:`claim`: the buffers, the fill level, the slots about to be written and
        the owner (a failed call then leaves the cache bitwise as it was)."""
        start = int(self.position)
        stop = min(start + tokens, self.max_len)
        return (
            self.k,
            self.v,
            self.position,
            start,
            self.k[:, :, start:stop].clone(),
            self.v[:, :, start:stop].clone(),
            self._owner,
        )

    def undo(self, point: tuple) -> None:
        """Restores the cache to :meth:`undo_point`'s state."""
        k, v, position, start, old_k, old_v, owner = point
        if self.k is k:  # written in place (not into a copy of inference-mode buffers)
            k[:, :, start : start + old_k.shape[2]] = old_k
            v[:, :, start : start + old_v.shape[2]] = old_v
            position.fill_(start)
        self.k, self.v, self.position, self._owner = k, v, position, owner

    def __getstate__(self) -> dict:
        # A weak reference cannot be pickled; a copy starts without an owner.
        state = self.__dict__.copy()
        state["_owner"] = None
        return state

    def reset(self) -> None:
        """Empties the cache (the buffers keep their memory)."""
        self.position.zero_()

    def extra_repr(self) -> str:
        n, hkv, m, d = self.k.shape
        return (
            f"batch_size={n}, num_kv_heads={hkv}, max_len={m}, head_dim={d}, length={self.length}"
        )


class RollingKVCache(KVCache):
    """A KV cache for a sliding-window layer that keeps only the keys the window can still
    see: O(window) memory, and decoding goes on past any length.

    Made by ``layer.new_cache(batch_size, max_len, rolling=True, sink_tokens=s)``. Its
    buffers ``(N, Hkv, s + max_len, D)`` hold the first ``s`` tokens for good (StreamingLLM's
    attention-sink tokens; Xiao et al. 2023) and the ``max_len`` most recent others in a ring;
    ``slot_positions`` ``(s + max_len,)`` gives each slot's absolute position (-1 = empty).

    A call with T new tokens attends over the slots and the T new keys together, ``(N, Hkv,
    s + max_len + T, D)``, under the mask of absolute positions: query i sees key j when
    ``j <= i`` and (``i - window < j`` or ``j < s``). That is exactly full-cache decoding with
    the layer's window mask (and, with sink tokens, the StreamingLLM rule); RoPE keeps absolute
    positions (StreamingLLM re-numbers positions inside the cache instead; we do not). Only
    after the call succeeds are the new tokens written: the last ``max_len`` non-sink ones
    into the ring (with ``max_len >= window``, every key a later query can see is kept). Shapes
    depend on T only, never on how many tokens came before, so ``torch.compile`` traces one
    graph per T. Returned weights have one column per slot, then one per new token.
    """

    rolling = True

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        window: int,
        sink_tokens: int = 0,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            batch_size, num_kv_heads, sink_tokens + max_len, head_dim, dtype=dtype, device=device
        )
        self.window, self.sink_tokens, self.recent = window, sink_tokens, max_len
        slots = torch.full((sink_tokens + max_len,), -1, dtype=torch.long, device=device)
        self.register_buffer("slot_positions", slots, persistent=False)

    def attended(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The keys and values a call attends over, slots then the T new ones, ``(N, Hkv,
        C + T, D)`` in the cache's dtype, and the bool mask ``(T, C + T)`` (True = masked) of
        the rule above. Changes nothing."""
        steps = torch.arange(k_new.shape[2], device=self.position.device)
        query_positions = self.position + steps  # (T,)
        key_positions = torch.cat([self.slot_positions, query_positions])  # (C + T,)
        q_pos, k_pos = query_positions[:, None], key_positions[None, :]
        seen = (
            (k_pos >= 0)
            & (k_pos <= q_pos)
            & ((q_pos - k_pos < self.window) | (k_pos < self.sink_tokens))
        )
        keys = torch.cat([self.k, k_new.to(self.k.dtype)], dim=2)
        values = torch.cat([self.v, v_new.to(self.v.dtype)], dim=2)
        return keys, values, ~seen

    def commit(self, k_new: Tensor, v_new: Tensor) -> None:
        """Writes the T new tokens after a successful call: positions below ``sink_tokens`` to
        their own slot, the others to ring slot ``s + (p - s) mod max_len`` (a later token of
        the call wins a slot over an earlier one), and advances the fill level."""
        tokens, sinks = k_new.shape[2], self.sink_tokens
        if tokens == 0:  # nothing to write (and nothing to index the new tokens with)
            return
        self._writable()
        device = self.position.device
        positions = self.position + torch.arange(tokens, device=device)  # (T,)
        ring = sinks + torch.remainder(positions - sinks, self.recent)
        slots = torch.where(positions < sinks, positions, ring)  # (T,)
        # For each slot, the last new token written to it (-1: none): static shapes, and a
        # deterministic choice where two new tokens share a slot (index_copy_ is not).
        writer = torch.full_like(self.slot_positions, -1).scatter_reduce(
            0, slots, torch.arange(tokens, device=device), reduce="amax"
        )
        written = writer >= 0  # (C,)
        source = writer.clamp(min=0)
        self.k.copy_(torch.where(written[:, None], k_new.to(self.k.dtype)[:, :, source], self.k))
        self.v.copy_(torch.where(written[:, None], v_new.to(self.v.dtype)[:, :, source], self.v))
        self.slot_positions.copy_(torch.where(written, positions[source], self.slot_positions))
        self.position += tokens

    def reset(self) -> None:
        """Empties the cache (the buffers keep their memory)."""
        self.position.zero_()
        self.slot_positions.fill_(-1)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, window={self.window}, sink_tokens={self.sink_tokens}, "
            "rolling=True"
        )
