"""The per-sample CUDA source (``per_sample_kernels.cu``, appended to ``kernels.cu`` as
the GPU route compiles it) built for the host and run under its GPU driver
(``fastclip/_gpu/_per_sample.py``), without a GPU.

The shim of ``tests/_host_cuda.py`` is used (every CUDA thread of a block a host
thread, ``__syncthreads`` a barrier, ``__shfl_down_sync`` an exchange within a
warp, ``__half`` as ``_Float16``, bfloat16 the upper half of a float32, the
two-dimensional grids of pass 2 -- ``blockIdx.y``: row groups, rows -- run row by
row).  The driver's launches of ``fastclip_ps_pow_partials``,
``fastclip_ps_factors``, ``fastclip_ps_weighted_sum``, ``fastclip_ps_combine``
and ``fastclip_ps_scale_rows`` go to that library through ctypes, with NumPy
memory as device memory; each kernel's parameter list is read from the .cu, so
a changed signature changes the wrappers with it.  So the text that ships --
the 16-byte vector loads and their scalar tails, the warp-shuffle tree, the
64-row float32 blocks of pass 2, the row groups and their combine, the three
rescaling stages -- is checked against the float64 oracle
(``tests/reference.py``), the CPU route (``fastclip.clip_per_sample`` on NumPy
arrays), the NumPy transcription of the kernels
(``test_gpu_per_sample_emulated.py``) and Opacus' flat clipping formula written
in torch.

Skips, with the reason, where no C++ compiler with C++20 ``<barrier>`` and
``_Float16`` (GCC 12, Clang 15) is on the PATH.
"""

from __future__ import annotations

import ctypes
import math
import pathlib
from typing import Any

import _host_cuda as hc
import numpy as np
import pytest
import reference as ref

import fastclip
from fastclip import _config as cfg
from fastclip._gpu import _modules, _tables
from fastclip._gpu import _per_sample as gps

torch = pytest.importorskip("torch")

_EMU = hc.emulated_test_module("test_gpu_per_sample_emulated")
HostLib = _EMU.HostLib  # registers its buffers, fills new ones with 12345 (garbage)
BF16 = _EMU.BF16

_, _PER_ELEMENT, _PER_NORM = _modules.FEATURES["per_sample"]
#: every instantiation the driver uses
KERNELS = dict.fromkeys(_PER_ELEMENT, tuple(_modules.ELEMENT_TYPES.values()))
KERNELS.update(dict.fromkeys(_PER_NORM, _modules.NORM_TYPES))

#: (symbol, grid) of every compiled launch
LAUNCHES: list[tuple[str, tuple[int, ...]]] = []


def _record(
    name: str, targ: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]
) -> None:
    assert all(isinstance(v, np.generic) for v in args), "kernel arguments are NumPy scalars"
    assert 1 <= len(grid) <= 2 and len(block) == 1
    assert grid[0] <= cfg.GPU_MAX_BLOCKS and (len(grid) == 1 or grid[1] <= gps.MAX_GRID_Y)
    LAUNCHES.append((hc.symbol(name, targ), grid))


def _build(d: pathlib.Path, own: str, core: str | None = None) -> hc.Kernels:
    core = _modules.own_source("core") if core is None else core
    src = core + "\n" + own  # as _modules.source("per_sample")
    return hc.build(d, "per_sample", src, KERNELS, _record)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> hc.Kernels:
    d = tmp_path_factory.mktemp("cuda_per_sample_host")
    return _build(d, _modules.own_source("per_sample"))


def _use(calls: hc.Kernels, mp: pytest.MonkeyPatch, split: bool = True) -> None:
    hc.use(
        mp,
        calls,
        GPU_BLOCK=64,  # two warps: block_reduce's cross-warp step runs
        GPU_FINISH_BLOCK=64,
        GPU_MAX_BLOCKS=3,  # grid-stride loops
    )
    mp.setattr(gps, "POW_CHUNK", 16)  # several chunks per row (a multiple of every V)
    mp.setattr(gps, "PASS2_BLOCK", 8)
    mp.setattr(gps, "TARGET_BLOCKS", 64 if split else 1)  # row groups + combine, or none
    mp.setattr(gps, "MIN_SPLIT_ROWS", 2)
    _EMU.REGIONS.clear()
    LAUNCHES.clear()


