"""``torch.ops.qgraph.biqgemm``: the BiQGEMM custom op, dispatched on the weight's layout.

Schema (fixed; lowered graphs, the ONNX exporter and the Triton kernel depend on it)::

    qgraph::biqgemm(Tensor x, Tensor packed, Tensor alpha, Tensor? offset, Tensor? bias, int out_features,
                    int in_features, int group_size, str layout, str mode="exact") -> Tensor

Layouts are pluggable: each registers an implementation (and optionally a packer / unpacker) with
`register_layout`. Built in:
- ``"planes"``: packed/alpha/offset are exactly ``BCQWeight.planes/alpha/offset``; runs `biqgemm_reference`
  on any device (slow; it defines the semantics; ``mode`` is accepted and ignored: always exact).
- ``"cpu-lut4"``: tensors from `qgraph.kernels.cpu.pack` (the compiled CPU kernel: the LUT path for a few input
  rows, decode + GEMM above a measured row threshold). On the first CPU call the native shim
  (`qgraph.kernels.native`) is built or loaded; from then on CPU calls dispatch to its C++ kernels (a few µs per
  call instead of ~15 µs of Python validation + ctypes), which validate the same way and raise `KernelError`.
- ``"cpu-lut4k"``: a `BlockScaledWeight` (uniform codes, K-quant-style block scales) for the same kernel: the
  same packed bit-planes, and in the ``alpha`` slot its scale codes (uint8, `qgraph.kernels.cpu.pack_block_scaled`).
- ``"cuda-lut8"`` / ``"cuda-lut8-h"`` (fp32 / fp16 scales): registered by ``qgraph.kernels.triton_biqgemm``,
  imported on first use of either name.
The fake (meta) kernel gives ``x.shape[:-1] + (out_features,)`` in x's dtype, so graphs that call the op
trace with torch.fx, ``torch.export`` and ``torch.compile``. Autograd: gradients flow to x (through the opaque
``qgraph::biqgemm_grad_x``, grad @ Ŵ) and to bias; the code itself is not trainable. Bad inputs raise
`KernelError`. A kernel registered later for a dispatch key (e.g. ``torch.library.register_kernel(
"qgraph::biqgemm", "cuda", fn)``) takes precedence over the layout dispatch for that device.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qgraph.errors import KernelError, SpecError
from qgraph.kernels import cpu, native
from qgraph.kernels.reference import biqgemm_reference
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.quant.block_scaled import BlockScaledWeight

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
# impl(x, packed, alpha, offset, bias, out_features, in_features, group_size, mode) -> y
LayoutImpl = Callable[..., torch.Tensor]
Packer = Callable[[BCQWeight], Tensors]
# unpack(packed, alpha, offset, out_features, in_features, group_size) -> BCQWeight
Unpacker = Callable[..., BCQWeight]


@dataclass(frozen=True)
class Layout:
    """One weight layout the op understands."""

    name: str
    impl: LayoutImpl
    pack: Packer | None = None
    unpack: Unpacker | None = None
    device: str | None = None  # device type the layout's tensors live on; None: any


_LAYOUTS: dict[str, Layout] = {}
# Layouts registered by a module that is imported the first time the name is asked for.
_PROVIDERS = {"cuda-lut8": "qgraph.kernels.triton_biqgemm", "cuda-lut8-h": "qgraph.kernels.triton_biqgemm"}


def register_layout(
    name: str,
    impl: LayoutImpl,
    *,
    pack: Packer | None = None,
    unpack: Unpacker | None = None,
    device: str | None = None,
    replace: bool = False,
) -> None:
    """Make ``layout=name`` callable through ``torch.ops.qgraph.biqgemm`` (and `BCQLinear` when it can pack)."""
    if name in _LAYOUTS and not replace:
        raise KernelError(f"BiQGEMM layout {name!r} is already registered; pass replace=True to override it")
    _LAYOUTS[name] = Layout(name, impl, pack, unpack, device)
    if name == cpu.LAYOUT:
        native._sync_native_layout()


def get_layout(name: str) -> Layout:
    if name not in _LAYOUTS and name in _PROVIDERS:
        try:
            importlib.import_module(_PROVIDERS[name])
        except ImportError as e:
            raise KernelError(f"BiQGEMM layout {name!r} needs {_PROVIDERS[name]}, which failed to import: {e}")
    if name not in _LAYOUTS:
        raise KernelError(f"unknown BiQGEMM layout {name!r}; known: {sorted(set(_LAYOUTS) | set(_PROVIDERS))}")
    return _LAYOUTS[name]


def layouts() -> tuple[str, ...]:
    """Names of the layouts registered so far (providers not yet imported are not listed)."""
    return tuple(_LAYOUTS)


SCHEMA = (
    "(Tensor x, Tensor packed, Tensor alpha, Tensor? offset, Tensor? bias, int out_features, int in_features, "
    "int group_size, str layout, str mode=\"exact\") -> Tensor"
)
GRAD_SCHEMA = (
    "(Tensor grad, Tensor packed, Tensor alpha, Tensor? offset, int out_features, int in_features, "
    "int group_size, str layout) -> Tensor"
)

# Registered with torch.library.Library (not custom_op): its Python dispatch costs ~20 µs less per call, which
# matters for a kernel that takes a few hundred µs. A device-specific kernel registered later for the CUDA
# key (torch.library.register_kernel / Library.impl) takes precedence over the layout dispatch below.
# On CPU, the native shim (qgraph.kernels.native, loaded on the first cpu-lut4 call) registers C++ CPU and
# AutogradCPU kernels, which take precedence over the Python ones below; for layouts other than cpu-lut4 it calls
# the private op ``_biqgemm_py`` (same schema), i.e. the Python layout dispatch.
_LIB = torch.library.Library("qgraph", "FRAGMENT")
_LIB.define("biqgemm" + SCHEMA)
_LIB.define("biqgemm_grad_x" + GRAD_SCHEMA)
_LIB.define("_biqgemm_py" + SCHEMA)


def _biqgemm_impl(x, packed, alpha, offset, bias, out_features, in_features, group_size, layout, mode="exact"):
    cpu.check_mode(mode)
    return get_layout(layout).impl(x, packed, alpha, offset, bias, out_features, in_features, group_size, mode)


def _biqgemm_fake(x, packed, alpha, offset, bias, out_features, in_features, group_size, layout, mode="exact"):
    cpu.check_mode(mode)
    get_layout(layout)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise KernelError(f"x must have shape [..., {in_features}] (in_features), got {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], out_features))


_LIB.impl("biqgemm", _biqgemm_impl, "CompositeExplicitAutograd")
torch.library.register_fake("qgraph::biqgemm", _biqgemm_fake, lib=_LIB)
_LIB.impl("_biqgemm_py", _biqgemm_impl, "CompositeExplicitAutograd")
torch.library.register_fake("qgraph::_biqgemm_py", _biqgemm_fake, lib=_LIB)

# ------------------------------------------------------------------------------------------ built-in layouts
def _planes_weight(packed, alpha, offset, out_features, in_features, group_size) -> BCQWeight:
    try:
        return BCQWeight(planes=packed, alpha=alpha, offset=offset, shape=(out_features, in_features),
                         group_size=group_size)
    except SpecError as e:
        raise KernelError(f"layout 'planes': {e}") from None


def _planes_impl(x, packed, alpha, offset, bias, out_features, in_features, group_size, mode):
    w = _planes_weight(packed, alpha, offset, out_features, in_features, group_size)
    for name, t in (("packed", packed), ("alpha", alpha), ("offset", offset)):
        if t is not None and t.device != x.device:
            raise KernelError(f"layout 'planes': {name} is on {t.device} but x is on {x.device}")
    return biqgemm_reference(x, w, bias)


def _cpu_impl(x, packed, alpha, offset, bias, out_features, in_features, group_size, mode):
    if not native._state["tried"]:
        native.load()  # first use: later CPU calls dispatch to the C++ kernel
    return cpu.biqgemm_cpu(x, packed, alpha, offset, bias, out_features, in_features, group_size, mode)


def _cpu_unpack(packed, alpha, offset, out_features, in_features, group_size) -> BCQWeight:
    packed, alpha = packed.cpu().contiguous(), alpha.cpu().contiguous()
    offset = None if offset is None else offset.cpu().contiguous()
    cpu.check_packed(packed, alpha, offset, out_features, in_features, group_size)
    return cpu.unpack(cpu.CpuPackedWeight(packed, alpha, offset, (out_features, in_features), group_size))


register_layout(
    "planes",
    _planes_impl,
    pack=lambda w: (w.planes, w.alpha, w.offset),
    unpack=_planes_weight,
)
register_layout(
    cpu.LAYOUT,
    _cpu_impl,
    pack=lambda w: cpu.pack(w).tensors(),
    unpack=_cpu_unpack,
    device="cpu",
)


def _cpu_k_pack(w):
    if not isinstance(w, BlockScaledWeight):
        raise KernelError(f"layout {cpu.LAYOUT_K!r} packs a BlockScaledWeight, got {type(w).__name__}")
    return cpu.pack_block_scaled(w).tensors()


def _cpu_k_unpack(packed, alpha, offset, out_features, in_features, group_size) -> BCQWeight:
    packed, alpha = packed.cpu().contiguous(), alpha.cpu().contiguous()
    cpu.check_packed(packed, alpha, offset, out_features, in_features, group_size)
    p = cpu.CpuPackedWeight(packed, alpha, None, (out_features, in_features), group_size, cpu.LAYOUT_K)
    return cpu.unpack_block_scaled(p).to_bcq()


# cpu-lut4k: uniform codes with block scales (qgraph.quant.block_scaled); alpha holds the scale codes (uint8)
register_layout(cpu.LAYOUT_K, _cpu_impl, pack=_cpu_k_pack, unpack=_cpu_k_unpack, device="cpu")


# ------------------------------------------------------------------------------------------ autograd
# Gradients flow to x (grad @ Ŵ, through an opaque op so compiled backward graphs stay small) and to bias;
# the packed code itself is not trainable.
def _grad_x_impl(grad, packed, alpha, offset, out_features, in_features, group_size, layout):
    lay = get_layout(layout)
    if lay.unpack is None:
        raise KernelError(f"BiQGEMM layout {layout!r} has no unpacker, so the op cannot be differentiated")
    w = lay.unpack(packed, alpha, offset, out_features, in_features, group_size).to(grad.device)
    return (grad.to(torch.float32) @ w.dequantize()).to(grad.dtype)


def _grad_x_fake(grad, packed, alpha, offset, out_features, in_features, group_size, layout):
    return grad.new_empty((*grad.shape[:-1], in_features))


_LIB.impl("biqgemm_grad_x", _grad_x_impl, "CompositeExplicitAutograd")
torch.library.register_fake("qgraph::biqgemm_grad_x", _grad_x_fake, lib=_LIB)


class _BiqgemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, alpha, offset, bias, out_features, in_features, group_size, layout, mode):
        with torch._C._AutoDispatchBelowAutograd():
            y = torch.ops.qgraph.biqgemm.default(
                x, packed, alpha, offset, bias, out_features, in_features, group_size, layout, mode
            )
        ctx.save_for_backward(packed, alpha, offset)
        ctx.meta = (out_features, in_features, group_size, layout, x.dtype, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad):
        packed, alpha, offset = ctx.saved_tensors
        out_features, in_features, group_size, layout, x_dtype, has_bias = ctx.meta
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.qgraph.biqgemm_grad_x.default(
                grad, packed, alpha, offset, out_features, in_features, group_size, layout
            ).to(x_dtype)
        if has_bias and ctx.needs_input_grad[4]:
            gb = grad.reshape(-1, out_features).sum(0)
        return gx, None, None, None, gb, None, None, None, None, None


def _biqgemm_autograd(x, packed, alpha, offset, bias, out_features, in_features, group_size, layout, mode="exact"):
    args = (x, packed, alpha, offset, bias, out_features, in_features, group_size, layout, mode)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _BiqgemmFunction.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.qgraph.biqgemm.default(*args)


_LIB.impl("biqgemm", _biqgemm_autograd, "Autograd")
