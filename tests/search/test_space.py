"""Search space: choices the target accepts, embedding handling, tie groups and their repair."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.ir.trace import trace
from qgraph.search.space import SearchError, SpaceOptions, build_space
from qgraph.target import load_target


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 128)
        self.q = torch.nn.Linear(128, 128)
        self.k = torch.nn.Linear(128, 128)
        self.v = torch.nn.Linear(128, 128)
        self.out = torch.nn.Linear(128, 96)
        self.conv = torch.nn.Conv1d(96, 32, 3)

    def forward(self, ids):
        h = self.emb(ids)
        z = self.q(h) + self.k(h) * self.v(h)
        return self.conv(self.out(z).transpose(1, 2))


@pytest.fixture(scope="module")
def graph():
    return trace(_Net().eval(), (torch.randint(0, 100, (2, 7)),), frontend="fx")


@pytest.mark.parametrize("target", ["x86-avx2", "npu-int8", "arm-neon", "gpu-sm90", "x86-avx512-vnni"])
def test_every_choice_runs_on_the_target(graph, target):
    tgt = load_target(target)
    space = build_space(graph, tgt)
    for layer in space.layers:
        assert layer.choices[0].bits >= layer.choices[-1].bits
        for ch in layer.choices:
            if not ch.is_float:
                assert tgt.check(layer.op, ch.weight, ch.act) == [], (layer.key, ch.label)
                ch.weight.check_tensor(layer.shape)


def test_x86_and_npu_spaces(graph):
    x86 = build_space(graph, load_target("x86-avx2"))
    labels = {layer.key: [ch.label for ch in layer.choices] for layer in x86.layers}
    # rows of 128: a g128 int4 spec is the per-channel one, offered once
    a = f"w8-ch+a{load_target('x86-avx2').defaults.activation.bits}"
    assert labels["q"] == ["fp32", "w8-ch", a, "bcq4-g128", "w4-ch", "bcq3-g128", "bcq2-g128", "bcq1-g128"]
    assert labels["emb"] == ["w8-ch"] and not x86.layers[0].searchable  # fixed at the target's embedding default
    assert labels["conv"] == ["fp32", a]  # rows of 288: no g128; x86 runs Conv only as int8_conv
    npu = build_space(graph, load_target("npu-int8"))
    for layer in npu.layers:
        want = ["fp32"] if layer.op == "Gather" else ["fp32", "w8-t-p2+a8"]
        assert [ch.label for ch in layer.choices] == want
    searched = build_space(graph, load_target("x86-avx2"), SpaceOptions(embeddings=True))
    assert [ch.label for ch in searched.layers[0].choices] == ["fp32", "w8-ch", "w4-ch"]


def test_shared_input_forms_a_tie_group(graph):
    space = build_space(graph, load_target("x86-avx2"))
    keys = [tuple(space.layers[i].key for i in g) for g in space.ties]
    assert keys == [("q", "k", "v")]


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_repair_makes_ties_agree_and_round_trips(graph, data):
    import numpy as np

    space = build_space(graph, load_target(data.draw(st.sampled_from(["x86-avx2", "npu-int8"]))))
    a = tuple(data.draw(st.integers(0, len(layer.choices) - 1)) for layer in space.layers)
    seed = data.draw(st.one_of(st.none(), st.integers(0, 100)))
    fixed = space.repair_ties(a, rng=None if seed is None else np.random.default_rng(seed))
    assert space.ties_ok(fixed) and space.violations(fixed, load_target(space.target)) == []
    tied = {i for g in space.ties for i in g}
    assert all(fixed[i] == a[i] for i in range(len(a)) if i not in tied)
    if space.ties_ok(a):
        assert fixed == a
    assert space.assignment(space.strategy(fixed)) == fixed


def test_uniform_and_bits(graph):
    space = build_space(graph, load_target("x86-avx2"))
    a = space.uniform("bcq3-g128")
    got = {layer.key: layer.choices[c].label for layer, c in zip(space.layers, a)}
    assert got == {"emb": "w8-ch", "q": "bcq3-g128", "k": "bcq3-g128", "v": "bcq3-g128", "out": "bcq3-g128",
                   "conv": next(lb for lb in space.labels() if lb.startswith("w8-ch+a"))}  # the conv has no bcq: nearest bits it offers
    n = {layer.key: layer.numel for layer in space.layers}
    assert space.avg_bits(a) == pytest.approx((3 * (3 * 128 * 128 + 96 * 128) + 8 * n["conv"])
                                              / (3 * 128 * 128 + 96 * 128 + n["conv"]))
    assert space.weight_bytes(a) < space.weight_bytes(space.uniform("w8-ch")) < space.float_bytes()
    with pytest.raises(SearchError, match="no layer offers"):
        space.uniform("bcq7-g3")


def test_keep_float_pins_nodes_out_of_the_search(graph):
    tgt = load_target("x86-avx2")
    full = build_space(graph, tgt)
    space = build_space(graph, tgt, SpaceOptions(keep_float=("o*", "v")))
    pinned = {layer.key for layer in space.layers if [ch.label for ch in layer.choices] == ["fp32"]}
    assert pinned == {"out", "v"} and not any(space.layers[i].key in pinned for i in space.searchable)
    assert [tuple(space.layers[i].key for i in g) for g in space.ties] == [("q", "k")]  # v left the q/k/v group
    a = space.uniform("bcq3-g128")
    got = {layer.key: layer.choices[c].label for layer, c in zip(space.layers, a)}
    assert got["out"] == got["v"] == "fp32" and got["q"] == "bcq3-g128"
    n = {layer.key: layer.numel for layer in space.layers}
    counted = [space.layers[i].key for i in space.counted_for_bits]
    assert set(counted) == {"q", "k", "conv"}  # the average bits leave pinned layers out
    assert space.avg_bits(a) == pytest.approx((3 * (n["q"] + n["k"]) + 8 * n["conv"]) / (n["q"] + n["k"] + n["conv"]))
    assert len(full.searchable) == len(space.searchable) + 2
