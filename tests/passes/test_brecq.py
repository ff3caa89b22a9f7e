"""brecq: block-wise learned rounding lowers block output error vs round-to-nearest, on fx and torch.export
graphs; blocks from the graph; typed errors for what it cannot do."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph.context import PassContext
from qgraph.errors import CalibrationError, PassOrderError, PipelineError, SpecError
from qgraph.ir.trace import trace
from qgraph.pass_manager import PassManager
from qgraph.passes.quantize_weights import QWEIGHT_KEY

pytestmark = pytest.mark.usefixtures("one_thread")


class _ResMLP(nn.Module):
    """Linear, then a residual block Linear-ReLU-Linear + skip, then a Linear head."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.inp, self.fc1, self.fc2, self.head = nn.Linear(d, d), nn.Linear(d, h), nn.Linear(h, d), nn.Linear(d, 4)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x)


class _ResConv(nn.Module):
    """An inverted-residual-like block (1x1 expand, depthwise 3x3, 1x1 project) + skip, then a 1x1 conv head."""

    def __init__(self, c=16):
        super().__init__()
        self.expand, self.dw = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.project, self.head = nn.Conv2d(2 * c, c, 1), nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = x + self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))
        return self.head(torch.relu(x))


def _data(kind, seed, n=4):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        mix = torch.eye(16) + 2 * torch.randn(16, 16, generator=g) / 4
        return [(torch.randn(16, 16, generator=g) @ mix,) for _ in range(n)]
    return [(torch.randn(4, 16, 8, 8, generator=g),) for _ in range(n)]


def _model(kind, seed):
    torch.manual_seed(seed)
    return (_ResMLP() if kind == "mlp" else _ResConv()).eval()


def _quantize(model, pipeline, calib, **kw):
    return qgraph.quantize(model, calib[0], calib=calib, pipeline=pipeline, progress=False, **kw)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["mlp", "conv"]))
def test_brecq_lowers_the_residual_blocks_output_error_vs_round_to_nearest(seed, kind):
    """Block output error over the calibration data: at least 50% lower for the MLP block, 10% for the conv
    block (over 13 seeds at 3 bits: MLP 0.27-0.30 of round-to-nearest's, conv 0.56-0.84)."""
    model, calib = _model(kind, seed), _data(kind, seed)
    q = _quantize(model, "annotate{bits=3,act_bits=8},calibrate,brecq{iters=200,keep_best=false},insert-fq", calib)
    (block,) = q.report["brecq"]["blocks"]
    assert block["kind"] == "residual" and block["layers"] == (2 if kind == "mlp" else 3)
    assert block["learned_output_err"] < (0.5 if kind == "mlp" else 0.9) * block["rtn_output_err"]
    layers = {r["node"]: r for r in q.report["layers"]}
    # layers outside the residual block are single-layer blocks (exact AdaRound with quantized inputs)
    single = ("inp", "head") if kind == "mlp" else ("head",)
    assert all(layers[n]["method"] == "adaround" and layers[n]["block"].startswith("gap:") for n in single)
    assert q.report["stats"]["brecq"] == {"brecq": len(layers), "rtn": 0, "blocks": 1}


def test_fx_and_export_graphs_learn_the_same_rounding():
    model, calib = _model("mlp", 1), _data("mlp", 1)
    codes = {}
    for frontend in ("fx", "export"):
        q = _quantize(model, "annotate{bits=3,act_bits=0},brecq{iters=60}", calib, frontend=frontend)
        codes[frontend] = [n.meta[QWEIGHT_KEY].codes for n in q.gm.graph.nodes if QWEIGHT_KEY in n.meta]
        assert len(codes[frontend]) == 4
    assert all(torch.equal(a, b) for a, b in zip(codes["fx"], codes["export"]))


def test_gap_layers_make_blocks_of_plain_chains_and_hand_off_to_insert_fq():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    calib = _data("mlp", 0)
    q = _quantize(model, "annotate{bits=3,act_bits=0},brecq{iters=60,gap_layers=2,batch=0},quantize-weights,insert-fq",
                  calib)
    blocks = q.report["brecq"]["blocks"]
    assert [(b["kind"], b["layers"], b["nodes"], b["sampled"]) for b in blocks] == [("gap", 2, 4, False)]
    assert [r["method"] for r in q.report["layers"]] == ["brecq", "brecq", "adaround"]
    assert q.report["stats"]["quantize-weights"]["quantized"] == 0
    for n in q.gm.graph.nodes:
        if QWEIGHT_KEY in n.meta:
            torch.testing.assert_close(q.graph.param(n, "weight"), n.meta[QWEIGHT_KEY].dequantize(), rtol=0, atol=0)


def test_typed_errors_and_place_in_pipelines():
    from qgraph.ir.onnx import load_onnx
    from tests.ir.test_onnx_adapter import _mlp_proto

    model, calib = _model("mlp", 0), _data("mlp", 0)
    graph = trace(model, calib[0])
    with pytest.raises(CalibrationError, match="brecq needs calibration data"):
        PassManager("annotate{bits=4,act_bits=0},brecq").run(graph, PassContext(config={"progress": False}))
    with pytest.raises(SpecError, match="use gptq"):
        _quantize(model, "annotate{scheme=bcq,bits=2,group_size=8},brecq", calib)
    with pytest.raises(PipelineError, match="pass 'brecq' runs on torch.fx graphs only"):
        qgraph.quantize(load_onnx(_mlp_proto()), calib=[torch.randn(4, 16)], progress=False,
                        pipeline="annotate{bits=4,act_bits=0},brecq")
    with pytest.raises(PipelineError, match="option 'gap_layers' must be >= 1, got 0"):
        _quantize(model, "annotate{bits=4,act_bits=0},brecq{gap_layers=0}", calib)
    with pytest.raises(PassOrderError):
        PassManager("annotate,insert-fq,brecq")
