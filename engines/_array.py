"""One implementation for numpy and cupy.

Engines write their core against the array API standard (``xp = namespace(a)``) and reach for
the per-backend helpers here where the standard stops: FFTs with worker threads, medians,
percentiles and ndimage filters (scipy for numpy, cupyx.scipy for cupy).
"""

from __future__ import annotations

import os
from typing import Any

import array_api_compat

__all__ = ["namespace", "is_cupy", "fft_module", "ndimage_module", "to_numpy", "fft_workers"]


def namespace(*arrays: Any) -> Any:
    """The array-API namespace of the arrays (numpy, cupy, array_api_strict, ...)."""
    return array_api_compat.array_namespace(*arrays)


def is_cupy(a: Any) -> bool:
    return array_api_compat.is_cupy_array(a)


def fft_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def fft_module(a: Any) -> Any:
    """scipy.fft for numpy arrays (accepts ``workers=``), cupyx.scipy.fft for cupy, else the
    array namespace's own ``fft`` extension (array_api_strict in tests)."""
    if is_cupy(a):
        import cupyx.scipy.fft

        return cupyx.scipy.fft
    if array_api_compat.is_numpy_array(a):
        import scipy.fft

        return scipy.fft
    return namespace(a).fft


def ndimage_module(a: Any) -> Any:
    if is_cupy(a):
        import cupyx.scipy.ndimage

        return cupyx.scipy.ndimage
    import scipy.ndimage

    return scipy.ndimage


def to_numpy(a: Any) -> Any:
    import numpy as np

    if is_cupy(a):
        return a.get()
    return np.asarray(a)
