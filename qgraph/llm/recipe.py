"""`LMRecipe`: how a causal LM is quantized (scheme, bits, groups, optimizer, LM head / embedding)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from qgraph.errors import SpecError
from qgraph.quant.qspec import QSpec

OPTIMIZERS = ("rtn", "gptq", "aespa")
SCHEMES = ("bcq", "uniform")


@dataclass(frozen=True)
class LMRecipe:
    """Weight-only quantization of a causal LM's decoder Linears, LM head and embedding.

    ``scheme``/``bits``/``group_size`` (None: one scale set per row): the decoder Linears' spec. ``offset``:
    BCQ's per-group offset z, or for uniform an asymmetric (zero-point) code; None picks the scheme's default
    (BCQ: no z; uniform: asymmetric). ``optimizer``: ``rtn`` (round to nearest; BCQ by the weighted
    alternating method, its importance E[x²] per input channel when `quantize_lm` gets calibration rows, else
    weight magnitude, which collapses SmolLM2 at 3 bits), ``gptq`` or ``aespa`` (both from calibration
    Hessians, act-order; BCQ with the
    Hessian diagonal as importance). ``head_bits``: bits of the LM head (and, tied or not, the embedding
    table); None: same as ``bits``; 0: keep both float. Default: uniform 4-bit asymmetric, groups of 64, by
    the recipe's optimizer. ``scale_bits`` (uniform only): block scales, ``w = d·c − m`` per group with ``d`` and
    ``m`` as ``scale_bits``-bit codes of two fp16 scales per row (`qgraph.quant.block_scaled`), for the Linears and a
    uniform head alike. ``head_scheme`` / ``head_group_size`` (0: per row):
    None means the same as the Linears'. ``head_optimizer``: ``rtn`` or ``same`` (the head also goes through
    ``optimizer``; a tied table then follows the head's objective). Measured on SmolLM2 with BCQ-3 g192 gptq
    Linears (perplexity, float head 56.5): head uniform 4-bit g64 by gptq 58.3 (16.4 MB), 8-bit per row 56.7
    (28.6 MB), 4-bit g64 round-to-nearest 67.0, BCQ-4 g192 by gptq 67.6, BCQ-4 g192 rtn 82.1, BCQ-3 385.
    ``calib_windows`` × ``window`` tokens of calibration text.
    """

    scheme: str = "bcq"
    bits: int = 3
    group_size: int | None = 192
    optimizer: str = "gptq"
    offset: bool | None = None
    head_bits: int | None = 4
    head_scheme: str | None = "uniform"
    head_group_size: int | None = 64
    head_optimizer: str = "same"
    calib_windows: int = 16
    window: int = 512
    scale_bits: int | None = None

    def __post_init__(self) -> None:
        if self.scale_bits is not None and self.scheme != "uniform":
            raise SpecError("LMRecipe.scale_bits applies to scheme='uniform' (block scales of uniform codes)")
        if self.scheme not in SCHEMES:
            raise SpecError(f"LMRecipe.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.optimizer not in OPTIMIZERS:
            raise SpecError(f"LMRecipe.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.head_scheme not in (None, *SCHEMES):
            raise SpecError(f"LMRecipe.head_scheme must be None or one of {SCHEMES}, got {self.head_scheme!r}")
        if self.head_optimizer not in ("rtn", "same"):
            raise SpecError(f"LMRecipe.head_optimizer must be 'rtn' or 'same', got {self.head_optimizer!r}")
        if self.calib_windows < 1 or self.window < 2:
            raise SpecError(f"LMRecipe needs calib_windows >= 1 and window >= 2, got {self.calib_windows}, "
                            f"{self.window}")
        self.spec()  # validates bits / group size
        self.head_spec()

    @property
    def has_offset(self) -> bool:
        return self.offset if self.offset is not None else self.scheme == "uniform"

    def spec(self, bits: int | None = None, *, optimized: bool | None = None, scheme: str | None = None,
             group_size: int | None = -1) -> QSpec:
        """The weight QSpec (default: the Linears'). ``optimized``: whether GPTQ/aespa fits it (BCQ then uses
        plain alternating BCQ, which those passes weigh by the Hessian); ``group_size`` None: per row."""
        bits = bits or self.bits
        scheme = scheme or self.scheme
        gs = self.group_size if group_size == -1 else group_size
        optimized = self.optimizer != "rtn" if optimized is None else optimized
        offset = self.offset if self.offset is not None and scheme == self.scheme else scheme == "uniform"
        gran = {"granularity": "group", "group_size": gs} if gs else {"granularity": "channel"}
        if scheme == "bcq":
            return QSpec.bcq(bits, group_size=gs, method="alternating" if optimized else "weighted",
                             bcq_offset=offset)
        if self.scale_bits is not None:
            if not gs:
                raise SpecError("LMRecipe.scale_bits needs groups (a group_size, and head_group_size for the head)")
            return QSpec.uniform(bits, signed=False, symmetric=False, scale_bits=self.scale_bits, **gran)
        return QSpec.uniform(bits, symmetric=not offset, **gran)

    def head_spec(self) -> QSpec | None:
        if self.head_bits == 0:
            return None
        gs = self.group_size if self.head_group_size is None else (self.head_group_size or None)
        return self.spec(self.head_bits or self.bits, scheme=self.head_scheme or self.scheme, group_size=gs,
                         optimized=self.head_optimizer == "same" and self.optimizer != "rtn")

    def optimizer_pass(self) -> str:
        """The pipeline text of the weight optimizer ('' for round-to-nearest)."""
        if self.optimizer == "rtn":
            return ""
        opts = "act_order=true" + (",bcq_importance=hessian" if self.scheme == "bcq" else "")
        return f"{self.optimizer}{{{opts}}}"

    @property
    def name(self) -> str:
        """A short label, e.g. ``bcq3-g192-gptq`` or ``int4-g64-aespa``."""
        kind = "bcq" if self.scheme == "bcq" else "int"
        z = "z" if self.scheme == "bcq" and self.has_offset else ""
        z += "sym" if self.scheme == "uniform" and not self.has_offset else ""
        g = f"g{self.group_size}" if self.group_size else "row"
        g += f"-sb{self.scale_bits}" if self.scale_bits is not None else ""
        head = ""
        if self.head_spec() != _DEFAULT_HEAD.head_spec() or self.head_optimizer != _DEFAULT_HEAD.head_optimizer:
            h = self.head_spec()
            head = "-head-float" if h is None else (
                f"-head-{'bcq' if h.scheme == 'bcq' else 'int'}{h.bits}-"
                f"{'g' + str(h.group_size) if h.group_size else 'row'}-{self.head_optimizer}")
        return f"{kind}{self.bits}{z}-{g}-{self.optimizer}{head}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMRecipe:
        if not isinstance(d, dict):
            raise SpecError(f"a recipe is a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"recipe has unknown field(s) {unknown}")
        return cls(**d)


_DEFAULT_HEAD = LMRecipe(optimizer="gptq")
