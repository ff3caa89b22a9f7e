"""aespa: attention-aware quantization of the query / key / value projections, GPTQ for every other Linear.

The math is in `qgraph.quant.aespa`. This pass finds each attention of the graph — a
``scaled_dot_product_attention`` node, or ``matmul → softmax → matmul`` — and the Linear behind each of its
query, key and value inputs (walking back through reshapes, transposes, RoPE and grouped-head repeats, and
stopping at the first Linear on every path). Then:

1. Float statistics (one streaming run of the calibration batches through the float graph): per attention the
   value Hessian ``H_{V,g} = Σ (A_h X)ᵀ (A_h X)`` per key/value head, with the attention probabilities ``A``
   recomputed from the attention's own query / key / mask inputs (scaled_dot_product_attention) or taken from
   the softmax output. The first batch also checks that the value input really is the value Linear's output
   split into heads (``[B, L, H_kv·d] → [B, H, L, d]``); an attention that fails the check gets plain GPTQ
   (with a note in the report).
2. Quantization layer by layer like the ``gptq`` pass (sequential: the stacked calibration batch runs through
   the graph and each layer is quantized, from inputs produced by the already-quantized layers before it, just
   before it executes; or from float-model Hessians when the batches cannot be stacked). The query / key /
   value Linears of an attention (they must share one input) go together through `aespa_qkv`: GPTQ with the
   input Hessian for the query and key and with the per-head value Hessian for the value, then the learned
   rounding refinement on each one's aespa objective. Every other annotated Linear gets GPTQ; other annotated
   weights round-to-nearest. Results go to ``meta["qgraph.qweight"]`` as with ``gptq``.

Options: ``iters`` / ``lr`` / ``lam`` (AdaRound stage), ``descent_rounds`` (exact descent polish), ``refine_qk``
/ ``refine_v`` (turn the refinement off per side; GPTQ with the aespa Hessians stays), ``value_rows`` (query
positions per sequence sampled for the value Hessian; 0 = all), ``stat_batches`` (calibration batches for the
float statistics, default the first 4; None = all; the float-inputs mode uses all), and GPTQ's own knobs.

A graph without any attention raises `PipelineError` (use ``gptq``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from qgraph.errors import CalibrationError, PipelineError, QGraphError
from qgraph.ir.inputs import batches
from qgraph.ir.meta import ANNOTATION_KEY, QWEIGHT_KEY
from qgraph.pass_base import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Pass, PassResult, optional, validate
from qgraph.passes._reconstruction import round_rest
from qgraph.progress import progress
from qgraph.quant.aespa import RefineConfig, ValueHessian, aespa_qkv, attention_probs, query_rows
from qgraph.quant.gptq import GPTQOptions, GPTQResult, HessianAccumulator, gptq
from qgraph.quant.gptq_graph import (
    group_by_input,
    layer_row,
    quantize_in_sequence,
    select_layers,
    stack_batches,
)
from qgraph.registry import register_pass

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _Finished(Exception):
    pass


@dataclass
class Attention:
    """One attention found in the graph: ``node`` (the scaled_dot_product_attention, or the second matmul of
    ``matmul → softmax → matmul``), its Linears, and the graph inputs to tap (``taps``: role → (node, index))."""

    node: object
    kind: str
    q: object
    k: object
    v: object
    taps: dict = field(default_factory=dict)
    is_causal: bool = False
    scale: float | None = None


def find_attentions(graph) -> list[Attention]:
    """Every attention whose query, key and value each come from exactly one Linear (walking back)."""
    found = []
    for node in graph.nodes():
        op = graph.op_type(node)
        target = str(getattr(node, "target", ""))
        if op == "Attention" or "scaled_dot_product_attention" in target:
            att = _sdpa(graph, node)
        elif op == "Softmax" or "softmax" in target:
            att = _softmax_pattern(graph, node)
        else:
            continue
        if att is not None:
            found.append(att)
    return found


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _input_index(graph, node, value) -> int:
    return graph.inputs(node).index(value)


def _sdpa(graph, node) -> Attention | None:
    q, k, v = (_arg(node, i, _SDPA_ARGS[i]) for i in range(3))
    lin = [_linear_behind(graph, t) for t in (q, k, v)]
    if any(x is None for x in lin):
        return None
    att = Attention(node, "sdpa", *lin, is_causal=bool(_arg(node, 5, "is_causal", False)),
                    scale=_arg(node, 6, "scale", None))
    att.taps = {"q": (node, _input_index(graph, node, q)), "k": (node, _input_index(graph, node, k)),
                "v": (node, _input_index(graph, node, v))}
    mask = _arg(node, 3, "attn_mask")
    if mask is not None and hasattr(mask, "op"):
        att.taps["mask"] = (node, _input_index(graph, node, mask))
    return att


_PASS_THROUGH = ("Identity", "Dropout", "Cast", "aten::clone", "aten::contiguous", "aten::type_as")


def _softmax_pattern(graph, softmax) -> Attention | None:
    """``softmax`` feeding (maybe through dropout / casts) the first argument of a matmul, whose logits come
    (through scaling / masking) from a matmul of the query with the transposed key."""
    probs, second = softmax, None
    for _ in range(4):
        users = graph.users(probs)
        if len(users) != 1:
            return None
        u = users[0]
        if graph.op_type(u) == "MatMul":
            second = u
            break
        if graph.op_type(u) not in _PASS_THROUGH:
            return None
        probs = u
    if second is None or not second.args or second.args[0] is not probs or len(second.args) < 2:
        return None
    first, cur = None, graph.inputs(softmax)[0] if graph.inputs(softmax) else None
    for _ in range(6):
        if cur is None:
            return None
        if graph.op_type(cur) == "MatMul":
            first = cur
            break
        ins = [a for a in graph.inputs(cur) if graph.op_type(a) not in ("Constant",)]
        # scaling / masking: follow the tensor input that carries the logits (the first one)
        cur = ins[0] if ins else None
    if first is None or len(first.args) < 2:
        return None
    lin = [_linear_behind(graph, first.args[0]), _linear_behind(graph, first.args[1]),
           _linear_behind(graph, second.args[1])]
    if any(x is None for x in lin):
        return None
    att = Attention(second, "softmax", *lin)
    att.taps = {"probs": (second, _input_index(graph, second, second.args[0])),
                "v": (second, _input_index(graph, second, second.args[1]))}
    return att


def _is_linear(graph, node) -> bool:
    return graph.is_linear(node)


def _linear_behind(graph, value, limit: int = 64):
    """The single Linear reached walking back from ``value`` (stopping at Linears), or None."""
    if not hasattr(value, "op"):
        return None
    seen, found, todo = set(), set(), deque([value])
    while todo and len(seen) < limit:
        n = todo.popleft()
        if n in seen:
            continue
        seen.add(n)
        if getattr(n, "op", None) == "placeholder":
            continue
        if _is_linear(graph, n):
            found.add(n)
            continue
        todo.extend(graph.inputs(n))
    return next(iter(found)) if len(found) == 1 else None


# --- the pass ----------------------------------------------------------------------------------------------
@register_pass("aespa", after=("annotate", "calibrate"), before=("quantize-weights", "insert-fq"),
               requires=("annotated",), ensures=("weights-quantized",))
class AespaPass(Pass):
    """Attention-aware Q/K/V quantization (aespa) with GPTQ for the other Linears (uniform or BCQ specs)."""

    frontends = {"fx"}
    frontend_reason = "it finds attention blocks in torch.fx graphs and learns their rounding through torch"

    @dataclass(frozen=True)
    class Options(GPTQOptions):
        """aespa's own knobs; GPTQ's (``block``, ``damp``, ...) are those of `GPTQOptions`, validated there."""

        iters: int = 50
        lr: float = 0.05
        lam: float = 3.0
        descent_rounds: int = 20
        refine_qk: bool = True
        refine_v: bool = True
        value_rows: int = 128
        stat_batches: int | None = 4

        def __post_init__(self):
            super().__post_init__()
            validate(self, iters=NON_NEGATIVE, lr=POSITIVE, lam=NON_NEGATIVE, descent_rounds=NON_NEGATIVE,
                     value_rows=POSITIVE_INT, stat_batches=optional(POSITIVE_INT))

    def run(self, graph, ctx) -> PassResult:
        atts = find_attentions(graph)
        if not atts:
            raise PipelineError("aespa found no attention in the graph (no scaled_dot_product_attention and no "
                                "matmul -> softmax -> matmul with a Linear behind its query, key and value); "
                                "use the gptq pass for this model")
        todo, rest, notes = select_layers(graph)
        layers = ctx.report.setdefault("layers", [])
        n_aespa = 0
        if todo:
            if ctx.calibration is None:
                raise CalibrationError("aespa needs calibration data: pass calib=[batch, ...] to qgraph.quantize "
                                       "(or set PassContext.calibration)")
            data = list(batches(ctx.calibration, graph, self.options.max_batches))
            if not data:
                raise CalibrationError("calibration data is empty: give at least one batch")
            specs = dict(todo)
            groups = group_by_input(graph, todo)
            stacked = stack_batches(data, graph) if self.options.sequential else None
            plan = self._plan(graph, atts, specs, groups, notes)
            mode = "sequential" if stacked is not None else "float-inputs"
            stats = self._float_stats(graph, plan, groups if stacked is None else None, data, ctx)
            bar = iter(progress(range(len(todo)), desc=f"aespa ({mode})", enabled=ctx.progress, unit="layer"))
            run = self._sequential if stacked is not None else self._from_float
            for node, res in run(graph, groups, specs, plan, stats, stacked, bar):
                w = graph.param(node, "weight")
                if isinstance(res, GPTQResult):
                    layers.append(layer_row(graph, node, res, w))
                else:
                    n_aespa += 1
                    layers.append(_aespa_row(graph, node, res, w))
        round_rest(graph, rest, layers)
        if notes:
            ctx.report.setdefault("aespa", {})["notes"] = notes
        out = {"attentions": len(atts), "aespa": n_aespa, "gptq": len(todo) - n_aespa, "rtn": len(rest)}
        if todo:
            out["mode"] = mode
        return PassResult(graph, modified=bool(todo or rest), preserved=frozenset({"*"}), stats=out)

    # --- which attentions take aespa ------------------------------------------------------------------
    def _plan(self, graph, atts, specs, groups, notes) -> dict[int, Attention]:
        """group index -> attention whose q/k/v make up (part of) that input group."""
        group_of = {id(n): i for i, nodes in enumerate(groups) for n, _ in nodes}
        plan = {}
        for att in atts:
            name = graph.qualname(att.node)
            lins = (att.q, att.k, att.v)
            if any(id(n) not in group_of for n in lins):
                notes.append(f"{name}: not all of its q/k/v Linears are annotated for GPTQ; they get plain gptq")
                continue
            gi = {group_of[id(n)] for n in lins}
            if len(gi) != 1:
                notes.append(f"{name}: q/k/v Linears do not share one input; they get plain gptq")
                continue
            if any(s.scheme == "uniform" and s.granularity == "tensor" for s in (specs[n] for n in lins)):
                notes.append(f"{name}: per-tensor weight specs cannot be split by head; q/k/v get plain gptq")
                continue
            plan[gi.pop()] = att
        return plan

    # --- pass 1: float statistics --------------------------------------------------------------------
    def _float_stats(self, graph, plan, hess_groups, data, ctx) -> dict:
        """Per planned attention: {"h_v": [H_kv, D, D], "heads": (H, H_kv)}; with ``hess_groups`` also the input
        Hessians of every group ("h_x": {group index: H})."""
        requests, roles = [], []
        for gi, att in plan.items():
            requests.append((att.v, 0))
            roles.append((gi, "x"))
            for role, tap in att.taps.items():
                requests.append(tap)
                roles.append((gi, role))
        if hess_groups is not None:
            for gi, nodes in enumerate(hess_groups):
                requests.append((nodes[0][0], 0))
                roles.append((gi, "hess"))
        pending: dict[int, dict] = {gi: {} for gi in plan}
        acc: dict[int, ValueHessian] = {}
        heads: dict[int, tuple[int, int]] = {}
        hess: dict[int, HessianAccumulator] = {}
        bad: dict[int, str] = {}
        need = {gi: {"x"} | set(att.taps) for gi, att in plan.items()}

        def on_value(i, t):
            gi, role = roles[i]
            if role == "hess":
                hess.setdefault(gi, HessianAccumulator(t.shape[-1])).add(t)
                return
            cur = pending[gi]
            cur[role] = t
            if set(cur) >= need[gi]:
                try:
                    if gi not in bad:
                        self._add_attention(graph, plan[gi], cur, acc, heads, gi)
                except QGraphError as e:
                    bad[gi] = str(e)
                pending[gi] = {}
                completed[0] += 1
                if hess_groups is None and completed[0] == len(plan):
                    raise _Finished

        completed = [0]
        n = 0
        sb = self.options.stat_batches
        use = data if hess_groups is not None or sb is None else data[:max(1, sb)]
        for batch in progress(use, desc="aespa statistics", enabled=ctx.progress, unit="batch"):
            completed[0] = 0
            try:  # sequential mode needs no Hessians here: stop each run after the last attention
                n += graph.collect(requests, [batch], on_value)
            except _Finished:
                n += 1
        if n == 0:
            raise CalibrationError("aespa: no calibration batch ran through the graph")
        stats = {}
        for gi, att in plan.items():
            if gi in bad or gi not in acc:
                why = bad.get(gi, "no calibration data reached it")
                ctx.report.setdefault("aespa", {}).setdefault("notes", []).append(
                    f"{graph.qualname(att.node)}: {why}; q/k/v get plain gptq")
                continue
            stats[gi] = {"h_v": acc[gi].value(), "heads": heads[gi]}
        if hess_groups is not None:
            stats["h_x"] = {gi: a.value() for gi, a in hess.items()}
        return stats

    def _add_attention(self, graph, att: Attention, cur: dict, acc: dict, heads: dict, gi: int) -> None:
        x = cur["x"]
        if x.dim() == 2:
            x = x.unsqueeze(0)
        v_in = cur["v"]
        if att.kind == "sdpa":
            rows = query_rows(cur["q"].shape[-2], self.options.value_rows)
            probs = attention_probs(cur["q"], cur["k"], cur.get("mask"), att.is_causal, att.scale, rows)
        else:
            probs = cur["probs"].to(torch.float32)
            rows = query_rows(probs.shape[-2], self.options.value_rows)
            probs = probs if rows is None else probs[..., rows, :]
        if probs.dim() != 4 or v_in.dim() != 4:
            raise PipelineError(f"attention tensors of unexpected rank (probs {tuple(probs.shape)}, value "
                                f"{tuple(v_in.shape)}): expected [batch, heads, seq, ...]")
        n_heads, d = probs.shape[1], v_in.shape[-1]
        wv = graph.param(att.v, "weight").detach()
        wq = graph.param(att.q, "weight")
        n_kv = wv.shape[0] // d
        if wv.shape[0] % d or n_kv == 0 or n_heads % n_kv or wq.shape[0] != n_heads * d:
            raise PipelineError(f"heads do not divide the projections (value {tuple(wv.shape)}, query "
                                f"{tuple(wq.shape)}, {n_heads} heads of {d})")
        if gi not in acc:  # first batch: the value input must be the value Linear's output split into heads
            b, seq = x.shape[0], x.shape[1]
            bias = graph.param(att.v, "bias")
            y = x.to(torch.float32) @ wv.to(torch.float32).T + (0 if bias is None else bias.detach())
            y = y.reshape(b, seq, n_kv, d).transpose(1, 2)
            if v_in.shape[1] != n_kv:
                y = y.repeat_interleave(v_in.shape[1] // n_kv, dim=1)
            if tuple(y.shape) != tuple(v_in.shape) or not torch.allclose(y, v_in.to(torch.float32), rtol=1e-3,
                                                                        atol=1e-3 * float(y.abs().max()) + 1e-6):
                raise PipelineError("the value input is not the value Linear's output split into heads")
            acc[gi] = ValueHessian(x.shape[-1], n_kv)
            heads[gi] = (n_heads, n_kv)
        acc[gi].add(x, probs)

    # --- pass 2 ------------------------------------------------------------------------------------------
    def _cfg(self) -> RefineConfig:
        o = self.options
        return RefineConfig(iters=o.iters, lr=o.lr, lam=o.lam, descent_rounds=o.descent_rounds)

    def _quantize_group(self, graph, gi, nodes, specs, plan, stats, h, weight):
        """Quantize the nodes of one input group; yields (node, result)."""
        att = plan.get(gi) if gi in stats else None
        handled = set()
        if att is not None:
            n_heads, n_kv = stats[gi]["heads"]
            lins = (att.q, att.k, att.v)
            o = self.options
            kw = o.gptq_kwargs(specs[att.q])
            res = aespa_qkv(*(weight(n) for n in lins), h, stats[gi]["h_v"], tuple(specs[n] for n in lins),
                            n_heads, n_kv, self._cfg(), refine=(o.refine_qk, o.refine_qk, o.refine_v), **kw)
            for n, key in zip(lins, "qkv"):
                handled.add(id(n))
                yield n, res[key]
        for node, spec in nodes:
            if id(node) not in handled:
                yield node, gptq(weight(node), h, spec, **self.options.gptq_kwargs(spec))

    def _sequential(self, graph, groups, specs, plan, stats, stacked, bar):
        def quantize_group(i, h, weight):
            return self._quantize_group(graph, i, groups[i], specs, plan, stats, h, weight)

        return quantize_in_sequence(graph, groups, stacked, quantize_group, bar, "aespa")

    def _from_float(self, graph, groups, specs, plan, stats, _stacked, bar):
        results = []
        for gi, nodes in enumerate(groups):
            if gi not in stats["h_x"]:
                raise CalibrationError(f"aespa: no calibration data reached {graph.qualname(nodes[0][0])}")
            h = stats["h_x"].pop(gi)
            for node, res in self._quantize_group(graph, gi, nodes, specs, plan, stats, h,
                                                  lambda n: graph.param(n, "weight").detach()):
                graph.meta(node)[QWEIGHT_KEY] = res.qweight
                results.append((node, res))
                next(bar, None)
        return results


def _aespa_row(graph, node, res, w) -> dict:
    w = w.detach()
    rel = float((res.w_hat.reshape(w.shape) - w).norm() / w.norm().clamp_min(1e-30))
    return {"node": graph.qualname(node), "op": graph.op_type(node),
            "spec": str(graph.meta(node)[ANNOTATION_KEY].weight), "method": "aespa", "rel_weight_err": rel,
            "aespa_loss_gptq": res.gptq_loss, "aespa_loss": res.loss,
            "heads_refined": f"{res.blocks_improved}/{res.blocks}", "fp32_bytes": w.numel() * 4,
            "bytes": int(res.qweight.nbytes)}
