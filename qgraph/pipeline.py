"""Textual pipelines: ``"fold-bn,annotate{bits=3,scheme=bcq},calibrate{method=percentile,p=99.9}"``.

Grammar::

    pipeline := item ("," item)*
    item     := NAME ["{" [option ("," option)*] "}"]
    option   := KEY "=" value
    value    := BARE | "\"" chars "\"" | "[" [value ("," value)*] "]"

Parsing then printing gives back the same text (whitespace aside).
"""
from __future__ import annotations

import re
from typing import Any

from qgraph.errors import PipelineError
from qgraph.pass_base import BARE_VALUE as _BARE
from qgraph.pass_base import Pass, QuotedStr, quote_if_needed
from qgraph.registry import get_pass

__all__ = ["QuotedStr", "format_pipeline", "parse_pipeline", "parse_pipeline_items", "quote_if_needed"]

_NAME = re.compile(r"[a-z0-9][a-z0-9_\-]*")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, msg: str) -> PipelineError:
        caret = " " * self.pos + "^"
        return PipelineError(f"bad pipeline text: {msg} at column {self.pos + 1}\n  {self.text}\n  {caret}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {ch!r}, found {found}")
        self.pos += 1

    def match(self, pattern: re.Pattern[str], what: str) -> str:
        self.skip_ws()
        m = pattern.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected {what}")
        self.pos = m.end()
        return m.group(0)

    def pipeline(self) -> list[tuple[str, dict[str, Any]]]:
        items = []
        if not self.peek():
            return items
        while True:
            items.append(self.item())
            if not self.peek():
                return items
            self.expect(",")

    def item(self) -> tuple[str, dict[str, Any]]:
        name = self.match(_NAME, "a pass name (lower-case kebab-case)")
        options: dict[str, Any] = {}
        if self.peek() == "{":
            self.pos += 1
            if self.peek() != "}":
                while True:
                    key = self.match(_KEY, "an option name")
                    if key in options:
                        raise self.error(f"option {key!r} given twice")
                    self.expect("=")
                    options[key] = self.value()
                    if self.peek() == "}":
                        break
                    self.expect(",")
            self.expect("}")
        return name, options

    def value(self) -> Any:
        ch = self.peek()
        if ch == '"':
            return self.quoted()
        if ch == "[":
            self.pos += 1
            items = []
            if self.peek() != "]":
                while True:
                    items.append(self.value())
                    if self.peek() == "]":
                        break
                    self.expect(",")
            self.expect("]")
            return items
        return self.match(_BARE, "a value")

    def quoted(self) -> str:
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if c == '"':
                self.pos += 1
                return QuotedStr("".join(out))
            out.append(c)
            self.pos += 1
        raise self.error("unterminated string")


def parse_pipeline_items(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Pipeline text → list of (pass name, raw option values) without binding to registered passes."""
    if not isinstance(text, str):
        raise PipelineError(f"a pipeline is text like 'fold-bn,annotate{{bits=8}}', got {type(text).__name__}")
    return _Parser(text).pipeline()


def parse_pipeline(text: str) -> list[Pass]:
    """Pipeline text → pass instances (unknown passes or options raise `PipelineError`)."""
    passes = []
    for name, raw in parse_pipeline_items(text):
        cls = get_pass(name)
        p = cls(**raw)
        p._explicit = {k: _raw_text(v) for k, v in raw.items()}
        passes.append(p)
    return passes


def _raw_text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_raw_text(v) for v in value) + "]"
    if isinstance(value, QuotedStr):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(str(p) for p in passes)
