"""GPU BiQGEMM (Triton, layout cuda-lut8) against torch fp16/bf16 F.linear and torch int4 weight-only matmul.

Shapes are real LLM layers (out × in); x is fp16 for BiQGEMM and fp16/bf16 for the baselines. Every case is
timed two ways in one process: `triton.testing.do_bench` (L2 flushed before each call, median) and a CUDA
graph replaying the call over enough weight copies to overflow L2 (median per call). Bandwidth is the bytes
a call must move (weights + scales + x + y) over its time, as a % of a device-to-device copy measured in the
same run. Errors are max|y − y_ref| / max|y_ref| against x·Ŵᵀ in fp32 from the dequantized weight as stored.
BCQ weights default to α in fp16 (layout cuda-lut8-h, as LUT-GEMM stores them) and no offset (the quantizer's
default); ``--scales fp32`` / ``--offset`` change that. "ceil ×fp16" / "ceil ×int4" are the speedups a purely
bandwidth-bound kernel would reach (baseline bytes over BiQGEMM bytes); ``--ceilings`` prints only those and
needs no GPU.

``--tune`` sweeps the launcher's tile sizes, warps and K-splits instead (each config checked for correctness).

    python bench/biqgemm_cuda.py [--quick] [--json out.json] [--scales fp16|fp32] [--offset] [--ceilings|--tune]

`run(args)` is what ``bench/biqgemm.py --device cuda`` calls; without CUDA it prints why and exits 2.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from _records import Records, markdown_table

SHAPES = [(4096, 4096), (11008, 4096), (14336, 4096), (28672, 8192)]
BATCHES = [1, 2, 4, 8, 16, 32]
BITS = [2, 3, 4]
QUICK = {"shapes": [(11008, 4096)], "batches": [1, 16], "bits": [3, 4]}
INT4_GROUP = 128


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="11008x4096 at batch 1 and 16, q=3 and 4 (< 60 s)")
    ap.add_argument("--json", metavar="PATH", help="write records (case, metric, value) as JSON")
    ap.add_argument("--group-size", type=int, default=128, help="BCQ α group size (default 128)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--scales", choices=["fp16", "fp32"], default="fp16",
                    help="store α (and z) in fp16 (layout cuda-lut8-h, default) or fp32 (layout cuda-lut8)")
    ap.add_argument("--offset", action="store_true", help="BCQ weights with an offset z per group")
    ap.add_argument("--tune", action="store_true",
                    help="sweep block_m / num_warps / split_k per algorithm against the defaults (q=3)")
    ap.add_argument("--ceilings", action="store_true",
                    help="only print the bandwidth ceilings (bytes ratios against fp16 and int4); needs no GPU")
    return ap


# ----------------------------------------------------------------------------------------------- timing
def _bench_flushed(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def _bench_graph(fns: list, reps: int = 20) -> float:
    """Median µs per call of ``fns`` (one per weight copy) captured back to back in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm up (and compile) outside the capture
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> tuple[float, float]:
    """(µs, GB/s) of a device-to-device copy of ``nbytes``; GB/s counts the bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    us = _bench_flushed(partial(dst.copy_, src))
    return us, 2 * nbytes / (us * 1e-6) / 1e9


def _copies_for(nbytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(64, math.ceil(2 * l2 / max(nbytes, 1))))


# ----------------------------------------------------------------------------------------------- bytes
@dataclass(frozen=True)
class Config:
    """How the BCQ weights of a run are stored."""

    group: int = 128
    scale_dtype: torch.dtype = torch.float16  # α and z: fp16 is layout cuda-lut8-h (LUT-GEMM), fp32 is cuda-lut8
    offset: bool = False  # the BCQ quantizer's default is no offset

    @property
    def label(self) -> str:
        return f"g{self.group} {'fp16' if self.scale_dtype == torch.float16 else 'fp32'} scales" + (
            " + offset" if self.offset else "")


def bcq_bytes(m: int, k: int, n: int, q: int, cfg: Config) -> int:
    """Bytes one BiQGEMM call must move: bit-planes, α (and z) as stored, x and y in fp16."""
    kw, groups = -(-k // 32), -(-k // cfg.group)
    scale = 2 if cfg.scale_dtype == torch.float16 else 4
    return kw * q * m * 4 + groups * m * (q + cfg.offset) * scale + 2 * n * (k + m)


def fp16_bytes(m: int, k: int, n: int) -> int:
    return 2 * m * k + 2 * n * (k + m)


def int4_bytes(m: int, k: int, n: int) -> int:
    """torch's int4 weight-only layout: 4-bit codes plus a bf16 scale and zero per group of `INT4_GROUP`."""
    return m * k // 2 + m * (k // INT4_GROUP) * 4 + 2 * n * (k + m)


