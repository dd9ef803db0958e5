"""Autoregressive decoding and grouped-query attention, ours against torch.

Shape legend: N batch (1 here), T tokens generated, E embed dim, H heads, Hkv key/value heads.

Decode: T tokens one at a time. Ours appends each token's key and value to a KV cache and
attends from the new token only; torch.nn.MultiheadAttention has no cache, so it recomputes
causal attention over the whole prefix at every step (its best causal call: float mask +
is_causal) and the step's output is the last row. Both run eval + no_grad, fp32, one process,
with the step order alternating between the two so drift hits both alike.

GQA: one causal inference call at L tokens with Hkv = H (full MHA) and Hkv < H, time and the
bytes a KV cache of that length holds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from ..layer import MultiheadAttention
from .timing import interleaved, time_call


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def decode(device: torch.device, tokens: int, embed_dim: int = 512, heads: int = 8) -> dict:
    """Per-token times (ms) generating ``tokens`` tokens with our cache and with torch."""
    torch.manual_seed(0)
    ours = MultiheadAttention(embed_dim, heads, batch_first=True, device=device).eval()
    theirs = torch.nn.MultiheadAttention(embed_dim, heads, batch_first=True, device=device)
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    x = torch.randn(1, tokens, embed_dim, device=device)  # the sequence being generated
    causal = torch.nn.Transformer.generate_square_subsequent_mask(tokens, device=device)
    cache = ours.new_cache(1, tokens)
    ours_ms, torch_ms = [], []
    sync = _sync(device)
    with torch.no_grad():
        for t in range(tokens):
            step = x[:, t : t + 1]
            prefix, mask = x[:, : t + 1], causal[: t + 1, : t + 1]

            def ours_step(step=step):
                return ours(step, step, step, cache=cache, need_weights=False)

            def torch_step(prefix=prefix, mask=mask):
                return theirs(prefix, prefix, prefix, attn_mask=mask, is_causal=True)[0][:, -1:]

            if t % 2:
                torch_ms.append(time_call(torch_step, 1, sync) * 1e3)
                ours_ms.append(time_call(ours_step, 1, sync) * 1e3)
            else:
                ours_ms.append(time_call(ours_step, 1, sync) * 1e3)
                torch_ms.append(time_call(torch_step, 1, sync) * 1e3)
    window = max(1, tokens // 16)
    first = statistics.median(ours_ms[1 : window + 1])  # step 0 pays one-off set-up
    last = statistics.median(ours_ms[-window:])
    return {
        "tokens": tokens,
        "E": embed_dim,
        "H": heads,
        "ours_total_ms": sum(ours_ms),
        "torch_total_ms": sum(torch_ms),
        "speedup": sum(torch_ms) / sum(ours_ms),  # torch / ours: how many times faster ours is
        "ours_over_torch": sum(ours_ms) / sum(torch_ms),  # the ratio the other tables show
        "ours_first_ms": first,
        "ours_last_ms": last,
        "ours_last_over_first": last / first,
        "torch_first_ms": statistics.median(torch_ms[1 : window + 1]),
        "torch_last_ms": statistics.median(torch_ms[-window:]),
        "ours_ms": ours_ms,
        "torch_ms": torch_ms,
    }


def grouped_query(
    device: torch.device, seq_len: int, embed_dim: int = 512, heads: int = 8, kv_heads: int = 2
) -> dict:
    """Causal inference time and KV-cache bytes, Hkv = ``kv_heads`` against Hkv = H."""
    torch.manual_seed(0)
    x = torch.randn(1, seq_len, embed_dim, device=device)
    layers = {
        name: MultiheadAttention(
            embed_dim, heads, batch_first=True, num_kv_heads=hkv, device=device
        ).eval()
        for name, hkv in (("mha", heads), ("gqa", kv_heads))
    }
    calls = {
        name: (lambda layer=layer: layer(x, x, x, need_weights=False, is_causal=True))
        for name, layer in layers.items()
    }
    with torch.no_grad():
        times = interleaved(calls, budget_s=0.0, min_rounds=7, max_rounds=7, sync=_sync(device))
    head_dim = embed_dim // heads
    cache_bytes = {
        name: 2 * seq_len * layer.num_kv_heads * head_dim * x.element_size()
        for name, layer in layers.items()
    }
    mha_ms, gqa_ms = (statistics.median(times[n]) * 1e3 for n in ("mha", "gqa"))
    return {
        "L": seq_len,
        "E": embed_dim,
        "H": heads,
        "Hkv": kv_heads,
        "mha_ms": mha_ms,
        "gqa_ms": gqa_ms,
        "gqa_over_mha_time": gqa_ms / mha_ms,
        "mha_cache_MiB": cache_bytes["mha"] / 2**20,
        "gqa_cache_MiB": cache_bytes["gqa"] / 2**20,
        "gqa_over_mha_cache": cache_bytes["gqa"] / cache_bytes["mha"],
    }


def _faster(decoded: dict) -> str:
    """``ours 14.3x faster`` or ``ours 1.2x slower``, from the total times."""
    if decoded["speedup"] >= 1:
        return f"ours {decoded['speedup']:.1f}x faster"
    return f"ours {1 / decoded['speedup']:.1f}x slower"


def markdown(decoded: dict, grouped: dict) -> str:
    """The decode and GQA results as Markdown."""
    return "\n".join(
        [
            "## Autoregressive decode (eval, fp32, batch 1)",
            "",
            f"{decoded['tokens']} tokens one at a time, E={decoded['E']}, H={decoded['H']}: "
            "ours with a KV cache, torch recomputing causal attention over the prefix.",
            "",
            "| | ours | torch |",
            "| --- | ---: | ---: |",
            f"| total ms | {decoded['ours_total_ms']:.1f} | {decoded['torch_total_ms']:.1f} |",
            f"| ms per token, first 1/16 | {decoded['ours_first_ms']:.3f} | "
            f"{decoded['torch_first_ms']:.3f} |",
            f"| ms per token, last 1/16 | {decoded['ours_last_ms']:.3f} | "
            f"{decoded['torch_last_ms']:.3f} |",
            "",
            f"Total time ours/torch: {decoded['ours_over_torch']:.3f} ({_faster(decoded)}). "
            f"Our per-token time, last over first: {decoded['ours_last_over_first']:.2f}.",
            "",
            f"## Grouped-query attention (causal inference, L={grouped['L']}, "
            f"E={grouped['E']}, H={grouped['H']})",
            "",
            "| | Hkv = H (MHA) | Hkv = " + str(grouped["Hkv"]) + " (GQA) | GQA / MHA |",
            "| --- | ---: | ---: | ---: |",
            f"| time ms | {grouped['mha_ms']:.1f} | {grouped['gqa_ms']:.1f} | "
            f"{grouped['gqa_over_mha_time']:.2f} |",
            f"| KV cache MiB | {grouped['mha_cache_MiB']:.2f} | {grouped['gqa_cache_MiB']:.2f} | "
            f"{grouped['gqa_over_mha_cache']:.2f} |",
            "",
        ]
    )


def decode_figure(decoded: dict, machine: dict):
    """The figure of ``decode.png``: ms per generated token against its position, both layers.

    Raises:
        ModuleNotFoundError: matplotlib is not installed; the message names the extra.
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from .plots import _tick_label, caption, footer, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    positions = range(1, decoded["tokens"] + 1)
    ax.plot(positions, decoded["torch_ms"], label="torch: recompute the prefix", lw=0.8)
    ax.plot(positions, decoded["ours_ms"], label="ours: KV cache", lw=0.8)
    ax.set_yscale("log")
    # Plain numbers (0.5, 20), not 2 x 10^1; the minor ticks get labels only within a decade.
    ax.yaxis.set_major_formatter(FuncFormatter(_tick_label))
    low, high = ax.get_ylim()
    few = high / low < 20
    ax.yaxis.set_minor_formatter(FuncFormatter(_tick_label) if few else NullFormatter())
    ax.set_xlabel("position of the generated token (linear scale)")
    ax.set_ylabel("ms per token (log10 scale)")
    ax.set_title(
        f"Decode, E={decoded['E']} H={decoded['H']}: total time ours/torch "
        f"{decoded['ours_over_torch']:.3f} ({_faster(decoded)})"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    footer(fig, caption(machine, "eval, batch 1"))
    fig.tight_layout()
    return fig


def write(decoded: dict, grouped: dict, machine: dict, out_dir: Path) -> list[Path]:
    """Writes ``decode.md``, ``decode.json`` and (with matplotlib) ``decode.png``.

    Without matplotlib the picture is left out; :func:`.plots.write_plots`, which runs after
    this, says what to install.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / "decode.md", out_dir / "decode.json"
    md_path.write_text(markdown(decoded, grouped))
    payload = {"machine": machine, "decode": decoded, "gqa": grouped}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    paths = [md_path, json_path]
    try:
        fig = decode_figure(decoded, machine)
    except ImportError:
        return paths
    from .plots import pyplot

    png = out_dir / "decode.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return [*paths, png]
