"""Block finder for block-wise reconstruction: residual spans, merging, block-contiguous schedules, gap blocks."""
import pytest
import torch
from torch import nn

from qgraph.analyses.blocks import Block, find_blocks, gap_blocks, residual_adds, schedule
from qgraph.ir.trace import trace


class _Res(nn.Module):
    """inp -> [fc1 -> relu -> fc2 -> add] -> out: one residual block of 4 nodes."""

    def __init__(self, d=8):
        super().__init__()
        self.inp, self.fc1, self.fc2, self.out = nn.Linear(d, d), nn.Linear(d, 16), nn.Linear(16, d), nn.Linear(d, 3)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.out(x)


class _Stream(nn.Module):
    """A residual stream of ``n`` pre-norm sub-blocks (like a transformer: attention-ish, MLP-ish, ...),
    plus, optionally, a long skip from the stream's start to its end."""

    def __init__(self, n=4, d=8, long_skip=False):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))
        self.fcs = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.long_skip = long_skip

    def forward(self, x):
        h = x
        for norm, fc in zip(self.norms, self.fcs):
            h = h + fc(norm(h))
        return h + x if self.long_skip else h


def _names(graph, block):
    return [graph.qualname(n) for n in block.nodes]


@pytest.mark.parametrize("frontend", ["fx", pytest.param("export", marks=pytest.mark.slow)])
def test_one_residual_block_in_a_tiny_net(frontend):
    g = trace(_Res().eval(), (torch.randn(2, 8),), frontend=frontend)
    blocks = find_blocks(g)
    assert len(blocks) == 1
    (b,) = blocks
    assert len(b) == 4 and b.kind == "residual"
    assert [g.op_type(n) for n in b.nodes] == ["Gemm", "Relu", "Gemm", "Add"]
    assert [g.qualname(n) for n in b.inputs] == ["inp"] and b.entry is b.inputs[0]
    assert b.outputs == (b.exit,)
    adds = residual_adds(g)
    assert [(g.op_type(a), g.qualname(s)) for a, s in adds] == [("Add", "inp")]


def test_stream_blocks_merge_into_layers_and_a_long_skip_loses_to_the_inner_ones():
    g = trace(_Stream(4, long_skip=True).eval(), (torch.randn(2, 8),))
    assert len(residual_adds(g)) == 5  # 4 sub-blocks + the long skip
    blocks = find_blocks(g)
    assert [len(b) for b in blocks] == [3, 3, 3, 3]  # LayerNorm, Linear, Add each
    assert all(b.entry is (blocks[i - 1].exit if i else g.input_nodes()[0]) for i, b in enumerate(blocks))
    merged = find_blocks(g, merge=2)
    assert [len(b) for b in merged] == [6, 6] and {b.kind for b in merged} == {"merged"}
    assert [g.op_type(n) for n in merged[0].nodes].count("Gemm") == 2
    assert len(find_blocks(g, merge=3)) == 2  # 3 + the remaining 1


def test_schedule_keeps_blocks_contiguous_and_topological():
    g = trace(_Res().eval(), (torch.randn(2, 8),))
    plan = schedule(g, find_blocks(g))
    flat = [n for item in plan for n in (item.nodes if isinstance(item, Block) else (item,))]
    assert sorted(flat, key=g.nodes().index) == g.nodes() and len(flat) == len(set(flat))
    seen = set(g.input_nodes())
    for n in flat:
        assert all(a in seen for a in g.inputs(n))
        seen.add(n)


def test_gap_blocks_group_the_layers_outside_residual_blocks():
    g = trace(nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(8, 8), nn.ReLU())]).eval(), (torch.randn(2, 8),))
    assert find_blocks(g) == []
    def layers(n):
        return g.op_type(n) == "Gemm"
    plan = gap_blocks(g, schedule(g, []), layers, 3)
    assert [len(b) for b in plan] == [6, 2]  # Linear,ReLU x3 | Linear,ReLU
    assert all(isinstance(b, Block) and b.kind == "gap" for b in plan)
    assert [len(b) for b in gap_blocks(g, schedule(g, []), layers, 1)] == [2, 2, 2, 2]


@pytest.mark.slow
def test_mobilenetv2_has_ten_inverted_residual_blocks():
    from qgraph.models.mobilenetv2 import load_mobilenetv2

    g = trace(load_mobilenetv2(pretrained=False).eval(), (torch.randn(1, 3, 224, 224),))
    blocks = find_blocks(g)
    assert len(blocks) == 10
    # expand conv, BN, ReLU6, depthwise conv, BN, ReLU6, project conv, BN, add
    assert [len(b) for b in blocks] == [9] * 10
    assert [g.qualname(b.exit) for b in blocks][:3] == ["features.3", "features.5", "features.6"]
    assert all([g.op_type(n) for n in b.nodes].count("Conv") == 3 for b in blocks)
    def convs(n):
        return g.op_type(n) in ("Conv", "Gemm")
    plan = gap_blocks(g, schedule(g, blocks), convs, 3)
    kinds = [b.kind for b in plan if isinstance(b, Block)]
    assert kinds.count("residual") == 10 and kinds.count("gap") == 8
    assert sum(convs(n) for b in plan if isinstance(b, Block) for n in b.nodes) == 53
