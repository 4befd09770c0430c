"""Sanity checks on the committed transformers fixtures (tests/fixtures/).

Why: the numerical tests trust these files; a truncated shard, a wrong key or
a stale manifest should fail here with a clear message, not as a logits
mismatch. Only numpy/safetensors/tokenizers: torch is never a test dependency.

smollm2/ holds no checkpoint, only transformers' outputs for the real default
model (expected.json, expected.npz); its GGUF is fetched by
scripts/fetch_model.py and never committed.
"""

from __future__ import annotations

import importlib.util
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


# -- smollm2/: transformers' outputs for the real default model (SmolLM2-135M-Instruct GGUF) --
SMOL = FIXTURES / "smollm2"
SMOL_PROMPTS, SMOL_GREEDY, SMOL_CHATS, SMOL_CHAT_MAX_NEW, SMOL_TOP = 3, 16, 3, 48, 20


@pytest.fixture(scope="module")
def smol() -> dict[str, Any]:
    return json.loads((SMOL / "expected.json").read_text(encoding="utf-8"))


def load_fetch_model() -> Any:
    path = FIXTURES.parent.parent / "scripts" / "fetch_model.py"
    spec = importlib.util.spec_from_file_location("fetch_model", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_top(top: dict[str, list[Any]], chosen: int, vocab: int) -> None:
    ids, values = top["ids"], top["logits"]
    assert len(ids) == len(values) == SMOL_TOP and len(set(ids)) == SMOL_TOP
    assert all(0 <= i < vocab for i in ids) and ids[0] == chosen
    assert values == sorted(values, reverse=True)


def test_smollm2_files_are_small_and_pinned(smol: dict[str, Any]) -> None:
    """Only the reference outputs are committed (never the 98 MB GGUF), and they name it."""
    assert sorted(p.name for p in SMOL.iterdir()) == ["expected.json", "expected.npz"]
    assert sum(p.stat().st_size for p in SMOL.iterdir()) < 2_000_000
    fetch_model = load_fetch_model()
    model = smol["model"]
    assert model["gguf_file"] == fetch_model.GGUF_NAME
    assert model["gguf_sha256"] == fetch_model.GGUF_SHA256  # the file `make model` fetches
    assert model["wheel_sha256"] == fetch_model.WHEEL_SHA256
    assert {"torch", "transformers", "gguf"} <= set(smol["versions"])
    assert smol["config"]["vocab_size"] == 49152 and smol["config"]["num_hidden_layers"] == 30


def test_smollm2_prompts(smol: dict[str, Any]) -> None:
    vocab = smol["config"]["vocab_size"]
    with np.load(SMOL / "expected.npz") as npz:
        logits = dict(npz)
    assert set(logits) == {f"logits_{i}" for i in range(SMOL_PROMPTS)}
    prompts = smol["prompts"]
    assert len(prompts) == SMOL_PROMPTS
    assert any(not p["text"].isascii() for p in prompts)
    for i, p in enumerate(prompts):
        row = logits[p["last_logits"].split(":")[1]]
        assert p["last_logits"] == f"expected.npz:logits_{i}"
        assert row.dtype == np.float32 and row.shape == (vocab,) and np.isfinite(row).all()
        assert p["ids"] and all(0 <= t < vocab for t in p["ids"])
        check_top(p["last_top"], int(row.argmax()), vocab)
        np.testing.assert_array_equal(row[p["last_top"]["ids"]], p["last_top"]["logits"])
        greedy = p["greedy_ids"]
        assert len(greedy) == len(p["greedy_top"]) == SMOL_GREEDY
        for token, top in zip(greedy, p["greedy_top"], strict=True):
            check_top(top, token, vocab)
        # generate's first step is the same forward as the full-prompt pass
        np.testing.assert_allclose(
            p["greedy_top"][0]["logits"], row[p["greedy_top"][0]["ids"]], rtol=0, atol=1e-3
        )


def test_smollm2_chats(smol: dict[str, Any]) -> None:
    vocab = smol["config"]["vocab_size"]
    eos = smol["generation_config"]["eos_token_id"]
    eos_ids = eos if isinstance(eos, list) else [eos]
    chats = smol["chats"]
    assert len(chats) == SMOL_CHATS
    roles = [[m["role"] for m in c["messages"]] for c in chats]
    assert ["system", "user"] in roles and ["user", "assistant", "user"] in roles
    assert any(not m["content"].isascii() for c in chats for m in c["messages"])
    for c in chats:
        assert c["rendered"].endswith("<|im_start|>assistant\n")
        assert all(m["content"] in c["rendered"] for m in c["messages"])
        assert c["ids"] and all(0 <= t < vocab for t in c["ids"])
        new = c["completion_ids"]
        assert 0 < len(new) <= SMOL_CHAT_MAX_NEW and len(c["completion_top"]) == len(new)
        assert c["ended_on_eos"] == (new[-1] in eos_ids)
        assert c["finish_reason"] == ("eos" if c["ended_on_eos"] else "length")
        assert c["ended_on_eos"] or len(new) == SMOL_CHAT_MAX_NEW
        assert not any(t in eos_ids for t in new[:-1])
        for token, top in zip(new, c["completion_top"], strict=True):
            check_top(top, token, vocab)


# -- smollm2_sampling/: transformers' logprobs and logits processors -------------------------
SAMPLING = FIXTURES / "smollm2_sampling"
SAMPLING_KEYS = ("raw", "temperature", "repetition", "repetition_temperature")


def test_smollm2_sampling_files(smol: dict[str, Any]) -> None:
    assert sorted(p.name for p in SAMPLING.iterdir()) == ["expected.json", "processors.npz"]
    assert sum(p.stat().st_size for p in SAMPLING.iterdir()) < 500_000
    data = json.loads((SAMPLING / "expected.json").read_text(encoding="utf-8"))
    assert data["model"]["gguf_sha256"] == smol["model"]["gguf_sha256"]  # the same model
    vocab = smol["config"]["vocab_size"]
    for path in data["paths"]:
        for key in SAMPLING_KEYS:
            ids = path["penalised_ids" if key.startswith("repetition") else "greedy_ids"]
            steps = path[key]
            assert [s["token"] for s in steps] == ids
            for step in steps:
                top, values = step["top_ids"], step["top_logprobs"]
                assert len(top) == len(set(top)) == SMOL_TOP and all(0 <= t < vocab for t in top)
                assert values == sorted(values, reverse=True) and values[0] <= 0
                assert top[0] == step["token"] and values[0] == step["logprob"]  # greedy paths
    with np.load(SAMPLING / "processors.npz") as npz:
        arrays = dict(npz)
    logits = arrays.pop("logits")
    history = arrays.pop("input_ids")
    assert logits.dtype == np.float32 and history.shape[0] == logits.shape[0]
    processors = data["processors"]
    names = {f"repetition_{p}" for p in processors["repetition_penalties"]}
    names |= {f"min_p_{m}" for m in processors["min_p"]} | {"log_softmax_temperature"}
    assert set(arrays) == names
    assert all(a.shape == logits.shape for a in arrays.values())
