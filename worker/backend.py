"""Array backend: NumPy on the CPU, CuPy on CUDA, behind one `xp` module.

The model, attention and sampling code is written once against `Backend.xp`;
only this module knows which library that is. CuPy is imported only when a
CUDA device is asked for (or `auto` probes for one), so the CPU path and the
test suite never need it installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class Backend:
    """The array module in use and the two transfers the engine needs."""

    xp: ModuleType
    device: Literal["cpu", "cuda"]

    def asarray(self, host: Any, dtype: Any = None) -> Any:
        """Host (NumPy) array -> device array; a no-op on the CPU."""
        return self.xp.asarray(host, dtype=dtype)

    def to_host(self, array: Any) -> np.ndarray:
        """Device array -> NumPy array; a no-op on the CPU."""
        if self.device == "cuda":
            return array.get()
        return np.asarray(array)

    def describe(self) -> str:
        if self.device == "cpu":
            return "cpu (numpy)"
        props = self.xp.cuda.runtime.getDeviceProperties(self.xp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"cuda ({name})"


def _cupy_with_device() -> ModuleType | None:
    """CuPy if it imports and sees at least one CUDA device, else None."""
    try:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # ImportError, or CUDA driver/runtime errors on a GPU-less host
        return None
    return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt(3) parameter numbers


def keep_freed_memory_mapped() -> bool:
    """Stop glibc from handing every large temporary back to the kernel.

    A decode step makes many short-lived arrays of 0.1-10 MB (gathered K/V
    tiles, activations). By default glibc serves those with fresh mmaps and
    returns them at free, so each step pays a page fault per 4 KiB touched:
    that measured 3-7x slower attention on the CPU (docs/benchmarks.md).
    Raising the mmap and trim thresholds keeps the memory in the heap for
    reuse. A no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)  # glibc's maximum on 64-bit
    trim_ok = mallopt(_M_TRIM_THRESHOLD, 2**30)
    return bool(mmap_ok and trim_ok)


def select_backend(device: str = "auto") -> Backend:
    """Resolve `auto|cpu|cuda` (checked by EngineConfig) to a Backend.

    RuntimeError for `cuda` without a usable CUDA device.
    """
    cupy = None if device == "cpu" else _cupy_with_device()
    if cupy is not None:
        return Backend(cupy, "cuda")
    if device == "cuda":
        raise RuntimeError("device=cuda was requested but CuPy found no CUDA device")
    keep_freed_memory_mapped()
    return Backend(np, "cpu")
