"""ModelConfig: the architecture facts the engine needs, read from config.json.

Covers Llama (1/2/3), Mistral and Qwen2 and anything of the same shape. Every
error names the file and the field at fault.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served; the message names what is wrong."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama when attention_bias
    o_bias: bool  # Llama attention_bias also biases o_proj
    mlp_bias: bool
    sliding_window: int | None  # Mistral: a key j is visible from query i when i - j < window
    eos_token_ids: tuple[int, ...]
    name: str

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _require(raw: dict[str, Any], key: str, source: Path) -> Any:
    if key not in raw or raw[key] is None:
        raise CheckpointError(f"{source}: missing required field '{key}'")
    return raw[key]


def _rope_config(raw: dict[str, Any], source: Path) -> RopeConfig:
    # transformers >= 5 nests theta and scaling in `rope_parameters`; older writes
    # `rope_theta` at the top level and scaling in `rope_scaling`.
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{source}: unsupported rope type '{rope_type}' (field rope_parameters.rope_type / "
            f"rope_scaling.type); supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if "factor" not in merged:
        raise CheckpointError(f"{source}: rope type '{rope_type}' needs field 'factor'")
    if rope_type == "linear":
        return RopeConfig(theta=float(theta), rope_type="linear", factor=float(merged["factor"]))
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in merged:
            raise CheckpointError(f"{source}: rope type 'llama3' needs field '{key}'")
    return RopeConfig(
        theta=float(theta),
        rope_type="llama3",
        factor=float(merged["factor"]),
        low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
    )


def _eos_ids(model_dir: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    """EOS ids from generation_config.json, else config.json; an int or a list."""
    eos: Any = None
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
    if eos is None:
        eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def load_model_config(model_dir: Path) -> ModelConfig:
    source = model_dir / "config.json"
    if not source.exists():
        raise CheckpointError(f"{model_dir}: missing file config.json")
    raw = json.loads(source.read_text())
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: unsupported model_type {model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    hidden = int(_require(raw, "hidden_size", source))
    heads = int(_require(raw, "num_attention_heads", source))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if heads % kv_heads != 0:
        raise CheckpointError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: unsupported hidden_act {raw['hidden_act']!r} (need silu)")
    attention_bias = bool(raw.get("attention_bias", False))
    window = raw.get("sliding_window") if model_type == "mistral" else None
    if model_type == "qwen2" and raw.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported for qwen2")
    max_pos = int(_require(raw, "max_position_embeddings", source))
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(_require(raw, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", source)),
        num_layers=int(_require(raw, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=_rope_config(raw, source),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        sliding_window=int(window) if window and window < max_pos else None,
        eos_token_ids=_eos_ids(model_dir, raw),
        name=raw.get("_name_or_path") or model_dir.name,
    )


def kv_bytes_per_token(config: ModelConfig, dtype_size: int = 4) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x dtype size: GQA/MQA shrink it directly."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_size


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> list[float]:
    """Inverse frequencies per rotary pair, with linear or Llama-3 scaling applied."""
    base = [1.0 / rope.theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
    if rope.rope_type == "linear":
        return [f / rope.factor for f in base]
    if rope.rope_type != "llama3":
        return base
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    scaled = []
    for f in base:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            scaled.append(f)
        elif wavelen > low_wavelen:
            scaled.append(f / rope.factor)
        else:
            smooth = (old_len / wavelen - rope.low_freq_factor) / (
                rope.high_freq_factor - rope.low_freq_factor
            )
            scaled.append((1 - smooth) * f / rope.factor + smooth * f)
    return scaled
