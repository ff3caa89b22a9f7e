"""End to end: qgraph's lowered models against the runtimes a user already has, on this host.

Cases: all-MiniLM-L6-v2 at 64 and 128 tokens, MobileNetV2 (224x224), SmolLM2-135M prefill of 128 tokens;
batches 1 and 8. Rows per case:
- eager fp32; torch.compile fp32 (Inductor); onnxruntime fp32 (dynamo export, graph optimizations on);
- torch dynamic int8 (``torch.ao`` quantize_dynamic of the Linears);
- onnxruntime int8: ``quantize_dynamic`` for the transformers, static QDQ per-channel (``quantize_static``,
  calibrated on the calibration photos) for the convnet;
- qgraph routes, lowered for x86-avx2 and run eagerly and compiled (``torch.compile`` of the lowered graph):
  W8A8 (int8 GEMMs / convs, calibrated activations), BCQ-4 and BCQ-3 (groups of 128, BiQGEMM);
- the strategy qgraph's own search chooses (``searched``; round-to-nearest; its trials are cached in
  ~/.cache/qgraph/search/e2e-trials.jsonl), lowered like the others: for MiniLM within BCQ-4 g128's stored bytes
  (per Linear W8A8, int8 / int4 weight-only or BCQ-3/4), for MobileNetV2 within uniform W8A7's (per conv fp32,
  W8A7, int8 / int4 weight-only or BCQ-3/4; also run by onnxruntime); not for SmolLM2, whose search takes longer
  than this bench (bench/search.py);
- qgraph's onnxruntime route for the W8A8 rows (``-> onnxruntime``): the same quantized model written by
  qgraph.export_onnx (QDQ) and run by onnxruntime, which fuses it into its int8 kernels (counted in the note);
  MobileNetV2's quantizes the outputs of the convs that feed residual Adds too (``annotate{residual_outputs}``),
  so onnxruntime runs them as int8 kernels.

Each row: median latency (ms) over interleaved rounds (every row of a case is called once per round, so load
hits them alike), speedup vs onnxruntime fp32 (> 1 is faster), stored weight bytes, and quality against
fp32: mean cosine of the sentence embeddings on bench/quality_minilm.py's evaluation sentences (MiniLM), top-1
agreement on the 96 bundled evaluation views (MobileNetV2), top-1 next-token agreement on 128-token windows of
an evaluation play (SmolLM2). A compiled row's quality is its eager row's; its output's distance to the eager
output on the timed inputs is checked and printed. 2 intra-op threads everywhere (torch and onnxruntime).

    python bench/e2e.py [--quick] [--json out.json] [--models minilm,mobilenetv2,smollm2] [--profile] [--spin]

Thread waits: on a loaded 2-core machine, threads that spin-wait between kernels steal the core the other
runtime's (or their own) worker needs; measured here, libgomp's default active waits made compiled torch
graphs 4-6x slower and onnxruntime's spinning pool made the torch call after it up to 10x slower. So by
default torch runs with ``OMP_WAIT_POLICY=PASSIVE`` (set before torch loads; the bench re-runs itself in a
child process when torch was loaded first, as under ``qgraph bench e2e``) and onnxruntime sessions with
``session.intra_op.allow_spinning=0`` (faster for onnxruntime too on this loaded host). ``--spin`` keeps both
runtimes' defaults.

``--quick``: MiniLM at 64 tokens only (the issue-20 headline; up to 5 minutes, since lowering and compiling
are part of it). ``--json PATH`` also writes PATH's stem + ``.md`` (the tables) and ``.png`` (speedups).
``--profile``: torch.profiler by op for the fastest qgraph route of each case (what bounds it).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
SPIN = "--spin" in sys.argv
TORCH_LOADED_FIRST = "torch" in sys.modules  # then libgomp already read its wait policy
if not SPIN and __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _records import Records, machine, markdown_table  # noqa: E402
from torch import nn  # noqa: E402

import qgraph  # noqa: E402
from qgraph.api import CANONICALIZE, lowering_pipeline  # noqa: E402
from qgraph.report import stored_bytes  # noqa: E402

THREADS = 2
GOALS = ("MiniLM seq 64: best qgraph route with cosine >= 0.99 at >= 1.3x onnxruntime fp32 (batch 1 and 8); "
         "BCQ-4 cosine >= 0.96 at >= 0.9x; MobileNetV2 int8 top-1 agreement >= 0.95 at >= 1.2x (batch 1 and 8)")


# --- rows ------------------------------------------------------------------------------------------------
@dataclass
class Route:
    """One way to run a model: ``fn(*inputs)`` -> output tensor, its stored bytes and quality."""

    name: str
    fn: Callable
    bytes: int | None
    quality: float | None = None
    build_s: float | None = None
    note: str = ""
    eager_of: str | None = None  # a compiled route: the eager route it compiles
    compile_s: dict = field(default_factory=dict)  # per timed shape: first-call seconds (compile + run)
    qgraph: bool = False


def _quiet():
    """The exporters and quantizers print progress and warnings; keep the tables readable."""
    stack = contextlib.ExitStack()
    sink = io.StringIO()
    stack.enter_context(contextlib.redirect_stdout(sink))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))


def _state_bytes(model: nn.Module) -> int:
    """Bytes of torch.save(state_dict): what a torch.ao quantized model stores (its packed weights included)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


