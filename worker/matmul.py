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
`check_row_invariance` tests these facts on the running BLAS at start, since
another BLAS may choose kernels differently.
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


def check_row_invariance(
    xp: ModuleType,
    weight_shapes: Iterable[tuple[int, int]],
    attention_shapes: Iterable[tuple[int, int]],
) -> None:
    """Raise RuntimeError naming the shape if a row's product depends on the call's row count.

    weight_shapes: (K, N) of every weight (padded to weight_min_rows); attention_shapes:
    (K, N) of the attention products (padded to 2 rows). Each row of a 64-row
    product must equal that row computed in calls of 1, 2, 3, 5, 17 and
    every padding threshold's neighbour rows.
    """
    rng = np.random.default_rng(0)
    cases = [(shape, weight_min_rows(shape)) for shape in set(weight_shapes)]
    cases += [(shape, 2) for shape in set(attention_shapes)]
    for (k, n), min_rows in cases:
        a = xp.asarray(rng.standard_normal((64, k), dtype=np.float32))
        b = xp.asarray(rng.standard_normal((k, n), dtype=np.float32))
        full = matmul(xp, a, b, min_rows)  # (64, N)
        for rows in sorted({1, 2, 3, 5, 17, min_rows - 1, min_rows, min_rows + 1} - {0}):
            if rows > 64:
                continue
            if not bool((matmul(xp, a[:rows], b, min_rows) == full[:rows]).all()):
                raise RuntimeError(
                    f"batch_invariant: this BLAS computes a row of a ({rows} x {k}) @ "
                    f"({k} x {n}) product with other bits than inside a larger product, so "
                    "a request's logits would depend on its batch; run without "
                    "batch_invariant (docs/batch-invariance.md)"
                )
