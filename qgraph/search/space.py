"""The search space: per quantizable node, the quantization choices the target can run, plus the ties
between nodes that must agree.

Quantizable nodes follow annotate's rules: Gemm / MatMul / Conv with a constant floating-point weight,
and (optionally searched) Gather embeddings. Per node the candidates are float, int8 (weight-only and
with int8 activations), int4 (per group and per channel), BCQ q=1..4 (per group) — each kept only when
``Target.check`` returns no reasons and the spec fits the weight's shape.

Ties: nodes reading the same activation tensor (e.g. the Q/K/V projections of one attention block)
share that tensor's quantization, so they must agree on their input-activation spec (all float, or all
the same spec). An assignment is a tuple of choice indices, one per layer.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qgraph.analyses.cost import weight_bytes
from qgraph.errors import QGraphError, SpecError
from qgraph.quant.qspec import Annotation, QSpec
from qgraph.search.strategy import Strategy, entry_text

LAYER_OPS = ("Gemm", "MatMul", "Conv")
FLOAT_BITS = 32

Assignment = tuple[int, ...]


class SearchError(QGraphError):
    """A search that cannot run as asked: empty space, constraints no strategy can meet, bad options."""


@dataclass(frozen=True)
class Choice:
    """One way to run a node: a weight spec (None: float weight) and an input-activation spec (None: float)."""

    weight: QSpec | None = None
    act: QSpec | None = None
    optimizer: str = "rtn"

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.act is None

    @property
    def bits(self) -> int:
        """Nominal weight bits (float: 32); BCQ q planes count q bits."""
        return FLOAT_BITS if self.weight is None else self.weight.bits

    @property
    def annotation(self) -> Annotation:
        if self.is_float:
            return Annotation(fallback_float=True)
        return Annotation(weight=self.weight, inputs={0: self.act} if self.act is not None else {})

    @property
    def label(self) -> str:
        base = choice_label(self.weight, self.act)
        return base if self.optimizer == "rtn" else f"{self.optimizer}:{base}"

    @property
    def text(self) -> str:
        return entry_text(self.annotation, self.optimizer)


def choice_label(weight: QSpec | None, act: QSpec | None) -> str:
    """Short display name: ``fp32``, ``w8-ch``, ``w8-ch+a8``, ``w4-g128``, ``bcq3-g128``, ``w8-t-p2+a8``."""
    if weight is None:
        s = "fp32"
    else:
        gran = {"tensor": "-t", "channel": "-ch"}.get(weight.granularity, f"-g{weight.group_size}")
        if weight.scheme == "bcq":
            s = f"bcq{weight.bits}{gran}" + ("-z" if weight.bcq_offset else "")
        else:
            s = f"w{weight.bits}{gran}" + ("-p2" if weight.pow2_scale else "") + ("" if weight.symmetric else "-asym")
    if act is not None:
        s += f"+a{act.bits}"
    return s


@dataclass(frozen=True)
class Layer:
    """A quantizable node and its choices, sorted from most to fewest weight bits (then bytes)."""

    key: str
    node: str
    op: str
    shape: tuple[int, ...]
    choices: tuple[Choice, ...]
    input_name: str = ""
    searchable: bool = True
    follows: int | None = None  # index of the layer whose weight table this one reads (a tied table)

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def rows(self) -> int:
        return int(self.shape[0]) if self.shape else 1

    def bytes_of(self, c: int) -> int:
        return weight_bytes(self.numel, self.rows, self.choices[c].weight)

    def index(self, choice: Choice) -> int:
        return self.choices.index(choice)


@dataclass(frozen=True)
class Space:
    """Layers with their choices, for one target; ``ties`` lists layer-index groups that must agree on
    their activation spec."""

    target: str
    layers: tuple[Layer, ...]
    ties: tuple[tuple[int, ...], ...] = ()
    _bytes: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise SearchError("the model has no quantizable node (Gemm/MatMul/Conv with a constant weight, or "
                              "Gather); nothing to search")
        for i, layer in enumerate(self.layers):
            f = layer.follows
            if f is not None and (not 0 <= f < len(self.layers) or self.layers[f].choices != layer.choices):
                raise SearchError(f"layer {layer.key} follows layer {f}, which does not offer the same choices")
        table = [[0 if layer.follows is not None else layer.bytes_of(c) for c in range(len(layer.choices))]
                 for layer in self.layers]  # a tied table is stored once: by the layer it follows
        object.__setattr__(self, "_bytes", table)

    # --- per-layer tables (for drivers) ---------------------------------------------------------
    @property
    def searchable(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.searchable and len(layer.choices) > 1]

    def bytes_table(self) -> list[list[int]]:
        return [list(r) for r in self._bytes]

    def bits_numel_table(self) -> list[list[float]]:
        """Per layer and choice, bits · numel of the layers counted in the average (others: 0)."""
        counted = set(self.counted_for_bits)
        return [[float(ch.bits * layer.numel) if i in counted else 0.0 for ch in layer.choices]
                for i, layer in enumerate(self.layers)]

    @property
    def counted_for_bits(self) -> list[int]:
        """Layers the average weight bits is taken over: the searched ones."""
        return [i for i, layer in enumerate(self.layers) if layer.searchable]

    # --- assignments -----------------------------------------------------------------------------
    def check_assignment(self, a: Sequence[int]) -> Assignment:
        a = tuple(int(x) for x in a)
        if len(a) != len(self.layers) or any(not 0 <= c < len(layer.choices) for c, layer in zip(a, self.layers)):
            raise SearchError(f"assignment {a} does not fit the space ({len(self.layers)} layers)")
        return a

    def strategy(self, a: Sequence[int]) -> Strategy:
        a = self.with_followers(self.check_assignment(a))
        chosen = [(layer.key, layer.choices[c]) for layer, c in zip(self.layers, a)]
        return Strategy({k: ch.annotation for k, ch in chosen}, self.target,
                        {k: ch.optimizer for k, ch in chosen if ch.optimizer != "rtn"})

    def assignment(self, strategy: Strategy) -> Assignment:
        """The assignment a strategy stands for; SearchError when it uses a choice outside the space."""
        out = []
        for layer in self.layers:
            ann = strategy.annotations.get(layer.key)
            if ann is None:
                raise SearchError(f"strategy has no entry for {layer.key}")
            text = entry_text(ann, strategy.optimizers.get(layer.key, "rtn"))
            idx = [c for c, ch in enumerate(layer.choices) if ch.text == text]
            if not idx:
                raise SearchError(f"strategy entry {layer.key} = {text!r} is not in the search space "
                                  f"(choices: {', '.join(ch.label for ch in layer.choices)})")
            out.append(idx[0])
        return tuple(out)

    def with_followers(self, a: Sequence[int]) -> Assignment:
        """``a`` with every tied-table layer at the choice of the layer it follows."""
        return tuple(a[layer.follows] if layer.follows is not None else c for layer, c in zip(self.layers, a))

    def weight_bytes(self, a: Sequence[int]) -> int:
        return int(sum(self._bytes[i][c] for i, c in enumerate(a)))

    def float_bytes(self) -> int:
        """Bytes of every chosen-for weight in fp32, a tied table once."""
        return sum(layer.numel * 4 for layer in self.layers if layer.follows is None)

    def avg_bits(self, a: Sequence[int]) -> float:
        """Nominal weight bits averaged over the searched layers, weighted by element count (float = 32)."""
        counted = self.counted_for_bits
        n = sum(self.layers[i].numel for i in counted)
        return sum(self.layers[i].choices[a[i]].bits * self.layers[i].numel for i in counted) / max(n, 1)

    def uniform(self, label: str, fallback: str = "nearest") -> Assignment:
        """Every searched layer at the choice called ``label`` (e.g. ``"bcq3-g128"``); a layer without it gets
        the choice nearest in bits (``fallback="nearest"``) or float (``"float"``)."""
        out = []
        found = False
        for layer in self.layers:
            labels = [ch.label for ch in layer.choices]
            if label in labels:
                out.append(labels.index(label))
                found = True
            elif not layer.searchable or fallback == "float":
                out.append(self.float_index(layer) if layer.searchable else 0)
            else:
                bits = _label_bits(label)
                out.append(min(range(len(layer.choices)), key=lambda c: (abs(layer.choices[c].bits - bits),
                                                                            -layer.choices[c].bits)))
        if not found:
            raise SearchError(f"no layer offers choice {label!r}; labels in this space: {', '.join(self.labels())}")
        return self.repair_ties(tuple(out))

    def labels(self) -> list[str]:
        seen: dict[str, None] = {}
        for layer in self.layers:
            for ch in layer.choices:
                seen.setdefault(ch.label)
        return list(seen)

    @staticmethod
    def float_index(layer: Layer) -> int:
        return next(c for c, ch in enumerate(layer.choices) if ch.is_float)

    def high(self) -> Assignment:
        """Every searched layer in float (fixed layers at their only choice)."""
        return tuple(self.float_index(layer) if layer.searchable else 0 for layer in self.layers)

    def low(self) -> Assignment:
        """Every layer at its fewest bytes (ties repaired towards fewer bytes)."""
        a = tuple(min(range(len(layer.choices)), key=lambda c, i=i: (self._bytes[i][c], -c))
                  for i, layer in enumerate(self.layers))
        return self.repair_ties(a, prefer="small")

    # --- validity --------------------------------------------------------------------------------
    def ties_ok(self, a: Sequence[int]) -> bool:
        return all(len({self._act_key(i, a[i]) for i in group}) == 1 for group in self.ties)

    def _act_key(self, i: int, c: int) -> str:
        act = self.layers[i].choices[c].act
        return "" if act is None else str(act)

    def violations(self, a: Sequence[int], target: Any = None) -> list[str]:
        """Why an assignment is invalid: target rejections (when ``target`` is given) and broken ties."""
        out = []
        if target is not None:
            for layer, c in zip(self.layers, a):
                ch = layer.choices[c]
                if not ch.is_float:
                    out += [f"{layer.key}: {r}" for r in target.check(layer.op, ch.weight, ch.act)]
        for group in self.ties:
            if len({self._act_key(i, a[i]) for i in group}) != 1:
                out.append("nodes reading one tensor disagree on its activation spec: "
                           + ", ".join(self.layers[i].key for i in group))
        return out

    def repair_ties(self, a: Sequence[int], rng: np.random.Generator | None = None,
                    prefer: str = "majority") -> Assignment:
        """Make every tie group agree on one activation spec, moving as few bits as possible.

        The spec kept is the one carried by most weight elements of the group (``rng``: drawn in proportion
        to them; ``prefer="small"``: the one that gives the fewest bytes); each member that disagrees moves
        to its choice with that activation spec nearest in weight bits.
        """
        out = list(a)
        for group in self.ties:
            keys = {self._act_key(i, out[i]) for i in group}
            if len(keys) == 1:
                continue
            feasible = [k for k in sorted(keys) if all(
                any(self._act_key(i, c) == k for c in range(len(self.layers[i].choices))) for i in group)]
            if not feasible:
                feasible = [""]
            if prefer == "small":
                keep = min(feasible, key=lambda k: (sum(self._bytes[i][self._nearest(i, out[i], k)] for i in group), k))
            else:
                mass = [sum(self.layers[i].numel for i in group if self._act_key(i, out[i]) == k) for k in feasible]
                if rng is not None:
                    p = np.asarray(mass, dtype=float) + 1e-9
                    keep = feasible[int(rng.choice(len(feasible), p=p / p.sum()))]
                else:
                    keep = max(zip(mass, [k == "" for k in feasible], feasible))[2]
            for i in group:
                if self._act_key(i, out[i]) != keep:
                    out[i] = self._nearest(i, out[i], keep)
        return tuple(out)

    def _nearest(self, i: int, c: int, act_key: str) -> int:
        layer = self.layers[i]
        if self._act_key(i, c) == act_key:
            return c
        bits = layer.choices[c].bits
        cands = [d for d in range(len(layer.choices)) if self._act_key(i, d) == act_key]
        return min(cands, key=lambda d: (abs(layer.choices[d].bits - bits), -layer.choices[d].bits, d))

    def describe(self) -> str:
        lines = [(f"search space for {self.target}: {len(self.layers)} nodes ({len(self.searchable)} searched), "
                  f"{len(self.ties)} tie groups")]
        for layer in self.layers:
            flag = "" if layer.searchable else " (fixed)"
            lines.append(f"  {layer.key} [{layer.op} {list(layer.shape)}]{flag}: "
                         + ", ".join(ch.label for ch in layer.choices))
        return "\n".join(lines)


def _label_bits(label: str) -> int:
    digits = "".join(ch for ch in label.split("-")[0] if ch.isdigit())
    return int(digits) if digits else FLOAT_BITS


# --- building ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpaceOptions:
    """What to offer per node. ``act``: also offer int activations where a kernel takes them;
    ``embeddings``: search Gather nodes too (else they are fixed at the target's embedding default, or
    float when the target cannot run it); ``keep_float``: shell patterns (fnmatch) of node keys kept in
    float and left out of the search and of the average bits (e.g. ``("lm.lm_head",)``); ``optimizers``:
    weight optimizers offered besides round-to-nearest on Linear nodes: ``gptq`` / ``aespa`` with every
    weight-only spec (BCQ fitted by the alternating method, which they weigh by the Hessian), or
    ``gptq:<label>`` with the one spec of that round-to-nearest label (e.g. ``aespa:bcq3-g64``)."""

    uniform_bits: tuple[int, ...] = (8, 4)
    uniform_group_sizes: tuple[int, ...] = (128,)
    bcq_bits: tuple[int, ...] = (1, 2, 3, 4)
    bcq_group_sizes: tuple[int, ...] = (128,)
    bcq_method: str = "weighted"
    act: bool = True
    embeddings: bool = False
    embedding_bits: tuple[int, ...] = (8, 4)
    keep_float: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [o for o in self.optimizers if o.partition(":")[0] not in ("gptq", "aespa")]
        if bad:
            raise SearchError(f"SpaceOptions.optimizers: unknown optimizer(s) {bad}; use gptq and/or aespa, "
                              "optionally as 'gptq:<label>' (round-to-nearest is always offered)")


def candidate_weight_specs(target: Any, opts: SpaceOptions) -> list[QSpec]:
    """Weight specs worth offering on ``target`` (before per-node checks)."""
    u = target.uniform
    sym = True in u.weight_symmetric
    pow2 = u.pow2_scales == "required"
    specs: list[QSpec] = []

    def add(**kw: Any) -> None:
        try:
            specs.append(QSpec.uniform(symmetric=sym, pow2_scale=pow2, **kw))
        except SpecError:
            pass

    for bits in opts.uniform_bits:
        grans = []
        if bits < 8 and "group" in u.weight_granularities:
            grans += [("group", g) for g in opts.uniform_group_sizes if g in u.group_sizes]
        for gran in ("channel", "tensor"):
            if gran in u.weight_granularities:
                grans.append((gran, None))
                break
        for gran, gs in grans:
            add(bits=bits, granularity=gran, group_size=gs)
    if target.bcq is not None:
        for q in opts.bcq_bits:
            for gs in opts.bcq_group_sizes:
                if "group" in target.bcq.granularities and gs in target.bcq.group_sizes:
                    specs.append(QSpec.bcq(q, group_size=gs, method=opts.bcq_method))
    return specs


def activation_spec(target: Any) -> QSpec | None:
    act = target.defaults.activation
    if act is None:
        return None
    if target.uniform.pow2_scales == "required" and not act.pow2_scale:
        act = act.replace(pow2_scale=True)
    return act


def layer_choices(target: Any, op: str, shape: tuple[int, ...], weights: Iterable[QSpec],
                  act: QSpec | None) -> tuple[Choice, ...]:
    """Float plus every (weight, act) pair the target runs and the weight's shape admits, most bits first."""
    out = [Choice()]
    weights = list(weights)
    row_len = int(math.prod(shape[1:])) if len(shape) > 1 else 1
    for w in weights:
        try:
            w.check_tensor(shape)
        except SpecError:
            if w.granularity != "group":
                continue
            w = w.replace(granularity="channel", group_size=None)  # as annotate does: per row instead
        if w.granularity == "group" and w.group_size >= row_len and \
                w.replace(granularity="channel", group_size=None) in weights:
            continue  # one group per row is the per-channel spec, offered already
        for a in (None, act) if act is not None else (None,):
            if not target.check(op, w, a):
                out.append(Choice(w, a))
    numel, rows = int(math.prod(shape)), int(shape[0])
    uniq = list(dict.fromkeys(out))
    return tuple(sorted(uniq, key=lambda ch: (-ch.bits, -weight_bytes(numel, rows, ch.weight), ch.act is not None,
                                              ch.label)))


