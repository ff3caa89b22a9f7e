"""calibrate: run calibration data through the graph and attach activation qparams."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from qgraph.errors import CalibrationError
from qgraph.ir.inputs import batches
from qgraph.ir.meta import ANNOTATION_KEY, QPARAMS_KEY
from qgraph.pass_base import POSITIVE_INT, Pass, PassResult, Rule, in_range, optional, validate
from qgraph.progress import progress
from qgraph.quant.qspec import OBSERVER_NAMES
from qgraph.registry import register_pass

OBSERVER = Rule(lambda name: name in OBSERVER_NAMES, f"an observer: {', '.join(OBSERVER_NAMES)}")


@register_pass("calibrate", after=("annotate",), requires=("annotated",), ensures=("calibrated",))
class Calibrate(Pass):
    """Observe each annotated activation over the calibration batches; store (scale, zero point)."""

    @dataclass(frozen=True)
    class Options:
        method: str | None = None
        p: float = 99.99
        max_batches: int | None = None

        def __post_init__(self):
            validate(self, method=optional(OBSERVER), p=in_range(0, 100, lo_open=True),
                     max_batches=optional(POSITIVE_INT))

    def run(self, graph, ctx) -> PassResult:
        requests, specs, keys = [], [], []
        for node in graph.nodes():
            ann = graph.meta(node).get(ANNOTATION_KEY)
            if ann is None:
                continue
            for idx, spec in sorted(ann.inputs.items()):
                if spec.dynamic:  # scales computed at run time
                    continue
                requests.append((node, idx))
                specs.append(spec)
                keys.append((node, f"input{idx}"))
            if ann.output is not None and not ann.output.dynamic:
                requests.append(_output_request(graph, node))
                specs.append(ann.output)
                keys.append((node, "output"))
        if not requests:
            return PassResult(graph, modified=False, preserved=frozenset({"*"}), stats={"observed": 0})
        calibration = ctx.calibration
        if calibration is None and ctx.config.get("calibrate_on_example_inputs") and graph.example_inputs:
            warnings.warn("calibrate: no calibration data given; calibrating on the example inputs only "
                          "(pass calib=[...] for ranges that hold on real data)", stacklevel=2)
            calibration = [tuple(graph.example_inputs)]
        if calibration is None:
            raise CalibrationError("calibrate needs data: pass calib=[batch, ...] to qgraph.quantize (or set "
                                   "PassContext.calibration); annotate with act_bits=0 for weight-only quantization")
        observers = [self._observer(spec) for spec in specs]

        def on_value(i, t):
            observers[i].observe(t)

        data = batches(calibration, graph, self.options.max_batches)
        total = self.options.max_batches
        if total is None and hasattr(calibration, "__len__"):
            total = len(calibration)
        bar = progress(data, total=total, desc="calibrate", enabled=ctx.progress, unit="batch")
        count = graph.collect(requests, bar, on_value)
        if count == 0:
            raise CalibrationError("calibration data is empty: give at least one batch")
        for (node, key), spec, obs in zip(keys, specs, observers):
            graph.meta(node).setdefault(QPARAMS_KEY, {})[key] = obs.qparams(spec)
        return PassResult(graph, modified=True, preserved=frozenset({"*"}),
                          stats={"observed": len(requests), "batches": count})

    def _observer(self, spec):
        from qgraph.quant.observers import make_observer

        name = self.options.method or spec.observer
        opts = {"percentile": self.options.p} if name == "percentile" else {}
        return make_observer(name, **opts)


def _output_request(graph, node) -> tuple:
    """An output is observed where its first reader takes it in: ``(reader, input index)``."""
    for user in graph.users(node):
        for idx, producer in enumerate(graph.producers(user)):
            if producer is node:
                return user, idx
    raise CalibrationError(f"calibrate: the output of {graph.name(node)} has a spec but no reader to observe it "
                           f"at; drop its output spec")
