"""Reconstruction-based PTQ side by side (issue 10): RTN, AdaRound, BRECQ, clip-search (with and without
QRATER), multipoint, on the digits CNN (accuracy on the 360 held-out test digits) and MobileNetV2 with
ImageNet weights (top-1 agreement and KL to fp32 on the bundled evaluation photos, their mirrors and crops).

Each row is one ``qgraph.quantize`` run on 2 threads of the pipeline

    fold-bn,dce,fuse-activation,annotate{bits=W,act_bits=A},calibrate,<method>,quantize-weights,insert-fq

where ``<method>`` is the method's pass text (nothing for RTN: quantize-weights rounds to nearest with a
per-channel symmetric min-max scale) and the simulated (fake-quant) model is evaluated. A pass whose order
constraints forbid that place (e.g. sparq, which works on the fake-quant graph) goes after quantize-weights
or insert-fq instead, the first place they allow; the JSON records carry each row's exact pipeline. Configs are
``W<bits>A<bits>`` (``A16``/``A32``: float activations). A method whose pass is not registered, or that
rejects its options, gets a "not available" row instead of failing the run. ``seconds`` is the wall time
of the whole quantize call (trace, canonicalize, calibrate, method, quantize-weights, insert-fq);
``method s`` is the method pass alone. With ``--quick``: fewer evaluation images and calibration batches,
and iteration-count options of the method passes (``iters``, ``iterations``, ... ) capped at 200.

    python bench/quality_reconstruction.py [--quick] [--json out.json] [--models mobilenetv2 digits-cnn]
        [--methods rtn adaround "clip-search{qrater=true}"] [--configs W4A8 W3A8 W2A4]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _records import Records, machine, markdown_table

import qgraph
from qgraph.data.eval_sets import METRICS, eval_set, evaluate, predict
from qgraph.errors import QGraphError
from qgraph.instruments import TimingInstrument
from qgraph.models.registry import BUNDLED
from qgraph.pipeline import parse_pipeline_items

CANON = "fold-bn,dce,fuse-activation"
TARGET = "x86-avx2"
MODELS = ("digits-cnn", "mobilenetv2")
METHODS = ("rtn", "adaround", "brecq", "clip-search", "clip-search{qrater=true}", "multipoint")
CONFIGS = ("W4A8", "W3A8", "W2A4")
POSITIONS = ("calibrate", "quantize-weights", "insert-fq")  # where a method's pass may go, in preference order
QUICK_ITERS = 200
ITER_OPTIONS = ("iters", "iterations", "num_iters", "n_iters", "max_iters", "steps")
_CONFIG = re.compile(r"W(\d)A(\d+)")
METRIC_HEADER = {"accuracy": "accuracy", "agreement": "top-1 agreement", "kl": "KL to fp32"}


def parse_config(name: str) -> tuple[int, int]:
    """``W4A8`` -> (4, 8); ``W4A16`` / ``W4A32`` -> (4, 0): float activations (annotate's act_bits=0)."""
    m = _CONFIG.fullmatch(name)
    if not m or not 2 <= int(m.group(1)) <= 8 or int(m.group(2)) not in (*range(2, 9), 16, 32):
        raise SystemExit(f"quality_reconstruction: config {name!r} is not W<2..8>A<2..8|16|32>, e.g. W4A8")
    act = int(m.group(2))
    return int(m.group(1)), 0 if act >= 16 else act


def method_pass(method: str) -> tuple[str, dict] | None:
    """(pass name, options) of a method's pass text; None for ``rtn``."""
    if method == "rtn":
        return None
    items = parse_pipeline_items(method)
    if len(items) != 1:
        raise SystemExit(f"quality_reconstruction: a method is one pass (e.g. adaround{{iters=500}}), got {method!r}")
    return items[0]


def find_pass(name: str):
    """The registered pass class, importing ``qgraph.passes.<name>`` if nothing registered it yet; or None."""
    from qgraph.registry import registered_passes

    passes = registered_passes()
    if name not in passes:
        try:
            importlib.import_module(f"qgraph.passes.{name.replace('-', '_')}")
        except ImportError:
            return None
        passes = registered_passes()
    return passes.get(name)


def quick_options(cls, given: dict) -> dict:
    """Caps on iteration-count options the method does not set itself (``--quick`` only)."""
    out = {}
    options = getattr(cls, "Options", None)
    if options is None or not dataclasses.is_dataclass(options):
        return out
    for f in dataclasses.fields(options):
        if f.name in ITER_OPTIONS and f.name not in given and isinstance(f.default, int) and \
                f.default > QUICK_ITERS:
            out[f.name] = QUICK_ITERS
    return out


def pipeline_text(bits: int, act_bits: int, method_item: str | None, act_observer: str | None,
                  after: str = "calibrate") -> str:
    """The row's pipeline, with ``method_item`` right after ``after`` (calibrate, quantize-weights or insert-fq)."""
    calibrate = f"calibrate{{method={act_observer}}}" if act_observer else "calibrate"
    parts = [CANON, f"annotate{{bits={bits},act_bits={act_bits}}}", calibrate, "quantize-weights", "insert-fq"]
    if method_item:
        anchor = next(i for i, p in enumerate(parts) if p.split("{", 1)[0] == after)
        parts.insert(anchor + 1, method_item)
    return ",".join(parts)


def resolve(method: str, quick: bool) -> tuple[str | None, str, str | None]:
    """(pass text to insert or None for RTN, the pass it goes after, reason it is not available or None).

    A method goes right after calibrate; a pass whose order constraints forbid that (e.g. one that works on
    the fake-quant graph) goes after quantize-weights or insert-fq, the first place its constraints allow."""
    item = method_pass(method)
    if item is None:
        return None, "calibrate", None
    name, opts = item
    cls = find_pass(name)
    if cls is None:
        return None, "calibrate", f"pass {name!r} is not registered"
    if quick:
        opts = {**quick_options(cls, opts), **opts}
    try:
        text = str(cls(**opts))  # canonical text; unknown options raise PipelineError
    except QGraphError as e:
        return None, "calibrate", str(e).splitlines()[0]
    first_error = None
    for after in POSITIONS:
        try:
            qgraph.PassManager(pipeline_text(4, 8, text, None, after))
            return text, after, None
        except QGraphError as e:
            first_error = first_error or str(e).splitlines()[0]
    return None, "calibrate", first_error


def run_one(model, es, ref, pipeline: str, method_item: str | None) -> tuple[dict, float, float | None]:
    timing = TimingInstrument()
    module = copy.deepcopy(model)  # passes may rewrite the module in place
    start = time.perf_counter()
    q = qgraph.quantize(module, es.example_inputs, target=TARGET, calib=es.calibration, pipeline=pipeline,
                        progress=False, instruments=[timing])
    seconds = time.perf_counter() - start
    method_seconds = None
    if method_item is not None:
        name = method_item.split("{", 1)[0]
        method_seconds = sum(t for label, t in timing.timings if label.split("{", 1)[0] == name)
    return evaluate(q, ref, es), seconds, method_seconds


def warm_up(model, es) -> None:
    """One untimed W8A8 run on one calibration batch, so one-time costs (lazy imports, first trace) do not
    land on the first timed row."""
    qgraph.quantize(copy.deepcopy(model), es.example_inputs, target=TARGET, calib=es.calibration[:1],
                    pipeline=pipeline_text(8, 8, None, None), progress=False)


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer evaluation images and calibration batches, method iterations capped at 200")
    ap.add_argument("--json", metavar="PATH", help="write records (case, metric, value) as JSON")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help="rtn, or one pass's text each, e.g. adaround or 'clip-search{qrater=true}'")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), help="W<bits>A<bits>, e.g. W4A8 W2A4 W4A32")
    ap.add_argument("--act-observer", default=None,
                    help="calibrate's observer (default: the spec's, min-max); e.g. mse, percentile")
    ap.add_argument("--calib-batches", type=int, default=None, help="override the calibration batch count")
    args = ap.parse_args(argv)
    configs = [(c, *parse_config(c)) for c in args.configs]
    torch.manual_seed(0)
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    load_at_start = _load()

    methods = []
    for m in args.methods:
        text, after, reason = resolve(m, args.quick)
        methods.append((m, text, after, reason))
        if reason:
            print(f"{m}: not available: {reason}", file=sys.stderr)

    records, rows, notes, failed = Records(), [], [], 0
    metric_cols = [k for k in ("accuracy", "agreement", "kl") if any(k in METRICS[m] for m in args.models)]
    for model_name in args.models:
        model = BUNDLED[model_name].load().module
        es = eval_set(model_name, args.quick, calib_batches=args.calib_batches)
        ref = predict(model, es.inputs)
        notes.append(f"{model_name}: {es.description}")
        fp32 = evaluate(model, ref, es)
        warm_up(model, es)
        rows.append([model_name, "fp32", "-", *(fp32[k] if k in es.metrics else "-" for k in metric_cols), "-", "-"])
        for k in es.metrics:
            records.add(f"{model_name} fp32", k, fp32[k], model=model_name, config="fp32", method="fp32")
        for config, bits, act_bits in configs:
            for method, text, after, reason in methods:
                row = [model_name, config, method]
                if reason:
                    rows.append(row + ["not available"] + ["-"] * (len(metric_cols) + 1))
                    continue
                pipeline = pipeline_text(bits, act_bits, text, args.act_observer, after)
                try:
                    metrics, seconds, method_s = run_one(model, es, ref, pipeline, text)
                except Exception as e:  # noqa: BLE001 - a broken method must not hide the other rows
                    failed += 1
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    print(f"{model_name} {config} {method}: FAILED {msg}", file=sys.stderr)
                    rows.append(row + [f"error ({type(e).__name__})"] + ["-"] * (len(metric_cols) + 1))
                    notes.append(f"{model_name} {config} {method}: {msg}")
                    continue
                case = f"{model_name} {config} {method}"
                extra = {"model": model_name, "config": config, "method": method, "pipeline": pipeline}
                for k in es.metrics:
                    records.add(case, k, metrics[k], **extra)
                records.add(case, "seconds", seconds, **extra)
                rows.append(row + [metrics[k] if k in es.metrics else "-" for k in metric_cols]
                            + [f"{seconds:.1f}", "-" if method_s is None else f"{method_s:.1f}"])
                shown = " ".join(f"{k}={metrics[k]:.4f}" for k in es.metrics)
                print(f"{case}: {shown} {seconds:.1f}s", file=sys.stderr)

    print(f"\nQuantization quality of reconstruction PTQ methods; {machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, target {TARGET} (weights per-channel symmetric, activations per-tensor "
          f"asymmetric, {args.act_observer or 'min-max'} calibration){' [quick]' if args.quick else ''}; "
          f"1-min load average {load_at_start:.1f} at start, {_load():.1f} at end (seconds scale with it)")
    for n in notes:
        print(f"- {n}")
    print()
    print(markdown_table(["model", "config", "method", *(METRIC_HEADER[k] for k in metric_cols), "seconds",
                          "method s"], rows))
    for m, _, _, reason in methods:
        if reason:
            print(f"\n{m}: not available ({reason})")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    records.write(args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
