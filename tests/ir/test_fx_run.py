"""Node-by-node execution for reconstruction passes: weight overrides, insert-fq's fake-quant, two environments."""
import pytest
import torch
from torch import nn

from qgraph.ir.fx_run import Lockstep, NodeRunner
from qgraph.ir.trace import trace


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) + 1.0


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_lockstep_runs_float_and_quantized_models_side_by_side(frontend):
    torch.manual_seed(0)
    model = _Net().eval()
    batches = [(torch.randn(4, 6),), (torch.randn(2, 6),)]
    g = trace(model, batches[0], frontend=frontend)
    gemms = [n for n in g.nodes() if g.op_type(n) == "Gemm"]
    w1 = torch.randn(5, 6)
    fq = (0.05, 3, 0, 255)
    ls = Lockstep(g, batches, weights={gemms[0]: w1}, fq={gemms[1]: {g.inputs(gemms[1])[0]: fq}})
    for n in ls.order:
        ls.step(n)
    out = g.inputs(g.output_node())[0] if frontend == "fx" else g.output_node().all_input_nodes[0]
    for b, (x,) in enumerate(batches):
        with torch.no_grad():
            torch.testing.assert_close(ls.values(out, "float")[b], model(x))
            h = torch.relu(x @ w1.T + model.fc1.bias)
            want = model.fc2(torch.fake_quantize_per_tensor_affine(h, *fq)) + 1.0
            torch.testing.assert_close(ls.values(out, "quant")[b], want)
    # only the graph output is left in each environment
    assert all(set(env) - set(g.input_nodes()) == {out} for env in ls.float_envs + ls.quant_envs)


def test_node_runner_weight_override_carries_gradients():
    model = _Net().eval()
    g = trace(model, (torch.randn(2, 6),))
    node = next(n for n in g.nodes() if g.op_type(n) == "Gemm")
    w = torch.zeros(5, 6, requires_grad=True)
    x = torch.randn(2, 6)
    y = NodeRunner(g).run(node, {g.input_nodes()[0]: x}, weight=w)
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(5, 6))
    assert model.fc1.weight.grad is None
