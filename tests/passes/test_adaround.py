"""adaround: learned rounding stays on the two neighbouring grid points, beats round-to-nearest, hands off to
quantize-weights / insert-fq, and refuses what it cannot do with typed errors."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph.context import PassContext
from qgraph.errors import CalibrationError, PassOrderError, PipelineError, SpecError
from qgraph.ir.trace import trace
from qgraph.pass_manager import PassManager
from qgraph.passes._reconstruction import check_rows, layer_op
from qgraph.passes.quantize_weights import QWEIGHT_KEY
from qgraph.pipeline import format_pipeline, parse_pipeline
from qgraph.quant import uniform
from qgraph.quant.adaround import LayerInputStats, _expand, adaround
from qgraph.quant.qspec import QSpec
from qgraph.quant.qtensor import UniformWeight

K = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated(seed, n, k=K, extra=0):
    """``n`` rows of correlated inputs (and ``extra`` more from the same distribution) and the generator."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 2 * torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(n + extra, k, generator=g) @ mix
    return (x, g) if not extra else (x[:n], x[n:])


def _cols(rows):
    """Rows ``[N, K]`` of a Linear's inputs as the columns ``[1, 1, K, N]`` `LayerInputStats` takes."""
    return rows.T[None, None]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 8), symmetric=st.booleans(),
       granularity=st.sampled_from(["tensor", "channel", "group"]), lr=st.sampled_from([0.1, 1.0, 5.0]))
def test_learned_codes_are_one_of_the_two_grid_points_around_w_over_s(seed, bits, symmetric, granularity, lr):
    x, g = _correlated(seed, 20, 16)
    w = torch.randn(6, 16, generator=g) * float(torch.rand((), generator=g) * 3 + 0.01)
    spec = QSpec.uniform(bits, symmetric=symmetric, granularity=granularity,
                         group_size=8 if granularity == "group" else None)
    stats = LayerInputStats(1, 16)
    stats.add(_cols(x))
    res = adaround(w, spec, stats, iters=12, lr=lr, keep_best=False)  # large lr: V moves far
    _, scale, zp = uniform.quantize_weight(w, spec)
    q = res.qweight
    assert isinstance(q, UniformWeight) and torch.equal(q.scale, scale) and torch.equal(q.zero_point, zp)
    s, z = _expand(scale, zp, w, spec)
    down = torch.floor(w / s) + z
    codes = q.codes.float()
    assert bool(((codes == down.clamp(spec.qmin, spec.qmax)) |
                 (codes == (down + 1).clamp(spec.qmin, spec.qmax))).all())
    assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    torch.testing.assert_close(q.dequantize(), res.w_hat, rtol=0, atol=0)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 4), symmetric=st.booleans())
def test_adaround_lowers_a_random_linears_output_error_by_at_least_15_percent(seed, bits, symmetric):
    x, g = _correlated(seed, 96)
    w = torch.randn(12, K, generator=g)
    stats = LayerInputStats(1, K)
    stats.add(_cols(x))
    res = adaround(w, QSpec.uniform(bits, symmetric=symmetric, granularity="channel"), stats, iters=200,
                   keep_best=False)
    assert res.error < 0.85 * res.rtn_error
    # the reported errors are the exact output errors over the calibration rows
    for w_hat, err in ((res.w_hat, res.error), (res.qweight.dequantize(), res.error)):
        direct = float(((x @ (w_hat - w).T) ** 2).sum(1).mean())
        assert direct == pytest.approx(err, rel=1e-6)


def test_statistics_are_exact_in_row_and_gram_form():
    torch.manual_seed(0)
    for n in (5, 40):  # fewer rows than inputs (rows kept), more (folded into Gram matrices)
        x = torch.randn(n, 3, 7)
        x_hat = x + 0.1 * torch.randn_like(x)
        w, w_hat = torch.randn(3, 4, 7), torch.randn(3, 4, 7)
        stats = LayerInputStats(3, 7)
        for part in (slice(0, 2), slice(2, None)):  # columns [B=1, G, K, L=rows]
            stats.add(x_hat[part].permute(1, 2, 0)[None], (x_hat - x)[part].permute(1, 2, 0)[None])
        assert (stats.rows is None) == (n > 7)
        ref = (torch.einsum("ngk,gok->ngo", x_hat.double(), w_hat.double())
               - torch.einsum("ngk,gok->ngo", x.double(), w.double())).pow(2).sum() / n
        f = stats.loss_fn(w)
        assert float(f(w_hat, exact=True)) == pytest.approx(float(ref), rel=1e-6)  # rows are float32
        assert float(f(w_hat)) == pytest.approx(float(ref), rel=1e-4)
        energy = float(torch.einsum("ngk,gok->ngo", x.double(), w.double()).pow(2).sum() / n)
        assert stats.energy(w) == pytest.approx(energy, rel=1e-6)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(K, 48), nn.ReLU(), nn.Linear(48, 16)).eval()


def _calib(seed=0, n=6, rows=16, held_out=0):
    """Calibration batches (and ``held_out`` rows from the same distribution)."""
    x, test = _correlated(seed, n * rows, extra=held_out) if held_out else (_correlated(seed, n * rows)[0], None)
    batches = [(b,) for b in x.split(rows)]
    return (batches, test) if held_out else batches


def _quantize(model, pipeline, calib, **kw):
    return qgraph.quantize(model, calib[0], calib=calib, pipeline=pipeline, progress=False, **kw)


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float(((a - b) ** 2).mean() / (b**2).mean())


