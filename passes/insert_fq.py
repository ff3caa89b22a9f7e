"""insert-fq: simulate the chosen quantization in float.

Weights are replaced by their dequantized values (BCQ by Σ α·B (+z)); each quantized activation input
gets a ``fake_quantize_per_tensor_affine`` node with its calibrated qparams, or, for a dynamic spec, a
``qgraph::fake_quant_dynamic`` node that computes its scales from the tensor (per token or per tensor); a
node with an output spec gets one after it, read by all its readers.
"""
from __future__ import annotations

import torch

from qgraph.errors import PipelineError, SpecError
from qgraph.ir.meta import ANNOTATION_KEY, FQ_KEY, QPARAMS_KEY, QWEIGHT_KEY
from qgraph.kernels.dynamic_int8 import op_args
from qgraph.pass_base import Pass, PassResult
from qgraph.passes.quantize_weights import dequantized
from qgraph.registry import register_pass


@register_pass("insert-fq", after=("quantize-weights", "calibrate"), requires=("annotated",),
               ensures=("fake-quantized",))
class InsertFakeQuant(Pass):
    def run(self, graph, ctx) -> PassResult:
        weights = acts = 0
        for node in list(graph.nodes()):
            ann = graph.meta(node).get(ANNOTATION_KEY)
            if ann is None or graph.meta(node).get(FQ_KEY):
                continue
            if ann.weight is not None:
                q = graph.meta(node).get(QWEIGHT_KEY)
                if q is None:
                    raise PipelineError(f"insert-fq: node {graph.name(node)} has a weight spec but no quantized "
                                        f"weight; run 'quantize-weights' before 'insert-fq'")
                w = graph.param(node, "weight")
                graph.set_param(node, "weight", dequantized(q, w))
                weights += 1
            qparams = graph.meta(node).get(QPARAMS_KEY, {})
            for idx, spec in sorted(ann.inputs.items()):
                if spec.dynamic:
                    if graph.ir != "fx":
                        raise SpecError(f"insert-fq: dynamic activation specs are simulated on fx graphs only; "
                                        f"{graph.name(node)} input {idx} is {spec} on an {graph.ir} graph (use a "
                                        f"static activation spec, e.g. annotate{{act_dynamic=off}})")
                    graph.wrap_input(node, idx, torch.ops.qgraph.fake_quant_dynamic, op_args(spec))
                    acts += 1
                    continue
                if f"input{idx}" not in qparams:
                    raise PipelineError(f"insert-fq: activation input {idx} of {graph.name(node)} has no qparams; "
                                        f"run 'calibrate' before 'insert-fq'")
                if spec.granularity != "tensor":
                    raise SpecError(f"insert-fq simulates per-tensor activations only; {graph.name(node)} input "
                                    f"{idx} is {spec}")
                scale, zp = qparams[f"input{idx}"]
                graph.wrap_input(node, idx, torch.fake_quantize_per_tensor_affine,
                                 (float(scale), int(zp), spec.qmin, spec.qmax))
                acts += 1
            if ann.output is not None:
                if ann.output.dynamic or ann.output.granularity != "tensor":
                    raise SpecError(f"insert-fq simulates static per-tensor outputs only; {graph.name(node)}'s "
                                    f"output is {ann.output}")
                if "output" not in qparams:
                    raise PipelineError(f"insert-fq: the output of {graph.name(node)} has no qparams; run "
                                        f"'calibrate' before 'insert-fq'")
                scale, zp = qparams["output"]
                graph.wrap_output(node, torch.fake_quantize_per_tensor_affine,
                                  (float(scale), int(zp), ann.output.qmin, ann.output.qmax))
                acts += 1
            graph.meta(node)[FQ_KEY] = True
        if weights or acts:
            graph.recompile()
        return PassResult(graph, modified=bool(weights or acts), stats={"weights": weights, "activations": acts})
