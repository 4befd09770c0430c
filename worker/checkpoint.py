"""Load a Hugging Face style checkpoint directory into device arrays.

Weights come through the `safetensors` library from `model.safetensors` or the
shards named in `model.safetensors.index.json`, stored fp32, fp16 or bf16; all
are converted to float32 once, here, and fused for the forward pass (q/k/v
into one matrix, gate/up into another) so the hot path does fewer, larger
matmuls. Matrices are stored transposed, (in_features, out_features), because
OpenBLAS streams `x @ W` fastest in that layout for the small row counts of
decoding (measured in docs/benchmarks.md). Errors name the file, tensor or
field at fault.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
from safetensors import safe_open
from tokenizers import Tokenizer

from worker.backend import Backend
from worker.model_config import CheckpointError, ModelConfig, load_model_config

Array = Any  # numpy.ndarray or cupy.ndarray


@dataclass
class LayerWeights:
    attn_norm: Array  # (hidden,)
    qkv: Array  # (hidden, q_size + 2 * kv_size)
    qkv_bias: Array | None  # (q_size + 2 * kv_size,)
    o: Array  # (q_size, hidden)
    o_bias: Array | None  # (hidden,)
    mlp_norm: Array  # (hidden,)
    gate_up: Array  # (hidden, 2 * intermediate)
    gate_up_bias: Array | None  # (2 * intermediate,)
    down: Array  # (intermediate, hidden)
    down_bias: Array | None  # (hidden,)


@dataclass
class ModelWeights:
    embed: Array  # (vocab, hidden): rows are looked up by token id
    layers: list[LayerWeights]
    final_norm: Array  # (hidden,)
    lm_head: Array  # (hidden, vocab); a transposed copy of `embed` when tied


def _shard_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index}: missing field 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif single.exists():
        files = [single]
    else:
        raise CheckpointError(
            f"{model_dir}: missing file model.safetensors (or model.safetensors.index.json)"
        )
    for path in files:
        if not path.exists():
            raise CheckpointError(f"{model_dir}: missing shard file {path.name}")
    return files


def _bf16_to_f32(raw: bytes | bytearray, shape: list[int]) -> np.ndarray:
    # NumPy has no bfloat16: the 16 bits are the top half of a float32.
    bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


class TensorSource:
    """Name -> float32 NumPy array across shards; bf16 shards are decoded on open."""

    def __init__(self, files: list[Path]) -> None:
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        self._bf16: dict[str, np.ndarray] = {}
        for path in files:
            handle = self._stack.enter_context(safe_open(str(path), framework="numpy"))
            names = list(handle.keys())
            if any(handle.get_slice(n).get_dtype() == "BF16" for n in names):
                for name, info in safetensors.deserialize(path.read_bytes()):
                    if info["dtype"] == "BF16":
                        self._bf16[name] = _bf16_to_f32(info["data"], info["shape"])
            for name in names:
                self._where[name] = handle

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"checkpoint is missing tensor '{name}'")
        array = self._bf16.pop(name, None)
        if array is None:
            array = self._where[name].get_tensor(name)
        if tuple(array.shape) != shape:
            raise CheckpointError(
                f"tensor '{name}' has shape {tuple(array.shape)}, expected {shape}"
            )
        return np.ascontiguousarray(array, dtype=np.float32)

    def close(self) -> None:
        self._stack.close()


def _layer(src: TensorSource, cfg: ModelConfig, i: int, to_device: Any) -> LayerWeights:
    p = f"model.layers.{i}."
    h, inter = cfg.hidden_size, cfg.intermediate_size

    def get(name: str, *shape: int) -> np.ndarray:
        return src.get(p + name, shape)

    def fused(names: list[str], rows: list[int], cols: int | None) -> Array:
        """Stack (out, in) matrices along out, then store as (in, sum of out)."""
        shapes = [(r, cols) if cols else (r,) for r in rows]
        stacked = np.concatenate([get(n, *s) for n, s in zip(names, shapes, strict=True)])
        return to_device(np.ascontiguousarray(stacked.T))

    def matrix(name: str, rows: int, cols: int) -> Array:
        return to_device(np.ascontiguousarray(get(name, rows, cols).T))  # (in, out)

    qkv_rows = [cfg.q_size, cfg.kv_size, cfg.kv_size]
    qkv_names = [f"self_attn.{x}_proj" for x in "qkv"]
    mlp_names = ["mlp.gate_proj", "mlp.up_proj"]
    return LayerWeights(
        attn_norm=to_device(get("input_layernorm.weight", h)),
        qkv=fused([n + ".weight" for n in qkv_names], qkv_rows, h),
        qkv_bias=fused([n + ".bias" for n in qkv_names], qkv_rows, None) if cfg.qkv_bias else None,
        o=matrix("self_attn.o_proj.weight", h, cfg.q_size),
        o_bias=to_device(get("self_attn.o_proj.bias", h)) if cfg.o_bias else None,
        mlp_norm=to_device(get("post_attention_layernorm.weight", h)),
        gate_up=fused([n + ".weight" for n in mlp_names], [inter, inter], h),
        gate_up_bias=fused([n + ".bias" for n in mlp_names], [inter, inter], None)
        if cfg.mlp_bias
        else None,
        down=matrix("mlp.down_proj.weight", h, inter),
        down_bias=to_device(get("mlp.down_proj.bias", h)) if cfg.mlp_bias else None,
    )


def load_weights(model_dir: Path, cfg: ModelConfig, backend: Backend) -> ModelWeights:
    src = TensorSource(_shard_files(model_dir))
    try:
        embed_host = src.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        embed = backend.asarray(embed_host)
        layers = [_layer(src, cfg, i, backend.asarray) for i in range(cfg.num_layers)]
        final_norm = backend.asarray(src.get("model.norm.weight", (cfg.hidden_size,)))
        head = (
            embed_host
            if cfg.tie_word_embeddings
            else src.get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
        )
        lm_head = backend.asarray(np.ascontiguousarray(head.T))  # (hidden, vocab)
    except CheckpointError as err:
        raise CheckpointError(f"{model_dir}: {err}") from None
    finally:
        src.close()
    return ModelWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def load_tokenizer(model_dir: Path) -> Tokenizer:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{model_dir}: missing file tokenizer.json")
    return Tokenizer.from_file(str(path))


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's chat template (Jinja source) and the special tokens it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""


def _token_text(value: Any) -> str:
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value or "")


def load_chat_template(model_dir: Path) -> ChatTemplate | None:
    """From `chat_template.jinja`, else `tokenizer_config.json` `chat_template` (a string,
    or a list of named templates of which "default" is used), as transformers reads them."""
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    jinja = model_dir / "chat_template.jinja"
    source: Any = jinja.read_text() if jinja.exists() else config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not source:
        return None
    return ChatTemplate(
        str(source), _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    )


@dataclass
class Checkpoint:
    """Everything loaded from one model directory (or GGUF file)."""

    config: ModelConfig
    weights: ModelWeights
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None = None


def gguf_file(model_path: Path) -> Path | None:
    """The GGUF file `model_path` names: itself if a `.gguf` file, or the one `*.gguf` of
    a directory without config.json. None for a Hugging Face directory (or nothing)."""
    if model_path.is_file() and model_path.suffix.lower() == ".gguf":
        return model_path
    if not model_path.is_dir() or (model_path / "config.json").exists():
        return None
    found = sorted(p for p in model_path.glob("*.gguf") if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(
            f"{model_path}: several GGUF files and no config.json ({names}); pass one file"
        )
    return found[0] if found else None


def load_checkpoint(model_dir: str | Path, backend: Backend) -> Checkpoint:
    """A Hugging Face directory, a `.gguf` file, or a directory holding exactly one `.gguf`."""
    model_dir = Path(model_dir)
    gguf_path = gguf_file(model_dir)
    if gguf_path is not None:
        from worker.gguf_checkpoint import load_gguf_checkpoint  # needs the `gguf` package

        return load_gguf_checkpoint(gguf_path, backend)
    if model_dir.is_file():
        raise CheckpointError(f"{model_dir}: not a model directory or a .gguf file")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory does not exist")
    config = load_model_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    weights = load_weights(model_dir, config, backend)
    chat = load_chat_template(model_dir)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, chat_template=chat)
