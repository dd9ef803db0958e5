"""multihead.parallel: attention across devices on torch.distributed.

Tensor parallel over heads (:func:`shard_heads`, in :mod:`multihead.parallel.heads`) and context
parallel over the sequence (:func:`context_parallel`, ring attention, in
:mod:`multihead.parallel.ring`), exact against one process and tested on CPU with gloo.
"""

from .heads import checkpoint_state, full_state_dict, gather_full, shard_heads
from .ring import context_parallel, gather_sequence, shard_sequence

__all__ = [
    "checkpoint_state",
    "context_parallel",
    "full_state_dict",
    "gather_full",
    "gather_sequence",
    "shard_heads",
    "shard_sequence",
]
