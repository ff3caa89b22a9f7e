"""Mixed-precision strategy search (HAGO-style, issue 11) on all-MiniLM-L6-v2 and SmolLM2-135M.

1. x86-avx2, ≤ 3.0 average weight bits and ≤ the bytes of uniform BCQ-3: an NSGA-II search of ``--trials``
   trials on ``--workers`` processes, timed end to end (model load included, load averages recorded).
   The chosen strategy and the uniform baselines (BCQ-3 and int3 at the model's group size, plus 4- and
   8-bit references) are then re-scored on held-out text no search step read (`Workbench.holdout`: the
   last evaluation play; trials are scored on the other evaluation plays, sensitivities on other text).
   Before the driver, the search measures anchors outside the trial budget (each choice label as a
   uniform strategy, then on a quarter of the layers over the best uniform one that meets the limits),
   so "evaluated" counts trials + anchors.
2. MiniLM only: the same size limit (``--cross-avg-bits``, default 12) searched for x86-avx2 and for
   npu-int8: two different strategies, each checked against its own target and the limit.

Per model (``--model``):
- ``minilm``: cosine of the sentence embeddings to fp32; groups of 128; 50 trials, 32 search sentences,
  256 held-out sentences, up to 30 Hutchinson iterations.
- ``smollm2``: perplexity of 128-token windows; groups of 64 (128 does not divide the 576-wide rows);
  the tied LM head stays fp32 as in bench/quality_llm.py (so the average bits are over the 210 linears of
  the blocks); weight-only choices (no int8 activations) and BCQ q = 2..4, to fit 2 cores: 16 trials on 8
  search windows, 32 held-out windows, 8 Hutchinson iterations.

    python bench/search.py --model minilm|smollm2 [--quick] [--trials N] [--workers 2] [--json out.json]
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _records import Records, markdown_table

from qgraph.search.objectives import Constraints, Workbench, effective_bits, summarize
from qgraph.search.report import write_search_report
from qgraph.search.run import SearchOptions, run_search
from qgraph.search.space import SpaceOptions, build_space

PRESETS = {
    "minilm": {"group": 128, "trials": 50, "n_eval": 32, "holdout": 256, "hutchinson": 30, "keep_float": (),
               "bcq_bits": (1, 2, 3, 4), "act": True, "cross": True, "extra_baselines": ("bcq4", "w4", "w8-ch")},
    "smollm2": {"group": 64, "trials": 16, "n_eval": 8, "holdout": 32, "hutchinson": 8, "keep_float": ("lm.lm_head",),
                "bcq_bits": (2, 3, 4), "act": False, "cross": False, "extra_baselines": ("w4",)},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(PRESETS), default="minilm")
    ap.add_argument("--quick", action="store_true", help="12 trials (MiniLM) / 6 (SmolLM2), fewer Hutchinson "
                    "iterations and held-out items, no cross-target part")
    ap.add_argument("--trials", type=int)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--driver", default="nsga", choices=["greedy", "ilp", "nsga"])
    ap.add_argument("--hutchinson-iters", type=int)
    ap.add_argument("--sensitivity", default="hessian", choices=["hessian", "proxy"])
    ap.add_argument("--eval-size", type=int, help="search sentences / windows per trial")
    ap.add_argument("--holdout", type=int, help="held-out sentences / windows for the final scores")
    ap.add_argument("--no-cross", action="store_true", help="skip the x86-avx2 vs npu-int8 part")
    ap.add_argument("--cross-avg-bits", type=float, default=12.0)
    ap.add_argument("--cross-trials", type=int, default=16)
    ap.add_argument("--cache", help="trial cache file (default: a fresh temporary file, so the time is honest)")
    ap.add_argument("--out", help="report folder (default qgraph-out/bench-search-<model>)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    p = PRESETS[args.model]
    trials = args.trials or (min(12 if args.model == "minilm" else 6, p["trials"]) if args.quick else p["trials"])
    iters = args.hutchinson_iters or (min(8, p["hutchinson"]) if args.quick else p["hutchinson"])
    n_eval = args.eval_size or p["n_eval"]
    n_hold = args.holdout or (p["holdout"] // 4 if args.quick else p["holdout"])
    cross = p["cross"] and not (args.quick or args.no_cross)
    out = Path(args.out or f"qgraph-out/bench-search-{args.model}")
    tmp = None if args.cache else tempfile.mkdtemp(prefix="qgraph-search-")
    cache = args.cache or str(Path(tmp) / "trials.jsonl")
    try:
        return _run(args, p, trials, iters, n_eval, n_hold, cross, out, cache)
    finally:
        if tmp is not None:  # its shared quantized weights take ~0.7 GB for SmolLM2
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args, p, trials, iters, n_eval, n_hold, cross, out, cache) -> int:
    g = p["group"]
    torch.set_num_threads(1)
    records = Records()
    space_opts = SpaceOptions(uniform_bits=(8, 4, 3), uniform_group_sizes=(g,), bcq_bits=p["bcq_bits"],
                              bcq_group_sizes=(g,), act=p["act"], keep_float=p["keep_float"])
    three = (f"bcq3-g{g}", f"w3-g{g}")
    baselines = three + tuple(b if "-" in b else f"{b}-g{g}" for b in p["extra_baselines"])
    metric_name = "cosine" if args.model == "minilm" else "perplexity"

    # --- 1. headline: ≤ 3 avg bits on x86-avx2 -------------------------------------------------------------
    load_before = load_avg()
    t0 = time.perf_counter()
    opts = SearchOptions(model=args.model, target="x86-avx2", driver=args.driver, trials=trials, seed=0,
                         constraints=Constraints(avg_bits=3.0), cache=cache, workers=args.workers,
                         hutchinson_max_iter=iters, sensitivity=args.sensitivity, space=space_opts, n_eval=n_eval,
                         baselines=baselines)
    bench = Workbench(opts.eval_config())
    space = build_space(bench.graph, bench.target, space_opts)
    bcq3_bytes = space.weight_bytes(space.uniform(three[0]))
    opts = replace(opts, constraints=Constraints(max_bytes=bcq3_bytes, avg_bits=3.0))
    result = run_search(opts, bench=bench, progress=log)
    wall = time.perf_counter() - t0
    load_after = load_avg()
    report = write_search_report(result, out / f"x86-avx2-3bit-{args.sensitivity}")
    log(f"search done in {wall:.0f}s ({time.perf_counter() - T_START:.0f}s since the script started); report {report}")
    chosen = result.chosen
    tag = f"{args.driver} {args.sensitivity}"
    timings = result.summary()["timings"]
    records.add(f"{args.model} search x86-avx2 avg3 {tag} {trials} trials {args.workers} workers", "seconds", wall,
                process_seconds=time.perf_counter() - T_START, load_avg_before=load_before, load_avg_after=load_after,
                timings=timings, evaluated=result.evaluated, n_eval=n_eval, hutchinson_iterations=result.sens.iterations,
                hutchinson_converged=result.sens.converged)

    # held-out re-scoring
    t1 = time.perf_counter()
    hold = bench.holdout(n_eval=n_hold, eval_seed=7)
    rows = []
    held_of = {}
    for name, t in [("searched", chosen)] + [(f"uniform {k}", v) for k, v in result.baselines.items()]:
        if t is None:
            continue
        held = hold.evaluate(t.strategy)["metric"]
        held_of[name] = held
        rows.append([name, t.metric, held, t.analytic.avg_bits, round(effective_bits(space, t.assignment), 3),
                     round(t.analytic.bytes / 1e6, 3), "yes" if t.feasible else "no"])
        records.add(f"{args.model} {name} x86-avx2 avg3 {tag} held-out", metric_name, held, search_metric=t.metric,
                    avg_bits=t.analytic.avg_bits, stored_bits=effective_bits(space, t.assignment),
                    bytes=t.analytic.bytes, meets_limits=t.feasible,
                    choices=summarize(space, t.assignment) if name == "searched" else None)
    hold_s = time.perf_counter() - t1
    unit = "sentences" if args.model == "minilm" else "windows of 128 tokens"
    print(f"\n## {args.model}, x86-avx2, ≤ 3.0 avg weight bits and ≤ {bcq3_bytes / 1e6:.3f} MB "
          f"({args.driver}, {args.sensitivity} sensitivity, {len(result.trials)} trials, {result.evaluated} evaluated, "
          f"{args.workers} workers, {wall:.0f} s wall incl. model load; load average {load_before} → {load_after})\n")
    print(f"float {metric_name} on the search set: {result.base_metric:.4f}; held-out float: {hold.base_metric:.4f}\n")
    print(markdown_table(["strategy", f"{metric_name} (search set, {n_eval})",
                          f"{metric_name} (held-out, {n_hold} {unit})", "avg bits", "stored bits", "MB", "meets limits"],
                         rows))
    if chosen is not None:
        better = (lambda a, b: a > b) if metric_name == "cosine" else (lambda a, b: a < b)
        for b in three:
            key = f"uniform {b}"
            if key in held_of:
                ok = better(held_of["searched"], held_of[key])
                print(f"\nsearched vs {key} on held-out: {held_of['searched']:.4f} vs {held_of[key]:.4f} "
                      f"({'better' if ok else 'NOT better'})")
                records.add(f"{args.model} searched beats {key} held-out", "agreement", float(ok))
        print(f"\nsearched choices: {summarize(space, chosen.assignment)}")
        print(f"timings: {timings}; held-out scoring {hold_s:.0f}s")
    records.add(f"{args.model} held-out float", metric_name, hold.base_metric)

    # --- 2. cross-target: same size limit on x86-avx2 and npu-int8 --------------------------------------------
    if cross:
        rows, strategies = [], {}
        for target in ("x86-avx2", "npu-int8"):
            o = SearchOptions(model=args.model, target=target, driver=args.driver, trials=args.cross_trials, seed=0,
                              constraints=Constraints(avg_bits=args.cross_avg_bits), cache=cache,
                              workers=args.workers, hutchinson_max_iter=iters, baselines=(),
                              sensitivity=args.sensitivity, space=space_opts, n_eval=n_eval)
            b = Workbench(o.eval_config(), source=bench.source, graph=bench.graph)
            t2 = time.perf_counter()
            r = run_search(o, bench=b, progress=log)
            write_search_report(r, out / f"{target}-{args.cross_avg_bits:g}bit")
            c = r.chosen
            problems = r.space.violations(c.assignment, b.target)
            within = c.analytic.avg_bits <= args.cross_avg_bits + 1e-9
            strategies[target] = c.strategy
            choices = summarize(r.space, c.assignment)
            rows.append([target, c.metric, round(c.analytic.avg_bits, 2), round(c.analytic.bytes / 1e6, 3),
                         ", ".join(f"{k}×{v}" for k, v in choices.items()),
                         "yes" if not problems else f"NO: {problems[0]}", "yes" if within else "NO",
                         round(time.perf_counter() - t2)])
            records.add(f"{args.model} search {target} avg{args.cross_avg_bits:g}", metric_name, c.metric,
                        avg_bits=c.analytic.avg_bits, bytes=c.analytic.bytes, choices=choices,
                        target_accepts=not problems, within_limit=within, strategy_sha256=c.strategy.sha256)
        differ = strategies["x86-avx2"].to_dict()["nodes"] != strategies["npu-int8"].to_dict()["nodes"]
        records.add(f"{args.model} x86-avx2 and npu-int8 strategies differ", "agreement", float(differ))
        print(f"\n## same limit (≤ {args.cross_avg_bits:g} avg weight bits), two targets "
              f"(strategies differ: {'yes' if differ else 'NO'})\n")
        print(markdown_table(["target", metric_name, "avg bits", "MB", "choices", "target accepts", "within limit",
                              "s"], rows))
    records.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
