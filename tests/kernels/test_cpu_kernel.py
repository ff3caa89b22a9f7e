"""The compiled CPU kernel (layout cpu-lut4) against the torch reference, on every ISA path this CPU runs.

Relative error is ``max|y − y_ref| / max|y_ref|`` over the whole output (`tests.conftest.rel_err`).
"""
import contextlib
import ctypes
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import KernelError
from qgraph.kernels import cpu
from qgraph.kernels.reference import biqgemm_reference
from tests.conftest import rel_err
from tests.kernels.test_reference import random_bcq

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C++ extension is not built")

ISAS = [i for i in ("scalar", "avx2", "avx512vbmi") if cpu.available() and i in cpu.supported_isas()]
PATHS = ["lut", "gemm"]
EXACT_TOL = 1e-5


@contextlib.contextmanager
def forced_isa(name):
    old = os.environ.get("QGRAPH_BIQGEMM_ISA")
    os.environ["QGRAPH_BIQGEMM_ISA"] = name
    try:
        assert cpu.isa() == name
        yield
    finally:
        if old is None:
            del os.environ["QGRAPH_BIQGEMM_ISA"]
        else:
            os.environ["QGRAPH_BIQGEMM_ISA"] = old


cases = st.tuples(
    st.integers(1, 80),  # M (tiles of 32 rows, partial last tile)
    st.integers(1, 300),  # K (not a multiple of 32 / of the group size)
    st.integers(1, 4),  # q
    st.sampled_from([None, 32, 64, 128, 33, 45, 7]),  # group size, None = row
    st.booleans(),  # offset z
    st.booleans(),  # bias
    st.integers(1, 33),  # batch
    st.sampled_from(ISAS),
    st.sampled_from(PATHS),  # LUT path (few rows) or decode + GEMM (many rows), forced
)


def fp32_slack(x, w, bias, ref):
    """Elementwise room for fp32 summation order: 1e-5 of max|ref| (the relative-error tolerance) plus 1e-6 of
    Σ|x_k·ŵ_k| (+ |bias|), for outputs that cancel to far below their terms (one output row, K ≤ 300)."""
    cond = x.abs().reshape(-1, x.shape[-1]) @ w.dequantize().abs().t()
    if bias is not None:
        cond = cond + bias.abs()
    return EXACT_TOL * ref.abs().max() + 1e-6 * cond.reshape(ref.shape)


def _case(case, seed):
    m, k, q, gs, off, has_bias, n, isa, path = case
    w = random_bcq(m, k, q, min(gs or k, k), off, seed)
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1))
    bias = torch.randn(m) if has_bias else None
    return w, x, bias, isa, path


@settings(max_examples=80, deadline=None)
@given(cases, st.integers(0, 2**16))
def test_exact_matches_reference(case, seed):
    w, x, bias, isa, path = _case(case, seed)
    p = cpu.pack(w)
    with forced_isa(isa):
        y = cpu.biqgemm(x, p, bias, "exact", path)
    ref = biqgemm_reference(x, w, bias)
    assert ((y - ref).abs() <= fp32_slack(x, w, bias, ref)).all()


@settings(max_examples=80, deadline=None)
@given(cases, st.integers(0, 2**16))
def test_fast_within_documented_bound(case, seed):
    w, x, bias, isa, path = _case(case, seed)
    x = x * 10 ** (seed % 5 - 2)  # scales from 1e-2 to 1e2: the bounds are relative to x and w
    p = cpu.pack(w)
    with forced_isa(isa):
        y = cpu.biqgemm(x, p, bias, "fast", path)
        bound = cpu.fast_error_bound(x, w, path)
    ref = biqgemm_reference(x, w, bias)
    assert ((y - ref).abs() <= bound * (1 + 1e-5) + fp32_slack(x, w, bias, ref)).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("isa", ISAS)
def test_fast_error_on_gaussian_data(isa, path):
    """Typical fast-mode error (documented in qgraph.kernels.cpu): 3e-3 to 8e-3 here, asserted ≤ 1e-2."""
    w = random_bcq(256, 4096, 3, 128, False, seed=3)
    x = torch.randn(4, 4096, generator=torch.Generator().manual_seed(4))
    with forced_isa(isa):
        y = cpu.biqgemm(x, cpu.pack(w), None, "fast", path)
    assert rel_err(y, biqgemm_reference(x, w)) <= 1e-2