def ceilings(m: int, k: int, n: int, q: int, cfg: Config) -> tuple[float, float]:
    """(×fp16, ×int4) a purely bandwidth-bound BiQGEMM could reach: the baselines' bytes over its bytes."""
    b = bcq_bytes(m, k, n, q, cfg)
    return fp16_bytes(m, k, n) / b, int4_bytes(m, k, n) / b


def print_ceilings(rec: Records) -> None:
    """The bandwidth ceilings of every shape at batch 1 and 32, q=2..4, for each way of storing scales."""
    rows = []
    for m, k in SHAPES:
        for n in (1, 32):
            for q in BITS:
                cells = []
                for cfg in (Config(scale_dtype=torch.float32, offset=True), Config(scale_dtype=torch.float32),
                            Config(offset=True), Config()):
                    c16, c4 = ceilings(m, k, n, q, cfg)
                    rec.add(f"{m}x{k} b{n} q{q} {cfg.label} ceiling", "speedup_vs_fp16", c16)
                    rec.add(f"{m}x{k} b{n} q{q} {cfg.label} ceiling", "speedup_vs_int4", c4)
                    cells.append(f"{c16:.2f} / {c4:.2f}")
                rows.append([f"{m}x{k} b{n} q{q}", *cells])
    header = ["case (group 128)", "fp32 α+z", "fp32 α", "fp16 α+z", "fp16 α"]
    print("# bandwidth ceilings ×fp16 / ×int4 (baseline bytes over BiQGEMM bytes; no GPU needed)")
    print(markdown_table(header, rows))


