"""Neuron location: the kinds found for MHA, GQA and Qwen2-style biases, and located neurons of
a synthetic change with known large-change neurons."""

import pytest
import torch

from fusion.errors import FusionError
from fusion.neurons import Member, change_scores, describe, neuron_kinds, top_fraction

H, FFN = 8, 16


def layer_shapes(kv_rows=H, biases=False):
    p = "model.layers.0."
    shapes = {
        p + "mlp.gate_proj.weight": (FFN, H),
        p + "mlp.up_proj.weight": (FFN, H),
        p + "mlp.down_proj.weight": (H, FFN),
        p + "self_attn.q_proj.weight": (H, H),
        p + "self_attn.k_proj.weight": (kv_rows, H),
        p + "self_attn.v_proj.weight": (kv_rows, H),
        p + "self_attn.o_proj.weight": (H, H),
        p + "input_layernorm.weight": (H,),
        "model.embed_tokens.weight": (10, H),
    }
    if biases:
        shapes.update({p + f"self_attn.{x}_proj.bias": (r,) for x, r in (("q", H), ("k", kv_rows), ("v", kv_rows))})
    return shapes


def kinds_by_name(kinds):
    return {k.kind: k for k in kinds}


def test_multi_head_attention_ties_value_rows_to_output_columns():
    kinds = kinds_by_name(neuron_kinds(layer_shapes()))
    assert set(kinds) == {"ffn", "attn_q", "attn_k", "attn_v", "input_layernorm", "embed_tokens"}
    assert {(m.tensor.split(".")[-2], m.axis) for m in kinds["ffn"].members} == {("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)}
    assert {(m.tensor.split(".")[-2], m.axis) for m in kinds["attn_v"].members} == {("v_proj", 0), ("o_proj", 1)}
    assert kinds["ffn"].size == FFN and kinds["embed_tokens"].layer is None


def test_grouped_query_attention_with_qwen2_biases():
    kinds = kinds_by_name(neuron_kinds(layer_shapes(kv_rows=4, biases=True), others="inner"))
    assert set(kinds) == {"ffn", "attn_q", "attn_k", "attn_v", "attn_o"}
    assert kinds["attn_v"].size == 4 and kinds["attn_o"].size == H
    assert Member("model.layers.0.self_attn.v_proj.bias", 0) in kinds["attn_v"].members
    assert Member("model.layers.0.self_attn.q_proj.bias", 0) in kinds["attn_q"].members


def test_row_unit_scores_each_matrix_alone():
    kinds = kinds_by_name(neuron_kinds(layer_shapes(), unit="row", others="inner"))
    assert set(kinds) == {"gate", "up", "down", "q", "k", "v", "o"}
    assert all(len(k.members) == 1 for k in kinds.values())
    assert kinds["down"].members[0].axis == 1


def test_no_projection_tensors_is_an_error():
    with pytest.raises(FusionError, match="neuron location supports"):
        neuron_kinds({"transformer.h.0.attn.c_attn.weight": (8, 24)})


@pytest.mark.parametrize("score_norm", ["l2", "l1"])
@pytest.mark.parametrize("relative", [False, True])
def test_located_neurons_are_the_planted_ones(score_norm, relative):
    g = torch.Generator().manual_seed(0)
    shapes = layer_shapes()
    base = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}
    tuned = {n: (b.float() + 0.01 * torch.randn(b.shape, generator=g)).to(torch.bfloat16) for n, b in base.items()}
    hot = [2, 9, 13]
    p = "model.layers.0.mlp."
    for name, axis in ((p + "gate_proj.weight", 0), (p + "up_proj.weight", 0), (p + "down_proj.weight", 1)):
        t = tuned[name].float()
        t.index_add_(axis, torch.tensor(hot), 0.3 * torch.ones(t.index_select(axis, torch.tensor(hot)).shape))
        tuned[name] = t.to(torch.bfloat16)
    ffn = kinds_by_name(neuron_kinds(shapes))["ffn"]
    scores = change_scores(ffn, base, {n: [t] for n, t in tuned.items()}, score_norm, relative)
    located = top_fraction(scores, 3 / FFN)
    assert located.tolist() == hot
    row = describe(ffn, scores, located)
    assert row["located"] == 3 and row["neurons"] == FFN
    assert row["curve"][0] == [1, pytest.approx(float(scores.max()))]
    assert row["located_sum_sq"] > 0.9 * row["sum_sq"]


def test_scores_equal_direct_norms_in_float32():
    g = torch.Generator().manual_seed(1)
    shapes = layer_shapes()
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    tuned = {n: [b + torch.randn(b.shape, generator=g)] for n, b in base.items()}
    ffn = kinds_by_name(neuron_kinds(shapes))["ffn"]
    p = "model.layers.0.mlp."
    d = {n: tuned[n][0] - base[n] for n in shapes}
    want = (d[p + "gate_proj.weight"].square().sum(1) + d[p + "up_proj.weight"].square().sum(1) + d[p + "down_proj.weight"].square().sum(0)).sqrt()
    torch.testing.assert_close(change_scores(ffn, base, tuned), want)


def test_top_fraction_counts_and_ties():
    scores = torch.tensor([1.0, 5.0, 5.0, 0.5, 3.0])
    assert top_fraction(scores, 0.0).tolist() == []
    assert top_fraction(scores, 0.4).tolist() == [1, 2]
    assert top_fraction(scores, 0.3).tolist() == [1, 2]  # 1.5 rounds up to 2
    assert top_fraction(scores, 1.0).tolist() == [0, 1, 2, 3, 4]
