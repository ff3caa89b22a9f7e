"""`run_search`: the whole search — workbench, space, cost table, sensitivity, driver, trials, front."""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qgraph.search.drivers import DRIVERS, Problem, run_driver
from qgraph.search.objectives import (
    Constraints,
    CostTable,
    EvalConfig,
    Trial,
    Workbench,
    analytic,
    cost_table,
    effective_bits,
    summarize,
)
from qgraph.search.pareto import pareto_front
from qgraph.search.sensitivity import (
    Sensitivity,
    anchor_sensitivity,
    compute_sensitivity,
    layer_traces,
    local_anchor_scales,
    local_probe,
    metric_loss,
    probe_layers,
    scale_sensitivity,
)
from qgraph.search.space import SearchError, Space, SpaceOptions, build_space
from qgraph.search.strategy import Strategy
from qgraph.search.trials import TrialCache, TrialRunner

DEFAULT_BASELINES = ("bcq3-g128", "bcq4-g128", "w4-g128", "w8-ch")


@dataclass(frozen=True)
class SearchOptions:
    """Everything a search run needs. ``max_bytes`` may be absolute (float) or a fraction of the float
    weight bytes (``max_bytes_fraction``). ``anchor``: before the driver runs, evaluate every choice label
    as a uniform strategy (outside the trial budget) and scale Ω per label to match (see
    `anchor_sensitivity`). ``optimizer_skip``: node-key patterns GPTQ / aespa leave float in their runs (e.g. a
    tied LM head the space only offers table choices for); ``local_anchors``: also anchor each label on a quarter
    of the layers over the best uniform strategy (one more evaluation per label). ``latency``: ``roofline``
    (the target's cost model) or ``measured`` (this machine's kernels timed at ``latency_rows`` activation rows,
    `qgraph.search.latency`; then the latency limit and axis are measured µs, and the roofline's error against
    them is in the summary); ``latency_mode``: the BiQGEMM mode those timings (and the lowering they predict)
    use, ``exact`` or ``fast``."""

    model: str
    target: str = "x86-avx2"
    driver: str = "nsga"
    trials: int = 50
    seed: int = 0
    constraints: Constraints = field(default_factory=Constraints)
    max_bytes_fraction: float | None = None
    cache: str | None = None
    workers: int = 2
    ray_address: str | None = None
    sensitivity: str = "hessian"
    hutchinson_tol: float = 1e-3
    hutchinson_max_iter: int = 30
    space: SpaceOptions = field(default_factory=SpaceOptions)
    metric: str = "auto"
    n_eval: int = 32
    measure_latency: bool = False
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    anchor: bool = True
    optimizer_skip: tuple[str, ...] = ()
    local_anchors: bool = True
    latency: str = "roofline"
    latency_rows: int = 1
    latency_mode: str = "exact"

    def __post_init__(self) -> None:
        if self.latency_mode not in ("exact", "fast"):
            raise SearchError(f"latency_mode must be 'exact' or 'fast', got {self.latency_mode!r}")

    def eval_config(self) -> EvalConfig:
        """How trials are scored; with a trial cache, quantized weights are shared through a folder beside it
        (``<cache>.qweights``), so workers and resumed runs do not quantize a (layer, spec) again."""
        qdir = None if self.cache is None else str(Path(self.cache).with_name(Path(self.cache).name + ".qweights"))
        return EvalConfig(model=self.model, target=self.target, metric=self.metric, n_eval=self.n_eval,
                          eval_seed=1, measure_latency=self.measure_latency, threads=1, qweight_dir=qdir,
                          keep_float=tuple(self.space.keep_float) + tuple(self.optimizer_skip))


