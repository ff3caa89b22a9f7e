"""BiQGEMM kernels: the torch reference, the compiled CPU kernel, the ``torch.ops.qgraph.biqgemm`` op and
`BCQLinear`. Importing this package registers the op."""
from qgraph.kernels.linear import BCQLinear, PackedWeight, biqgemm, pack
from qgraph.kernels.op import Layout, get_layout, layouts, register_layout
from qgraph.kernels.reference import LutTorchWeight, biqgemm_lut_torch, biqgemm_reference

__all__ = [
    "BCQLinear",
    "Layout",
    "LutTorchWeight",
    "PackedWeight",
    "biqgemm",
    "biqgemm_lut_torch",
    "biqgemm_reference",
    "get_layout",
    "layouts",
    "pack",
    "register_layout",
]
