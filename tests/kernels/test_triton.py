"""Triton BiQGEMM (layout cuda-lut8) against the dequantized fp32 product.

Kernel tests run the real kernels on CUDA when a GPU is present. Without one they run on CPU tensors through
Triton's interpreter, which must be switched on before triton is first imported; so the plain run re-runs this
file in a child pytest with ``TRITON_INTERPRET=1`` (`test_kernels_under_interpreter`) and the flag never
reaches other test modules. The plain run also builds every kernel variant for sm_90 (no GPU needed) and
checks ptxas spills no registers. Everything skips cleanly without triton.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import KernelError
from qgraph.quant.bcq_weight import BCQWeight

triton = pytest.importorskip("triton")
tb = pytest.importorskip("qgraph.kernels.triton_biqgemm")

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETER
DEVICE = "cuda" if CUDA else "cpu"
KM = tb  # the module whose kernels run here (compiled on CUDA, interpreted under TRITON_INTERPRET=1)
needs_kernels = pytest.mark.skipif(
    not (CUDA or INTERPRETER), reason="no CUDA: these run in the interpreter child (test_kernels_under_interpreter)"
)
# Relative to max|y_ref|. bf16 keeps 8 significant bits and the interpreter truncates when it rounds to bf16.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def _weight(m: int, k: int, q: int, group: int, offset: bool, seed: int) -> BCQWeight:
    gen = torch.Generator().manual_seed(seed)
    g = -(-k // group)
    signs = torch.randint(0, 2, (q, m, k), generator=gen) * 2 - 1
    alpha = torch.rand(q, m, g, generator=gen) + 0.05
    z = torch.randn(m, g, generator=gen) * 0.1 if offset else None
    return BCQWeight.from_signs(signs, alpha, z, group)


def _half_scales(w: BCQWeight) -> BCQWeight:
    """The weight layout cuda-lut8-h stores: α and z rounded to fp16."""
    z = None if w.offset is None else w.offset.half().float()
    return BCQWeight(planes=w.planes, alpha=w.alpha.half().float(), offset=z, shape=w.shape, group_size=w.group_size)


def _check(w: BCQWeight, n: int, dtype: torch.dtype, bias: bool, seed: int, lead=None,
           scale_dtype: torch.dtype = torch.float32, **kw) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    m, k = w.shape
    x = torch.randn(*(lead or (n,)), k, generator=gen).to(dtype)
    b = torch.randn(m, generator=gen) if bias else None
    stored = _half_scales(w) if scale_dtype == torch.float16 else w
    ref = x.double() @ stored.dequantize().double().T + (b.double() if bias else 0)
    y = KM.biqgemm_cuda_weight(x.to(DEVICE), w, None if b is None else b.to(DEVICE), scale_dtype=scale_dtype, **kw)
    assert y.dtype == dtype and y.shape == ref.shape
    err = ((y.cpu().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    assert err <= TOL[dtype], f"rel err {err:.2e} > {TOL[dtype]:.0e} ({dtype}, {kw})"


@pytest.mark.skipif(CUDA or INTERPRETER, reason="kernels run directly here")
def test_kernels_under_interpreter():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(Path(__file__).resolve()),
           "-k", "not sm90 and not under_interpreter"]
    run = subprocess.run(cmd, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    if run.returncode != 0:
        pytest.fail(f"interpreter run failed (rc={run.returncode}):\n{tail}")
    assert " passed" in run.stdout and "no CUDA" not in run.stdout, tail


# ----------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("m,k,q,group", [(5, 70, 3, 70), (9, 256, 2, 64), (3, 33, 1, 33), (4, 96, 8, 32)])
def test_pack_cuda_holds_the_same_bits(m, k, q, group):
    w = _weight(m, k, q, group, offset=True, seed=m * k)
    packed, alpha, offset = tb.pack_cuda(w)
    kw = -(-k // 32)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (kw, q, m)
    bits = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1  # [KW, q, M, 32]
    bits = bits.permute(1, 2, 0, 3).reshape(q, m, kw * 32)
    assert torch.equal(bits[..., :k] * 2 - 1, w.signs().to(torch.int64))
    assert not bits[..., k:].any(), "padding bits must be 0"
    assert torch.equal(alpha, w.alpha.permute(2, 0, 1))
    assert torch.equal(offset, w.offset.t())


def test_pack_half_scales_rounds_only_the_scales():
    w = _weight(9, 256, 3, 64, offset=True, seed=5)
    packed32, alpha32, offset32 = tb.pack_cuda(w)
    packed, alpha, offset = tb.pack_cuda(w, torch.float16)
    assert torch.equal(packed, packed32)
    assert alpha.dtype == offset.dtype == torch.float16
    assert torch.equal(alpha, alpha32.half()) and torch.equal(offset, offset32.half())
    back = tb.unpack_cuda(packed, alpha, offset, 9, 256, 64)
    half = _half_scales(w)
    assert back.alpha.dtype == torch.float32 and torch.equal(back.alpha, half.alpha)
    assert torch.equal(back.offset, half.offset) and torch.equal(back.planes, w.planes)
    # fp16 keeps 11 significant bits: the stored weight is within 2^-11 (relative) of the exact one per α
    rel = (half.dequantize() - w.dequantize()).abs().max() / w.dequantize().abs().max()
    assert 0 < rel.item() < 2.0**-11 * 3


def test_pack_half_scales_refuses_out_of_range_scales():
    w = _weight(4, 64, 2, 32, offset=False, seed=6)
    big = BCQWeight(planes=w.planes, alpha=w.alpha * 1e6, offset=None, shape=w.shape, group_size=w.group_size)
    with pytest.raises(KernelError, match="cuda-lut8"):
        tb.pack_cuda(big, torch.float16)
    with pytest.raises(KernelError, match="float32 or float16"):
        tb.pack_cuda(w, torch.bfloat16)


@pytest.mark.parametrize("group", [16, 48, 100])
def test_pack_rejects_groups_that_split_a_word(group):
    w = _weight(4, 256, 2, group, offset=False, seed=1)
    with pytest.raises(KernelError, match="multiple of 32"):
        tb.pack_cuda(w)


# ----------------------------------------------------------------------------------------------- kernels
@needs_kernels
@pytest.mark.parametrize("algo", ["lut", "decode", "dot"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_each_path_matches_reference(algo, split_k):
    w = _weight(72, 200, 3, 64, offset=True, seed=7)
    _check(w, 5, torch.float32, bias=True, seed=3, algo=algo, split_k=split_k)
    _check(w, 5, torch.float16, bias=False, seed=4, algo=algo, split_k=split_k, scale_dtype=torch.float16)


@needs_kernels
@pytest.mark.parametrize("algo", ["lut", "decode", "dot"])
def test_split_reduction_is_deterministic_and_leaves_counters_zeroed(algo):
    w = _weight(200, 320, 2, 64, offset=True, seed=21)
    # 16-row tiles and 5 K-splits: 13 row tiles (for dot: x 1 batch tile), each summed by its last program
    _check(w, 3, torch.float32, bias=True, seed=8, algo=algo, split_k=5, block_m=16)
    x = torch.randn(3, 320, device=DEVICE, dtype=torch.float16)
    packed, alpha, offset = (t.to(DEVICE) for t in tb.pack_cuda(w))

    def call():
        return KM.biqgemm_triton(x, packed, alpha, offset, None, 200, 320, 64, algo=algo, split_k=5, block_m=16)

    ys = [call() for _ in range(2)]
    assert torch.equal(ys[0], ys[1])
    assert all(int(c.abs().sum()) == 0 for c in KM._COUNTERS.values()), "a tile counter was left nonzero"
    if CUDA:  # the whole split call is one kernel: no zero-fill, no cast
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
        assert len(kernels) == 1, kernels


@needs_kernels
@pytest.mark.parametrize("q", [3, 5, 7])
def test_lut_lanes_hold_whole_rows_for_odd_bit_counts(q):
    # block_m=16: 16·qp lanes hold 16·qp // q rows (21, 25, 18), so M=50 ends in a partial tile and q=7 leaves
    # two idle lanes: every row must still collect its q planes, offset and bias exactly once
    w = _weight(50, 200, q, 64, offset=True, seed=30 + q)
    _check(w, 3, torch.float32, bias=True, seed=q, algo="lut", block_m=16)
    _check(w, 1, torch.float16, bias=False, seed=q, algo="lut", block_m=16, split_k=2, scale_dtype=torch.float16)


@needs_kernels
@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 96),
    k=st.integers(1, 256),
    q=st.sampled_from([1, 2, 3, 4, 8]),
    group=st.sampled_from(["row", 32, 64, 128]),
    offset=st.booleans(),
    bias=st.booleans(),
    n=st.sampled_from([1, 3, 8, 9, 16]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    split_k=st.sampled_from([None, 2]),
    scale_dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_matches_dequantized_product(m, k, q, group, offset, bias, n, dtype, split_k, scale_dtype, seed):
    gs = k if group == "row" or group >= k else group
    _check(_weight(m, k, q, gs, offset, seed), n, dtype, bias, seed, split_k=split_k, scale_dtype=scale_dtype)


@needs_kernels
@pytest.mark.parametrize("algo", ["lut", "decode"])
def test_small_batch_paths_in_half_precision(algo):
    w = _weight(48, 160, 4, 32, offset=True, seed=11)
    _check(w, 8, torch.float16, bias=True, seed=5, algo=algo)
    _check(w, 2, torch.bfloat16, bias=False, seed=6, algo=algo)


@needs_kernels
def test_leading_dims_empty_batch_and_fast_mode():
    w = _weight(20, 64, 2, 32, offset=False, seed=2)
    _check(w, 6, torch.float32, bias=True, seed=1, lead=(2, 3))
    _check(w, 12, torch.float32, bias=True, seed=1, lead=(3, 4), algo="dot")
    y = KM.biqgemm_cuda_weight(torch.zeros(0, 64, device=DEVICE), w)
    assert y.shape == (0, 20)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 64, generator=gen)
    y = KM.biqgemm_cuda_weight(x.to(DEVICE), w, mode="fast").cpu()
    ref = x @ w.dequantize().T
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 2e-3  # TF32 on a GPU


@needs_kernels
def test_rejects_bad_inputs():
    w = _weight(16, 64, 2, 32, offset=True, seed=3)
    packed, alpha, offset = (t.to(DEVICE) for t in tb.pack_cuda(w))
    x = torch.randn(2, 64, device=DEVICE)
    args = (packed, alpha, offset, None, 16, 64, 32)
    with pytest.raises(KernelError, match="fp16/bf16/fp32"):
        KM.biqgemm_triton(x.to(torch.int32), *args)
    with pytest.raises(KernelError, match="in_features"):
        KM.biqgemm_triton(torch.randn(2, 60, device=DEVICE), *args)
    with pytest.raises(KernelError, match="int32"):
        KM.biqgemm_triton(x, packed.to(torch.int64), *args[1:])
    with pytest.raises(KernelError, match="alpha"):
        KM.biqgemm_triton(x, packed, alpha[:1], *args[2:])
    with pytest.raises(KernelError, match="alpha's dtype"):
        KM.biqgemm_triton(x, packed, alpha.half(), *args[2:])
    with pytest.raises(KernelError, match="at most 8"):
        KM.biqgemm_triton(torch.randn(9, 64, device=DEVICE), *args, algo="lut")
    with pytest.raises(KernelError, match="multiple of 32"):
        KM.biqgemm_triton(x, packed, alpha, offset, None, 16, 64, 48)


@pytest.mark.skipif(CUDA or INTERPRETER, reason="only meaningful for compiled kernels without a GPU")
def test_compiled_module_refuses_cpu_tensors():
    w = _weight(8, 32, 1, 32, offset=False, seed=4)
    with pytest.raises(KernelError, match="CUDA"):
        tb.biqgemm_cuda_weight(torch.randn(1, 32), w)


def test_unpack_inverts_pack():
    for m, k, q, group, off in [(5, 70, 3, 70, True), (9, 256, 2, 64, False), (4, 96, 8, 32, True)]:
        w = _weight(m, k, q, group, off, seed=m + k)
        back = tb.unpack_cuda(*tb.pack_cuda(w), m, k, group)
        assert torch.equal(back.planes, w.planes) and torch.equal(back.alpha, w.alpha)
        assert (back.offset is None) == (w.offset is None)
        if off:
            assert torch.equal(back.offset, w.offset)


def test_layout_is_registered_with_the_op():
    from qgraph.kernels.op import get_layout

    for name, scale_dtype in (("cuda-lut8", torch.float32), ("cuda-lut8-h", torch.float16)):
        lay = get_layout(name)
        assert lay.impl is KM.biqgemm_triton and lay.unpack is KM.unpack_cuda and lay.device == "cuda"
        w = _weight(6, 64, 2, 32, offset=True, seed=8)
        _, alpha, offset = lay.pack(w)
        assert alpha.dtype == offset.dtype == scale_dtype


@needs_kernels
@pytest.mark.parametrize("layout", ["cuda-lut8", "cuda-lut8-h"])
def test_through_the_op_with_autograd(layout):
    w = _weight(24, 96, 3, 32, offset=True, seed=9)
    scale_dtype = torch.float16 if layout == "cuda-lut8-h" else torch.float32
    packed, alpha, offset = (t.to(DEVICE) for t in tb.pack_cuda(w, scale_dtype))
    b = torch.randn(24, device=DEVICE, requires_grad=True)
    x = torch.randn(3, 96, device=DEVICE, requires_grad=True)
    y = torch.ops.qgraph.biqgemm(x, packed, alpha, offset, b, 24, 96, 32, layout)
    wd = (_half_scales(w) if layout == "cuda-lut8-h" else w).dequantize().to(DEVICE)
    ref = x.detach() @ wd.T + b.detach()
    assert ((y.detach() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ wd, rtol=1e-5, atol=1e-5)
    assert torch.allclose(b.grad, g.sum(0))


@needs_kernels
def test_bcq_linear_with_half_scales_round_trips_its_state():
    from qgraph.kernels.linear import BCQLinear

    w = _weight(40, 96, 3, 32, offset=True, seed=13)
    lin = BCQLinear(w.to(DEVICE), torch.randn(40), layout="cuda-lut8-h")
    assert lin.layout == "cuda-lut8-h" and lin.alpha.dtype == torch.float16
    assert torch.equal(lin.bcq_weight().alpha.cpu(), _half_scales(w).alpha)
    twin = BCQLinear(w.to(DEVICE), torch.zeros(40), layout="cuda-lut8-h")
    twin.load_state_dict(lin.state_dict())
    x = torch.randn(2, 96, device=DEVICE, dtype=torch.float16)
    ref = x.cpu().double() @ _half_scales(w).dequantize().double().T + lin.bias.cpu().double()
    for mod in (lin, twin):
        y = mod(x)
        assert y.dtype == torch.float16
        assert ((y.cpu().double() - ref).abs().max() / ref.abs().max()).item() <= TOL[torch.float16]
    with pytest.raises(KernelError, match="layout"):
        BCQLinear(w.to(DEVICE), layout="cuda-lut8").load_state_dict(lin.state_dict())


@pytest.mark.skipif(not CUDA, reason="BCQLinear picks cuda-lut8 only for CUDA weights")
def test_bcq_linear_picks_cuda_layout():
    from qgraph.kernels.linear import BCQLinear

    w = _weight(32, 128, 3, 64, offset=True, seed=12)
    lin = BCQLinear(w.to("cuda"))
    assert lin.layout == "cuda-lut8"
    x = torch.randn(4, 128, device="cuda")
    ref = x.cpu() @ w.dequantize().T
    assert ((lin(x).cpu() - ref).abs().max() / ref.abs().max()).item() < 1e-5


# ----------------------------------------------------------------------------------------------- sm_90 build
def _sm90_build(fn, signature: dict, constexprs: dict, num_warps: int) -> tuple[dict[str, int], str]:
    """Build ``fn`` for sm_90 (no GPU needed): ({REG, STACK} from ptxas, the SASS text)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = {a: "i32" for a in fn.arg_names if a not in signature and a not in constexprs}
    sig = {**signature, **ints, **{c: "constexpr" for c in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "enable_fp_fusion": True})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"qgraph_sm90_{os.getpid()}.cubin"
    cubin.write_bytes(k.asm["cubin"])
    try:
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    finally:
        cubin.unlink()
    return {w.split(":")[0]: int(w.split(":")[1]) for w in out.split() if w.startswith(("REG:", "STACK:"))}, sass


