"""The ``qgraph`` command: lower, search, export, targets, passes, inspect, bench.

Exit codes: 0 success; 2 wrong usage; 3 bad input (model, target, pipeline, calibration data);
4 the lowered model failed verification; 1 an unexpected internal error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import tomllib

from qgraph.cli_base import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, EXIT_VERIFY, run
from qgraph.cli_base import Parser as _Parser
from qgraph.cli_base import UsageError as _UsageError
from qgraph.cli_types import finite_float, group_size, int_range

__all__ = ["EXIT_INPUT", "EXIT_INTERNAL", "EXIT_OK", "EXIT_USAGE", "EXIT_VERIFY", "build_parser", "main", "run"]


def _say(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


def _silence() -> None:
    """--quiet: no progress bars or warnings from qgraph or the libraries it drives; errors still print."""
    import logging
    import warnings

    os.environ.update(QGRAPH_QUIET="1", TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                      TRANSFORMERS_VERBOSITY="error", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    warnings.simplefilter("ignore")
    for name in ("transformers", "torch", "onnxruntime", "onnxscript", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _annotate_options(args: argparse.Namespace) -> str:
    opts = []
    for flag, key in (("scheme", "scheme"), ("bits", "bits"), ("group_size", "group_size"), ("method", "method"),
                      ("act_bits", "act_bits")):
        v = getattr(args, flag, None)
        if v is not None:
            opts.append(f"{key}={v}")
    if getattr(args, "runtime", None) == "onnxruntime":  # its int8 convs need quantized residual-block outputs
        opts.append("residual_outputs=true")
    return ",".join(opts)


def _pipeline_text(args: argparse.Namespace, onnx_model: bool = False) -> str:
    from qgraph.api import CANONICALIZE, lowering_pipeline

    if args.pipeline and args.config:
        raise _UsageError("give --pipeline or --config, not both")
    if args.config:
        from qgraph.errors import PipelineError

        try:
            cfg = tomllib.loads(Path(args.config).read_text())
        except FileNotFoundError:
            raise PipelineError(f"config file {args.config} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise PipelineError(f"config file {args.config} is not valid TOML: {e}") from None
        if "pipeline" not in cfg or not isinstance(cfg["pipeline"], str):
            raise PipelineError(f"config file {args.config} needs a string key 'pipeline'")
        if "target" in cfg and args.target_default:
            args.target = cfg["target"]
        return cfg["pipeline"]
    if args.pipeline:
        return args.pipeline
    if onnx_model:  # an ONNX model is lowered by writing it as QDQ ONNX: the pipeline stops at the simulation
        opts = _annotate_options(args)
        check = "check-target{fallback=true}" if args.fallback else "check-target"
        return f"{CANONICALIZE},annotate{{{opts}}},{check},calibrate,quantize-weights,insert-fq".replace(
            "annotate{}", "annotate")
    return lowering_pipeline(_annotate_options(args), fallback=args.fallback, verify_tol=args.verify_tol)


def cmd_lower(args: argparse.Namespace) -> int:
    from qgraph.llm.cli import cmd_lower_lm, lowers_to_lm

    if lowers_to_lm(args):  # a causal LM: an artifact `qgraph generate` runs
        return cmd_lower_lm(args)
    import qgraph
    from qgraph.atomic import atomic_folder, check_writable_folder
    from qgraph.model_source import load_calibration, load_model_source
    from qgraph.report import write_report

    t0 = time.perf_counter()
    is_onnx = args.model.endswith(".onnx")
    text = _pipeline_text(args, onnx_model=is_onnx)
    synthetic = args.calib == "synthetic"  # data-free: the genie pass distills images from BatchNorm statistics
    if synthetic and "genie" not in text:
        text = f"genie,{text}"
    qgraph.PassManager(text)  # validate the pipeline before loading anything heavy
    target = qgraph.load_target(args.target)
    out = check_writable_folder(args.out or f"qgraph-out/{Path(args.model).stem}-{target.name}")
    _say(args, f"qgraph: loading {args.model}")
    source = load_model_source(args.model)
    calib = None if synthetic else load_calibration(args.calib, source) if args.calib else source.calibration
    # The whole output folder is built aside and swapped in at the end: no stale files, no torn folder, and
    # a second `qgraph lower` into the same --out fails at once instead of racing this one.
    with atomic_folder(out) as tmp:
        _say(args, f"qgraph: lowering {source.name} for {target.name}: {text}")
        model = source.onnx_path if source.onnx_path else source.module
        q = qgraph.quantize(model, source.example_inputs, target=target, calib=calib, pipeline=text,
                            dynamic_shapes=source.dynamic_shapes, progress=not args.quiet)
        if source.module is not None:  # compiled code is this process's only; the artifact stays data
            mode = {True: "on", False: "off", None: "auto"}[args.compile]
            if mode != "off":
                _say(args, f"qgraph: torch.compile of the lowered graph ({mode})")
            q.compile_execution(mode, source.example_inputs, measure=not args.no_measure)
        ort_model = extra = None
        if args.runtime == "onnxruntime" and not source.onnx_path:
            def requantize(strategy):
                return qgraph.quantize(model, source.example_inputs, target=target, calib=calib, pipeline=text,
                                       strategy=strategy, dynamic_shapes=source.dynamic_shapes, progress=False)

            ort_model = _onnxruntime_route(args, q, source, tmp, requantize)
            extra = {ORT_ROW: (ort_model, ort_model.path.stat().st_size)}
        _say(args, f"qgraph: writing report to {out}/")
        report_path = out / write_report(q, tmp, title=f"qgraph: {source.name} for {target.name}",
                                         measure=not args.no_measure, float_model=source.module,
                                         inputs=source.example_inputs, logits=_is_classifier(source),
                                         extra=extra).relative_to(tmp)
        if source.onnx_path:
            left_float = q.graph.weights_to_qdq()
            q.graph.save(tmp / f"{source.name}.qdq.onnx")
            q.report.setdefault("lowering", []).extend(
                {"node": n, "op": "?", "kernel": "float", "status": "float", "reason": "group QDQ needs opset 21"}
                for n in left_float)
        else:
            from qgraph.artifact import save_artifact

            save_artifact(q, tmp / "model", source=args.model)
        ort_summary = None
        if ort_model is not None:
            ort_summary = ort_model.summary()
            ort_summary["file"] = str(out / "model.onnx")
            row = q.report.get("end_to_end", {}).get("rows", {}).get(ORT_ROW, {})
            ort_fp32 = q.report.get("end_to_end", {}).get("rows", {}).get("onnxruntime fp32", {}).get("ms")
            ort_summary["latency_ms"] = row.get("ms")
            ort_summary["speedup_vs_ort_fp32"] = ort_fp32 / row["ms"] if row.get("ms") and ort_fp32 else None
            ort_summary["quality"] = row.get("quality")
            choice = q.report.get("onnxruntime_layers")
            if choice:
                ort_summary["int8_layers"] = {k: choice.get(k) for k in (
                    "margin", "candidates", "kept_float", "all_int8_ms", "with_float_ms")}
                ort_summary["int8_layers"]["measured"] = len(choice["layers"])
    layers = q.report.get("layers", [])
    fp32 = sum(r["fp32_bytes"] for r in layers)
    qb = sum(r["bytes"] for r in layers)
    verify = q.report.get("verify", {})
    e2e = q.report.get("end_to_end", {})
    summary = {
        "model": source.name, "target": target.name, "pipeline": q.pipeline, "out": str(out),
        "report": str(report_path),
        "artifact": str(out / (f"{source.name}.qdq.onnx" if source.onnx_path else "model")),
        "weight_bytes": qb, "fp32_weight_bytes": fp32,
        "lowered": sum(r["status"] == "lowered" for r in q.report.get("lowering", [])),
        "float": sum(r["status"] == "float" for r in q.report.get("lowering", [])),
        "verify_output_rel_err": verify.get("output_rel_err"), "first_divergent": verify.get("first_divergent"),
        "latency_rank_correlation": q.report.get("latency_rank_correlation"),
        "execution": q.report.get("compile", {}).get("used", "eager"),
        "latency_ms": e2e.get("rows", {}).get("qgraph", {}).get("ms"),
        "speedup_vs_float": e2e.get("speedup_vs_float"), "speedup_vs_ort_fp32": e2e.get("speedup_vs_ort_fp32"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if ort_summary is not None:
        summary["onnxruntime"] = ort_summary
    if args.json:
        print(json.dumps(summary))
    else:
        size = f"{qb / 1e6:.2f} MB vs {fp32 / 1e6:.2f} MB fp32" if fp32 else "no weights quantized"
        speed = ""
        if summary["latency_ms"] is not None:
            ratios = [f"{v:.2f}x {k}" for k, v in (("float", summary["speedup_vs_float"]),
                                                   ("onnxruntime fp32", summary["speedup_vs_ort_fp32"])) if v]
            speed = f"; {summary['latency_ms']:.2f} ms {summary['execution']}" + (
                f" ({', '.join(ratios)})" if ratios else "")
        print(f"lowered {source.name} for {target.name}: {summary['lowered']} layers on real kernels, "
              f"{summary['float']} float; weights {size}{speed}; report {report_path}")
        if ort_summary is not None:
            speed = ""
            if ort_summary["latency_ms"] is not None:
                speed = f"; {ort_summary['latency_ms']:.2f} ms" + (
                    f" ({ort_summary['speedup_vs_ort_fp32']:.2f}x onnxruntime fp32)"
                    if ort_summary["speedup_vs_ort_fp32"] else "")
            print(f"onnxruntime route: {ort_summary['file']} ({ort_summary['fused_int8_ops']} fused int8 kernels, "
                  f"{ort_summary['unfused_qdq_ops']} Q/DQ left unfused{speed})")
    if verify.get("first_divergent") is not None and args.strict:
        print(f"qgraph: error: verify: first divergent node {verify['first_divergent']}", file=sys.stderr)
        return EXIT_VERIFY
    return EXIT_OK


ORT_ROW = "qgraph -> onnxruntime"
#: an int8 layer slower than its float twin by more than this factor is tried in float (kernel times of one
#: profiled run each differ by up to ~10% on a shared machine)
INT8_MARGIN = 1.1


def _onnxruntime_route(args: argparse.Namespace, q: object, source: object, tmp: Path, requantize):
    """The lowered model exported for onnxruntime (``--runtime onnxruntime``): QDQ with quantized residual
    inputs, so onnxruntime fuses the convs that feed residual Adds too; a session-backed model.

    Then each int8 layer's kernel is timed against its float twin in onnxruntime (`compare_layers`). Layers whose
    int8 kernel is slower by more than ``INT8_MARGIN`` are requantized float (``requantize(strategy)``); that
    file replaces the all-int8 one only if it is faster end to end, since a float layer among int8 ones adds
    Q/DQ and layout changes no single layer is charged for. What was measured and chosen goes to
    ``q.report["onnxruntime_layers"]``."""
    from qgraph.export.layer_latency import compare_layers, interleaved_ms
    from qgraph.export.runtime import OrtModel, onnxruntime_model
    from qgraph.quant.qspec import Annotation

    _say(args, "qgraph: exporting the onnxruntime route")
    path = tmp / "model.onnx"
    # timed in turns with torch and onnxruntime fp32 (the report's, also without spin-waiting)
    route = onnxruntime_model(q, source.example_inputs, path, dynamic_shapes=source.dynamic_shapes, spinning=False)
    if args.no_measure:
        return route
    _say(args, "qgraph: timing each int8 layer against float in onnxruntime")
    layers = compare_layers(path, source.example_inputs)
    slower = [r.layer for r in layers if r.int8_us > INT8_MARGIN * r.float_us]
    choice = {"margin": INT8_MARGIN, "layers": [r.as_dict() for r in layers], "candidates": slower,
              "kept_float": []}
    if slower:
        _say(args, f"qgraph: {len(slower)} layers run slower in int8; trying them in float")
        alt_q = requantize({layer: Annotation(fallback_float=True) for layer in slower})
        alt_path = tmp / "model-float-layers.onnx"
        alt = onnxruntime_model(alt_q, source.example_inputs, alt_path, dynamic_shapes=source.dynamic_shapes,
                                spinning=False)
        choice["all_int8_ms"], choice["with_float_ms"] = interleaved_ms([route, alt], source.example_inputs)
        if choice["with_float_ms"] < choice["all_int8_ms"]:
            alt_path.replace(path)
            route = OrtModel(path, spinning=False)
            choice["kept_float"] = slower
        else:
            alt_path.unlink()
    q.report["onnxruntime_layers"] = choice
    return route


def _is_classifier(source) -> bool:
    """Whether the model's output is class / token logits (the report adds top-1 agreement)."""
    return source.kind == "image" or source.name in ("smollm2", "digits-cnn") or \
        type(source.module).__name__ == "CausalLMLogits"


