"""What a trial measures: ``cosine`` (mean cosine of output rows to fp32; MiniLM embeddings) and ``perplexity``
(next-token perplexity on held-out windows; SmolLM2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qgraph.search.space import SearchError


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool

    def error(self, value: float) -> float:
        """The quantity a search minimises (1 − cosine, or perplexity)."""
        return 1.0 - value if self.higher_is_better else value

    def drop(self, base: float, value: float) -> float:
        """How much worse than float (>= 0 means worse)."""
        return base - value if self.higher_is_better else value - base


METRICS = {"cosine": Metric("cosine", True), "perplexity": Metric("perplexity", False)}


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise SearchError(f"the model output ({type(out).__name__}) holds no tensor to score")


def cosine_rows(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows (last dimension) of two outputs."""
    d = ref.shape[-1] if ref.dim() else 1
    return F.cosine_similarity(out.reshape(-1, d).double(), ref.reshape(-1, d).double(), dim=-1, eps=1e-12)


def perplexity_of(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1))
    return float(torch.exp(nll))