@dataclass
class SearchResult:
    options: SearchOptions
    space: Space
    costs: CostTable
    sens: Sensitivity
    constraints: Constraints
    trials: list[Trial]
    chosen: Trial | None
    baselines: dict[str, Trial]
    base_metric: float
    metric_name: str
    evaluated: int
    cached: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    anchors: dict[str, float] = field(default_factory=dict)
    anchor_scales: dict[str, float] = field(default_factory=dict)
    latency_check: dict[str, Any] = field(default_factory=dict)

    @property
    def front(self) -> list[Trial]:
        """Trials on the (error, bytes) Pareto front, by bytes."""
        pts = [t.objectives(_metric(self.metric_name)) for t in self.trials]
        return sorted((self.trials[i] for i in pareto_front(pts)), key=lambda t: t.analytic.bytes)

    def summary(self) -> dict[str, Any]:
        def row(t: Trial | None) -> dict[str, Any] | None:
            if t is None:
                return None
            return {"metric": t.metric, "drop": t.drop, "bytes": t.analytic.bytes, "avg_bits": t.analytic.avg_bits,
                    "effective_bits": effective_bits(self.space, t.assignment),
                    "latency_us": t.analytic.latency_us, "measured_latency_us": t.measured_latency_us,
                    "feasible": t.feasible, "choices": summarize(self.space, t.assignment),
                    "strategy_sha256": t.strategy.sha256}

        return {"model": self.options.model, "target": self.options.target, "driver": self.options.driver,
                "seed": self.options.seed, "metric": self.metric_name, "base_metric": self.base_metric,
                "constraints": {k: v for k, v in asdict(self.constraints).items() if v is not None},
                "trials": len(self.trials), "evaluated": self.evaluated, "cached": self.cached,
                "seconds": round(self.seconds, 2), "timings": {k: round(v, 2) for k, v in self.timings.items()},
                "sensitivity": {"method": self.sens.method, "iterations": self.sens.iterations,
                                "converged": self.sens.converged, "anchor_scales": self.anchor_scales},
                "anchors": self.anchors,
                "float_bytes": self.space.float_bytes(), "latency": self.latency_check,
                "chosen": row(self.chosen), "baselines": {k: row(v) for k, v in self.baselines.items()},
                "front": [row(t) for t in self.front]}


def _metric(name: str):
    from qgraph.search.objectives import METRICS

    return METRICS[name]


def _sens_fingerprint(config: EvalConfig, space: Space, opts: SearchOptions) -> str:
    sig = {"eval": config.fingerprint(), "method": opts.sensitivity, "tol": opts.hutchinson_tol,
           "max_iter": opts.hutchinson_max_iter, "seed": opts.seed,
           "layers": [[layer.key, [ch.text for ch in layer.choices]] for layer in space.layers]}
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()


def _traces_fingerprint(config: EvalConfig, opts: SearchOptions) -> str:
    """Hutchinson traces depend on the model, loss and data, not on the target."""
    sig = {"model": config.model, "metric": config.metric, "n_sens": config.n_sens, "eval_seed": config.eval_seed,
           "tol": opts.hutchinson_tol, "max_iter": opts.hutchinson_max_iter, "seed": opts.seed,
           "embeddings": opts.space.embeddings}
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()


