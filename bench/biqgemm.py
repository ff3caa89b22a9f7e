"""CPU BiQGEMM (layout cpu-lut4) against torch fp32, torch dynamic int8, onnxruntime MatMulNBits 4-bit and the
pure-torch LUT reference, all timed in this one process (DESIGN.md §7).

Per case: median µs of one call (LUT build included) through ``torch.ops.qgraph.biqgemm`` — the native dispatcher
kernel when it is active (qgraph.kernels.native; the header says), as a model calls it — with ``path="auto"``: the
LUT path up to the row threshold of the mode (``cpu.lut_max_rows``), decode + GEMM above (the ``path`` column says
which ran). Calls rotate over enough weight copies that the copies total more than 4× the last-level cache, so weights
stream from DRAM as in a real decode step. All methods of a case, and a streaming copy, are timed in interleaved
rounds, so that they share whatever else the machine is doing (the table also shows each kernel's fastest call).
Bandwidth is the weight bytes a call reads (packed bits + α) over its time, and % of that copy's rate (read + write
bytes). max rel err is max|y − y_ref| / max|y_ref| against x·Ŵᵀ in fp32 from the dequantized weight. ``bytes`` is
the weight's resident bytes (packed bits + α (+ z)); ``gemm buf`` is what the GEMM path works in besides (one
decoded chunk of one 32-row tile per thread + the activation panels), never a dequantized copy of the weight. BCQ
weights are random codes (random bits, α decaying per plane): timing does not depend on the values. MatMulNBits uses
block 128, the default zero point, the accuracy level given by --ort-accuracy-level (4 = int8 activations, its fastest
CPU path; 0 = fp32) and non-spinning intra-op threads. Every library runs with --threads intra-op threads.
The last table is the issue-20 goal: per shape, q, group and batch, the faster BiQGEMM mode over fp32 F.linear.

    python bench/biqgemm.py [--quick] [--json out.json] [--shapes 11008x4096] [--batches 1,8,32] [--bits 3,4]
    python bench/biqgemm.py --batches 1,2,4,8,16,32,64,128,512 --bits 3,4 --baselines fp32   # issue 20 table
    python bench/biqgemm.py --calibrate [--write-target targets/x86-avx2.toml]   # LUT/GEMM crossover per mode
    python bench/biqgemm.py --call-overhead   # µs per call at 576x576 batch 1: native op, Python path, ctypes
    python bench/biqgemm.py --device cuda [...]   # defers to bench/biqgemm_cuda.py
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torch.nn.functional as F
from _records import Records, machine, markdown_table

MINILM_SHAPES = [(384, 384), (1536, 384), (384, 1536)]
LLM_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
SHAPES = MINILM_SHAPES + LLM_SHAPES
BATCHES = [1, 2, 4, 8, 16, 32]
BASELINES = ["fp32", "int8-dynamic", "ort-nbits4"]
CALIBRATE_SHAPES = [(384, 384), (1536, 384), (576, 576), (1536, 576), (4096, 4096)]
CALIBRATE_BATCHES = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32]
BITS = [1, 2, 3, 4]
GROUPS = ["row", "128"]
MODES = ["exact", "fast"]
QUICK = {"shapes": [(11008, 4096)], "batches": [1], "bits": [3, 4], "groups": ["row"]}
ORT_BLOCK = 128


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="headline only: 11008x4096, batch 1, q=3 and 4 (< 60 s)")
    ap.add_argument("--json", metavar="PATH", help="write records (case, metric, value) as JSON")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: run bench/biqgemm_cuda.py")
    ap.add_argument("--shapes", help="comma-separated MxK list (default: the MiniLM and LLM shapes)")
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,2,4,8,16,32)")
    ap.add_argument("--baselines", default=",".join(BASELINES),
                    help=f"comma-separated baselines among {','.join(BASELINES)} (fp32 is always timed)")
    ap.add_argument("--calibrate", action="store_true",
                    help="measure the LUT/GEMM crossover per mode and print the target's cost entry")
    ap.add_argument("--write-target", metavar="TOML", help="with --calibrate: write biqgemm_lut_max_rows into this "
                    "target file's [cost] table")
    ap.add_argument("--call-overhead", action="store_true",
                    help="µs per call at 576x576 batch 1 (q3 g128 fast): native op, Python + ctypes path, raw C")
    ap.add_argument("--bits", help="comma-separated q values (default 1,2,3,4)")
    ap.add_argument("--groups", help="comma-separated group sizes, 'row' = whole row (default row,128)")
    ap.add_argument("--modes", default="exact,fast", help="kernel modes (default exact,fast)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for every library (default 2)")
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds of timed calls per method and case")
    ap.add_argument("--lut-torch-batches", default="1", help="batches at which to time the pure-torch LUT")
    ap.add_argument("--ort-accuracy-level", type=int, default=4, help="MatMulNBits accuracy_level (0 or 4)")
    ap.add_argument("--skip", default="", help="comma-separated extras to skip: lut-torch")
    return ap


# ----------------------------------------------------------------------------------------------- timing
def median_us(fns: list, min_time: float, min_iters: int = 15, max_iters: int = 2000, warmup: int = 3) -> float:
    """Median µs of single calls, cycling through ``fns`` (one closure per weight copy)."""
    return interleaved_median_us({"m": fns}, min_time, rounds=1, min_iters=min_iters, max_iters=max_iters,
                                 warmup=warmup)["m"]


def interleaved_median_us(
    methods: dict, min_time: float, rounds: int = 5, min_iters: int = 15, max_iters: int = 2000, warmup: int = 1,
    best: dict | None = None,
) -> dict:
    """Median µs per call of each method (a list of closures, one per weight copy), measured in ``rounds``
    interleaved rounds so that every method sees the same share of whatever else the machine is doing; the
    first ``warmup`` calls of each round are dropped (thread pools waking up after another library ran).
    ``best``, if given, receives each method's fastest call (µs)."""
    best = {} if best is None else best
    times: dict = {name: [] for name in methods}
    pos = dict.fromkeys(methods, 0)
    per_round = min_time / rounds
    for _ in range(rounds):
        for name, fns in methods.items():
            for _ in range(warmup):
                fns[pos[name] % len(fns)]()
                pos[name] += 1
            start = time.perf_counter()
            n = 0
            while (n < -(-min_iters // rounds) or time.perf_counter() - start < per_round) and n < max_iters // rounds:
                f = fns[pos[name] % len(fns)]
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
                pos[name] += 1
                n += 1
    best.update({name: min(ts) * 1e6 for name, ts in times.items()})
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def llc_bytes() -> int:
    for idx in range(4, 1, -1):
        p = Path(f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size")
        if p.exists():
            txt = p.read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(txt[-1], 1)
            return int(txt.rstrip("KM")) * mult
    return 32 << 20


def copies_for(nbytes: int, llc: int, cap: int = 64) -> int:
    """Copies whose total exceeds 4× the LLC (at least 2, at most ``cap``)."""
    return max(2, min(cap, math.ceil(4 * llc / nbytes) + 1))


class StreamingCopy:
    """A torch copy of ``nbytes`` (> 4× the LLC): its GB/s counts the bytes read and written."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.src = torch.ones(nbytes // 4)
        self.dst = torch.empty_like(self.src)

    def __call__(self) -> None:
        self.dst.copy_(self.src)

    def gbs(self, us: float) -> float:
        return 2 * self.nbytes / us / 1e3


# ----------------------------------------------------------------------------------------------- baselines
def fp32_weights(m: int, k: int, n_copies: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(m, k, generator=g) * 0.02 for _ in range(n_copies)]


def int8_dynamic_linears(ws: list[torch.Tensor], n_copies: int) -> list:
    from torch.ao.quantization import quantize_dynamic

    out = []
    for i in range(n_copies):
        w = ws[i % len(ws)]
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8))
    return out


def ort_nbits_sessions(m: int, k: int, n_copies: int, threads: int, accuracy_level: int) -> list:
    """One onnxruntime session per weight copy, each a single com.microsoft MatMulNBits node (4-bit, block 128)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    blocks = k // ORT_BLOCK
    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Each session has its own intra-op pool; spinning pools of the rotated sessions would keep burning the
    # cores after their run and slow whatever is timed next (measured: the BiQGEMM call after an ORT block
    # went from ~10 ms to ~25 ms on a loaded machine), and ORT itself was no faster with spinning.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = []
    for _ in range(n_copies):
        b = rng.integers(0, 256, size=(m, blocks, ORT_BLOCK // 2), dtype=np.uint8)
        scales = (rng.random(m * blocks, dtype=np.float32) * 0.01 + 0.001).astype(np.float32)
        node = helper.make_node(
            "MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
            K=k, N=m, bits=4, block_size=ORT_BLOCK, accuracy_level=accuracy_level,
        )
        graph = helper.make_graph(
            [node], "nbits",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", m])],
            initializer=[numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                         helper.make_opsetid("com.microsoft", 1)])
        sessions.append(ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]))
        del model, graph, b
    return sessions


# ----------------------------------------------------------------------------------------------- BCQ
def random_bcq(m: int, k: int, q: int, group: int, seed: int):
    from qgraph.quant.bcq_weight import BCQWeight

    g = torch.Generator().manual_seed(seed)
    kb = -(-k // 8)
    planes = torch.randint(0, 256, (q, m, kb), generator=g, dtype=torch.uint8)
    if k % 8:
        planes[..., -1] &= (1 << (k % 8)) - 1
    groups = -(-k // group)
    scale = 0.02 * 0.5 ** torch.arange(q, dtype=torch.float32).reshape(q, 1, 1)
    alpha = scale * (0.5 + torch.rand(q, m, groups, generator=g))
    return BCQWeight(planes=planes, alpha=alpha.contiguous(), offset=None, shape=(m, k), group_size=group)


def _parse_list(text: str | None, default, conv):
    return default if not text else [conv(t) for t in text.split(",") if t]


def _shape(text: str) -> tuple[int, int]:
    m, k = text.lower().split("x")
    return int(m), int(k)


def _op_call(p, x, mode):
    m, k = p.shape
    return torch.ops.qgraph.biqgemm(x, p.packed, p.alpha, p.offset, None, m, k, p.group_size, cpu_layout(), mode)


def cpu_layout() -> str:
    from qgraph.kernels import cpu

    return cpu.LAYOUT


def _prepare_native() -> str:
    """Load the native op (built on first use) and describe how calls are dispatched."""
    from qgraph.kernels import native

    native.load()
    st = native.status()
    return "native dispatcher kernel" if st["active"] else f"Python + ctypes path ({st['error']})"


def _gtag(group_name: str) -> str:
    return "" if group_name == "row" else f" g{group_name}"


def run_cpu(args: argparse.Namespace) -> list[dict]:
    from qgraph.kernels import cpu
    from qgraph.kernels.reference import LutTorchWeight, biqgemm_lut_torch

    torch.set_num_threads(args.threads)
    if args.calibrate:
        return run_calibrate(args)
    if args.call_overhead:
        return run_call_overhead(args)
    shapes = QUICK["shapes"] if args.quick else _parse_list(args.shapes, SHAPES, _shape)
    batches = QUICK["batches"] if args.quick else _parse_list(args.batches, BATCHES, int)
    bits = QUICK["bits"] if args.quick else _parse_list(args.bits, BITS, int)
    groups = QUICK["groups"] if args.quick else _parse_list(args.groups, GROUPS, str)
    modes = _parse_list(args.modes, MODES, str)
    baselines = ["fp32"] + [b for b in _parse_list(args.baselines, BASELINES, str) if b != "fp32"]
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise SystemExit(f"biqgemm: unknown baseline(s) {unknown}; choose among {BASELINES}")
    lut_batches = set(_parse_list(args.lut_torch_batches, [1], int))
    min_time = min(args.min_time, 0.25) if args.quick else args.min_time
    llc = llc_bytes()
    dispatch = _prepare_native()

    rec = Records()
    copier = StreamingCopy(max(128 << 20, 4 * llc))
    print(f"# {machine()}; {args.threads} threads; ISA path {cpu.isa()}; LLC {llc >> 20} MiB; BiQGEMM via "
          f"torch.ops.qgraph.biqgemm ({dispatch}); LUT path up to {cpu.lut_max_rows('exact')} rows (exact) / "
          f"{cpu.lut_max_rows('fast')} (fast), GEMM path above (fast: "
          f"{'int8 VNNI' if cpu.gemm_fast_is_int8() else 'fp32'}); ORT MatMulNBits accuracy_level="
          f"{args.ort_accuracy_level}; every case's methods and a {copier.nbytes >> 20} MiB streaming copy timed in "
          f"interleaved rounds")
    rows, goal, goal_min = [], {}, {}
    for m, k in shapes:
        ws = fp32_weights(m, k, copies_for(m * k * 4, llc, cap=4))
        i8 = int8_dynamic_linears(ws, copies_for(m * k, llc, cap=8)) if "int8-dynamic" in baselines else []
        ort_s = (ort_nbits_sessions(m, k, copies_for(m * k // 2, llc, cap=12), args.threads, args.ort_accuracy_level)
                 if "ort-nbits4" in baselines and k % ORT_BLOCK == 0 else [])
        bcq = {}  # (q, group) -> (w0, packs)
        for group_name in groups:
            group = k if group_name == "row" else int(group_name)
            for q in bits:
                w0 = random_bcq(m, k, q, group, seed=q)
                p0 = cpu.pack(w0)
                more = [cpu.pack(random_bcq(m, k, q, group, seed=100 * q + i))
                        for i in range(1, copies_for(p0.nbytes, llc))]
                bcq[(q, group_name)] = (w0, [p0] + more)
        for n in batches:
            x = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
            xn = x.numpy()
            methods = {"copy": [copier], "fp32": [lambda w=w, x=x: F.linear(x, w) for w in ws]}
            if i8:
                methods["int8-dynamic"] = [lambda mod=mod, x=x: mod(x) for mod in i8]
            if ort_s:
                methods["ort-nbits4"] = [lambda s=s, xn=xn: s.run(None, {"A": xn}) for s in ort_s]
            for (q, group_name), (_, packs) in bcq.items():
                for mode in modes:
                    methods[(q, group_name, mode)] = [lambda p=p, mode=mode, x=x: _op_call(p, x, mode) for p in packs]
            fastest: dict = {}
            med = interleaved_median_us(methods, min_time, best=fastest)
            bw = copier.gbs(med["copy"])
            rec.add(f"{m}x{k} b{n} copy", "median_us", med["copy"], gbs=bw, isa=cpu.isa(), threads=args.threads)
            for name in ("fp32", "int8-dynamic", "ort-nbits4"):
                if name in med:
                    rec.add(f"{m}x{k} b{n} {name}", "median_us", med[name], min_us=fastest[name])
            for (q, group_name), (w0, packs) in bcq.items():
                gtag = _gtag(group_name)
                ref = x @ w0.dequantize().t()
                if n in lut_batches and "lut-torch" not in args.skip:
                    lut_w = LutTorchWeight.prepare(w0)
                    out = []
                    us = median_us([lambda x=x, lut_w=lut_w, out=out: out.append(biqgemm_lut_torch(x, lut_w))], 0.0,
                                   min_iters=2 if args.quick else 3, warmup=0)
                    rec.add(f"{m}x{k} b{n} q{q}{gtag} lut-torch", "median_us", us)
                    rec.add(f"{m}x{k} b{n} q{q}{gtag} lut-torch", "max_rel_err", cpu.relative_error(out[0], ref))
                    del lut_w, out
                for mode in modes:
                    us = med[(q, group_name, mode)]
                    p0 = packs[0]
                    err = cpu.relative_error(_op_call(p0, x, mode), ref)
                    path = "lut" if n <= cpu.lut_max_rows(mode) else "gemm"
                    buf = cpu.gemm_buffers(n, p0, mode) if path == "gemm" else None
                    gbs = p0.nbytes / us / 1e3
                    case = f"{m}x{k} b{n} q{q}{gtag} biqgemm-{mode}"
                    metrics = {
                        "median_us": us,
                        "speedup_vs_fp32": med["fp32"] / us,
                        "pct_bandwidth": 100 * gbs / bw,
                        "max_rel_err": err,
                        "bytes": p0.nbytes,
                    }
                    if "int8-dynamic" in med:
                        metrics["speedup_vs_int8_dynamic"] = med["int8-dynamic"] / us
                    if "ort-nbits4" in med:
                        metrics["speedup_vs_ort_nbits4"] = med["ort-nbits4"] / us
                    for metric, value in metrics.items():
                        rec.add(case, metric, value)
                    rec.items[-len(metrics)].update(min_us=fastest[(q, group_name, mode)], path=path)
                    if buf is not None:
                        rec.items[-len(metrics)].update(gemm_buffers=buf)
                    buf_txt = "—" if buf is None else (
                        f"{buf['weight_tile_bytes_per_thread'] >> 10}K/thr + {buf['activation_bytes'] >> 10}K x")
                    rows.append([case, path, f"{us:.0f}", f"{fastest[(q, group_name, mode)]:.0f}", f"{med['fp32']:.0f}",
                                 _fmt(med, "int8-dynamic"), _fmt(med, "ort-nbits4"),
                                 f"{metrics['speedup_vs_fp32']:.2f}", _ratio(metrics, "speedup_vs_int8_dynamic"),
                                 _ratio(metrics, "speedup_vs_ort_nbits4"), f"{gbs:.1f}",
                                 f"{metrics['pct_bandwidth']:.0f}", f"{err:.1e}", f"{p0.nbytes / 1e6:.2f}",
                                 f"{m * k * 4 / 1e6:.1f}", buf_txt])
                    goal.setdefault((m, k, q, group_name), {}).setdefault(n, {})[mode] = (us, med["fp32"])
                    goal_min.setdefault((m, k, q, group_name), {}).setdefault(n, {})[mode] = (
                        fastest[(q, group_name, mode)], fastest["fp32"])
            print(f"{m}x{k} b{n} done", file=sys.stderr, flush=True)
        del ws, i8, ort_s, bcq
        gc.collect()
    header = ["case", "path", "µs", "min µs", "fp32 µs", "int8-dyn µs", "ort-nbits4 µs", "×fp32", "×int8-dyn",
              "×ort-nbits4", "GB/s", "% copy BW", "max rel err", "weight MB", "fp32 MB", "gemm buf"]
    copies = [f"{r['case'].rsplit(' ', 1)[0]}: {r['gbs']:.1f} GB/s" for r in rec.items if r["case"].endswith(" copy")]
    print("# streaming copy (same rounds): " + "; ".join(copies))
    base = [f"{r['case']} {r['value']:.0f}/{r['min_us']:.0f}" for r in rec.items
            if r["case"].split()[-1] in ("fp32", "int8-dynamic", "ort-nbits4")]
    print("# baselines median/min µs: " + "; ".join(base))
    print(markdown_table(header, rows))
    lut_rows = [[r["case"], f"{r['value']:.0f}"] for r in rec.items
                if r["case"].endswith("lut-torch") and r["metric"] == "median_us"]
    if lut_rows:
        print()
        print(markdown_table(["pure-torch LUT reference", "µs"], lut_rows))
    if goal:
        print()
        print(goal_table(goal, batches))
        print()
        print(goal_table(goal_min, batches, "fastest call of each (a quiet-machine proxy: on a loaded machine "
                                            "torch's OpenMP team stalls whole calls when a spinning worker is "
                                            "descheduled)"))
    rec.write(args.json)
    return rec.items


def _fmt(med: dict, name: str) -> str:
    return f"{med[name]:.0f}" if name in med else "—"


def _ratio(metrics: dict, name: str) -> str:
    return f"{metrics[name]:.2f}" if name in metrics else "—"


def goal_table(goal: dict, batches: list[int], what: str = "median of interleaved rounds") -> str:
    """Faster BiQGEMM mode over fp32 F.linear (µs ratio) per shape, q, group and batch; * marks < 0.95."""
    header = ["shape q group"] + [f"b{n}" for n in batches]
    out = []
    for (m, k, q, group_name), per in goal.items():
        cells = []
        for n in batches:
            if n not in per:
                cells.append("—")
                continue
            best_us = min(us for us, _ in per[n].values())
            r = per[n][next(iter(per[n]))][1] / best_us
            cells.append(f"{r:.2f}{'*' if r < 0.95 else ''}")
        out.append([f"{m}x{k} q{q} {'row' if group_name == 'row' else 'g' + group_name}"] + cells)
    return (f"fp32 F.linear ÷ faster BiQGEMM mode (×, {what}; * below the 0.95 goal)\n"
            + markdown_table(header, out))


def run_calibrate(args: argparse.Namespace) -> list[dict]:
    """Time the LUT and the GEMM path of each mode at small batches and print the crossover (the largest batch
    up to which the LUT path is faster, median over shapes and q) as the target's cost entry."""
    from qgraph.kernels import cpu

    shapes = _parse_list(args.shapes, CALIBRATE_SHAPES, _shape)
    batches = _parse_list(args.batches, CALIBRATE_BATCHES, int)
    bits = _parse_list(args.bits, [3, 4], int)
    groups = _parse_list(args.groups, ["128"], str)
    modes = _parse_list(args.modes, MODES, str)
    llc = llc_bytes()
    rec = Records()
    print(f"# calibrate: {machine()}; {args.threads} threads; ISA path {cpu.isa()}; LUT vs decode + GEMM per mode, "
          f"interleaved rounds, weights rotated past the {llc >> 20} MiB LLC; ctypes calls (same overhead per path)")
    cross: dict = {mode: [] for mode in modes}
    rows = []
    for m, k in shapes:
        for group_name in groups:
            group = k if group_name == "row" else int(group_name)
            if group > k:
                continue
            for q in bits:
                p0 = cpu.pack(random_bcq(m, k, q, group, seed=q))
                packs = [p0] + [cpu.pack(random_bcq(m, k, q, group, seed=100 * q + i))
                                for i in range(1, copies_for(p0.nbytes, llc))]
                for mode in modes:
                    times = {}
                    for n in batches:
                        x = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
                        meth = {path: [lambda p=p, path=path, x=x: cpu.biqgemm(x, p, None, mode, path) for p in packs]
                                for path in ("lut", "gemm")}
                        times[n] = interleaved_median_us(meth, args.min_time)
                        for path, us in times[n].items():
                            rec.add(f"{m}x{k} b{n} q{q}{_gtag(group_name)} calibrate-{mode}-{path}", "median_us", us)
                    # Largest batch such that the LUT path wins there and at every smaller batch measured.
                    last = 0
                    for n in batches:
                        if times[n]["lut"] > times[n]["gemm"]:
                            break
                        last = n
                    cross[mode].append(last)
                    rows.append([f"{m}x{k} q{q}{_gtag(group_name)} {mode}", str(last)] +
                                [f"{times[n]['gemm'] / times[n]['lut']:.2f}" for n in batches])
                    print(f"{m}x{k} q{q} {mode}: LUT wins up to {last} rows", file=sys.stderr, flush=True)
    print(markdown_table(["case", "LUT max rows"] + [f"gemm÷lut b{n}" for n in batches], rows))
    result = {mode: int(statistics.median(v)) for mode, v in cross.items() if v}
    entry = "biqgemm_lut_max_rows = { " + ", ".join(f"{k} = {v}" for k, v in result.items()) + " }"
    print(f"\n# measured crossover (median over cases): {entry}")
    if args.write_target:
        write_target_entry(Path(args.write_target), result)
        print(f"# wrote it into {args.write_target}")
    rec.write(args.json)
    return rec.items


def write_target_entry(path: Path, rows: dict) -> None:
    """Set ``biqgemm_lut_max_rows`` in the [cost] table of a target TOML (replacing an existing entry)."""
    import re

    text = path.read_text()
    old = dict(re.findall(r"(exact|fast)\s*=\s*(\d+)", m.group(0))) if (
        m := re.search(r"^biqgemm_lut_max_rows\s*=.*$", text, flags=re.M)) else {}
    merged = {**{k: int(v) for k, v in old.items()}, **rows}
    line = "biqgemm_lut_max_rows = { " + ", ".join(f"{k} = {v}" for k, v in sorted(merged.items())) + " }"
    if m:
        text = text[:m.start()] + line + text[m.end():]
    else:
        cost = re.search(r"^\[cost\]\s*$", text, flags=re.M)
        if cost is None:
            raise SystemExit(f"biqgemm: {path} has no [cost] table")
        note = "# CPU BiQGEMM: LUT path up to these input rows, decode + GEMM above (bench/biqgemm.py --calibrate)"
        text = text[:cost.end()] + "\n" + note + "\n" + line + text[cost.end():]
    path.write_text(text)


def run_call_overhead(args: argparse.Namespace) -> list[dict]:
    """µs per call at 576x576 batch 1 (q3, group 128, fast mode; SmolLM2's width): the native dispatcher op, the
    Python validation + ctypes path (the private op ``qgraph::_biqgemm_py``, i.e. what every call cost before the
    native op), `cpu.biqgemm` (Python checks + ctypes, no dispatcher), a `BCQLinear` module, and the raw C call
    through ctypes without checks (the kernel's own time + ~1 µs of ctypes)."""
    import ctypes

    from qgraph.kernels import cpu
    from qgraph.kernels.linear import BCQLinear

    dispatch = _prepare_native()
    m = k = 576
    w = random_bcq(m, k, 3, 128, seed=1)
    p = cpu.pack(w)
    x = torch.randn(1, k)
    lin = BCQLinear(w, mode="fast")
    y = torch.empty(1, m)
    lib = cpu._lib()
    raw_args = (x.data_ptr(), 1, k, p.packed.data_ptr(), p.alpha.data_ptr(), None, None, m, 3, 128,
                cpu.MODES["fast"], y.data_ptr())
    ops = torch.ops.qgraph
    methods = {
        "native-op": [lambda: ops.biqgemm(x, p.packed, p.alpha, p.offset, None, m, k, 128, "cpu-lut4", "fast")],
        "python-ctypes-op": [lambda: ops._biqgemm_py(x, p.packed, p.alpha, p.offset, None, m, k, 128, "cpu-lut4",
                                                     "fast")],
        "cpu.biqgemm": [lambda: cpu.biqgemm(x, p, None, "fast")],
        "BCQLinear": [lambda: lin(x)],
        "raw-C": [lambda: lib.qg_biqgemm_f32(*raw_args)],
        "F.linear-fp32": [lambda w=torch.randn(m, k): F.linear(x, w)],
    }
    del ctypes
    fastest: dict = {}
    med = interleaved_median_us(methods, max(args.min_time, 2.0), rounds=7, min_iters=2000, max_iters=200000,
                                warmup=200, best=fastest)
    rec = Records()
    rows = []
    for name, us in med.items():
        rec.add(f"576x576 b1 q3 g128 call-{name}", "median_us", us, min_us=fastest[name])
        over = us - med["raw-C"]
        rows.append([name, f"{us:.2f}", f"{fastest[name]:.2f}", f"{over:+.2f}"])
    print(f"# call cost, 576x576 batch 1, q3 g128 fast; {args.threads} threads; ISA {cpu.isa()}; op dispatch: "
          f"{dispatch}")
    print(markdown_table(["call", "median µs", "min µs", "vs raw C µs"], rows))
    rec.write(args.json)
    return rec.items


def run_cuda(args: argparse.Namespace) -> list[dict]:
    path = Path(__file__).resolve().parent / "biqgemm_cuda.py"
    if not path.exists():
        print(f"biqgemm: --device cuda needs {path} (the Triton benchmark), which is missing (exit 2)")
        raise SystemExit(2)
    spec = importlib.util.spec_from_file_location("biqgemm_cuda", path)
    mod = sys.modules["biqgemm_cuda"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "run"):
        print(f"biqgemm: {path} has no run(args) function (exit 2)")
        raise SystemExit(2)
    groups = _parse_list(args.groups, [], str)
    args.group_size = int(groups[0]) if len(groups) == 1 and groups[0] != "row" else 128
    args.no_graphs = getattr(args, "no_graphs", False)
    return mod.run(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    (run_cuda if args.device == "cuda" else run_cpu)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
