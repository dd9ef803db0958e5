"""Peak memory of one call, measured in a fresh interpreter per (case, implementation).

Run as ``python -m multihead.benchmark.memory MODE N L E H IMPL [--device cpu|cuda]``; it
prints one JSON object with ``peak_mib``, the memory the call added at its peak.

On CPU that is the peak resident set during the call minus the resident set just before it.
Two details keep it honest:

- The peak is ``VmHWM`` of ``/proc/self/status``, reset after setup by writing 5 to
  ``/proc/self/clear_refs``. ``getrusage(RUSAGE_SELF).ru_maxrss`` is no good here: the kernel
  carries the peak of the process that spawned this one into it across ``exec`` (Python's
  subprocess uses vfork), so a child of the benchmark reports the benchmark's own peak; and it
  cannot be reset, so setup transients (imports, weight init) would count too.
- Nothing runs before the measured call (no warm-up): a warm-up would leave the allocator's
  cached blocks in the "before" figure.

On CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .cases import MODES, Case
from .workload import build_input, build_layers, implementations, make_calls

MIB = 2**20
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Resets the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open(_CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _peak_bytes() -> int:
    try:
        with open(_STATUS) as status:
            match = re.search(r"^VmHWM:\s+(\d+) kB", status.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def measure_here(case: Case, impl: str, device: torch.device) -> dict[str, float | str]:
    """Builds ``case`` for ``impl`` in this process, runs one call and returns its peak.

    Call it in a fresh process (see :func:`measure`): whatever ran before shapes the result.

    Returns:
        ``{"peak_mib": ..., "before_mib": ..., "method": ...}``; ``peak_mib`` is what the call
        added at its peak, ``before_mib`` what the process held before it.
    """
    ours, theirs = build_layers(case, device)
    x = build_input(case, device)  # (N, L, E)
    call = make_calls(case, {"ours": ours, "torch": theirs}, x, (impl,))[impl]
    return peak_of(call, device)


def peak_of(call: Callable[[], object], device: torch.device) -> dict[str, float | str]:
    """Runs ``call`` once and returns what it added at its peak (see the module docstring):
    ``{"peak_mib": ..., "before_mib": ..., "method": ...}``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        peak, method = torch.cuda.max_memory_allocated(device), "cuda.max_memory_allocated"
    else:
        before = _resident_bytes()
        method = "VmHWM after clear_refs" if _reset_peak() else "VmHWM (not reset)"
        call()
        peak = _peak_bytes()
    return {"peak_mib": (peak - before) / MIB, "before_mib": before / MIB, "method": method}


def measure(case: Case, impl: str, device: torch.device, timeout_s: float = 600) -> float:
    """Peak MiB that one call of ``impl`` on ``case`` adds, measured in a fresh interpreter.

    Raises:
        RuntimeError: the measuring process failed or timed out; the message has its stderr.
    """
    command = [
        sys.executable,
        "-m",
        "multihead.benchmark.memory",
        case.mode,
        str(case.batch),
        str(case.seq_len),
        str(case.embed_dim),
        str(case.num_heads),
        impl,
        "--device",
        str(device),
    ]
    # The child must import this very package, even when it is not installed.
    source_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"memory measurement timed out after {timeout_s:.0f} s") from error
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory measurement failed ({done.returncode}): {tail[0]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m multihead.benchmark.memory``."""
    parser = argparse.ArgumentParser(
        prog="python -m multihead.benchmark.memory",
        description="Peak memory of one attention call, as JSON on stdout.",
    )
    parser.add_argument("mode", choices=MODES)
    for name in ("batch", "seq_len", "embed_dim", "num_heads"):
        parser.add_argument(name, type=int)
    parser.add_argument("impl")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    case = Case(args.mode, args.batch, args.seq_len, args.embed_dim, args.num_heads)
    if args.impl not in implementations(case):
        parser.error(f"impl must be one of {implementations(case)} for mode {case.mode}")
    print(json.dumps(measure_here(case, args.impl, torch.device(args.device))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
