"""Load a GGUF file (llama.cpp's format) into the same Checkpoint as a Hugging Face directory.

The file is read with the `gguf` package (llama.cpp's own reader). Every weight is
dequantized to float32 once, here, with `gguf.quants.dequantize`, then fused and
transposed by the same code as safetensors checkpoints (worker/checkpoint.py), so
the engine never sees the difference. Two things differ from a Hugging Face file:

* names: `blk.N.attn_q.weight` for `model.layers.N.self_attn.q_proj.weight`, etc.;
* layout: llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.permute`) reorders
  the rows of each Q and K head of *llama* models from rotate-half pairs (i, i + D/2)
  to adjacent pairs (2i, 2i + 1) for its RoPE kernel. That is undone here, as
  transformers' `reverse_permute_weights` does; qwen2 files are written unpermuted.

GGUF lists dimensions fastest-first (ne[0] = in_features), the reverse of NumPy's
order, so a tensor's NumPy shape is `reversed(tensor.shape)`: (out, in), as in
Hugging Face files. Errors name the file and the key, tensor or type at fault.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from worker.backend import Backend
from worker.checkpoint import ChatTemplate, Checkpoint, ModelWeights, _layer
from worker.gguf_tokenizer import build_tokenizer
from worker.model_config import CheckpointError, ModelConfig, RopeConfig, rope_inv_freq

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Dequantized at load; K-quants as far as the `gguf` package implements them.
_TYPE_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_TYPES = frozenset(GGMLQuantizationType[name] for name in _TYPE_NAMES)

# Hugging Face module name inside a layer -> llama.cpp's.
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def gguf_name(hf_name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    match = _LAYER_RE.fullmatch(hf_name)
    if match is None or match[2] not in _LAYER_NAMES:
        raise CheckpointError(f"no GGUF name for tensor '{hf_name}'")
    return f"blk.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` on Q or K rows (out, ...): per head, rows stored as
    (D/2, 2) pairs go back to the (2, D/2) halves of rotate-half RoPE."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """Metadata and tensors of one GGUF file; tensors come back dequantized, HF-named."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            reader = GGUFReader(path)
            self.meta: dict[str, Any] = {
                name: field.contents() for name, field in reader.fields.items()
            }
        except (ValueError, OSError, UnicodeDecodeError, IndexError) as err:
            raise CheckpointError(f"{path}: not a readable GGUF file ({err})") from None
        self.tensors = {t.name: t for t in reader.tensors}
        self.arch = str(self.value("general.architecture"))
        self.permuted_heads: dict[str, int] = {}  # "self_attn.q_proj" -> heads, for llama

    def value(self, key: str, default: Any = None) -> Any:
        value = self.meta.get(key, default)
        if value is None:
            raise CheckpointError(f"{self.path}: missing metadata key '{key}'")
        return value

    def __contains__(self, hf_name: str) -> bool:
        return gguf_name(hf_name) in self.tensors

    def get(self, hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        """float32 array in the Hugging Face layout (out, in); `shape` is checked."""
        name = gguf_name(hf_name)
        tensor = self.tensors.get(name)
        if tensor is None:
            raise CheckpointError(f"checkpoint is missing tensor '{name}'")
        if tensor.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise CheckpointError(
                f"tensor '{name}' has unsupported type {tensor.tensor_type.name}; "
                f"supported: {supported}"
            )
        found = tuple(int(n) for n in reversed(tensor.shape))
        if found != shape:
            raise CheckpointError(f"tensor '{name}' has shape {found}, expected {shape}")
        try:
            array = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        except (ValueError, NotImplementedError) as err:
            raise CheckpointError(f"tensor '{name}' ({tensor.tensor_type.name}): {err}") from None
        match = _LAYER_RE.fullmatch(hf_name)
        if match and match[2] in self.permuted_heads:
            array = unpermute_rows(array, self.permuted_heads[match[2]])
        return np.ascontiguousarray(array, dtype=np.float32)


def _rope(f: GGUFFile, head_dim: int) -> RopeConfig:
    arch = f.arch
    theta = float(f.meta.get(f"{arch}.rope.freq_base", 10000.0))
    kind = str(f.meta.get(f"{arch}.rope.scaling.type", "none"))
    if kind == "linear":
        factor = float(f.value(f"{arch}.rope.scaling.factor"))
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    if f"{arch}.rope.scale_linear" in f.meta:  # the older key for the same thing
        factor = float(f.value(f"{arch}.rope.scale_linear"))
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    if kind != "none":
        raise CheckpointError(
            f"{f.path}: unsupported {arch}.rope.scaling.type {kind!r}; supported: none, linear"
        )
    if "rope_freqs.weight" not in f.tensors:
        return RopeConfig(theta=theta)
    # Llama 3.x: the converter stores the per-frequency divisors, not the parameters. Every
    # published Llama 3.x uses low 1, high 4, original context 8192; accept those if they match.
    freqs = f.tensors["rope_freqs.weight"]
    divisors = dequantize(freqs.data, freqs.tensor_type).reshape(-1)
    rope = RopeConfig(theta, "llama3", float(divisors.max()), 1.0, 4.0, 8192)
    base = np.array(rope_inv_freq(RopeConfig(theta), head_dim))
    want = base / np.array(rope_inv_freq(rope, head_dim))
    if divisors.shape != want.shape or not np.allclose(divisors, want, rtol=1e-3):
        raise CheckpointError(
            f"{f.path}: tensor 'rope_freqs.weight' does not match Llama 3 rope scaling "
            "(factor, low 1, high 4, original context 8192); other forms are not supported"
        )
    return rope


def read_config(f: GGUFFile, vocab_size: int, eos_ids: tuple[int, ...]) -> ModelConfig:
    arch = f.arch

    def count(key: str, default: Any = None) -> int:
        value = f.value(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer counts: only uniform ones are served
            if len(set(value)) != 1:
                raise CheckpointError(f"{f.path}: {arch}.{key} varies by layer: {value}")
            value = value[0]
        return int(value)

    hidden = count("embedding_length")
    heads = count("attention.head_count")
    kv_heads = count("attention.head_count_kv", heads) or heads
    head_dim = count("attention.key_length", hidden // heads)
    if count("attention.value_length", head_dim) != head_dim:
        raise CheckpointError(f"{f.path}: {arch}.attention.value_length differs from key_length")
    if count("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(
            f"{f.path}: {arch}.rope.dimension_count differs from the head size {head_dim} "
            "(partial rotary embeddings are not supported)"
        )
    if heads % kv_heads != 0:
        raise CheckpointError(
            f"{f.path}: {arch}.attention.head_count ({heads}) must be a multiple of "
            f"{arch}.attention.head_count_kv ({kv_heads})"
        )
    llama_bias = arch == "llama" and "blk.0.attn_q.bias" in f.tensors
    return ModelConfig(
        model_type=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=count("feed_forward_length"),
        num_layers=count("block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(f.value(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope=_rope(f, head_dim),
        max_position_embeddings=count("context_length"),
        tie_word_embeddings="output.weight" not in f.tensors,
        qkv_bias=arch == "qwen2" or llama_bias,
        o_bias=arch == "llama" and "blk.0.attn_output.bias" in f.tensors,
        mlp_bias="blk.0.ffn_up.bias" in f.tensors,
        sliding_window=None,
        eos_token_ids=eos_ids,
        name=str(f.meta.get("general.name") or f.path.stem),
    )


def load_gguf_checkpoint(path: Path, backend: Backend) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file does not exist")
    f = GGUFFile(path)
    if f.arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported general.architecture {f.arch!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tok = build_tokenizer(f.meta, str(path))
    cfg = read_config(f, len(f.meta["tokenizer.ggml.tokens"]), tok.eos_token_ids)
    if cfg.model_type == "llama":  # qwen2 files are written unpermuted
        f.permuted_heads = {"self_attn.q_proj": cfg.num_heads, "self_attn.k_proj": cfg.num_kv_heads}
    h, vocab = cfg.hidden_size, cfg.vocab_size
    try:
        embed_host = f.get("model.embed_tokens.weight", (vocab, h))
        embed = backend.asarray(embed_host)
        layers = [_layer(f, cfg, i, backend.asarray) for i in range(cfg.num_layers)]  # type: ignore
        final_norm = backend.asarray(f.get("model.norm.weight", (h,)))
        head = embed_host if cfg.tie_word_embeddings else f.get("lm_head.weight", (vocab, h))
        lm_head = backend.asarray(np.ascontiguousarray(head.T))  # (hidden, vocab)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    weights = ModelWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)
    chat = (
        ChatTemplate(tok.chat_template, tok.bos_token, tok.eos_token) if tok.chat_template else None
    )
    return Checkpoint(config=cfg, weights=weights, tokenizer=tok.tokenizer, chat_template=chat)