def with_optimizers(choices: Sequence[Choice], optimizers: Sequence[str], numel: int, rows: int) -> tuple[Choice, ...]:
    """``choices`` plus, per weight-only quantized choice, the same spec fitted by each optimizer that offers it
    (see `SpaceOptions.optimizers`)."""
    out = list(choices)
    for ch in choices:
        if ch.weight is None or ch.act is not None:
            continue
        w = ch.weight.replace(bcq_method="alternating") if ch.weight.scheme == "bcq" else ch.weight
        for entry in optimizers:
            name, _, only = entry.partition(":")
            if not only or only == ch.label:
                out.append(Choice(w, None, name))
    uniq = list(dict.fromkeys(out))
    return tuple(sorted(uniq, key=lambda ch: (-ch.bits, -weight_bytes(numel, rows, ch.weight), ch.act is not None,
                                              ch.label)))


def build_space(graph: Any, target: Any, options: SpaceOptions | None = None) -> Space:
    """The search space of a (canonicalized) graph on ``target``."""
    opts = options or SpaceOptions()
    weights = candidate_weight_specs(target, opts)
    act = activation_spec(target) if opts.act else None
    found = []
    for node in graph.nodes():
        op = graph.op_type(node)
        if op not in LAYER_OPS and op != "Gather":
            continue
        w = graph.param(node, "weight")
        if w is None or not w.is_floating_point() or w.dim() < 2:
            continue
        found.append((node, op, tuple(int(s) for s in w.shape)))
    qualnames = [graph.qualname(n) for n, _, _ in found]
    owner: dict[int, int] = {}
    layers: list[Layer] = []
    for (node, op, shape), qn in zip(found, qualnames):
        tensor_id = id(graph.param(node, "weight"))
        if opts.embeddings and tensor_id in owner:  # a tied table (LM head = input embedding): one choice, stored once
            lead = layers[owner[tensor_id]]
            if lead.op == "Gather" and lead.searchable:
                choices = tuple(ch for ch in lead.choices if ch.is_float or not target.check(op, ch.weight, None))
                if choices == lead.choices:
                    key = qn if qualnames.count(qn) == 1 else graph.name(node)
                    layers.append(Layer(key, graph.name(node), op, shape, choices, "", searchable=False,
                                        follows=owner[tensor_id]))
                    continue
        owner.setdefault(tensor_id, len(layers))
        key = qn if qualnames.count(qn) == 1 else graph.name(node)
        producers = graph.inputs(node)
        input_name = graph.name(producers[0]) if producers else ""
        if op == "Gather":
            layers.append(_embedding_layer(target, opts, key, graph.name(node), shape, input_name))
            continue
        if any(fnmatch.fnmatchcase(key, pat) for pat in opts.keep_float):
            layers.append(Layer(key, graph.name(node), op, shape, (Choice(),), input_name, searchable=False))
            continue
        choices = layer_choices(target, op, shape, weights, act)
        if opts.optimizers and op in ("Gemm", "MatMul"):
            choices = with_optimizers(choices, opts.optimizers, numel=int(math.prod(shape)), rows=int(shape[0]))
        layers.append(Layer(key, graph.name(node), op, shape, choices, input_name, searchable=len(choices) > 1))
    return Space(target.name, tuple(layers), _ties(layers))


def _embedding_layer(target: Any, opts: SpaceOptions, key: str, node: str, shape: tuple[int, ...],
                     input_name: str) -> Layer:
    if opts.embeddings:
        specs = []
        for bits in opts.embedding_bits:
            try:
                specs.append(QSpec.uniform(bits, granularity="channel"))
            except SpecError:
                pass
        choices = layer_choices(target, "Gather", shape, specs, None)
        return Layer(key, node, "Gather", shape, choices, input_name, searchable=len(choices) > 1)
    default = target.defaults.embedding or QSpec.uniform(8, granularity="channel")
    ok = not target.check("Gather", default, None)
    return Layer(key, node, "Gather", shape, (Choice(default if ok else None),), input_name, searchable=False)


def _ties(layers: Sequence[Layer]) -> tuple[tuple[int, ...], ...]:
    groups: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        if layer.searchable and layer.input_name and any(ch.act is not None for ch in layer.choices):
            groups.setdefault(layer.input_name, []).append(i)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)
