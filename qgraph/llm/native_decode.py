"""A Llama-family decode step in native code: `NativeDecoder` wraps ``torch.classes.qgraph.DecodePlan``
(``qgraph/kernels/csrc/decode_step.cpp``), built over a transformers model's own tensors.

One call per generated token runs every decoder layer (RMSNorm, q/k/v on BiQGEMM, rotary embedding, the new key
and value written into a transformers `StaticCache` in place, grouped one-query attention, o_proj, the SiLU-gated
MLP), the final norm, the LM head and the greedy argmax, on a process-wide thread team that splits every Linear's
rows and the attention. On SmolLM2-135M BCQ-3 the torch.compile'd step spent 3.1 ms of a 9.5 ms step in
Inductor's wrapper and dynamo's guards; this step has neither (3.3-4.1 ms a token on 2 cores).

`plan_for(model)` returns a `NativeDecoder`, or the reason the model does not qualify (the `Generator` then
decodes with ``generate()``): Llama, Mistral (without a sliding window) and Qwen2 layouts, float32, SiLU MLP,
every Linear a ``cpu-lut4`` `BCQLinear` (or a fused q/k/v or gate/up group of them) or a float ``nn.Linear``,
the embedding a `BCQEmbedding` or ``nn.Embedding``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qgraph.errors import KernelError
from qgraph.kernels import cpu
from qgraph.kernels.linear import BCQLinear

MODEL_TYPES = ("llama", "mistral", "qwen2")
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


class Unsupported(Exception):
    """Why a model cannot run on the native decode step."""


def _plan_class():
    from qgraph.kernels import native

    if not native.load():
        raise Unsupported(f"the native torch shim is unavailable ({native.status()['error']})")
    return torch.classes.qgraph.DecodePlan


class _Builder:
    def __init__(self, plan: Any) -> None:
        self.plan = plan
        self.ids: dict[int, int] = {}  # id(module) -> plan Linear index

    def linear(self, mod: nn.Module, name: str) -> int:
        from qgraph.llm.modules import FusedBCQLinear

        key = id(mod)
        if key in self.ids:
            return self.ids[key]
        if isinstance(mod, (BCQLinear, FusedBCQLinear)):
            if mod.layout not in (cpu.LAYOUT, cpu.LAYOUT_K):
                raise Unsupported(f"{name} is on BiQGEMM layout {mod.layout!r}, not {cpu.LAYOUT!r} / {cpu.LAYOUT_K!r}")
            if mod.alpha.device.type != "cpu":
                raise Unsupported(f"{name} is on {mod.alpha.device}")
            bias = None if mod.bias is None else mod.bias.detach().float().contiguous()
            idx = self.plan.add_bcq_linear(mod.packed, mod.alpha, mod.offset, bias, mod.out_features,
                                           mod.in_features, mod.group_size, mod.mode)
        elif type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.device.type == "cpu":
            bias = None if mod.bias is None else mod.bias.detach().contiguous()
            idx = self.plan.add_float_linear(mod.weight.detach().contiguous(), bias)
        else:
            raise Unsupported(f"{name} is a {type(mod).__name__} (need a cpu-lut4 BCQLinear or a float32 Linear)")
        self.ids[key] = idx
        return idx

    def group(self, parent: nn.Module, names: tuple[str, ...], prefix: str) -> list[int]:
        """Plan Linears whose outputs, concatenated, are the named members' outputs in order."""
        from qgraph.llm.modules import BCQSlice

        mods = [getattr(parent, n) for n in names]
        if all(isinstance(m, BCQSlice) for m in mods):
            fused = mods[0].fused
            if (all(m.fused is fused for m in mods) and [m.start for m in mods] == [0, *[m.stop for m in mods[:-1]]]
                    and mods[-1].stop == fused.out_features):
                return [self.linear(fused, f"{prefix}.{'/'.join(names)}")]
        out = []
        for n, m in zip(names, mods):
            if isinstance(m, BCQSlice):  # a member of a group fused differently: its own rows only
                raise Unsupported(f"{prefix}.{n} is a slice of a fused group this step cannot split")
            out.append(self.linear(m, f"{prefix}.{n}"))
        return out


def _check_layout(model: nn.Module) -> tuple[Any, Any]:
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in MODEL_TYPES:
        raise Unsupported(f"model_type {mtype!r} is not one of {MODEL_TYPES}")
    if getattr(cfg, "hidden_act", None) != "silu":
        raise Unsupported(f"hidden_act {getattr(cfg, 'hidden_act', None)!r} is not 'silu'")
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        raise Unsupported("pretraining_tp > 1")
    if mtype == "mistral" and getattr(cfg, "sliding_window", None):
        raise Unsupported("Mistral with a sliding window")
    if mtype == "qwen2" and getattr(cfg, "use_sliding_window", False):
        raise Unsupported("Qwen2 with a sliding window")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        raise Unsupported("not a <Model>ForCausalLM with model.layers, model.rotary_emb and lm_head")
    for i, layer in enumerate(layers):
        names = {n for n, _ in layer.named_children()}
        attn = {n for n, _ in layer.self_attn.named_children()} if hasattr(layer, "self_attn") else set()
        mlp = {n for n, _ in layer.mlp.named_children()} if hasattr(layer, "mlp") else set()
        if names != _LAYER_CHILDREN or attn != _ATTN_CHILDREN or mlp != _MLP_CHILDREN:
            raise Unsupported(f"layer {i} has modules {sorted(names | attn | mlp)}, not the Llama layout")
    return cfg, inner


