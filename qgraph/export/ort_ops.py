"""Run ``ai.qgraph::BiQGEMM`` in onnxruntime through qgraph's own kernel.

Mechanism: an onnxruntime-extensions Python custom op (``onnx_op`` / PyOp) registered under the ``ai.qgraph``
domain. Each call receives the node's inputs as numpy arrays (copies made by onnxruntime-extensions), repacks
the canonical bit-planes into the ``cpu-lut4`` layout (cached by a hash of the weight bytes, so a layer is packed
once per process) and calls the compiled C kernel through the same ctypes path as
``torch.ops.qgraph.biqgemm`` (`qgraph.kernels.cpu`); without the compiled kernel it falls back to the torch
reference. A compiled onnxruntime custom-op library was not built: the onnxruntime wheel ships no C API headers.

onnxruntime-extensions hands results back through Python lists; qgraph installs a result hook that passes
numpy arrays instead (about 15× less overhead per call on large outputs), after checking once per process
that this build of onnxruntime-extensions accepts them — otherwise its own hook stays.
"""
from __future__ import annotations

import hashlib
import importlib.util
import threading
from collections import OrderedDict

import numpy as np
import torch

from qgraph.errors import ExportError, KernelError
from qgraph.export import schema

OP_NAME = f"{schema.DOMAIN}::BiQGEMM"
INSTALL_HINT = "pip install onnxruntime-extensions"
PRECISION_KEY = "session.x64quantprecision"
NBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
CACHE_ENTRIES = 512

_lock = threading.Lock()
_state: dict[str, object] = {}
_cache: OrderedDict[bytes, object] = OrderedDict()


def available() -> bool:
    """Whether onnxruntime and onnxruntime-extensions are importable (needed to run the custom op)."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxruntime_extensions"))


def session_options(options=None, *, custom_ops: bool = True):
    """``onnxruntime.SessionOptions`` (``options`` or a new one) for qgraph's exported files.

    Registers ``ai.qgraph::BiQGEMM`` (``custom_ops=True``, needs onnxruntime-extensions) and makes
    onnxruntime's fused quantized kernels compute what the QDQ graph says:
    - ``session.x64quantprecision=1`` on x86 CPUs with AVX2 but without VNNI (`needs_precise_int8`): there the
      u8s8 int8 GEMM a QDQ MatMul fuses into otherwise sums pairs of products in saturating int16 (several
      percent off with full-range 8-bit weights); the precise mode keeps the int8 kernels with exact sums. CPUs
      with VNNI sum in int32 anyway, and the precise mode would only make their QLinearConv slower.
    - ``session.qdq_matmulnbits_accuracy_level=1``: a weight-only ``DequantizeLinear → MatMul`` fuses into
      ``MatMulNBits``, whose default (level 4) quantizes the activations to int8 on the fly; level 1 keeps
      them fp32, as the model specifies. Set it back to 4 for speed when that error is acceptable.
    """
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    if needs_precise_int8():
        so.add_session_config_entry(PRECISION_KEY, "1")
    so.add_session_config_entry(NBITS_ACCURACY_KEY, "1")
    if not custom_ops:
        return so
    if not available():
        raise ExportError(f"running ai.qgraph::BiQGEMM needs onnxruntime-extensions: {INSTALL_HINT} "
                          f"(or export with portable=True, which needs no custom op)")
    from onnxruntime_extensions import get_library_path

    _register()
    so.register_custom_ops_library(get_library_path())
    return so


def needs_precise_int8(cpuinfo: str | None = None) -> bool:
    """Whether this CPU is x86 with AVX2 and without VNNI (``cpuinfo``: /proc/cpuinfo's text, read if None;
    True when it cannot be read on x86, the safe choice)."""
    import platform

    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
            return False
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return True
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni"} if flags else True


def _register() -> None:
    with _lock:
        if _state.get("registered"):
            return
        from onnxruntime_extensions import PyCustomOpDef, onnx_op

        f32, u8, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_uint8, PyCustomOpDef.dt_int64
        onnx_op(op_type=OP_NAME, inputs=[f32, u8, f32, f32, f32], outputs=[f32],
                attrs={"out_features": i64, "in_features": i64, "group_size": i64, "bits": i64})(biqgemm_numpy)
        _state["registered"] = True
    _install_array_hook()


# ------------------------------------------------------------------------------------------ the kernel call
def _key(planes: np.ndarray, alpha: np.ndarray, z: np.ndarray, dims: tuple) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(dims).encode())
    for a in (planes, alpha, z):
        h.update(np.ascontiguousarray(a).data)
    return h.digest()


def _packed(planes, alpha, z, m, k, gs, bits):
    key = _key(planes, alpha, z, (m, k, gs, bits, planes.shape, alpha.shape, z.shape))
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    from qgraph.kernels import cpu
    from qgraph.quant.bcq_weight import BCQWeight

    try:
        w = BCQWeight(planes=torch.from_numpy(np.array(planes, copy=True)),
                      alpha=torch.from_numpy(np.array(alpha, dtype=np.float32, copy=True)),
                      offset=torch.from_numpy(np.array(z, dtype=np.float32, copy=True)) if z.size else None,
                      shape=(m, k), group_size=gs)
    except Exception as e:  # noqa: BLE001 - an unusable weight is reported as a KernelError
        raise KernelError(f"ai.qgraph::BiQGEMM got inputs that do not form a {m}x{k} BCQ weight: {e}") from None
    if w.bits != bits:
        raise KernelError(f"ai.qgraph::BiQGEMM: attribute bits={bits} but alpha holds {w.bits} planes")
    packed = cpu.pack(w) if cpu.available() else w
    with _lock:
        _cache[key] = packed
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    return packed


def biqgemm_numpy(x, planes, alpha, z, bias, out_features, in_features, group_size, bits):
    """``x @ Ŵᵀ + bias`` on numpy inputs in the schema's layout (the body of the onnxruntime custom op)."""
    m, k, gs, q = int(out_features), int(in_features), int(group_size), int(bits)
    if x.shape[-1] != k:
        raise KernelError(f"ai.qgraph::BiQGEMM: X has {x.shape[-1]} features, the weight expects {k}")
    w = _packed(planes, alpha, z, m, k, gs, q)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    b = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)) if bias.size else None
    from qgraph.kernels import cpu
    from qgraph.kernels.reference import biqgemm_reference

    with torch.no_grad():
        if isinstance(w, cpu.CpuPackedWeight):
            y = cpu.biqgemm(xt, w, b)
        else:
            y = biqgemm_reference(xt, w, b)
    return y.numpy()


