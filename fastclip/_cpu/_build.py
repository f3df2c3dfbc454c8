"""Turn the plain-Python kernels of the kernel modules into numba dispatchers, lazily.

``jit_pair(func)`` gives each kernel a serial and a ``parallel=True`` twin,
created on first use (``functools.cache``) and compiled by numba on first call
per dtype, never at import; ``kernel(name, parallel)`` finds ``name`` in
``_kernels`` (which re-exports the per-axis kernels of ``_axis_kernels``),
``_header_kernels``, ``_optim_kernels``, ``_per_sample_kernels`` or
``_wide_kernels``.  Both are cached on disk (``cache=True``) under distinct qualified
names so their cache files never collide; where no cache location is
writable numba raises at decoration time, and we fall back to an uncached
dispatcher rather than fail.

The on-disk cache, made safe
----------------------------
numba's cache files are pickles: loading one runs whatever it says.  Two
guards sit on top of numba's own cache (``_CheckedCache``, set as each
dispatcher's ``_cache``):

* **Who can write the folder.**  The folder numba picked (``NUMBA_CACHE_DIR``/...,
  else ``__pycache__`` beside ``_kernels.py``, else ``~/.cache/numba``/...) is
  used only if it and every folder above it is owned by this user or root
  and writable by no one else (group-writable is fine when the group is the
  owner's private group, as with a umask of 002 on Debian or Fedora).
  Folders *above* it may be writable by others if they have the sticky bit
  (as ``/tmp``), which stops others from renaming entries they do not own;
  folders that also hold fastclip's own source are not judged (whoever can
  write them can replace fastclip itself).
  Otherwise, when the folder sits directly in ``NUMBA_CACHE_DIR`` (or
  ``~/.cache/numba``) and that one passes the check for folders above, the
  kernels are cached in a private folder ``fastclip-<uid>`` (mode 0700,
  created and verified here) inside it; else fastclip's kernels are not
  cached at all.  Both cases emit one :class:`CacheWarning` naming the
  folder and the fix (``chmod go-w FOLDER``, or a ``NUMBA_CACHE_DIR`` that
  only you can write, e.g. ``mkdir -m 700 ~/.cache/numba``).
* **Unreadable files.**  A truncated, empty or garbage ``.nbi`` index or
  ``.nbc`` data file used to make numba raise ``UnpicklingError`` or
  ``EOFError`` from every call until the file was deleted.  Such an entry is
  now treated as missing: the kernel is recompiled and the entry
  overwritten (numba writes a temporary file and renames it over the old
  one), with one :class:`CacheWarning` per process naming the file.

Several processes writing one cache at once can still race (numba issue
4807); the second guard turns what such a race leaves behind into a
recompilation instead of an error.
"""

from __future__ import annotations

import functools
import importlib
import os
import stat
import types
import warnings
from collections.abc import Callable
from typing import Any

from numba import njit
from numba.core import config as _numba_config
from numba.core.caching import FunctionCache, IndexDataCacheFile
from numba.core.runtime import rtsys

from .._errors import CacheWarning
from . import _kernels

#: Set to the reason when on-disk caching had to be disabled (reported by ``info()``).
cache_disabled_reason: str | None = None
#: The folder fastclip's kernels are cached in, once the first kernel was built.
cache_dir: str | None = None

_warned: set[str] = set()


def _warn_once(kind: str, message: str) -> None:
    if kind in _warned:
        return
    _warned.add(kind)
    warnings.warn(message, CacheWarning, stacklevel=3)


# ------------------------------------------------------- who can write the folder

_FIX = (
    "Fix: `chmod go-w` the folder (and those above it), or set NUMBA_CACHE_DIR to a folder "
    "that only you can write, e.g. `mkdir -m 700 ~/.cache/numba && export "
    "NUMBA_CACHE_DIR=~/.cache/numba`"
)


def _private_group(gid: int, owner: int) -> bool:
    """True if ``gid`` is the personal group of user ``owner`` (its name, no other member)."""
    try:
        import grp
        import pwd

        group, user = grp.getgrgid(gid), pwd.getpwuid(owner)
    except (ImportError, KeyError):
        return False
    return group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}


