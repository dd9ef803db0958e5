"""Per-rank peak memory and bytes moved of multihead.parallel, against one process.

Run as ``python -m multihead.benchmark.parallel [--lengths 1024 2048 4096] [--worlds 2 4]``.
For each sequence length L it runs one training call (forward and backward, causal,
``need_weights=False``, float32, E 256, H 4, N 1) of:

- one process: the plain layer on the whole sequence;
- ``context_parallel`` (ring, zigzag) on P gloo processes on 127.0.0.1, each on its shard;
- ``shard_heads`` on P processes, each with the whole sequence and H / P heads;

and prints, per rank, the peak resident memory the call added (``VmHWM`` after
``clear_refs``, as :mod:`multihead.benchmark.memory`), the bytes of its parameters, and the
ring's key/value bytes counted against :func:`multihead.parallel.ring.ring_bytes`. On this
CPU machine the P processes share the same cores, so times mean nothing; memory and bytes do.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .memory import peak_of

EMBED, HEADS = 256, 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _layer():
    from multihead import MultiheadAttention

    torch.manual_seed(0)
    return MultiheadAttention(EMBED, HEADS, batch_first=True)


def _param_bytes(layer) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def _run(rank: int, world: int, port: int, mode: str, length: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    from multihead.parallel import context_parallel, shard_heads, shard_sequence
    from multihead.parallel.ring import count_bytes, ring_bytes

    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    layer = _layer()
    x = torch.randn(1, length, EMBED, generator=torch.Generator().manual_seed(1))
    counted = expected = None
    if mode == "context":
        context_parallel(layer)
        x = shard_sequence(x, dim=1).contiguous()
    elif mode == "heads":
        shard_heads(layer)
    x.requires_grad_()

    def call() -> None:
        out, _ = layer(x, x, x, is_causal=True, need_weights=False)
        out.sum().backward()

    if mode == "context":
        with count_bytes() as counter:
            result = peak_of(call, torch.device("cpu"))
        counted = counter.forward_sent + counter.backward_sent
        sizes = dict(batch=1, kv_heads=HEADS, head_dim=EMBED // HEADS, seq_len=length, world=world)
        expected = ring_bytes(**sizes, dtype=torch.float32) + ring_bytes(
            **sizes, dtype=torch.float32, backward=True
        )
    else:
        result = peak_of(call, torch.device("cpu"))
    result.update(
        mode=mode,
        world=world,
        rank=rank,
        length=length,
        param_bytes=_param_bytes(layer),
        kv_bytes_sent=counted,
        kv_bytes_formula=expected,
    )
    with open(os.path.join(out_dir, f"{mode}-{world}-{length}-{rank}.json"), "w") as file:
        json.dump(result, file)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure(mode: str, world: int, length: int) -> list[dict]:
    """Per-rank results of one configuration, each measured in fresh processes."""
    with tempfile.TemporaryDirectory() as out_dir:
        port = _free_port()
        mp.start_processes(
            _run, args=(world, port, mode, length, out_dir), nprocs=world, start_method="spawn"
        )
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"{mode}-{world}-{length}-{rank}.json")) as file:
                results.append(json.load(file))
    return results


def _row(mode: str, world: int, length: int, peak: float, base: float, params: int, check: str):
    return (
        f"{mode:<8} {world}  {length:<6} {peak:>12.1f}  {peak / base:>9.2f}  "
        f"{params / 1024:>14.0f}  {check}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multihead.benchmark.parallel", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args(argv)
    print("mode     P  L       peak MiB/rank  vs 1 proc  param KiB/rank  KV bytes sent = formula")
    for length in args.lengths:
        single = measure("single", 1, length)[0]
        base = single["peak_mib"]
        print(_row("single", 1, length, base, base, single["param_bytes"], ""))
        for world in args.worlds:
            for mode in ("context", "heads"):
                ranks = measure(mode, world, length)
                peak = max(r["peak_mib"] for r in ranks)
                params = max(r["param_bytes"] for r in ranks)
                check = ""
                if ranks[0]["kv_bytes_sent"] is not None:
                    same = all(r["kv_bytes_sent"] == r["kv_bytes_formula"] for r in ranks)
                    check = f"{ranks[0]['kv_bytes_sent']} = {ranks[0]['kv_bytes_formula']}"
                    check += " (every rank)" if same else " MISMATCH"
                print(_row(mode, world, length, peak, base, params, check))
    return 0


if __name__ == "__main__":
    sys.exit(main())
