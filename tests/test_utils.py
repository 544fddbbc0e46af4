"""Tests for the `/`-joined parameter-name helpers (big_vision's naming)."""

import jax
import numpy as np
import pytest

from paligemma_ft.utils import match_first, names_and_shapes, recover_tree, tree_flatten_with_names, tree_map_with_names


def _tree():
    return {
        "llm": {"layers": {"attn": {"q_einsum": {"w": np.zeros((2, 2, 8, 4))}}}, "final_norm": {"scale": 1}},
        "img": {
            "Transformer": {
                "encoderblock_1": {"LayerNorm_0": {"scale": 2}},
                "encoderblock_0": {"LayerNorm_0": {"scale": 3}},
            },
            "pos_embedding": 4,
        },
        "extra": [5, (6, None, 7)],
    }


def test_flatten_names_sorted_slash_joined_with_decimal_indices():
    names = [name for name, _ in tree_flatten_with_names(_tree())]
    assert names == [
        "extra/0",
        "extra/1/0",
        "extra/1/2",  # None is an empty sub-tree, as in jax.tree.
        "img/Transformer/encoderblock_0/LayerNorm_0/scale",
        "img/Transformer/encoderblock_1/LayerNorm_0/scale",
        "img/pos_embedding",
        "llm/final_norm/scale",
        "llm/layers/attn/q_einsum/w",
    ]


def test_flatten_order_and_leaves_match_jax_tree_leaves():
    tree = _tree()
    flat = tree_flatten_with_names(tree)
    assert [leaf for _, leaf in flat] == [leaf for leaf in jax.tree.leaves(tree)]
    leaves = dict(flat)
    assert leaves["img/Transformer/encoderblock_0/LayerNorm_0/scale"] == 3
    assert leaves["extra/1/2"] == 7


def test_more_than_ten_layers_sort_like_jax():
    tree = {"layers": [i for i in range(12)]}
    assert [n for n, _ in tree_flatten_with_names(tree)][:3] == ["layers/0", "layers/1", "layers/2"]
    assert [leaf for _, leaf in tree_flatten_with_names(tree)] == list(range(12))


def test_key_with_slash_is_rejected():
    with pytest.raises(ValueError, match="a/b"):
        tree_flatten_with_names({"a/b": 1})


def test_recover_tree_inverts_flatten_for_dicts():
    tree = {"img": {"head": {"kernel": 1, "bias": 2}}, "llm": {"final_norm": {"scale": 3}}}
    flat = tree_flatten_with_names(tree)
    assert recover_tree([n for n, _ in flat], [v for _, v in flat]) == tree


def test_recover_tree_turns_list_indices_into_string_keys():
    flat = tree_flatten_with_names({"llm": {"layers": [10, 11]}})
    assert recover_tree(*zip(*flat)) == {"llm": {"layers": {"0": 10, "1": 11}}}


@pytest.mark.parametrize(
    "names, message",
    [
        (["img/head", "img/head/kernel"], "img/head/kernel"),
        (["img/head/kernel", "img/head"], "img/head"),
        (["img/head", "img/head"], "appears twice"),
        (["img//head"], "empty component"),
    ],
)
def test_recover_tree_rejects_colliding_or_bad_names(names, message):
    with pytest.raises(ValueError, match=message):
        recover_tree(names, range(len(names)))


def test_recover_tree_length_mismatch():
    with pytest.raises(ValueError, match="2 names but 1 leaves"):
        recover_tree(["a", "b"], [1])


def test_tree_map_with_names_passes_names_and_keeps_structure():
    tree = {"img": {"head": {"kernel": 1, "bias": 2}}, "llm": [3, None]}
    out = tree_map_with_names(lambda name, x: f"{name}={x}", tree)
    assert out == {
        "img": {"head": {"kernel": "img/head/kernel=1", "bias": "img/head/bias=2"}},
        "llm": ["llm/0=3", None],
    }
    summed = tree_map_with_names(lambda name, x, y: x + y, {"a": 1, "b": 2}, {"a": 10, "b": 20})
    assert summed == {"a": 11, "b": 22}


def test_match_first_full_match_first_rule_wins():
    rules = [("img/.*kernel", "decay"), ("img/.*", "no_decay"), (".*", "other")]
    assert match_first(rules, "img/head/kernel", what="wd") == "decay"
    assert match_first(rules, "img/head/bias", what="wd") == "no_decay"
    assert match_first(rules, "llm/final_norm/scale", what="wd") == "other"
    # Full match: "img" alone does not match "img/head/bias", so the catch-all wins.
    assert match_first([("img", 1), (".*", 2)], "img/head/bias", what="x") == 2


def test_match_first_names_parameter_when_nothing_matches():
    with pytest.raises(ValueError, match=r"No sharding rule matches parameter 'llm/layers/mlp/linear'.*img/\.\*"):
        match_first([("img/.*", "replicate")], "llm/layers/mlp/linear", what="sharding")


def test_match_first_reports_invalid_regex():
    with pytest.raises(ValueError, match=r"Invalid trainable rule regex 'img/\('"):
        match_first([("img/(", True)], "img/head", what="trainable")


def test_names_and_shapes():
    tree = {
        "img": {"pos_embedding": jax.ShapeDtypeStruct((1, 16, 8), np.float32)},
        "llm": {"final_norm": {"scale": np.zeros((8,))}},
    }
    assert names_and_shapes(tree) == {"img/pos_embedding": (1, 16, 8), "llm/final_norm/scale": (8,)}