class OrtModel:
    """An onnxruntime session called with positional torch tensors (names from the model's inputs); ``qgraph_file``:
    a file written by qgraph.export_onnx, opened with `qgraph.export.session_options` (its custom op when the
    file uses it), and the op types of the graph onnxruntime runs counted in ``optimized_ops``."""

    def __init__(self, path: Path, qgraph_file: bool = False):
        import collections

        import onnx
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if qgraph_file:
            from qgraph.export.ort_ops import session_options
            from qgraph.export.parity import uses_custom_ops

            opts = session_options(opts, custom_ops=uses_custom_ops(path))
            opts.optimized_model_filepath = str(path.with_name(path.stem + "-optimized.onnx"))
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if SPIN else "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.path = path
        self.optimized_ops: collections.Counter = collections.Counter()
        if qgraph_file:
            optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
            self.optimized_ops.update(n.op_type for n in optimized.graph.node)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        feed = {n: a.numpy() for n, a in zip(self.names, args, strict=True)}
        return torch.from_numpy(self.session.run(None, feed)[0])


def export_onnx(model: nn.Module, example: tuple, names: list[str], dynamic: dict, path: Path) -> Path:
    with _quiet():
        torch.onnx.export(model, example, str(path), dynamo=True, input_names=names, output_names=["out"],
                          dynamic_shapes=dynamic, external_data=True)
    return path


def ort_dynamic_int8(fp32: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, use_external_data_format=True)
    return out


def ort_static_qdq(fp32: Path, out: Path, calib: list[tuple], names: list[str]) -> Path:
    """onnxruntime's recipe: quant_pre_process (shape inference + graph optimization, which folds BatchNorm
    into Conv), then quantize_static QDQ, per-channel int8 weights, uint8 activations, MinMax calibration."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{n: t.numpy() for n, t in zip(names, batch, strict=True)} for batch in calib])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_name(out.stem + "-pre.onnx")
    with _quiet():
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=True)
    return out


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    with _quiet():
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def compiled(model: Callable) -> Callable:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    return torch.compile(model)


def qgraph_route(name: str, model: nn.Module, example: tuple, calib: list, pipeline: str, dynamic_shapes: Any,
                 quality: Callable[[Callable], float], ort_dir: Path | None = None,
                 strategy: dict | None = None, note: str = "") -> list[Route]:
    """A lowered qgraph model, as an eager route and a compiled route (the compiled callable built by
    `QuantizedModel.compile_execution`, which compiles on its first call per shape); with ``ort_dir`` also
    qgraph's onnxruntime route: the model exported by qgraph.export_onnx (QDQ) and run in onnxruntime."""
    start = time.perf_counter()
    with _quiet():
        q = qgraph.quantize(model, example, target="x86-avx2", calib=calib, pipeline=pipeline,
                            dynamic_shapes=dynamic_shapes, progress=False, strategy=strategy)
    build = time.perf_counter() - start
    mode = (q.report.get("lower-bcq") or {}).get("mode")
    lowered = sum(r["status"] == "lowered" for r in q.report.get("lowering", []))
    total = len(q.report.get("lowering", []))
    note = (f"{note}; " if note else "") + f"{lowered}/{total} lowered" + (
        f", BiQGEMM {mode}" if mode and ("scheme=bcq" in pipeline or strategy) else "")
    verify = q.report.get("verify") or {}
    if verify.get("output_rel_err") is not None:
        note += f", lowered vs simulation {verify['output_rel_err']:.1e}"
    eager = Route(f"qgraph {name}", q.eager, stored_bytes(q.gm), build_s=build, note=note, qgraph=True)
    eager.quality = quality(q.eager)
    from qgraph.execution import compile_module

    state: dict[str, Any] = {}

    def lazy_compiled(*args):  # compiled at its first call (the first timed shape); recompiles per new shape
        if "call" not in state:
            call, _, err = compile_module(q.gm, args)
            state["call"] = call if call is not None else q.gm
            if err:
                comp.note += f"; compile failed, eager: {err}"
        return state["call"](*args)

    comp = Route(f"qgraph {name} compiled", lazy_compiled, eager.bytes, eager.quality, note=note,
                 eager_of=eager.name, qgraph=True)
    return [eager, comp] + ([qgraph_ort_route(name, q, example, dynamic_shapes, quality, ort_dir)] if ort_dir else [])


