"""SmolLM2-135M end to end (slow): uniform W4 round-to-nearest computed on the traced graph, applied to the HF
modules, exact-mode greedy text equal to the fake-quant simulation, and the artifact reloading into the same
generating model."""
from __future__ import annotations

import copy

import torch

from tests.conftest import SMOLLM2_MARKS

pytestmark = SMOLLM2_MARKS


def test_smollm2_w4_generates_like_its_simulation_and_reloads(tmp_path):
    from qgraph.llm import LMRecipe, apply_weights, quantize_lm, simulate_weights
    from qgraph.llm.artifact import load_lm, save_lm
    from qgraph.models.smollm2 import load_smollm2

    lm, tok = load_smollm2()
    lw = quantize_lm(lm, LMRecipe(scheme="uniform", bits=4, group_size=192, optimizer="rtn", head_bits=4))
    assert len(lw.weights) == 211 and lw.tied == {"model.embed_tokens": "lm_head"}
    q = apply_weights(copy.deepcopy(lm), lw, mode="exact")
    sim = simulate_weights(lm, lw)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = q.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        b = sim.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(a, b)
    art = save_lm(tmp_path / "w4", lm, lw, tok, source="smollm2")
    q2, tok2, manifest = load_lm(art, mode="exact")
    b_ = manifest["bytes"]
    assert 4.1 < b_["decoder_linears"] * 8 / b_["decoder_linear_weights"] < 4.3  # 4 bits + fp32 scale, zp / 192
    with torch.no_grad():
        c = q2.generate(tok2("The capital of France is", return_tensors="pt").input_ids, max_new_tokens=32,
                        min_new_tokens=32, do_sample=False)
    assert torch.equal(a, c)
