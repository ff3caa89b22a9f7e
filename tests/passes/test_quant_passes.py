"""annotate → calibrate → quantize-weights → insert-fq, check-target, and qgraph.quantize."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph import CalibrationError, PipelineError, TargetError
from qgraph.ir import ANNOTATION_KEY
from qgraph.passes.quantize_weights import QWEIGHT_KEY
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.quant.qspec import Annotation, QSpec
from tests.conftest import rel_err


def _mlp(seed=0, k=64, h=128):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, h), nn.ReLU(), nn.Linear(h, 16)).eval()


def _calib(n=4, k=64):
    return [torch.randn(8, k) for _ in range(n)]


def test_default_pipeline_annotates_calibrates_and_simulates():
    model = _mlp()
    x = torch.randn(8, 64)
    q = qgraph.quantize(model, (x,), calib=_calib(), progress=False)
    stats = q.report["stats"]
    assert stats["annotate"]["annotated"] == 2 and stats["calibrate"]["observed"] == 2
    assert stats["insert-fq"] == {"weights": 2, "activations": 2}
    fq = [n for n in q.gm.graph.nodes if n.target is torch.fake_quantize_per_tensor_affine]
    assert len(fq) == 2
    # W8A8 on a small MLP: within a few quantization steps of float
    assert rel_err(q(x), model(x)) < 0.03
    assert q.pipeline == qgraph.api.DEFAULT_PIPELINE


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([2, 3, 4]), st.sampled_from([16, 32, 64]), st.sampled_from(["greedy", "alternating", "weighted"]))
def test_bcq_simulation_equals_dequantized_weights(bits, group, method):
    model = _mlp()
    x = torch.randn(4, 64)
    q = qgraph.quantize(model, (x,), progress=False,
                        pipeline=f"annotate{{scheme=bcq,bits={bits},group_size={group},method={method}}},"
                                 "quantize-weights,insert-fq")
    gemms = [n for n in q.gm.graph.nodes if isinstance(q.graph.meta(n).get(QWEIGHT_KEY), BCQWeight)]
    assert len(gemms) == 2
    for n in gemms:
        bq = q.graph.meta(n)[QWEIGHT_KEY]
        assert bq.bits == bits and bq.group_size == min(group, bq.shape[1])
        torch.testing.assert_close(q.graph.param(n, "weight"), bq.dequantize())
    # more bits → closer to float
    assert rel_err(q(x), model(x)) < {2: 0.6, 3: 0.35, 4: 0.2}[bits]


def test_skip_list_and_strategy_override():
    model = _mlp()
    x = torch.randn(4, 64)
    strategy = {"2": Annotation(weight=QSpec.bcq(2, 32))}
    q = qgraph.quantize(model, (x,), calib=_calib(), progress=False, strategy=strategy,
                        pipeline="annotate{skip=[0]},calibrate,quantize-weights,insert-fq")
    anns = {q.graph.qualname(n): q.graph.meta(n).get(ANNOTATION_KEY) for n in q.graph.nodes()}
    assert anns["0"].fallback_float
    assert anns["2"].weight == QSpec.bcq(2, 32) and not anns["2"].inputs


def test_calibration_with_wrong_shape_names_the_input():
    model = _mlp()
    with pytest.raises(CalibrationError, match="calibration input 'input_1' has shape \\[8, 63\\]"):
        qgraph.quantize(model, (torch.randn(8, 64),), calib=[torch.randn(8, 63)], progress=False)
    with pytest.raises(CalibrationError, match="has 2 inputs but the model takes 1"):
        qgraph.quantize(model, (torch.randn(8, 64),), calib=[(torch.randn(8, 64), torch.randn(1))], progress=False)


def test_calibration_data_is_required_when_missing_from_context():
    g = qgraph.trace(_mlp(), (torch.randn(2, 64),))
    with pytest.raises(CalibrationError, match="calibrate needs data"):
        qgraph.PassManager("annotate,calibrate").run(g, qgraph.PassContext(target=qgraph.load_target("x86-avx2")))


def test_insert_fq_without_quantized_weights_is_an_ordering_error():
    with pytest.raises(PipelineError, match="'insert-fq' must run before|'quantize-weights' must run before"):
        qgraph.PassManager("annotate,insert-fq,quantize-weights")


def test_check_target_rejects_bcq_on_npu_and_falls_back():
    model = _mlp()
    x = torch.randn(4, 64)
    with pytest.raises(TargetError) as e:
        qgraph.quantize(model, (x,), target="npu-int8", progress=False,
                        pipeline="annotate{scheme=bcq,bits=3},check-target,quantize-weights,insert-fq")
    msg = str(e.value)
    assert "cannot run 2 annotated node(s)" in msg and "0 (Gemm): target npu-int8 has no binary-coding" in msg
    assert "fallback=true" in msg
    with pytest.warns(UserWarning, match="2 node\\(s\\) demoted to float"):
        q = qgraph.quantize(model, (x,), target="npu-int8", progress=False,
                            pipeline="annotate{scheme=bcq,bits=3},check-target{fallback=true},quantize-weights,insert-fq")
    torch.testing.assert_close(q(x), model(x))  # every node demoted: the model stays float
    assert len(q.report["check-target"]["demoted"]) == 2


def test_npu_default_int8_passes_check_target_with_pow2_scales():
    model = _mlp()
    x = torch.randn(8, 64)
    q = qgraph.quantize(model, (x,), target="npu-int8", calib=_calib(), progress=False,
                        pipeline="annotate,check-target,calibrate,quantize-weights,insert-fq")
    for n in q.graph.nodes():
        qw = q.graph.meta(n).get(QWEIGHT_KEY)
        if qw is not None:
            assert qw.spec.granularity == "tensor" and qw.spec.pow2_scale
            s = float(qw.scale)
            assert s == 2.0 ** round(torch.log2(torch.tensor(s)).item())
    assert rel_err(q(x), model(x)) < 0.1


def test_annotate_rejects_impossible_options():
    with pytest.raises(PipelineError, match=r"option 'bits' must be none or in \[1, 8\], got 9"):
        qgraph.quantize(_mlp(), (torch.randn(2, 64),), progress=False, pipeline="annotate{bits=9}")
