"""lower-bcq and lower-embedding replace nodes by real kernels; verify compares with the simulation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph.kernels import BCQLinear
from qgraph.kernels.embedding import RowwiseQuantizedEmbedding
from tests.conftest import rel_err


class TinyLM(nn.Module):
    def __init__(self, vocab=60, d=64, h=96):
        super().__init__()
        self.emb, self.up, self.down = nn.Embedding(vocab, d), nn.Linear(d, h), nn.Linear(h, d, bias=False)

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.emb(ids))))


PIPE = ("annotate{{scheme=bcq,bits={bits},group_size={group},embedding_bits={ebits}}},quantize-weights,insert-fq,"
        "lower-bcq,lower-embedding,dce,verify{{tol=1e-4}}")


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 4), st.sampled_from([32, 64]), st.sampled_from([4, 8]), st.sampled_from(["fx", "export"]),
       st.integers(0, 100))
def test_lowered_equals_simulation(bits, group, ebits, frontend, seed):
    torch.manual_seed(seed)
    model = TinyLM().eval()
    ids = torch.randint(0, 60, (3, 5))
    sim = qgraph.quantize(model, (ids,), frontend=frontend, progress=False,
                          pipeline=PIPE.format(bits=bits, group=group, ebits=ebits).split(",lower-bcq")[0])
    low = qgraph.quantize(model, (ids,), frontend=frontend, progress=False,
                          pipeline=PIPE.format(bits=bits, group=group, ebits=ebits))
    mods = [type(m) for m in low.gm.modules()]
    assert mods.count(BCQLinear) == 2 and mods.count(RowwiseQuantizedEmbedding) == 1
    ids2 = torch.randint(0, 60, (4, 5))
    assert rel_err(low(ids2), sim(ids2)) <= 1e-5
    v = low.report["verify"]
    assert v["first_divergent"] is None and v["output_rel_err"] <= 1e-5
    assert [r["status"] for r in low.report["lowering"]] == ["lowered"] * 3


def test_lowering_drops_the_float_weights():
    model = TinyLM().eval()
    ids = torch.randint(0, 60, (2, 5))
    low = qgraph.quantize(model, (ids,), progress=False, pipeline=PIPE.format(bits=3, group=32, ebits=4))
    stored = sum(b.numel() * b.element_size() for b in low.gm.buffers())
    stored += sum(p.numel() * p.element_size() for p in low.gm.parameters())
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert stored < 0.3 * fp32, (stored, fp32)


def test_verify_reports_the_first_divergent_node():
    model = TinyLM().eval()
    ids = torch.randint(0, 60, (2, 5))
    low = qgraph.quantize(model, (ids,), progress=False,
                          pipeline="annotate{scheme=bcq,bits=2,group_size=32},quantize-weights,lower-bcq,verify")
    # without insert-fq the simulation is float, so the first BCQ layer diverges
    assert low.report["verify"]["first_divergent"] == "up"
    with pytest.raises(qgraph.QGraphError, match="diverges from the simulation first at node 'up'"):
        qgraph.quantize(model, (ids,), progress=False,
                        pipeline="annotate{scheme=bcq,bits=2,group_size=32},quantize-weights,lower-bcq,verify{strict=true}")


def test_bcq_on_conv_stays_float_and_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    x = torch.randn(2, 3, 6, 6)
    low = qgraph.quantize(model, (x,), progress=False,
                          pipeline="annotate{scheme=bcq,bits=3,granularity=channel},quantize-weights,insert-fq,lower-bcq")
    rows = {r["node"]: r for r in low.report["lowering"]}
    assert rows["0"]["status"] == "float" and "no BiQGEMM kernel for Conv" in rows["0"]["reason"]
    assert rows["2"]["status"] == "lowered"


def test_verify_needs_a_lowering_pass_first():
    with pytest.raises(qgraph.PipelineError, match="requires the graph to be 'lowered'"):
        qgraph.quantize(TinyLM().eval(), (torch.randint(0, 60, (2, 5)),), progress=False, pipeline="annotate,verify")


class SquareAddmm(nn.Module):
    """``addmm(b, x, W)`` multiplies by W itself (an ``[in, out]`` weight): with a square W the shapes cannot
    tell it from ``x @ Wᵀ``, the layout BiQGEMM runs."""

    def __init__(self, d=64):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.b = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.addmm(self.b, x, self.w)


def test_square_addmm_is_not_lowered_as_x_times_w_transposed():
    model, x = SquareAddmm().eval(), torch.randn(5, 64)
    pipe = "annotate{scheme=bcq,bits=3,granularity=channel},quantize-weights,insert-fq"
    sim = qgraph.quantize(model, (x,), progress=False, pipeline=pipe)
    low = qgraph.quantize(model, (x,), progress=False, pipeline=pipe + ",lower-bcq")
    assert sim.report["stats"]["quantize-weights"]["quantized"] == 1
    assert [r["status"] for r in low.report["lowering"]] == ["float"]
    assert "x @ Wᵀ" in low.report["lowering"][0]["reason"]
    assert rel_err(low(x), sim(x)) <= 1e-6
    assert rel_err(sim(x), model(x)) < 0.5  # the simulation itself is a 3-bit approximation of the model
