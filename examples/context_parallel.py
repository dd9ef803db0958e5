"""Context parallel (ring attention): torchrun --nproc-per-node 2 examples/context_parallel.py

The sequence is cut into one shard per rank (zigzag: balanced causal work); each rank passes
only its shard and gets its shard of the output, equal to the same rows of one process's.
Runs on CPU with gloo (NCCL on GPUs: change the backend and the device)."""

import torch
import torch.distributed as dist

from multihead import MultiheadAttention
from multihead.parallel import context_parallel, gather_sequence, shard_sequence

dist.init_process_group("gloo")
torch.manual_seed(0)  # the same layer and full input on every rank
layer = MultiheadAttention(64, 8, batch_first=True, rope=True, window=32)
x = torch.randn(2, 100, 64)  # (N, L, E); L need not divide by the ranks
reference, _ = layer(x, x, x, is_causal=True, need_weights=False)

context_parallel(layer)  # balance="zigzag", comm="ring" (or "allgather")
shard = shard_sequence(x, dim=1)  # this rank's tokens, (N, L_rank, E)
out, _ = layer(shard, shard, shard, is_causal=True, need_weights=False)
torch.testing.assert_close(gather_sequence(out, dim=1), reference)  # the whole, in order
out.sum().backward()  # exact gradients; parameter gradients are this rank's part: sum them
if dist.get_rank() == 0:
    print(f"{dist.get_world_size()} ranks: gathered output equals one process", flush=True)
print(f"rank {dist.get_rank()} ok", flush=True)
del layer, out  # no autograd graph left holding the group's work
dist.barrier()  # every rank done before the group goes away
dist.destroy_process_group()