def cmd_targets(args: argparse.Namespace) -> int:
    import qgraph

    if args.action == "list":
        rows = [qgraph.load_target(n) for n in qgraph.list_targets()]
        if args.json:
            print(json.dumps([{"name": t.name, "description": t.description} for t in rows]))
        else:
            for t in rows:
                print(f"{t.name:<18} {t.description}")
        return EXIT_OK
    if not args.name:
        raise _UsageError(f"'targets {args.action}' needs a target name or a .toml path")
    t = qgraph.load_target(args.name)
    if args.action == "validate":
        print(f"{args.name}: valid target {t.name!r} ({len(t.kernels)} kernel rules)")
        return EXIT_OK
    info = {"name": t.name, "description": t.description, "bcq": t.supports_bcq,
            "defaults": {"weight": str(t.defaults.weight), "activation": str(t.defaults.activation)},
            "kernels": [{"ops": k.ops, "scheme": k.scheme, "weight_bits": k.weight_bits,
                         "activation_bits": k.activation_bits, "kernel": k.kernel} for k in t.kernels],
            "fusions": t.fusions, "cost": {"memory_bandwidth_gbps": t.cost.memory_bandwidth_gbps,
                                           "macs_per_second": t.cost.macs_per_second,
                                           "lut_lookups_per_second": t.cost.lut_lookups_per_second,
                                           "call_overhead_us": t.cost.call_overhead_us}}
    print(json.dumps(info, indent=None if args.json else 1))
    return EXIT_OK


