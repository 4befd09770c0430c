"""Generate reference fixtures from Hugging Face transformers (torch, fp32).

Why: the engine must match transformers numerically on real checkpoint
layouts (sharded, fp16/bf16, tied heads, biases, sliding window, llama3 rope),
and the engine itself may not depend on torch. So this script runs once in a
throwaway venv and its output (tests/fixtures/) is committed:

    python3 -m venv .venv-fixtures
    .venv-fixtures/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy \
        gguf jinja2 accelerate
    .venv-fixtures/bin/python scripts/fetch_model.py --no-fallback   # the SmolLM2 GGUF
    .venv-fixtures/bin/python scripts/make_fixtures.py --out tests/fixtures

(`make fixtures` does exactly this.) Each toy fixture dir holds an HF checkpoint,
tokenizer.json and expected.npz with, for prompt i in 0..3: prompt_i (int64),
logits_i (float32, (len, vocab)), greedy_i (int64, (12,)) and greedy_logits_i
(float32, (12, vocab)).

smollm2/ holds transformers' reference outputs for the real default model,
SmolLM2-135M-Instruct as the Q4_1 GGUF (scripts/fetch_model.py), loaded by
transformers itself (`gguf_file=`, dequantized to fp32); the GGUF is not
copied. expected.json: plain prompts (ids, 16 greedy tokens with EOS
disabled, each step's top-20 logits) and chat conversations (transformers'
rendering of the chat template, its ids, the greedy continuation up to EOS or
48 tokens); expected.npz: logits_i (float32, (vocab,)), the last prompt
position's full logits row of plain prompt i. Run only this part with
`--smollm2 [GGUF]`; a plain run does it after the toy fixtures when the
verified GGUF is in the cache.

smollm2_sampling/ holds transformers' log-probabilities and logits processors
for the same model (`build_smollm2_sampling`; only this part with
`--smollm2-sampling [GGUF]`, also after smollm2/ in a plain run):
expected.json: per-step log_softmax top-20 (ids, logprobs) and the chosen
token's logprob along greedy paths (raw; at temperature 0.7; with
RepetitionPenaltyLogitsProcessor, alone and before TemperatureLogitsWarper);
processors.npz: fixed random logits and input ids, and what
RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper + MinPLogitsWarper and
log_softmax make of them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MinPLogitsWarper,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from worker.toy_tokenizer import build_tokenizer  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import fetch_model  # noqa: E402

VOCAB = 320
PROMPT_LENS = (1, 7, 40, 70)  # 40/70: past a 16-token KV block and a 32-token prefill chunk
NEW_TOKENS = 12
MATRIX_STD = 0.15  # gives logits with std ~1: far from ties, not saturated
ATTN_IMPL = "eager"  # plain softmax(QK^T)V math; also used when re-verifying
MIN_MARGIN = 1e-3  # reject prompts whose greedy top-2 logits are closer than this
COMMON: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    vocab_size=VOCAB,
    intermediate_size=128,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=0,
)


@dataclass
class Fixture:
    name: str
    config: PretrainedConfig
    seed: int
    save_dtype: torch.dtype = torch.float32
    max_shard_size: str | None = None
    generation_eos: list[int] | None = None  # written to generation_config.json
    notes: list[str] = field(default_factory=list)


def fixtures() -> list[Fixture]:
    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        # 64 rather than 32 so head_dim 16 has frequencies in all three llama3
        # bands (kept, interpolated, divided by factor); 32 leaves the middle empty.
        "original_max_position_embeddings": 64,
    }
    default_rope = {"rope_type": "default", "rope_theta": 10000.0}
    return [
        Fixture(
            "llama_gqa",
            LlamaConfig(
                **COMMON,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=32,
                tie_word_embeddings=False,
                rms_norm_eps=1e-5,
                rope_parameters=default_rope,
            ),
            seed=1,
            max_shard_size="100KB",
            generation_eos=[0, 1],
        ),
        Fixture(
            "llama_mqa_tied",
            LlamaConfig(
                **COMMON,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=16,
                tie_word_embeddings=True,
                rms_norm_eps=1e-6,
                rope_parameters=default_rope,
            ),
            seed=2,
            save_dtype=torch.float16,
        ),
        Fixture(
            "qwen2",
            Qwen2Config(
                **COMMON,
                num_attention_heads=4,
                num_key_value_heads=2,
                use_sliding_window=False,
                tie_word_embeddings=False,
                rms_norm_eps=1e-6,
                rope_parameters=default_rope,
            ),
            seed=3,
            save_dtype=torch.bfloat16,
            notes=["config.json has no head_dim: it is hidden_size // num_attention_heads"],
        ),
        Fixture(
            "mistral",
            MistralConfig(
                **COMMON,
                num_attention_heads=4,
                num_key_value_heads=2,
                sliding_window=24,
                tie_word_embeddings=False,
                rms_norm_eps=1e-5,
                rope_parameters=default_rope,
            ),
            seed=4,
        ),
        Fixture(
            "llama3_rope",
            LlamaConfig(
                **COMMON,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                tie_word_embeddings=False,
                rms_norm_eps=1e-5,
                rope_parameters=llama3_rope,
            ),
            seed=6,
            save_dtype=torch.bfloat16,  # as Llama 3 ships; also keeps the fixtures small
        ),
    ]


def randomise(model: PreTrainedModel, seed: int, dtype: torch.dtype) -> None:
    """Overwrite every parameter so no default init (zeros, ones) hides a bug.

    Values are rounded through the save dtype so the fp32 references are
    exact for a loader that upcasts the saved fp16/bf16 file.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * noise
            elif name.endswith(".bias"):
                value = 0.1 * noise
            else:
                value = MATRIX_STD * noise
            p.copy_(value.to(dtype).to(torch.float32))