def run_search(opts: SearchOptions, *, progress: Callable[[str], None] | None = None,
               on_trial: Callable[[Strategy, dict[str, Any], bool], None] | None = None,
               bench: Workbench | None = None) -> SearchResult:
    """Run a search end to end (see the package docstring); resumable through ``opts.cache``."""
    if opts.driver not in DRIVERS:
        raise SearchError(f"unknown driver {opts.driver!r}; use one of {', '.join(DRIVERS)}")
    if opts.trials < 1:
        raise SearchError(f"--trials must be at least 1, got {opts.trials}")
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    config = opts.eval_config()
    cache = TrialCache(opts.cache)
    if cache.skipped_lines:
        say(f"cache {opts.cache}: skipped {cache.skipped_lines} unreadable line(s) (a torn write from a kill)")
    if len(cache):
        say(f"cache {opts.cache}: {len(cache)} finished trial(s) on disk")
    runner = TrialRunner(config, cache=cache, workers=opts.workers, ray_address=opts.ray_address, on_result=on_trial)
    try:
        say(f"loading and tracing {opts.model}")
        t = time.perf_counter()
        if bench is not None and bench.config.fingerprint() != config.fingerprint():
            raise SearchError(f"the workbench given to run_search scores differently ({bench.config}) from the "
                              f"search's workers ({config}); build it from opts.eval_config()")
        if bench is not None and bench.config.qweight_dir is None and config.qweight_dir is not None:
            bench.config = replace(bench.config, qweight_dir=config.qweight_dir)  # share its quantized weights
        bench = bench if bench is not None else Workbench(config)
        runner.bench = bench
        timings["load_trace"] = time.perf_counter() - t
        if opts.workers > 0 or opts.ray_address is not None:
            runner.start()  # workers load the model while this process computes sensitivities
        space = build_space(bench.graph, bench.target, opts.space)
        say(f"space: {len(space.searchable)} searched nodes, {len(space.layers) - len(space.searchable)} fixed, "
            f"{len(space.ties)} tie groups; choices {', '.join(space.labels())}")
        t = time.perf_counter()
        costs = cost_table(bench.graph, space, bench.target)
        latency_check: dict[str, Any] = {}
        if opts.latency == "measured":
            costs, latency_check = _measured_costs(bench, space, costs, opts.latency_rows, say, opts.latency_mode)
        elif opts.latency != "roofline":
            raise SearchError(f"unknown latency source {opts.latency!r}; use roofline or measured")
        timings["cost_table"] = time.perf_counter() - t
        constraints = opts.constraints
        if opts.max_bytes_fraction is not None:
            constraints = Constraints(opts.max_bytes_fraction * space.float_bytes(), constraints.max_latency_us,
                                      constraints.avg_bits, constraints.max_metric_drop)
        low = analytic(space, costs, replace(constraints, max_latency_us=None), space.low())
        if not low.feasible:
            raise SearchError(f"no strategy meets the constraints ({constraints.describe()}); the smallest one has "
                              f"{low.bytes / 1e6:.3f} MB and {low.avg_bits:.2f} avg bits")
        t = time.perf_counter()
        fp = _sens_fingerprint(config, space, opts)
        stored = cache.load_side(f"sens-{fp[:16]}", fp)
        if stored is not None:
            sens = Sensitivity.from_dict(stored)
            say(f"sensitivity ({sens.method}) from the cache")
        else:
            say(f"sensitivity: {opts.sensitivity}")
            tfp = _traces_fingerprint(config, opts)
            traces = cache.load_side(f"traces-{tfp[:16]}", tfp) if opts.sensitivity == "hessian" else None
            if traces is None and opts.sensitivity == "hessian":
                try:
                    traces = layer_traces(bench, space, tol=opts.hutchinson_tol, max_iter=opts.hutchinson_max_iter,
                                          seed=opts.seed, progress=say)
                    cache.save_side(f"traces-{tfp[:16]}", tfp, traces)
                except RuntimeError as e:
                    say(f"hessian traces failed ({str(e).splitlines()[0][:120]}); using the proxy")
                    opts = replace(opts, sensitivity="proxy")
            sens = compute_sensitivity(bench, space, opts.sensitivity, tol=opts.hutchinson_tol,
                                       max_iter=opts.hutchinson_max_iter, seed=opts.seed, progress=say, traces=traces)
            cache.save_side(f"sens-{fp[:16]}", fp, sens.to_dict())
        timings["sensitivity"] = time.perf_counter() - t
        anchors: dict[str, float] = {}
        scales: dict[str, float] = {}
        if opts.anchor:
            t = time.perf_counter()
            sens, anchors, scales = _anchor(space, sens, runner, bench, costs, constraints, opts.seed, say,
                                            local=opts.local_anchors)
            say("anchored Ω on uniform strategies: " + ", ".join(f"{k} ×{v:.3g}" for k, v in scales.items()))
            timings["anchors"] = time.perf_counter() - t
        problem = Problem(space, costs, sens, constraints, bench.metric, runner.run, max_trials=opts.trials,
                          use_latency=constraints.max_latency_us is not None)
        say(f"searching: driver {opts.driver}, {opts.trials} trials, constraints: {constraints.describe()}")
        t = time.perf_counter()
        run_driver(opts.driver, problem, seed=opts.seed)
        timings["search"] = time.perf_counter() - t
        t = time.perf_counter()
        baselines = _baselines(problem, runner, opts.baselines)
        timings["baselines"] = time.perf_counter() - t
    finally:
        runner.close()
    chosen = problem.best()
    return SearchResult(opts, space, costs, sens, constraints, problem.trials, chosen, baselines, bench.base_metric,
                        bench.metric.name, runner.evaluated, runner.cached, time.perf_counter() - t0, timings,
                        anchors, scales, latency_check)


