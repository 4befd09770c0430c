"""IncrementalText: streamed text equals decode(all ids), never revised, cut at stop strings."""

from __future__ import annotations

import random
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models

from server.detokenizer import MAX_PENDING_TOKENS, IncrementalText, TextDelta
from worker.toy_tokenizer import EOS_TOKEN_ID

VOCAB = 512  # the toy tokenizer's (conftest.py)
TEXTS = (
    "The quick brown fox 🙂🚀 jumps!",
    "你好世界。今天天气很好，我们去公园散步吧。",
    "crème brûlée, naïve Señor Muñoz in Zürich — «très bien» Ørsted",
    "Καλημέρα κόσμε. Привет, мир! 안녕하세요 مرحبا 🎉🙂",
)


@pytest.fixture
def tokenizer(toy_tokenizer: Tokenizer) -> Tokenizer:
    assert toy_tokenizer.get_vocab_size() == VOCAB
    return toy_tokenizer


def chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        size = rng.choice([1, 1, 1, 2, 3, 5, 8])
        out.append(ids[i : i + size])
        i += size
    return out


def stream(detok: IncrementalText, parts: list[list[int]], full: str | None = None) -> str:
    """Feed `parts`; check every emitted prefix is final (a prefix of `full`)."""
    emitted = ""
    for part in parts:
        delta = detok.add(part)
        emitted += delta.text
        if full is not None:
            assert full.startswith(emitted), (emitted, full)
        if delta.stopped:
            break
    return emitted + detok.finish()