def cmd_passes(args: argparse.Namespace) -> int:
    from qgraph.pass_base import describe_options
    from qgraph.registry import registered_passes

    rows = []
    for name, cls in registered_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append({"name": name, "options": describe_options(cls.Options), "doc": doc[0] if doc else "",
                     "after": list(cls.after), "requires": sorted(cls.requires_properties)})
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['name']:<18} {r['doc']}\n{'':<18} options: {r['options']}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    import qgraph
    from qgraph.artifact import load_artifact, read_manifest
    from qgraph.errors import ArtifactError
    from qgraph.model_source import load_model_source
    from qgraph.models.registry import BUNDLED

    manifest = read_manifest(args.artifact)
    if args.model:
        spec = args.model  # the user names the float model; its weights are checked against the manifest
    elif manifest.source in BUNDLED:
        spec = manifest.source  # qgraph's own installed model code, never a path from the manifest
    else:
        raise ArtifactError(f"{args.artifact} was made from {manifest.source!r}: pass --model naming that float model "
                            f"(qgraph never imports or runs code that an artifact names)")
    source = load_model_source(spec)
    if source.module is None:
        raise ArtifactError(f"--model {spec}: an ONNX model's artifact is its .qdq.onnx file; export applies to "
                            f"torch models")
    q = load_artifact(args.artifact, source.module, source.example_inputs, dynamic_shapes=source.dynamic_shapes)
    info = qgraph.export_onnx(q, args.out, source.example_inputs, portable=args.portable,
                              dynamic_shapes=source.dynamic_shapes)
    size = Path(args.out).stat().st_size
    if args.json:
        print(json.dumps({"out": args.out, "bytes": size, "portable": args.portable}))
    else:
        print(f"wrote {args.out} ({size / 1e6:.2f} MB{', portable' if args.portable else ''})")
    del info
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    import qgraph
    from qgraph.model_source import load_model_source

    source = load_model_source(args.model)
    model = source.onnx_path or source.module
    if args.pipeline:
        q = qgraph.quantize(model, source.example_inputs, target=args.target, calib=source.calibration,
                            pipeline=args.pipeline, dynamic_shapes=source.dynamic_shapes, progress=False)
        print(q.graph)
    elif source.onnx_path:
        from qgraph.ir.onnx import load_onnx

        print(load_onnx(source.onnx_path))
    else:
        print(qgraph.trace(source.module, source.example_inputs, dynamic_shapes=source.dynamic_shapes))
    return EXIT_OK