def _measured_costs(bench: Workbench, space: Space, roofline: CostTable, rows: int,
                    say: Callable[[str], None], mode: str = "exact") -> tuple[CostTable, dict[str, Any]]:
    """This machine's measured cost table: Linear kernels timed at ``rows`` rows (cached per machine), and the
    rest of the model as the eager float model's median time minus its fp32 Linears."""
    import torch

    from qgraph.search.latency import LatencyTable, measured_cost_table, roofline_error

    table = LatencyTable()
    float_linears = measured_cost_table(space, rows, table, mode=mode)
    with torch.no_grad():
        whole = _time_call(bench.graph.gm, bench.graph.example_inputs)
    lin = sum(r[space.float_index(layer)] if any(ch.is_float for ch in layer.choices) else r[0]
              for r, layer in zip(float_linears.per_layer, space.layers))
    costs = CostTable("measured", max(whole - lin, 0.0), float_linears.per_layer)
    check = {"rows": rows, "mode": mode, "float_model_us": whole, "measured_now": table.measured, "cache": str(table.path),
             "roofline_vs_measured": roofline_error(roofline, costs)}
    say(f"measured latency: fp32 model {whole / 1e3:.1f} ms, {table.measured} kernel timings new "
        f"(cache {table.path}); roofline vs measured: {check['roofline_vs_measured']}")
    return costs, check


def _time_call(fn: Callable[..., Any], args: tuple, repeats: int = 5) -> float:
    import statistics

    fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def _anchor(space: Space, sens: Sensitivity, runner: TrialRunner, bench: Workbench, costs: CostTable,
            constraints: Constraints, seed: int, say: Callable[[str], None],
            local: bool = True) -> tuple[Sensitivity, dict[str, float], dict[str, float]]:
    """Anchor Ω on measured strategies (cached like trials; outside the trial budget): each choice label as a
    uniform strategy, then each label on a quarter of the layers on top of the best uniform strategy that
    meets the limits (see the sensitivity module). Returns (anchored Ω, metric per anchor, scale per label)."""
    metric = bench.metric
    labels = [lb for lb in space.labels() if lb != "fp32"]
    uniform = {lb: space.uniform(lb) for lb in labels}
    results = runner.run([space.strategy(a) for a in uniform.values()])
    metrics = {f"uniform {lb}": float(r["metric"]) for lb, r in zip(labels, results)}
    loss = {lb: metric_loss(metric.name, bench.base_metric, metrics[f"uniform {lb}"]) for lb in labels}
    anchored, scales = anchor_sensitivity(sens, space, {lb: (uniform[lb], loss[lb]) for lb in labels})
    if not local:
        return anchored, metrics, scales
    # local anchors around the best uniform strategy that meets the limits (or the nearest to meeting them)
    limits = replace(constraints, max_metric_drop=None)
    ref_label = min(labels, key=lambda lb: (analytic(space, costs, limits, uniform[lb]).violation,
                                            metric.error(metrics[f"uniform {lb}"])))
    ref = uniform[ref_label]
    layers = probe_layers(space, seed=seed)
    probes = {lb: a for lb in labels if lb != ref_label and (a := local_probe(space, ref, lb, layers)) is not None}
    if probes:
        results = runner.run([space.strategy(a) for a in probes.values()])
        for lb, r in zip(probes, results):
            metrics[f"{ref_label} + {lb} on {len(layers)} layers"] = float(r["metric"])
        local = {lb: (a, metric_loss(metric.name, bench.base_metric, float(r["metric"])))
                 for (lb, a), r in zip(probes.items(), results)}
        scales = local_anchor_scales(sens, space, scales, ref, loss[ref_label], local)
        anchored = scale_sensitivity(sens, space, scales)
        say(f"local anchors: {len(probes)} label(s) on {len(layers)} layers over uniform {ref_label}")
    return anchored, metrics, scales


def _baselines(problem: Problem, runner: TrialRunner, labels: tuple[str, ...]) -> dict[str, Trial]:
    """Uniform reference strategies (same label on every searched layer), evaluated outside the trial budget."""
    space = problem.space
    todo: dict[str, Any] = {}
    for label in labels:
        if label not in space.labels():
            continue
        todo[label] = space.uniform(label)
    if not todo:
        return {}
    strategies = [space.strategy(a) for a in todo.values()]
    results = runner.run(strategies)
    out = {}
    for (label, a), s, r in zip(todo.items(), strategies, results):
        an = analytic(space, problem.costs, problem.constraints, a)
        out[label] = Trial(a, s, an, float(r["metric"]), float(r["drop"]),
                           an.feasible and problem.constraints.metric_ok(float(r["drop"])),
                           measured_latency_us=r.get("measured_latency_us"))
    return out
