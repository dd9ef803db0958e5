"""The README as a package page: its blocks run, its links resolve, its figures are measured.

The Python blocks themselves run as tests of their own, collected from README.md by
pytest-markdown-docs (``--markdown-docs`` and ``testpaths`` in pyproject.toml); a block whose
fence reads ``python continuation`` runs after the one before it. These tests make sure that
stays so, that every link and image works on PyPI (absolute URLs to committed files), and that
the performance figures are those of the committed results in benchmarks/results/.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
# Where the README's links point; images must come from the raw host to render on PyPI.
RAW = "https://raw.githubusercontent.com/multihead-dev/multihead/main/"
BLOB = "https://github.com/multihead-dev/multihead/blob/main/"
TREE = "https://github.com/multihead-dev/multihead/tree/main/"


def tokens():
    return MarkdownIt("commonmark").parse(README.read_text("utf8"))


def section(title: str) -> str:
    """The README's text from the heading ``## title`` to the next ``## `` heading."""
    text = README.read_text("utf8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_every_python_block_is_collected(pytestconfig):
    assert pytestconfig.option.markdowndocs, "--markdown-docs missing from pytest's addopts"
    assert "README.md" in pytestconfig.getini("testpaths")
    fences = [t for t in tokens() if t.type == "fence"]
    python = 0
    for fence in fences:
        words = fence.info.split()
        language = words[0] if words else ""
        # A Python block under another tag ("py", "Python", "pycon") would not run as written.
        assert language in {"python", "bash", ""}, f"line {fence.map[0] + 1}: {fence.info!r}"
        if language == "python":
            # No "notest": every Python block runs.
            assert set(words[1:]) <= {"continuation"}, f"line {fence.map[0] + 1}: {fence.info!r}"
            assert python or "continuation" not in words, "the first block continues nothing"
            python += 1
    assert python >= 5


def _targets(token_list):
    for token in token_list:
        if token.type == "image":
            yield "image", token.attrGet("src")
        elif token.type == "link_open":
            yield "link", token.attrGet("href")
        elif token.type in ("html_inline", "html_block"):
            for url in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", token.content):
                yield "html", url
        if token.children:
            yield from _targets(token.children)


def test_links_and_images_are_absolute_and_committed():
    found = list(_targets(tokens()))
    assert any(kind == "image" for kind, _ in found)
    for kind, url in found:
        assert url.startswith("https://"), f"{kind} {url!r}: relative links break on PyPI"
        if kind == "image":
            assert url.startswith(RAW), f"image {url!r}: use {RAW}<path>"
        for prefix in (RAW, BLOB, TREE):
            if url.startswith(prefix):
                path = url[len(prefix) :].split("#")[0]
                assert (ROOT / path).exists(), f"{url!r}: {path} is not in the repository"


def _ratio(value: float) -> str:
    return f"{value:.2f}"


def test_performance_figures_are_the_committed_results():
    text = section("Performance")
    results = json.loads((RESULTS / "results.json").read_text("utf8"))
    machine = results["machine"]
    # The text names the machine the committed run was made on.
    for fact in (
        machine["date"][:10],
        machine["cpu"],
        f"{machine['cpu_count']} cores",
        f"{machine['torch_threads']} torch threads",
        f"torch {machine['torch_version']}",
        f"{machine['gemm_gflops']:.1f} GFLOP/s",
    ):
        assert fact in " ".join(text.split()), f"machine: {fact!r} missing from Performance"

    rows = {(r["mode"], r["N"], r["L"], r["E"], r["H"]): r for r in results["results"]}
    table = re.findall(
        r"^\| ([^|]+) \| (\d+), (\d+), (\d+), (\d+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M
    )
    assert len(table) >= 5
    for label, n, length, e, h, time, memory in table:
        if "training" in label:
            mode = "train"
        elif "causal" in label:
            mode = "causal"
        elif "need_weights=False" in label:
            mode = "infer"
        else:
            mode = "infer_weights"
        row = rows[(mode, int(n), int(length), int(e), int(h))]
        assert time == _ratio(row["ours_over_torch"]), (label, n, length)
        assert memory == _ratio(row["mem_ours_over_torch"]), (label, n, length)

    run = json.loads((RESULTS / "decode.json").read_text("utf8"))
    assert run["machine"] == machine, "decode.json and results.json come from other runs"
    decode, gqa = run["decode"], run["gqa"]
    for figure in (
        f"{decode['tokens']} tokens",
        f"{decode['ours_total_ms'] / 1000:.2f} s",
        f"{decode['torch_total_ms'] / 1000:.1f} s",
        f"{decode['speedup']:.1f}x",
        f"from {decode['ours_first_ms']:.2f} ms to {decode['ours_last_ms']:.2f} ms",
        f"from {decode['torch_first_ms']:.2f} ms to {decode['torch_last_ms']:.0f} ms",
        f"L {gqa['L']}: {_ratio(gqa['gqa_over_mha_time'])} of",
        f"{_ratio(gqa['gqa_over_mha_cache'])} of its KV-cache memory",
    ):
        assert figure in " ".join(text.split()), f"decode: {figure!r} missing from Performance"
