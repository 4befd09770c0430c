"""The Llama-family forward pass over a flat batch of tokens from many sequences.

A step's tokens are laid out as one (T, hidden) matrix: first one row per
decoding sequence, then the rows of each prefill chunk. Every projection is
one matmul over all T rows; only attention looks at sequence boundaries.
Logits are computed only for the rows that will be sampled.

With `batch_invariant`, a row's logits are bitwise the same whatever else
runs in the step and however its sequence was chunked, preempted or resumed:
every product goes through the same BLAS kernel (worker/matmul.py) and
attention uses fixed-width tiles (worker/attention.py). Every other operation
here is per row already (docs/batch-invariance.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.attention import paged_attention
from worker.backend import Backend
from worker.checkpoint import ModelWeights
from worker.kv_cache import KVCache
from worker.matmul import matmul, weight_min_rows
from worker.model_config import ModelConfig, rope_inv_freq

Array = Any


@dataclass
class PrefillSegment:
    start: int  # first row of the chunk in the step's token matrix
    end: int
    block_table: Array  # (1, num_blocks) int64
    num_kv_blocks: int  # blocks holding the prefix plus this chunk


@dataclass
class StepInputs:
    """Device arrays describing one forward step (built by the ModelRunner)."""

    token_ids: Array  # (T,) int64
    positions: Array  # (T,) int64
    slot_blocks: Array  # (T,) int64: cache block receiving each new token's K/V
    slot_offsets: Array  # (T,) int64: offset inside that block
    num_decode: int  # rows [0, num_decode) are single-token decodes
    decode_tables: Array | None  # (num_decode, max_blocks) int64, rows zero-padded
    decode_kv_blocks: int  # max blocks any decoding sequence uses
    prefills: list[PrefillSegment]
    logits_rows: Array  # (S,) rows whose next-token logits are wanted


def rms_norm(xp: Any, x: Array, weight: Array, eps: float) -> Array:
    mean_square = xp.square(x).sum(axis=-1, keepdims=True) * np.float32(1 / x.shape[-1])  # (T, 1)
    return x * (weight / xp.sqrt(mean_square + np.float32(eps)))  # (T, hidden)


def silu(xp: Any, x: Array) -> Array:
    # sigmoid via tanh: no overflow warning for large negative inputs
    return x * (np.float32(0.5) * (1 + xp.tanh(np.float32(0.5) * x)))


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        backend: Backend,
        batch_invariant: bool = False,
    ) -> None:
        self.config = config
        self.batch_invariant = batch_invariant
        self.weights = weights
        self.backend = backend
        self.xp = backend.xp
        self.scale = 1.0 / math.sqrt(config.head_dim)
        inv_freq = np.asarray(rope_inv_freq(config.rope, config.head_dim), dtype=np.float32)
        positions = np.arange(config.max_position_embeddings, dtype=np.float32)
        angles = np.outer(positions, inv_freq)  # (max_pos, head_dim / 2)
        self.rope_cos = backend.asarray(np.cos(angles))
        self.rope_sin = backend.asarray(np.sin(angles))

    def apply_rope(self, x: Array, cos: Array, sin: Array) -> Array:
        """Rotate-half RoPE (the Hugging Face layout). x: (T, heads, D); cos/sin: (T, 1, D/2)."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return self.xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def attention(self, layer: int, q: Array, cache: KVCache, step: StepInputs) -> Array:
        """q: (T, n_heads, D) -> (T, n_heads, D), decodes batched, prefill chunks one by one."""
        xp, cfg = self.xp, self.config
        parts = []
        if step.num_decode:
            d = step.num_decode
            out = paged_attention(
                xp,
                q[:d, None],
                cache.k[layer],
                cache.v[layer],
                step.decode_tables,
                step.positions[:d, None],
                step.decode_kv_blocks,
                self.scale,
                cfg.sliding_window,
                batch_invariant=self.batch_invariant,
            )  # (d, 1, H, D)
            parts.append(out[:, 0])
        for seg in step.prefills:
            out = paged_attention(
                xp,
                q[None, seg.start : seg.end],
                cache.k[layer],
                cache.v[layer],
                seg.block_table,
                step.positions[None, seg.start : seg.end],
                seg.num_kv_blocks,
                self.scale,
                cfg.sliding_window,
                batch_invariant=self.batch_invariant,
            )  # (1, Q, H, D)
            parts.append(out[0])
        return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=0)

    def weight_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every product with a weight (the layers all have one shape)."""
        layer = self.weights.layers[0]
        mats = [layer.qkv, layer.o, layer.gate_up, layer.down, self.weights.lm_head]
        return [tuple(m.shape) for m in mats]  # type: ignore[misc]

    def linear(self, x: Array, weight: Array) -> Array:
        """(T, in) @ (in, out) -> (T, out)."""
        if not self.batch_invariant:
            return x @ weight
        return matmul(self.xp, x, weight, weight_min_rows(weight.shape))

    def forward(self, step: StepInputs, cache: KVCache) -> Array:
        """Run one step; K/V of every new token enter the cache. Returns (S, vocab) logits."""
        xp, cfg, w = self.xp, self.config, self.weights
        n_tokens = step.token_ids.shape[0]
        q_size, kv_size = cfg.q_size, cfg.kv_size
        n_rot = cfg.num_heads + cfg.num_kv_heads  # q and k heads get RoPE together
        inter = cfg.intermediate_size
        cos = self.rope_cos[step.positions][:, None, :]  # (T, 1, D/2)
        sin = self.rope_sin[step.positions][:, None, :]
        slots = (step.slot_blocks, step.slot_offsets)

        x = w.embed[step.token_ids]  # (T, hidden)
        for i, layer in enumerate(w.layers):
            h = rms_norm(xp, x, layer.attn_norm, cfg.rms_norm_eps)
            qkv = self.linear(h, layer.qkv)  # (T, q_size + 2 * kv_size)
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            qk = self.apply_rope(qkv[:, : q_size + kv_size].reshape(n_tokens, n_rot, -1), cos, sin)
            q = qk[:, : cfg.num_heads]  # (T, n_heads, D)
            k = qk[:, cfg.num_heads :]  # (T, n_kv_heads, D)
            v = qkv[:, q_size + kv_size :].reshape(n_tokens, cfg.num_kv_heads, -1)
            cache.write(i, slots, k, v)
            attn = self.attention(i, q, cache, step).reshape(n_tokens, q_size)  # (T, q_size)
            x = x + self.linear(attn, layer.o)
            if layer.o_bias is not None:
                x += layer.o_bias

            h = rms_norm(xp, x, layer.mlp_norm, cfg.rms_norm_eps)
            gate_up = self.linear(h, layer.gate_up)  # (T, 2 * intermediate)
            if layer.gate_up_bias is not None:
                gate_up += layer.gate_up_bias
            x = x + self.linear(silu(xp, gate_up[:, :inter]) * gate_up[:, inter:], layer.down)
            if layer.down_bias is not None:
                x += layer.down_bias

        last = rms_norm(xp, x[step.logits_rows], w.final_norm, cfg.rms_norm_eps)  # (S, hidden)
        return self.linear(last, w.lm_head)  # (S, vocab)
