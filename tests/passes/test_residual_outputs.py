"""annotate{residual_outputs}: the last conv of a residual block gets a static output spec, calibrate observes
it, insert-fq quantizes it for every reader, on torch.fx and on ONNX alike."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph.ir.meta import ANNOTATION_KEY, QPARAMS_KEY
from qgraph.ir.onnx import load_onnx
from tests.conftest import rel_err

SIM = "annotate{{act_bits=8,residual_outputs=true{extra}}},calibrate,quantize-weights,insert-fq"


class Block(nn.Module):
    """conv -> (expand, depthwise, project) + skip -> conv -> linear: MobileNetV2's residual shape."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.project = nn.Conv2d(2 * c, c, 1)
        self.head = nn.Conv2d(c, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        h = nn.functional.relu6(self.stem(x))
        y = self.project(nn.functional.relu6(self.dw(nn.functional.relu6(self.expand(h))))) + h
        return self.fc(self.head(y).flatten(1))


def _calib(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 6, 6, generator=g),) for _ in range(3)]


def _outputs(q) -> dict[str, object]:
    return {q.graph.qualname(n): a.output for n in q.graph.nodes()
            if (a := q.graph.meta(n).get(ANNOTATION_KEY)) is not None and a.output is not None}


def test_only_convs_feeding_an_add_get_an_output_spec():
    torch.manual_seed(0)
    calib = _calib()
    q = qgraph.quantize(Block().eval(), calib[0], calib=calib, progress=False, pipeline=SIM.format(extra=""))
    outs = _outputs(q)
    # project feeds the residual Add; the stem's ReLU6 output feeds it too, but through relu6, not from the conv
    assert sorted(outs) == ["project"], outs
    assert outs["project"].observer == "mse" and outs["project"].bits == 8
    assert q.report["stats"]["annotate"]["residual_outputs"] == 1
    node = next(n for n in q.graph.nodes() if q.graph.qualname(n) == "project")
    assert set(q.graph.meta(node)[QPARAMS_KEY]) == {"input0", "output"}
    # insert-fq: the Add now reads a fake-quant of project's output
    (reader,) = q.graph.users(node)
    assert reader.target is torch.fake_quantize_per_tensor_affine
    assert q.report["stats"]["insert-fq"]["activations"] == 7  # the inputs of five convs and fc, one output


def test_off_by_default_and_a_no_op_for_weight_only():
    calib = _calib()
    plain = qgraph.quantize(Block().eval(), calib[0], calib=calib, progress=False,
                            pipeline="annotate{act_bits=8},calibrate,quantize-weights,insert-fq")
    assert _outputs(plain) == {}
    w_only = qgraph.quantize(Block().eval(), calib[0], calib=calib, progress=False,
                             pipeline="annotate{act_bits=0,residual_outputs=true},quantize-weights,insert-fq")
    assert _outputs(w_only) == {}


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), observer=st.sampled_from(["minmax", "mse", "percentile"]))
def test_the_output_fake_quant_uses_the_calibrated_range(seed, observer):
    """Property: every value the Add reads from project lies on project's output grid, and the simulated model
    moves from the float one by no more than quantization noise."""
    torch.manual_seed(seed)
    model = Block().eval()
    calib = _calib(seed)
    q = qgraph.quantize(model, calib[0], calib=calib, progress=False,
                        pipeline=SIM.format(extra=f",residual_observer={observer}"))
    node = next(n for n in q.graph.nodes() if q.graph.qualname(n) == "project")
    scale, zp = q.graph.meta(node)[QPARAMS_KEY]["output"]
    (fq,) = q.graph.users(node)
    seen = []
    hook_fn = fq.target

    def tap(x, *args):
        y = hook_fn(x, *args)
        seen.append(y)
        return y
    fq.target = tap
    q.graph.recompile()
    x = calib[1][0]
    with torch.no_grad():
        out, ref = q.graph.gm(x), model(x)
    codes = seen[0] / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= -128 - 1e-3 and codes.max() <= 127 + 1e-3
    assert rel_err(out, ref) <= 0.1


def test_calibrate_observes_an_output_read_where_another_input_is_observed():
    """The stem's output is both the Add's skip input and the expand conv's observed input0: with the stem as a
    residual producer (a plain conv feeding an Add) two observations share one tap point. Regression: restoring
    stacked taps out of order left a dangling node ('used before it has been defined')."""

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = self.a(x)
            return self.b(h) + h

    calib = _calib()
    q = qgraph.quantize(Skip().eval(), calib[0], calib=calib, progress=False, pipeline=SIM.format(extra=""))
    assert sorted(_outputs(q)) == ["a", "b"]
    a = next(n for n in q.graph.nodes() if q.graph.qualname(n) == "a")
    b = next(n for n in q.graph.nodes() if q.graph.qualname(n) == "b")
    # a's output and b's input0 are one tensor observed twice: the same range under the same observer
    assert q.graph.meta(a)[QPARAMS_KEY]["output"][0] > 0
    assert "input0" in q.graph.meta(b)[QPARAMS_KEY]
    with torch.no_grad():
        assert torch.isfinite(q(calib[0][0])).all()


def test_onnx_adapter_inserts_the_same_output_quantization(tmp_path):
    torch.manual_seed(0)
    model = Block().eval()
    calib = _calib()
    path = tmp_path / "block.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, calib[0], str(path), dynamo=True, input_names=["x"], output_names=["y"])
    pipe = SIM.format(extra="")
    q_onnx = qgraph.quantize(load_onnx(str(path)), calib=[c[0] for c in calib], progress=False, pipeline=pipe)
    q_torch = qgraph.quantize(model, calib[0], calib=calib, progress=False, pipeline=pipe)
    assert q_onnx.report["stats"]["annotate"]["residual_outputs"] == 1
    ops = [n.op_type for n in q_onnx.graph.nodes()]
    assert ops.count("QuantizeLinear") == q_torch.report["stats"]["insert-fq"]["activations"]
    x = calib[1][0]
    assert rel_err(q_onnx(x), q_torch(x)) <= 1e-4


def test_residual_observer_is_validated():
    with pytest.raises(qgraph.PipelineError, match="residual_observer"):
        qgraph.PassManager("annotate{residual_observer=best}")
