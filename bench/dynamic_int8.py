"""Dynamic int8 Linear kernels on MiniLM's shapes: qgraph's DynamicInt8Linear (oneDNN / torch._int_mm paths,
symmetric and asymmetric per-token activations) against torch fp32 ``F.linear`` and torch.ao's dynamic int8
Linear (fbgemm, per-tensor activations), interleaved in one process, medians; each row's error against fp32.

    python bench/dynamic_int8.py [--quick] [--rows 64,512] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from _records import Records, markdown_table

from qgraph.kernels.dynamic_int8 import DynamicInt8Linear
from qgraph.quant.qspec import QSpec
from qgraph.quant.uniform import quantize_weight

SHAPES = ((384, 384), (1536, 384), (384, 1536))  # (N, K): attention projections, FFN up, FFN down


def _median_us(fn, x, rounds: list[float]) -> None:
    t = time.perf_counter()
    fn(x)
    rounds.append((time.perf_counter() - t) * 1e6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="rows 64 and 512, fewer rounds")
    ap.add_argument("--rows", default="64,128,256,512", help="input rows (tokens x batch)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows = (64, 512) if args.quick else tuple(int(r) for r in args.rows.split(","))
    rounds = args.rounds or (15 if args.quick else 31)
    rec, table = Records(), []
    wspec = QSpec.uniform(8, granularity="channel")
    sym = QSpec.uniform(8, granularity="token", dynamic=True)
    asym = sym.replace(symmetric=False)
    load0 = os.getloadavg()[0]
    for n, k in SHAPES:
        g = torch.Generator().manual_seed(n + k)
        w, b = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
        codes, scale, _ = quantize_weight(w, wspec)
        lin = torch.nn.Linear(k, n)
        lin.weight.data, lin.bias.data = w.clone(), b.clone()
        ao = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        fns = {"fp32 F.linear": lambda x, w=w, b=b: F.linear(x, w, b), "torch.ao dynamic int8": ao,
               "qgraph per-token onednn": DynamicInt8Linear(codes, scale, b, sym, impl="onednn"),
               "qgraph per-token int_mm": DynamicInt8Linear(codes, scale, b, sym, impl="int_mm"),
               "qgraph per-token asym int_mm": DynamicInt8Linear(codes, scale, b, asym, impl="int_mm")}
        for m in rows:
            x = torch.randn(m, k, generator=g) * 2
            with torch.no_grad():
                ref = F.linear(x, w, b)
                times: dict[str, list[float]] = {name: [] for name in fns}
                for fn in fns.values():
                    fn(x)
                for _ in range(rounds):
                    for name, fn in fns.items():
                        _median_us(fn, x, times[name])
                med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
                for name, fn in fns.items():
                    err = float((fn(x) - ref).abs().max() / ref.abs().max())
                    case = f"{n}x{k} m{m} {name}"
                    rec.add(case, "median_us", med[name])
                    rec.add(case, "speedup_vs_fp32", med["fp32 F.linear"] / med[name])
                    rec.add(case, "max_rel_err", err)
                    table.append([f"{n}x{k}", m, name, round(med[name], 1),
                                  round(med["fp32 F.linear"] / med[name], 2), f"{err:.1e}"])
            print(f"{n}x{k} m{m} done", file=sys.stderr)
    print(f"\n{torch.get_num_threads()} threads, {rounds} interleaved rounds, medians; load average "
          f"{load0:.1f} -> {os.getloadavg()[0]:.1f} (ratios are what holds under load)\n")
    print(markdown_table(["N x K", "rows", "kernel", "median us", "x fp32", "rel err vs fp32"], table))
    rec.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