@pytest.mark.parametrize("m, k, gs, n", [
    (40, 4100, 128, 300),  # > 1 fp32 and int8 chunk of K, > 1 slab of 256 rows, a partial last group
    (8, 8200, 8200, 37),  # one row tile: the rows are split over the threads; row groups padded
    (33, 96, 96, 12),  # 12 rows = one AVX-512 panel; partial last tile
    (100, 300, 100, 77),  # group not a multiple of 32: padded segments
])
def test_gemm_path_structure(m, k, gs, n):
    w = random_bcq(m, k, 4, gs, True, seed=m)
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(k))
    bias = torch.randn(m)
    p = cpu.pack(w)
    ref = biqgemm_reference(x, w, bias)
    for isa in ISAS:
        with forced_isa(isa):
            assert rel_err(cpu.biqgemm(x, p, bias, "exact", "gemm"), ref) <= EXACT_TOL
            y = cpu.biqgemm(x, p, bias, "fast", "gemm")
            bound = cpu.fast_error_bound(x, w, "gemm")
        assert ((y - ref).abs() <= bound * (1 + 1e-5) + EXACT_TOL * ref.abs().max()).all()


def test_auto_path_follows_the_row_threshold():
    w = random_bcq(64, 256, 3, 128, True)
    p = cpu.pack(w)
    old = {mode: cpu.lut_max_rows(mode) for mode in cpu.MODES}
    try:
        for rows in (1, 4, 9, 16):
            x = torch.randn(rows, 256)
            for mode in cpu.MODES:
                cpu.set_lut_max_rows(**{mode: 8})
                want = "lut" if rows <= 8 else "gemm"
                assert torch.equal(cpu.biqgemm(x, p, None, mode), cpu.biqgemm(x, p, None, mode, want))
        cpu.set_lut_max_rows(exact=0, fast=3)
        assert (cpu.lut_max_rows("exact"), cpu.lut_max_rows("fast")) == (0, 3)
        with pytest.raises(KernelError, match="lut_max_rows"):
            cpu.set_lut_max_rows(fast=-1)
        with pytest.raises(KernelError, match="path"):
            cpu.biqgemm(torch.randn(2, 256), p, None, "fast", "tiles")
    finally:
        cpu.set_lut_max_rows(**old)


def test_threshold_from_env_and_target():
    code = ("from qgraph.kernels import cpu; print(cpu.lut_max_rows('exact'), cpu.lut_max_rows('fast'))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    for env_val, want in (("exact=3,fast=11", "3 11"), ("5", "5 5")):
        env = {**os.environ, "QGRAPH_BIQGEMM_LUT_MAX_ROWS": env_val}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                             cwd=root)
        assert out.stdout.split() == want.split()
    env = {k: v for k, v in os.environ.items() if k != "QGRAPH_BIQGEMM_LUT_MAX_ROWS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    from qgraph.target import load_target

    rows = load_target("x86-avx2").cost.biqgemm_lut_max_rows
    assert out.stdout.split() == [str(rows["exact"]), str(rows["fast"])]


@pytest.mark.parametrize("k, gs", [(4100, 128), (1000, 1000), (97, 33), (31, 31), (1, 1)])
def test_padding_cases(k, gs):
    w = random_bcq(70, k, 3, gs, True, seed=k)
    x = torch.randn(3, k)
    ref = biqgemm_reference(x, w)
    for isa in ISAS:
        with forced_isa(isa):
            for path in PATHS:
                assert rel_err(cpu.biqgemm(x, cpu.pack(w), None, "exact", path), ref) <= EXACT_TOL


def test_large_batch_uses_slabs():
    w = random_bcq(40, 96, 2, 32, True)
    x = torch.randn(150, 96)  # > 64 rows: several table slabs
    assert rel_err(cpu.biqgemm(x, cpu.pack(w)), biqgemm_reference(x, w)) <= EXACT_TOL


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 70), st.integers(1, 130), st.integers(1, 8), st.sampled_from([None, 32, 33, 5]),
       st.booleans())
def test_pack_unpack_round_trip(m, k, q, gs, off):
    w = random_bcq(m, k, q, min(gs or k, k), off)
    p = cpu.pack(w)
    geo = cpu.Geometry(m, k, w.group_size)
    assert tuple(p.packed.shape) == geo.packed_shape(q) and tuple(p.alpha.shape) == geo.alpha_shape(q)
    u = cpu.unpack(p)
    assert torch.equal(u.planes, w.planes) and torch.equal(u.alpha, w.alpha)
    assert (u.offset is None) == (w.offset is None) and (u.offset is None or torch.equal(u.offset, w.offset))


