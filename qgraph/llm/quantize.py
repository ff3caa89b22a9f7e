"""Quantize a Hugging Face causal LM with qgraph's passes on its traced graph, then swap its modules.

`quantize_lm` traces ``CausalLMLogits(model)`` with ``torch.export`` (dynamic batch and sequence), annotates
every decoder Linear (and the LM head) with the recipe's weight spec, runs the recipe's optimizer pass
(``gptq`` / ``aespa``, or round-to-nearest) and ``quantize-weights``, and reads each node's quantized weight
back by its module path (node qualname ``lm.<module path>``). The result, `LMWeights`, is data: module path →
`BCQWeight` / `UniformWeight`, plus which embedding shares the head's table.

`apply_weights` then swaps modules the way torchao's ``quantize_`` does: each ``nn.Linear`` named there becomes
a `BCQLinear` (BiQGEMM; uniform codes in their exact BCQ form) and the input embedding a `BCQEmbedding`
(reading the tied head's packed buffers, so the table is held once). `simulate_weights` builds the
fake-quant reference: the float model with every quantized weight replaced by its dequantized value.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qgraph.errors import CalibrationError, ModelLoadError, QGraphError
from qgraph.llm.modules import BCQEmbedding, as_bcq, kernel_weight
from qgraph.llm.recipe import LMRecipe
from qgraph.quant.qspec import Annotation

PREFIX = "lm."


@dataclass
class LMWeights:
    """Quantized weights by module path; ``tied``: embedding path → head path whose table it reads."""

    weights: dict[str, Any]
    tied: dict[str, str] = field(default_factory=dict)
    recipe: LMRecipe | None = None
    seconds: float = 0.0

    def table_of(self, name: str):
        return self.weights[self.tied.get(name, name)]

    @property
    def nbytes(self) -> int:
        """Bytes of every stored quantized tensor, a tied table once."""
        return sum(int(q.nbytes) for q in self.weights.values())


def module_names(model: nn.Module) -> tuple[str, str, bool]:
    """(input embedding path, LM head path, tied) of a HF causal LM."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None:
        raise ModelLoadError(f"{type(model).__name__} has no input embedding / output head to quantize")
    names = {id(m): n for n, m in model.named_modules()}
    tied = getattr(emb, "weight", None) is not None and getattr(head, "weight", None) is emb.weight
    return names[id(emb)], names[id(head)], tied


def decoder_linears(model: nn.Module) -> list[str]:
    """Paths of every ``nn.Linear`` except the LM head."""
    _, head, _ = module_names(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]


