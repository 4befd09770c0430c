"""The model's matrix products, and the rule that makes a row's result independent of the others.

A product's row is computed from that row's data alone, but *which kernel*
computes it depends on the shape of the whole call, and kernels differ in
summation order. Measured with NumPy over OpenBLAS 0.3 on x86-64
(docs/batch-invariance.md):

- one row goes to the matrix-vector kernel (gemv), never the same order as
  the matrix-matrix kernel (gemm) that every larger row count gets;
- a product with M*N*K <= 100**3 goes to OpenBLAS's small-matrix kernel,
  which sums over K in one run, while the blocked kernel splits a K of more
  than ~400 into blocks summed separately; for shorter K the two agree;
- in the blocked kernel, and in the small kernel with both operands
  row-major, a row's bits do not depend on M, on its place, or on threading.

So in batch-invariant mode a product is padded with zero rows up to
`min_rows`: 2 for the attention products (K = head_dim or a 256-key tile),
and for a weight (K, N) enough rows that M*N*K leaves the small-kernel range.
`check_weight_invariance` (and worker/attention.py's check for its own
products) test these facts on the running BLAS at start, since another BLAS
may choose kernels differently.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

import numpy as np

Array = Any

SMALL_KERNEL_MAX_MNK = 100**3  # OpenBLAS's small-matrix kernels take M*N*K up to this


def matmul(xp: ModuleType, a: Array, b: Array, min_rows: int = 1) -> Array:
    """a @ b over the last two axes: (..., M, K) @ (..., K, N) -> (..., M, N).

    An `a` of fewer than `min_rows` rows is padded with zero rows for the
    product (so it runs in the same kernel as a larger call) and cut back.
    """
    rows = a.shape[-2]
    if rows >= min_rows:
        return a @ b
    pad = [(0, 0)] * a.ndim
    pad[-2] = (0, min_rows - rows)
    return (xp.pad(a, pad) @ b)[..., :rows, :]  # (..., min_rows, N) -> (..., M, N)


def weight_min_rows(weight_shape: tuple[int, ...]) -> int:
    """Rows that keep x @ weight out of gemv and the small-matrix kernel (module docstring)."""
    k, n = weight_shape[-2:]
    return max(2, SMALL_KERNEL_MAX_MNK // (k * n) + 1)


def check_weight_invariance(xp: ModuleType, weight_shapes: Iterable[tuple[int, int]]) -> None:
    """Each (K, N) weight product, padded to weight_min_rows, gives a row the same bits in
    calls of any row count; RuntimeError naming the shape otherwise."""
    for shape in set(weight_shapes):
        _check_row_counts(xp, shape, weight_min_rows(shape))


def check_attention_invariance(
    xp: ModuleType,
    score_shape: tuple[int, int],
    key_axis_shapes: Iterable[tuple[int, int]],
    key_align: int,
) -> None:
    """The facts batch-invariant attention relies on; RuntimeError naming the shape otherwise.

    score_shape: (head_dim, tile keys) of q @ K^T; key_axis_shapes: (tile keys,
    N) of the products summing over keys (probs @ V, the row sums); all padded
    to 2 rows. Besides the row counts: a score row must not change with the key
    count (any multiple of key_align), and a sum over keys must not change with
    zero terms past a row's last key.
    """
    for shape in {score_shape, *key_axis_shapes}:
        _check_row_counts(xp, shape, 2)
    a, b = _operands(xp, *score_shape)
    full = matmul(xp, a, b, 2)  # (64, keys)
    for keys in range(key_align, score_shape[1], key_align):
        narrow = xp.ascontiguousarray(b[:, :keys])
        if not bool((matmul(xp, a, narrow, 2) == full[:, :keys]).all()):
            _fail(f"a score row over {keys} keys differs from the same row over {score_shape[1]}")
    for k, n in set(key_axis_shapes):
        a, b = _operands(xp, k, n)
        for keys in range(key_align, k + 1, key_align):
            for used in sorted({1, keys // 2, keys - 1} - {0}):
                terms = a[:3, :keys] * xp.asarray((np.arange(keys) < used).astype(np.float32))
                short = matmul(xp, a[:3, :used], b[:used], 2)  # (3, N)
                if not bool((matmul(xp, terms, b[:keys], 2) == short).all()):
                    _fail(f"a sum over {used} keys changes with zero terms up to {keys} keys")


def _operands(xp: ModuleType, k: int, n: int) -> tuple[Array, Array]:
    rng = np.random.default_rng(k * 7919 + n)
    a = rng.standard_normal((64, k), dtype=np.float32)  # (64, K)
    return xp.asarray(a), xp.asarray(rng.standard_normal((k, n), dtype=np.float32))


def _check_row_counts(xp: ModuleType, shape: tuple[int, int], min_rows: int) -> None:
    """Each row of a 64-row product equals that row in calls of 1, 2, 3, 5, 17 rows and
    the padding threshold's neighbours."""
    k, n = shape
    a, b = _operands(xp, k, n)
    full = matmul(xp, a, b, min_rows)  # (64, N)
    for rows in sorted({1, 2, 3, 5, 17, min_rows - 1, min_rows, min_rows + 1} - {0}):
        if rows <= 64 and not bool((matmul(xp, a[:rows], b, min_rows) == full[:rows]).all()):
            _fail(f"a row of a ({rows} x {k}) @ ({k} x {n}) product differs inside 64 rows")


def _fail(what: str) -> None:
    raise RuntimeError(
        f"batch_invariant: on this BLAS {what}, so a request's logits would depend on its "
        "batch; run without batch_invariant (docs/batch-invariance.md)"
    )
