"""dce removes unused nodes and constants; fuse-activation marks producer+activation pairs."""
import torch
from torch import nn

from qgraph import PassContext, PassManager, trace
from qgraph.ir import FUSION_KEY


class Wasteful(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        _ = self.unused(x).relu()
        return torch.relu(self.used(x))


def test_dce_removes_dead_nodes_and_their_modules():
    model = Wasteful()
    for frontend in ("fx", "export"):
        g = trace(model, (torch.randn(2, 4),), frontend=frontend)
        before = len(g.nodes())
        result = PassManager("dce").run(g)
        assert len(result.graph.nodes()) == before - 2
        assert not hasattr(result.graph.gm, "unused")
        x = torch.randn(5, 4)
        torch.testing.assert_close(result.graph(x), torch.relu(model.used(x)))


def test_fuse_activation_marks_default_patterns():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 3), nn.GELU())
    g = trace(model, (torch.randn(2, 3, 3, 3),))
    result = PassManager("fuse-activation").run(g)
    marks = {g.op_type(n): g.meta(n).get(FUSION_KEY) for n in result.graph.nodes()}
    assert marks["Conv"] == "Conv+Relu" and marks["Gemm"] == "Gemm+Gelu"
    assert result.stats["fuse-activation"]["fused"] == 2


def test_fuse_activation_patterns_option_restricts():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 3), nn.GELU())
    g = trace(model, (torch.randn(2, 3, 3, 3),))
    PassManager("fuse-activation{patterns=[Gemm+Gelu]}").run(g, PassContext())
    marks = [g.meta(n).get(FUSION_KEY) for n in g.nodes() if g.meta(n).get(FUSION_KEY)]
    assert marks == ["Gemm+Gelu"]
