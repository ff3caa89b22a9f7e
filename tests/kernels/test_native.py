"""The native torch op (csrc/torch_shim.cpp, qgraph.kernels.native): C++ CPU / AutogradCPU kernels of
``qgraph::biqgemm``, built at first use; typed errors; the ctypes fallback; compile and autograd through it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from qgraph.errors import KernelError
from qgraph.kernels import BCQLinear, biqgemm_reference, cpu, get_layout, native, pack, register_layout
from qgraph.kernels.op import _cpu_impl
from tests.conftest import rel_err
from tests.kernels.test_reference import random_bcq

ROOT = Path(__file__).resolve().parents[2]
HAS_CXX = any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "g++", "c++"))
pytestmark = [
    pytest.mark.skipif(not cpu.available(), reason="the C++ extension is not built"),
    pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler: the native op cannot be built here"),
    pytest.mark.skipif(os.environ.get("QGRAPH_BIQGEMM_NATIVE", "1") == "0", reason="QGRAPH_BIQGEMM_NATIVE=0"),
]


@pytest.fixture(scope="module", autouse=True)
def loaded():
    assert native.load(), native.status()
    yield


def _op(x, p, bias=None, mode="exact", m=None, k=None, gs=None, layout="cpu-lut4"):
    m = p.shape[0] if m is None else m
    k = p.shape[1] if k is None else k
    gs = p.group_size if gs is None else gs
    return torch.ops.qgraph.biqgemm(x, p.packed, p.alpha, p.offset, bias, m, k, gs, layout, mode)


def test_native_kernel_is_registered_for_cpu():
    st = native.status()
    assert st["active"] and Path(st["path"]).exists()
    assert not str(st["path"]).startswith(str(ROOT / "qgraph"))  # cached outside the package
    assert torch._C._dispatch_has_kernel_for_dispatch_key("qgraph::biqgemm", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("qgraph::biqgemm", "AutogradCPU")


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_native_matches_ctypes_path(rows, mode):
    w = random_bcq(70, 200, 3, 64, True, seed=rows)
    p = cpu.pack(w)
    x = torch.randn(2, rows, 200)
    bias = torch.randn(70)
    y = _op(x, p, bias, mode)
    assert y.shape == (2, rows, 70)
    assert torch.equal(y, cpu.biqgemm(x, p, bias, mode))
    if mode == "exact":
        assert rel_err(y, biqgemm_reference(x, w, bias)) <= 1e-5
    xb = x.to(torch.bfloat16)
    yb = _op(xb, p, bias.to(torch.bfloat16), mode)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, cpu.biqgemm(xb, p, bias.to(torch.bfloat16), mode))
    xt = torch.randn(200, rows).t()  # non-contiguous x is copied, as on the Python path
    assert torch.equal(_op(xt, p, None, mode), cpu.biqgemm(xt.contiguous(), p, None, mode))


def test_bad_inputs_raise_kernel_error_natively():
    w = random_bcq(40, 64, 3, 32, True)
    p = cpu.pack(w)
    x = torch.randn(2, 64)
    ops = torch.ops.qgraph
    bad = [
        (lambda: ops.biqgemm(x.double(), p.packed, p.alpha, p.offset, None, 40, 64, 32, "cpu-lut4"), "float32"),
        (lambda: ops.biqgemm(x.int(), p.packed, p.alpha, p.offset, None, 40, 64, 32, "cpu-lut4"), "float32"),
        (lambda: ops.biqgemm(torch.randn(2, 63), p.packed, p.alpha, p.offset, None, 40, 64, 32, "cpu-lut4"),
         "in_features"),
        (lambda: ops.biqgemm(x, p.packed.to(torch.int8), p.alpha, p.offset, None, 40, 64, 32, "cpu-lut4"), "uint8"),
        (lambda: ops.biqgemm(x, p.packed[:, :1], p.alpha, p.offset, None, 40, 64, 32, "cpu-lut4"), "contiguous"),
        (lambda: ops.biqgemm(x, p.packed[:, :1].contiguous(), p.alpha, p.offset, None, 40, 64, 32, "cpu-lut4"),
         "packed must be"),
        (lambda: ops.biqgemm(x, p.packed, p.alpha.transpose(0, 1).contiguous().transpose(0, 1), p.offset, None,
                             40, 64, 32, "cpu-lut4"), "contiguous"),
        (lambda: ops.biqgemm(x, p.packed, p.alpha[:, :, :2].contiguous(), p.offset, None, 40, 64, 32, "cpu-lut4"),
         "packed must be"),
        (lambda: ops.biqgemm(x, p.packed, p.alpha.double(), p.offset, None, 40, 64, 32, "cpu-lut4"), "alpha"),
        (lambda: ops.biqgemm(x, p.packed, p.alpha, p.offset[:, :1].contiguous(), None, 40, 64, 32, "cpu-lut4"),
         "offset"),
        (lambda: ops.biqgemm(x, p.packed, p.alpha, p.offset, torch.randn(39), 40, 64, 32, "cpu-lut4"), "bias"),
        (lambda: ops.biqgemm(x, p.packed, p.alpha, p.offset, torch.ones(40, dtype=torch.int64), 40, 64, 32,
                             "cpu-lut4"), "bias"),
        (lambda: ops.biqgemm(x, p.packed, p.alpha, p.offset, None, 72, 64, 32, "cpu-lut4"), "alpha shape"),
        (lambda: ops.biqgemm(x, p.packed, p.alpha, p.offset, None, 40, 64, 0, "cpu-lut4"), "group_size"),
        (lambda: ops.biqgemm(x, p.packed, p.alpha, p.offset, None, 0, 64, 32, "cpu-lut4"), "out_features"),
        (lambda: ops.biqgemm(x, p.packed, p.alpha, p.offset, None, 40, 64, 32, "cpu-lut4", "fastest"), "mode"),
        (lambda: ops.biqgemm(x, p.packed, p.alpha, p.offset, None, 40, 64, 32, "gpu-magic"), "unknown BiQGEMM"),
        (lambda: ops.biqgemm(torch.randn(2, 64, requires_grad=True).double(), p.packed, p.alpha, p.offset, None, 40,
                             64, 32, "cpu-lut4"), "float32"),
    ]
    for call, match in bad:
        with pytest.raises(KernelError, match=match):
            call()
    old = os.environ.get("QGRAPH_BIQGEMM_ISA")
    os.environ["QGRAPH_BIQGEMM_ISA"] = "sse9"
    try:
        with pytest.raises(KernelError, match="QGRAPH_BIQGEMM_ISA"):
            _op(x, p)
    finally:
        if old is None:
            del os.environ["QGRAPH_BIQGEMM_ISA"]
        else:
            os.environ["QGRAPH_BIQGEMM_ISA"] = old
    assert rel_err(_op(x, p), biqgemm_reference(x, w)) <= 1e-5  # still fine afterwards


def test_other_layouts_and_a_replaced_cpu_layout_run_python():
    w = random_bcq(24, 50, 2, None, True)
    x = torch.randn(3, 50)
    pl = pack(w, "planes")
    ref = biqgemm_reference(x, w)
    assert rel_err(_op(x, pl, layout="planes", gs=50), ref) <= 1e-5
    calls = []
    lay = get_layout("cpu-lut4")

    def spy(*args):
        calls.append(args[-1])
        return _cpu_impl(*args)

    p = cpu.pack(w)
    register_layout("cpu-lut4", spy, pack=lay.pack, unpack=lay.unpack, device="cpu", replace=True)
    try:
        assert rel_err(_op(x, p, mode="fast"), ref) <= 1e-2 and calls == ["fast"]
    finally:
        register_layout("cpu-lut4", lay.impl, pack=lay.pack, unpack=lay.unpack, device="cpu", replace=True)
    _op(x, p)
    assert calls == ["fast"]  # native again


def test_gradients_through_the_native_autograd_kernel():
    w = random_bcq(40, 70, 3, 32, True, seed=5)
    lin = BCQLinear(w, torch.randn(40))
    lin.bias.requires_grad_(True)
    x = torch.randn(4, 70, requires_grad=True)
    (lin(x) * torch.arange(40.0)).sum().backward()
    dense = nn.Linear(70, 40)
    with torch.no_grad():
        dense.weight.copy_(w.dequantize())
        dense.bias.copy_(lin.bias)
    x2 = x.detach().clone().requires_grad_(True)
    (dense(x2) * torch.arange(40.0)).sum().backward()
    assert rel_err(x.grad, x2.grad) <= 1e-5 and rel_err(lin.bias.grad, dense.bias.grad) <= 1e-6
    with torch.no_grad():
        assert not lin(x).requires_grad


def test_torch_compile_calls_the_native_kernel():
    lin = BCQLinear(random_bcq(64, 96, 4, 32, False, seed=2), torch.randn(64), mode="fast").eval()
    x = torch.randn(5, 96)
    with torch.no_grad():
        ref = lin(x)
        cm = torch.compile(lin, fullgraph=True)
        assert torch.equal(cm(x), ref)
        assert cm(torch.randn(20, 96)).shape == (20, 64)


_CHILD = """
import warnings, torch
from qgraph.kernels import native, cpu
from tests.kernels.test_reference import random_bcq
from qgraph.kernels.reference import biqgemm_reference
from qgraph.errors import KernelError
w = random_bcq(33, 70, 2, 32, True); p = cpu.pack(w); x = torch.randn(3, 70)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        y = torch.ops.qgraph.biqgemm(x, p.packed, p.alpha, p.offset, None, 33, 70, 32, "cpu-lut4")
ref = biqgemm_reference(x, w)
try:
    torch.ops.qgraph.biqgemm(x.double(), p.packed, p.alpha, p.offset, None, 33, 70, 32, "cpu-lut4")
    typed = False
except KernelError:
    typed = True
msgs = [str(c.message) for c in caught if "native torch op" in str(c.message)]
print(native.active(), len(msgs), float((y - ref).abs().max() / ref.abs().max()) < 1e-5, typed)
"""


@pytest.mark.parametrize("env, want", [
    ({"QGRAPH_BIQGEMM_NATIVE": "0"}, "False 0 True True"),  # disabled: no warning, ctypes path
    ({"CXX": "/bin/false", "PATH": "/nonexistent"}, "False 1 True True"),  # build fails: one warning, ctypes path
])
def test_fallback_to_the_ctypes_path(env, want, tmp_path):
    full = {**os.environ, "QGRAPH_CACHE_DIR": str(tmp_path), **env}
    if "PATH" in env:  # keep the interpreter reachable; only the compiler search sees the empty PATH
        full["PATH"] = env["PATH"]
    out = subprocess.run([sys.executable, "-c", _CHILD], env=full, capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == want.split(), out.stderr