# ----------------------------------------------------------------------------------------------- weights
def _random_bcq(m: int, k: int, q: int, cfg: Config, device: str):
    from qgraph.quant.bcq_weight import BCQWeight

    g = -(-k // cfg.group)
    return BCQWeight(
        planes=torch.randint(0, 256, (q, m, -(-k // 8)), dtype=torch.uint8, device=device),
        alpha=torch.rand(q, m, g, device=device) * (0.5 ** torch.arange(q, device=device))[:, None, None] * 0.02,
        offset=torch.randn(m, g, device=device) * 1e-3 if cfg.offset else None,
        shape=(m, k),
        group_size=cfg.group,
    )


def _int4_baseline(w_fp: torch.Tensor):
    """A closure ``x_bf16 -> y`` over torch's int4 weight-only kernel, or None where this build lacks it."""
    try:
        m, k = w_fp.shape
        wg = w_fp.float().reshape(m, k // INT4_GROUP, INT4_GROUP)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(m, k)
        zero = lo + 8 * scale  # torch's convention: w = (q - 8) * scale + zero
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        wq = torch._convert_weight_to_int4pack(packed_u8, 8)

        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch._weight_int4pack_mm(x, wq, INT4_GROUP, sz)

        deq = ((q.float().reshape(m, -1, INT4_GROUP) - 8) * scale + zero).reshape(m, k)
        x = torch.randn(4, k, device=w_fp.device, dtype=torch.bfloat16)
        ref = x.float() @ deq.T
        err = ((fn(x).float() - ref).abs().max() / ref.abs().max()).item()
        if err > 5e-2:
            print(f"# int4 baseline disagrees with its own dequantization (rel err {err:.2e}); dropped")
            return None
        return fn
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        print(f"# torch int4 weight-only matmul unavailable here ({type(e).__name__}: {str(e)[:120]}); skipped")
        return None


# ----------------------------------------------------------------------------------------------- the run
def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _baselines(x: torch.Tensor, w16: torch.Tensor, int4, graphs: bool) -> dict[str, float]:
    """Median µs of torch fp16 / bf16 F.linear, int4 weight-only (where available) and fp16 in a CUDA graph."""
    xb, wbf = x.to(torch.bfloat16), w16.to(torch.bfloat16)
    base = {"fp16": _bench_flushed(partial(F.linear, x, w16)), "bf16": _bench_flushed(partial(F.linear, xb, wbf))}
    if int4 is not None:
        base["int4"] = _bench_flushed(partial(int4, xb))
    if graphs:
        ws = [w16] + [w16.clone() for _ in range(_copies_for(w16.numel() * 2) - 1)]
        base["fp16 cudagraph"] = _bench_graph([partial(F.linear, x, w) for w in ws])
    return base


def _bench_bcq(rec, x, m, k, q, cfg: Config, bw: float, base: dict, graphs: bool) -> list[str]:
    """Time every applicable algorithm for one (shape, batch, q); returns the Markdown row."""
    from qgraph.kernels.triton_biqgemm import biqgemm_triton

    n = x.shape[0]
    packed, alpha, offset, w_stored = _packed_random(m, k, q, cfg, str(x.device))
    ref = x.float() @ w_stored.T
    nbytes = bcq_bytes(m, k, n, q, cfg)
    ceil16, ceil4 = ceilings(m, k, n, q, cfg)

    def pct(us: float) -> float:
        return 100 * nbytes / (us * 1e-6) / 1e9 / bw

    times, errs = {}, {}
    for algo in ["lut", "decode", "dot"] if n <= 8 else ["dot"]:
        def call(algo=algo):
            return biqgemm_triton(x, packed, alpha, offset, None, m, k, cfg.group, algo=algo)

        case = f"{m}x{k} b{n} q{q} biqgemm-{algo}"
        errs[algo] = _rel_err(call(), ref)
        times[algo] = us = _bench_flushed(call)
        rec.add(case, "median_us", us, scales=cfg.label)
        rec.add(case, "max_rel_err", errs[algo])
        rec.add(case, "pct_bandwidth", pct(us))
        rec.add(case, "speedup_vs_fp16", base["fp16"] / us)
        if "int4" in base:
            rec.add(case, "speedup_vs_int4", base["int4"] / us)
    best = min(times, key=times.get)
    g_us = float("nan")
    if graphs:
        copies = [(packed, alpha, offset)] + [
            (packed.clone(), alpha.clone(), None if offset is None else offset.clone())
            for _ in range(_copies_for(nbytes) - 1)
        ]
        g_us = _bench_graph([
            lambda p=p, a=a, o=o: biqgemm_triton(x, p, a, o, None, m, k, cfg.group, algo=best) for p, a, o in copies
        ])
        case = f"{m}x{k} b{n} q{q} biqgemm-{best} cudagraph"
        rec.add(case, "median_us", g_us)
        rec.add(case, "speedup_vs_fp16", base["fp16 cudagraph"] / g_us)
        rec.add(case, "pct_bandwidth", pct(g_us))
    nan = float("nan")
    us = times[best]
    cells = [times.get("lut", nan), times.get("decode", nan), times["dot"], g_us, base["fp16"], base["bf16"],
             base.get("int4", nan)]
    return [f"{m}x{k} b{n} q{q}", best, f"{us:.1f}", *(f"{v:.1f}" for v in cells), f"{base['fp16'] / us:.2f}",
            f"{ceil16:.2f}", f"{base.get('int4', nan) / us:.2f}", f"{ceil4:.2f}", f"{pct(us):.0f}",
            f"{errs[best]:.1e}"]


def _packed_random(m: int, k: int, q: int, cfg: Config, device: str):
    """A random BCQ weight packed for the kernel: ``(packed, alpha, offset, Ŵ)`` with Ŵ dequantized from what the
    packed tensors hold (α and z as stored, so fp16 rounding is part of the reference)."""
    from qgraph.kernels.triton_biqgemm import pack_cuda, unpack_cuda

    packed, alpha, offset = pack_cuda(_random_bcq(m, k, q, cfg, device), cfg.scale_dtype)
    return packed, alpha, offset, unpack_cuda(packed, alpha, offset, m, k, cfg.group).dequantize()


HEADER = ["case", "best", "best µs", "lut µs", "decode µs", "dot µs", "graph µs", "fp16 µs", "bf16 µs", "int4 µs",
          "×fp16", "ceil ×fp16", "×int4", "ceil ×int4", "% copy BW", "max rel err"]


def measure(rec: Records, shapes, batches, bits, cfg: Config, bw: float, graphs: bool, device: str = "cuda"):
    """Every (shape, batch, q) case: baselines, then BiQGEMM; returns the Markdown rows."""
    rows = []
    for m, k in shapes:
        torch.manual_seed(0)
        w16 = (torch.randn(m, k, device=device) * 0.02).to(torch.float16)
        int4 = _int4_baseline(w16) if k % INT4_GROUP == 0 else None
        for n in batches:
            x = torch.randn(n, k, device=device, dtype=torch.float16)
            base = _baselines(x, w16, int4, graphs)
            for name, us in base.items():
                rec.add(f"{m}x{k} b{n} {name}", "median_us", us)
            for q in bits:
                rows.append(_bench_bcq(rec, x, m, k, q, cfg, bw, base, graphs))
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------- tuning
TUNE = {"shapes": [(4096, 4096), (11008, 4096), (28672, 8192)], "batches": [1, 2, 4, 8, 16, 32], "bits": [3]}
TUNE_QUICK = {"shapes": [(11008, 4096)], "batches": [1, 8], "bits": [3]}
TUNE_GRID = {"lut": ([64, 128, 256], [4, 8]), "decode": ([32, 64, 128], [4, 8]), "dot": ([32, 64, 128], [4, 8])}
TUNE_SPLITS = [None, 1, 2, 4, 8]  # None: the launcher's heuristic
TUNE_HEADER = ["case", "algo", "default µs", "best µs", "best block_m/warps/split", "×default", "max rel err"]


def tune(rec: Records, shapes, batches, bits, cfg: Config, device: str = "cuda", grid=None, splits=None):
    """Time every (block_m, num_warps, split_k) of `TUNE_GRID` per algorithm against the launcher's defaults.

    Each config's output is checked against the stored weight first; the rows say how much a better tile would
    buy and where `_gemv_config` / `_dot_config` should move.
    """
    from qgraph.kernels.triton_biqgemm import biqgemm_triton

    grid, splits = grid or TUNE_GRID, splits or TUNE_SPLITS
    rows = []
    for m, k in shapes:
        for q in bits:
            packed, alpha, offset, wd = _packed_random(m, k, q, cfg, device)
            for n in batches:
                x = torch.randn(n, k, device=device, dtype=torch.float16)
                ref = x.float() @ wd.T
                for algo in ("lut", "decode", "dot") if n <= 8 else ("dot",):
                    call = partial(biqgemm_triton, x, packed, alpha, offset, None, m, k, cfg.group, algo=algo)
                    err = _rel_err(call(), ref)
                    default = best = _bench_flushed(call)
                    best_cfg = "default"
                    for bm in grid[algo][0]:
                        for warps in grid[algo][1]:
                            for split in splits:
                                fn = partial(call, block_m=bm, num_warps=warps, split_k=split)
                                err = max(err, _rel_err(fn(), ref))
                                us = _bench_flushed(fn)
                                if us < best:
                                    best, best_cfg = us, f"{bm}/{warps}/{split or 'auto'}"
                    case = f"{m}x{k} b{n} q{q} biqgemm-{algo}"
                    rec.add(case + " default", "median_us", default, scales=cfg.label)
                    rec.add(case + " tuned", "median_us", best, config=best_cfg, scales=cfg.label)
                    rec.add(case + " tuned", "max_rel_err", err)
                    rows.append([f"{m}x{k} b{n} q{q}", algo, f"{default:.1f}", f"{best:.1f}", best_cfg,
                                 f"{default / best:.2f}", f"{err:.1e}"])
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    """Run the GPU benchmark; returns the records (also written to ``args.json``). Exits 2 without CUDA."""
    rec = Records()
    if getattr(args, "ceilings", False):
        print_ceilings(rec)
        rec.write(getattr(args, "json", None))
        return rec.items
    if not torch.cuda.is_available():
        print("biqgemm_cuda: no CUDA device visible to torch; the GPU benchmark needs one (exit 2); "
              "--ceilings prints the bandwidth ceilings without one")
        raise SystemExit(2)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("biqgemm_cuda: triton is not installed (pip install 'qgraph[gpu]') (exit 2)")
        raise SystemExit(2) from None

    torch.backends.cuda.matmul.allow_tf32 = False
    quick = getattr(args, "quick", False)
    cfg = Config(group=getattr(args, "group_size", 128) or 128,
                 scale_dtype=torch.float32 if getattr(args, "scales", "fp16") == "fp32" else torch.float16,
                 offset=getattr(args, "offset", False))
    graphs = not getattr(args, "no_graphs", False)
    copy_us, bw = copy_bandwidth()
    dev = torch.cuda.get_device_name(0)
    print(f"# {dev}: device-to-device copy {bw:.0f} GB/s; BCQ {cfg.label}; x fp16")
    rec.add("copy d2d 1GiB", "median_us", copy_us, gbs=bw, device=dev)
    if getattr(args, "tune", False):
        sweep = TUNE_QUICK if quick else TUNE
        print(markdown_table(TUNE_HEADER, tune(rec, sweep["shapes"], sweep["batches"], sweep["bits"], cfg)))
        rec.write(getattr(args, "json", None))
        return rec.items
    rows = measure(rec, QUICK["shapes"] if quick else SHAPES, QUICK["batches"] if quick else BATCHES,
                   QUICK["bits"] if quick else BITS, cfg, bw, graphs)
    print(markdown_table(HEADER, rows))
    rec.write(getattr(args, "json", None))
    return rec.items


def main(argv: list[str] | None = None) -> int:
    run(_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
