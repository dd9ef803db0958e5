"""multihead.plot: heatmaps of the weights our layer returns (needs the ``plot`` extra)."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import multihead

pytest.importorskip("matplotlib")

import matplotlib.pyplot as plt

from multihead import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAGIC = {"png": PNG_MAGIC, "jpg": b"\xff\xd8\xff", "pdf": b"%PDF", "svg": b"<?xml"}


@pytest.fixture(autouse=True)
def close_figures():
    """attention_figure registers its figures with pyplot, as plt.figure does."""
    yield
    plt.close("all")


def layer_weights(average: bool, extra: bool = False, batch: int = 1):
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(8, 4, batch_first=True, add_zero_attn=extra)
    x = torch.randn(batch, 5, 8)  # (N, L, E)
    with torch.no_grad():
        return layer(x, x, x, average_attn_weights=average)[1]


def maps(figure):
    """The heatmap axes (those holding an image), without the colour bar."""
    return [ax for ax in figure.axes if ax.images and ax.get_label() != "<colorbar>"]


def test_grid_of_heads_from_our_layer_shares_one_colour_scale():
    weights = layer_weights(average=False)  # (1, H, L, S)
    tokens = ["a", "b", "c", "d", "e"]
    figure = plot.attention_figure(weights, tokens, title="four heads")
    axes = maps(figure)
    assert [ax.get_title() for ax in axes] == [f"head {h}" for h in range(4)]
    for head, ax in enumerate(axes):
        image = ax.images[0]
        torch.testing.assert_close(torch.as_tensor(image.get_array()), weights[0, head])
        assert image.get_clim() == (0.0, pytest.approx(float(weights.max())))
        assert [t.get_text() for t in ax.get_xticklabels()] == tokens
        assert [t.get_text() for t in ax.get_yticklabels()] == tokens
    colorbars = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1 and colorbars[0].get_ylabel() == "attention weight"
    assert figure.get_suptitle() == "four heads"


def test_one_map_with_extra_key_slots_and_its_own_labels(tmp_path):
    weights = layer_weights(average=True, extra=True)  # (1, L, S + 1)
    keys = ["a", "b", "c", "d", "e", "zero"]
    path = plot.save_attention(
        weights, tmp_path / "sub" / "map.png", list("abcde"), key_tokens=keys
    )
    assert path.read_bytes().startswith(PNG_MAGIC)
    (ax,) = maps(plot.attention_figure(weights, list("abcde"), key_tokens=keys))
    assert ax.get_title() == ""
    assert [t.get_text() for t in ax.get_xticklabels()] == keys


def test_no_labels_without_tokens():
    (ax,) = maps(plot.attention_figure(torch.rand(3, 4)))
    assert ax.images[0].get_array().shape == (3, 4)


def test_long_sequences_label_every_kth_token():
    tokens = [f"t{i}" for i in range(100)]
    (ax,) = maps(plot.attention_figure(torch.rand(100, 100), tokens))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "t0" and 10 <= len(labels) < 100
    assert all(t.get_fontsize() >= 6 for t in ax.get_xticklabels())


def test_grid_with_fewer_heads_than_cells_hides_the_rest():
    figure = plot.attention_figure(torch.rand(6, 3, 3), columns=4, panels="head")  # 2 x 4
    assert len(maps(figure)) == 6
    assert sum(not ax.axison for ax in figure.axes) == 2


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 4, 3, 3, 3), r"expected a non-empty \(L, S\), \(P, L, S\) or \(1, H, L, S\)"),
        ((5,), r"Received: shape \(5,\)"),
        ((0, 3), r"non-empty"),
    ],
)
def test_rejects_shapes_it_cannot_draw(shape, message):
    with pytest.raises(ValueError, match=rf"Invalid argument `weights`: .*{message}"):
        plot.attention_figure(torch.rand(shape))


def test_rejects_label_counts_that_do_not_match():
    with pytest.raises(ValueError, match=r"Invalid argument `tokens`: expected 3 labels"):
        plot.attention_figure(torch.rand(3, 3), ["a", "b"])
    with pytest.raises(ValueError, match=r"Invalid argument `key_tokens`: expected 4 labels"):
        plot.attention_figure(torch.rand(3, 4), ["a", "b", "c"], key_tokens=["x"])
    with pytest.raises(TypeError, match=r"Invalid argument `weights`: expected a tensor"):
        plot.attention_figure([[1.0]])


def test_the_figure_shows_outside_a_notebook():
    figure = plot.attention_figure(layer_weights(average=False), list("abcde"))
    assert plt.fignum_exists(figure.number)  # managed by pyplot, as plt.figure() makes it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a non-interactive backend says it cannot show
        figure.show()  # a Figure() made without pyplot raises AttributeError here


def test_save_attention_leaves_pyplot_alone(tmp_path):
    before = plt.get_fignums()
    plot.save_attention(torch.rand(3, 3), tmp_path / "map.png")
    assert plt.get_fignums() == before


def test_a_batch_of_averaged_maps_is_not_drawn_as_heads():
    weights = layer_weights(average=True, batch=2)  # (N, L, S): one map per batch item
    assert weights.shape == (2, 5, 5)
    with pytest.raises(ValueError, match=r"Invalid argument `weights`: .*ambiguous") as error:
        plot.attention_figure(weights)
    assert "weights[i]" in str(error.value) and "panels='head'" in str(error.value)
    figure = plot.attention_figure(weights, panels="item")
    assert [ax.get_title() for ax in maps(figure)] == ["item 0", "item 1"]


def test_a_batch_of_per_head_maps_is_refused():
    weights = layer_weights(average=False, batch=2)  # (N, H, L, S)
    with pytest.raises(ValueError, match=r"`weights`: .*holds 2 items\. Pass one item"):
        plot.attention_figure(weights)
    (ax,) = maps(plot.attention_figure(weights[:1, :1]))  # (1, 1, L, S): one head, no title
    assert ax.get_title() == ""


def test_panels_must_name_the_axis():
    with pytest.raises(ValueError, match=r"Invalid argument `panels`"):
        plot.attention_figure(torch.rand(2, 3, 3), panels=" ")


@pytest.mark.parametrize("suffix", ["png", "jpg", "pdf", "svg"])
def test_save_attention_writes_the_format_its_suffix_names(tmp_path, suffix):
    path = plot.save_attention(torch.rand(3, 3), tmp_path / f"map.{suffix}")
    assert path.read_bytes().startswith(MAGIC[suffix])


def test_save_attention_without_a_suffix_writes_png(tmp_path):
    path = plot.save_attention(torch.rand(3, 3), tmp_path / "map")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_save_attention_refuses_a_suffix_it_cannot_write(tmp_path):
    assert {"png", "jpg", "pdf", "svg"} <= set(plot.image_formats())
    assert "pgf" not in plot.image_formats()  # needs LaTeX
    with pytest.raises(ValueError, match=r"Invalid argument `path`: .*\.png.*'.*map\.bmp'"):
        plot.save_attention(torch.rand(3, 3), tmp_path / "sub" / "map.bmp")
    assert list(tmp_path.iterdir()) == []  # checked before any folder is made


def hide_matplotlib(monkeypatch):
    """Makes ``import matplotlib`` (and its submodules) fail as if it were not installed."""
    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_without_matplotlib_the_error_names_the_extra(monkeypatch, tmp_path):
    hide_matplotlib(monkeypatch)
    hint = r"needs matplotlib, which is not installed: pip install 'multihead\[plot\]'"
    with pytest.raises(ModuleNotFoundError, match=hint):
        plot.attention_figure(torch.rand(3, 3))
    with pytest.raises(ModuleNotFoundError, match=hint):
        plot.save_attention(torch.rand(3, 3), tmp_path / "map.png")
    with pytest.raises(ModuleNotFoundError, match=hint):
        plot.image_formats()


def test_dollar_signs_are_plain_text(tmp_path):
    """Tokens and titles are drawn as text: "$" is not TeX (an unbalanced one raised, a pair
    turned words into math italics)."""
    path = multihead.plot.save_attention(
        torch.rand(3, 3), tmp_path / "m.png", ["$x^$", "costs $5", "and $10"], title="a $x^$ b"
    )
    assert path.exists()


def test_non_finite_weights_keep_the_colour_scale(tmp_path):
    """The scale runs from 0 to the largest finite weight; NaN / inf cells are drawn in the
    'bad' colour instead of making the whole scale meaningless."""
    weights = torch.rand(4, 4)
    weights[1, 2], weights[2, 1] = float("nan"), float("inf")
    figure = multihead.plot.attention_figure(weights)
    image = figure.axes[0].images[0]
    finite = weights[torch.isfinite(weights)]
    assert image.norm.vmin == 0.0 and image.norm.vmax == pytest.approx(float(finite.max()))
    zeros = multihead.plot.attention_figure(torch.zeros(3, 3))  # fully masked rows
    assert zeros.axes[0].images[0].norm.vmax == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(tokens="abcd"), TypeError, r"`tokens`: expected a sequence of labels"),
        (dict(tokens=["a"]), ValueError, r"`tokens`: expected 4 labels"),
        (dict(key_tokens=["a"]), ValueError, r"`key_tokens`: expected 4 labels"),
        (dict(columns="2"), TypeError, r"`columns`: expected a positive int"),
    ],
)
def test_plot_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        multihead.plot.attention_figure(torch.rand(4, 4), **kwargs)


def test_tokens_may_be_any_iterable():
    figure = multihead.plot.attention_figure(torch.rand(4, 4), tokens=(t for t in "abcd"))
    labels = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    assert labels == list("abcd")


def test_an_empty_batch_of_maps_is_refused():
    with pytest.raises(ValueError, match=r"`weights`: expected a non-empty"):
        multihead.plot.attention_figure(torch.rand(0, 2, 3, 3))
