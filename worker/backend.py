"""Array backend: NumPy on the CPU, CuPy on CUDA, behind one `xp` module.

The model, attention and sampling code is written once against `Backend.xp`;
only this module knows which library that is. CuPy is imported only when a
CUDA device is asked for (or `auto` probes for one), so the CPU path and the
test suite never need it installed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

DeviceName = Literal["auto", "cpu", "cuda"]


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


def select_backend(device: str = "auto") -> Backend:
    """Resolve `auto|cpu|cuda` to a Backend; `cuda` without a device is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda (got {device!r})")
    if device == "cpu":
        return Backend(np, "cpu")
    cupy = _cupy_with_device()
    if cupy is not None:
        return Backend(cupy, "cuda")
    if device == "cuda":
        raise RuntimeError("device=cuda was requested but CuPy found no CUDA device")
    return Backend(np, "cpu")