@pytest.fixture
def compiled(library: dict[tuple[str, str], Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    _use(library, monkeypatch)
    return library


# ------------------------------------------------------------------ helpers

ORDS = {2: (2, 2.0), 1: (1, 1.0), math.inf: (0, math.inf), 3: (3, 3.0)}
DTYPES = [np.float32, np.float16] + ([BF16] if BF16 is not None else []) + [np.float64]


def _run(arrays: list[np.ndarray], bounds: Any, ord: float, per_layer: bool, reduce: Any,
         eps: float = 1e-6) -> tuple[list[np.ndarray], np.ndarray, int]:  # fmt: skip
    code, p = ORDS[ord]
    HostLib.syncs = 0
    _EMU._reg(*arrays)
    b = np.broadcast_to(np.asarray(bounds, np.float64), (len(arrays),)).copy()
    outs, norms, n = gps.clip_per_sample_gpu(
        HostLib, arrays, arrays[0].shape[0], code, p, b, per_layer, reduce, eps
    )
    assert HostLib.syncs == (1 if arrays[0].shape[0] else 0) and type(n) is int
    return outs, norms, n


def _emulated(arrays, bounds, ord, per_layer, reduce, eps=1e-6):
    # (the emulation's weighted sum multiplies inf by a factor 0 without np.errstate)
    with pytest.MonkeyPatch.context() as mp, np.errstate(invalid="ignore"):
        mp.setattr(
            _modules, "kernel", lambda feature, device, name, targ: _EMU._emulate(name, targ)
        )
        _tables.TABLES.clear()
        return _run(arrays, bounds, ord, per_layer, reduce, eps)


def _tol(dtype: Any) -> float:
    return {np.float16: 2e-3, np.float32: 1e-6, np.float64: 1e-12}.get(dtype, 1e-2)


def _close(got: np.ndarray, want: np.ndarray, data: np.ndarray, reduce: Any,
           factor_rtol: float = 0.0, mags: np.ndarray | None = None) -> None:  # fmt: skip
    """Outputs within the dtype's rounding (or the factors', if coarser): for sums
    relative to the summed magnitudes of the clipped rows (``mags``; of the data if not
    given), so a sum of rows clipped to 1e-25 is checked at 1e-31, not at the data's
    scale."""
    t = max(_tol(data.dtype.type), factor_rtol)
    g = np.asarray(got, np.float64)
    # subnormal results (float16 below 6e-5) are exact to half their spacing only
    bf16 = BF16 is not None and data.dtype == BF16
    tiny = 2.0**-133 if bf16 else float(np.finfo(data.dtype).smallest_subnormal)
    if reduce is None:
        np.testing.assert_allclose(g, want, rtol=t, atol=tiny)
    else:
        scale = np.abs(np.asarray(data, np.float64)).sum(axis=0) if mags is None else mags
        ok = (np.abs(g - want) <= t * scale + tiny) | (np.isnan(g) & np.isnan(want))
        assert ok.all(), (g, want)


def _cpu_arrays(arrays: list[np.ndarray]) -> list[Any]:
    """Copies for the CPU route; with bfloat16 (ml_dtypes: NumPy kind "V", which it
    refuses) torch CPU tensors, bfloat16 converted exactly through float32."""
    if BF16 is None or all(a.dtype != BF16 for a in arrays):
        return [np.array(a) for a in arrays]
    return [
        torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
        if a.dtype == BF16
        else torch.from_numpy(np.array(a))
        for a in arrays
    ]


def _host(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.double().numpy()
    return np.asarray(x, np.float64)


def _check(arrays, bounds, ord, per_layer, reduce, eps=1e-6, oracle=None, emulation=True,
           cpu_route=True):  # fmt: skip
    """The compiled kernels against the oracle (``ref.clip_per_sample``'s result, unless
    given), the CPU route and the emulation (each unless told not to)."""
    outs, norms, n = _run(arrays, bounds, ord, per_layer, reduce, eps)
    wide = any(a.dtype == np.float64 for a in arrays)
    assert norms.dtype == (np.float64 if wide else np.float32)
    # float32 blocks for 16/32-bit data (float64 norms too where another array is float64)
    rt = 1e-12 if all(a.dtype == np.float64 for a in arrays) else 1e-6
    given = oracle
    if oracle is None:
        oracle = ref.clip_per_sample(arrays, bounds, ord, per_layer, reduce, eps)
    r_outs, r_norms, r_n = oracle
    mags = [None] * len(arrays)
    if reduce is not None and given is None:
        with np.errstate(invalid="ignore"):  # inf * 0
            rows = ref.clip_per_sample(arrays, bounds, ord, per_layer, None, eps)[0]
        div = arrays[0].shape[0] if reduce == "mean" else 1
        mags = [np.abs(r).sum(axis=0) / max(div, 1) for r in rows]
    assert n == r_n
    np.testing.assert_allclose(norms, r_norms, rtol=rt)
    for a, o, r, m in zip(arrays, outs, r_outs, mags, strict=True):
        assert o.dtype == a.dtype and o.shape == (a.shape if reduce is None else a.shape[1:])
        _close(o, r, a, reduce, rt, m)
    if not cpu_route:
        return outs, norms, n
    cpu = fastclip.clip_per_sample(
        _cpu_arrays(arrays), list(np.broadcast_to(bounds, (len(arrays),)))
        if per_layer else bounds, ord, per_layer=per_layer, reduce=reduce, eps=eps,
    )  # fmt: skip
    assert cpu.n_clipped == n
    np.testing.assert_allclose(_host(cpu.norms), norms, rtol=rt)
    for a, o, c, m in zip(arrays, outs, cpu.grads, mags, strict=True):
        _close(o, _host(c), a, reduce, rt, m)
    if not emulation:
        return outs, norms, n
    e_outs, e_norms, e_n = _emulated(arrays, bounds, ord, per_layer, reduce, eps)
    assert e_n == n
    np.testing.assert_allclose(e_norms, norms, rtol=rt)
    for a, o, e, m in zip(arrays, outs, e_outs, mags, strict=True):
        _close(o, np.asarray(e, np.float64), a, reduce, rt, m)
    return outs, norms, n


def _data(cols: list[tuple[int, ...]], dtype: Any, batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((batch, *c)) * (0.3 + k)).astype(dtype) for k, c in enumerate(cols)
    ]


def _medians(arrays: list[np.ndarray], ord: float, per_layer: bool) -> Any:
    """Bounds at the median norm (per array at the 0.9 quantile with per_layer, as any
    array clipped counts the sample): some samples clipped, some not."""
    _, norms, _ = ref.clip_per_sample(arrays, 1.0, ord, per_layer, None, 0.0)
    med = np.quantile(norms, 0.9 if per_layer else 0.5, axis=-1)
    return [float(m) if m > 0 else 1.0 for m in med] if per_layer else float(med)


#: odd per-sample sizes (scalar tails; rows alternate in 16-byte alignment), sizes a
#: multiple of every vector width (pass 2's vector loads), an empty array, one column
SHAPES = [(37,), (2, 8), (0,), (5,), (1,), (3, 11)]


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize("reduce", ["sum", "mean", None])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("ord", [2, 1, math.inf, 3])
def test_the_cuda_source_clips_per_sample(compiled: Any, ord: float, per_layer: bool,
                                          reduce: Any) -> None:  # fmt: skip
    arrays = _data(SHAPES, np.float32, 9, 0)
    assert arrays[1].ctypes.data % 16 == 0  # pass 2 takes 16-byte vectors of this array
    bounds = _medians(arrays, ord, per_layer)
    _, _, n = _check(arrays, bounds, ord, per_layer, reduce)
    assert 0 < n < 9  # some samples clipped, some not
    names = [name for name, _ in LAUNCHES]
    assert names.count("fastclip_ps_factors_" + "float") == (3 if ord == 3 else 1)
    if reduce is not None:  # the batch was split into row groups
        assert "fastclip_ps_combine_float" in names


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduce", ["sum", None])
@pytest.mark.parametrize("split", [True, False])
def test_the_cuda_source_dtypes_and_row_blocks(library: Any, monkeypatch: pytest.MonkeyPatch,
                                               dtype: Any, reduce: Any, split: bool) -> None:  # fmt: skip
    """70 samples: more than one 64-row float32 block in pass 2 (split=False)."""
    _use(library, monkeypatch, split)
    arrays = _data([(33,), (2, 8), (5,)], dtype, 70, 1)
    _check(arrays, _medians(arrays, 2, False), 2, False, reduce)
    _check(arrays, _medians(arrays, 2, True), 2, True, reduce)
    combined = any("combine" in name for name, _ in LAUNCHES)
    assert combined == (split and reduce is not None)


def test_the_cuda_source_on_misaligned_rows(compiled: Any) -> None:
    """Contiguous rows that are not 16-byte aligned: pass 1's scalar heads, pass 2's
    scalar loop although the columns are a multiple of the vector width."""
    buf = np.random.default_rng(2).standard_normal(9 * 8 + 1).astype(np.float32)
    x = buf[1:].reshape(9, 8)
    assert x.flags.c_contiguous and x.ctypes.data % 16 != 0
    for reduce in ("sum", None):
        _check([x], 1.0, 2, False, reduce)


def _opacus(grads: list[torch.Tensor], max_grad_norm: float, p: float) -> tuple[Any, Any]:
    """Opacus' flat clipping (``DPOptimizer.clip_and_accumulate``), the norm generalised
    to ``p``: per-layer per-sample norms, their norm, the clamped factor, the einsum."""
    # (an empty array adds nothing to a norm; torch has no max over an empty dimension)
    rows = [g.reshape(len(g), -1) for g in grads if math.prod(g.shape[1:])]
    norms = torch.stack([g.norm(p, dim=-1) for g in rows], dim=1)
    per_sample = norms.norm(p, dim=1)
    factor = (max_grad_norm / (per_sample + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...", factor, g) for g in grads], per_sample


@pytest.mark.parametrize("ord", [2, 1, math.inf])
def test_the_cuda_source_is_opacus_flat_clipping(compiled: Any, ord: float) -> None:
    arrays = _data(SHAPES, np.float32, 9, 3)
    arrays[0][4] = 0.0  # a zero-norm sample, factor 1 (C / 1e-6 clamped)
    for a in arrays[1:]:
        a[4] = 0.0
    outs, norms, n = _run(arrays, 2.0, ord, False, "sum")
    t_outs, t_norms = _opacus([torch.from_numpy(a) for a in arrays], 2.0, ord)
    assert norms[4] == 0.0 and n == int((t_norms > 2.0).sum())
    np.testing.assert_allclose(norms, t_norms.numpy(), rtol=1e-6)
    for a, o, t in zip(arrays, outs, t_outs, strict=True):
        _close(o, t.double().numpy(), a, "sum")
    wide, _ = _opacus([torch.from_numpy(a).double() for a in arrays], 2.0, ord)
    for a, o, t in zip(arrays, outs, wide, strict=True):
        _close(o, t.numpy(), a, "sum")


@pytest.mark.parametrize("reduce", ["sum", None])
def test_the_cuda_source_zero_and_non_finite_samples(compiled: Any, reduce: Any) -> None:
    """A zero sample keeps factor 1; NaN gives a NaN norm and factor (not counted), inf
    norm inf and factor 0 (inf * 0: NaN), as the oracle, the CPU route and torch."""
    arrays = _data([(13,), (2, 8)], np.float32, 7, 4)
    arrays[0][1] = 0.0
    arrays[1][1] = 0.0
    arrays[0][3, 5] = np.nan
    arrays[1][5, 0, 3] = np.inf
    for ord in (2, 1, math.inf):
        outs, norms, n = _check(arrays, 1.0, ord, False, reduce, eps=0.0)
        assert norms[1] == 0.0 and np.isnan(norms[3]) and norms[5] == np.inf
        assert n == int(np.sum(norms > 1.0))  # NaN is not counted (NaN < 1 is false)
        t_outs, t_norms = _opacus([torch.from_numpy(a) for a in arrays], 1.0, ord)
        np.testing.assert_allclose(norms, t_norms.numpy(), rtol=1e-6)
        if reduce is None:
            np.testing.assert_array_equal(outs[0][1], 0.0)
            assert np.isnan(outs[0][3]).all() and np.isnan(outs[1][5, 0, 3])
        else:
            assert np.isnan(outs[0]).all() and np.isnan(outs[1]).all()
            np.testing.assert_array_equal(np.isnan(outs[0]), np.isnan(t_outs[0].numpy()))


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("ord", [2, 3])
def test_the_cuda_source_rescales_extreme_samples(compiled: Any, ord: float,
                                                  per_layer: bool) -> None:  # fmt: skip
    """float64 samples of 1e200 and 1e-200 beside ordinary and zero ones: the three
    rescaling stages give the oracle's norms and clipped samples of the unscaled data
    times the scale (with eps 0, clipping s * g to s * C is s times clipping g to C)."""
    base = _data([(7,), (2, 8), (1,)], np.float64, 6, 5)
    base[0][2] = 0.0
    scales = np.array([1e200, 1.0, 1.0, 1e-200, 1e200, 3.0])
    arrays = [b * scales.reshape((6,) + (1,) * (b.ndim - 1)) for b in base]
    bounds = _medians(base, ord, per_layer)
    _, plain, _ = ref.clip_per_sample(base, bounds, ord, per_layer, None, 0.0)
    # each sample's bound times its own scale is not one bound: clip at C, compare
    # norms (scaled) and the clipped rows of the unscaled data's oracle (scaled back)
    outs, norms, n = _run(arrays, bounds, ord, per_layer, None, 0.0)
    np.testing.assert_allclose(norms, plain * scales, rtol=1e-12)
    assert np.isfinite(norms).all()
    e_outs, e_norms, e_n = _emulated(arrays, bounds, ord, per_layer, None, 0.0)
    cpu = fastclip.clip_per_sample(arrays, bounds, ord, per_layer=per_layer, reduce=None, eps=0.0)
    assert (
        n
        == e_n
        == cpu.n_clipped
        == int(
            np.count_nonzero(norms.reshape(-1, 6) > np.asarray(bounds).reshape(-1, 1), axis=0)
            .astype(bool)
            .sum()
        )
    )
    np.testing.assert_allclose(e_norms, norms, rtol=1e-12)
    np.testing.assert_allclose(cpu.norms, norms, rtol=1e-12)
    for o, e, c in zip(outs, e_outs, cpu.grads, strict=True):
        np.testing.assert_allclose(o, e, rtol=1e-12, atol=0.0)
        np.testing.assert_allclose(o, c, rtol=1e-12, atol=0.0)
    with np.errstate(divide="ignore"):  # a zero norm: factor 1
        f = np.minimum(1.0, np.asarray(bounds).reshape(-1, 1) / norms.reshape(-1, 6))
    for k, (a, o) in enumerate(zip(arrays, outs, strict=True)):
        fk = f[k if per_layer else 0].reshape((6,) + (1,) * (a.ndim - 1))
        np.testing.assert_allclose(o, a * fk, rtol=1e-12, atol=0.0)  # the factors are finite
    sub = np.array([[3e-310, 4e-310], [3.0, 4.0]])
    want = [sub * np.array([[1.0], [1e-309 / 5.0]])], np.hypot(sub[:, 0], sub[:, 1]), 1
    _, norms, n = _check([sub], 1e-309, 2, False, None, eps=0.0, oracle=want)


@pytest.mark.parametrize("ord", [2, 1, math.inf, 3])
def test_the_cuda_source_on_mixed_dtypes(compiled: Any, ord: float) -> None:
    """float32, float64, float16 (and bfloat16) arrays in one call: float64 norms, each
    output in its array's dtype, the 16-bit rows summed at their own precision."""
    a, b, c = _data([(37,), (2, 5), (9,)], np.float32, 11, 8)
    arrays = [a, b.astype(np.float64), c.astype(np.float16)]
    if BF16 is not None:
        arrays.append(a[:, :13].astype(BF16))
    for per_layer in (False, True):
        _, norms, _ = _check(arrays, _medians(arrays, ord, per_layer), ord, per_layer, "sum")
        assert norms.dtype == np.float64
    assert {n for n, _ in LAUNCHES if "factors" in n} == {"fastclip_ps_factors_double"}


@pytest.mark.parametrize("dtype", [np.float32] + ([BF16] if BF16 is not None else []),
                         ids=lambda d: np.dtype(d).name)  # fmt: skip
@pytest.mark.parametrize("reduce", ["sum", None])
def test_the_cuda_source_float32_squares_beyond_float32(compiled: Any, reduce: Any,
                                                        dtype: Any) -> None:  # fmt: skip
    """Samples of 1e20, 1e-20 and 1e-23 (float32, bfloat16): squares beyond float32's
    range, float32 subnormals, below its smallest subnormal.  Pass 1 redoes such a
    thread's share in float64, as the CPU route (its F32_TINY rule): norms as the
    oracle's.  The kernels once summed the tiny squares in float32: the 1e-20 sample's
    norm was 1.5e-6 off, the 1e-23 sample's 0, so a bound of 1e-25 left it unclipped."""
    x = _data([(41,)], np.float32, 6, 9)[0]
    x[1] *= np.float32(1e20)
    x[3] *= np.float32(1e-20)
    x[4] *= np.float32(1e-23)
    x = x.astype(dtype)
    _, norms, n = _check([x], 1.0, 2, False, reduce)
    assert np.isfinite(norms).all() and norms[1] > 1e20 and 0.0 < norms[3] < 1e-19
    assert n == 4  # all but the 1e-20 and 1e-23 samples
    # (the emulation multiplies by float32 factors: the 1e20 sample's factor 5e-46 is 0
    # there, see test_the_cuda_source_takes_tiny_factors; the CPU route's sum drops that
    # sample too, see test_the_cpu_route_sums_tiny_factors_beside_larger_ones)
    _, norms, n = _check([x], 1e-25, 2, False, reduce, eps=0.0, emulation=False,
                         cpu_route=reduce is None)  # fmt: skip
    assert n == 6 and norms[4] > 1e-23


def test_the_cpu_route_sums_tiny_factors_beside_larger_ones(compiled: Any) -> None:
    """The case above, summed: the compiled kernels give the oracle's sum (within 1e-6 of
    the clipped rows' magnitudes), and so does the CPU route (it dropped the rows of
    factors below float32's range beside larger ones until it summed them in groups;
    tests/api/test_per_sample.py checks that on every CPU backend)."""
    x = _data([(41,)], np.float32, 6, 9)[0]
    x[1] *= np.float32(1e20)
    x[3] *= np.float32(1e-20)
    x[4] *= np.float32(1e-23)
    want = ref.clip_per_sample([x], 1e-25, 2, False, "sum", 0.0)[0][0]
    mags = np.abs(ref.clip_per_sample([x], 1e-25, 2, False, None, 0.0)[0][0]).sum(axis=0)
    outs, _, _ = _run([x], 1e-25, 2, False, "sum", 0.0)
    _close(outs[0], want, x, "sum", mags=mags)  # the GPU kernels: right
    cpu = fastclip.clip_per_sample(np.array(x), 1e-25, eps=0.0)
    _close(cpu.grads, want, x, "sum", mags=mags)  # the CPU route (was about 2e-26 off)


@pytest.mark.parametrize("dtype", [np.float32, np.float16] + ([BF16] if BF16 is not None else []),
                         ids=lambda d: np.dtype(d).name)  # fmt: skip
@pytest.mark.parametrize("reduce", ["sum", "mean", None])
def test_the_cuda_source_takes_tiny_factors(compiled: Any, reduce: Any, dtype: Any) -> None:
    """16/32-bit samples clipped by factors below float32's range (norm 4e4 or 3e20
    clipped to 1e-40 or 1e-25: f down to 2.5e-45, 0 as a float32 after rounding) or
    below 2**-60 (products leaving its normal range): multiplied in float64, so the
    clipped rows and their sums are the CPU route's and the oracle's, not 0.  The kernels
    once multiplied by (float)f: 0 for every such sample."""
    big = 1e20 if dtype != np.float16 else 1e4
    x = _data([(9,), (2, 8)], np.float64, 4, 10)
    x = [(a * big).astype(dtype) for a in x]
    for bound in (1e-25, 1e-40, big * 1e-19):
        outs, _, n = _check(x, bound, 2, False, reduce, eps=0.0, emulation=False)
        assert n == 4
        if dtype != np.float16 and bound != 1e-40:  # (else the results round to 0)
            assert all(np.all(np.asarray(o, np.float64) != 0.0) for o in outs)


@pytest.mark.parametrize("reduce", ["sum", "mean", None])
def test_the_cuda_source_empty_batch(compiled: Any, reduce: Any) -> None:
    arrays = [np.zeros((0, 5), np.float32), np.zeros((0, 2, 3), np.float32)]
    for per_layer in (False, True):
        outs, norms, n = _run(arrays, 1.0, 2, per_layer, reduce)
        assert LAUNCHES == []  # a grid of 0 blocks is a launch error
        cpu = fastclip.clip_per_sample(arrays, 1.0, per_layer=per_layer, reduce=reduce)
        assert n == cpu.n_clipped == 0 and norms.shape == np.shape(cpu.norms)
        for o, c in zip(outs, cpu.grads, strict=True):
            np.testing.assert_array_equal(o, c)


def _per_layer_sum() -> None:
    arrays = _data(SHAPES, np.float32, 9, 0)
    _check(arrays, _medians(arrays, 2, True), 2, True, "sum")


def _tiny_norms() -> None:
    x = _data([(41,)], np.float32, 6, 9)[0]
    x[4] *= np.float32(1e-23)
    _check([x], 1.0, 2, False, None)


def _tiny_factors() -> None:
    x = [(a * 1e20).astype(np.float32) for a in _data([(9,), (2, 8)], np.float64, 4, 10)]
    _check(x, 1e-25, 2, False, "sum", eps=0.0, emulation=False)


#: deliberate breaks of the .cu, each switched on at run time by g_break (one build),
#: and a check that catches it
BREAKS = {
    "vector loads of pass 2": (
        "(A)ld(v.u.v, j) * c;", "(A)ld(v.u.v, g_break == 1 ? 0 : j) * c;", _per_layer_sum
    ),
    "per-layer clipped count": (
        "clipped = clipped ||", "clipped = (g_break != 2 && clipped) ||", _per_layer_sum
    ),
    "row-group combine": (
        "for (i64 k = 0; k < n_splits;", "for (i64 k = (g_break == 3); k < n_splits;",
        _per_layer_sum,
    ),
    "ragged last chunk": (
        "const i64 n = min(chunk, cols - start);",
        "const i64 n = min(chunk, cols - start - (g_break == 4));",
        _per_layer_sum,
    ),
    "float64 redo of float32 underflow": (
        "const bool tiny = ord_code == 2 &&", "const bool tiny = g_break != 5 && ord_code == 2 &&",
        _tiny_norms,
    ),
    "float64 rows of tiny factors": (
        "return acc_bytes == 4 &&", "return g_break != 6 && acc_bytes == 4 &&", _tiny_factors
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> hc.Kernels:
    own = _modules.own_source("per_sample")
    core = _modules.own_source("core")  # kernels.cu: chunk_pow_sum's underflow redo
    for old, new, _ in BREAKS.values():
        assert own.count(old) + core.count(old) == 1, old
        if old in own:
            own = own.replace(old, new)
        else:
            core = core.replace(old, new)
    core = 'extern "C" { int g_break = 0; }\n' + core
    return _build(tmp_path_factory.mktemp("cuda_per_sample_broken"), own, core)


@pytest.mark.parametrize("what", list(BREAKS))
def test_a_broken_cuda_source_is_caught(broken: hc.Kernels,
                                        monkeypatch: pytest.MonkeyPatch, what: str) -> None:  # fmt: skip
    switch = ctypes.c_int.in_dll(broken.lib, "g_break")
    _use(broken, monkeypatch)
    check = BREAKS[what][2]
    switch.value = 0
    check()  # the hooks themselves change nothing
    switch.value = list(BREAKS).index(what) + 1
    try:
        with pytest.raises(AssertionError):
            check()
    finally:
        switch.value = 0