def _folder_problem(path: str, leaf: bool) -> str | None:
    """Why others could place files in ``path`` (an existing folder), or None."""
    euid = os.geteuid()
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    if st.st_uid not in (euid, 0):
        return f"{path} is owned by another user (uid {st.st_uid})"
    mode = st.st_mode
    shared = bool(mode & stat.S_IWOTH) or (
        bool(mode & stat.S_IWGRP) and not _private_group(st.st_gid, st.st_uid)
    )
    if not shared:
        return None
    who = "everyone" if mode & stat.S_IWOTH else f"the members of group {st.st_gid}"
    if leaf:
        return f"{path} is writable by {who} (mode {stat.S_IMODE(mode):04o})"
    if mode & stat.S_ISVTX:
        return None  # sticky: others cannot rename or remove what is ours inside it
    return f"{path} is writable by {who} without the sticky bit (mode {stat.S_IMODE(mode):04o})"


@functools.cache
def _source_folders() -> frozenset[str]:
    """The folders that hold fastclip's own source, up to ``/``."""
    out = set()
    current = os.path.dirname(os.path.realpath(_kernels.__file__))
    while True:
        out.add(current)
        parent = os.path.dirname(current)
        if parent == current:
            return frozenset(out)
        current = parent


def _chain_problem(path: str, leaf: bool = True) -> str | None:
    """The first reason found on ``path`` and the folders above it, or None.

    Folders above ``path`` that also hold fastclip's source are not judged:
    whoever can write those can replace fastclip itself, cache or not (so a
    group-writable ``site-packages`` gives no warning about the cache).
    """
    current = os.path.realpath(path)
    is_leaf = leaf
    sources = _source_folders()
    while True:
        if os.path.exists(current) and (is_leaf or current not in sources):
            problem = _folder_problem(current, is_leaf)
            if problem is not None:
                return problem
        is_leaf = False
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def _private_folder(parent: str, name: str) -> tuple[str | None, str | None]:
    """``parent/fastclip-<uid>/name``, created mode 0700 and verified: (path, None) or (None, why)."""
    private = os.path.join(parent, f"fastclip-{os.geteuid()}")
    try:
        os.mkdir(private, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        return None, f"cannot create {private} ({exc})"
    st = os.lstat(private)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None, (
            f"{private} exists but is not a folder private to this user "
            f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        )
    path = os.path.join(private, name)
    os.makedirs(path, mode=0o700, exist_ok=True)
    problem = _chain_problem(path)
    return (path, None) if problem is None else (None, problem)


def user_cache_root() -> str:
    """numba's user-wide cache folder, where it caches when the package folder is not
    writable and ``NUMBA_CACHE_DIR`` is unset: ``$XDG_CACHE_HOME/numba`` (else
    ``~/.cache/numba``) on Linux, ``~/Library/Caches/numba`` on macOS,
    ``%LOCALAPPDATA%\\numba\\Cache`` on Windows (numba's ``UserWideCacheLocator``)."""
    from numba.misc.appdirs import AppDirs

    return str(AppDirs(appname="numba", appauthor=False).user_cache_dir)


@functools.cache
def _placement(numba_path: str) -> tuple[str | None, str | None]:
    """(folder to cache fastclip's kernels in, None), or (None, why they are not cached).

    Decided once per folder and process; warns (once) when the folder numba chose is unsafe.
    """
    problem = _chain_problem(numba_path)
    if problem is None:
        return numba_path, None
    parent = os.path.dirname(os.path.realpath(numba_path))
    roots = [getattr(_numba_config, "CACHE_DIR", ""), user_cache_root()]
    roots = [os.path.realpath(r) for r in roots if r]
    if parent in roots and _chain_problem(parent, leaf=False) is None:
        private, why = _private_folder(parent, os.path.basename(numba_path))
        if private is not None:
            _warn_once(
                "unsafe",
                f"fastclip: numba's cache folder is unsafe ({problem}): a file planted there "
                f"would run code in this process. fastclip's kernels are cached in the private "
                f"folder {private} instead. {_FIX}",
            )
            return private, None
        problem = f"{problem}; {why}"
    reason = f"the cache folder is unsafe ({problem})"
    _warn_once(
        "unsafe",
        f"fastclip: numba's cache folder is unsafe ({problem}): a file planted there would run "
        f"code in this process, so fastclip's kernels are not cached (compiled in every new "
        f"process). {_FIX}",
    )
    return None, reason


# ---------------------------------------------------------------- unreadable files


def _unreadable(path: str, exc: BaseException) -> None:
    _warn_once(
        "corrupt",
        f"fastclip: numba cache file {path} could not be read ({type(exc).__name__}: {exc}); "
        "the kernel was recompiled and the entry replaced. (Further unreadable entries are "
        "replaced without a warning in this process.)",
    )


@functools.lru_cache(maxsize=1)
def kernel_sources_stamp() -> tuple[tuple[str, int, int], ...]:
    """(name, mtime_ns, size) of every module in this package, part of each cache key.

    numba stamps a cached kernel with its own file only, but the kernels of
    one file inline helpers from others (``_elements``, ``_intrinsics``): an
    edited helper left every kernel that uses it loading stale machine code.
    Any change to this package's files now invalidates all of its entries.
    """
    folder = os.path.dirname(os.path.abspath(__file__))
    stamps = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            st = os.stat(os.path.join(folder, name))
            stamps.append((name, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


class _CheckedIndexDataCacheFile(IndexDataCacheFile):  # type: ignore[misc]
    """numba's index + data files, where an unreadable file counts as a missing entry."""

    def _load_index(self) -> dict[Any, Any]:
        try:
            return dict(super()._load_index())
        except Exception as exc:  # UnpicklingError, EOFError, ValueError... from any bytes
            _unreadable(self._index_path, exc)
            return {}  # save() then writes a fresh index over it

    def _load_data(self, name: str) -> Any:
        try:
            return super()._load_data(name)
        except OSError:
            raise  # removed meanwhile: numba's own handling (a miss)
        except Exception as exc:
            _unreadable(self._data_path(name), exc)
            return None  # a miss: compiled, then saved under the same name


class _CheckedCache(FunctionCache):  # type: ignore[misc]
    """numba's per-function cache in a checked folder, recompiling unreadable entries."""

    def __init__(self, py_func: Any, cache_path: str):
        super().__init__(py_func)
        self._cache_path = cache_path
        self._cache_file = _CheckedIndexDataCacheFile(
            cache_path=cache_path,
            filename_base=self._impl.filename_base,
            source_stamp=(self._impl.locator.get_source_stamp(), kernel_sources_stamp()),
        )

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        """numba's ``load_overload`` without its ``target_context.refresh()``.

        That refresh imports and registers every lowering implementation numba
        has (``numba.np.arraymath`` imports ``scipy.linalg.cython_blas``), which
        machine code read from the cache never uses: measured 0.28-0.55 s of a
        warm first call in a new process, against 0.02 s for the one part a
        loaded kernel needs, the NRT (the allocator that ``np.empty`` inside a
        kernel calls).  A kernel that has to be compiled still gets the full
        refresh: numba's compiler does its own.
        """
        rtsys.initialize(target_context)
        return self._load_overload(sig, target_context)

    def _load_overload(self, sig: Any, target_context: Any) -> Any:
        if not self._enabled:
            return None
        key = self._index_key(sig, target_context.codegen())
        data = self._cache_file.load(key)
        if data is None:
            return None
        try:
            return self._impl.rebuild(target_context, data)
        except Exception as exc:  # a file that unpickles to something else
            _unreadable(os.path.join(self._cache_path, self._impl.filename_base + ".*.nbc"), exc)
            return None

    def _save_overload(self, sig: Any, data: Any) -> None:
        if not self._enabled or not self._impl.check_cachable(data):
            return
        os.makedirs(self._cache_path, exist_ok=True)
        key = self._index_key(sig, data.codegen)
        self._cache_file.save(key, self._impl.reduce(data))


# ------------------------------------------------------------------------ kernels


def _clone(func: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    """A copy of ``func`` with its own ``__qualname__`` (hence its own cache file)."""
    clone = types.FunctionType(
        func.__code__, func.__globals__, func.__name__ + suffix, func.__defaults__, func.__closure__
    )
    clone.__qualname__ = func.__qualname__ + suffix
    clone.__doc__ = func.__doc__
    return clone


def _jit(func: Callable[..., Any], parallel: bool) -> Any:
    global cache_disabled_reason, cache_dir
    options: dict[str, Any] = dict(
        fastmath=_kernels.FASTMATH, nogil=True, parallel=parallel, error_model="numpy"
    )
    if cache_disabled_reason is None:
        try:
            dispatcher = njit(cache=True, **options)(func)  # type: ignore[call-overload]
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            cache_disabled_reason = str(exc)
            _warn_once(
                "unavailable",
                f"fastclip: numba's on-disk cache is unavailable ({exc}); kernels will be "
                "compiled in every new process. Set NUMBA_CACHE_DIR to a writable folder.",
            )
        else:
            folder, why = _placement(dispatcher._cache.cache_path)
            if folder is not None:
                dispatcher._cache = _CheckedCache(dispatcher.py_func, folder)
                cache_dir = folder
                return dispatcher
            cache_disabled_reason = why
    return njit(cache=False, **options)(func)  # type: ignore[call-overload]


@functools.cache
def jit_pair(func: Callable[..., Any]) -> Callable[[bool], Any]:
    """The lazy serial and parallel numba twins of ``func``: ``jit_pair(func)(parallel)``.

    Each twin is built on its first request and compiled on its first call per
    dtype, disk-cached under its own name (``<qualname>_ser`` / ``_par``).
    """

    @functools.cache
    def twin(parallel: bool) -> Any:
        return _jit(_clone(func, "_par" if parallel else "_ser"), parallel)

    return twin


def on_disk(dispatcher: Any) -> bool:
    """Whether ``dispatcher`` (built by ``_jit``) has an index in fastclip's disk cache."""
    cache = getattr(dispatcher, "_cache", None)
    if not isinstance(cache, _CheckedCache):
        return False
    return os.path.exists(cache._cache_file._index_path)


def cache_origin() -> str:
    """Where the kernels are cached and why there, in words (``fastclip info``).

    Builds one dispatcher (nothing is compiled) when no kernel was built yet,
    so that the folder is the one the first call will use.
    """
    if cache_dir is None and cache_disabled_reason is None:
        kernel("arr_pow_sum", False)
    if cache_disabled_reason is not None:
        return "disabled: " + cache_disabled_reason
    folder = os.path.realpath(str(cache_dir))
    user_dir = getattr(_numba_config, "CACHE_DIR", "")
    beside = os.path.join(os.path.dirname(os.path.realpath(_kernels.__file__)), "__pycache__")
    if user_dir and folder.startswith(os.path.realpath(user_dir) + os.sep):
        why = "NUMBA_CACHE_DIR"
    elif folder == beside:
        why = "beside the package"
    elif folder.startswith(os.path.realpath(user_cache_root()) + os.sep):
        why = "the user cache folder: the package folder is not writable"
    else:
        why = "a private folder"
    if os.path.basename(os.path.dirname(folder)).startswith("fastclip-"):
        why += ", private subfolder"
    return f"on, in {folder} ({why})"


# Searched in this order by ``kernel``; all but the first two are imported on first use.
_KERNEL_MODULES = (
    "_kernels",
    "_header_kernels",
    "_optim_kernels",
    "_per_sample_kernels",
    "_wide_kernels",
)


def _kernel_function(name: str) -> Callable[..., Any]:
    for module_name in _KERNEL_MODULES:
        module = importlib.import_module(f"{__package__}.{module_name}")
        func = getattr(module, name, None)
        if func is not None:
            return func  # type: ignore[no-any-return]
    raise AttributeError(f"no CPU kernel named {name!r}")


@functools.cache
def kernel(name: str, parallel: bool) -> Any:
    """The dispatcher for the kernel ``name`` of the kernel modules, serial or parallel."""
    return jit_pair(_kernel_function(name))(parallel)
