"""``qgraph search``: mixed-precision strategy search from the command line.

Wire into ``qgraph/cli.py``: ``from qgraph.search.cli import add_parser as add_search_parser`` and, in
``build_parser``, ``add_search_parser(sub)``. Standalone: ``python -m qgraph.search.cli MODEL ...``.
Exit codes follow ``qgraph.cli``: 0 ok, 2 usage, 3 bad input or no strategy meets the constraints,
1 internal error.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from qgraph.cli_base import Parser, UsageError, run
from qgraph.cli_types import finite_float, group_size_list, int_range

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT = 0, 1, 2, 3

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgG]i?[bB]|[bB]|%)?\s*$")
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> tuple[float | None, float | None]:
    """``"25MB"`` → (25e6, None); ``"30%"`` → (None, 0.30) (a fraction of the float weight bytes)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use bytes (2.5e7), a unit (25MB, 24MiB) or "
                                         f"a percentage of the float weights (30%)")
    value, unit = float(m.group(1)), (m.group(2) or "b").lower()
    if unit == "%":
        return None, value / 100.0
    return value * _UNITS[unit], None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``search`` subcommand to a ``qgraph`` subparsers object."""
    sp = subparsers.add_parser("search", help="search a mixed-precision quantization strategy for a target")
    sp.add_argument("model", help="bundled name (minilm, smollm2, mobilenetv2) or path/to/file.py:factory")
    sp.add_argument("--target", default="x86-avx2", help="target name or .toml path (default x86-avx2)")
    sp.add_argument("--max-bytes", type=parse_size, dest="max_bytes",
                    help="weight size limit: bytes, 25MB / 24MiB, or 30%% of the float weights")
    sp.add_argument("--avg-bits", type=finite_float(0, what="--avg-bits"), dest="avg_bits", help="limit on the average weight bits of searched layers")
    sp.add_argument("--max-latency", type=finite_float(0, what="--max-latency"), dest="max_latency", help="limit on predicted latency (µs)")
    sp.add_argument("--max-metric-drop", type=finite_float(0, inclusive=True, what="--max-metric-drop"), dest="max_metric_drop",
                    help="limit on the metric drop vs float (cosine gap, or perplexity increase)")
    sp.add_argument("--driver", choices=["greedy", "ilp", "nsga"], default="nsga")
    sp.add_argument("--trials", type=int_range(1, what="--trials"), default=50, help="distinct strategies to evaluate (default 50)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--cache", help="trial cache (JSON lines); a rerun with the same file resumes (quantized weights are "
                    "kept beside it, in CACHE.qweights/)")
    sp.add_argument("--workers", type=int_range(0, 64, what="--workers"), default=2, help="trial worker processes (0: in this process)")
    sp.add_argument("--ray", metavar="ADDRESS", help="run trials on Ray: a cluster address, or 'local'")
    sp.add_argument("--sensitivity", choices=["hessian", "proxy"], default="hessian")
    sp.add_argument("--hutchinson-iters", type=int_range(1, what="--hutchinson-iters"), default=30, dest="hutchinson_iters",
                    help="cap on Hutchinson iterations (stops earlier at 1e-3 relative change)")
    sp.add_argument("--metric", choices=["auto", "cosine", "perplexity"], default="auto")
    sp.add_argument("--eval-size", type=int_range(1, what="--eval-size"), default=32, dest="eval_size",
                    help="sentences (MiniLM) / windows (SmolLM2) / batches each trial is scored on")
    sp.add_argument("--group-sizes", default=(128,), type=group_size_list, dest="group_sizes",
                    help="comma-separated group sizes offered for int4 and BCQ (default 128)")
    sp.add_argument("--no-act", action="store_true", dest="no_act", help="do not offer int8 activations")
    sp.add_argument("--embeddings", action="store_true", help="search embedding (Gather) nodes too")
    sp.add_argument("--keep-float", default="", dest="keep_float",
                    help="comma-separated node-key patterns kept in float and out of the search (e.g. 'lm.lm_head')")
    sp.add_argument("--measure-latency", action="store_true", dest="measure_latency",
                    help="also lower each trial to real kernels and time it on this host")
    sp.add_argument("--no-anchor", action="store_true", dest="no_anchor",
                    help="do not scale the sensitivities by uniform strategies measured before the search")
    sp.add_argument("--baselines", default="bcq3-g128,bcq4-g128,w4-g128,w8-ch",
                    help="uniform strategies to evaluate for comparison (choice labels; '' for none)")
    sp.add_argument("--out", help="report folder (default qgraph-out/search-<model>-<target>)")
    sp.add_argument("--threads", type=int_range(1, 256, what="--threads"), default=1, help="torch threads of this process (default 1)")
    sp.add_argument("--quiet", action="store_true", help="no progress output")
    sp.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    sp.set_defaults(func=cmd_search)
    return sp


def _options(args: argparse.Namespace) -> Any:
    from qgraph.search.objectives import Constraints
    from qgraph.search.run import SearchOptions
    from qgraph.search.space import SearchError, SpaceOptions

    groups = tuple(args.group_sizes)
    if str(args.model).endswith(".onnx"):
        raise SearchError(f"{args.model}: search runs on torch models (it re-traces and lowers each trial); for an "
                          f"ONNX model use qgraph lower with a fixed strategy")
    if args.cache and Path(args.cache).is_dir():
        raise SearchError(f"--cache {args.cache} is a folder: give a file path (the trial cache is a JSON-lines file)")
    max_bytes, fraction = args.max_bytes if args.max_bytes else (None, None)
    constraints = Constraints(max_bytes=max_bytes, max_latency_us=args.max_latency, avg_bits=args.avg_bits,
                              max_metric_drop=args.max_metric_drop)
    if not any(v is not None for v in (max_bytes, fraction, args.max_latency, args.avg_bits, args.max_metric_drop)):
        raise UsageError("give at least one constraint: --max-bytes, --avg-bits, --max-latency or --max-metric-drop")
    baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    return SearchOptions(
        model=args.model, target=args.target, driver=args.driver, trials=args.trials, seed=args.seed,
        constraints=constraints, max_bytes_fraction=fraction, cache=args.cache, workers=args.workers,
        ray_address=args.ray, sensitivity=args.sensitivity, hutchinson_max_iter=args.hutchinson_iters,
        space=SpaceOptions(uniform_group_sizes=groups, bcq_group_sizes=groups, act=not args.no_act,
                           embeddings=args.embeddings,
                           keep_float=tuple(k.strip() for k in args.keep_float.split(",") if k.strip())),
        metric=args.metric, n_eval=args.eval_size, measure_latency=args.measure_latency, baselines=baselines,
        anchor=not args.no_anchor)


def cmd_search(args: argparse.Namespace) -> int:
    import torch

    from qgraph.search.report import write_search_report
    from qgraph.search.run import run_search

    opts = _options(args)
    torch.set_num_threads(max(1, args.threads))
    quiet = getattr(args, "quiet", False)
    if quiet:
        os.environ["QGRAPH_QUIET"] = "1"
    t0 = time.perf_counter()
    done = {"n": 0}

    def say(msg: str) -> None:
        if not quiet:
            print(f"qgraph search [{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def on_trial(strategy: Any, result: dict[str, Any], cached: bool) -> None:
        done["n"] += 1
        say(f"trial {done['n']}: metric {result['metric']:.4f} (drop {result['drop']:+.4f})"
            + (" [cached]" if cached else f" in {result.get('eval_seconds', 0.0):.1f}s"))

    result = run_search(opts, progress=say, on_trial=on_trial)
    out = Path(args.out or f"qgraph-out/search-{Path(opts.model).stem.split(':')[0]}-{Path(opts.target).stem}")
    report = write_search_report(result, out)
    summary = result.summary()
    summary.update(report=str(report), out=str(out))
    if result.chosen is None:
        print(f"qgraph: error: none of {len(result.trials)} trials met every constraint "
              f"({result.constraints.describe()}); loosen a limit or raise --trials (report {report})",
              file=sys.stderr)
        if args.json:
            print(json.dumps(summary))
        return EXIT_INPUT
    c = summary["chosen"]
    if args.json:
        print(json.dumps(summary))
    else:
        base = summary["baselines"]
        ref = "".join(f"; uniform {k}: {v['metric']:.4f}" for k, v in base.items())
        print(f"searched {opts.model} for {opts.target} ({opts.driver}, {len(result.trials)} trials, "
              f"{result.evaluated} evaluated, {result.seconds:.0f}s): {result.metric_name} {c['metric']:.4f} at "
              f"{c['bytes'] / 1e6:.2f} MB, {c['avg_bits']:.2f} avg bits{ref}; report {report}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m qgraph.search.cli MODEL ...``: the ``search`` subcommand on its own."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = Parser(prog="qgraph", description="Post-training quantization compiler.")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    add_parser(sub)
    args = parser.parse_args(["search", *(sys.argv[1:] if argv is None else argv)])
    if args.quiet:
        os.environ["QGRAPH_QUIET"] = "1"
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
