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
        exported = [n for n in bn_nodes if graph.module_of(n) is None
                    and graph.param(n, "running_mean") is not None and graph.param(n, "running_var") is not None]
        if not bns and not exported:
            raise CalibrationError("genie distills BatchNorm statistics, but this graph has no BatchNorm layer "
                                   "with running statistics (or fold-bn ran before genie): put genie first in the "
                                   "pipeline, or give real calibration data")
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
        bar = lambda it: progress(it, total=steps, desc="genie", enabled=ctx.progress, unit="step")  # noqa: E731
        start = time.perf_counter()
        if bns:
            images = synthesize(graph, opts, bns=bns, convs=strided_convs(modules), params=params, progress=bar)
        else:
            work, taps = _tapped(graph, exported, o.swing)
            images = synthesize(work, opts, progress=bar, taps=taps)
        seconds = time.perf_counter() - start
        ctx.calibration = [(b.to(example.dtype),) for b in images]
        if ctx.progress:
            print(f"genie: {o.samples} synthetic images in {seconds:.1f} s", file=sys.stderr)
        stats = {"images": o.samples, "batches": len(images), "bn_layers": len(bns) or len(exported), "seconds": seconds}
        ctx.report["genie"] = dict(stats)
        return PassResult(graph, modified=False, preserved=frozenset({"*"}), stats=stats)


def _tapped(graph, bn_nodes, swing_on: bool):
    """A copy of an exported graph whose BatchNorm inputs are recorded (and stride-2 conv inputs swung)."""
    from qgraph.quant.genie import swing

    work = graph.copy()
    by_name = {work.name(n): n for n in work.nodes()}
    feats: list = [None] * len(bn_nodes)
    targets = []
    for i, bn in enumerate(bn_nodes):
        eps = graph.attribute(bn, "epsilon", 1e-5)
        mean, var = graph.param(bn, "running_mean"), graph.param(bn, "running_var")
        targets.append((mean.detach().float(), (var.detach().float() + eps).sqrt()))

        def tap(x, i=i):
            feats[i] = x
            return x

        tap.__name__ = f"genie_tap_{i}"
        work.wrap_input(by_name[graph.name(bn)], 0, tap)
    if swing_on:
        for n in list(work.nodes()):
            stride = work.literal_arg(n, 3) if work.op_type(n) == "Conv" else None
            if isinstance(stride, (list, tuple)) and max(stride) > 1:
                work.wrap_input(n, 0, swing)
    work.recompile()
    return work, (feats, targets)
