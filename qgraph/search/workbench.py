"""`EvalConfig` and `Workbench`: how trials are evaluated, and the process-local evaluator.

- `EvalConfig`: picklable description of how to evaluate (model, target, metric, data sizes), the thing a
  worker process rebuilds its `Workbench` from and part of every trial's cache key.
- `Workbench`: traces and canonicalizes the model once, keeps the float reference outputs, memoizes
  quantized weights per (node, spec, optimizer) and activation qparams per (node, spec), and evaluates a
  strategy by running annotate, check-target, quantize-weights, insert-fq (the same passes `qgraph.quantize`
  runs with ``strategy=``) on a copy of the graph that shares the float weights.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qgraph.errors import CalibrationError
from qgraph.ir.graph_view import ANNOTATION_KEY
from qgraph.search.metrics import METRICS, Metric, cosine_rows
from qgraph.search.metrics import first_tensor as _first_tensor
from qgraph.search.qweight_store import load_qweight_file as _load_qweight
from qgraph.search.qweight_store import optimized_dir
from qgraph.search.qweight_store import save_qweight_file as _save_qweight
from qgraph.search.space import SearchError
from qgraph.search.splits import SPLITS, eval_plays, eval_sentences, sensitivity_play
from qgraph.search.strategy import CANONICALIZE, Strategy

SEARCH_VERSION = 4  # 2: search / holdout split of the evaluation plays; 3, 4: trace floor, anchored Ω
QWEIGHT_VERSION = 2  # bump when a quantizer changes its output (keys the shared quantized weights)
TRIAL_PIPELINE = "annotate,check-target,quantize-weights,insert-fq"


@dataclass(frozen=True)
class EvalConfig:
    """How trials are evaluated. ``model``: a bundled name or ``path/file.py:factory``; ``metric``:
    ``auto`` (perplexity for smollm2, else cosine), ``cosine`` or ``perplexity``; ``n_eval``: sentences
    (MiniLM) / windows (SmolLM2) / batches (other models) each trial is scored on; ``split``: ``search`` (what trials
    are scored on) or ``holdout`` (data no search step reads; bundled text models only);
    ``measure_latency``: also lower the strategy to real kernels and time it on this host;
    ``qweight_dir``: a folder where quantized weights are shared between processes and runs (not part of
    the fingerprint: it changes where results are kept, not what they are); ``n_opt_calib``: calibration
    batches the weight optimizers (GPTQ, aespa) read; ``keep_float``: node-key patterns that stay float in
    the optimizers' runs (the space's ``keep_float``)."""

    model: str
    target: str
    metric: str = "auto"
    n_eval: int = 32
    eval_seed: int = 1
    n_sens: int = 8
    n_calib: int = 2
    measure_latency: bool = False
    threads: int = 1
    split: str = "search"
    qweight_dir: str | None = None
    n_opt_calib: int = 8
    keep_float: tuple[str, ...] = ()

    def resolved_metric(self) -> Metric:
        name = self.metric
        if name == "auto":
            name = "perplexity" if self.model == "smollm2" else "cosine"
        if name not in METRICS:
            raise SearchError(f"unknown metric {self.metric!r}; use one of auto, {', '.join(METRICS)}")
        return METRICS[name]

    def fingerprint(self) -> str:
        d = {**asdict(self), "threads": None, "qweight_dir": None, "version": SEARCH_VERSION}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def fresh_copy(graph: Any) -> Any:
    """A copy of an FxGraph whose structure and metadata are new but whose parameters and buffers are the
    same tensors (passes replace weights, they never write into them), so a copy costs no weight memory."""
    from qgraph.ir.fx import FxGraph

    gm = graph.gm
    memo: dict[int, Any] = {id(t): t for t in list(gm.parameters()) + list(gm.buffers())}
    other = FxGraph(copy.deepcopy(gm, memo), frontend=graph.frontend, example_inputs=graph.example_inputs,
                    name=graph.name_)
    other.properties = set(graph.properties)
    return other


@dataclass
class _Data:
    eval_batches: list[tuple]
    sens_batches: list[tuple]
    calib_batches: list[tuple]


class Workbench:
    """Everything one process needs to evaluate strategies of one model on one target (see module doc)."""

    def __init__(self, config: EvalConfig, *, source: Any = None, graph: Any = None):
        from qgraph.context import PassContext
        from qgraph.ir.trace import trace
        from qgraph.model_source import load_model_source
        from qgraph.pass_manager import PassManager
        from qgraph.target import load_target

        if config.split not in SPLITS:
            raise SearchError(f"unknown data split {config.split!r}; use one of {', '.join(SPLITS)}")
        self.config = config
        self.metric = config.resolved_metric()
        self.target = load_target(config.target)
        self.source = source if source is not None else load_model_source(config.model)
        if graph is None:
            graph = trace(self.source.module, self.source.example_inputs, dynamic_shapes=self.source.dynamic_shapes)
            graph = PassManager(CANONICALIZE).run(graph, PassContext(target=self.target,
                                                                     config={"progress": False})).graph
        self.graph = graph
        self.data = self._data()
        with torch.no_grad():
            # perplexity needs no float outputs kept (LM logits are large: 128 tokens × 49152 × 4 B a window)
            self.reference = [] if self.metric.name == "perplexity" else \
                [_first_tensor(self.graph.gm(*b)).detach() for b in self.data.eval_batches]
            self.sens_reference = [_first_tensor(self.graph.gm(*b)).detach() for b in self.data.sens_batches]
        self.base_metric = self.score_graph(self.graph) if self.metric.name == "perplexity" else \
            self._score(self.reference)
        self._qweights: dict[tuple[str, str, str], Any] = {}
        self._qparams: dict[tuple[str, str], tuple] = {}
        self._optimized: Any = None

    def holdout(self, n_eval: int | None = None, eval_seed: int | None = None) -> Workbench:
        """A workbench on the same model and graph that scores on held-out data (``split="holdout"``: text
        no search step reads) and shares this one's quantized weights and activation qparams."""
        cfg = replace(self.config, split="holdout", n_eval=n_eval or self.config.n_eval,
                      eval_seed=self.config.eval_seed if eval_seed is None else eval_seed)
        other = Workbench(cfg, source=self.source, graph=self.graph)
        other._qweights, other._qparams, other._optimized = self._qweights, self._qparams, self._optimized
        other._rtn_data = getattr(self, "_rtn_data", None)
        return other

    # --- data ----------------------------------------------------------------------------------
    def _data(self) -> _Data:
        c, src = self.config, self.source
        hold = c.split == "holdout"
        if src.name == "minilm" and src.tokenizer is not None:
            from qgraph.data.text import calibration_plays, sentences
            from qgraph.models.minilm import encode

            def enc(texts: list[str]) -> tuple:
                e = encode(texts, src.tokenizer, max_length=64)
                return e["input_ids"], e["attention_mask"]

            ev = eval_sentences(c.split, c.n_eval, c.eval_seed)
            sens = sentences(calibration_plays(), c.n_sens, seed=c.eval_seed + 100)
            return _Data([enc(ev[i:i + 32]) for i in range(0, len(ev), 32)], [enc(sens)],
                         list(src.calibration or [])[: c.n_calib])
        if src.name == "smollm2" and src.tokenizer is not None:
            from qgraph.data.text import load_play
            from qgraph.models.smollm2 import token_windows

            play = eval_plays(c.split)[0]
            rows = token_windows(src.tokenizer, load_play(play), 128, c.n_eval)
            if rows.shape[0] < c.n_eval:
                raise SearchError(f"{play} holds {rows.shape[0]} windows of 128 tokens; ask for at most that many")
            sens = token_windows(src.tokenizer, load_play(sensitivity_play()), 64, 1)
            return _Data([(rows[i:i + 1],) for i in range(rows.shape[0])], [(sens,)],
                         list(src.calibration or [])[: c.n_calib])
        if hold:
            raise SearchError(f"held-out scoring needs data no search step reads; only the bundled text models "
                              f"(minilm, smollm2) define such a split, model {c.model} does not")
        batches = list(src.calibration or [])[: max(c.n_eval, 1)] or [tuple(src.example_inputs)]
        return _Data(batches, batches[:1], batches[: c.n_calib])

    # --- scoring -------------------------------------------------------------------------------
    def _score(self, outputs: list[torch.Tensor]) -> float:
        """Mean cosine of the outputs' rows to the float outputs (perplexity is scored in `score_graph`)."""
        return float(torch.cat([cosine_rows(o, r) for o, r in zip(outputs, self.reference)]).mean())

    def score_graph(self, graph: Any) -> float:
        with torch.no_grad():
            if self.metric.name == "perplexity":  # streamed: one window's logits alive at a time
                nll, count = 0.0, 0
                for b in self.data.eval_batches:
                    logits, ids = _first_tensor(graph.gm(*b)), b[0]
                    logits = logits.reshape(-1, *logits.shape[-2:])
                    nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                                 ids[:, 1:].reshape(-1), reduction="sum"))
                    count += ids[:, 1:].numel()
                return math.exp(nll / max(count, 1))
            outs = [_first_tensor(graph.gm(*b)) for b in self.data.eval_batches]
        return self._score(outs)

    def loss(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Differentiable distance to the float output, zero at the float weights (for sensitivity)."""
        if self.metric.name == "perplexity":
            return F.kl_div(F.log_softmax(out.float(), -1), F.log_softmax(ref.float(), -1), log_target=True,
                            reduction="batchmean") / max(out.shape[-2] if out.dim() > 2 else 1, 1)
        d = ref.shape[-1]
        return (1 - F.cosine_similarity(out.reshape(-1, d), ref.reshape(-1, d), dim=-1, eps=1e-12)).mean()

    # --- memoized quantization -------------------------------------------------------------------
    def qweight(self, node_name: str, spec: Any, optimizer: str = "rtn") -> Any:
        """The quantized weight of a node under a spec, computed once per process; ``optimizer`` ``gptq`` /
        ``aespa``: that optimizer's result (see `qgraph.search.optimized`)."""
        from qgraph.passes.quantize_weights import quantize_tensor

        key = (node_name, str(spec), optimizer)
        if key not in self._qweights:
            if optimizer != "rtn":
                self._qweights[key] = self.optimized.weight(node_name, spec, optimizer)
                return self._qweights[key]
            if self._activation_importance(node_name, spec):
                # quantize-weights fits weighted BCQ of Linears with E[x²] importance from the calibration data
                self._qweights[key] = self.rtn_with_data.weight(node_name, spec, "rtn")
                return self._qweights[key]
            w = self.graph.param(self.graph.find(node_name), "weight").detach()
            path = self._qweight_path(node_name, spec, w)
            q = _load_qweight(path) if path is not None else None
            if q is None:
                q = quantize_tensor(w, spec)
                if path is not None:
                    _save_qweight(path, q)
            self._qweights[key] = q
        return self._qweights[key]

    @property
    def optimized(self) -> Any:
        """The shared `OptimizedWeights` of this model (built on first use)."""
        from qgraph.search.optimized import OptimizedWeights

        if self._optimized is None:
            calib = list(self.source.calibration or [tuple(self.source.example_inputs)])[: self.config.n_opt_calib]
            if not calib:
                raise CalibrationError(f"GPTQ / aespa choices need calibration data, and model {self.config.model} "
                                       "has none")

            def load(node: str, spec: Any, extra: str) -> Any:
                return _load_qweight(self._qweight_path(node, spec, self._weight_of(node), extra, optimized_dir()))

            def save(node: str, spec: Any, extra: str, q: Any) -> None:
                _save_qweight(self._qweight_path(node, spec, self._weight_of(node), extra, optimized_dir()), q)

            self._optimized = OptimizedWeights(self.graph, self.target, calib, self.optimized_nodes, load, save,
                                               progress=self.progress)
        return self._optimized

    progress: Callable[[str], None] | None = None

    def _activation_importance(self, node_name: str, spec: Any) -> bool:
        if spec.scheme != "bcq" or spec.bcq_method != "weighted" or not self.data.calib_batches:
            return False
        return node_name in self.optimized_nodes("rtn", spec)

    @property
    def rtn_with_data(self) -> Any:
        """Round-to-nearest weights as quantize-weights makes them with this workbench's calibration batches
        (weighted BCQ reads activation statistics), one run per spec, kept in ``config.qweight_dir``."""
        from qgraph.search.optimized import OptimizedWeights

        if getattr(self, "_rtn_data", None) is None:
            def load(node: str, spec: Any, extra: str) -> Any:
                path = self._qweight_path(node, spec, self._weight_of(node), extra)
                return None if path is None else _load_qweight(path)

            def save(node: str, spec: Any, extra: str, q: Any) -> None:
                path = self._qweight_path(node, spec, self._weight_of(node), extra)
                if path is not None:
                    _save_qweight(path, q)

            self._rtn_data = OptimizedWeights(self.graph, self.target, self.data.calib_batches, self.optimized_nodes,
                                              load, save, progress=self.progress)
        return self._rtn_data

    def _weight_of(self, node: str) -> torch.Tensor:
        return self.graph.param(self.graph.find(node), "weight").detach()

    def optimized_nodes(self, optimizer: str, spec: Any) -> dict[str, Any]:
        """Node name → spec of an optimizer's uniform run: every Linear with a float weight the spec fits (per
        row where its groups do not), except the ``keep_float`` ones."""
        import fnmatch

        from qgraph.errors import SpecError

        out = {}
        for n in self.graph.nodes():
            w = self.graph.param(n, "weight")
            if self.graph.op_type(n) not in ("Gemm", "MatMul") or w is None or not w.is_floating_point() \
                    or w.dim() != 2:
                continue
            if any(fnmatch.fnmatchcase(k, p) for k in (self.graph.qualname(n), self.graph.name(n))
                   for p in self.config.keep_float):
                continue
            s = spec
            try:
                s.check_tensor(tuple(w.shape))
            except SpecError:
                s = spec.replace(granularity="channel", group_size=None)
            if str(s) == str(spec):
                out[self.graph.name(n)] = s
        return out

    def _qweight_path(self, node_name: str, spec: Any, w: torch.Tensor, extra: str = "",
                      folder: Path | None = None) -> Path | None:
        """Where ``config.qweight_dir`` keeps a node's quantized weight: keyed by node, spec, the weight's
        bytes, ``QWEIGHT_VERSION`` and ``extra`` (an optimizer's key), so a changed model, quantizer or
        calibration never reads a stale file."""
        folder = folder or (Path(self.config.qweight_dir) if self.config.qweight_dir else None)
        if folder is None:
            return None
        h = hashlib.blake2b(w.contiguous().numpy().tobytes(), digest_size=16)
        h.update(f"|{node_name}|{spec}|{QWEIGHT_VERSION}|{extra}".encode())
        return folder / f"{h.hexdigest()}.safetensors"

    def qparams(self, node_name: str, spec: Any) -> tuple:
        """Activation qparams of input 0 of a node under a spec (observed on the float graph, which is what
        ``calibrate`` sees too: it runs before any fake-quant is inserted)."""
        key = (node_name, str(spec))
        if key not in self._qparams:
            self._calibrate(spec)
        return self._qparams[key]

    def _calibrate(self, spec: Any) -> None:
        from qgraph.context import PassContext
        from qgraph.ir.meta import QPARAMS_KEY
        from qgraph.pass_manager import PassManager
        from qgraph.quant.qspec import Annotation

        if not self.data.calib_batches:
            raise CalibrationError(f"strategies with quantized activations need calibration data, and model "
                                   f"{self.config.model} has none")
        g = fresh_copy(self.graph)
        names = []
        for n in g.nodes():
            g.meta(n).pop(ANNOTATION_KEY, None)
            if g.op_type(n) in ("Gemm", "MatMul", "Conv") and g.param(n, "weight") is not None:
                g.meta(n)[ANNOTATION_KEY] = Annotation(inputs={0: spec})
                names.append(g.name(n))
        g.properties.add("annotated")
        ctx = PassContext(target=self.target, config={"progress": False}, calibration=self.data.calib_batches)
        PassManager("calibrate").run(g, ctx)
        for n in g.nodes():
            if g.name(n) in names:
                self._qparams[(g.name(n), str(spec))] = g.meta(n)[QPARAMS_KEY]["input0"]

    # --- strategies ------------------------------------------------------------------------------
    def apply(self, strategy: Strategy, pipeline: str = TRIAL_PIPELINE) -> Any:
        """A fake-quant copy of the graph under ``strategy`` (quantized weights and qparams prefilled from
        the memos, so quantize-weights and calibration work are done once per (node, spec))."""
        from qgraph.context import PassContext
        from qgraph.ir.meta import QPARAMS_KEY, QWEIGHT_KEY
        from qgraph.pass_manager import PassManager

        g = fresh_copy(self.graph)
        anns = strategy.annotations
        for n in g.nodes():
            key = g.qualname(n) if g.qualname(n) in anns else g.name(n)
            ann = anns.get(key)
            if ann is None:
                continue
            if ann.weight is not None:
                g.meta(n)[QWEIGHT_KEY] = self.qweight(g.name(n), ann.weight, strategy.optimizers.get(key, "rtn"))
            if 0 in ann.inputs:
                g.meta(n).setdefault(QPARAMS_KEY, {})["input0"] = self.qparams(g.name(n), ann.inputs[0])
        ctx = PassContext(target=self.target, config={"progress": False, "strategy": strategy.config()})
        PassManager(pipeline).run(g, ctx)
        return g

    def evaluate(self, strategy: Strategy) -> dict[str, Any]:
        """Metric (and, when configured, measured host latency) of one strategy."""
        t0 = time.perf_counter()
        g = self.apply(strategy)
        value = self.score_graph(g)
        out: dict[str, Any] = {"metric": value, "base_metric": self.base_metric,
                               "drop": self.metric.drop(self.base_metric, value)}
        if self.config.measure_latency:
            out["measured_latency_us"] = self._measure(g)
        del g
        _collect()
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    def lowered_latency_us(self, strategy: Strategy, repeats: int = 5, bcq_mode: str = "exact") -> float:
        """Median µs of a strategy's model lowered to real kernels (the passes `qgraph.quantize` lowers with;
        BiQGEMM in ``bcq_mode``), on the example inputs, in this process's threads."""
        us = self._measure(self.apply(strategy), repeats, bcq_mode)
        _collect()
        return us

    def _measure(self, g: Any, repeats: int = 5, bcq_mode: str = "exact") -> float:
        from qgraph.api import LOWERING_PASSES
        from qgraph.context import PassContext
        from qgraph.pass_manager import PassManager
        from qgraph.registry import registered_passes

        mode_of = {"lower-bcq": f"lower-bcq{{mode={bcq_mode}}}", "lower-weight-only": f"lower-weight-only{{bcq_mode={bcq_mode}}}"}
        passes = [mode_of.get(p, p) for p in LOWERING_PASSES if p in registered_passes()] + ["dce"]
        PassManager(",".join(passes)).run(g, PassContext(target=self.target, config={"progress": False}))
        x = self.graph.example_inputs
        times = []
        with torch.no_grad():
            g.gm(*x)
            for _ in range(repeats):
                t = time.perf_counter()
                g.gm(*x)
                times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)


def _collect() -> None:
    """Free dropped graph copies now: an fx graph is a reference cycle (nodes <-> graph), which only the cyclic
    collector frees, and it runs by object counts, not bytes, so scored copies of the float model piled up."""
    import gc

    gc.collect()
