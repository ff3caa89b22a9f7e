"""sparq: simulate SPARQ activation quantization (bSPARQ / vSPARQ windows, `qgraph.quant.sparq`).

Runs after ``insert-fq``: every per-tensor activation fake-quant node that insert-fq put in front of an
annotated node (``meta["qgraph.fake_quant"]``) gets its target swapped for
`qgraph.quant.sparq.sparq_fake_quantize` with the same qparams plus the window options. The codes come from
calibrate's qparams at the annotated activation width (annotate with ``act_bits=8`` for the paper's
setting); SPARQ then keeps an n-bit window of each value (``bits``, default 4).

Why a rewrite after insert-fq rather than a flag insert-fq reads: no shared pass changes, and the result
is still a function of the same (scale, zero point), so everything downstream keeps working unchanged:
the SPARQ output lies on the b-bit grid, so ``lower-int8`` (which does not recognise the node as a plain
fake quant and quantizes its output itself) computes exactly the SPARQ codes on the int8 kernel; artifacts
replay the pass after insert-fq when they load. ONNX export has no SPARQ operator (the node is traced as
its float decomposition). The vSPARQ pairing dim is the dot product's: input channels (dim 1) of a Conv,
the last dim of a Gemm / MatMul input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qgraph.errors import PipelineError
from qgraph.ir.meta import ANNOTATION_KEY, FQ_KEY, SPARQ_KEY
from qgraph.pass_base import NON_NEGATIVE, Pass, PassResult, each, in_range, validate
from qgraph.quant.sparq import sparq_fake_quantize
from qgraph.registry import register_pass

_FQ_TARGETS = (torch.fake_quantize_per_tensor_affine, torch.ops.aten.fake_quantize_per_tensor_affine.default)


@register_pass("sparq", after=("insert-fq",), before=("lower-int8", "lower-weight-only", "verify"),
               requires=("fake-quantized",))
class Sparq(Pass):
    """Swap each activation fake-quant for the SPARQ window variant (see the module docstring).

    ``bits``: window width n; ``mode``: bsparq or vsparq; ``rounding``: round the bits below the window
    (else truncate); ``shifts``: allowed window placements (LSB position), empty = all (the paper's
    "5opt" for 8→4 bits; ``shifts=[0,2,4]`` is its 3opt).
    """

    frontends = {"fx"}
    frontend_reason = "it swaps the fake-quant function of torch.fx nodes"

    @dataclass(frozen=True)
    class Options:
        bits: int = 4
        mode: Literal["bsparq", "vsparq"] = "bsparq"
        rounding: bool = True
        shifts: tuple[int, ...] = ()

        def __post_init__(self):
            validate(self, bits=in_range(1, 8), shifts=each(NON_NEGATIVE))

    def run(self, graph, ctx) -> PassResult:
        o = self.options
        wrapped, notes = 0, []
        found = False
        for node in list(graph.nodes()):
            meta = graph.meta(node)
            ann = meta.get(ANNOTATION_KEY)
            if ann is None or not meta.get(FQ_KEY):
                continue
            for idx, spec in sorted(ann.inputs.items()):
                fq = graph.inputs(node)[idx]
                if getattr(fq, "op", None) != "call_function" or fq.target not in _FQ_TARGETS:
                    continue
                found = True
                name = f"{graph.qualname(node)} input {idx}"
                if spec.bits <= o.bits:
                    notes.append(f"{name}: {spec.bits}-bit codes fit a {o.bits}-bit window; left as they are")
                    continue
                if o.shifts and (min(o.shifts) < 0 or max(o.shifts) < spec.bits - o.bits):
                    raise PipelineError(f"sparq{{shifts={list(o.shifts)}}}: {name} has {spec.bits}-bit codes, whose "
                                        f"leading one needs window placement {spec.bits - o.bits}; placements "
                                        f"are >= 0 and must include one >= {spec.bits - o.bits}")
                dim = 1 if graph.op_type(node) == "Conv" else -1
                fq.target = sparq_fake_quantize
                fq.args = (*fq.args[:5], o.bits, o.mode, o.rounding, dim, tuple(o.shifts))
                meta.setdefault(SPARQ_KEY, {})[f"input{idx}"] = {"bits": o.bits, "mode": o.mode,
                                                                 "rounding": o.rounding, "codes": spec.bits}
                wrapped += 1
        if not found:
            raise PipelineError("sparq found no activation fake-quant to change: annotate activations "
                                "(e.g. annotate{act_bits=8}) and run calibrate and insert-fq before sparq")
        if wrapped:
            graph.recompile()
        if notes:
            ctx.report.setdefault("sparq", {})["notes"] = notes
        return PassResult(graph, modified=bool(wrapped), stats={"activations": wrapped, "skipped": len(notes),
                                                                "bits": o.bits, "mode": o.mode})
