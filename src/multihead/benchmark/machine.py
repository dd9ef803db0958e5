"""What machine a result came from: CPU, threads, versions, date and its fp32 GEMM throughput."""

from __future__ import annotations

import datetime
import os
import platform
import time

import torch


def cpu_model() -> str:
    """The "model name" line of /proc/cpuinfo, or what ``platform`` knows elsewhere."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gemm_gflops(device: torch.device, size: int = 2048, runs: int = 7) -> float:
    """Best fp32 ``torch.mm`` throughput of ``size x size`` matrices over ``runs``, in GFLOP/s.

    The best run, not the median: it is the ceiling that the attention cases are compared to.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up: thread pool start, kernel selection
    sync()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def machine_info(device: torch.device, gemm: float) -> dict[str, object]:
    """The facts recorded with every result; ``gemm`` is :func:`gemm_gflops`'s number."""
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "gemm_gflops": round(gemm, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return info