def qgraph_ort_route(name: str, q: Any, example: tuple, dynamic_shapes: Any, quality: Callable[[Callable], float],
                     tmp: Path) -> Route:
    """``q`` exported to QDQ ONNX and run by onnxruntime; the note counts the fused int8 kernels. The convnet is
    exported with ``quantized_residuals`` (its residual Adds read the Q/DQ'd conv outputs, so those convs fuse
    too; its quality is measured on that file)."""
    from qgraph.export.runtime import FUSED_INT8_OPS, UNFUSED_QDQ_OPS

    start = time.perf_counter()
    path = tmp / f"qgraph-{''.join(c if c.isalnum() else '-' for c in name)}.onnx"
    with _quiet():
        qgraph.export_onnx(q, path, example, dynamic_shapes=dynamic_shapes,
                           quantized_residuals=name in QUANTIZED_RESIDUALS)
    sess = OrtModel(path, qgraph_file=True)
    fused = sum(c for op, c in sess.optimized_ops.items() if op in FUSED_INT8_OPS)
    unfused = sum(c for op, c in sess.optimized_ops.items() if op in UNFUSED_QDQ_OPS)
    kinds = ", ".join(f"{op} {c}" for op, c in sorted(sess.optimized_ops.items()) if op in FUSED_INT8_OPS)
    note = f"qgraph.export_onnx QDQ; onnxruntime runs {fused} int8 kernels ({kinds}), {unfused} Q/DQ left"
    return Route(f"qgraph {name} -> onnxruntime", sess, _file_bytes(path), quality(sess),
                 build_s=time.perf_counter() - start, note=note, qgraph=True)


#: qgraph routes that also get an onnxruntime row (their QDQ export fuses into onnxruntime's int8 kernels)
ORT_ROUTES = ("W8A8 SmoothQuant", "W8A8 (int8 convs)")
SEARCHED = "searched (<= BCQ-4 g128 bytes)"
SEARCHED_CONV = "searched (<= W8A7 bytes)"
QUANTIZED_RESIDUALS = ("W8A8 (int8 convs)", SEARCHED_CONV)


# --- timing ----------------------------------------------------------------------------------------------
def time_case(routes: list[Route], inputs: tuple, rounds: int, budget_s: float, key: str) -> dict[str, list[float]]:
    """Warm every route up on ``inputs`` (first call: compile for compiled routes, timed apart), then
    ``rounds`` interleaved rounds (fewer once ``budget_s`` is spent, at least 3)."""
    times: dict[str, list[float]] = {r.name: [] for r in routes}
    with torch.no_grad():
        for r in routes:
            t = time.perf_counter()
            r.fn(*inputs)
            r.compile_s[key] = time.perf_counter() - t
            r.fn(*inputs)
        spent = 0.0
        for i in range(rounds):
            for r in routes:
                t = time.perf_counter()
                r.fn(*inputs)
                dt = time.perf_counter() - t
                times[r.name].append(dt)
                spent += dt
            if i >= 2 and spent > budget_s:
                break
    return times


PROFILE_GROUPS = (("oneDNN int8 kernels", ("onednn::",)), ("qgraph ops (BiQGEMM; int8 wrappers)", ("qgraph::",)),
                  ("attention", ("scaled_dot_product", "attention")),
                  ("Inductor-generated kernels", ("cpp_fused", "graph_")), ("float GEMM / conv", (
                      "aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn", "conv",
                      "aten::_weight_int8pack_mm")))


