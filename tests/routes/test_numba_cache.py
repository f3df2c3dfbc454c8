"""fastclip's on-disk numba cache (issue 13, data safety): unreadable entries and unsafe folders.

This file owns the on-disk numba cache's safety; the no-cache fallback warning is in
test_routes.py.

Every case runs fresh Python processes with ``NUMBA_CACHE_DIR`` set to a
temporary folder, since the cache is read when a process first compiles a
kernel.  Each process clips two float32 arrays (compared with float64
NumPy) and reports the warnings it saw, the cache hits and misses of
fastclip's cached kernels and the folder they are cached in.

* A truncated, empty or garbage ``.nbi``/``.nbc`` file used to make every
  call raise ``UnpicklingError``/``EOFError`` until the file was deleted: it
  must be recompiled and replaced, with exactly one warning, and be read
  back on the next run.
* Cache files are pickles: a file planted in a folder that others can write
  runs code in the process.  Such folders are not read (a private 0700
  subfolder or no cache at all, with one warning naming the fix); the
  normal folders (mode 0755, the source tree's ``__pycache__``) give no
  warning.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if not hasattr(os, "geteuid"):  # pragma: no cover - the folder checks use POSIX ownership
    pytest.skip("POSIX file ownership is needed", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
MAX_NORM = 1.0

SCRIPT = r"""
import gc, json, sys, warnings
import numpy as np

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastclip
    arrays = [np.arange(10, dtype=np.float32) * 0.5, np.arange(7, dtype=np.float32) - 3]
    norm = fastclip.clip_by_global_norm_(arrays, MAX_NORM)

from numba.core.dispatcher import Dispatcher
from fastclip._cpu import _build

