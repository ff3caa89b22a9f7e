"""The aespa pass: finds attention (scaled_dot_product_attention or matmul-softmax-matmul, with RoPE and grouped
heads in between), beats the gptq pass on the attention block's output, falls back with typed errors / notes."""
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qgraph
from qgraph.context import PassContext
from qgraph.errors import PipelineError
from qgraph.ir.trace import trace
from qgraph.pass_manager import PassManager
from qgraph.passes.aespa import find_attentions
from qgraph.passes.quantize_weights import QWEIGHT_KEY
from qgraph.quant.qtensor import UniformWeight

D, H, KV, DH, L = 64, 4, 2, 16, 24


class Block(nn.Module):
    """Llama-style attention: q/k/v Linears, RoPE (rotate-half), grouped key/value heads, causal attention."""

    def __init__(self, sdpa: bool = True, value_scale: float = 1.0):
        super().__init__()
        self.sdpa, self.value_scale = sdpa, value_scale
        self.q = nn.Linear(D, H * DH, bias=False)
        self.k = nn.Linear(D, KV * DH, bias=False)
        self.v = nn.Linear(D, KV * DH, bias=False)
        self.o = nn.Linear(H * DH, D, bias=False)
        for lin in (self.q, self.k):
            nn.init.normal_(lin.weight, std=3.0 / D**0.5)
        self.register_buffer("mask", torch.ones(L, L, dtype=torch.bool).tril())

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, DH).transpose(1, 2)
        k = self.k(x).view(b, n, KV, DH).transpose(1, 2)
        v = self.v(x).view(b, n, KV, DH).transpose(1, 2) * self.value_scale
        ang = torch.arange(n, dtype=torch.float32)[:, None] / 100.0 ** (torch.arange(0, DH, 2) / DH)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

        def rot(t):
            return torch.cat([-t[..., DH // 2:], t[..., :DH // 2]], -1)

        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-1, -2) / math.sqrt(DH)).masked_fill(~self.mask[:n, :n], float("-inf"))
            o = torch.softmax(s, dim=-1) @ v
        return self.o(o.transpose(1, 2).reshape(b, n, -1))


def _data(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(D) + 1.5 * torch.randn(D, D, generator=g) / D**0.5
    return [(torch.randn(2, L, D, generator=g) @ mix,) for _ in range(n)]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Block(**kw).eval()


ANNOTATE = "annotate{bits=3,group_size=16,act_bits=0}"


@pytest.mark.parametrize("frontend,sdpa", [("export", True), ("export", False), ("fx", True)])
def test_finds_q_k_v_behind_rope_and_grouped_heads(frontend, sdpa):
    model = _model(sdpa=sdpa)
    graph = trace(model, _data(0)[0], frontend=frontend)
    atts = find_attentions(graph)
    assert len(atts) == 1
    names = [graph.qualname(n) for n in (atts[0].q, atts[0].k, atts[0].v)]
    assert names == ["q", "k", "v"]
    assert atts[0].kind == ("sdpa" if sdpa else "softmax")


def _block_errors(seed, sdpa=True, opts=("gptq", "aespa")):
    """Relative MSE of the block output on held-out inputs, per pipeline (one trace, a copy per pipeline); the
    last pipeline's report."""
    model, calib = _model(seed, sdpa=sdpa), _data(seed, n=10)
    x = _data(seed + 100, n=1)[0][0]
    ref = model(x).detach()
    graph = trace(model, calib[0], frontend="export")
    errs, report = {}, None
    for opt in opts:
        ctx = PassContext(config={"progress": False}, calibration=calib)
        res = PassManager(f"{ANNOTATE},{opt},quantize-weights,insert-fq").run(graph.copy(), ctx)
        errs[opt] = float(((res.graph(x).detach() - ref) ** 2).mean() / (ref**2).mean())
        report = {**ctx.report, "stats": res.stats}
    return errs, report


def test_aespa_beats_gptq_on_the_block_output():
    """Measured over seeds 0-4 (10 calibration batches of 2x24 tokens, 3-bit g16, held-out inputs, default
    options): aespa / gptq = 0.96, 0.88, 0.97, 0.98, 0.96. Seeds 0-2: each below 1, median below 0.98."""
    ratios = []
    for seed in range(3):
        errs, report = _block_errors(seed)
        ratios.append(errs["aespa"] / errs["gptq"])
    assert max(ratios) < 1.0 and statistics.median(ratios) < 0.98, ratios
    assert report["stats"]["aespa"] == {"attentions": 1, "aespa": 3, "gptq": 1, "rtn": 0, "mode": "sequential"}
    rows = {r["node"]: r for r in report["layers"]}
    assert {rows[n]["method"] for n in "qkv"} == {"aespa"} and rows["o"]["method"] == "gptq"
    for n in "qkv":
        assert rows[n]["aespa_loss"] <= rows[n]["aespa_loss_gptq"] * (1 + 1e-6)


def test_matmul_softmax_attention_takes_aespa_too():
    errs, report = _block_errors(1, sdpa=False, opts=("aespa",))
    assert report["stats"]["aespa"]["aespa"] == 3 and errs["aespa"] < 1.0


def test_results_have_the_quantize_weights_layout():
    model, calib = _model(), _data(0)
    graph = trace(model, calib[0], frontend="export")
    ctx = PassContext(config={"progress": False}, calibration=calib)
    out = PassManager(f"{ANNOTATE},aespa{{iters=20}}").run(graph, ctx).graph
    kinds = [out.meta(n).get(QWEIGHT_KEY) for n in out.nodes()]
    kinds = [q for q in kinds if q is not None]
    assert len(kinds) == 4
    for qw in kinds:
        assert isinstance(qw, UniformWeight) and qw.scale.shape == (qw.codes.shape[0], D // 16)


def test_value_path_it_cannot_explain_falls_back_to_gptq_with_a_note():
    model, calib = _model(value_scale=2.0), _data(0)  # the value input is 2 x the Linear's output
    q = qgraph.quantize(model, calib[0], calib=calib, pipeline=f"{ANNOTATE},aespa{{iters=20}}", progress=False,
                        frontend="export")
    assert q.report["stats"]["aespa"]["aespa"] == 0 and q.report["stats"]["aespa"]["gptq"] == 4
    assert any("value input" in n for n in q.report["aespa"]["notes"])


def test_graph_without_attention_is_a_typed_error():
    mlp = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    calib = [(torch.randn(4, D),)]
    with pytest.raises(PipelineError, match="no attention.*gptq"):
        qgraph.quantize(mlp, calib[0], calib=calib, pipeline=f"{ANNOTATE},aespa", progress=False)


def test_batches_that_cannot_stack_use_float_model_hessians():
    model = _model()
    g = torch.Generator().manual_seed(5)
    calib = [(torch.randn(2, n, D, generator=g),) for n in (24, 16, 20)]  # sequence lengths differ
    graph = trace(model, calib[0], frontend="export",
                  dynamic_shapes=({0: torch.export.Dim("b", max=8), 1: torch.export.Dim("n", max=L)},))
    ctx = PassContext(config={"progress": False}, calibration=calib)
    res = PassManager(f"{ANNOTATE},aespa{{iters=20}}").run(graph, ctx)
    assert res.stats["aespa"]["aespa"] == 3 and res.stats["aespa"]["mode"] == "float-inputs"
    x = calib[0][0]
    q = PassManager("insert-fq").run(res.graph, ctx).graph
    with torch.no_grad():
        assert float(((q(x) - model(x)) ** 2).mean() / (model(x) ** 2).mean()) < 1.0
