"""CPU BiQGEMM (layout cpu-lut4) against torch fp32, torch dynamic int8, onnxruntime MatMulNBits 4-bit and the
pure-torch LUT reference, all timed in this one process (DESIGN.md §7).

Per case: median µs of one call (LUT build included; the kernel is called through `qgraph.kernels.cpu.biqgemm`,
i.e. Python validation + ctypes; `torch.ops.qgraph.biqgemm` adds ~20 µs of dispatch), rotating over enough
weight copies that the copies total more than 4× the last-level cache, so weights stream from DRAM as in a real
decode step. All methods of a case, and a streaming copy, are timed in interleaved rounds, so that they share
whatever else the machine is doing (the table also shows each kernel's fastest call). Bandwidth is the weight
bytes a call reads (packed bits + α) over its time, and % of that copy's rate (read + write bytes). max rel err is
max|y − y_ref| / max|y_ref| against x·Ŵᵀ in fp32 from the dequantized weight. BCQ weights are random codes
(random bits, α decaying per plane): timing does not depend on the values. MatMulNBits uses block 128, the
default zero point, the accuracy level given by --ort-accuracy-level (4 = int8 activations, its fastest CPU
path; 0 = fp32) and non-spinning intra-op threads. Every library runs with --threads intra-op threads.

    python bench/biqgemm.py [--quick] [--json out.json] [--shapes 11008x4096] [--batches 1,8,32] [--bits 3,4]
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

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
BATCHES = [1, 2, 4, 8, 16, 32]
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
    ap.add_argument("--shapes", help="comma-separated MxK list (default: the four LLM shapes)")
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,2,4,8,16,32)")
    ap.add_argument("--bits", help="comma-separated q values (default 1,2,3,4)")
    ap.add_argument("--groups", help="comma-separated group sizes, 'row' = whole row (default row,128)")
    ap.add_argument("--modes", default="exact,fast", help="kernel modes (default exact,fast)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for every library (default 2)")
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds of timed calls per method and case")
    ap.add_argument("--lut-torch-batches", default="1", help="batches at which to time the pure-torch LUT")
    ap.add_argument("--ort-accuracy-level", type=int, default=4, help="MatMulNBits accuracy_level (0 or 4)")
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


def run_cpu(args: argparse.Namespace) -> list[dict]:
    from qgraph.kernels import cpu
    from qgraph.kernels.reference import LutTorchWeight, biqgemm_lut_torch

    torch.set_num_threads(args.threads)
    shapes = QUICK["shapes"] if args.quick else _parse_list(args.shapes, SHAPES, _shape)
    batches = QUICK["batches"] if args.quick else _parse_list(args.batches, BATCHES, int)
    bits = QUICK["bits"] if args.quick else _parse_list(args.bits, BITS, int)
    groups = QUICK["groups"] if args.quick else _parse_list(args.groups, GROUPS, str)
    modes = _parse_list(args.modes, MODES, str)
    lut_batches = set(_parse_list(args.lut_torch_batches, [1], int))
    min_time = min(args.min_time, 0.25) if args.quick else args.min_time
    llc = llc_bytes()

    rec = Records()
    copier = StreamingCopy(max(128 << 20, 4 * llc))
    print(f"# {machine()}; {args.threads} threads; ISA path {cpu.isa()}; LLC {llc >> 20} MiB; "
          f"ORT MatMulNBits accuracy_level={args.ort_accuracy_level}; every case's methods and a "
          f"{copier.nbytes >> 20} MiB streaming copy timed in interleaved rounds")
    rows = []
    for m, k in shapes:
        ws = fp32_weights(m, k, copies_for(m * k * 4, llc, cap=4))
        i8 = int8_dynamic_linears(ws, copies_for(m * k, llc, cap=8))
        ort_s = ort_nbits_sessions(m, k, copies_for(m * k // 2, llc, cap=12), args.threads, args.ort_accuracy_level)
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
            methods = {
                "copy": [copier],
                "fp32": [lambda w=w, x=x: F.linear(x, w) for w in ws],
                "int8-dynamic": [lambda mod=mod, x=x: mod(x) for mod in i8],
                "ort-nbits4": [lambda s=s, xn=xn: s.run(None, {"A": xn}) for s in ort_s],
            }
            for (q, group_name), (_, packs) in bcq.items():
                for mode in modes:
                    methods[(q, group_name, mode)] = [lambda p=p, mode=mode, x=x: cpu.biqgemm(x, p, None, mode)
                                                      for p in packs]
            fastest: dict = {}
            med = interleaved_median_us(methods, min_time, best=fastest)
            bw = copier.gbs(med["copy"])
            rec.add(f"{m}x{k} b{n} copy", "median_us", med["copy"], gbs=bw, isa=cpu.isa(), threads=args.threads)
            for name in ("fp32", "int8-dynamic", "ort-nbits4"):
                rec.add(f"{m}x{k} b{n} {name}", "median_us", med[name], min_us=fastest[name])
            for (q, group_name), (w0, packs) in bcq.items():
                gtag = "" if group_name == "row" else f" g{group_name}"
                ref = x @ w0.dequantize().t()
                if n in lut_batches:
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
                    err = cpu.relative_error(cpu.biqgemm(x, p0, None, mode), ref)
                    gbs = p0.nbytes / us / 1e3
                    case = f"{m}x{k} b{n} q{q}{gtag} biqgemm-{mode}"
                    metrics = {
                        "median_us": us,
                        "speedup_vs_fp32": med["fp32"] / us,
                        "speedup_vs_int8_dynamic": med["int8-dynamic"] / us,
                        "speedup_vs_ort_nbits4": med["ort-nbits4"] / us,
                        "pct_bandwidth": 100 * gbs / bw,
                        "max_rel_err": err,
                        "bytes": p0.nbytes,
                    }
                    for metric, value in metrics.items():
                        rec.add(case, metric, value)
                    rec.items[-len(metrics)]["min_us"] = fastest[(q, group_name, mode)]
                    rows.append([case, f"{us:.0f}", f"{fastest[(q, group_name, mode)]:.0f}", f"{med['fp32']:.0f}", f"{med['int8-dynamic']:.0f}",
                                 f"{med['ort-nbits4']:.0f}", f"{metrics['speedup_vs_fp32']:.2f}",
                                 f"{metrics['speedup_vs_int8_dynamic']:.2f}",
                                 f"{metrics['speedup_vs_ort_nbits4']:.2f}", f"{gbs:.1f}",
                                 f"{metrics['pct_bandwidth']:.0f}", f"{err:.1e}"])
            print(f"{m}x{k} b{n} done", file=sys.stderr, flush=True)
        del ws, i8, ort_s, bcq
        gc.collect()
    header = ["case", "µs", "min µs", "fp32 µs", "int8-dyn µs", "ort-nbits4 µs", "×fp32", "×int8-dyn",
              "×ort-nbits4", "GB/s", "% copy BW", "max rel err"]
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
