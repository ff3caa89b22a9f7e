"""brecq: block-wise reconstruction (BRECQ) of annotated uniform weights with learned rounding.

Blocks come from the graph (`qgraph.analyses.blocks`): residual blocks (the span from a skip source to its
add: MobileNetV2 inverted residuals, BERT / Llama attention and MLP sub-blocks; ``merge=2`` joins pairs into
transformer layers), and, outside them, runs of layers cut into blocks of ``gap_layers`` layers (1: every such
layer on its own). Blocks go in execution order. For each block, the calibration data arrives through the
already-quantized prefix (weights learned so far, activations fake-quantized as insert-fq will), the targets are
the float model's block outputs, and the rounding variables of all the block's layers (rectified sigmoid,
annealed regulariser, as in AdaRound) are optimised jointly with Adam on the block-output error
``Σ (y − t)²`` summed over the output's feature dimension and averaged over samples and positions; each step
draws ``batch`` samples of one calibration batch (``batch=0``: whole batches). Then the rounding is made hard and
frozen and the quantized model moves on. A block with a single layer is reconstructed on that layer's output
exactly over all calibration rows (AdaRound with quantized inputs, `qgraph.passes.adaround`). With
``keep_best``, a block whose learned rounding does not beat round-to-nearest on its calibration outputs keeps
round-to-nearest.

Results go to ``meta["qgraph.qweight"]`` (`UniformWeight`, like quantize-weights); annotated weights that cannot
learn their rounding get round-to-nearest. torch graphs only (symbolic_trace / torch.export): the pass runs
blocks of the graph node by node with trainable weights, which the ONNX adapter cannot.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from qgraph.analyses.blocks import Block, find_blocks, gap_blocks, schedule
from qgraph.errors import CalibrationError, QGraphError
from qgraph.ir.fx_run import Lockstep
from qgraph.ir.meta import QWEIGHT_KEY
from qgraph.pass_base import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Pass, PassResult, optional, validate
from qgraph.passes import _reconstruction as rc
from qgraph.progress import progress
from qgraph.quant.adaround import LearnedRounding, optimize, relative
from qgraph.quant.uniform import one_thread
from qgraph.registry import register_pass


@register_pass("brecq", after=("annotate", "calibrate"), before=("quantize-weights", "insert-fq"),
               requires=("annotated",), ensures=("weights-quantized",))
class BRECQPass(Pass):
    """Learn the rounding of annotated Linear / Conv weights block by block (uniform specs)."""

    frontends = {"fx"}
    frontend_reason = "it learns rounding block by block by back-propagating through the graph's torch layers"

    @dataclass(frozen=True)
    class Options:
        iters: int = 500
        lr: float = 0.1
        reg: float = 3.0
        warmup: float = 0.2
        batch: int = 8
        merge: int = 1
        gap_layers: int = 1
        act_quant: bool = True
        clip_search: bool = False
        p: float = 2.4
        keep_best: bool = True
        max_rows: int = 65536
        max_batches: int | None = None
        seed: int = 0

        def __post_init__(self):
            validate(self, **rc.LEARNED_ROUNDING_RULES, batch=NON_NEGATIVE, merge=POSITIVE_INT, gap_layers=POSITIVE_INT,
                     p=POSITIVE, max_rows=NON_NEGATIVE, max_batches=optional(POSITIVE_INT))

    def run(self, graph, ctx) -> PassResult:
        o = self.options
        sel = rc.select(graph, "brecq")
        layers = ctx.report.setdefault("layers", [])
        rc.round_rest(graph, sel.rest, layers)
        notes = list(sel.notes)
        blocks_report = []
        if sel.targets:
            data = rc.calibration(ctx, graph, "brecq", o.max_batches)
            todo = {node: (spec, lop) for node, spec, lop in sel.targets}
            plan = gap_blocks(graph, schedule(graph, find_blocks(graph, o.merge)), lambda n: n in todo,
                              o.gap_layers)
            order = [n for item in plan for n in (item.nodes if isinstance(item, Block) else (item,))]
            fq = rc.fake_quant_inputs(graph, notes) if o.act_quant else {}
            ls = Lockstep(graph, data, quantized=True, order=order, weights=rc.quantized_weights(graph), fq=fq)
            units = [b for b in plan if isinstance(b, Block) and any(n in todo for n in b.nodes)]
            bar = progress(range(len(units)), desc="brecq", enabled=ctx.progress, unit="block")
            bar_it = iter(bar)
            gen = torch.Generator().manual_seed(o.seed)
            left = len(todo)
            try:
                for item in plan:
                    if left == 0:
                        break
                    if not isinstance(item, Block):
                        ls.step(item)
                        continue
                    mine = [(n, *todo[n]) for n in item.nodes if n in todo]
                    if not mine:
                        ls.step(item.nodes)
                        continue
                    left -= len(mine)
                    if len(mine) == 1 and len(item.nodes) > 0:
                        node, spec, lop = mine[0]
                        i = item.nodes.index(node)
                        ls.step(item.nodes[:i])
                        row = rc.learn_layer(graph, ls, node, spec, lop, fq.get(node, {}), notes, o)
                        row["block"] = f"{item.kind}:{graph.qualname(node)}"
                        layers.append(row)
                        ls.step(item.nodes[i + 1 :])
                    else:
                        rows, brow = self._block(graph, ls, item, mine, fq, gen, notes)
                        layers.extend(rows)
                        blocks_report.append(brow)
                    next(bar_it, None)
            except QGraphError:
                raise
            except Exception as e:
                raise CalibrationError(f"brecq: the calibration data does not run through the graph "
                                       f"({type(e).__name__}: {e})") from e
            finally:
                close = getattr(bar, "close", None)
                if close:
                    close()
        rep = ctx.report.setdefault("brecq", {})
        rep["blocks"] = blocks_report
        if notes:
            rep["notes"] = notes
        stats = {"brecq": len(sel.targets), "rtn": len(sel.rest), "blocks": len(blocks_report)}
        return PassResult(graph, modified=bool(sel.targets or sel.rest), preserved=frozenset({"*"}), stats=stats)

    # --- one block -------------------------------------------------------------------------------
    def _block(self, graph, ls: Lockstep, block: Block, mine: list, fq: dict, gen: torch.Generator,
               notes: list[str]) -> tuple[list[dict], dict]:
        t0 = time.perf_counter()
        ls.step_float(block.nodes)
        with one_thread():  # many small ops: see `one_thread`
            rows, brow = self._learn_block(graph, ls, block, mine, fq, gen, notes)
        ls.step_quant(block.nodes)
        brow["seconds"] = time.perf_counter() - t0
        return rows, brow

    def _learn_block(self, graph, ls: Lockstep, block: Block, mine: list, fq: dict, gen: torch.Generator,
                     notes: list[str]) -> tuple[list[dict], dict]:
        o = self.options
        ext = {p: ls.values(p, "quant") for p in block.inputs}
        outs = [n for n in block.outputs if _is_float_tensor(ls.float_envs[0][n])]
        targets = [ls.values(n, "float") for n in outs]
        if not outs:
            raise CalibrationError(f"brecq: block ending at {graph.qualname(block.exit)} has no tensor output")
        feature = 1 if any(graph.op_type(n) == "Conv" for n, *_ in mine) else -1
        rounders = {n: LearnedRounding(graph.param(n, "weight"), spec, clip_search=o.clip_search, p=o.p)
                    for n, spec, _ in mine}
        shapes = {n: graph.param(n, "weight").shape for n in rounders}
        fixed = {n: ls.weights[n] for n in block.nodes if n in ls.weights}
        sizes = [_batch_size(graph, block, ext, targets, b) for b in range(len(ls.float_envs))]
        sampled = o.batch > 0 and all(s is not None for s in sizes)

        def forward(b: int, idx: torch.Tensor | None, weights: dict) -> list[torch.Tensor]:
            env = {p: _take(graph, p, v[b], idx, sizes[b]) for p, v in ext.items()}
            ls.runner.run_nodes(block.nodes, env, weights={**fixed, **weights}, fq=fq)
            return [env[n] for n in outs]

        def error(b, idx, weights) -> torch.Tensor:
            ys = forward(b, idx, weights)
            total = 0.0
            for y, t in zip(ys, (tg[b] for tg in targets)):
                t = t if idx is None else t.index_select(0, idx)
                if y.shape != t.shape:
                    raise _ShapeMismatch(f"{tuple(y.shape)} vs {tuple(t.shape)}")
                d = (y - t).pow(2)
                positions = d.numel() // (d.shape[feature] if d.dim() > 1 else 1)
                total = total + d.sum() / max(1, positions)
            return total

        probs = torch.tensor([float(s or 1) for s in sizes], dtype=torch.float64)  # batches by sample count

        def soft() -> dict:
            return {n: r.soft().reshape(shapes[n]) for n, r in rounders.items()}

        def step_loss(t: int) -> torch.Tensor:
            b = int(torch.multinomial(probs, 1, generator=gen)) if len(sizes) > 1 else 0
            idx = None
            if sampled and sizes[b] > o.batch:
                idx = torch.randperm(sizes[b], generator=gen)[: o.batch].sort().values
            return error(b, idx, soft())

        if sampled:
            try:
                with torch.no_grad():
                    error(0, torch.arange(min(sizes[0], max(1, o.batch))), soft())
            except (_ShapeMismatch, RuntimeError, IndexError) as e:
                sampled = False
                notes.append(f"block {graph.qualname(block.exit)}: samples cannot be drawn from its inputs "
                             f"({type(e).__name__}: {e}); whole calibration batches per step")
        elif o.batch > 0:
            notes.append(f"block {graph.qualname(block.exit)}: no batch dimension found in its inputs; whole "
                         f"calibration batches per step")
        rtn = {n: r.rtn().reshape(shapes[n]) for n, r in rounders.items()}
        with torch.no_grad():
            errs_rtn = [float(error(b, None, rtn)) for b in range(len(sizes))]
        err_rtn = sum(errs_rtn)
        ref = err_rtn / len(errs_rtn)  # round-to-nearest's error per step, the loss's unit
        if ref > 0:
            with torch.enable_grad():
                optimize(list(rounders.values()), lambda t: step_loss(t) / ref, iters=o.iters, lr=o.lr, reg=o.reg,
                         warmup=o.warmup)
        hard = {n: r.hard().reshape(shapes[n]) for n, r in rounders.items()}
        with torch.no_grad():
            err = sum(float(error(b, None, hard)) for b in range(len(sizes)))
            energy = 0.0
            for b in range(len(sizes)):
                for tg in targets:
                    t = tg[b]
                    energy += float(t.pow(2).sum()) / max(1, t.numel() // (t.shape[feature] if t.dim() > 1 else 1))
        kept = o.keep_best and not err < err_rtn
        chosen = rtn if kept else hard
        rows = []
        name = graph.qualname(block.exit)
        for n, spec, _ in mine:
            r = rounders[n]
            graph.meta(n)[QWEIGHT_KEY] = r.qweight(rtn=kept)
            w = graph.param(n, "weight").detach()
            ls.weights[n] = chosen[n].to(w.dtype)
            codes = r.rtn_codes if kept else r.codes()
            rows.append({"node": graph.qualname(n), "op": graph.op_type(n), "spec": str(spec), "method": "brecq",
                         "block": f"{block.kind}:{name}",
                         "rel_weight_err": float((chosen[n] - w).norm() / w.norm().clamp_min(1e-30)),
                         "flipped": float((codes != r.rtn_codes).float().mean()), "kept_rtn": kept,
                         "fp32_bytes": w.numel() * 4, "bytes": int(r.qweight().nbytes)})
        brow = {"block": name, "kind": block.kind, "layers": len(mine), "nodes": len(block.nodes),
                "rtn_output_err": err_rtn, "output_err": err if not kept else err_rtn,
                "rel_rtn_output_err": relative(err_rtn, energy),
                "rel_output_err": relative(err_rtn if kept else err, energy), "learned_output_err": err,
                "kept_rtn": kept, "sampled": sampled}
        return rows, brow


class _ShapeMismatch(Exception):
    pass


def _is_float_tensor(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0


def _batch_major(node, v, n: int) -> bool:
    """Whether ``v`` (a value of ``node``, from a calibration batch of ``n`` samples) runs along the batch."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != n:
        return False
    val = node.meta.get("val") if node is not None else None
    if isinstance(val, torch.Tensor) and val.dim() > 0:
        return not isinstance(val.shape[0], int)  # torch.export: a symbolic (dynamic) batch dimension
    return True


def _batch_size(graph, block: Block, ext: dict, targets: list, b: int) -> int | None:
    """The sample count of calibration batch ``b`` if the block's inputs and outputs run along it."""
    firsts = [v[b] for v in ext.values() if isinstance(v[b], torch.Tensor) and v[b].dim() > 0]
    if not firsts:
        return None
    n = targets[0][b].shape[0] if targets and targets[0][b].dim() else None
    if n is None or not any(_batch_major(p, v[b], n) for p, v in ext.items()):
        return None
    return n


def _take(graph, node, v, idx: torch.Tensor | None, n: int | None):
    """The samples ``idx`` of a block input (all of it when not batch-major); never the stored tensor itself,
    which an in-place op of the block would change."""
    if idx is not None and n is not None and _batch_major(node, v, n):
        return v.index_select(0, idx)
    return v.clone() if isinstance(v, torch.Tensor) else v
