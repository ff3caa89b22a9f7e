"""Canonical op names: ONNX op_type names are the shared vocabulary of every IR adapter."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

# Ops whose weight (a constant second input) quantization passes care about.
WEIGHTED_OPS = frozenset({"Gemm", "MatMul", "Conv", "Gather"})
ACTIVATION_OPS = frozenset({"Relu", "Clip", "Gelu", "Sigmoid", "HardSwish", "HardSigmoid", "Tanh", "Silu"})

MODULE_OPS: dict[type, str] = {
    nn.Linear: "Gemm",
    nn.Conv1d: "Conv",
    nn.Conv2d: "Conv",
    nn.Conv3d: "Conv",
    nn.BatchNorm1d: "BatchNormalization",
    nn.BatchNorm2d: "BatchNormalization",
    nn.BatchNorm3d: "BatchNormalization",
    nn.ReLU: "Relu",
    nn.ReLU6: "Clip",
    nn.Hardtanh: "Clip",
    nn.GELU: "Gelu",
    nn.SiLU: "Silu",
    nn.Sigmoid: "Sigmoid",
    nn.Tanh: "Tanh",
    nn.Hardswish: "HardSwish",
    nn.Hardsigmoid: "HardSigmoid",
    nn.Embedding: "Gather",
    nn.LayerNorm: "LayerNormalization",
    nn.Dropout: "Dropout",
    nn.Identity: "Identity",
    nn.Flatten: "Flatten",
    nn.Softmax: "Softmax",
    nn.MaxPool2d: "MaxPool",
    nn.AvgPool2d: "AveragePool",
    nn.AdaptiveAvgPool2d: "GlobalAveragePool",
}

FUNCTION_OPS: dict[object, str] = {
    F.linear: "Gemm",
    F.conv1d: "Conv",
    F.conv2d: "Conv",
    F.embedding: "Gather",
    F.relu: "Relu",
    torch.relu: "Relu",
    F.relu6: "Clip",
    F.hardtanh: "Clip",
    F.gelu: "Gelu",
    F.silu: "Silu",
    torch.sigmoid: "Sigmoid",
    torch.tanh: "Tanh",
    F.layer_norm: "LayerNormalization",
    F.batch_norm: "BatchNormalization",
    F.softmax: "Softmax",
    F.dropout: "Dropout",
    F.adaptive_avg_pool2d: "GlobalAveragePool",
    torch.addmm: "Gemm",
    torch.mm: "MatMul",
    torch.matmul: "MatMul",
    operator.matmul: "MatMul",
    torch.bmm: "MatMul",
    torch.add: "Add",
    operator.add: "Add",
    operator.iadd: "Add",
    torch.mul: "Mul",
    operator.mul: "Mul",
    operator.sub: "Sub",
    operator.truediv: "Div",
    torch.flatten: "Flatten",
    torch.cat: "Concat",
    operator.getitem: "GetItem",
}

METHOD_OPS: dict[str, str] = {
    "relu": "Relu",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "view": "Reshape",
    "reshape": "Reshape",
    "flatten": "Flatten",
    "permute": "Transpose",
    "transpose": "Transpose",
    "mean": "ReduceMean",
    "add": "Add",
    "mul": "Mul",
    "matmul": "MatMul",
    "contiguous": "Identity",
    "size": "Shape",
}

# aten overload packet name (``torch.ops.aten.<name>``) → canonical name.
ATEN_OPS: dict[str, str] = {
    "linear": "Gemm",
    "addmm": "Gemm",
    "mm": "MatMul",
    "bmm": "MatMul",
    "matmul": "MatMul",
    "conv1d": "Conv",
    "conv2d": "Conv",
    "conv3d": "Conv",
    "convolution": "Conv",
    "embedding": "Gather",
    "batch_norm": "BatchNormalization",
    "_native_batch_norm_legit_no_training": "BatchNormalization",
    "layer_norm": "LayerNormalization",
    "relu": "Relu",
    "relu_": "Relu",
    "hardtanh": "Clip",
    "relu6": "Clip",
    "hardtanh_": "Clip",
    "clamp": "Clip",
    "gelu": "Gelu",
    "silu": "Silu",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "hardswish": "HardSwish",
    "add": "Add",
    "add_": "Add",
    "sub": "Sub",
    "rsub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "pow": "Pow",
    "neg": "Neg",
    "sqrt": "Sqrt",
    "rsqrt": "Rsqrt",
    "softmax": "Softmax",
    "_softmax": "Softmax",
    "_safe_softmax": "Softmax",
    "scaled_dot_product_attention": "Attention",
    "view": "Reshape",
    "reshape": "Reshape",
    "_unsafe_view": "Reshape",
    "flatten": "Flatten",
    "permute": "Transpose",
    "transpose": "Transpose",
    "t": "Transpose",
    "mean": "ReduceMean",
    "sum": "ReduceSum",
    "adaptive_avg_pool2d": "GlobalAveragePool",
    "avg_pool2d": "AveragePool",
    "max_pool2d": "MaxPool",
    "dropout": "Dropout",
    "clone": "Identity",
    "alias": "Identity",
    "contiguous": "Identity",
    "to": "Cast",
    "_to_copy": "Cast",
    "expand": "Expand",
    "slice": "Slice",
    "select": "Gather",
    "index_select": "Gather",
    "unsqueeze": "Unsqueeze",
    "squeeze": "Squeeze",
    "cat": "Concat",
    "where": "Where",
    "masked_fill": "Where",
    "arange": "Range",
    "zeros": "ConstantOfShape",
    "ones": "ConstantOfShape",
    "full": "ConstantOfShape",
    "cos": "Cos",
    "sin": "Sin",
    "exp": "Exp",
    "split": "Split",
    "chunk": "Split",
    "getitem": "GetItem",
    "sym_size": "Shape",
}

# Where a weighted op keeps its weight / bias among its positional inputs (aten / functional forms).
WEIGHT_INPUT_INDEX = {"Gemm": 1, "Conv": 1, "MatMul": 1, "Gather": 0}
BIAS_INPUT_INDEX = {"Gemm": 2, "Conv": 2}


def canonical_function_name(target: object) -> str:
    """Canonical name of an fx ``call_function`` target (torch function, operator or aten overload)."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        packet = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target
        name = packet.__name__
        ns = getattr(packet, "_qualified_op_name", "aten::" + name).split("::")[0]
        if ns == "aten":
            return ATEN_OPS.get(name, f"aten::{name}")
        if ns == "qgraph":
            return {"biqgemm": "BiQGEMM"}.get(name, f"qgraph::{name}")
        return f"{ns}::{name}"
    if target in FUNCTION_OPS:
        return FUNCTION_OPS[target]
    return getattr(target, "__name__", str(target))


def canonical_module_name(module: nn.Module) -> str:
    for cls in type(module).__mro__:
        if cls in MODULE_OPS:
            return MODULE_OPS[cls]
    custom = getattr(module, "qgraph_op_type", None)
    return custom if isinstance(custom, str) else type(module).__name__