cached = [
    d for d in gc.get_objects()
    if isinstance(d, Dispatcher) and isinstance(d._cache, _build._CheckedCache)
]
print(json.dumps({
    "norm": float(norm),
    "arrays": [a.astype(float).tolist() for a in arrays],
    "warnings": [[type(w.message).__name__, str(w.message)] for w in caught],
    "cached_kernels": len(cached),
    "hits": sum(sum(d.stats.cache_hits.values()) for d in cached),
    "misses": sum(sum(d.stats.cache_misses.values()) for d in cached),
    "cache_dir": _build.cache_dir,
    "disabled": _build.cache_disabled_reason,
}))
""".replace("MAX_NORM", repr(MAX_NORM))


def _reference() -> tuple[float, list[np.ndarray]]:
    """float64 NumPy: the global norm and the clipped arrays (torch's eps, 1e-6)."""
    arrays = [np.arange(10, dtype=np.float64) * 0.5, np.arange(7, dtype=np.float64) - 3]
    norm = float(np.linalg.norm(np.concatenate(arrays)))
    coef = min(1.0, MAX_NORM / (norm + 1e-6))
    return norm, [a * coef for a in arrays]


def _run(cache_dir: Path | None, cwd: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("NUMBA_CACHE_DIR", None)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    norm, ref = _reference()
    assert out["norm"] == pytest.approx(norm, rel=1e-6)
    for got, want in zip(out["arrays"], ref):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
    return out


def _files(root: Path, ext: str) -> list[Path]:
    return sorted(p for p in root.rglob(f"*.{ext}") if p.is_file())


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder (mode 0755, as ``mkdir`` makes it) filled by one cold run."""
    root = tmp_path_factory.mktemp("nbcache-template") / "cache"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    first = _run(root, root.parent)
    assert first["warnings"] == []  # the normal case is silent
    assert first["cached_kernels"] >= 1 and first["misses"] >= 1 and first["hits"] == 0
    assert first["cache_dir"] is not None and first["cache_dir"].startswith(str(root))
    assert first["disabled"] is None
    second = _run(root, root.parent)
    assert second["warnings"] == [] and second["misses"] == 0 and second["hits"] >= 1
    assert _files(root, "nbi") and _files(root, "nbc")
    return root


def _copy(template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(template, root)
    return root


def _leaf(root: Path) -> Path:
    """The folder numba puts fastclip's kernels in, inside ``root``."""
    (leaf,) = {p.parent for p in _files(root, "nbi")}
    return leaf


# ------------------------------------------------------------- unreadable files

CORRUPTIONS = {
    "truncate": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: np.random.default_rng(4807).bytes(max(64, len(data))),
}


@pytest.mark.parametrize("ext", ["nbi", "nbc"])
@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_unreadable_entry_is_recompiled_replaced_and_read_back(
    template: Path, tmp_path: Path, how: str, ext: str
) -> None:
    root = _copy(template, tmp_path)
    corrupted = {}
    for path in _files(root, ext):
        bad = CORRUPTIONS[how](path.read_bytes())
        path.write_bytes(bad)
        corrupted[path] = bad

    second = _run(root, tmp_path)  # correct results (checked in _run), one warning
    assert len(second["warnings"]) == 1, second["warnings"]
    category, message = second["warnings"][0]
    assert category == "CacheWarning"
    assert "could not be read" in message and "recompiled and the entry replaced" in message
    assert str(_leaf(root)) in message and f".{ext}" in message
    assert second["misses"] >= 1 and second["hits"] == 0

    for path, bad in corrupted.items():  # replaced by valid entries...
        assert path.read_bytes() != bad and path.stat().st_size > 0
    third = _run(root, tmp_path)  # ...that the next process reads: no compilation
    assert third["warnings"] == []
    assert third["misses"] == 0 and third["hits"] >= 1


def test_data_file_that_unpickles_to_something_else_is_replaced(
    template: Path, tmp_path: Path
) -> None:
    root = _copy(template, tmp_path)
    for path in _files(root, "nbc"):
        path.write_bytes(pickle.dumps(("not", "a", "compile result")))
    second = _run(root, tmp_path)
    assert [w[0] for w in second["warnings"]] == ["CacheWarning"], second["warnings"]
    assert "could not be read" in second["warnings"][0][1]
    third = _run(root, tmp_path)
    assert third["warnings"] == [] and third["misses"] == 0 and third["hits"] >= 1


# ------------------------------------------------------------------ unsafe folders


def _plant(leaf: Path, marker: Path) -> None:
    """Replace every index in ``leaf`` by a pickle that creates ``marker`` when loaded."""
    import numba

    class Planted:
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    for path in _files(leaf, "nbi"):
        path.write_bytes(pickle.dumps(numba.__version__) + pickle.dumps(Planted()))


def _make_unsafe(path: Path, how: str) -> None:
    if how == "world-writable":
        os.chmod(path, 0o777)
    elif how == "group-writable":
        os.chown(path, -1, 1)  # a system group (daemon), not the owner's private group
        os.chmod(path, 0o775)
    elif how == "foreign-owner":
        os.chown(path, 54321, -1)
    else:  # pragma: no cover
        raise AssertionError(how)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a folder to another user or group needs root"
)


def test_world_writable_cache_dir_without_sticky_bit_is_not_read(
    template: Path, tmp_path: Path
) -> None:
    root = _copy(template, tmp_path)
    marker = tmp_path / "planted-code-ran"
    _plant(_leaf(root), marker)
    os.chmod(root, 0o777)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    out = _run(root, tmp_path)
    assert not marker.exists()  # the planted pickle was never loaded
    assert len(out["warnings"]) == 1, out["warnings"]
    category, message = out["warnings"][0]
    assert category == "CacheWarning"
    assert str(root) in message and "without the sticky bit" in message
    assert "not cached" in message and "chmod go-w" in message and "NUMBA_CACHE_DIR" in message
    assert out["cache_dir"] is None and out["cached_kernels"] == 0
    assert out["disabled"] is not None and "unsafe" in out["disabled"]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not (root / f"fastclip-{os.geteuid()}").exists()


def test_sticky_world_writable_cache_dir_with_own_subfolder_is_used(
    template: Path, tmp_path: Path
) -> None:
    root = _copy(template, tmp_path)
    os.chmod(root, 0o1777)  # as /tmp: others may create entries but not touch ours
    out = _run(root, tmp_path)
    assert out["warnings"] == []
    assert out["cache_dir"] == str(_leaf(root))
    assert out["misses"] == 0 and out["hits"] >= 1


@needs_root
@pytest.mark.parametrize("how", ["world-writable", "group-writable", "foreign-owner"])
@pytest.mark.parametrize("root_mode", [0o755, 0o1777])
def test_unsafe_subfolder_gives_way_to_a_private_one(
    template: Path, tmp_path: Path, how: str, root_mode: int
) -> None:
    root = _copy(template, tmp_path)
    os.chmod(root, root_mode)
    leaf = _leaf(root)
    marker = tmp_path / "planted-code-ran"
    _plant(leaf, marker)
    _make_unsafe(leaf, how)

    out = _run(root, tmp_path)
    assert not marker.exists()
    assert len(out["warnings"]) == 1, out["warnings"]
    category, message = out["warnings"][0]
    assert category == "CacheWarning" and "private folder" in message and str(leaf) in message
    private = root / f"fastclip-{os.geteuid()}"
    assert out["cache_dir"] == str(private / leaf.name)
    st = os.lstat(private)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert _files(private, "nbi") and _files(private, "nbc")

    again = _run(root, tmp_path)  # the private cache is read back; the warning stays
    assert not marker.exists()
    assert [w[0] for w in again["warnings"]] == ["CacheWarning"]
    assert again["misses"] == 0 and again["hits"] >= 1


@needs_root
def test_private_subfolder_taken_by_another_user_disables_the_cache(
    template: Path, tmp_path: Path
) -> None:
    root = _copy(template, tmp_path)
    leaf = _leaf(root)
    _make_unsafe(leaf, "world-writable")
    private = root / f"fastclip-{os.geteuid()}"
    private.mkdir(mode=0o700)
    os.chown(private, 54321, -1)
    out = _run(root, tmp_path)
    assert len(out["warnings"]) == 1 and "not cached" in out["warnings"][0][1]
    assert "not a folder private to this user" in out["warnings"][0][1]
    assert out["cache_dir"] is None and out["cached_kernels"] == 0


def test_source_tree_pycache_is_silent(tmp_path: Path) -> None:
    """Without NUMBA_CACHE_DIR numba caches beside the source: no warning there."""
    pycache = REPO / "fastclip" / "_cpu" / "__pycache__"
    if not os.access(REPO / "fastclip" / "_cpu", os.W_OK):
        pytest.skip("the source tree is read-only here: numba caches in ~/.cache/numba")
    out = _run(None, tmp_path)
    assert out["warnings"] == []
    assert out["cache_dir"] == str(pycache.resolve())
    assert out["cached_kernels"] >= 1


def test_folders_holding_fastclip_source_are_not_judged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder above the cache that others can write is unsafe, unless it also holds
    fastclip's own source (whoever writes it can replace fastclip itself)."""
    from fastclip._cpu import _build

    shared = tmp_path / "shared"
    leaf = shared / "pkg" / "__pycache__"
    leaf.mkdir(parents=True)
    os.chmod(shared, 0o777)
    problem = _build._chain_problem(str(leaf))
    assert problem is not None and str(shared) in problem and "sticky" in problem
    real = _build._source_folders()
    monkeypatch.setattr(
        _build, "_source_folders", lambda: real | {str(shared.resolve()), str(leaf.parent)}
    )
    assert _build._chain_problem(str(leaf)) is None
    os.chmod(leaf, 0o777)  # the cache folder itself is always judged
    assert "writable by everyone" in str(_build._chain_problem(str(leaf)))


# ------------------------------------------------------ where the cache goes


def _package_copy(tmp_path: Path) -> Path:
    """fastclip's source copied to ``tmp_path/site``, its folders made unwritable.

    As root, modes do not stop writes: ``_cpu/__pycache__`` is then a plain
    file, so that numba cannot create the folder it would cache in.
    """
    site = tmp_path / "site"
    shutil.copytree(
        REPO / "fastclip", site / "fastclip", ignore=shutil.ignore_patterns("__pycache__")
    )
    if os.geteuid() == 0:
        (site / "fastclip" / "_cpu" / "__pycache__").write_text("not a folder\n")
    for folder in [site, *(p for p in site.rglob("*") if p.is_dir())]:
        os.chmod(folder, 0o555)
    return site


def _run_copy(site: Path, home: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / "xdg"), PYTHONPATH=str(site))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    script = SCRIPT + (
        "import fastclip as f\nassert f.__file__.startswith(sys.argv[1]), f.__file__\n"
        "print(json.dumps({'info': f.info()['numba_cache'], "
        "'root': _build.user_cache_root()}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(site)],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    *_, result, where = proc.stdout.strip().splitlines()
    out: dict[str, Any] = {**json.loads(result), **json.loads(where)}
    norm, ref = _reference()
    assert out["norm"] == pytest.approx(norm, rel=1e-6)
    for got, want in zip(out["arrays"], ref):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
    return out


def test_unwritable_package_caches_in_the_user_cache_folder(tmp_path: Path) -> None:
    """numba itself falls back to its user-wide folder ($XDG_CACHE_HOME/numba on
    Linux) when the package folder is not writable; NUMBA_CACHE_DIR still wins."""
    site = _package_copy(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    try:
        first = _run_copy(site, home)
        assert first["warnings"] == [] and first["disabled"] is None
        assert first["root"].startswith(str(home))  # the platform's user cache folder
        assert first["cache_dir"].startswith(first["root"] + os.sep)
        assert first["misses"] >= 1 and first["hits"] == 0
        assert "the package folder is not writable" in first["info"]
        assert first["cache_dir"] in first["info"]
        assert _files(Path(first["root"]), "nbi") and _files(Path(first["root"]), "nbc")
        assert not _files(site, "nbi") and not _files(site, "nbc")

        second = _run_copy(site, home)  # a new process loads what the first compiled
        assert second["cache_dir"] == first["cache_dir"]
        assert second["misses"] == 0 and second["hits"] >= 1

        chosen = tmp_path / "chosen"
        third = _run_copy(site, home, cache_dir=chosen)
        assert third["cache_dir"].startswith(str(chosen) + os.sep)
        assert "(NUMBA_CACHE_DIR)" in third["info"]
        assert third["misses"] >= 1 and _files(chosen, "nbi")
    finally:
        for folder in [site, *(p for p in site.rglob("*") if p.is_dir())]:
            os.chmod(folder, 0o755)  # so that pytest can remove it


def test_eight_processes_starting_together_on_an_empty_cache(tmp_path: Path) -> None:
    """Eight processes compile and write the same kernels at once (numba issue
    4807): every one succeeds with the oracle's result, and a ninth loads them."""
    root = tmp_path / "cache"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(root)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    norm, ref = _reference()
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]
        out = json.loads(stdout.strip().splitlines()[-1])
        assert out["norm"] == pytest.approx(norm, rel=1e-6)
        for got, want in zip(out["arrays"], ref):
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
        # a torn file left by a racing writer is recompiled with a CacheWarning
        assert {w[0] for w in out["warnings"]} <= {"CacheWarning"}, out["warnings"]
    ninth = _run(root, tmp_path)
    assert ninth["misses"] == 0 and ninth["hits"] >= 1 and ninth["warnings"] == []


def test_an_edited_helper_module_invalidates_the_kernels_that_inline_it(tmp_path: Path) -> None:
    """numba stamps a cached kernel with its own file only; the kernels inline
    helpers from ``_elements.py``, so a change there must recompile them (a
    stale entry would run the old helper's machine code)."""
    site = tmp_path / "site"
    shutil.copytree(
        REPO / "fastclip", site / "fastclip", ignore=shutil.ignore_patterns("__pycache__")
    )
    home = tmp_path / "home"
    home.mkdir()
    cache = tmp_path / "cache"
    first = _run_copy(site, home, cache_dir=cache)
    assert first["misses"] >= 1 and first["hits"] == 0
    second = _run_copy(site, home, cache_dir=cache)
    assert second["misses"] == 0 and second["hits"] >= 1  # nothing changed: loaded

    helper = site / "fastclip" / "_cpu" / "_elements.py"
    st = helper.stat()
    os.utime(helper, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as an edit would
    third = _run_copy(site, home, cache_dir=cache)
    assert third["hits"] == 0 and third["misses"] == first["misses"]  # all recompiled
    fourth = _run_copy(site, home, cache_dir=cache)
    assert fourth["misses"] == 0 and fourth["hits"] == second["hits"]  # and cached again