def make_prompts(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=n, dtype=np.int64) for n in PROMPT_LENS]


def full_logits(model: PreTrainedModel, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(ids)[None]).logits[0]
    return out.float().numpy()


def greedy(model: PreTrainedModel, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """model.generate with EOS disabled, so it always yields NEW_TOKENS tokens."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            torch.from_numpy(ids)[None],
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(ids) :].numpy().astype(np.int64)
    logits = torch.stack([step[0] for step in out.logits]).float().numpy()
    assert tokens.shape == (NEW_TOKENS,), f"generation stopped early: {tokens.shape}"
    assert (logits.argmax(-1) == tokens).all(), "raw step logits disagree with greedy tokens"
    return tokens, logits


def top2_margin(logits: np.ndarray) -> float:
    top = np.sort(logits, axis=-1)[..., -2:]
    return float((top[..., 1] - top[..., 0]).min())


def sliding_window_reach(fx: Fixture) -> int:
    """How many positions (self included) one attention layer sees, measured.

    Why: HF's sliding-window convention has been off by one in past releases;
    the engine should copy whatever the reference actually does.
    """
    cfg = fx.config.__class__.from_dict({**fx.config.to_dict(), "num_hidden_layers": 1})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN_IMPL).eval()
    randomise(model, fx.seed, torch.float32)
    ids = make_prompts(fx.seed)[3]
    changed = ids.copy()
    changed[0] = 1 + ids[0] % (VOCAB - 1)
    diff = np.abs(full_logits(model, ids) - full_logits(model, changed)).max(-1)
    return int(np.flatnonzero(diff > 0).max()) + 1  # last position still affected by pos 0


def llama3_bands(config: dict[str, Any]) -> list[str]:
    """Which llama3 rope regime each frequency falls in, to show all are covered."""
    rp = config["rope_parameters"]
    head_dim = config["head_dim"]
    inv_freq = rp["rope_theta"] ** -(np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    old_len = rp["original_max_position_embeddings"]
    low, high = old_len / rp["low_freq_factor"], old_len / rp["high_freq_factor"]
    return ["kept" if w < high else "divided" if w > low else "smoothed" for w in wavelen]


def build_fixture(fx: Fixture, out_dir: Path) -> dict[str, Any]:
    torch.manual_seed(fx.seed)
    model = AutoModelForCausalLM.from_config(fx.config, attn_implementation=ATTN_IMPL).eval()
    randomise(model, fx.seed, fx.save_dtype)

    expected: dict[str, np.ndarray] = {}
    margins: list[float] = []
    decode_vs_full: list[float] = []
    for i, ids in enumerate(make_prompts(fx.seed)):
        logits = full_logits(model, ids)
        tokens, step_logits = greedy(model, ids)
        margins.append(top2_margin(step_logits))
        # Cached decoding vs. one full forward: how close the two paths are in HF itself.
        recomputed = full_logits(model, np.concatenate([ids, tokens[:-1]]))[len(ids) - 1 :]
        decode_vs_full.append(float(np.abs(recomputed - step_logits).max()))
        expected |= {
            f"prompt_{i}": ids,
            f"logits_{i}": logits,
            f"greedy_{i}": tokens,
            f"greedy_logits_{i}": step_logits,
        }
    assert min(margins) > MIN_MARGIN, f"{fx.name}: greedy near-tie {min(margins)}; change seed"

    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.generation_config.eos_token_id = fx.generation_eos or fx.config.eos_token_id
    save_kwargs: dict[str, Any] = {}
    if fx.max_shard_size:
        save_kwargs["max_shard_size"] = fx.max_shard_size
    model.to(fx.save_dtype).save_pretrained(out_dir, **save_kwargs)
    model.to(torch.float32)
    build_tokenizer(VOCAB).save(str(out_dir / "tokenizer.json"))
    np.savez_compressed(out_dir / "expected.npz", **expected)

    verify(out_dir, expected, fx, model)
    return describe(fx, out_dir, margins, decode_vs_full)


def verify(
    out_dir: Path, expected: dict[str, np.ndarray], fx: Fixture, ref: PreTrainedModel
) -> None:
    """Reload what was saved: weights and fp32 logits must be bit-identical."""
    model = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation=ATTN_IMPL
    ).eval()
    ref_state = ref.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), f"{fx.name}: {name} changed on reload"
    with torch.no_grad():
        # Weights mmapped from safetensors are not 64-byte aligned, and for a
        # 1-token input BLAS then picks a kernel that rounds differently (~1e-6).
        # Copies are aligned, making the comparison below exact.
        for p in model.parameters():
            p.data = p.data.clone()
    for i in range(len(PROMPT_LENS)):
        got = full_logits(model, expected[f"prompt_{i}"])
        diff = float(np.abs(got - expected[f"logits_{i}"]).max())
        assert diff == 0.0, f"{fx.name}: reloaded logits differ by {diff}"
    if fx.max_shard_size:
        shards = list(out_dir.glob("model-*-of-*.safetensors"))
        assert (out_dir / "model.safetensors.index.json").is_file() and len(shards) > 1


def describe(
    fx: Fixture, out_dir: Path, margins: list[float], decode_vs_full: list[float]
) -> dict[str, Any]:
    from safetensors import safe_open

    config = json.loads((out_dir / "config.json").read_text())
    tensors: dict[str, str] = {}
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                tensors[key] = str(f.get_slice(key).get_dtype())
    info: dict[str, Any] = {
        "model_class": type(fx.config).__name__.replace("Config", "ForCausalLM"),
        "config_keys": sorted(config),
        "rope_keys": {
            "rope_theta_top_level": "rope_theta" in config,
            "rope_parameters": config.get("rope_parameters"),
            "rope_scaling": config.get("rope_scaling", "<absent>"),
        },
        "summary": {
            k: config.get(k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "vocab_size",
                "tie_word_embeddings",
                "rms_norm_eps",
                "sliding_window",
                "use_sliding_window",
                "eos_token_id",
                "dtype",
            )
        },
        "stored_dtypes": sorted(set(tensors.values())),
        "lm_head_saved": "lm_head.weight" in tensors,
        "n_tensors": len(tensors),
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())},
        "generation_config": json.loads((out_dir / "generation_config.json").read_text()),
        "prompt_lengths": list(PROMPT_LENS),
        "min_greedy_top2_margin": min(margins),
        "max_abs_diff_cached_decode_vs_full_forward": max(decode_vs_full),
        "notes": list(fx.notes),
    }
    if isinstance(fx.config, MistralConfig) and fx.config.sliding_window:
        reach = sliding_window_reach(fx)
        info["sliding_window_positions_seen_incl_self"] = reach
        info["notes"].append(f"query i attends keys j with i - j < {reach} (1-layer probe)")
    if config.get("rope_parameters", {}).get("rope_type") == "llama3":
        info["llama3_bands"] = llama3_bands(config)
    return info


# -- SmolLM2-135M-Instruct (the real default model, GGUF) ---------------------------------
SMOL_PROMPTS = ("Hello, world!", "The capital of France is", "Café au lait, naïve 東京 🙂")
SMOL_CHATS: tuple[tuple[str, list[dict[str, str]]], ...] = (
    (
        "system_user",
        [
            {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    ),
    (
        "multi_turn",
        [
            {"role": "user", "content": "Hi! My name is Ada and I like chess."},
            {"role": "assistant", "content": "Nice to meet you, Ada! Chess is a great game."},
            {"role": "user", "content": "What is my name, and what game do I like?"},
        ],
    ),
    ("non_ascii", [{"role": "user", "content": "¿Dónde está el Museo del Prado? 你好"}]),
)
SMOL_GREEDY = 16
SMOL_CHAT_MAX_NEW = 48
SMOL_TOP = 20


def _top(row: np.ndarray, k: int = SMOL_TOP) -> dict[str, list[Any]]:
    """The k largest logits of one row, largest first (ties: lower id first)."""
    idx = np.argsort(-row, kind="stable")[:k]
    return {"ids": idx.tolist(), "logits": [float(v) for v in row[idx]]}


def _margins(rows: np.ndarray) -> list[float]:
    top = np.sort(rows, axis=-1)[:, -2:]
    return [float(m) for m in top[:, 1] - top[:, 0]]


def _smol_generate(
    model: PreTrainedModel, ids: list[int], max_new: int, eos: Any
) -> tuple[list[int], np.ndarray]:
    """transformers' greedy generate; an explicit all-ones mask, because this
    model's pad id is its EOS (<|im_end|>) and generate would otherwise mask
    every occurrence of it in the prompt."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(ids) :].tolist()
    logits = torch.stack([step[0] for step in out.logits]).float().numpy()
    assert logits.shape[0] == len(tokens)
    assert (logits.argmax(-1) == np.array(tokens)).all(), "step logits disagree with greedy"
    return tokens, logits


def _json(obj: Any, indent: str = "") -> str:
    """Indented JSON, except that a list of scalars stays on one line (readable diffs)."""
    inner = indent + "  "
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {_json(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + _json(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, ensure_ascii=False)


def build_smollm2(gguf_path: Path, out_dir: Path) -> None:
    import gguf  # noqa: F401 - transformers reads the file with it; fail early if missing

    gguf_path = gguf_path.resolve()
    if not gguf_path.is_file():
        raise SystemExit(f"smollm2: {gguf_path} not found; run scripts/fetch_model.py first")
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    if digest != fetch_model.GGUF_SHA256:
        print(f"smollm2: warning: {gguf_path.name} is not the pinned file (sha256 {digest})")
    directory, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, attn_implementation=ATTN_IMPL
    ).eval()
    cfg, gen = model.config, model.generation_config
    vocab = cfg.vocab_size
    eos = gen.eos_token_id

    prompts: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for i, text in enumerate(SMOL_PROMPTS):
        ids = tok(text)["input_ids"]  # add_special_tokens left at the tokenizer's default
        logits = full_logits(model, np.array(ids, dtype=np.int64))
        greedy_ids, steps = _smol_generate(model, ids, SMOL_GREEDY, None)  # EOS off: 16 tokens
        assert len(greedy_ids) == SMOL_GREEDY
        recomputed = full_logits(model, np.array(ids + greedy_ids[:-1], dtype=np.int64))
        decode_vs_full = float(np.abs(recomputed[len(ids) - 1 :] - steps).max())
        arrays[f"logits_{i}"] = logits[-1].astype(np.float32)
        prompts.append(
            {
                "text": text,
                "ids": ids,
                "last_logits": f"expected.npz:logits_{i}",
                "last_top": _top(logits[-1]),
                "greedy_ids": greedy_ids,
                "greedy_text": tok.decode(greedy_ids),
                "greedy_top": [_top(row) for row in steps],
                "greedy_top2_margins": _margins(steps),
                "max_abs_diff_cached_decode_vs_full_forward": decode_vs_full,
                "max_abs_diff_generate_step0_vs_full_forward": float(
                    np.abs(steps[0] - logits[-1]).max()
                ),
            }
        )
        print(f"smollm2: prompt {i}: {text!r} -> {tok.decode(greedy_ids)!r}")

    chats: list[dict[str, Any]] = []
    for chat_name, messages in SMOL_CHATS:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        new_ids, steps = _smol_generate(model, ids, SMOL_CHAT_MAX_NEW, eos)
        eos_ids = eos if isinstance(eos, list) else [eos]
        ended_on_eos = bool(new_ids) and new_ids[-1] in eos_ids
        assert ended_on_eos or len(new_ids) == SMOL_CHAT_MAX_NEW
        chats.append(
            {
                "name": chat_name,
                "messages": messages,
                "rendered": rendered,
                "ids": ids,
                "completion_ids": new_ids,
                "completion_text": tok.decode(new_ids, skip_special_tokens=True),
                "ended_on_eos": ended_on_eos,
                "finish_reason": "eos" if ended_on_eos else "length",
                "completion_top": [_top(row) for row in steps],
                "completion_top2_margins": _margins(steps),
            }
        )
        print(f"smollm2: chat {chat_name}: {len(new_ids)} tokens, eos={ended_on_eos}")

    rope = getattr(cfg, "rope_parameters", None) or {}
    expected: dict[str, Any] = {
        "about": (
            "transformers' reference outputs for SmolLM2-135M-Instruct (Q4_1 GGUF, as "
            "dequantized to float32 by transformers), written by scripts/make_fixtures.py"
        ),
        "model": {
            "gguf_file": gguf_path.name,
            "gguf_sha256": digest,
            "gguf_size": gguf_path.stat().st_size,
            "source": f"PyPI {fetch_model.PACKAGE}=={fetch_model.VERSION}: {fetch_model.MEMBER}",
            "wheel_sha256": fetch_model.WHEEL_SHA256,
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "tokenizers": importlib.metadata.version("tokenizers"),
            "numpy": np.__version__,
        },
        "load": {
            "tokenizer": "AutoTokenizer.from_pretrained(dir, gguf_file=name)",
            "model": (
                "AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32, "
                f"attn_implementation={ATTN_IMPL!r})"
            ),
            "torch_threads": torch.get_num_threads(),
        },
        "config": {
            "model_type": cfg.model_type,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
            "vocab_size": vocab,
            "max_position_embeddings": cfg.max_position_embeddings,
            "rope_theta": rope.get("rope_theta", getattr(cfg, "rope_theta", None)),
            "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings,
        },
        "tokenizer": {
            "bos": [tok.bos_token, tok.bos_token_id],
            "eos": [tok.eos_token, tok.eos_token_id],
            "pad": [tok.pad_token, tok.pad_token_id],
            "unk": [tok.unk_token, tok.unk_token_id],
            "len": len(tok),
            "default_add_special_tokens_adds_bos": tok("a")["input_ids"][:1] == [tok.bos_token_id],
            "chat_template": tok.chat_template,
        },
        "generation_config": {
            "bos_token_id": gen.bos_token_id,
            "eos_token_id": gen.eos_token_id,
            "pad_token_id": gen.pad_token_id,
        },
        "prompts_note": (
            f"ids: tokenizer(text) with its default add_special_tokens; greedy_ids: "
            f"{SMOL_GREEDY} tokens of generate(do_sample=False, eos_token_id=None) with an "
            "all-ones attention mask (so compare with ignore_eos); greedy_top[j]: the "
            f"top-{SMOL_TOP} logits (ids, values) of the row that chose greedy_ids[j]; "
            "expected.npz logits_i: the full float32 logits row of the last prompt position"
        ),
        "prompts": prompts,
        "chats_note": (
            "rendered: tokenizer.apply_chat_template(messages, tokenize=False, "
            "add_generation_prompt=True); ids: tokenizer(rendered, add_special_tokens=False); "
            f"completion_ids: greedy generate, at most {SMOL_CHAT_MAX_NEW} new tokens, stopping "
            "at the generation config's eos_token_id (included when hit), all-ones mask"
        ),
        "chats": chats,
    }
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / "expected.json").write_text(_json(expected) + "\n", encoding="utf-8")
    np.savez_compressed(out_dir / "expected.npz", **arrays)
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    print(f"smollm2: wrote {out_dir}: {sizes}")


# -- smollm2_sampling/: log-probabilities and logits processors --------------------------------
SAMPLING_PROMPTS = (
    "The capital of France is",
    "The cat sat on the mat. The cat sat on the mat. The cat sat on the",  # repeats when greedy
)
SAMPLING_STEPS = 12
SAMPLING_TEMPERATURE = 0.7
SAMPLING_REPETITION = 1.3
PROC_SHAPE = (4, 96)  # processors.npz: rows, vocab of the fixed random logits
PROC_HISTORY = 12  # input ids per row
PROC_REPETITION = (1.3, 0.7)
PROC_TEMPERATURE = 0.8
PROC_MIN_P = (0.05, 0.3)


def _logprob_steps(
    rows: torch.Tensor, chosen: list[int], margins: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """Per step: the top-20 of log_softmax(row) (ids, logprobs) and the chosen token's."""
    logprobs = torch.log_softmax(rows.double(), dim=-1).numpy()  # float64: the reference
    steps = []
    for row, token in zip(logprobs, chosen, strict=True):
        idx = np.argsort(-row, kind="stable")[:SMOL_TOP]
        steps.append(
            {
                "token": token,
                "logprob": float(row[token]),
                "top_ids": idx.tolist(),
                "top_logprobs": [float(v) for v in row[idx]],
            }
        )
    return steps


def _greedy_path(
    model: PreTrainedModel, ids: list[int], repetition: float | None
) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy generate (EOS off, all-ones mask), with its repetition
    penalty when given: the tokens and each step's raw logits (vocab,)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=SAMPLING_STEPS,
            do_sample=False,
            eos_token_id=None,
            repetition_penalty=repetition,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(ids) :].tolist()
    return tokens, torch.stack([step[0] for step in out.logits]).float()


def _processed(ids: list[int], tokens: list[int], raw: torch.Tensor, *procs: Any) -> torch.Tensor:
    """Each step's raw logits through transformers' processors, with the history it saw."""
    rows = []
    for j, row in enumerate(raw):
        history = torch.tensor([ids + tokens[:j]])
        scores = row[None].clone()
        for proc in procs:
            scores = proc(history, scores)
        rows.append(scores[0])
    return torch.stack(rows)


def _top2_margins(rows: torch.Tensor) -> list[float]:
    top = torch.topk(rows, 2, dim=-1).values
    return [float(m) for m in top[:, 0] - top[:, 1]]


def build_smollm2_sampling(gguf_path: Path, out_dir: Path) -> None:
    import gguf  # noqa: F401

    gguf_path = gguf_path.resolve()
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    directory, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, attn_implementation=ATTN_IMPL
    ).eval()
    temperature = TemperatureLogitsWarper(SAMPLING_TEMPERATURE)
    repetition = RepetitionPenaltyLogitsProcessor(SAMPLING_REPETITION)

    paths = []
    for text in SAMPLING_PROMPTS:
        ids = tok(text)["input_ids"]
        plain, raw = _greedy_path(model, ids, None)
        penalised, raw_p = _greedy_path(model, ids, SAMPLING_REPETITION)
        rep_rows = _processed(ids, penalised, raw_p, repetition)
        rep_temp_rows = _processed(ids, penalised, raw_p, repetition, temperature)
        assert (rep_rows.argmax(-1) == torch.tensor(penalised)).all()
        paths.append(
            {
                "text": text,
                "ids": ids,
                "greedy_ids": plain,
                "greedy_text": tok.decode(plain),
                "greedy_top2_margins": _top2_margins(raw),
                "raw": _logprob_steps(raw, plain),
                "temperature": _logprob_steps(raw / SAMPLING_TEMPERATURE, plain),
                "penalised_ids": penalised,
                "penalised_text": tok.decode(penalised),
                "penalised_top2_margins": _top2_margins(rep_rows),
                "repetition": _logprob_steps(rep_rows, penalised),
                "repetition_temperature": _logprob_steps(rep_temp_rows, penalised),
            }
        )
        print(f"smollm2_sampling: {text!r}: {tok.decode(plain)!r} / {tok.decode(penalised)!r}")

    gen = torch.Generator().manual_seed(12)
    logits = (torch.randn(PROC_SHAPE, generator=gen) * 3).float()
    logits[0, :4] = torch.tensor([2.0, -2.0, 0.0, 5.0])  # a zero logit and both signs, seen
    history = torch.randint(0, PROC_SHAPE[1] // 2, (PROC_SHAPE[0], PROC_HISTORY), generator=gen)
    history[0, :4] = torch.tensor([0, 1, 2, 3])
    arrays: dict[str, np.ndarray] = {"logits": logits.numpy(), "input_ids": history.numpy()}
    for p in PROC_REPETITION:
        out = RepetitionPenaltyLogitsProcessor(p)(history, logits.clone())
        arrays[f"repetition_{p}"] = out.numpy()
    warped = TemperatureLogitsWarper(PROC_TEMPERATURE)(history, logits.clone())
    arrays["log_softmax_temperature"] = torch.log_softmax(warped.double(), -1).float().numpy()
    for m in PROC_MIN_P:
        out = MinPLogitsWarper(m)(history, warped.clone())
        arrays[f"min_p_{m}"] = out.numpy()  # -inf where filtered

    expected = {
        "about": (
            "transformers' log-probabilities and logits processors for SmolLM2-135M-Instruct "
            "(the Q4_1 GGUF as transformers dequantizes it), written by "
            "scripts/make_fixtures.py --smollm2-sampling"
        ),
        "model": {"gguf_file": gguf_path.name, "gguf_sha256": digest},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": importlib.metadata.version("gguf"),
        },
        "note": (
            f"ids: tokenizer(text). Each path is {SAMPLING_STEPS} tokens of generate("
            "do_sample=False, eos_token_id=None, all-ones mask), with "
            f"repetition_penalty={SAMPLING_REPETITION} for penalised_ids. Per step "
            "(token = the token that step chose): logprob = log_softmax(row)[token] and "
            f"the top-{SMOL_TOP} (ids, logprobs), in float64, where row is: raw = the "
            f"model's logits; temperature = raw / {SAMPLING_TEMPERATURE} "
            "(TemperatureLogitsWarper); repetition = RepetitionPenaltyLogitsProcessor"
            f"({SAMPLING_REPETITION}) on raw with prompt + tokens so far; "
            "repetition_temperature = that, then TemperatureLogitsWarper"
            f"({SAMPLING_TEMPERATURE}). processors.npz: logits {PROC_SHAPE} float32 and "
            f"input_ids; repetition_P = RepetitionPenaltyLogitsProcessor(P)(input_ids, "
            f"logits); log_softmax_temperature = log_softmax(logits / {PROC_TEMPERATURE}); "
            f"min_p_M = MinPLogitsWarper(M)(input_ids, logits / {PROC_TEMPERATURE}), -inf "
            "where a token is dropped."
        ),
        "temperature": SAMPLING_TEMPERATURE,
        "repetition_penalty": SAMPLING_REPETITION,
        "processors": {
            "repetition_penalties": list(PROC_REPETITION),
            "temperature": PROC_TEMPERATURE,
            "min_p": list(PROC_MIN_P),
        },
        "paths": paths,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "expected.json").write_text(_json(expected) + "\n", encoding="utf-8")
    np.savez_compressed(out_dir / "processors.npz", **arrays)
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    print(f"smollm2_sampling: wrote {out_dir}: {sizes}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "tests" / "fixtures")
    ap.add_argument(
        "--smollm2",
        type=Path,
        nargs="?",
        const=fetch_model.cache_dir() / fetch_model.GGUF_NAME,
        default=None,
        metavar="GGUF",
        help="write only OUT/smollm2/ from this GGUF (default: the one fetch_model.py caches)",
    )
    ap.add_argument(
        "--smollm2-sampling",
        type=Path,
        nargs="?",
        const=fetch_model.cache_dir() / fetch_model.GGUF_NAME,
        default=None,
        metavar="GGUF",
        help="write only OUT/smollm2_sampling/ (logprobs, processors) from this GGUF",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)  # fixed reduction order, so reruns give the same bits
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smollm2 is not None:
        build_smollm2(args.smollm2, args.out / "smollm2")
    if args.smollm2_sampling is not None:
        build_smollm2_sampling(args.smollm2_sampling, args.out / "smollm2_sampling")
    if args.smollm2 is not None or args.smollm2_sampling is not None:
        return
    manifest: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": ATTN_IMPL,
        "tokenizer": f"worker.toy_tokenizer.build_tokenizer({VOCAB})",
        "expected_keys": "prompt_i, logits_i, greedy_i, greedy_logits_i for i in 0..3",
        "fixtures": {},
    }
    for fx in fixtures():
        manifest["fixtures"][fx.name] = build_fixture(fx, args.out / fx.name)
        print(f"{fx.name}: ok")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    cached = fetch_model.cache_dir() / fetch_model.GGUF_NAME
    if fetch_model.is_verified(cached):
        build_smollm2(cached, args.out / "smollm2")
        build_smollm2_sampling(cached, args.out / "smollm2_sampling")
    else:
        print(f"smollm2: skipped, {cached} is missing (scripts/fetch_model.py fetches it)")


if __name__ == "__main__":
    main()