def _sm90_or_skip(fn, sig, constexprs, warps):
    try:
        return _sm90_build(fn, sig, constexprs, warps)
    except (ImportError, FileNotFoundError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot build for sm_90 here: {e}")


def _sm90_cases():
    base = {"packed_ptr": "*i32", "alpha_ptr": "*fp32", "offset_ptr": "*fp32", "bias_ptr": "*fp32", "ws_ptr": "*fp32",
            "cnt_ptr": "*i32"}
    half = {**base, "alpha_ptr": "*fp16", "offset_ptr": "*fp16"}
    for bb, q, scales in [(1, 4, "f32"), (1, 4, "f16"), (1, 3, "f16"), (2, 2, "f32"), (8, 3, "f16"), (8, 8, "f16")]:
        qp = tb._next_pow2(q)
        bm, warps = tb._gemv_config(bb, qp, True)
        rows = bm * qp // q
        c = {"Q": q, "HAS_OFFSET": True, "HAS_BIAS": True, "SPLIT": True, "BLOCK_B": bb, "LANES": bm * qp,
             "ROWS": rows, "BLOCK_R": tb._next_pow2(rows)}
        sig = {"x_ptr": "*fp16", **(half if scales == "f16" else base), "out_ptr": "*fp16"}
        yield f"lut-b{bb}-q{q}-{scales}", "_lut_kernel", sig, c, warps
    for bb, qp, scales in [(1, 4, "f32"), (8, 2, "f16")]:
        bm, warps = tb._gemv_config(bb, qp, False)
        c = {"HAS_OFFSET": True, "HAS_BIAS": True, "SPLIT": True, "BLOCK_B": bb, "BLOCK_M": bm, "QP": qp}
        sig = {"x_ptr": "*fp16", **(half if scales == "f16" else base), "out_ptr": "*fp16"}
        yield f"decode-b{bb}-q{qp}-{scales}", "_decode_kernel", sig, c, warps
    for dt, n in [("fp16", 16), ("bf16", 64), ("fp32", 32)]:
        torch_dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
        bb, bm, bk, warps = tb._dot_config(n, torch_dt, "exact")
        c = {"HAS_OFFSET": True, "HAS_BIAS": True, "SPLIT": dt == "bf16", "IEEE": dt == "fp32", "UPCAST": False,
             "BLOCK_B": bb, "BLOCK_M": bm, "BLOCK_K": bk}
        sig = {"x_ptr": f"*{dt}", **(half if dt == "fp16" else base), "out_ptr": f"*{dt}"}
        yield f"dot-{dt}-n{n}", "_gemm_kernel", sig, c, warps


@pytest.mark.skipif(not tb.HAS_TRITON, reason="triton is not importable")
@pytest.mark.parametrize("case", list(_sm90_cases()) if tb.HAS_TRITON else [], ids=lambda c: c[0])
def test_builds_for_sm90_without_spills(case):
    name, kernel, sig, constexprs, warps = case
    res, _ = _sm90_or_skip(getattr(tb, kernel), sig, constexprs, warps)
    assert res["STACK"] == 0, f"{name} spills: {res}"
    assert res["REG"] <= 255


@pytest.mark.skipif(not tb.HAS_TRITON, reason="triton is not importable")
@pytest.mark.parametrize("case", [c for c in (_sm90_cases() if tb.HAS_TRITON else [])
                                  if c[0] in ("lut-b1-q4-f32", "lut-b1-q3-f16", "dot-bf16-n64")], ids=lambda c: c[0])
def test_split_reduction_orders_memory_on_sm90(case):
    """The split-K hand-off in SASS: barrier, GPU-scope fence, the counter's atomic add, L1 invalidation, then the
    partials read with GPU-scope (L1-bypassing) loads. The interpreter runs programs one after another, so only the
    machine code can show this ordering without a GPU."""
    name, kernel, sig, constexprs, warps = case
    _, sass = _sm90_or_skip(getattr(tb, kernel), sig, constexprs, warps)
    ops = [line.split("*/", 1)[1].split(";")[0].strip() for line in sass.splitlines()
           if line.strip().startswith("/*") and ";" in line]

    def first(prefix: str, start: int = 0) -> int:
        return next(i for i in range(start, len(ops)) if prefix in ops[i])

    add = first("ATOMG.E.ADD.STRONG.GPU")
    store = max(i for i in range(add) if "STG" in ops[i])  # the last partial written before the hand-off
    bar = first("BAR.SYNC", store)
    fence = next(i for i in range(bar, len(ops)) if "MEMBAR" in ops[i] and "GPU" in ops[i])
    assert store < bar < fence < add, (name, ops[store:add + 1])
    invalidate = first("CCTL.IVALL", add)
    read = first("LDG.E.STRONG.GPU", invalidate)
    reset = first("ATOMG.E.EXCH.STRONG.GPU", read)
    assert add < invalidate < read < reset, (name, add, invalidate, read, reset)
