"""Perplexity and size of SmolLM2-135M under weight-only PTQ: qgraph (RTN, GPTQ, BCQ, GPTQ+BCQ) side by side
with onnxruntime's MatMulNBitsQuantizer (RTN and GPTQ, 4-bit, block 128) on the same model exported to ONNX.

The baseline is the fp32 model dequantized from the GGUF Q4_1 file the package ships (so 4-bit is easy;
2-3 bits are the real test). Perplexity: fixed non-overlapping 512-token windows of an evaluation play;
calibration: 512-token windows of the (disjoint) calibration plays. Quantized: the 210 Linear layers of the
30 transformer blocks; the tied embedding / LM head stays fp32 unless a row says otherwise (ORT leaves it
too: its LM head multiplies by a transposed initializer, which MatMulNBits does not take).
Group size: 192 for qgraph (the divisor of both row lengths, 576 and 1536, nearest to 128: QSpec needs
groups that divide the row, and 128 does not divide 576), plus one GPTQ-3 row at 64; ORT uses blocks of 128
(the last block of a 576 row padded) with fp32 scales. qgraph's GPTQ rows use act_order and sequential
(quantized-prefix) Hessians; GPTQ+BCQ fits α per group with the Hessian diagonal as importance
(alternating BCQ), then rounds column by column. BCQ greedy / weighted are data-free (the quantize-weights
path with bcq_importance=spec); "weighted+z" adds the per-group offset z, the best data-free BCQ setting found
here. "act" rows are round-to-nearest weighted BCQ with the importance E[x_k^2] of each input channel from the
calibration windows (quantize-weights' default when calibration data is there; no GPTQ): BCQ-3 act+z 81.7 at
g192 and 64.0 at g64 against 767 data-free with z, 22,914 without, and 176.8 for RTN-3. Why data-free BCQ
collapses here while RTN does not: from layer 2 on, the first token (the attention sink) carries residual values
near 800 in a few channels, and its v_proj output must stay near zero (sink values are tiny). Summed over all
other tokens, BCQ-3's output error is at most RTN-3's in most layers, but on the sink token's v_proj output in
layers 3-5 it is 1.9-3.2x the output's norm, against 0.39-0.59x for RTN-3 (1.1-1.6x with z). BCQ's levels
±α1±α2±α3 have no zero and magnitude importance favours large weights. Every token attends to the sink, so the
sink's corrupted value reaches every position. GPTQ+BCQ does not collapse: its Hessian is dominated by those
sink channels. aespa rows: q/k/v by `aespa` (attention-aware Hessians + learned rounding), the other
Linears by GPTQ, same act_order; "aespa+BCQ" is aespa's reconstruction with the BCQ quantizer (the best 3- and
2-bit rows measured). "GPTQ-4-sym" is there to compare with ORT's GPTQ, which runs symmetric: its asymmetric
zero-point packing fails on rows with an odd number of blocks (576 = 4.5 x 128). Optional rows (only when named
in ``--methods``): GPTQ+BCQ-3 with an 8-bit row-wise embedding, and GPTQ+BCQ-3 at g96.

Bytes: ``bytes`` is the whole model as stored (quantized linears at their bits with scales / zero points /
α; every other tensor fp32; a tied table counted once); ``linear bytes`` the quantized linears alone.
ORT's GPTQ re-runs the full model once per distinct MatMul input (120) and calibration window; those runs
are identical, so the bench memoizes them (one forward per window; ORT's algorithm code is unchanged).
The ONNX export (~4 min here, batch fixed at 1) is cached under ``qgraph.models.smollm2.disk_cache_dir()``.
With ``--json`` the records (perplexity, bytes, seconds, 1-minute load average) are rewritten after every row.

    python bench/quality_llm.py [--quick] [--json out.json] [--methods ...] [--no-ort]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from _records import Records, markdown_table

import qgraph.passes  # noqa: F401  (registers the built-in passes)
from qgraph.context import PassContext
from qgraph.data.text import evaluation_plays, load_play
from qgraph.ir.trace import trace
from qgraph.models import smollm2
from qgraph.models.registry import BUNDLED
from qgraph.pass_manager import PassManager
from qgraph.passes.quantize_weights import QWEIGHT_KEY
from qgraph.quant.qspec import Annotation, QSpec

GROUP = 192
GPTQ_U = "gptq{act_order=true}"
GPTQ_B = "gptq{act_order=true,bcq_importance=hessian}"
AESPA = "aespa{act_order=true}"
AESPA_B = "aespa{act_order=true,bcq_importance=hessian}"


def _u(bits, group=GROUP):
    return QSpec.uniform(bits, granularity="group", group_size=group, symmetric=False)


def _b(bits, method, **kw):
    return QSpec.bcq(bits, group_size=GROUP, method=method, **kw)


# name -> (weight-optimizing pass or "", spec of the block linears, extra passes before it)
METHODS = {
    "RTN-4": ("", _u(4), ""),
    "RTN-3": ("", _u(3), ""),
    "RTN-2": ("", _u(2), ""),
    "GPTQ-4": (GPTQ_U, _u(4), ""),
    "GPTQ-3": (GPTQ_U, _u(3), ""),
    "GPTQ-2": (GPTQ_U, _u(2), ""),
    "GPTQ-3-g64": (GPTQ_U, _u(3, 64), ""),
    "GPTQ-4-sym": (GPTQ_U, QSpec.uniform(4, granularity="group", group_size=GROUP, symmetric=True), ""),
    "BCQ-3-greedy": ("", _b(3, "greedy"), ""),
    "BCQ-2-greedy": ("", _b(2, "greedy"), ""),
    "BCQ-3-weighted": ("", _b(3, "weighted"), ""),
    "BCQ-2-weighted": ("", _b(2, "weighted"), ""),
    "BCQ-3-weighted+z": ("", _b(3, "weighted", bcq_offset=True), ""),
    "BCQ-2-weighted+z": ("", _b(2, "weighted", bcq_offset=True), ""),
    "BCQ-4-weighted+z": ("", _b(4, "weighted", bcq_offset=True), ""),
    "BCQ-3-act": ("", _b(3, "weighted"), ""),
    "BCQ-4-act+z": ("", _b(4, "weighted", bcq_offset=True), ""),
    "BCQ-3-act+z": ("", _b(3, "weighted", bcq_offset=True), ""),
    "BCQ-2-act+z": ("", _b(2, "weighted", bcq_offset=True), ""),
    "RTN-3-g64": ("", _u(3, 64), ""),
    "BCQ-4-act+z-g64": ("", QSpec.bcq(4, group_size=64, method="weighted", bcq_offset=True), ""),
    "BCQ-3-act+z-g64": ("", QSpec.bcq(3, group_size=64, method="weighted", bcq_offset=True), ""),
    "GPTQ+BCQ-3": (GPTQ_B, _b(3, "alternating"), ""),
    "GPTQ+BCQ-2": (GPTQ_B, _b(2, "alternating"), ""),
    "aespa-3": (AESPA, _u(3), ""),
    "aespa-2": (AESPA, _u(2), ""),
    "aespa-3-g64": (AESPA, _u(3, 64), ""),
    "GPTQ+BCQ-3 emb8": (GPTQ_B, _b(3, "alternating"), "embedding-rowwise{bits=8,tied=true}"),
    "GPTQ+BCQ-3-g96": (GPTQ_B, QSpec.bcq(3, group_size=96, method="alternating"), ""),
    "aespa+BCQ-3": (AESPA_B, _b(3, "alternating"), ""),
    "aespa+BCQ-2": (AESPA_B, _b(2, "alternating"), ""),
}
OPTIONAL = ("GPTQ+BCQ-3 emb8", "GPTQ+BCQ-3-g96")  # only when named in --methods
# data-free rows: quantize-weights keeps the spec's magnitude importance although calibration data is there
DATA_FREE = {n: "quantize-weights{bcq_importance=spec}" for n in METHODS if n.startswith("BCQ-") and "-act" not in n}
ORT_METHODS = ("ORT-RTN-4", "ORT-GPTQ-4-sym")
QUICK = ("RTN-4", "GPTQ-3", "BCQ-3-act+z")


# --- evaluation ----------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(run, windows: torch.Tensor, batch: int = 2) -> float:
    """exp(mean next-token NLL) over the rows of ``windows`` (each scored on its own); ``run(ids) -> logits``."""
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch]
        logits = run(ids).float()
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


# --- qgraph ----------------------------------------------------------------------------------------------
def strategy_for(graph, spec: QSpec) -> dict:
    """Every Linear of the transformer blocks gets ``spec``; the LM head stays float."""
    out = {}
    for node in graph.nodes():
        if graph.op_type(node) != "Gemm":
            continue
        name = graph.qualname(node)
        out[name] = Annotation(weight=spec) if ".layers." in name else Annotation(fallback_float=True)
    return out


def unique_param_bytes(gm: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def qgraph_bytes(graph, base_total: int) -> tuple[int, int]:
    """(whole model bytes, quantized-linear bytes) from the quantized weights in node meta (before insert-fq)."""
    users: dict[int, list] = {}
    params = {}
    for node in graph.nodes():
        w = graph.param(node, "weight")
        if w is not None:
            users.setdefault(id(w), []).append(graph.meta(node).get(QWEIGHT_KEY))
            params[id(w)] = w
    total, linear = base_total, 0
    counted: set[int] = set()
    for key, qs in users.items():
        w = params[key]
        if all(q is not None for q in qs):
            total -= w.numel() * w.element_size()
        for q in qs:
            if q is not None and id(q) not in counted:
                counted.add(id(q))
                total += int(q.nbytes)
    for node in graph.nodes():
        q = graph.meta(node).get(QWEIGHT_KEY)
        if q is not None and graph.op_type(node) == "Gemm" and ".layers." in graph.qualname(node):
            linear += int(q.nbytes)
    return total, linear


def run_qgraph(name, graph, calib, base_total, progress):
    opt, spec, extra = METHODS[name]
    g = graph.copy()
    passes = ["annotate{act_bits=0,embeddings=" + ("true" if extra else "false") + "}"]
    passes += [p for p in (extra, opt) if p] + [DATA_FREE.get(name, "quantize-weights")]
    ctx = PassContext(target="generic", config={"progress": progress, "strategy": strategy_for(g, spec)},
                      calibration=calib)
    start = time.perf_counter()
    g = PassManager(",".join(passes)).run(g, ctx).graph
    seconds = time.perf_counter() - start
    total, linear = qgraph_bytes(g, base_total)
    g = PassManager("insert-fq").run(g, ctx).graph
    return g, seconds, total, linear


# --- onnxruntime -------------------------------------------------------------------------------------------
def onnx_path(lm) -> Path:
    """The SmolLM2 logits model exported with the dynamo exporter, cached on disk."""
    import transformers

    gguf = smollm2.smollm2_gguf_path()
    path = smollm2.disk_cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}-torch{torch.__version__}" \
        f"-tf{transformers.__version__}" / "logits.onnx"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print("exporting SmolLM2 to ONNX (dynamo; cached for later runs)...", file=sys.stderr)
    ids = torch.randint(0, 1000, (1, 64))
    dims = ({1: torch.export.Dim("seq", max=2048)},)
    with contextlib.redirect_stdout(sys.stderr):
        prog = torch.onnx.export(smollm2.CausalLMLogits(lm).eval(), (ids,), dynamo=True, input_names=["input_ids"],
                                 output_names=["logits"], dynamic_shapes=dims, optimize=True)
    tmp = path.parent.with_name(path.parent.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    prog.save(str(tmp / path.name), external_data=True)  # writes logits.onnx + logits.onnx.data
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == path.name):  # the .onnx file last
        os.replace(f, path.parent / f.name)
    tmp.rmdir()
    return path


class _MemoSession:
    """An InferenceSession whose first run on an input computes all graph outputs; later runs on the same input
    (ORT's GPTQ asks once per MatMul input) are answered from that result. Same numbers, one forward."""

    def __init__(self, *args, **kwargs):
        import onnxruntime as ort

        self._s = ort.InferenceSession(*args, **kwargs)
        self._names = [o.name for o in self._s.get_outputs()]
        self._cache: dict[bytes, dict] = {}

    def run(self, names, feed, *args):
        key = b"".join(k.encode() + v.tobytes() for k, v in sorted(feed.items()))
        if key not in self._cache:
            self._cache[key] = dict(zip(self._names, self._s.run(self._names, feed, *args)))
        got = self._cache[key]
        return [got[n] for n in (names or self._names)]

    def __getattr__(self, name):
        return getattr(self._s, name)


class _OrtShim:
    def __init__(self, ort):
        self._ort = ort
        self.InferenceSession = _MemoSession

    def __getattr__(self, name):
        return getattr(self._ort, name)


def run_ort(name, path: Path, calib_windows: torch.Tensor):
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )
    from onnxruntime.quantization.neural_compressor import weight_only

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(path))
    start = time.perf_counter()
    if name == ORT_METHODS[0]:
        q = MatMulNBitsQuantizer(model, bits=4, block_size=128, is_symmetric=False)
        q.process()
    else:
        from onnxruntime.quantization.calibrate import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.rows = [{"input_ids": r[None].numpy()} for r in calib_windows]
                self.i = 0

            def get_next(self):
                self.i += 1
                return self.rows[self.i - 1] if self.i <= len(self.rows) else None

            def __iter__(self):
                return iter(self.rows)

        cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), percdamp=0.01, block_size=128)
        # symmetric: ORT's GPTQ packs asymmetric zero points wrongly when a row has an odd number of blocks
        # (576 = 4.5 blocks of 128 -> "cannot reshape array of size 1440 into shape (576, -1)")
        q = MatMulNBitsQuantizer(model, bits=4, block_size=128, is_symmetric=True, algo_config=cfg)
        saved = weight_only.ort
        weight_only.ort = _OrtShim(ort)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                q.process()
        finally:
            weight_only.ort = saved
    seconds = time.perf_counter() - start
    qm = q.model.model if hasattr(q.model, "model") else q.model
    inits = {i.name: i for i in qm.graph.initializer}
    total = sum(_init_bytes(i) for i in qm.graph.initializer)
    linear = sum(_init_bytes(inits[x]) for n in qm.graph.node if n.op_type == "MatMulNBits"
                 for x in n.input[1:] if x in inits)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(qm.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def run(ids):  # the export has batch 1 (torch.export specializes a size-1 example dimension)
        return torch.cat([torch.from_numpy(sess.run(["logits"], {"input_ids": row[None].numpy()})[0]) for row in ids])

    return run, seconds, total, linear


def _init_bytes(init) -> int:
    import numpy as np
    from onnx import numpy_helper

    return int(np.asarray(numpy_helper.to_array(init)).nbytes)


# --- main ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK)} on 2 windows, 4 calibration windows")
    ap.add_argument("--json", metavar="PATH", help="write records (case, metric, value) as JSON")
    ap.add_argument("--methods", nargs="*", help=f"subset of: {', '.join(list(METHODS) + list(ORT_METHODS))}")
    ap.add_argument("--eval-windows", type=int, help="512-token evaluation windows (default 4; quick 2)")
    ap.add_argument("--calib-windows", type=int, help="512-token calibration windows (default 16; quick 4)")
    ap.add_argument("--no-ort", action="store_true", help="skip the onnxruntime rows")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    n_eval = args.eval_windows or (2 if args.quick else 4)
    n_calib = args.calib_windows or (4 if args.quick else 16)
    default = [n for n in METHODS if n not in OPTIONAL] + list(ORT_METHODS)
    names = args.methods or (list(QUICK) if args.quick else default)
    if args.no_ort or args.quick and not args.methods:
        names = [n for n in names if n not in ORT_METHODS]
    unknown = [n for n in names if n not in METHODS and n not in ORT_METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}")

    t0 = time.perf_counter()
    bundled = BUNDLED["smollm2"]
    loaded = bundled.load()
    play = evaluation_plays()[0]
    windows = smollm2.token_windows(loaded.tokenizer, load_play(play), smollm2.WINDOW, n_eval)
    calib = bundled.calibration_batches(loaded, n_calib)
    graph = trace(loaded.module, bundled.example_inputs(loaded), dynamic_shapes=bundled.dynamic_shapes())
    base_total = unique_param_bytes(graph.gm)
    print(f"loaded + traced in {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    records, rows = Records(), []
    ref = perplexity(graph, windows)
    linear_params = sum(graph.param(n, "weight").numel() for n in graph.nodes()
                        if graph.op_type(n) == "Gemm" and ".layers." in graph.qualname(n))
    fp32_linear = linear_params * 4

    def add(name, ppl, seconds, total, linear):
        bpw = linear * 8 / linear_params
        rows.append([name, f"{ppl:.2f}", f"{ppl / ref - 1:+.1%}", f"{linear / 2**20:.1f}", f"{bpw:.2f}",
                     f"{total / 2**20:.1f}", f"{seconds:.0f}"])
        records.add(f"smollm2 {name}", "perplexity", ppl)
        records.add(f"smollm2 {name}", "bytes", total)
        records.add(f"smollm2 {name} linears", "bytes", linear)
        records.add(f"smollm2 {name}", "seconds", seconds)
        records.add(f"smollm2 {name}", "load1", os.getloadavg()[0])
        records.write(args.json)  # after every row: a long run that dies keeps what it measured
        print(f"{name:<18} ppl={ppl:9.3f} linears={linear / 2**20:6.1f} MiB ({bpw:.2f} b/w) "
              f"total={total / 2**20:6.1f} MiB {seconds:6.1f}s  load {os.getloadavg()[0]:.1f}  "
              f"[{time.perf_counter() - t0:.0f}s]", file=sys.stderr, flush=True)

    add("fp32", ref, 0.0, base_total, fp32_linear)
    for name in [n for n in names if n in METHODS]:
        g, seconds, total, linear = run_qgraph(name, graph, calib, base_total, args.progress)
        add(name, perplexity(g, windows), seconds, total, linear)
        del g
    ort_names = [n for n in names if n in ORT_METHODS]
    if ort_names:
        path = onnx_path(smollm2.load_smollm2()[0])
        calib_windows = torch.cat([b[0] for b in calib])
        for name in ort_names:
            run, seconds, total, linear = run_ort(name, path, calib_windows)
            add(name, perplexity(run, windows), seconds, total, linear)

    print(f"\nSmolLM2-135M (fp32 from GGUF Q4_1), perplexity on {n_eval}x{smollm2.WINDOW} tokens of {play}; "
          f"calibration {n_calib}x{smollm2.WINDOW} tokens from other plays; qgraph groups of {GROUP}, "
          f"ORT blocks of 128; total {time.perf_counter() - t0:.0f}s\n")
    print(markdown_table(["method", "perplexity", "vs fp32", "linears MiB", "bits/weight", "model MiB",
                          "quantize s"], rows))
    records.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