@pytest.mark.parametrize("annotate", ["annotate{bits=3,act_bits=0}",
                                      "annotate{bits=3,group_size=8,act_bits=8},calibrate"])
def test_adaround_beats_round_to_nearest_on_the_model_output(annotate):
    model, (calib, x) = _mlp(), _calib(held_out=256)
    rtn = _quantize(model, f"{annotate},quantize-weights,insert-fq", calib)
    opt = _quantize(model, f"{annotate},adaround{{iters=200}},quantize-weights,insert-fq", calib)
    assert opt.report["stats"]["adaround"] == {"adaround": 2, "rtn": 0}
    assert opt.report["stats"]["quantize-weights"]["quantized"] == 0  # it skips what adaround filled
    with torch.no_grad():
        assert _rel(opt(x), model(x)) < 0.8 * _rel(rtn(x), model(x))
    rows = [r for r in opt.report["layers"] if r["method"] == "adaround"]
    assert len(rows) == 2 and all(r["rel_output_err"] < r["rel_rtn_output_err"] for r in rows)
    # insert-fq put exactly the learned weights into the graph
    for n in opt.gm.graph.nodes:
        if QWEIGHT_KEY in n.meta:
            assert isinstance(n.meta[QWEIGHT_KEY], UniformWeight)
            torch.testing.assert_close(opt.graph.param(n, "weight"), n.meta[QWEIGHT_KEY].dequantize(), rtol=0, atol=0)


def test_float_and_quantized_inputs_agree_on_the_first_layer_only():
    model, calib = _mlp(1), _calib(1)
    runs = {inp: _quantize(model, f"annotate{{bits=3,act_bits=0}},adaround{{iters=100,inputs={inp}}}", calib)
            for inp in ("float", "quantized")}
    codes = {inp: [n.meta[QWEIGHT_KEY].codes for n in q.gm.graph.nodes if QWEIGHT_KEY in n.meta]
             for inp, q in runs.items()}
    assert torch.equal(codes["float"][0], codes["quantized"][0])
    rows = {inp: [r for r in q.report["layers"]] for inp, q in runs.items()}
    # the second layer sees the first layer's quantization error only with quantized inputs
    assert rows["quantized"][1]["rel_rtn_output_err"] > rows["float"][1]["rel_rtn_output_err"]


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=8)
        self.c2 = nn.Conv1d(8, 6, 3, stride=2, padding=1, groups=2)
        self.w = nn.Parameter(torch.randn(6, 5))

    def forward(self, x):
        y = torch.relu(self.dw(torch.relu(self.c1(x))))
        y = F.conv2d(y, self.dw.weight, None, 1, 2, 2, 8)  # functional form
        y = self.c2(y.flatten(2))
        return y.transpose(1, 2) @ self.w  # a MatMul weight: round-to-nearest


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_convolution_rows_reproduce_the_layer_and_other_weights_get_round_to_nearest(frontend):
    torch.manual_seed(0)
    model = _Convs().eval()
    x = torch.randn(2, 3, 10, 10)
    graph = trace(model, (x,), frontend=frontend)
    convs = [n for n in graph.nodes() if graph.op_type(n) == "Conv"]
    assert len(convs) == 4
    from torch.fx.interpreter import Interpreter

    seen = {}

    class Rec(Interpreter):
        def run_node(self, n):
            seen[n] = super().run_node(n)
            return seen[n]

    Rec(graph.gm).run(x)
    for n in convs:
        lop, why = layer_op(graph, n)
        assert lop is not None, why
        xin = seen[graph.inputs(n)[0]]
        assert check_rows(graph, n, lop, xin, seen[n]) == ""
        assert sum(c.shape[0] * c.shape[3] for c in lop.cols(xin)) == xin.shape[0] * lop.positions(xin)
    calib = [(torch.randn(4, 3, 10, 10),) for _ in range(2)]
    q = _quantize(model, "annotate{bits=4,act_bits=0},adaround{iters=30}", calib, frontend=frontend)
    assert q.report["stats"]["adaround"] == {"adaround": 4, "rtn": 1}
    assert any("MatMul" in note and "round-to-nearest" in note for note in q.report["adaround"]["notes"])


def test_typed_errors_and_place_in_pipelines():
    from tests.ir.test_onnx_adapter import _mlp_proto

    model = _mlp()
    graph = trace(model, (torch.randn(4, K),))
    with pytest.raises(CalibrationError, match="adaround needs calibration data"):
        PassManager("annotate{bits=4,act_bits=0},adaround").run(graph, PassContext(config={"progress": False}))
    with pytest.raises(SpecError, match="use gptq"):
        _quantize(model, "annotate{scheme=bcq,bits=2,group_size=8},adaround", _calib())
    from qgraph.ir.onnx import load_onnx

    with pytest.raises(PipelineError, match="pass 'adaround' runs on torch.fx graphs only"):
        qgraph.quantize(load_onnx(_mlp_proto()), calib=[torch.randn(4, 16)], progress=False,
                        pipeline="annotate{bits=4,act_bits=0},adaround")
    with pytest.raises(PassOrderError):
        PassManager("annotate,quantize-weights,adaround")
    text = "annotate,calibrate,adaround{inputs=float,iters=100,lr=0.05},insert-fq"
    assert format_pipeline(parse_pipeline(text)) == text