BENCHES = {"kernel": "biqgemm.py", "kernel-cuda": "biqgemm_cuda.py", "quality-minilm": "quality_minilm.py",
           "quality-llm": "quality_llm.py", "quality-reconstruction": "quality_reconstruction.py",
           "mobilenetv2": "lowered_mobilenetv2.py", "search": "search_minilm.py", "e2e": "e2e.py"}


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark script of the source checkout (bench/), passing --quick/--json through."""
    import runpy

    folder = Path(__file__).resolve().parents[1] / "bench"
    script = folder / BENCHES[args.name]
    if not script.is_file():
        from qgraph.errors import QGraphError

        raise QGraphError(f"benchmark {args.name} ({script.name}) is not here: the bench/ scripts ship with the "
                          f"source checkout, run qgraph bench from an editable install")
    argv = [str(script)] + (["--quick"] if args.quick else []) + (["--json", args.json] if args.json else [])
    old = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = old
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qgraph", description="Post-training quantization compiler.")
    p.add_argument("--version", action="version", version="qgraph 0.1.0")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    lo = sub.add_parser("lower", help="quantize a model and lower it to real kernels for a target")
    lo.add_argument("model", help="bundled name (minilm, smollm2, mobilenetv2, digits-cnn), path/to/file.py:factory, a "
                                  "model.onnx file, or a local Hugging Face model folder")
    lo.add_argument("--target", default=None, help="target name or .toml path (default x86-avx2)")
    lo.add_argument("--calib", help="calibration data: .pt/.npy tensor file, .txt file or image folder; 'synthetic': "
                                    "none, images distilled from the model's BatchNorm statistics (genie pass)")
    lo.add_argument("--pipeline", help="pass pipeline text (default: the full lowering pipeline)")
    lo.add_argument("--config", help="TOML file with 'pipeline' (and optional 'target')")
    lo.add_argument("--scheme", choices=["uniform", "bcq"])
    lo.add_argument("--bits", type=int_range(1, 8, "--bits"))
    lo.add_argument("--group-size", type=group_size, dest="group_size")
    lo.add_argument("--method", choices=["greedy", "alternating", "weighted"])
    lo.add_argument("--act-bits", type=int_range(0, 8, "--act-bits"), dest="act_bits", help="activation bits (0: weight-only)")
    lo.add_argument("--fallback", action="store_true", help="keep nodes the target cannot run in float")
    lo.add_argument("--out", help="output folder (default qgraph-out/<model>-<target>)")
    lo.add_argument("--no-measure", action="store_true", help="skip all timing (end-to-end, per node, compile choice)")
    lo.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="run the lowered graph through torch.compile (default: when it is faster on the example "
                         "inputs; --no-measure makes the default eager); compiled code is never saved")
    lo.add_argument("--strict", action="store_true", help="exit 4 when lowered and simulated outputs diverge")
    lo.add_argument("--verify-tol", type=finite_float(0, inclusive=True, what="--verify-tol"), dest="verify_tol",
                    help="relative error the lowered model may have against the simulation (default 1e-4); from "
                         "1e-2 on, BCQ layers use the fast int8 kernel mode")
    lo.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                    help="also export OUT/model.onnx (QDQ + ai.qgraph::BiQGEMM) and open it in onnxruntime with its "
                         "graph optimizations on, reporting which int8 kernels it fused; the convs that feed residual "
                         "Adds get quantized outputs (annotate{residual_outputs}) so they fuse too")
    lo.add_argument("--quiet", action="store_true", help="no progress output")
    lo.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    lo.set_defaults(func=cmd_lower)

    tg = sub.add_parser("targets", help="list, show or validate target specs")
    tg.add_argument("action", choices=["list", "show", "validate"], nargs="?", default="list")
    tg.add_argument("name", nargs="?")
    tg.add_argument("--json", action="store_true")
    tg.set_defaults(func=cmd_targets)

    ps = sub.add_parser("passes", help="list registered passes with their options")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_passes)

    be = sub.add_parser("bench", help="run a benchmark (prints a Markdown table; --json for records)")
    be.add_argument("name", choices=sorted(BENCHES))
    be.add_argument("--quick", action="store_true", help="the < 60 s subset holding the headline case")
    be.add_argument("--json", metavar="PATH", help="write records {case, metric, value} to PATH")
    be.set_defaults(func=cmd_bench)

    from qgraph.search.cli import add_parser as add_search_parser

    add_search_parser(sub)

    from qgraph.llm.cli import add_parsers as add_llm_parsers

    add_llm_parsers(sub)

    ex = sub.add_parser("export", help="export a saved quantized model (qgraph lower's model/ folder) to ONNX")
    ex.add_argument("artifact", help="the model/ folder written by qgraph lower")
    ex.add_argument("--out", required=True, help="path of the .onnx file to write")
    ex.add_argument("--model", help="the float model the artifact was made from (needed unless it is a bundled "
                                    "model); its weights must match the artifact's fingerprint")
    ex.add_argument("--portable", action="store_true", help="BiQGEMM as standard ONNX ops (no custom op)")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_export)

    ins = sub.add_parser("inspect", help="print a model's graph (optionally after a pipeline)")
    ins.add_argument("model")
    ins.add_argument("--pipeline")
    ins.add_argument("--target", default="x86-avx2")
    ins.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors, --help and --version: a return code, so main(argv) runs in-process
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "lower":
        args.target_default = args.target is None
        args.target = args.target or "x86-avx2"
    if getattr(args, "quiet", False):
        _silence()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
