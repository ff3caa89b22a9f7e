"""genie: data-free calibration. Distill calibration images from the model's BatchNorm statistics
(`qgraph.quant.genie`: generator + per-sample latents, swing convolution, BNS loss) and hand them to the
passes after it as their calibration data (``calibrate``, ``adaround``, ``brecq``, ``clip-search``...).

It runs first, before ``fold-bn`` folds the statistics away; the model's weights are not changed. Images have
the example input's shape ([N, C, H, H]). Given calibration data is replaced (with a warning). The seconds
spent are in the stats and printed unless progress is off. ``qgraph lower --calib synthetic`` puts it in front
of the lowering pipeline. torch graphs whose BatchNorms are modules (``symbolic_trace``).
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass

from qgraph.errors import CalibrationError
from qgraph.pass_base import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Pass, PassResult, optional, validate
from qgraph.progress import progress
from qgraph.quant.genie import GenieOptions, strided_convs, synthesize
from qgraph.registry import register_pass


@register_pass("genie", before=("fold-bn", "annotate", "calibrate"))
class GeniePass(Pass):
    """Synthesize calibration images from BatchNorm statistics (Genie); they become ``ctx.calibration``."""

    frontends = {"fx"}
    frontend_reason = "it backpropagates through the torch model to its input images"

    @dataclass(frozen=True)
    class Options:
        samples: int = 32
        batch_size: int = 16
        iters: int = 100
        lr: float = 0.05
        swing: bool = True
        seed: int | None = None

        def __post_init__(self):
            validate(self, samples=POSITIVE_INT, batch_size=POSITIVE_INT, iters=POSITIVE_INT, lr=POSITIVE,
                     seed=optional(NON_NEGATIVE))

    def run(self, graph, ctx) -> PassResult:
        o = self.options
        bn_nodes = [n for n in graph.nodes() if graph.op_type(n) == "BatchNormalization"]
        bns = [m for m in (graph.module_of(n) for n in bn_nodes) if getattr(m, "running_mean", None) is not None]
        if not bns:
            why = ("its BatchNorms are not modules (an exported graph); trace the nn.Module with symbolic_trace"
                   if bn_nodes else "it has no BatchNorm layer (or fold-bn ran before genie)")
            raise CalibrationError(f"genie distills BatchNorm statistics, but {why}: put genie first in the "
                                   f"pipeline, or give real calibration data")
        example = graph.example_inputs[0] if graph.example_inputs else None
        if example is None or example.dim() != 4 or example.shape[-1] != example.shape[-2]:
            raise CalibrationError(f"genie makes square images [N, C, H, H] like the example input; got "
                                   f"{None if example is None else tuple(example.shape)}")
        if ctx.calibration is not None:
            warnings.warn("genie: the given calibration data is replaced by synthetic images", stacklevel=2)
        modules = [m for m in (graph.module_of(n) for n in graph.nodes()) if m is not None]
        params = [p for m in modules for p in m.parameters(recurse=False)]
        opts = GenieOptions(samples=o.samples, batch_size=o.batch_size, iters=o.iters,
                            image_size=int(example.shape[-1]), channels=int(example.shape[1]),
                            lr_generator=o.lr, lr_latent=o.lr, swing=o.swing,
                            seed=ctx.seed if o.seed is None else o.seed)
        steps = -(-o.samples // o.batch_size) * o.iters
        start = time.perf_counter()
        images = synthesize(graph, opts, bns=bns, convs=strided_convs(modules), params=params,
                            progress=lambda it: progress(it, total=steps, desc="genie", enabled=ctx.progress,
                                                         unit="step"))
        seconds = time.perf_counter() - start
        ctx.calibration = [(b.to(example.dtype),) for b in images]
        if ctx.progress:
            print(f"genie: {o.samples} synthetic images in {seconds:.1f} s", file=sys.stderr)
        stats = {"images": o.samples, "batches": len(images), "bn_layers": len(bns), "seconds": seconds}
        ctx.report["genie"] = dict(stats)
        return PassResult(graph, modified=False, preserved=frozenset({"*"}), stats=stats)
