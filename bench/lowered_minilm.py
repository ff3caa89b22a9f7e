"""all-MiniLM-L6-v2 with BCQ lowered to BiQGEMM for x86-avx2: parity with the simulation, latency and bytes
against fp32, and the cost model's per-layer predictions against measured host latency.

    python bench/lowered_minilm.py [--quick] [--json out.json] [--bits 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _records import Records, markdown_table  # noqa: E402

import qgraph  # noqa: E402
from qgraph.data.text import evaluation_plays, sentences  # noqa: E402
from qgraph.models.minilm import dynamic_shapes, encode, load_minilm  # noqa: E402
from qgraph.report import latency_rows, spearman  # noqa: E402


def median_ms(fn, args, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            fn(*args)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, tok = load_minilm()
    texts = sentences(evaluation_plays(), 16 if args.quick else 64, seed=1)
    enc = encode(texts, tok, max_length=64)
    x = (enc["input_ids"], enc["attention_mask"])
    pipe = qgraph.api.lowering_pipeline(f"scheme=bcq,bits={args.bits},group_size={args.group_size}")
    start = time.perf_counter()
    q = qgraph.quantize(model, x, target="x86-avx2", pipeline=pipe, dynamic_shapes=dynamic_shapes(), progress=False)
    seconds = time.perf_counter() - start
    sim = q.artifacts["simulation"]
    with torch.no_grad():
        ref, got, simulated = model(*x), q(*x), sim(*x)
    rel = float((got - simulated).abs().max() / simulated.abs().max())
    cos = float(F.cosine_similarity(got, ref, dim=-1).mean())
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    stored = sum(t.numel() * t.element_size() for t in list(q.gm.parameters()) + list(q.gm.buffers()))
    rec, rows = Records(), []
    case = f"minilm bcq{args.bits} g{args.group_size}"
    rec.add(case, "max_rel_err", rel)
    rec.add(case, "cosine", cos)
    rec.add(case, "bytes", stored)
    rec.add("minilm fp32", "bytes", fp32_bytes)
    rec.add(case, "seconds", seconds)
    repeats = 5 if args.quick else 20
    for b in (1, 8):
        xb = (x[0][:b], x[1][:b])
        t_fp32, t_low = median_ms(model, xb, repeats), median_ms(q, xb, repeats)
        rows.append([f"batch {b}, seq {x[0].shape[1]}", round(t_fp32, 2), round(t_low, 2), round(t_fp32 / t_low, 2)])
        rec.add(f"{case} b{b}", "median_us", t_low * 1e3)
        rec.add(f"minilm fp32 b{b}", "median_us", t_fp32 * 1e3)
        rec.add(f"{case} b{b}", "speedup_vs_fp32", t_fp32 / t_low)
    lat = latency_rows(q, (x[0][:1], x[1][:1]))
    gemm = [r for r in lat if "biqgemm" in r[0] or r[0].startswith("linear")]
    rho_all = spearman([r[1] for r in lat], [r[2] for r in lat])
    rho_gemm = spearman([r[1] for r in gemm], [r[2] for r in gemm])
    rec.add("minilm cost-model rank correlation (all nodes)", "spearman", rho_all)
    print(f"all-MiniLM-L6-v2, BCQ-{args.bits} g{args.group_size} lowered to BiQGEMM (x86-avx2), "
          f"{torch.get_num_threads()} threads\n")
    print(f"- lowered vs simulation: max relative error {rel:.2e}; mean cosine to fp32 {cos:.4f}")
    print(f"- stored bytes: {stored / 1e6:.2f} MB vs {fp32_bytes / 1e6:.2f} MB fp32 ({100 * stored / fp32_bytes:.1f}%)")
    print(f"- quantize + lower + verify: {seconds:.1f} s")
    print(f"- cost model vs measured per-node latency (batch 1): Spearman {rho_all:.3f} over {len(lat)} nodes, "
          f"{rho_gemm:.3f} over the {len(gemm)} Gemm nodes\n")
    print(markdown_table(["input", "fp32 ms", "BiQGEMM ms", "speedup"], rows))
    rec.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