# ------------------------------------------------------------------------------------------ result hook
def _array_hook(k_id, feed, attributes):
    from onnxruntime_extensions._ocos import Opdef

    op = Opdef._odlist.get(k_id)
    if op is None:
        raise RuntimeError(f"onnxruntime-extensions: no Python op with id {k_id}")
    rv = op.body(*feed, **op.cast_attributes(attributes))
    outs = rv if isinstance(rv, tuple) else (rv,)
    res = []
    for r in outs:
        r = np.asarray(r)
        res.append(r.shape)
        res.append(np.ascontiguousarray(r).reshape(-1) if r.dtype.kind in "biuf" else r.flatten().tolist())
    return (k_id, *res)


def _install_array_hook() -> None:
    with _lock:
        if "hook" in _state:
            return
        _state["hook"] = "default"
    from onnxruntime_extensions import _ocos

    original = getattr(_ocos, "_on_pyop_invocation", None)
    if original is None:
        return
    try:
        _ocos.PyCustomOpDef.install_hooker(_array_hook)
        ok = _self_test()
    except Exception:  # noqa: BLE001 - any incompatibility keeps the library's own hook
        ok = False
    if ok:
        _state["hook"] = "arrays"
    else:
        _ocos.PyCustomOpDef.install_hooker(original)


def _self_test() -> bool:
    """Run a 3x5 BiQGEMM through onnxruntime and compare with numpy."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime_extensions import get_library_path

    rng = np.random.default_rng(0)
    planes = rng.integers(0, 256, (2, 3, 1), dtype=np.uint8)
    alpha = rng.random((2, 3, 1), dtype=np.float32)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(planes, "p"), numpy_helper.from_array(alpha, "a"),
             numpy_helper.from_array(np.zeros(0, np.float32), "e")]
    node = helper.make_node("BiQGEMM", ["x", "p", "a", "e", "e"], ["y"], domain=schema.DOMAIN, out_features=3,
                            in_features=5, group_size=5, bits=2)
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(schema.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    got = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    signs = np.unpackbits(planes, axis=-1, bitorder="little")[..., :5].astype(np.float32) * 2 - 1
    want = x @ (alpha * signs).sum(0).T
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-5, atol=1e-5))


def hook_mode() -> str:
    """``"arrays"`` when the fast result hook is active, ``"default"`` otherwise (after `session_options`)."""
    return str(_state.get("hook", "default"))
