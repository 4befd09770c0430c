"""Sanity checks on the committed transformers fixtures (tests/fixtures/).

Why: the numerical tests trust these files; a truncated shard, a wrong key or
a stale manifest should fail here with a clear message, not as a logits
mismatch. Only numpy/safetensors/tokenizers: torch is never a test dependency.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
N_PROMPTS = 4
NEW_TOKENS = 12
NAMES = sorted(p.parent.name for p in FIXTURES.glob("*/config.json"))


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one file; BF16 is widened to float32 by hand (numpy has no bf16)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header: dict[str, Any] = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    if all(v["dtype"] != "BF16" for v in header.values()):
        return load_file(path)
    out = {}
    base = 8 + n
    for name, info in header.items():
        start, end = info["data_offsets"]
        assert info["dtype"] == "BF16", f"{path.name}: mixed dtypes"
        bits = np.frombuffer(raw[base + start : base + end], dtype="<u2")
        out[name] = (bits.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    assert base + max(v["data_offsets"][1] for v in header.values()) == len(raw)
    return out


def load_weights(d: Path) -> dict[str, np.ndarray]:
    index = d / "model.safetensors.index.json"
    if not index.exists():
        return read_safetensors(d / "model.safetensors")
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        part = read_safetensors(d / shard)
        assert all(weight_map[k] == shard for k in part), f"{shard}: tensor not in index"
        tensors |= part
    assert set(tensors) == set(weight_map)
    return tensors


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes |= {
            pre + "input_layernorm.weight": (h,),
            pre + "post_attention_layernorm.weight": (h,),
            pre + "self_attn.q_proj.weight": (q, h),
            pre + "self_attn.k_proj.weight": (kv, h),
            pre + "self_attn.v_proj.weight": (kv, h),
            pre + "self_attn.o_proj.weight": (h, q),
            pre + "mlp.gate_proj.weight": (inter, h),
            pre + "mlp.up_proj.weight": (inter, h),
            pre + "mlp.down_proj.weight": (h, inter),
        }
        if cfg["model_type"] == "qwen2":  # Qwen2 has q/k/v biases
            shapes |= {
                pre + "self_attn.q_proj.bias": (q,),
                pre + "self_attn.k_proj.bias": (kv,),
                pre + "self_attn.v_proj.bias": (kv,),
            }
    return shapes


def test_manifest_lists_every_fixture() -> None:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    assert sorted(manifest["fixtures"]) == NAMES
    assert len(NAMES) >= 5


@pytest.mark.parametrize("name", NAMES)
def test_fixture_files(name: str) -> None:
    d = FIXTURES / name
    cfg = json.loads((d / "config.json").read_text())
    vocab = cfg["vocab_size"]

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() <= vocab
    text = "café 你好 🙂"
    assert tok.decode(tok.encode(text).ids) == text

    weights = load_weights(d)
    assert {k: v.shape for k, v in weights.items()} == expected_shapes(cfg)
    assert all(np.isfinite(v).all() for v in weights.values())

    with np.load(d / "expected.npz") as npz:
        exp = dict(npz)
    keys = ("prompt", "logits", "greedy", "greedy_logits")
    assert set(exp) == {f"{k}_{i}" for k in keys for i in range(N_PROMPTS)}
    for i in range(N_PROMPTS):
        prompt, logits = exp[f"prompt_{i}"], exp[f"logits_{i}"]
        greedy, greedy_logits = exp[f"greedy_{i}"], exp[f"greedy_logits_{i}"]
        assert prompt.dtype == np.int64 and greedy.dtype == np.int64
        assert logits.dtype == np.float32 and greedy_logits.dtype == np.float32
        assert prompt.ndim == 1 and prompt.min() >= 1 and prompt.max() < vocab
        assert logits.shape == (len(prompt), vocab)
        assert greedy.shape == (NEW_TOKENS,)
        assert greedy_logits.shape == (NEW_TOKENS, vocab)
        assert np.isfinite(logits).all() and np.isfinite(greedy_logits).all()
        np.testing.assert_array_equal(greedy_logits.argmax(-1), greedy)