def test_threads_do_not_change_the_result():
    w = random_bcq(300, 256, 3, 64, True)
    x = torch.randn(40, 256)
    p = cpu.pack(w)
    old = torch.get_num_threads()
    for mode in cpu.MODES:
        for path in PATHS:
            try:
                torch.set_num_threads(1)
                y1 = cpu.biqgemm(x, p, None, mode, path)
                torch.set_num_threads(2)
                y2 = cpu.biqgemm(x, p, None, mode, path)
            finally:
                torch.set_num_threads(old)
            assert torch.equal(y1, y2)


def test_isa_reporting_and_env_override():
    assert cpu.isa() in cpu.ISAS
    assert "scalar" in cpu.supported_isas()
    with forced_isa("scalar"):
        assert cpu.isa() == "scalar"
    os.environ["QGRAPH_BIQGEMM_ISA"] = "sse9"
    try:
        with pytest.raises(KernelError, match="QGRAPH_BIQGEMM_ISA"):
            cpu.isa()
    finally:
        del os.environ["QGRAPH_BIQGEMM_ISA"]
    if "avx512vbmi" not in cpu.supported_isas():
        os.environ["QGRAPH_BIQGEMM_ISA"] = "avx512vbmi"
        try:
            with pytest.raises(KernelError, match="cannot run"):
                cpu.isa()
        finally:
            del os.environ["QGRAPH_BIQGEMM_ISA"]


def test_env_var_set_at_process_start():
    code = (
        "import torch; from qgraph.kernels import cpu; from tests.kernels.test_reference import random_bcq;"
        "from qgraph.kernels.reference import biqgemm_reference as r; w = random_bcq(33, 70, 2, 32, True);"
        "x = torch.randn(3, 70); y = cpu.biqgemm(x, cpu.pack(w), None, 'exact'); ref = r(x, w);"
        "print(cpu.isa(), float((y - ref).abs().max() / ref.abs().max()))"
    )
    env = {**os.environ, "QGRAPH_BIQGEMM_ISA": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    isa, err = out.stdout.split()
    assert isa == "scalar" and float(err) <= EXACT_TOL


def test_non_contiguous_and_low_precision_x():
    w = random_bcq(40, 64, 3, 32, False)
    p = cpu.pack(w)
    x = torch.randn(64, 6).t()  # non-contiguous: copied to a contiguous fp32 buffer
    assert rel_err(cpu.biqgemm(x, p), biqgemm_reference(x.contiguous(), w)) <= EXACT_TOL
    xb = torch.randn(2, 3, 64).to(torch.bfloat16)
    y = cpu.biqgemm(xb, p)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 40)
    assert rel_err(y.float(), biqgemm_reference(xb.float(), w)) <= 1e-2  # bf16 output rounding


def test_empty_batch():
    w = random_bcq(8, 16, 1, None, False)
    assert cpu.biqgemm(torch.empty(0, 16), cpu.pack(w)).shape == (0, 8)


def test_bad_inputs_raise_kernel_error():
    w = random_bcq(40, 64, 3, 32, True)
    p = cpu.pack(w)
    x = torch.randn(2, 64)
    args = (p.packed, p.alpha, p.offset, None, 40, 64, 32)
    bad = [
        ((torch.ones(2, 64, dtype=torch.int32),) + args, "float32"),
        ((x.double(),) + args, "float32"),
        ((torch.randn(2, 63),) + args, "in_features"),
        ((x, p.packed.to(torch.int8)) + args[1:], "uint8"),
        ((x, p.packed[:, :1]) + args[1:], "packed"),
        ((x, p.packed, p.alpha[:, :, :2].contiguous()) + args[2:], "packed must be"),
        ((x, p.packed, p.alpha, p.offset[:, :1]) + args[3:], "offset"),
        ((x, p.packed, p.alpha.transpose(0, 1).contiguous().transpose(0, 1)) + args[2:], "contiguous"),
        ((x, p.packed, p.alpha, p.offset, torch.randn(39), 40, 64, 32), "bias"),
        ((x, p.packed, p.alpha, p.offset, None, 72, 64, 32), "alpha shape"),
        ((x, p.packed, p.alpha, p.offset, None, 40, 64, 64), "alpha shape"),
        ((x, p.packed, p.alpha, p.offset, None, 40, 64, 0), "group_size"),
        ((x.to("meta"),) + args, "cpu"),
    ]
    for call, match in bad:
        with pytest.raises(KernelError, match=match):
            cpu.biqgemm_cpu(*call)
    with pytest.raises(KernelError, match="mode"):
        cpu.biqgemm(x, p, None, "fastest")
    with pytest.raises(KernelError, match="BCQWeight"):
        cpu.pack(torch.zeros(3))


