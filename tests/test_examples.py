"""The README's torchrun examples (examples/*.py) run as written, on 2 and 4 gloo processes
on 127.0.0.1, and check themselves against one process (each asserts it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("example", ["tensor_parallel", "context_parallel"])
def test_torchrun_example(example, world):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(world),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(ROOT / "examples" / f"{example}.py"),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    # Every rank passed its own check against one process (each prints after asserting).
    assert f"{world} ranks:" in done.stdout and "equals one process" in done.stdout, done.stderr
    for rank in range(world):
        assert f"rank {rank} ok" in done.stdout, done.stderr[-3000:]
    if done.returncode != 0:
        # Known, after every check has passed: gloo's teardown at process exit can abort a
        # rank ("terminate called without an active exception"; about 1 run in 20 here with
        # torch 2.13). Anything else fails the test.
        assert "terminate called without an active exception" in done.stderr, done.stderr[-3000:]
