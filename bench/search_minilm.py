"""Mixed-precision strategy search on all-MiniLM-L6-v2 (HAGO-style, issue 11).

1. x86-avx2, ≤ 3.0 average weight bits and ≤ the bytes of uniform BCQ-3 g128: an NSGA-II search of
   ``--trials`` trials on ``--workers`` processes, timed end to end (model load included). The chosen
   strategy and the uniform baselines are then re-scored on a larger held-out set the search never saw.
2. The same size limit (``--cross-avg-bits``, default 12) searched for x86-avx2 and for npu-int8: two
   different strategies, each checked against its own target.

    python bench/search_minilm.py [--quick] [--trials 50] [--workers 2] [--json out.json] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _records import Records, markdown_table

from qgraph.search.objectives import Constraints, EvalConfig, Workbench, effective_bits, summarize
from qgraph.search.report import write_search_report
from qgraph.search.run import SearchOptions, run_search
from qgraph.search.space import build_space


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="12 trials, 8 Hutchinson iterations, no cross-target part")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--driver", default="nsga", choices=["greedy", "ilp", "nsga"])
    ap.add_argument("--hutchinson-iters", type=int, default=30)
    ap.add_argument("--sensitivity", default="hessian", choices=["hessian", "proxy"])
    ap.add_argument("--no-cross", action="store_true", help="skip the x86-avx2 vs npu-int8 part")
    ap.add_argument("--cross-avg-bits", type=float, default=12.0)
    ap.add_argument("--cross-trials", type=int, default=16)
    ap.add_argument("--holdout", type=int, default=256, help="held-out sentences for the final scores")
    ap.add_argument("--cache", help="trial cache file (default: a fresh temporary file, so the time is honest)")
    ap.add_argument("--out", default="qgraph-out/bench-search-minilm")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.hutchinson_iters = min(args.trials, 12), 8
    torch.set_num_threads(1)
    records = Records()
    tmp = tempfile.mkdtemp(prefix="qgraph-search-")
    cache = args.cache or str(Path(tmp) / "trials.jsonl")

    # --- 1. headline: ≤ 3 avg bits on x86-avx2 -------------------------------------------------------------
    t0 = time.perf_counter()
    bench = Workbench(EvalConfig("minilm", "x86-avx2"))
    space = build_space(bench.graph, bench.target)
    bcq3_bytes = space.weight_bytes(space.uniform("bcq3-g128"))
    opts = SearchOptions(model="minilm", target="x86-avx2", driver=args.driver, trials=args.trials, seed=0,
                         constraints=Constraints(max_bytes=bcq3_bytes, avg_bits=3.0), cache=cache,
                         workers=args.workers, hutchinson_max_iter=args.hutchinson_iters,
                         sensitivity=args.sensitivity)
    result = run_search(opts, bench=bench, progress=log)
    wall = time.perf_counter() - t0
    report = write_search_report(result, Path(args.out) / f"x86-avx2-3bit-{args.sensitivity}")
    log(f"search done in {wall:.0f}s; report {report}")
    chosen = result.chosen
    tag = f"{args.driver} {args.sensitivity}"
    records.add(f"minilm search x86-avx2 avg3 {tag} {args.trials} trials", "seconds", wall)

    # held-out re-scoring
    hold = Workbench(EvalConfig("minilm", "x86-avx2", n_eval=args.holdout, eval_seed=7), source=bench.source,
                     graph=bench.graph)
    rows = []
    for name, t in [("searched", chosen)] + [(f"uniform {k}", v) for k, v in result.baselines.items()]:
        if t is None:
            continue
        held = hold.evaluate(t.strategy)["metric"]
        rows.append([name, t.metric, held, t.analytic.avg_bits, round(effective_bits(space, t.assignment), 3),
                     round(t.analytic.bytes / 1e6, 3), "yes" if t.feasible else "no"])
        records.add(f"minilm {name} x86-avx2 avg3 {tag}", "cosine", held, search_cosine=t.metric, avg_bits=t.analytic.avg_bits,
                    bytes=t.analytic.bytes)
    print(f"\n## all-MiniLM-L6-v2, x86-avx2, ≤ 3.0 avg weight bits and ≤ {bcq3_bytes / 1e6:.3f} MB "
          f"({args.driver}, {args.sensitivity} sensitivity, {len(result.trials)} trials, {result.evaluated} evaluated, {args.workers} workers, "
          f"{wall:.0f} s wall incl. model load)\n")
    print(markdown_table(["strategy", "cosine (search set, 32)", f"cosine (held-out, {args.holdout})", "avg bits",
                          "stored bits", "MB", "meets limits"], rows))
    if chosen is not None:
        print(f"\nsearched choices: {summarize(space, chosen.assignment)}")
        print(f"timings: {result.summary()['timings']}")

    # --- 2. cross-target: same size limit on x86-avx2 and npu-int8 --------------------------------------------
    if not (args.quick or args.no_cross):
        cross = []
        for target in ("x86-avx2", "npu-int8"):
            b = Workbench(EvalConfig("minilm", target), source=bench.source, graph=bench.graph)
            o = SearchOptions(model="minilm", target=target, driver=args.driver, trials=args.cross_trials, seed=0,
                              constraints=Constraints(avg_bits=args.cross_avg_bits), cache=cache,
                              workers=args.workers, hutchinson_max_iter=args.hutchinson_iters, baselines=(),
                              sensitivity=args.sensitivity)
            t1 = time.perf_counter()
            r = run_search(o, bench=b, progress=log)
            write_search_report(r, Path(args.out) / f"{target}-{args.cross_avg_bits:g}bit")
            c = r.chosen
            problems = r.space.violations(c.assignment, b.target)
            cross.append([target, c.metric, round(c.analytic.avg_bits, 2), round(c.analytic.bytes / 1e6, 3),
                          ", ".join(f"{k}×{v}" for k, v in summarize(r.space, c.assignment).items()),
                          "yes" if not problems else f"NO: {problems[0]}", round(time.perf_counter() - t1)])
            records.add(f"minilm search {target} avg{args.cross_avg_bits:g}", "cosine", c.metric,
                        avg_bits=c.analytic.avg_bits, bytes=c.analytic.bytes)
        print(f"\n## same limit (≤ {args.cross_avg_bits:g} avg weight bits), two targets\n")
        print(markdown_table(["target", "cosine", "avg bits", "MB", "choices", "target accepts", "s"], cross))
    records.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