def quantize_lm(model: nn.Module, recipe: LMRecipe, calibration: list[torch.Tensor] | None = None,
                *, progress: bool = False) -> LMWeights:
    """Quantized weights of ``model`` (left unchanged) under ``recipe``.

    ``calibration``: token-id rows ``[1, T]`` (or ``[B, T]``), needed by ``gptq`` / ``aespa``; they must all
    have the same length (the passes stack them into one batch)."""
    import time

    import qgraph.passes  # noqa: F401  (registers the passes)
    from qgraph.context import PassContext
    from qgraph.ir.trace import trace
    from qgraph.models.smollm2 import CausalLMLogits
    from qgraph.pass_manager import PassManager
    from qgraph.passes.quantize_weights import QWEIGHT_KEY

    t0 = time.perf_counter()
    if recipe.optimizer != "rtn" and not calibration:
        raise CalibrationError(f"optimizer {recipe.optimizer!r} needs calibration token rows")
    emb_name, head_name, tied = module_names(model)
    linears = set(decoder_linears(model))
    head_spec, spec = recipe.head_spec(), recipe.spec()
    head_rtn = head_spec is not None and (recipe.head_optimizer == "rtn" or recipe.optimizer == "rtn")
    rows = [c if c.dim() == 2 else c[None] for c in (calibration or [])]
    example = torch.cat(rows)[:2] if rows else torch.randint(0, model.config.vocab_size, (2, 16))
    dims = {"input_ids": {0: torch.export.Dim("batch", max=1024), 1: torch.export.Dim("seq", max=8192)}}
    graph = trace(CausalLMLogits(model).eval(), (example,), dynamic_shapes=dims)
    strategy: dict[str, Annotation] = {}
    found: dict[str, Any] = {}
    for node in graph.nodes():
        op, qual = graph.op_type(node), graph.qualname(node)
        name = qual[len(PREFIX):] if qual.startswith(PREFIX) else qual
        if op == "Gemm" and name in linears:
            strategy[qual] = Annotation(weight=spec)
            found[name] = node
        elif op == "Gemm" and name == head_name:
            strategy[qual] = Annotation(weight=head_spec) if head_spec is not None and not head_rtn \
                else Annotation(fallback_float=True)
            found[name] = node
        elif op == "Gather" and name == emb_name:
            strategy[qual] = Annotation(fallback_float=True)
            found[name] = node
    missing = sorted((linears | {head_name, emb_name}) - set(found))
    if missing:
        raise QGraphError(f"the traced graph has no node for module(s) {missing[:3]}; cannot place their weights")
    passes = ["annotate{act_bits=0}"] + [p for p in (recipe.optimizer_pass(),) if p] + ["quantize-weights"]
    ctx = PassContext(target="generic", config={"progress": progress, "strategy": strategy},
                      calibration=[(r,) for r in rows] if rows else None)
    graph = PassManager(",".join(passes)).run(graph, ctx).graph
    weights: dict[str, Any] = {}
    for name, node in found.items():
        q = graph.meta(node).get(QWEIGHT_KEY)
        if q is not None:
            weights[name] = q
    if head_spec is not None:
        from qgraph.passes.quantize_weights import quantize_tensor

        if head_rtn:
            weights[head_name] = quantize_tensor(model.get_output_embeddings().weight.detach(), head_spec)
        if not tied:
            weights[emb_name] = quantize_tensor(model.get_input_embeddings().weight.detach(), head_spec)
    out = LMWeights(weights, {emb_name: head_name} if tied and head_name in weights else {}, recipe)
    out.seconds = time.perf_counter() - t0
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def apply_weights(model: nn.Module, lw: LMWeights, *, mode: str = "exact", head_mode: str | None = None) -> nn.Module:
    """Swap ``model``'s modules (in place) for BiQGEMM ones holding ``lw``'s weights; returns ``model``.

    ``mode``: BiQGEMM ``exact`` (fp32 tables; the default: decode logits match the simulation to fp32
    rounding) or ``fast`` (int8 tables, one scale per 32 activations: ~1.4x faster kernels, but on SmolLM2 the
    decode logits drift 0.08-0.16 relative from the simulation, the table rounding of every layer compounding
    over 30 layers) for the decoder Linears; ``head_mode`` for the LM head (default: ``mode``)."""
    from qgraph.kernels.linear import BCQLinear

    emb_name, head_name, _ = module_names(model)
    for name, q in lw.weights.items():
        if name == emb_name and name not in lw.tied:
            _set_module(model, name, BCQEmbedding(as_bcq(q)))
            continue
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise QGraphError(f"module {name} is a {type(old).__name__}, not an nn.Linear")
        m = head_mode or mode if name == head_name else mode
        _set_module(model, name, BCQLinear.from_linear(old, kernel_weight(q), mode=m))
    for emb, head in lw.tied.items():
        _set_module(model, emb, BCQEmbedding(head=model.get_submodule(head)))
    if lw.tied and hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # nothing for HF to re-tie: both sides read one code
    return model


def simulate_weights(model: nn.Module, lw: LMWeights) -> nn.Module:
    """A copy of ``model`` whose quantized weights are replaced by their dequantized values (fake quant)."""
    sim = copy.deepcopy(model)
    with torch.no_grad():
        for name, q in lw.weights.items():
            mod = sim.get_submodule(name)
            mod.weight.copy_(q.dequantize().reshape(mod.weight.shape).to(mod.weight.dtype))
    return sim


def calibration_rows(tokenizer: Any, n: int, window: int) -> list[torch.Tensor]:
    """``n`` rows ``[1, window]`` of token ids from the calibration plays (never the evaluation play)."""
    from qgraph.data.text import calibration_plays, load_play
    from qgraph.models.smollm2 import token_windows

    out: list[torch.Tensor] = []
    for play in calibration_plays():
        ids = token_windows(tokenizer, load_play(play), window)
        out.extend(r[None] for r in ids[: n - len(out)])
        if len(out) == n:
            return out
    raise CalibrationError(f"the calibration plays hold fewer than {n} windows of {window} tokens")
