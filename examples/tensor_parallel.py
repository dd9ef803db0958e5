"""Tensor parallel over heads: torchrun --nproc-per-node 2 examples/tensor_parallel.py

Every rank builds the same layer and input, shards the heads over the default group, and gets
the whole output, equal to one process's. Runs on CPU with gloo (NCCL on GPUs: change the
backend and the device)."""

import torch
import torch.distributed as dist

from multihead import MultiheadAttention
from multihead.parallel import full_state_dict, shard_heads

dist.init_process_group("gloo")
torch.manual_seed(0)  # the same layer and input on every rank
layer = MultiheadAttention(64, 8, batch_first=True, num_kv_heads=2, rope=True)
x = torch.randn(2, 16, 64)
reference, _ = layer(x, x, x, is_causal=True, need_weights=False)  # one process's answer

shard_heads(layer)  # each rank keeps 8 / P query heads (and its share of the 2 kv heads)
out, weights = layer(x, x, x, is_causal=True)  # the full output and weights on every rank
torch.testing.assert_close(out, reference)
out.sum().backward()  # every rank's gradients are exact for its own shard
full = full_state_dict(layer)  # the single-process state_dict, gathered on every rank
if dist.get_rank() == 0:
    print(
        f"{dist.get_world_size()} ranks: output equals one process; state_dict keys {list(full)}",
        flush=True,
    )
print(f"rank {dist.get_rank()} ok", flush=True)
del layer, out  # no autograd graph left holding the group's work
dist.barrier()  # every rank done before the group goes away
dist.destroy_process_group()
