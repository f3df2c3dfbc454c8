"""Turn the plain-Python kernels of ``_kernels.py`` into numba dispatchers, lazily.

Each kernel gets a serial and a ``parallel=True`` twin, created on first use
(``functools.cache``) and compiled by numba on first call per dtype, never at
import.  Both are cached on disk (``cache=True``) under distinct qualified
names so their cache files never collide; where no cache location is
writable numba raises at decoration time, and we fall back to an uncached
dispatcher rather than fail (FIELD-NOTES, "cache=True pitfalls").
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from typing import Any

from numba import njit

from . import _kernels

#: Set to the reason when on-disk caching had to be disabled (reported by ``info()``).
cache_disabled_reason: str | None = None


def _clone(func: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    """A copy of ``func`` with its own ``__qualname__`` (hence its own cache file)."""
    clone = types.FunctionType(
        func.__code__, func.__globals__, func.__name__ + suffix, func.__defaults__, func.__closure__
    )
    clone.__qualname__ = func.__qualname__ + suffix
    clone.__doc__ = func.__doc__
    return clone


def _jit(func: Callable[..., Any], parallel: bool) -> Any:
    global cache_disabled_reason
    options: dict[str, Any] = dict(
        fastmath=_kernels.FASTMATH, nogil=True, parallel=parallel, error_model="numpy"
    )
    if cache_disabled_reason is None:
        try:
            return njit(cache=True, **options)(func)  # type: ignore[call-overload]
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            cache_disabled_reason = str(exc)
            warnings.warn(
                f"fastclip: numba's on-disk cache is unavailable ({exc}); kernels will be "
                "compiled in every new process. Set NUMBA_CACHE_DIR to a writable folder.",
                RuntimeWarning,
                stacklevel=3,
            )
    return njit(cache=False, **options)(func)  # type: ignore[call-overload]


@functools.cache
def kernel(name: str, parallel: bool) -> Any:
    """The dispatcher for ``_kernels.<name>``, serial or parallel."""
    func = getattr(_kernels, name)
    return _jit(_clone(func, "_par" if parallel else "_ser"), parallel)
