"""Data splits of the bundled text models: a search scores trials on ``split="search"`` data (MiniLM: sentences
of the evaluation plays but the last; SmolLM2: windows of the first evaluation play) and computes
sensitivities on other text (MiniLM: calibration plays; SmolLM2: the second evaluation play);
``split="holdout"`` scores on the last evaluation play, which no search step reads, for final numbers."""
from __future__ import annotations

from collections.abc import Sequence

from qgraph.search.space import SearchError

SPLITS = ("search", "holdout")


def eval_plays(split: str) -> tuple[str, ...]:
    """Plays trials are scored on (``search``: the evaluation plays but the last) or final numbers are
    (``holdout``: the last evaluation play, which no search step reads)."""
    from qgraph.data.text import evaluation_plays

    plays = evaluation_plays()
    if split not in SPLITS:
        raise SearchError(f"unknown data split {split!r}; use one of {', '.join(SPLITS)}")
    return plays[-1:] if split == "holdout" else plays[:-1]


def sensitivity_play() -> str:
    """The play SmolLM2's sensitivity window comes from: a search play other than the one trials read first."""
    return eval_plays("search")[-1]


def eval_sentences(split: str, n: int, seed: int) -> list[str]:
    """``n`` distinct sentences of the split's plays (MiniLM). Held-out ones also skip any sentence that
    occurs verbatim in a search play."""
    from qgraph.data.text import sentences

    plays = eval_plays(split)
    if split == "search":
        return sentences(plays, n, seed=seed)
    seen = set(_all_sentences(eval_plays("search")))
    out = [x for x in sentences(plays, len(_all_sentences(plays)), seed=seed) if x not in seen]
    if len(out) < n:
        raise SearchError(f"the held-out play(s) {', '.join(plays)} hold {len(out)} sentences; ask for at most that many")
    return out[:n]


def _all_sentences(plays: Sequence[str]) -> list[str]:
    from qgraph.data.text import _sentences_of, load_play

    return list(dict.fromkeys(x for p in plays for x in _sentences_of(load_play(p), 5)))
