"""Frontends, canonical op names, dynamic batch, printer and trace errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qgraph import TraceError, trace
from qgraph.ir import weighted_nodes


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.emb = nn.Embedding(10, 4)

    def forward(self, x, ids):
        h = F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(h + self.emb(ids).sum(1))


def _inputs(batch=2):
    return torch.randn(batch, 3, 6, 6), torch.randint(0, 10, (batch, 3))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_canonical_op_names_and_weights(frontend):
    g = trace(Small(), _inputs(), frontend=frontend)
    ops = [g.op_type(n) for n in g.nodes()]
    for op in ["Conv", "BatchNormalization", "Relu", "Gemm", "Gather", "Add"]:
        assert op in ops, (op, ops)
    assert sorted(g.op_type(n) for n in weighted_nodes(g)) == ["Conv", "Gather", "Gemm"]
    fc = next(n for n in g.nodes() if g.op_type(n) == "Gemm")
    assert g.qualname(fc) == "fc"
    assert tuple(g.param(fc, "weight").shape) == (5, 4)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_traced_graph_runs_at_other_batch_sizes(frontend):
    model = Small().eval()
    g = trace(model, _inputs(2), frontend=frontend)
    for batch in (1, 7):
        x = _inputs(batch)
        torch.testing.assert_close(g(*x), model(*x), rtol=1e-5, atol=1e-6)


def test_trace_does_not_mutate_the_callers_model():
    model = nn.Sequential(nn.Linear(3, 3))
    g = trace(model, (torch.randn(2, 3),), frontend="fx")
    node = g.nodes()[0]
    g.set_param(node, "weight", torch.zeros(3, 3))
    assert model[0].weight.abs().sum() > 0


def test_shapes_are_propagated_and_printed():
    g = trace(Small(), _inputs(), frontend="export")
    text = str(g)
    assert "Conv(%x, w:[4,3,3,3] b:[4])" in text
    conv = next(n for n in g.nodes() if g.op_type(n) == "Conv")
    shape = g.shape(conv)
    assert shape[1:] == (4, 6, 6) and isinstance(shape[0], str)  # symbolic batch


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_data_dependent_control_flow_is_a_trace_error():
    with pytest.raises(TraceError, match="branches on tensor values.*torch.where"):
        trace(DataDependent(), (torch.randn(2, 3),))


class FixedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1)


def test_fixed_batch_model_says_how_to_trace_it():
    with pytest.raises(TraceError, match="dynamic_batch=False"):
        trace(FixedBatch(), (torch.randn(2, 3),), frontend="fx")
    g = trace(FixedBatch(), (torch.randn(2, 3),), frontend="fx", dynamic_batch=False)
    assert g(torch.randn(2, 3)).shape == (2, 3)


def test_non_module_and_unknown_frontend():
    with pytest.raises(TraceError, match="needs a torch.nn.Module"):
        trace(lambda x: x, (torch.randn(1),))
    with pytest.raises(TraceError, match="unknown frontend"):
        trace(nn.ReLU(), (torch.randn(1),), frontend="jit")
