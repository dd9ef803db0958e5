"""multihead.plot: heatmaps of the weights our layer returns (needs the ``plot`` extra)."""

from __future__ import annotations

import pytest
import torch

import multihead

pytest.importorskip("matplotlib")

from multihead import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def layer_weights(average: bool, extra: bool = False):
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(8, 4, batch_first=True, add_zero_attn=extra)
    x = torch.randn(1, 5, 8)  # (N, L, E)
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
    figure = plot.attention_figure(torch.rand(6, 3, 3), columns=4)  # 2 rows x 4 columns
    assert len(maps(figure)) == 6
    assert sum(not ax.axison for ax in figure.axes) == 2


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 4, 3, 3), r"expected a non-empty \(L, S\) or \(H, L, S\) tensor"),
        ((5,), r"Received: shape \(5,\)"),
        ((0, 3), r"non-empty"),
    ],
)
def test_rejects_shapes_it_cannot_draw(shape, message):
    with pytest.raises(ValueError, match=rf"Invalid argument `weights`: .*{message}"):
        plot.attention_figure(torch.rand(shape))


def test_rejects_label_counts_that_do_not_match():
    with pytest.raises(ValueError, match=r"Invalid argument `query_tokens`: expected 3 labels"):
        plot.attention_figure(torch.rand(3, 3), ["a", "b"])
    with pytest.raises(ValueError, match=r"Invalid argument `key_tokens`: expected 4 labels"):
        plot.attention_figure(torch.rand(3, 4), ["a", "b", "c"], key_tokens=["x"])
    with pytest.raises(TypeError, match=r"Invalid argument `weights`: expected a tensor"):
        plot.attention_figure([[1.0]])
