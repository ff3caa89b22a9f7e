"""Weights after an optimizer (GPTQ, aespa), shared by every trial that picks that (optimizer, spec) for a layer.

A search candidate names, per layer, a weight spec and the optimizer that fits it (`Choice.optimizer`). GPTQ
and aespa are sequential: a layer's result depends on the already-quantized layers before it. Running them
per trial costs minutes per trial on 2 cores, so the search runs each (optimizer, spec) once over the whole
model (every searched layer at that spec: the *uniform prefix*), keeps every layer's result, and a mixed
candidate takes each layer's weight from the run of its own choice. That is the prefix-independent key the
issue allows when its effect is measured: bench/search.py scores the chosen strategy both ways
(`sequential_weights`: one optimizer run with the candidate's own prefix) and reports the difference.

Results are cached on disk per node in ``qweight_dir`` (safetensors, atomic writes), keyed by the float
weight's bytes, the spec, the optimizer's pass text, the calibration data's hash and the versions.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from qgraph.search.space import SearchError

OPTIMIZERS = ("rtn", "gptq", "aespa")
OPTIMIZED_VERSION = 1


def optimizer_pass(optimizer: str, spec: Any) -> str:
    """The pipeline text of an optimizer for a weight spec ('' for round-to-nearest)."""
    if optimizer not in OPTIMIZERS:
        raise SearchError(f"unknown weight optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if optimizer == "rtn":
        return ""
    opts = "act_order=true" + (",bcq_importance=hessian" if spec.scheme == "bcq" else "")
    return f"{optimizer}{{{opts}}}"


def calibration_hash(batches: Sequence[tuple]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for b in batches:
        for t in b:
            if isinstance(t, torch.Tensor):
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def run_optimizer(graph: Any, target: Any, nodes: dict[str, Any], optimizer: str,
                  calibration: Sequence[tuple], progress: bool = False) -> dict[str, Any]:
    """Quantized weights of ``nodes`` (node name → weight QSpec; every other weighted node float) after
    ``optimizer`` ran over the whole graph once (node name → quantized weight)."""
    from qgraph.context import PassContext
    from qgraph.ir.meta import QWEIGHT_KEY
    from qgraph.pass_manager import PassManager
    from qgraph.quant.qspec import Annotation
    from qgraph.search.objectives import fresh_copy

    specs = list(nodes.values())
    if not specs:
        return {}
    g = fresh_copy(graph)
    strategy = {}
    for n in g.nodes():
        name = g.name(n)
        if name in nodes:
            strategy[g.qualname(n)] = Annotation(weight=nodes[name])
        elif g.param(n, "weight") is not None and g.op_type(n) in ("Gemm", "MatMul", "Conv", "Gather"):
            strategy[g.qualname(n)] = Annotation(fallback_float=True)
    opt = optimizer_pass(optimizer, specs[0])
    passes = ["annotate{act_bits=0}"] + ([opt] if opt else []) + ["quantize-weights"]
    ctx = PassContext(target=target, config={"progress": progress, "strategy": strategy},
                      calibration=list(calibration) or None)
    g = PassManager(",".join(passes)).run(g, ctx).graph
    out = {}
    for n in g.nodes():
        if g.name(n) in nodes:
            q = g.meta(n).get(QWEIGHT_KEY)
            if q is None:
                raise SearchError(f"optimizer {optimizer} left node {g.name(n)} without a quantized weight")
            out[g.name(n)] = q
    return out


class OptimizedWeights:
    """Per (optimizer, spec): every searched node's weight after that optimizer ran with every searched node
    at that spec (computed once per process, cached on disk through ``load``/``save``)."""

    def __init__(self, graph: Any, target: Any, calibration: Sequence[tuple],
                 node_specs: Callable[[str, Any], dict[str, Any]],
                 load: Callable[[str, Any, str], Any], save: Callable[[str, Any, str, Any], None],
                 progress: Callable[[str], None] | None = None):
        self.graph, self.target, self.calibration = graph, target, list(calibration)
        self.calib_hash = calibration_hash(self.calibration)
        self._node_specs, self._load, self._save = node_specs, load, save
        self._done: dict[tuple[str, str], dict[str, Any]] = {}
        self.progress = progress
        self.runs = 0

    def key(self, optimizer: str, spec: Any) -> str:
        """What the cached weight depends on besides the node's own weight and spec."""
        return f"{optimizer_pass(optimizer, spec)}|calib={self.calib_hash}|prefix=uniform|v{OPTIMIZED_VERSION}"

    def weight(self, node: str, spec: Any, optimizer: str) -> Any:
        k = (optimizer, str(spec))
        if k not in self._done:
            self._done[k] = self._all(optimizer, spec)
        got = self._done[k].get(node)
        if got is None:
            raise SearchError(f"no {optimizer} result for node {node} at {spec}: the node is not searched at "
                              "that spec")
        return got

    def _all(self, optimizer: str, spec: Any) -> dict[str, Any]:
        nodes = self._node_specs(optimizer, spec)
        key = self.key(optimizer, spec)
        cached = {n: self._load(n, s, key) for n, s in nodes.items()}
        if all(q is not None for q in cached.values()):
            return cached
        if self.progress:
            self.progress(f"running {optimizer} with every searched layer at {spec} ({len(nodes)} nodes; cached "
                          "for later trials and runs)")
        got = run_optimizer(self.graph, self.target, nodes, optimizer, self.calibration)
        self.runs += 1
        for n, q in got.items():
            self._save(n, nodes[n], key, q)
        return got