def profile_route(route: Route, inputs: tuple, calls: int = 5, top: int = 10) -> tuple[dict[str, float], str]:
    """torch.profiler by op of ``calls`` calls of ``route``: (ms per call by group, the top ops by self time).
    Groups (self time): oneDNN's int8 GEMM/conv, qgraph's ops (the BiQGEMM kernel runs inside its op; the int8
    ops are wrappers around oneDNN), attention, Inductor's generated kernels (named when --profile set
    ``torch._inductor.config.cpp.enable_kernel_profile`` before compiling), float GEMM/conv, and the rest:
    other ATen ops and the Python / wrapper time between kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        route.fn(*inputs)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                route.fn(*inputs)
        wall = (time.perf_counter() - start) / calls * 1e3
    groups = {g: 0.0 for g, _ in PROFILE_GROUPS}
    for e in prof.key_averages():
        for g, keys in PROFILE_GROUPS:
            if any(k in e.key for k in keys):
                groups[g] += e.self_cpu_time_total / 1e3 / calls
                break
    groups["everything else (other ops, Python, wrappers, waits)"] = max(0.0, wall - sum(groups.values()))
    groups["wall (profiled)"] = wall
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=50)
    return groups, table


# --- models ----------------------------------------------------------------------------------------------
@dataclass
class Suite:
    """A model, its routes and the timed cases (label, inputs)."""

    model: str
    metric: str
    routes: list[Route]
    cases: list[tuple[str, tuple]]
    notes: list[str] = field(default_factory=list)


def minilm_suite(quick: bool, tmp: Path, seqs: tuple[int, ...], batches: tuple[int, ...]) -> Suite:
    from qgraph.data.text import calibration_plays, evaluation_plays, sentences
    from qgraph.models.minilm import dynamic_shapes, encode, load_minilm

    model, tok = load_minilm()
    eval_texts = sentences(evaluation_plays(), 64 if quick else 256, seed=1)  # bench/quality_minilm.py's
    calib_texts = sentences(calibration_plays(), 32 if quick else 64, seed=2)
    calib = [encode(calib_texts[i:i + 16], tok, max_length=64) for i in range(0, len(calib_texts), 16)]
    calib = [(b["input_ids"], b["attention_mask"]) for b in calib]
    eval_batches = [encode(eval_texts[i:i + 32], tok, max_length=64) for i in range(0, len(eval_texts), 32)]
    eval_batches = [(b["input_ids"], b["attention_mask"]) for b in eval_batches]
    with torch.no_grad():
        ref = torch.cat([model(*b) for b in eval_batches])

    def quality(fn) -> float:
        with torch.no_grad():
            out = torch.cat([fn(*b) for b in eval_batches])
        return float(F.cosine_similarity(out, ref, dim=-1).mean())

    names = ["input_ids", "attention_mask"]
    routes = [Route("eager fp32", model, stored_bytes(model), 1.0),
              Route("torch.compile fp32", compiled(model), stored_bytes(model), 1.0, eager_of="eager fp32")]
    t = time.perf_counter()
    fp32 = export_onnx(model, calib[0], names, dynamic_shapes(), tmp / "minilm.onnx")
    ort_fp32 = OrtModel(fp32)
    routes.append(Route("onnxruntime fp32", ort_fp32, _file_bytes(fp32), quality(ort_fp32),
                        build_s=time.perf_counter() - t))
    t = time.perf_counter()
    dyn = torch_dynamic_int8(model)
    routes.append(Route("torch dynamic int8", dyn, _state_bytes(dyn), quality(dyn), build_s=time.perf_counter() - t))
    t = time.perf_counter()
    ort8 = OrtModel(ort_dynamic_int8(fp32, tmp / "minilm-int8.onnx"))
    routes.append(Route("onnxruntime int8 (quantize_dynamic)", ort8, _file_bytes(ort8.path), quality(ort8),
                        build_s=time.perf_counter() - t))
    for name, pipe in {**minilm_pipelines(), **activation_spec_pipelines()}.items():
        if ONLY_ROUTES and name not in ONLY_ROUTES:
            continue
        routes += qgraph_route(name, model, calib[0], calib, pipe, dynamic_shapes(), quality,
                               tmp if name in ORT_ROUTES else None)
    if not ONLY_ROUTES or SEARCHED in ONLY_ROUTES:
        strategy, how = searched_strategy("minilm", quick, "bcq4-g128")
        routes += qgraph_route(SEARCHED, model, calib[0], calib, lowering_pipeline(verify_tol=1e-2),
                               dynamic_shapes(), quality, strategy=strategy, note=how)
    cases = []
    texts = eval_texts[:max(batches)]
    for seq in seqs:
        for b in batches:
            enc = tok(texts[:b], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
            cases.append((f"minilm s{seq} b{b}", (enc["input_ids"], enc["attention_mask"])))
    return Suite("minilm", "cosine", routes, cases,
                 [f"quality: mean cosine to fp32 over {len(eval_texts)} evaluation sentences (bench/quality_minilm.py); "
                  f"calibration {len(calib_texts)} sentences of other plays; timed inputs padded to the sequence length"])


ONLY_ROUTES: tuple[str, ...] = ()  # --routes: the qgraph MiniLM routes to build (default: all)


def searched_strategy(model_name: str, quick: bool, size_of: str) -> tuple[dict, str]:
    """The strategy qgraph's own search (NSGA-II over Hessian-trace sensitivities, trials scored on the model's
    search sentences, cached in ~/.cache/qgraph/search/e2e-trials.jsonl) chooses for x86-avx2 within the stored
    bytes of the uniform strategy ``size_of``: per Linear fp32, W8A8 (int8 kernels), int8 / int4 weight-only or
    BCQ-3/4 (BiQGEMM), groups of 128, round-to-nearest. Returns its ``strategy=`` annotations and a note of what
    it chose."""
    from dataclasses import replace

    from qgraph.search import Constraints, SearchOptions, SpaceOptions, Workbench, build_space, run_search
    from qgraph.search.objectives import summarize

    space_opts = SpaceOptions(uniform_bits=(8, 4), uniform_group_sizes=(128,), bcq_bits=(3, 4),
                              bcq_group_sizes=(128,), act=True)
    opts = SearchOptions(model=model_name, target="x86-avx2", trials=12 if quick else 30, seed=0, workers=1,
                         space=space_opts, n_eval=32, hutchinson_max_iter=10, baselines=(size_of,),
                         cache=str(Path.home() / ".cache" / "qgraph" / "search" / "e2e-trials.jsonl"))
    start = time.perf_counter()
    with _quiet():
        bench = Workbench(opts.eval_config())
        space = build_space(bench.graph, bench.target, space_opts)
        limit = space.weight_bytes(space.uniform(size_of))
        result = run_search(replace(opts, constraints=Constraints(max_bytes=limit)), bench=bench)
    torch.set_num_threads(THREADS)
    if result.chosen is None:
        raise SystemExit(f"the {model_name} search found no strategy within {size_of}'s {limit / 1e6:.2f} MB")
    choices = ", ".join(f"{k} x{v}" for k, v in summarize(space, result.chosen.assignment).items())
    how = (f"searched in {time.perf_counter() - start:.0f} s ({opts.trials} trials): {choices}; "
           f"{result.chosen.analytic.bytes / 1e6:.2f} MB of weights")
    return result.chosen.strategy.config(), how


def activation_spec_pipelines() -> dict[str, str]:
    """MiniLM only, issue 22's activation specs: static per-tensor without SmoothQuant, dynamic per-token with
    SmoothQuant (alpha=auto), and dynamic asymmetric per-token with SmoothQuant and GPTQ (cosine >= 0.999)."""
    return {
        "W8A8 static": lowering_pipeline("bits=8,act_bits=8"),
        "W8A8 dynamic per-token SmoothQuant": lowering_pipeline("bits=8,act_bits=8,act_dynamic=token").replace(
            ",calibrate,", ",smooth-quant,calibrate,"),
        "W8A8 dynamic per-token asym SmoothQuant GPTQ": lowering_pipeline(
            "bits=8,act_bits=8,act_dynamic=token,act_symmetric=false").replace(",calibrate,", ",smooth-quant,calibrate,gptq,"),
    }


def minilm_pipelines() -> dict[str, str]:
    """The qgraph routes for transformers (the best recipe per format measured on MiniLM's evaluation sentences):
    - W8A8: int8 weights per channel, 8-bit calibrated activations, SmoothQuant (cosine 0.997; plain 0.990);
    - BCQ-4 / BCQ-3, groups of 128, GPTQ with the BCQ quantizer (BCQ-4 0.976 vs 0.953 without GPTQ), on
      BiQGEMM's fast tables (lower-bcq picks fast mode for a verify tolerance >= 1e-2)."""
    return {
        "W8A8 SmoothQuant": lowering_pipeline("bits=8,act_bits=8").replace(",calibrate,", ",smooth-quant,calibrate,"),
        "BCQ-4 g128 GPTQ": lowering_pipeline("scheme=bcq,bits=4,group_size=128", verify_tol=1e-2).replace(
            ",calibrate,", ",calibrate,gptq,"),
        "BCQ-3 g128 GPTQ": lowering_pipeline("scheme=bcq,bits=3,group_size=128", verify_tol=1e-2).replace(
            ",calibrate,", ",calibrate,gptq,"),
    }


def mobilenet_suite(quick: bool, tmp: Path, batches: tuple[int, ...]) -> Suite:
    from qgraph.data.eval_sets import agreement, eval_set, predict
    from qgraph.models.mobilenetv2 import load_mobilenetv2

    model = load_mobilenetv2().eval()
    es = eval_set("mobilenetv2")  # the 96 evaluation views; calibration: 8 x 8 views of other photos
    ref = predict(model, es.inputs)
    calib = es.calibration

    def quality(fn) -> float:
        with torch.no_grad():
            out = torch.cat([fn(es.inputs[i:i + 32]) for i in range(0, es.inputs.shape[0], 32)])
        return agreement(ref, out)

    dyn = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    routes = [Route("eager fp32", model, stored_bytes(model), 1.0),
              Route("torch.compile fp32", compiled(model), stored_bytes(model), 1.0, eager_of="eager fp32")]
    t = time.perf_counter()
    fp32 = export_onnx(model, (calib[0][0][:2],), ["x"], dyn, tmp / "mobilenetv2.onnx")
    ort_fp32 = OrtModel(fp32)
    routes.append(Route("onnxruntime fp32", ort_fp32, _file_bytes(fp32), quality(ort_fp32),
                        build_s=time.perf_counter() - t))
    t = time.perf_counter()
    dq = torch_dynamic_int8(model)
    routes.append(Route("torch dynamic int8", dq, _state_bytes(dq), quality(dq), build_s=time.perf_counter() - t,
                        note="only the classifier is a Linear"))
    t = time.perf_counter()
    qdq = OrtModel(ort_static_qdq(fp32, tmp / "mobilenetv2-qdq.onnx", calib, ["x"]))
    routes.append(Route("onnxruntime int8 (static QDQ per-channel)", qdq, _file_bytes(qdq.path), quality(qdq),
                        build_s=time.perf_counter() - t))
    for name, pipe in mobilenet_pipelines().items():
        routes += qgraph_route(name, model, (calib[0][0][:2],), calib, pipe, None, quality,
                               tmp if name in ORT_ROUTES else None)
    strategy, how = searched_strategy("mobilenetv2", quick, "w8-ch+a7")
    routes += qgraph_route(SEARCHED_CONV, model, (calib[0][0][:2],), calib, lowering_pipeline(verify_tol=1e-2), None,
                           quality, tmp, strategy=strategy, note=how)
    x = es.inputs
    cases = [(f"mobilenetv2 b{b}", (torch.cat([x] * (1 + b // x.shape[0]))[:b],)) for b in batches]
    return Suite("mobilenetv2", "agreement", routes, cases,
                 [f"quality: top-1 agreement with fp32 on {es.description}"])


def mobilenet_pipelines() -> dict[str, str]:
    """int8: 8-bit activations calibrated by percentile on the 64 calibration views (top-1 agreement of the
    simulation on the 96 evaluation views: 0.969; A8 MSE 0.896, A8 min-max 0.896, A7 MSE 0.813; A8 MSE on
    the 11 center crops 0.927), and the outputs of the 10 convs that feed residual Adds quantized too, by MSE
    ranges (``residual_outputs``: onnxruntime then runs 51 of the 52 convs as QLinearConv instead of 41;
    agreement 0.958 in torch, 0.969 in onnxruntime; with percentile ranges there 0.948 / 0.906). Exact on CPUs
    with VNNI; without VNNI lower-int8 keeps the convs whose int16 pair sums could saturate float
    (bench/lowered_mobilenetv2.py uses 7-bit activations there). BCQ rows lower the classifier only (BiQGEMM
    has no conv kernel)."""
    return {
        "W8A8 (int8 convs)": f"{CANONICALIZE},annotate{{act_bits=8,act_observer=percentile,residual_outputs=true}},"
                             "calibrate,quantize-weights,insert-fq,lower-int8,dce",
        "BCQ-4 g128": lowering_pipeline("scheme=bcq,bits=4,group_size=128", fallback=True, verify_tol=1e-2),
    }


def smollm2_suite(quick: bool, tmp: Path, batches: tuple[int, ...], seq: int = 128) -> Suite:
    from qgraph.data.text import calibration_plays, evaluation_plays, load_play
    from qgraph.models import smollm2
    from qgraph.models.registry import BUNDLED

    b = BUNDLED["smollm2"]
    loaded = b.load()
    model, tok = loaded.module.eval(), loaded.tokenizer
    windows = smollm2.token_windows(tok, load_play(evaluation_plays()[0]), seq, 8)
    calib_rows = smollm2.token_windows(tok, load_play(calibration_plays()[0]), seq, 8)
    calib = [(calib_rows[i:i + 2],) for i in range(0, 8, 2)]
    with torch.no_grad():
        ref = torch.cat([model(windows[i:i + 2]).argmax(-1) for i in range(0, windows.shape[0], 2)])

    def quality(fn) -> float:
        with torch.no_grad():
            top = torch.cat([fn(windows[i:i + 2]).argmax(-1) for i in range(0, windows.shape[0], 2)])
        return float((top == ref).float().mean())

    routes = [Route("eager fp32", model, stored_bytes(model), 1.0),
              Route("torch.compile fp32", compiled(model), stored_bytes(model), 1.0, eager_of="eager fp32")]
    dyn = {"input_ids": {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2, max=2048)}}
    t = time.perf_counter()
    fp32 = export_onnx(model, (calib_rows[:2],), ["input_ids"], dyn, tmp / "smollm2.onnx")
    ort_fp32 = OrtModel(fp32)
    routes.append(Route("onnxruntime fp32", ort_fp32, _file_bytes(fp32), quality(ort_fp32),
                        build_s=time.perf_counter() - t))
    t = time.perf_counter()
    dq = torch_dynamic_int8(model)
    routes.append(Route("torch dynamic int8", dq, _state_bytes(dq), quality(dq), build_s=time.perf_counter() - t))
    t = time.perf_counter()
    ort8 = OrtModel(ort_dynamic_int8(fp32, tmp / "smollm2-int8.onnx"))
    routes.append(Route("onnxruntime int8 (quantize_dynamic)", ort8, _file_bytes(ort8.path), quality(ort8),
                        build_s=time.perf_counter() - t))
    for name, pipe in minilm_pipelines().items():
        routes += qgraph_route(name, model, (calib_rows[:2],), calib, pipe, b.dynamic_shapes(), quality)
    cases = [(f"smollm2 prefill{seq} b{bb}", (torch.cat([windows] * (1 + bb // windows.shape[0]))[:bb],))
             for bb in batches]
    return Suite("smollm2", "agreement", routes, cases,
                 [f"quality: top-1 next-token agreement with fp32 over {windows.numel()} positions "
                  f"({windows.shape[0]} windows of {seq} tokens of {evaluation_plays()[0]})"])


# --- output ----------------------------------------------------------------------------------------------
def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}"


def run_suite(suite: Suite, rec: Records, rounds: int, budget_s: float, profile: bool,
              profiles: list) -> list[tuple[str, list]]:
    tables = []
    for label, inputs in suite.cases:
        times = time_case(suite.routes, inputs, rounds, budget_s, label)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ort = med["onnxruntime fp32"]
        by_name = {r.name: r for r in suite.routes}
        rows = []
        with torch.no_grad():
            for r in suite.routes:
                err = ""
                if r.eager_of is not None:
                    a, b = r.fn(*inputs), by_name[r.eager_of].fn(*inputs)
                    err = f"{float((a - b).abs().max() / b.abs().max()):.1e}"
                ms = med[r.name]
                case = f"{label} {r.name}"
                rec.add(case, "median_us", ms * 1e3)
                rec.add(case, "speedup_vs_ort_fp32", ort / ms)
                if r.bytes is not None:
                    rec.add(case, "bytes", r.bytes)
                if r.quality is not None:
                    rec.add(case, suite.metric, r.quality)
                if r.build_s is not None:
                    rec.add(f"{label} {r.name} build", "seconds", r.build_s)
                if r.eager_of is not None:
                    rec.add(f"{label} {r.name} first call (compile)", "seconds", r.compile_s[label])
                rows.append([r.name, round(ms, 2), f"{ort / ms:.2f}x", _mb(r.bytes),
                             "—" if r.quality is None else f"{r.quality:.4f}",
                             f"{r.compile_s[label]:.1f}" if r.eager_of else "", err, r.note])
        tables.append((label, rows))
        if profile:
            for r in suite.routes:
                if r.qgraph and r.eager_of is not None:
                    groups, table = profile_route(r, inputs)
                    profiles.append((f"{label} {r.name}", groups))
                    print(f"\nprofile: {label}, {r.name} (median {med[r.name]:.2f} ms)\n{table}", file=sys.stderr)
    return tables


def goal_rows(rec: Records) -> list[list]:
    """The issue-20 goals against the records (only the cases that ran)."""
    val = {(r["case"], r["metric"]): r["value"] for r in rec.items}
    rows = []
    for b in (1, 8):
        case = f"minilm s64 b{b}"
        cands = [(val[(c, "speedup_vs_ort_fp32")], c[len(case) + 1:]) for (c, m) in val
                 if m == "cosine" and c.startswith(f"{case} qgraph") and val[(c, m)] >= 0.99]
        if (f"{case} onnxruntime fp32", "median_us") in val:
            best = max(cands) if cands else None
            rows.append([f"MiniLM s64 b{b}: best qgraph route with cosine >= 0.99 at >= 1.3x ORT fp32",
                         f"{best[1]}: {best[0]:.2f}x" if best else "no qgraph route reaches cosine 0.99",
                         "yes" if best and best[0] >= 1.3 else "no"])
            bcq = [(val[(c, "speedup_vs_ort_fp32")], val[(c, "cosine")], c[len(case) + 1:]) for (c, m) in val
                   if m == "cosine" and c.startswith(f"{case} qgraph BCQ-4")]
            if bcq:
                s, cos, name = max(bcq)
                rows.append([f"MiniLM s64 b{b}: BCQ-4 cosine >= 0.96 at >= 0.9x ORT fp32",
                             f"{name}: {s:.2f}x, cosine {cos:.4f}", "yes" if s >= 0.9 and cos >= 0.96 else "no"])
        case = f"mobilenetv2 b{b}"
        cands = [(val[(c, "speedup_vs_ort_fp32")], val[(c, "agreement")], c[len(case) + 1:]) for (c, m) in val
                 if m == "agreement" and c.startswith(f"{case} qgraph W8")]
        if cands:
            s, agr, name = max([c for c in cands if c[1] >= 0.95] or cands)
            rows.append([f"MobileNetV2 b{b}: int8 top-1 agreement >= 0.95 at >= 1.2x ORT fp32",
                         f"{name}: {s:.2f}x, agreement {agr:.3f}", "yes" if s >= 1.2 and agr >= 0.95 else "no"])
    return rows


def plot(tables: list[tuple[str, list]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 1, figsize=(9, 2.6 * len(tables)), squeeze=False)
    for ax, (label, rows) in zip(axes[:, 0], tables, strict=True):
        names = [r[0] for r in rows]
        speed = [float(r[2].rstrip("x")) for r in rows]
        colors = ["#c55a11" if n.startswith("qgraph") else "#7f7f7f" for n in names]
        ax.barh(range(len(names)), speed, color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{label}: speedup vs onnxruntime fp32 (> 1 is faster)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_tables(items: list[dict]) -> str:
    """One compact table per model from the records: a row per route, quality and stored MB, then per case
    'median ms (speedup vs ORT fp32)'."""
    import re

    pat = re.compile(r"^(?P<model>\S+)(?P<shape>( s\d+| prefill\d+)? b\d+) (?P<route>.+)$")
    val: dict[tuple[str, str, str], float] = {}
    cases: dict[str, list[str]] = {}
    routes: dict[str, list[str]] = {}
    metric_of: dict[str, str] = {}
    for r in items:
        m = pat.match(r["case"])
        if not m or r["metric"] not in ("median_us", "speedup_vs_ort_fp32", "bytes", "cosine", "agreement"):
            continue
        model, case, route = m["model"], m["shape"].strip(), m["route"]
        cases.setdefault(model, [])
        routes.setdefault(model, [])
        if case not in cases[model]:
            cases[model].append(case)
        if route not in routes[model]:
            routes[model].append(route)
        if r["metric"] in ("cosine", "agreement"):
            metric_of[model] = r["metric"]
        val[(model, f"{case} {route}", r["metric"])] = r["value"]
    out = []
    for model, cs in cases.items():
        metric = metric_of.get(model, "quality")
        header = ["route", metric, "stored MB", *[f"{c}: ms (x ORT fp32)" for c in cs]]
        rows = []
        for route in routes[model]:
            first = f"{cs[0]} {route}"
            q = val.get((model, first, metric))
            b = val.get((model, first, "bytes"))
            row = [route, "—" if q is None else f"{q:.4f}", _mb(None if b is None else int(b))]
            for c in cs:
                us = val.get((model, f"{c} {route}", "median_us"))
                sp = val.get((model, f"{c} {route}", "speedup_vs_ort_fp32"))
                row.append("—" if us is None else f"{us / 1e3:.1f} ({sp:.2f}x)")
            rows.append(row)
        out += [f"#### {model}", "", markdown_table(header, rows), ""]
    return "\n".join(out)


HEADER = ["route", "median ms", "vs ORT fp32", "stored MB", "quality", "first call s", "rel. err vs eager", "note"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MiniLM at 64 tokens only (<= 5 minutes)")
    ap.add_argument("--json", metavar="PATH", help="write records (case, metric, value); also PATH.md and PATH.png")
    ap.add_argument("--models", help="comma list of minilm, mobilenetv2, smollm2 (default: all; quick: minilm)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per case (default 10; quick 7)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler by op of each compiled qgraph route")
    ap.add_argument("--spin", action="store_true", help="keep libgomp's and onnxruntime's spin-waiting threads")
    ap.add_argument("--summarize", metavar="JSON", help="print the compact tables of a saved --json run and exit")
    ap.add_argument("--routes", help="comma list of the qgraph MiniLM routes to build (default: all)")
    args = ap.parse_args(argv)
    global ONLY_ROUTES
    ONLY_ROUTES = tuple(r.strip() for r in args.routes.split(",")) if args.routes else ()
    if args.summarize:
        import json

        items = json.loads(Path(args.summarize).read_text())
        print(summary_tables(items))
        goals = Records()
        goals.items = items
        rows = goal_rows(goals)
        if rows:
            print(markdown_table(["goal", "measured", "met"], rows))
        return 0
    if TORCH_LOADED_FIRST and not args.spin and os.environ.get("QGRAPH_E2E_CHILD") != "1":
        import subprocess  # libgomp read OMP_WAIT_POLICY when torch loaded: run in a fresh interpreter

        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", QGRAPH_E2E_CHILD="1")
        return subprocess.call([sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:])], env=env)
    warnings.filterwarnings("ignore")
    for name in ("torch", "onnxruntime", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    batches = tuple(int(b) for b in args.batches.split(","))
    models = args.models.split(",") if args.models else (["minilm"] if args.quick else
                                                         ["minilm", "mobilenetv2", "smollm2"])
    rounds = args.rounds or (9 if args.quick else 15)
    rec = Records()
    tables, notes, profiles = [], [], []
    if args.profile:  # Inductor's generated kernels show up by name in the profiles
        torch._inductor.config.cpp.enable_kernel_profile = True
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="qgraph-e2e-") as d:
        tmp = Path(d)
        for m in models:
            t = time.perf_counter()
            if m == "minilm":
                suite = minilm_suite(args.quick, tmp, (64,) if args.quick else (64, 128), batches)
            elif m == "mobilenetv2":
                suite = mobilenet_suite(args.quick, tmp, batches)
            elif m == "smollm2":
                suite = smollm2_suite(args.quick, tmp, batches)
            else:
                ap.error(f"unknown model {m!r}")
            print(f"{m}: {len(suite.routes)} routes built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            notes += suite.notes
            tables += run_suite(suite, rec, rounds, 15.0 if args.quick else 30.0, args.profile, profiles)
            del suite
    seconds = time.perf_counter() - start
    rec.add("e2e total", "seconds", seconds)
    load1 = os.getloadavg()[0]
    out = [f"End to end on {machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}, {THREADS} threads; "
           f"1-min load average {load0:.1f} at start, {load1:.1f} at end; median of up to {rounds} interleaved "
           f"rounds; total {seconds:.0f} s; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}, "
           f"onnxruntime spinning {'on' if SPIN else 'off'}", ""]
    out += [f"- {n}" for n in notes]
    out += ["- stored MB: every tensor the runnable model holds (onnxruntime: its files; torch dynamic int8: its "
            "state_dict); first call s: a compiled route's first call at that shape (compilation); rel. err vs "
            "eager: max |compiled - eager| / max |eager| on the timed inputs", ""]
    out += ["### Summary", "", summary_tables(rec.items)]
    for label, rows in tables:
        out += [f"### {label}", "", markdown_table(HEADER, rows), ""]
    if profiles:
        cols = list(profiles[0][1])
        out += ["### Profile by op (torch.profiler, ms per call)", "",
                markdown_table(["case / route", *cols], [[k, *(round(g[c], 2) for c in cols)] for k, g in profiles]),
                ""]
    goals = goal_rows(rec)
    if goals:
        out += ["### Issue-20 goals", "", markdown_table(["goal", "measured", "met"], goals), ""]
    text = "\n".join(out)
    print(text)
    if args.json:
        rec.write(args.json)
        stem = Path(args.json).with_suffix("")
        Path(f"{stem}.md").write_text(f"# bench/e2e.py {'--quick' if args.quick else ''}\n\n{text}\n")
        plot(tables, Path(f"{stem}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
