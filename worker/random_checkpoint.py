"""Write a Hugging Face style Llama checkpoint with random weights (no torch).

Why: the engine's tests and benchmarks need checkpoints of realistic shape
without network access. The layout (config.json keys, tensor names, weight
shapes as (out_features, in_features)) follows what transformers writes for
LlamaForCausalLM, so the same loader serves real and random checkpoints.

    python -m worker.random_checkpoint --preset default --out DIR [--seed 0] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from worker.toy_tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID, build_tokenizer, eos_token, pad_token

MARKER = "shoal_checkpoint.json"  # written last: its presence means "complete"
MARKER_VERSION = 2  # 2: tokenizer_config.json has a chat template
DTYPES = ("float32", "float16")  # bf16 loading is covered by the transformers fixtures
INIT_STD = 0.02


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    tokenizer_vocab_size: int = 512


PRESETS: dict[str, Preset] = {
    "default": Preset(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # Shapes of SmolLM2-135M; the toy tokenizer only covers the first 512 ids.
    "smollm2-135m": Preset(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}


def default_cache_dir() -> Path:
    """`$SHOAL_CACHE` if set, else `~/.cache/shoal/models`."""
    env = os.environ.get("SHOAL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "shoal" / "models"


def hf_config(p: Preset, dtype: str = "float32") -> dict[str, object]:
    """config.json contents for LlamaForCausalLM.

    Both the transformers 5.x keys (`dtype`, `rope_parameters`) and the 4.x
    ones (`torch_dtype`, top-level `rope_theta`) are written, so loaders of
    either generation read it.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": EOS_TOKEN_ID,  # the toy tokenizer has no separate BOS
        "dtype": dtype,
        "eos_token_id": EOS_TOKEN_ID,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": p.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": p.num_attention_heads,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_key_value_heads,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": p.rms_norm_eps,
        "rope_parameters": {"rope_theta": p.rope_theta, "rope_type": "default"},
        "rope_scaling": None,
        "rope_theta": p.rope_theta,
        "tie_word_embeddings": p.tie_word_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": p.vocab_size,
    }


def tensor_specs(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in generation order."""
    h = p.hidden_size
    q_out, kv_out = p.num_attention_heads * p.head_dim, p.num_key_value_heads * p.head_dim
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (p.vocab_size, h))]
    for i in range(p.num_hidden_layers):
        pre = f"model.layers.{i}."
        specs += [
            (pre + "input_layernorm.weight", (h,)),
            (pre + "self_attn.q_proj.weight", (q_out, h)),
            (pre + "self_attn.k_proj.weight", (kv_out, h)),
            (pre + "self_attn.v_proj.weight", (kv_out, h)),
            (pre + "self_attn.o_proj.weight", (h, q_out)),
            (pre + "post_attention_layernorm.weight", (h,)),
            (pre + "mlp.gate_proj.weight", (p.intermediate_size, h)),
            (pre + "mlp.up_proj.weight", (p.intermediate_size, h)),
            (pre + "mlp.down_proj.weight", (h, p.intermediate_size)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not p.tie_word_embeddings:
        specs.append(("lm_head.weight", (p.vocab_size, h)))
    return specs


def _random_tensors(p: Preset, seed: int, dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in tensor_specs(p):
        if name.endswith("norm.weight"):
            x = np.ones(shape, dtype=np.float32)
        else:
            x = rng.standard_normal(shape, dtype=np.float32) * np.float32(INIT_STD)
        tensors[name] = x.astype(dtype, copy=False)
    return tensors


def _write_safetensors(path: Path, p: Preset, seed: int, dtype: str) -> None:
    tmp = _tmp_path(path)
    # transformers refuses safetensors files without metadata {"format": "pt"}
    save_file(_random_tensors(p, seed, dtype), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _tmp_path(path: Path) -> Path:
    """Per-process temp name: concurrent writers never share a partial file."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _write_json(path: Path, obj: object) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _marker(preset_name: str, p: Preset, seed: int, dtype: str) -> dict[str, object]:
    return {
        "version": MARKER_VERSION,
        "preset": preset_name,
        "params": asdict(p),
        "seed": seed,
        "dtype": dtype,
    }


def is_complete(
    out_dir: Path, preset_name: str = "default", seed: int = 0, dtype: str = "float32"
) -> bool:
    """True when `out_dir` already holds exactly this checkpoint."""
    p = PRESETS[preset_name]
    marker = out_dir / MARKER
    try:
        found = json.loads(marker.read_text())
        config = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if found != _marker(preset_name, p, seed, dtype) or config != hf_config(p, dtype):
        return False
    names = ("tokenizer.json", "generation_config.json", "model.safetensors")
    return all((out_dir / n).is_file() for n in names)


# A plain template, so conversations can be tested without a real model.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_checkpoint(
    out_dir: str | os.PathLike[str],
    preset_name: str = "default",
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write (or reuse, if already complete and matching) a random checkpoint."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose from {sorted(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {DTYPES}")
    out = Path(out_dir)
    if is_complete(out, preset_name, seed, dtype):
        return out
    p = PRESETS[preset_name]
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # invalid until everything is rewritten
    _write_safetensors(out / "model.safetensors", p, seed, dtype)
    tok = build_tokenizer(p.tokenizer_vocab_size)
    assert tok.token_to_id(pad_token) == PAD_TOKEN_ID
    tmp = _tmp_path(out / "tokenizer.json")
    tok.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")
    tok_config = {
        "chat_template": CHAT_TEMPLATE,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": p.max_position_embeddings,
    }
    _write_json(out / "tokenizer_config.json", tok_config)
    gen_config = {"bos_token_id": EOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}
    _write_json(out / "generation_config.json", gen_config)
    # config.json and then the marker go last: tools that test for either
    # (make, is_complete) never see a half-written checkpoint.
    _write_json(out / "config.json", hf_config(p, dtype))
    _write_json(out / MARKER, _marker(preset_name, p, seed, dtype))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument(
        "--out", type=Path, default=None, help="default: <cache dir>/<preset>-s<seed>-<dtype>"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    args = ap.parse_args(argv)
    out = args.out or default_cache_dir() / f"{args.preset}-s{args.seed}-{args.dtype}"
    print(write_checkpoint(out, args.preset, args.seed, args.dtype))


if __name__ == "__main__":
    main()
