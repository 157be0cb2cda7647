"""Incremental detokenization: token ids in, text out, never half a UTF-8 character.

Decoding a growing id list token by token goes wrong in two ways: a multi-byte character split over
byte-fallback tokens decodes to U+FFFD until its last byte arrives, and some tokenizers render a
token differently depending on its left neighbour. So each step decodes a short window that starts a
few tokens back (`surr_offset`) and only commits text once it no longer ends in U+FFFD.

Stop strings: text that could still turn out to be the start of a stop string is held back, and a
matched stop string (and what follows) is cut, so the streamed pieces always add up to the final text.

A matched stop token is never handed to `append` (the TokenizerManager drops it), so it never shows.
The TokenizerManager owns one IncrementalDetokenizer per request, in the main process.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: list[str] | None = None,
        no_stop_trim: bool = False,
    ):
        self.tokenizer = tokenizer
        self.decode_kwargs = {"skip_special_tokens": skip_special_tokens, "spaces_between_special_tokens": spaces_between_special_tokens}
        self.stop = list(stop or [])
        self.no_stop_trim = no_stop_trim
        self.ids: list[int] = []
        self.text = ""  # committed decoded text of ids[:read_offset]
        self.surr_offset = 0
        self.read_offset = 0
        self.finished = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.decode_kwargs)

    def append(self, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)
        surrounding = self._decode(self.ids[self.surr_offset : self.read_offset])
        window = self._decode(self.ids[self.surr_offset :])
        if len(window) > len(surrounding) and not window.endswith(REPLACEMENT_CHAR):
            self.text += window[len(surrounding) :]
            self.surr_offset, self.read_offset = self.read_offset, len(self.ids)

    def finish(self) -> None:
        """Flush what is left, incomplete bytes included (they decode to U+FFFD, as a full decode would)."""
        if self.finished:
            return
        self.finished = True
        surrounding = self._decode(self.ids[self.surr_offset : self.read_offset])
        window = self._decode(self.ids[self.surr_offset :])
        if len(window) > len(surrounding):
            self.text += window[len(surrounding) :]
        self.surr_offset = self.read_offset = len(self.ids)

    def visible_text(self) -> str:
        """Text safe to show now: cut at a matched stop string, minus a possible stop-string start."""
        text = self.text
        if not self.stop:
            return text
        cut = min((i for s in self.stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            if self.no_stop_trim:
                matched = min((s for s in self.stop if text.find(s) == cut), key=len)
                return text[: cut + len(matched)]
            return text[:cut]
        if self.finished:
            return text
        return text[: len(text) - self._partial_stop_len(text)]

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
