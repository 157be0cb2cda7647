"""Gemma 4's native tool calls in generated text, as OpenAI `tool_calls`.

The model writes a call as `<|tool_call>call:NAME{ARGS}<tool_call|>`, ARGS in its own notation: bare
(or `<|"|>`-quoted) keys, strings between `<|"|>` delimiters (JSON-quoted ones are read too),
numbers, true / false / null, nested `{...}` and `[...]`.
The chat template renders the tools and earlier calls; this module only reads calls back.
"""

from __future__ import annotations

import json
import re
import uuid

CALL_OPEN, CALL_CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
_CALL = re.compile(re.escape(CALL_OPEN) + r"call:([\w.\-]+)(\{.*?\})" + re.escape(CALL_CLOSE), re.S)
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")


def split_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the text without its calls, the calls as OpenAI tool_calls). A call whose arguments do not
    parse stays in the text, so nothing the model wrote is lost."""
    calls, kept, pos = [], [], 0
    for m in _CALL.finditer(text):
        try:
            args = _Args(m.group(2)).parse()
        except ValueError:
            continue
        kept.append(text[pos : m.start()])
        pos = m.end()
        function = {"name": m.group(1), "arguments": json.dumps(args, ensure_ascii=False)}
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function})
    kept.append(text[pos:])
    return "".join(kept), calls


def marker_tail(text: str, marker: str) -> int:
    """Length of the longest tail of text that begins marker (the rest may still arrive)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def held_back(text: str) -> int:
    """Where streamed content must stop for now: at a call's start, or at a tail that may become one."""
    start = text.find(CALL_OPEN)
    return start if start >= 0 else len(text) - marker_tail(text, CALL_OPEN)


class _Args:
    """Recursive-descent reader of the call-argument notation."""

    def __init__(self, text: str):
        self.text, self.i = text, 0

    def parse(self):
        value = self.value()
        self.skip()
        if self.i != len(self.text):
            raise ValueError(f"unexpected {self.text[self.i:self.i + 10]!r}")
        return value

    def skip(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def value(self):
        self.skip()
        t = self.text
        if t.startswith(QUOTE, self.i):
            end = t.find(QUOTE, self.i + len(QUOTE))
            if end < 0:
                raise ValueError("unterminated string")
            s, self.i = t[self.i + len(QUOTE) : end], end + len(QUOTE)
            return s
        if t.startswith('"', self.i):
            s, self.i = json.JSONDecoder().raw_decode(t, self.i)
            return s
        if t.startswith("{", self.i):
            return dict(self.items("}", self.pair))
        if t.startswith("[", self.i):
            return list(self.items("]", self.value))
        for word, v in (("true", True), ("false", False), ("null", None)):
            if t.startswith(word, self.i):
                self.i += len(word)
                return v
        m = _NUMBER.match(t, self.i)
        if m is None:
            raise ValueError(f"no value at {t[self.i:self.i + 10]!r}")
        self.i = m.end()
        return float(m.group()) if m.group(1) or m.group(2) else int(m.group())

    def pair(self) -> tuple[str, object]:
        self.skip()
        if self.text.startswith(QUOTE, self.i):
            key = self.value()
        else:
            colon = self.text.find(":", self.i)
            key, self.i = self.text[self.i : colon].strip(), colon
            if colon < 0 or not key:
                raise ValueError("missing key")
        self.skip()
        if not self.text.startswith(":", self.i):
            raise ValueError("expected ':' after a key")
        self.i += 1
        return key, self.value()

    def items(self, close: str, item):
        self.i += 1  # the opening bracket
        self.skip()
        if self.text.startswith(close, self.i):
            self.i += 1
            return
        while True:
            yield item()
            self.skip()
            if self.text.startswith(",", self.i):
                self.i += 1
            elif self.text.startswith(close, self.i):
                self.i += 1
                return
            else:
                raise ValueError(f"expected ',' or {close!r}")


class HeldContent:
    """One streamed choice's content, held back from where a tool call starts (or may start) until
    the choice ends; then the rest is split into content and calls."""

    def __init__(self):
        self.text, self.sent = "", 0

    def add(self, piece: str, final: bool) -> tuple[str, list[dict]]:
        """(content to send now, tool calls found: only at the end)."""
        self.text += piece
        if final:
            content, calls = split_tool_calls(self.text[self.sent :])
            self.sent = len(self.text)
            return content, calls
        upto = max(held_back(self.text), self.sent)
        out, self.sent = self.text[self.sent : upto], upto
        return out, []