def test_c_abi_rejects_invalid_arguments():
    lib = cpu._lib()
    y = torch.empty(4)
    x = torch.randn(4)
    # q out of range, zero group size, unknown mode, null pointers: error codes, no crash.
    assert lib.qg_biqgemm_f32(x.data_ptr(), 1, 4, x.data_ptr(), x.data_ptr(), None, None, 1, 9, 4, 0,
                              y.data_ptr()) == -1
    assert lib.qg_biqgemm_f32(x.data_ptr(), 1, 4, x.data_ptr(), x.data_ptr(), None, None, 1, 1, 0, 0,
                              y.data_ptr()) == -1
    assert lib.qg_biqgemm_f32(x.data_ptr(), 1, 4, x.data_ptr(), x.data_ptr(), None, None, 1, 1, 4, 7,
                              y.data_ptr()) == -1
    assert lib.qg_biqgemm_f32(None, 1, 4, None, None, None, None, 1, 1, 4, 0, None) == -1
    assert lib.qg_biqgemm_f32_path(x.data_ptr(), 1, 4, x.data_ptr(), x.data_ptr(), None, None, 1, 1, 4, 0, 3,
                                   y.data_ptr()) == -1  # unknown path
    assert lib.qg_biqgemm_pack(None, 1, 4, 1, 4, None) == -1
    assert lib.qg_biqgemm_packed_bytes(1, 4, 0, 4) == 0
    assert isinstance(lib.qg_biqgemm_isa(), bytes)
    assert ctypes.CDLL(lib._name).qg_biqgemm_abi_version() == cpu.ABI_VERSION


def test_concurrent_callers_and_fork():
    """Host threads may call at once (the busy pool runs extra calls inline); a forked child still works."""
    import multiprocessing
    import threading

    w = random_bcq(200, 300, 3, 64, True)
    p = cpu.pack(w)
    xs = [torch.randn(3, 300, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    refs = [biqgemm_reference(x, w) for x in xs]
    errs = []

    def worker(i):
        for _ in range(10):
            errs.append(rel_err(cpu.biqgemm(xs[i], p), refs[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errs) == 40 and max(errs) <= EXACT_TOL

    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_child_check, args=(p, xs[0], refs[0]))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0


def _child_check(p, x, ref):
    sys.exit(0 if rel_err(cpu.biqgemm(x, p), ref) <= EXACT_TOL else 1)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200), st.integers(1, 130), st.integers(1, 4), st.sampled_from([None, 16, 33, 64]),
       st.booleans(), st.sampled_from(["exact", "fast"]), st.integers(0, 2**16))
def test_lut_tiles_split_anywhere_gives_the_whole_product(m, k, q, gs, offset, mode, seed):
    """qg_biqgemm_lut_tiles (one row, a range of row tiles, the calling thread) over [0, cut) and [cut, tiles)
    writes exactly what qg_biqgemm_f32_path's LUT path writes for the whole matrix, bias included."""
    gs = min(gs or k, k)
    w = random_bcq(m, k, q, gs, offset, seed)
    p = cpu.pack(w)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g)
    bias = torch.randn(m, generator=g) if seed % 2 else None
    lib = cpu._lib()
    mode_id = 1 if mode == "fast" else 0
    ptr = ctypes.c_void_p

    def args(t):
        return ptr(t.data_ptr()) if t is not None else None

    whole = torch.empty(1, m)
    assert lib.qg_biqgemm_f32_path(args(x), 1, k, args(p.packed), args(p.alpha), args(p.offset), args(bias), m, q,
                                   gs, mode_id, 1, args(whole)) == 0
    tiles = -(-m // 32)
    cut = seed % (tiles + 1)
    split = torch.full((m,), float("nan"))
    for t0, t1 in ((0, cut), (cut, tiles)):
        assert lib.qg_biqgemm_lut_tiles(args(x), k, args(p.packed), args(p.alpha), args(p.offset), args(bias), m, q,
                                        gs, mode_id, t0, t1, args(split)) == 0
    assert torch.equal(split, whole[0])
    assert lib.qg_biqgemm_lut_tiles(args(x), k, args(p.packed), args(p.alpha), args(p.offset), args(bias), m, q, gs,
                                    mode_id, 0, tiles + 1, args(split)) == -1  # past the last tile: EINVAL