def cut_at_first_stop(text: str, stop: tuple[str, ...]) -> str:
    """Reference: cut before the occurrence that ends first (the longest on a tie)."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stop if s in text]
    return text[: min(hits)[1]] if hits else text


def test_random_ids_in_random_chunks_match_decode(tokenizer: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        ids = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 120))]
        full = tokenizer.decode(ids)
        assert stream(IncrementalText(tokenizer), chunks(ids, rng), full) == full
        if full:  # a stop string from the (partly garbage) text itself
            start = rng.randrange(len(full))
            stop = (full[start : start + rng.randrange(1, 8)], "\n\n\n")
            detok = IncrementalText(tokenizer, stop)
            assert stream(detok, chunks(ids, rng), full) == cut_at_first_stop(full, stop)
            assert detok.stopped


def test_special_tokens_kept_when_asked(tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    for _ in range(50):
        ids = [rng.choice([EOS_TOKEN_ID, 1, rng.randrange(VOCAB)]) for _ in range(40)]
        full = tokenizer.decode(ids, skip_special_tokens=False)
        detok = IncrementalText(tokenizer, skip_special_tokens=False)
        assert stream(detok, chunks(ids, rng), full) == full
    ids = [*tokenizer.encode("hi").ids, EOS_TOKEN_ID]
    assert stream(IncrementalText(tokenizer), [ids]) == "hi"


def test_multibyte_text_never_shows_a_replacement_character(tokenizer: Tokenizer) -> None:
    rng = random.Random(5)
    split = 0
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        split += sum(tokenizer.decode([i]).endswith("\ufffd") for i in ids)
        for parts in ([[i] for i in ids], chunks(ids, rng)):
            detok = IncrementalText(tokenizer)
            deltas = [detok.add(part).text for part in parts]
            assert all("\ufffd" not in d for d in deltas)
            assert "".join(deltas) == text and detok.finish() == ""
    assert split > 20  # the toy vocabulary has many tokens that end inside a character


def test_text_before_an_incomplete_character_is_not_delayed(tokenizer: Tokenizer) -> None:
    byte_f0 = tokenizer.token_to_id("ð")  # byte-level symbol of the lone byte 0xF0
    detok = IncrementalText(tokenizer)
    assert detok.add([*tokenizer.encode("ok").ids, byte_f0]) == TextDelta("ok")
    assert detok.finish() == "\ufffd"  # bytes that never completed a character


def test_stop_strings_from_the_text_in_random_chunks(tokenizer: Tokenizer) -> None:
    rng = random.Random(99)
    for trial in range(300):
        text = rng.choice(TEXTS)
        ids = tokenizer.encode(text).ids
        start = rng.randrange(len(text))
        stop = [text[start : start + rng.randrange(1, 6)]]
        if trial % 3 == 0:
            stop.append("never there")
        if trial % 5 == 0:
            stop.append(text[rng.randrange(len(text)) :][:3])
        detok = IncrementalText(tokenizer, tuple(stop))
        expected = cut_at_first_stop(text, tuple(stop))
        assert stream(detok, chunks(ids, rng), text) == expected, stop
        assert detok.stopped


def test_stop_string_straddling_chunks(tokenizer: Tokenizer) -> None:
    text = "Emoji time 🙂🚀 and more"
    ids = tokenizer.encode(text).ids
    detok = IncrementalText(tokenizer, ("🚀 and", "zzz"))
    deltas = [detok.add([i]) for i in ids]
    assert "".join(d.text for d in deltas) == "Emoji time 🙂"
    stopped_at = next(n for n, d in enumerate(deltas) if d.stopped)
    assert all(d.stopped and d.text == "" for d in deltas[stopped_at + 1 :])
    assert detok.stopped and detok.finish() == ""


def test_stop_strings_that_never_match_are_flushed_by_finish(tokenizer: Tokenizer) -> None:
    text = "the fox and the dog"
    ids = tokenizer.encode(text).ids
    detok = IncrementalText(tokenizer, ("dogs", "g!"))
    emitted = "".join(detok.add([i]).text for i in ids)
    assert text.startswith(emitted) and emitted != text  # "dog" might still become "dogs"
    assert emitted + detok.finish() == text and not detok.stopped
    assert detok.finish() == ""


def test_first_completed_stop_wins(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("xabcdy").ids
    for parts in ([[i] for i in ids], [ids]):
        detok = IncrementalText(tokenizer, ("abcd", "bc"))
        assert stream(detok, parts) == "xa"  # "bc" is complete before "abcd" is
    detok = IncrementalText(tokenizer, ("bc", "abc"))
    assert stream(detok, [ids]) == "x"  # both end together: the longer one


def test_stop_found_in_the_flushed_tail(tokenizer: Tokenizer) -> None:
    byte_f0 = tokenizer.token_to_id("ð")
    detok = IncrementalText(tokenizer, ("x\ufffd",))
    assert detok.add([*tokenizer.encode("ax").ids, byte_f0]) == TextDelta("a")
    assert detok.finish() == "" and detok.stopped


def test_garbage_bytes_do_not_grow_the_window(tokenizer: Tokenizer) -> None:
    byte_ff = tokenizer.token_to_id("ÿ")  # 0xFF is never valid UTF-8
    ids = [byte_ff] * (3 * MAX_PENDING_TOKENS)
    detok = IncrementalText(tokenizer)
    deltas = [detok.add([i]).text for i in ids]
    assert any(deltas)  # flushed before the end
    assert "".join(deltas) + detok.finish() == tokenizer.decode(ids)


class CountingTokenizer:
    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.decoded = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def get_added_tokens_decoder(self) -> dict[int, Any]:
        return self.inner.get_added_tokens_decoder()


def test_decoding_cost_per_token_is_constant(tokenizer: Tokenizer) -> None:
    rng = random.Random(3)
    ids = [rng.randrange(VOCAB) for _ in range(3000)]
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalText(counting)
    text = "".join(detok.add([i]).text for i in ids) + detok.finish()
    assert text == tokenizer.decode(ids)
    assert counting.decoded < 20 * len(ids)


def sentencepiece_like() -> Tokenizer:
    """Llama-2 style: "▁" for spaces, <0xNN> byte fallback, first leading space stripped."""
    words = ["▁", "▁the", "▁fox", "a", "b", "▁ab", "é"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({w: len(vocab) for w in words})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def test_sentencepiece_style_spaces_specials_and_byte_fallback() -> None:
    tok = sentencepiece_like()
    words = [*range(3 + 256, tok.get_vocab_size()), 1, 2]
    ni_hao = [3 + b for b in "你".encode()]  # three byte tokens, one character
    rng = random.Random(11)
    for _ in range(300):
        ids: list[int] = []
        for _ in range(rng.randrange(1, 20)):
            ids += ni_hao if rng.random() < 0.2 else [rng.choice(words)]
        full = tok.decode(ids)
        assert stream(IncrementalText(tok), chunks(ids, rng), full) == full
