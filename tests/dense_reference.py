"""Plain dense NumPy implementations the engine's fast paths are checked against.

Written for clarity, not speed: full (len x len) scores, no cache, no tiling.
"""

from __future__ import annotations

import numpy as np

from worker.checkpoint import ModelWeights
from worker.model_config import ModelConfig, rope_inv_freq


def dense_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, window: int | None = None
) -> np.ndarray:
    """q (Q, H, D) at positions q_pos (Q,); k, v (L, KVH, D) at positions 0..L-1 -> (Q, H, D)."""
    n_heads, n_kv = q.shape[1], k.shape[1]
    k = np.repeat(k, n_heads // n_kv, axis=1)  # (L, H, D)
    v = np.repeat(v, n_heads // n_kv, axis=1)
    scores = np.einsum("qhd,lhd->hql", q, k) / np.sqrt(q.shape[-1])  # (H, Q, L)
    key_pos = np.arange(k.shape[0])
    visible = key_pos[None, :] <= q_pos[:, None]  # (Q, L)
    if window is not None:
        visible &= key_pos[None, :] > q_pos[:, None] - window
    scores = np.where(visible[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("hql,lhd->qhd", probs, v)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    ang = np.outer(pos, inv_freq)[:, None, :]  # (T, 1, D/2)
    cos, sin = np.cos(ang), np.sin(ang)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def dense_forward(cfg: ModelConfig, w: ModelWeights, ids: list[int]) -> np.ndarray:
    """Logits (T, vocab) for every position of `ids`, computed in float64."""
    inv_freq = np.asarray(rope_inv_freq(cfg.rope, cfg.head_dim))
    pos = np.arange(len(ids))
    x = np.asarray(w.embed, dtype=np.float64)[ids]
    q_size, kv_size, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    for layer in w.layers:
        h = _rms(x, layer.attn_norm, cfg.rms_norm_eps)
        qkv = h @ np.asarray(layer.qkv, dtype=np.float64)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        q = _rope(qkv[:, :q_size].reshape(len(ids), cfg.num_heads, -1), pos, inv_freq)
        k = _rope(
            qkv[:, q_size : q_size + kv_size].reshape(len(ids), cfg.num_kv_heads, -1), pos, inv_freq
        )
        v = qkv[:, q_size + kv_size :].reshape(len(ids), cfg.num_kv_heads, -1)
        attn = dense_attention(q, k, v, pos, cfg.sliding_window).reshape(len(ids), q_size)
        x = x + attn @ np.asarray(layer.o, dtype=np.float64)
        if layer.o_bias is not None:
            x = x + layer.o_bias
        h = _rms(x, layer.mlp_norm, cfg.rms_norm_eps)
        gu = h @ np.asarray(layer.gate_up, dtype=np.float64)
        if layer.gate_up_bias is not None:
            gu = gu + layer.gate_up_bias
        gate, up = gu[:, :inter], gu[:, inter:]
        mlp = (gate / (1 + np.exp(-gate)) * up) @ np.asarray(layer.down, dtype=np.float64)
        x = x + mlp + (layer.down_bias if layer.down_bias is not None else 0)
    return _rms(x, w.final_norm, cfg.rms_norm_eps) @ np.asarray(w.lm_head, dtype=np.float64)
