"""Incremental detokenization: never half a UTF-8 character, pieces add up to the full decode, and
text that may start a stop string is held back until it is known."""

from __future__ import annotations

import pytest

from sglang.srt.managers.detokenizer_manager import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sglang.test.make_gemma4_checkpoint import ensure_demo_model

    return AutoTokenizer.from_pretrained(ensure_demo_model())


def stream_pieces(tokenizer, ids, **kw) -> tuple[list[str], str]:
    d = IncrementalDetokenizer(tokenizer, **kw)
    pieces, shown = [], ""
    for i, t in enumerate(ids):
        d.append([t])
        if i == len(ids) - 1:
            d.finish()
        visible = d.visible_text()
        assert visible.startswith(shown), "visible text must only grow"
        pieces.append(visible[len(shown) :])
        shown = visible
    return pieces, shown


@pytest.mark.parametrize("text", ["hello world, how are you?", "日本語のテキスト and émojis 🎉 mixed", "a  b\n\tc"])
def test_pieces_add_up_and_never_split_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces, final = stream_pieces(tokenizer, ids)
    assert final == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert "".join(pieces) == final
    assert all("\ufffd" not in p for p in pieces)


def test_byte_fallback_waits_for_the_whole_character(tokenizer):
    ids = tokenizer.encode("日")
    assert len(ids) > 1  # the demo tokenizer spells it in bytes
    d = IncrementalDetokenizer(tokenizer)
    for t in ids[:-1]:
        d.append([t])
        assert d.visible_text() == ""
    d.append(ids[-1:])
    assert d.visible_text() == "日"


def test_unfinished_bytes_are_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("日")[:-1]
    d = IncrementalDetokenizer(tokenizer)
    d.append(ids)
    assert d.visible_text() == ""
    d.finish()
    assert d.visible_text() == tokenizer.decode(ids)


def test_stop_string_is_held_back_then_cut(tokenizer):
    ids = tokenizer.encode("the cat sat on the mat")
    pieces, final = stream_pieces(tokenizer, ids, stop=["on the"])
    assert final == "the cat sat "
    assert "".join(pieces) == final


def test_partial_stop_prefix_is_released_when_it_does_not_match(tokenizer):
    ids = tokenizer.encode("the cat sat on a mat")
    pieces, final = stream_pieces(tokenizer, ids, stop=["on the"])
    assert final == "the cat sat on a mat" and "".join(pieces) == final


def test_no_stop_trim_keeps_the_stop_string(tokenizer):
    ids = tokenizer.encode("the cat sat on the mat")
    _, final = stream_pieces(tokenizer, ids, stop=["sat"], no_stop_trim=True)
    assert final == "the cat sat"


def test_special_tokens_are_skipped(tokenizer):
    ids = [2] + tokenizer.encode("hi") + [106]
    _, final = stream_pieces(tokenizer, ids)
    assert final == "hi"
