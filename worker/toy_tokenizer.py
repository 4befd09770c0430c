"""A tiny byte-level BPE tokenizer trained on an embedded corpus.

Why: tests and random checkpoints need a real `tokenizer.json` without
downloading anything. Byte-level BPE round-trips any Unicode text, and the
corpus mixes in multi-byte scripts so some learned tokens end mid-character,
which is what UTF-8 streaming detokenization has to cope with.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

eos_token = "<|endoftext|>"
pad_token = "<|pad|>"
# Special tokens come first, so eos is id 0 and pad is id 1.
SPECIAL_TOKENS: tuple[str, ...] = (eos_token, pad_token)
EOS_TOKEN_ID = 0
PAD_TOKEN_ID = 1

# Hand-written so the module is self-contained and the merges never change.
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. The dog did not mind; it "
    "was a warm afternoon and the grass was soft. Later the fox came back "
    "and the two of them watched the river run past the old stone mill.",
    "A batch inference engine reads a prompt, turns it into tokens, and "
    "then predicts one token at a time. Each new token is appended to the "
    "sequence, and the engine keeps a cache of keys and values so that it "
    "does not recompute the whole prompt at every step.",
    "In the morning she went to the market to buy bread, cheese, apples and "
    "a little honey. The baker said the weather would turn cold by the end "
    "of the week, so she bought some extra flour as well.",
    "Numbers and code also appear in text: 0 1 2 3 4 5 6 7 8 9, 42, 3.14, "
    "x = y + 1; for i in range(10): print(i) # done\n\tindented line\n",
    "We met at the café and ordered crème brûlée; the naïve waiter was "
    "charming. Señor Muñoz said «très bien» and left for Zürich and Ørsted.",
    "Καλημέρα κόσμε. Η γλώσσα είναι όμορφη και η θάλασσα είναι μπλε.",
    "你好世界。今天天气很好，我们去公园散步吧。你好，你好，世界你好。",
    "こんにちは世界。Привет, мир! 안녕하세요 세계. مرحبا بالعالم",
    "Emoji time 🙂🚀 and more 🙂🙂 rockets 🚀🚀 launch! 🎉 party 🎉🙂🚀",
)


def corpus() -> list[str]:
    """The training texts, repeated so common pairs clearly outrank rare ones."""
    return [text for text in _CORPUS for _ in range(3)]


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Train and return the toy tokenizer; same `vocab_size` gives the same JSON."""
    n_base = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_base:
        raise ValueError(f"vocab_size must be >= {n_base} (specials + 256 bytes)")
    tok = Tokenizer(models.BPE())
    # No normalizer and no prefix space: decode(encode(s)) must give s back.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok
