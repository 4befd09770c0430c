"""Build a `tokenizers.Tokenizer` from a GGUF file's tokenizer metadata.

A GGUF file carries no tokenizer.json: vocabulary, merges, scores, token types
and special ids are metadata keys under llama.cpp's names. The two kinds of
`tokenizer.ggml.model` served here are rebuilt the way transformers' own GGUF
integration (`transformers/integrations/ggml.py`, GGUFGPTConverter /
GGUFLlamaConverter) rebuilds them, so encodings match transformers':

* "gpt2": byte-level BPE from tokens + merges (SmolLM2, Llama 3, Qwen2). The
  `tokenizer.ggml.pre` name picks the split regex llama.cpp uses for it.
* "llama": SentencePiece-style BPE with byte fallback, ▁ for spaces (Llama 2,
  Mistral v0.1, TinyLlama); merges are derived from the scores when absent.

Control tokens (type 3) become special added tokens: they encode as one id and
`decode(skip_special_tokens=True)` drops them. User-defined tokens (type 4) are
added tokens that are not special, as their Hugging Face originals are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

from worker.model_config import CheckpointError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> how llama.cpp splits text before BPE. Unlisted names get
# GPT-2's regex (what ByteLevel applies by itself), as transformers does.
_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")}
_SPLITS.update({name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen", "megrez")})
# GPT-2's regex after splitting every digit apart (llama.cpp's "\p{N}" first; SmolLM2's
# own tokenizer.json has Digits(individual_digits=True) before ByteLevel).
_DIGIT_SPLIT = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")


@dataclass(frozen=True)
class GGUFTokenizer:
    tokenizer: Tokenizer
    bos_token: str  # text of the BOS token, "" if none
    eos_token: str
    eos_token_ids: tuple[int, ...]  # EOS, then EOT (end of turn) when the file names one
    chat_template: str | None


def build_tokenizer(meta: Mapping[str, Any], source: str) -> GGUFTokenizer:
    """`meta`: the file's metadata (key -> value); errors name `source` and the key."""

    def need(key: str) -> Any:
        if key not in meta:
            raise CheckpointError(f"{source}: missing metadata key '{key}'")
        return meta[key]

    kind = need("tokenizer.ggml.model")
    tokens = [str(t) for t in need("tokenizer.ggml.tokens")]
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)]
    if len(types) != len(tokens):
        raise CheckpointError(
            f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )

    def token_id(name: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is None:
            return None
        if not 0 <= int(value) < len(tokens):
            raise CheckpointError(
                f"{source}: tokenizer.ggml.{name}_token_id {value} is outside [0, {len(tokens)})"
            )
        return int(value)

    bos, eos, eot = token_id("bos"), token_id("eos"), token_id("eot")
    if kind == "gpt2":
        tok = _byte_level(tokens, types, need("tokenizer.ggml.merges"), meta)
        add_bos_default = False
    elif kind == "llama":
        scores = [float(s) for s in need("tokenizer.ggml.scores")]
        tok = _sentencepiece(tokens, types, scores, meta, token_id("unknown"))
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise CheckpointError(
            f"{source}: unsupported tokenizer.ggml.model {kind!r}; supported: gpt2, llama"
        )
    special = [i for i, t in enumerate(types) if t == CONTROL]
    tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in special])
    user = [i for i, t in enumerate(types) if t == USER_DEFINED]
    tok.add_tokens([AddedToken(tokens[i], normalized=False, special=False) for i in user])
    if bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None:
        text = tokens[bos]
        tok.add_special_tokens([AddedToken(text, normalized=False, special=True)])
        tok.post_processor = processors.TemplateProcessing(
            single=[text, "$A"],
            pair=[text, "$A", f"{text}:1", "$B:1"],
            special_tokens=[(text, bos)],
        )
    eos_ids = tuple(dict.fromkeys(i for i in (eos, eot) if i is not None))
    template = meta.get("tokenizer.chat_template")
    return GGUFTokenizer(
        tokenizer=tok,
        bos_token=tokens[bos] if bos is not None else "",
        eos_token=tokens[eos] if eos is not None else "",
        eos_token_ids=eos_ids,
        chat_template=str(template) if template else None,
    )


_BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table (`bytes_to_unicode`)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _byte_level(
    tokens: list[str], types: list[int], merges: list[str], meta: Mapping[str, Any]
) -> Tokenizer:
    # llama.cpp writes ordinary tokens in GPT-2's byte spelling, but one whose bytes are
    # not valid UTF-8 may come back raw; respell it so the merges that name it resolve.
    spelling = _byte_spelling()
    vocab = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind not in (CONTROL, USER_DEFINED) and not set(token) <= _BYTE_ALPHABET:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    pairs = [tuple(str(m).split(" ", 1)) for m in merges]
    tok = Tokenizer(
        BPE(vocab, pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="")
    )
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=pre not in _SPLITS)
    if pre in _SPLITS:
        split = pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        if _SPLITS[pre] is _QWEN2_SPLIT:
            tok.normalizer = normalizers.NFC()
    elif pre in _DIGIT_SPLIT:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _derived_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges of a scored vocabulary: every split of a token into two tokens, best-scored
    token first (transformers' GGUFTokenizerSkeleton)."""
    score = dict(zip(tokens, scores, strict=True))
    merges = []
    for token, token_score in score.items():
        local = [
            (token[:k], token[k:], token_score)
            for k in range(1, len(token))
            if token[:k] in score and token[k:] in score
        ]
        local.sort(key=lambda m: (score[m[0]], score[m[1]]), reverse=True)
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(
    tokens: list[str],
    types: list[int],
    scores: list[float],
    meta: Mapping[str, Any],
    unk: int | None,
) -> Tokenizer:
    if len(scores) != len(tokens):
        raise CheckpointError(
            f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens"
        )
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    raw_merges = meta.get("tokenizer.ggml.merges")
    merges = (
        [tuple(str(m).split(" ", 1)) for m in raw_merges]
        if raw_merges
        else _derived_merges(tokens, scores)
    )
    unk_token = tokens[unk] if unk is not None else None
    tok = Tokenizer(BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # transformers' non-legacy Llama tokenizer: ▁ before the first piece of text only.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " ")]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok
