"""Quantize all-MiniLM-L6-v2 to 4-bit BCQ, lower it to the BiQGEMM kernel and compare sentence embeddings.

    python examples/minilm_embeddings.py [--bits 4] [--out qgraph-out/example-minilm]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import qgraph
from qgraph.artifact import save_artifact
from qgraph.data.text import calibration_plays, evaluation_plays, sentences
from qgraph.models.minilm import dynamic_shapes, encode, load_minilm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default="qgraph-out/example-minilm")
    args = ap.parse_args()

    model, tok = load_minilm()
    calib_text = sentences(calibration_plays(), 16, seed=0)
    example = encode(calib_text, tok, max_length=64)
    pipeline = qgraph.api.lowering_pipeline(f"scheme=bcq,bits={args.bits},group_size={args.group_size}")
    start = time.perf_counter()
    q = qgraph.quantize(model, (example["input_ids"], example["attention_mask"]), target="x86-avx2",
                        pipeline=pipeline, dynamic_shapes=dynamic_shapes())
    print(f"quantized and lowered in {time.perf_counter() - start:.1f} s")

    texts = sentences(evaluation_plays(), 64, seed=1)
    batch = encode(texts, tok, max_length=64)
    with torch.no_grad():
        ref = model(batch["input_ids"], batch["attention_mask"])
        got = q(batch["input_ids"], batch["attention_mask"])
    cos = F.cosine_similarity(got, ref, dim=-1)
    print(f"BCQ-{args.bits} embeddings vs fp32 on {len(texts)} Shakespeare lines: mean cosine {cos.mean():.4f}, "
          f"min {cos.min():.4f}")
    fp32 = sum(r["fp32_bytes"] for r in q.report["layers"])
    qb = sum(r["bytes"] for r in q.report["layers"])
    print(f"weights: {qb / 1e6:.1f} MB vs {fp32 / 1e6:.1f} MB fp32; lowering verified to "
          f"{q.report['verify']['output_rel_err']:.1e} of the simulation")
    print("saved to", save_artifact(q, args.out, source="minilm"))


if __name__ == "__main__":
    main()
