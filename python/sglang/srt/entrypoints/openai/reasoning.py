"""Gemma 4's thinking, split from the answer (`--reasoning-parser gemma4`, SGLang's
`separate_reasoning`): the model writes `<|channel>thought\\n...<channel|>` before its answer, and
the text inside becomes `reasoning_content`. (With thinking off, the chat template closes an empty
thought channel in the prompt itself, so the answer carries none.)
"""

from __future__ import annotations

from sglang.srt.entrypoints.openai.tool_calls import marker_tail

OPEN, CLOSE = "<|channel>thought\n", "<channel|>"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a whole answer; an unclosed channel is all reasoning."""
    start = text.find(OPEN)
    if start < 0 or text[:start].strip():
        return None, text
    end = text.find(CLOSE, start + len(OPEN))
    if end < 0:
        return text[start + len(OPEN) :], ""
    return text[start + len(OPEN) : end], text[end + len(CLOSE) :]


class ReasoningStream:
    """One streamed choice: each piece of text -> (reasoning delta, answer delta), holding back
    only what may still become a marker."""

    def __init__(self):
        self.text, self.sent, self.state = "", 0, "start"  # start -> thinking -> answer

    def add(self, piece: str, final: bool) -> tuple[str, str]:
        self.text += piece
        reasoning = answer = ""
        if self.state == "start":
            body = self.text.lstrip()
            if not body and not final:
                return "", ""
            if body.startswith(OPEN):
                self.state, self.sent = "thinking", len(self.text) - len(body) + len(OPEN)
            elif OPEN.startswith(body) and body and not final:
                return "", ""  # may still open the channel
            else:
                self.state = "answer"
        if self.state == "thinking":
            end = self.text.find(CLOSE, self.sent)
            if end >= 0:
                reasoning, self.sent, self.state = self.text[self.sent : end], end + len(CLOSE), "answer"
            else:
                upto = len(self.text) if final else len(self.text) - marker_tail(self.text, CLOSE)
                reasoning, self.sent = self.text[self.sent : upto], max(upto, self.sent)
        if self.state == "answer":
            answer, self.sent = self.text[self.sent :], len(self.text)
        return reasoning, answer
