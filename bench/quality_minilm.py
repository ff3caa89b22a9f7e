"""Sentence-embedding fidelity of quantized all-MiniLM-L6-v2 on real Shakespeare lines.

For each method: mean cosine similarity of the sentence embeddings to fp32, and the wall time of
quantization. Calibration and evaluation sentences come from disjoint plays.

    python bench/quality_minilm.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from _records import Records, markdown_table

import qgraph
from qgraph.data.text import calibration_plays, evaluation_plays, sentences
from qgraph.models.minilm import dynamic_shapes, encode, load_minilm

CANON = "fold-bn,dce,fuse-activation"
METHODS = {
    "W8A8": f"{CANON},annotate{{bits=8,act_bits=8}},calibrate,quantize-weights,insert-fq",
    "W8A8 SmoothQuant": f"{CANON},annotate{{bits=8,act_bits=8}},smooth-quant,calibrate,quantize-weights,insert-fq",
    "W8A8 SmoothQuant a0.75": f"{CANON},annotate{{bits=8,act_bits=8}},smooth-quant{{alpha=0.75}},calibrate,"
                              "quantize-weights,insert-fq",
    "W8A8 dynamic per-tensor": f"{CANON},annotate{{bits=8,act_bits=8,act_dynamic=tensor}},quantize-weights,insert-fq",
    "W8A8 dynamic per-token": f"{CANON},annotate{{bits=8,act_bits=8,act_dynamic=token}},quantize-weights,insert-fq",
    "W8A8 dynamic per-token SmoothQuant": f"{CANON},annotate{{bits=8,act_bits=8,act_dynamic=token}},smooth-quant,"
                                          "quantize-weights,insert-fq",
    "W8A8 dynamic per-token SmoothQuant GPTQ": f"{CANON},annotate{{bits=8,act_bits=8,act_dynamic=token}},smooth-quant,"
                                               "calibrate,gptq,quantize-weights,insert-fq",
    "W8A8 dynamic per-token asym": f"{CANON},annotate{{bits=8,act_bits=8,act_dynamic=token,act_symmetric=false}},"
                                   "quantize-weights,insert-fq",
    "W8A8 dynamic per-token asym SmoothQuant": f"{CANON},annotate{{bits=8,act_bits=8,act_dynamic=token,"
                                               "act_symmetric=false},smooth-quant,quantize-weights,insert-fq",
    "W8A8 dynamic per-token asym SmoothQuant GPTQ": f"{CANON},annotate{{bits=8,act_bits=8,act_dynamic=token,"
                                                    "act_symmetric=false},smooth-quant,calibrate,gptq,"
                                                    "quantize-weights,insert-fq",
    "W4-g128": f"{CANON},annotate{{bits=4,group_size=128,act_bits=0}},quantize-weights,insert-fq",
    "RTN-3-g128": f"{CANON},annotate{{bits=3,group_size=128,act_bits=0}},quantize-weights,insert-fq",
    "BCQ-3-greedy": f"{CANON},annotate{{scheme=bcq,bits=3,group_size=128,method=greedy}},quantize-weights,insert-fq",
    "BCQ-3-alternating": f"{CANON},annotate{{scheme=bcq,bits=3,group_size=128,method=alternating}},quantize-weights,insert-fq",
    "BCQ-3-weighted": f"{CANON},annotate{{scheme=bcq,bits=3,group_size=128,method=weighted}},quantize-weights,insert-fq",
    "RTN-2-g128": f"{CANON},annotate{{bits=2,group_size=128,act_bits=0}},quantize-weights,insert-fq",
    "BCQ-2-greedy": f"{CANON},annotate{{scheme=bcq,bits=2,group_size=128,method=greedy}},quantize-weights,insert-fq",
    "BCQ-2-alternating": f"{CANON},annotate{{scheme=bcq,bits=2,group_size=128,method=alternating}},quantize-weights,insert-fq",
    "BCQ-2-weighted": f"{CANON},annotate{{scheme=bcq,bits=2,group_size=128,method=weighted}},quantize-weights,insert-fq",
}
QUICK = ("W8A8", "BCQ-3-weighted")
#: static / SmoothQuant / dynamic rows of issue 22's activation-spec table (``--methods`` takes the names)
ACTIVATION_SPECS = ("W8A8", "W8A8 SmoothQuant", "W8A8 SmoothQuant a0.75", "W8A8 dynamic per-tensor",
                    "W8A8 dynamic per-token", "W8A8 dynamic per-token SmoothQuant",
                    "W8A8 dynamic per-token SmoothQuant GPTQ", "W8A8 dynamic per-token asym",
                    "W8A8 dynamic per-token asym SmoothQuant", "W8A8 dynamic per-token asym SmoothQuant GPTQ")


def ort_side_by_side(model, tok, eval_texts, calib, ref, records, rows, tmp):
    """onnxruntime's quantize_static (QDQ int8) vs qgraph W8A8 exported as QDQ, both run by stock onnxruntime."""
    import warnings

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    import qgraph.ir.onnx

    float_path, ort_path, qg_path = tmp / "minilm.onnx", tmp / "minilm-ort-qdq.onnx", tmp / "minilm-qgraph-qdq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, calib[0], str(float_path), dynamo=True, dynamic_shapes=dynamic_shapes(),
                          input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input_ids": a.numpy(), "attention_mask": b.numpy()} for a, b in calib])

        def get_next(self):
            return next(self.it, None)

    start = time.perf_counter()
    quantize_static(str(float_path), str(ort_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    ort_seconds = time.perf_counter() - start
    ort_mm_path = tmp / "minilm-ort-qdq-matmul.onnx"
    start = time.perf_counter()
    quantize_static(str(float_path), str(ort_mm_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul", "Gemm"])
    ort_mm_seconds = time.perf_counter() - start
    start = time.perf_counter()
    q = qgraph.quantize(str(float_path), calib=calib, progress=False,
                        pipeline="annotate{bits=8,act_bits=8},calibrate,quantize-weights,insert-fq")
    q.graph.weights_to_qdq()
    q.graph.save(qg_path)
    qg_seconds = time.perf_counter() - start
    enc = encode(eval_texts, tok, max_length=64)
    feed = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
    one = {k: v[:1] for k, v in feed.items()}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    for name, path, seconds in (("ORT fp32", float_path, 0.0), ("ORT quantize_static QDQ", ort_path, ort_seconds),
                                ("ORT quantize_static QDQ (MatMul/Gemm only)", ort_mm_path, ort_mm_seconds),
                                ("qgraph W8A8 QDQ in ORT", qg_path, qg_seconds)):
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        out = torch.from_numpy(sess.run(None, feed)[0])
        cos = F.cosine_similarity(out, ref, dim=-1)
        for _ in range(3):
            sess.run(None, one)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            sess.run(None, one)
            times.append(time.perf_counter() - t)
        ms = sorted(times)[len(times) // 2] * 1e3
        rows.append([name, float(cos.mean()), float(cos.min()), round(seconds, 2), round(ms, 2),
                     round(path.stat().st_size / 1e6, 1)])
        records.add(f"minilm {name}", "cosine", float(cos.mean()))
        records.add(f"minilm {name} b1", "median_us", ms * 1e3)
        records.add(f"minilm {name}", "bytes", path.stat().st_size + sum(
            f.stat().st_size for f in path.parent.glob(path.name + "*.data")))


def embed(model, tok, texts, batch=32):
    outs = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = encode(texts[i:i + batch], tok, max_length=64)
            outs.append(model(enc["input_ids"], enc["attention_mask"]))
    return torch.cat(outs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="W8A8 and BCQ-3 weighted only, fewer sentences")
    ap.add_argument("--json", metavar="PATH", help="write records (case, metric, value) as JSON")
    ap.add_argument("--methods", nargs="*", help=f"subset of: {', '.join(METHODS)}")
    ap.add_argument("--activation-specs", action="store_true",
                    help="the W8A8 static / SmoothQuant / dynamic rows only (and the chosen SmoothQuant alpha)")
    ap.add_argument("--no-ort", action="store_true", help="skip the onnxruntime quantize_static side by side")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    n_eval, n_calib = (64, 32) if args.quick else (256, 64)
    model, tok = load_minilm()
    eval_texts = sentences(evaluation_plays(), n_eval, seed=1)
    calib_texts = sentences(calibration_plays(), n_calib, seed=2)
    calib = [encode(calib_texts[i:i + 16], tok, max_length=64) for i in range(0, len(calib_texts), 16)]
    calib = [(b["input_ids"], b["attention_mask"]) for b in calib]
    ref = embed(model, tok, eval_texts)
    example = calib[0]
    records, rows = Records(), []
    names = args.methods or (ACTIVATION_SPECS if args.activation_specs else QUICK if args.quick else list(METHODS))
    for name in names:
        start = time.perf_counter()
        q = qgraph.quantize(model, example, target="x86-avx2", calib=calib, pipeline=METHODS[name],
                            dynamic_shapes=dynamic_shapes(), progress=False)
        seconds = time.perf_counter() - start
        cos = F.cosine_similarity(embed(q, tok, eval_texts), ref, dim=-1)
        alpha = (q.report.get("smooth-quant-alpha") or {}).get("chosen")
        rows.append([name + (f" (alpha={alpha} chosen)" if alpha is not None else ""), float(cos.mean()),
                     float(cos.min()), round(seconds, 2)])
        records.add(f"minilm {name}", "cosine", float(cos.mean()))
        records.add(f"minilm {name}", "seconds", seconds)
        print(f"{name:<20} cos={cos.mean():.5f} min={cos.min():.5f} {seconds:.1f}s", file=sys.stderr)
    if not args.no_ort:
        import tempfile

        ort_rows: list = []
        ort_side_by_side(model, tok, eval_texts, calib, ref, records, ort_rows, Path(tempfile.mkdtemp()))
    print(f"\nall-MiniLM-L6-v2, {n_eval} evaluation sentences (calibration: {n_calib} from other plays); "
          f"embeddings of Gather layers int8 per row in every row\n")
    print(markdown_table(["method", "mean cosine to fp32", "min cosine", "quantize s"], rows))
    if not args.no_ort:
        print("\nSide by side in onnxruntime (same sentences; latency: batch 1, seq ≤ 64, "
              f"{torch.get_num_threads()} threads; file MB excludes external data)\n")
        print(markdown_table(["model", "mean cosine to fp32", "min cosine", "quantize s", "ORT ms (b1)", "file MB"],
                             ort_rows))
    records.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