def _eps(norm: nn.Module, name: str) -> float:
    w = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or w is None or w.dtype != torch.float32:  # variance_epsilon: transformers' RMSNorm modules
        raise Unsupported(f"{name} is not a float32 RMSNorm")
    return float(eps)


class NativeDecoder:
    """The native decode step of one model: ``bind(cache)`` once per static cache, then ``step(token, pos)``
    (the next greedy token) or ``logits(token, pos)`` per generated token."""

    def __init__(self, model: nn.Module) -> None:
        cfg, inner = _check_layout(model)
        layers = inner.layers
        attn0 = layers[0].self_attn
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        head_dim = getattr(attn0, "head_dim", None) or cfg.hidden_size // heads
        dims = [cfg.hidden_size, heads, kv_heads, head_dim, cfg.intermediate_size, cfg.vocab_size]
        eps = {_eps(m, n) for n, m in model.named_modules() if n.endswith("norm")}
        if len(eps) != 1:
            raise Unsupported(f"RMSNorm epsilons differ: {sorted(eps)}")
        plan = _plan_class()(dims, eps.pop(), float(attn0.scaling))
        b = _Builder(plan)
        for i, layer in enumerate(layers):
            p = f"model.layers.{i}"
            a, m = layer.self_attn, layer.mlp
            plan.add_layer(b.group(a, ("q_proj", "k_proj", "v_proj"), f"{p}.self_attn"),
                           b.linear(a.o_proj, f"{p}.self_attn.o_proj"),
                           b.group(m, ("gate_proj", "up_proj"), f"{p}.mlp"), b.linear(m.down_proj, f"{p}.mlp.down_proj"),
                           layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach())
        plan.set_head(b.linear(model.lm_head, "lm_head"), inner.norm.weight.detach())
        self._set_embedding(plan, inner.embed_tokens)
        self.plan, self.model, self.head_dim = plan, model, head_dim
        self.num_layers = len(layers)
        self._rope_len = 0
        self._cache: Any = None

    @staticmethod
    def _set_embedding(plan: Any, emb: nn.Module) -> None:
        from qgraph.llm.modules import BCQEmbedding

        if isinstance(emb, BCQEmbedding):
            if emb.layout not in (cpu.LAYOUT, cpu.LAYOUT_K, "planes"):
                raise Unsupported(f"embedding layout {emb.layout!r}")
            plan.set_embedding(emb.layout, emb.packed, emb.alpha, emb.offset, emb.group_size)
        elif type(emb) is nn.Embedding and emb.weight.dtype == torch.float32:
            plan.set_embedding("float", emb.weight.detach().contiguous(), None, None, 0)
        else:
            raise Unsupported(f"embedding is a {type(emb).__name__}")

    def _rope(self, positions: int) -> None:
        if positions <= self._rope_len:
            return
        rot = self.model.model.rotary_emb
        with torch.no_grad():
            x = torch.zeros(1, 1, self.head_dim)
            cos, sin = rot(x, torch.arange(positions)[None])
        self._cos, self._sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        self.plan.set_rope(self._cos, self._sin)
        self._rope_len = positions

    def bind(self, cache: Any) -> None:
        """Write keys and values into ``cache`` (a transformers `StaticCache` whose layers the prompt has filled)."""
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != self.num_layers:
            raise KernelError(f"the cache has {0 if layers is None else len(layers)} layers, the model "
                              f"{self.num_layers}")
        for i, layer in enumerate(layers):
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if k is None or v is None:
                raise KernelError("bind a StaticCache after the prompt ran (its tensors are allocated then)")
            self.plan.bind_cache(i, k, v)
        self._rope(int(layers[0].keys.shape[2]))
        self._cache = cache

    def suppress(self, ids) -> None:
        """Token ids `step` never returns (empty: none)."""
        self.plan.set_suppressed([int(i) for i in ids])

    def step(self, token: int, position: int) -> int:
        """The next greedy token after ``token`` at cache position ``position``."""
        try:
            return self.plan.step(int(token), int(position))
        except RuntimeError as e:
            raise KernelError(_first_line(e)) from None

    def logits(self, token: int, position: int) -> torch.Tensor:
        """The float32 logits [vocab] after ``token`` at ``position`` (the cache gets its key and value)."""
        try:
            return self.plan.logits(int(token), int(position))
        except RuntimeError as e:
            raise KernelError(_first_line(e)) from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def plan_for(model: nn.Module) -> NativeDecoder | str:
    """A `NativeDecoder` for ``model``, or a one-line reason it has none."""
    try:
        return NativeDecoder(model)
    except Unsupported as e:
        return str(e)
    except RuntimeError as e:  # the plan's own checks (a shape it cannot run)
        return f"the native step refused the model: {_first_line(e)}"
