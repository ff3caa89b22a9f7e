"""The gptq pass: sequential vs float-input Hessians, hand-off to quantize-weights / insert-fq / lower-bcq."""
import pytest
import torch
from torch import nn

import qgraph
from qgraph.context import PassContext
from qgraph.errors import CalibrationError, PassOrderError
from qgraph.ir.trace import trace
from qgraph.pass_manager import PassManager
from qgraph.passes.quantize_weights import QWEIGHT_KEY
from qgraph.pipeline import format_pipeline, parse_pipeline
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.quant.gptq import HessianAccumulator, gptq
from qgraph.quant.qspec import QSpec
from qgraph.quant.qtensor import UniformWeight

K = 32


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(K, 48), nn.ReLU(), nn.Linear(48, 16)).eval()


def _data(seed=0, n=6, rows=16):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(K) + 2 * torch.randn(K, K, generator=g) / K**0.5
    return [(torch.randn(rows, K, generator=g) @ mix,) for _ in range(n)], mix


def _quantize(model, pipeline, calib, **kw):
    return qgraph.quantize(model, calib[0], calib=calib, pipeline=pipeline, progress=False, **kw)


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float(((a - b) ** 2).mean() / (b**2).mean())


# BCQ's round-to-nearest baseline weighs its alpha fit by the activations' E[x^2] since bf16bf0 (it was the
# plain fit): GPTQ's lead there shrank from below 0.8x to 0.90x (measured), so that case holds it to 0.95x.
@pytest.mark.parametrize("annotate, ratio", [("annotate{bits=3,group_size=16,act_bits=0}", 0.8),
                                             ("annotate{scheme=bcq,bits=2,group_size=16}", 0.95)])
def test_gptq_beats_round_to_nearest_on_the_model_output(annotate, ratio):
    model = _mlp()
    calib, mix = _data()
    x = torch.randn(256, K) @ mix
    rtn = _quantize(model, f"{annotate},quantize-weights,insert-fq", calib)
    opt = _quantize(model, f"{annotate},gptq{{act_order=true}},quantize-weights,insert-fq", calib)
    assert opt.report["stats"]["gptq"] == {"gptq": 2, "rtn": 0, "mode": "sequential"}
    assert opt.report["stats"]["quantize-weights"]["quantized"] == 0  # it skips what gptq filled
    assert _rel(opt(x), model(x)) < ratio * _rel(rtn(x), model(x))


def _layer_hessians(model, calib, w0_hat=None, stacked=True):
    """Hessians of both layers' inputs, accumulated like the pass does: one stacked batch, or batch by batch."""
    lin0 = model[0]
    w0 = lin0.weight if w0_hat is None else w0_hat
    parts = [torch.cat([b[0] for b in calib])] if stacked else [b[0] for b in calib]
    accs = HessianAccumulator(K), HessianAccumulator(48)
    for x in parts:
        accs[0].add(x)
        accs[1].add(torch.relu(x @ w0.T + lin0.bias))
    return accs[0].value(), accs[1].value()


@pytest.mark.parametrize("sequential", [True, False])
def test_hessians_come_from_the_quantized_prefix_when_sequential(sequential):
    model = _mlp(1)
    calib, _ = _data(1)
    q = _quantize(model, f"annotate{{bits=3,group_size=16,act_bits=0}},gptq{{sequential={str(sequential).lower()}}}",
                  calib)
    nodes = [n for n in q.gm.graph.nodes if QWEIGHT_KEY in n.meta]
    q0, q1 = (n.meta[QWEIGHT_KEY] for n in nodes)
    spec = q0.spec
    assert spec == QSpec.uniform(3, granularity="group", group_size=16)
    h0, _ = _layer_hessians(model, calib, stacked=sequential)
    ref0 = gptq(model[0].weight, h0, spec)
    torch.testing.assert_close(q0.dequantize(), ref0.w_hat, rtol=0, atol=1e-6)
    _, h1 = _layer_hessians(model, calib, ref0.w_hat if sequential else None, stacked=sequential)
    torch.testing.assert_close(q1.dequantize(), gptq(model[2].weight, h1, spec).w_hat, rtol=0, atol=1e-6)
    # the float weights are back in place until insert-fq
    for node, lin in zip(nodes, (model[0], model[2])):
        torch.testing.assert_close(q.graph.param(node, "weight"), lin.weight, rtol=0, atol=0)


def test_results_are_what_quantize_weights_would_store_and_lower_to_biqgemm():
    model = _mlp(2)
    calib, mix = _data(2)
    q = _quantize(model, "annotate{scheme=bcq,bits=3,group_size=16},gptq,quantize-weights,insert-fq,lower-bcq",
                  calib, target="generic")
    lowered = [m for m in q.gm.modules() if type(m).__name__ == "BCQLinear"]
    assert len(lowered) == 2
    sim = q.artifacts["simulation"]
    x = torch.randn(8, K) @ mix
    torch.testing.assert_close(q(x), sim(x), rtol=1e-4, atol=1e-4)
    kinds = {type(n.meta.get(QWEIGHT_KEY)) for n in sim.gm.graph.nodes if QWEIGHT_KEY in n.meta}
    assert kinds == {BCQWeight}
    u = _quantize(model, "annotate{bits=4,act_bits=0},gptq,insert-fq", calib)
    assert {type(n.meta[QWEIGHT_KEY]) for n in u.gm.graph.nodes if QWEIGHT_KEY in n.meta} == {UniformWeight}


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3)
        self.fc = nn.Linear(8 * 14, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_layers_gptq_cannot_take_get_round_to_nearest():
    torch.manual_seed(3)
    model = _ConvNet().eval()
    calib = [(torch.randn(4, 4, 16),) for _ in range(3)]
    q = _quantize(model, "annotate{bits=4,act_bits=0},gptq", calib)
    assert q.report["stats"]["gptq"]["gptq"] == 1 and q.report["stats"]["gptq"]["rtn"] == 1
    assert any("conv" in n and "round-to-nearest" in n for n in q.report["gptq"]["notes"])
    methods = {row["node"]: row["method"] for row in q.report["layers"]}
    assert methods == {"conv": "rtn", "fc": "gptq"}
    assert "weights-quantized" in q.graph.properties


def test_batches_that_cannot_stack_fall_back_to_float_inputs():
    model = _mlp()
    calib, _ = _data()
    graph = trace(model, calib[0])
    ctx = PassContext(config={"progress": False}, calibration=calib)
    graph.dynamic_dims = lambda: [set()]  # as if traced at a fixed batch size: batches cannot be concatenated
    out = PassManager("annotate{bits=4,act_bits=0},gptq").run(graph, ctx)
    assert out.stats["gptq"]["mode"] == "float-inputs"
    note = "calibration batches cannot be stacked into one batch: Hessians from the float model"
    assert ctx.report["gptq"]["notes"] == [note]


def test_needs_calibration_data_and_its_place_in_pipelines():
    model = _mlp()
    graph = trace(model, (torch.randn(4, K),))
    with pytest.raises(CalibrationError, match="gptq needs calibration data"):
        PassManager("annotate{bits=4,act_bits=0},gptq").run(graph, PassContext(config={"progress": False}))
    with pytest.raises(PassOrderError):
        PassManager("annotate,quantize-weights,gptq")
    text = "annotate,gptq{act_order=true,bcq_importance=hessian,damp=0.02}"
    assert format_pipeline(parse_pipeline(text)) == text
