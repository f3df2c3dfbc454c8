"""The fused optimizers' CUDA source (``optim_kernels.cu`` appended to ``kernels.cu``,
as ``_modules.source("optim")`` compiles it) built for the host and run under the GPU
driver (``fastclip/_gpu/_optim.py``, ``_optim_plan.py``), without a GPU.

The shim of ``tests/_host_cuda.py`` (every CUDA thread of a block a host thread,
``__half`` as ``_Float16``, bfloat16 the upper half of a float32, the correctly
rounded intrinsics the optimizer kernels call -- ``__fmul_rn``, ``__fmaf_rn``, ... --
as the host's IEEE operations and ``std::fma``) is used.  The driver's
launches of ``fastclip_partial_pow_sum``, ``fastclip_finish``, ``fastclip_adamw``
and ``fastclip_sgd`` go to that library through ctypes, with torch CPU tensors as
device memory (so bfloat16 runs too).  The kernel text that ships -- the table
walk, the 16-byte vector path and its scalar tail, the hyper-parameter rows, the
guards of ``nonfinite="skip"``, the coefficient's float64 fallback -- is checked
against the CPU route (same operations, same coefficient: bit for bit), against
``torch.optim``'s float32 SGD (bit for bit) and AdamW (moments bit for bit, the
parameters to one ulp, as the CPU route), against the float64 formulas of
``tests/reference.py`` and against the NumPy emulation of
``test_gpu_optim_emulated.py``.  A break of the source fails these checks.

Skips, with the reason, where no C++ compiler with C++20 ``<barrier>`` and
``_Float16`` (GCC 12, Clang 15) is on the PATH.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import _host_cuda as hc
import numpy as np
import pytest
import reference

from fastclip import NonFiniteNormError, optim
from fastclip import _gpu as G
from fastclip._gpu import _modules, _tables
from fastclip._hparams import adamw_hparams, sgd_hparams

torch = pytest.importorskip("torch")

_EMU = hc.emulated_test_module("test_gpu_optim_emulated")
#: torch CPU tensors through the GPU adapter interface (pointers = host addresses)
TorchLib = _EMU.TorchHostLib

#: kernel -> its template arguments (T element, N norm type)
ELEMENTS = tuple(_modules.ELEMENT_TYPES.values())
KERNELS = {
    "fastclip_partial_pow_sum": ELEMENTS,
    "fastclip_finish": _modules.NORM_TYPES,
    "fastclip_adamw": ELEMENTS,
    "fastclip_sgd": ELEMENTS,
}
LAUNCHES: list[str] = []


def _build(d: pathlib.Path, source: str) -> hc.Kernels:
    def record(name: str, targ: str, grid: Any, block: Any, args: Any) -> None:
        LAUNCHES.append(name)

    return hc.build(d, "optim", source, KERNELS, record)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> hc.Kernels:
    return _build(tmp_path_factory.mktemp("cuda_optim_host"), _modules.source("optim"))


def _use(library: hc.Kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    hc.use(
        monkeypatch,
        library,
        GPU_CHUNK=256,  # chunks start 16-byte aligned in every dtype
        # one warp (the norm's shuffles need whole warps): 1001 float32 take two vectors a thread
        GPU_BLOCK=32,
        GPU_FINISH_BLOCK=64,
        GPU_MAX_BLOCKS=2,  # grid-stride loops over the chunks
    )
    monkeypatch.setattr(TorchLib, "syncs", 0)
    LAUNCHES.clear()


@pytest.fixture
def compiled(library: hc.Kernels, monkeypatch: pytest.MonkeyPatch) -> hc.Kernels:
    _use(library, monkeypatch)
    return library


# ------------------------------------------------------------------- data

#: odd sizes: 16-byte vectors and scalar tails, a four-chunk tensor; tensor 3 starts
#: one element into its buffer (16-byte vectors nowhere: the scalar loop alone)
SIZES = (37, 1, 1001, 9, 0, 5, 130)
MISALIGNED = 3
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DTYPES.update(float16=torch.float16, bfloat16=torch.bfloat16)
#: float64-formula tolerance after three steps (16-bit: one rounding per stored value)
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _lists(dtype: Any, seed: int, n_lists: int, scale: float = 2.0) -> list[list[Any]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_lists):
        lst = [(torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
               for n in SIZES]  # fmt: skip
        if k >= 3:  # the second moment and its max are >= 0
            lst = [t.abs() for t in lst]
        base = torch.empty(SIZES[MISALIGNED] + 1, dtype=dtype)
        lst[MISALIGNED] = base[1:].copy_(lst[MISALIGNED])
        out.append(lst)
    return out


def _clone(lists: list[list[Any]]) -> list[list[Any]]:
    return [[t.clone() for t in lst] for lst in lists]


def _same(got: list[Any], want: list[Any]) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _ulp(got: list[Any], want: list[Any]) -> None:
    """Within one float32 ulp.  torch's single-tensor float32 AdamW and fastclip's
    kernels (CPU and GPU, same bits) round the parameter's update differently on a
    few elements: 578 of 100,000 parameters one ulp apart after one step (lr 1e-2,
    betas (0.85, 0.99), eps 1e-6, weight decay 0.1); the moments agree bit for bit."""
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_max_ulp(a.numpy(), b.numpy(), maxulp=1)


ADAMW = dict(lr=1e-2, betas=(0.85, 0.99), eps=1e-6, weight_decay=0.1)


def _gpu_adamw(lists: list[list[Any]], steps: Any, amsgrad: bool, maximize: bool,
               **clip: Any) -> Any:  # fmt: skip
    p, g, m, v, x = lists
    kw = dict(max_norm=None, total_norm=None, clip_coef=None, nonfinite="propagate")
    kw.update(clip)
    b1, b2 = ADAMW["betas"]
    counts = [float(steps)] * len(p) if np.ndim(steps) == 0 else [float(s) for s in steps]
    hp = adamw_hparams(counts, ADAMW["lr"], b1, b2, ADAMW["eps"], ADAMW["weight_decay"])
    return G.adamw_step_gpu(
        TorchLib, p, g, m, v, x if amsgrad else None, hp, maximize, kw["max_norm"], 2.0,
        kw["total_norm"], kw["clip_coef"], 1e-6, kw["nonfinite"],
    )  # fmt: skip


def _cpu_adamw(lists: list[list[Any]], steps: Any, amsgrad: bool, maximize: bool,
               coef: float) -> None:  # fmt: skip
    p, g, m, v, x = lists
    optim.adamw_step_(
        p, g, m, v, step=steps, max_exp_avg_sqs=x if amsgrad else None, maximize=maximize,
        clip_coef=coef, **ADAMW,
    )  # fmt: skip


# ------------------------------------------------------------------ AdamW


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("coef", ["host", "device", "one"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_adamw_gives_the_cpu_routes_bits(
    compiled: Any, dtype: str, coef: str, maximize: bool, amsgrad: bool
) -> None:
    """Same coefficient, same operations: the CPU route's bits, three steps, one
    uniform and one per-tensor step count (device hparams rows)."""
    ours = _lists(DTYPES[dtype], 0, 5)
    cpu = _clone(ours)
    c = 1.0 if coef == "one" else 0.37
    given: Any = torch.tensor(c, dtype=torch.float64) if coef == "device" else c
    for k, steps in enumerate([1, [2, 3, 2, 5, 7, 1, 3], 4]):
        if k:
            ours[1] = _lists(DTYPES[dtype], k, 2)[1]
            cpu[1] = [t.clone() for t in ours[1]]
        assert _gpu_adamw(ours, steps, amsgrad, maximize, clip_coef=given) is None
        _cpu_adamw(cpu, steps, amsgrad, maximize, c)
        for got, want in zip(ours, cpu):
            _same(got, want)
    assert LAUNCHES.count("fastclip_adamw") == 3 and TorchLib.syncs == 0


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_float32_matches_torch_optim(compiled: Any, amsgrad: bool) -> None:
    """float32, clip_coef < 1 and = 1: torch.optim.AdamW (single-tensor) on the
    gradients multiplied by the float32 coefficient, as clip_grad_norm_ does."""
    for c in (0.37, 1.0):
        ours = _lists(torch.float32, 3, 5)
        ours[2] = [torch.zeros_like(t) for t in ours[0]]
        ours[3] = [torch.zeros_like(t) for t in ours[0]]
        ours[4] = [torch.zeros_like(t) for t in ours[0]]
        params = [torch.nn.Parameter(t.clone()) for t in ours[0]]
        ref = torch.optim.AdamW(params, amsgrad=amsgrad, foreach=False, **ADAMW)
        for k in range(1, 4):
            ours[1] = _lists(torch.float32, 10 + k, 2)[1]
            with torch.no_grad():  # both steps start from the same parameters
                for q, t in zip(params, ours[0]):
                    q.copy_(t)
            _gpu_adamw(ours, k, amsgrad, False, clip_coef=c)
            for q, gr in zip(params, ours[1]):
                q.grad = gr * torch.tensor(c, dtype=torch.float32)
            ref.step()
            _ulp(ours[0], [q.detach() for q in params])
            _same(ours[2], [ref.state[q]["exp_avg"] for q in params])
            _same(ours[3], [ref.state[q]["exp_avg_sq"] for q in params])
            if amsgrad:
                _same(ours[4], [ref.state[q]["max_exp_avg_sq"] for q in params])


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_adamw_max_norm_follows_the_float64_formulas(
    compiled: Any, dtype: str, amsgrad: bool
) -> None:
    """The device norm and coefficient (partial sums + finish) feeding the fused
    kernel: reference.adamw_step with min(1, max_norm / (norm + eps)) in float64;
    the emulation of test_gpu_optim_emulated.py gives the same values."""
    dt = DTYPES[dtype]
    ours = _lists(dt, 5, 5)
    emu = _clone(ours)
    ref = [[t.to(torch.float64).numpy().copy() for t in lst] for lst in ours]
    b1, b2 = ADAMW["betas"]
    for k in range(1, 4):
        grads = _lists(dt, 20 + k, 2)[1]
        ours[1], emu[1] = grads, grads
        g64 = [t.to(torch.float64).numpy() for t in grads]
        total = math.sqrt(sum(float(np.sum(a * a)) for a in g64))
        norm = _gpu_adamw(ours, k, amsgrad, False, max_norm=1.5)
        assert float(norm) == pytest.approx(total, rel=1e-6)
        coef = min(1.0, 1.5 / (total + 1e-6))
        assert coef < 0.5
        for i in range(len(SIZES)):
            out = reference.adamw_step(
                ref[0][i], g64[i], ref[2][i], ref[3][i], ref[4][i] if amsgrad else None, k,
                ADAMW["lr"], b1, b2, ADAMW["eps"], ADAMW["weight_decay"], coef,
            )  # fmt: skip
            for j, want in zip((0, 2, 3, 4), out):
                if want is None:
                    continue
                got = ours[j][i].to(torch.float64).numpy()
                np.testing.assert_allclose(got, want, rtol=RTOL[dt], atol=RTOL[dt] * 1e-2)
                ref[j][i] = got.copy()  # the reference goes on from the stored values
        if dtype != "bfloat16":  # the emulation's element types
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(_modules, "kernel", lambda f, dev, n, t: _EMU._emulate(dev, n, t))
                _tables.TABLES.clear()
                _gpu_adamw(emu, k, amsgrad, False, max_norm=1.5)
                _tables.TABLES.clear()
            for got, want in zip(ours, emu):
                for a, b in zip(got, want):
                    # the NumPy emulation rounds a*b+c twice (float64, then the type)
                    # where the kernel fuses: equal in float32 (a product of two float32
                    # is exact in float64), a few float64 ulps apart in float64
                    rtol = 1e-14 if dt == torch.float64 else 0.0
                    torch.testing.assert_close(a, b, rtol=rtol, atol=0)


# -------------------------------------------------------------------- SGD

SGD_VARIANTS = _EMU.SGD_VARIANTS  # momentum, dampening, weight decay, Nesterov


def _gpu_sgd(p: list[Any], g: list[Any], b: list[Any], hv: dict[str, Any], first: Any,
             maximize: bool = False, **clip: Any) -> Any:  # fmt: skip
    kw = dict(max_norm=None, total_norm=None, clip_coef=None, nonfinite="propagate")
    kw.update(clip)
    hp = sgd_hparams(len(p), 0.05, hv["momentum"], hv["dampening"], hv["weight_decay"],
                     hv["nesterov"], first)  # fmt: skip
    return G.sgd_step_gpu(
        TorchLib, p, g, b if hv["momentum"] else None, hp, maximize, kw["max_norm"], 2.0,
        kw["total_norm"], kw["clip_coef"], 1e-6, kw["nonfinite"],
    )  # fmt: skip


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("coef", ["host", "device", "one"])
@pytest.mark.parametrize("variant", range(len(SGD_VARIANTS)))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sgd_gives_the_cpu_routes_bits(
    compiled: Any, dtype: str, variant: int, coef: str, maximize: bool
) -> None:
    """Three steps; on the first every buffer starts (old content NaN: ignored), on
    the second every other one (per-tensor modes: device hparams rows)."""
    hv = SGD_VARIANTS[variant]
    p, _, b = _lists(DTYPES[dtype], 1, 3)
    b = [torch.full_like(t, math.nan) for t in b]
    cp, cb = [t.clone() for t in p], [t.clone() for t in b]
    c = 1.0 if coef == "one" else 0.37
    given: Any = torch.tensor(c, dtype=torch.float64) if coef == "device" else c
    for k in range(3):
        g = _lists(DTYPES[dtype], 30 + k, 2)[1]
        first = [k == 0 or (k == 1 and i % 2 == 1) for i in range(len(SIZES))]
        _gpu_sgd(p, g, b, hv, first, maximize, clip_coef=given)
        optim.sgd_step_(
            cp, [t.clone() for t in g], cb if hv["momentum"] else None, lr=0.05,
            maximize=maximize, first_step=first, clip_coef=c, **hv,
        )  # fmt: skip
        _same(p, cp)
        if hv["momentum"]:
            _same(b, cb)
    assert LAUNCHES.count("fastclip_sgd") == 3 and TorchLib.syncs == 0


@pytest.mark.parametrize("variant", range(len(SGD_VARIANTS)))
def test_sgd_float32_gives_torch_optims_bits(compiled: Any, variant: int) -> None:
    """float32, clip_coef < 1 and = 1: torch.optim.SGD (single-tensor) on the gradients
    times the float32 coefficient, parameters and momentum buffers bit for bit."""
    hv = SGD_VARIANTS[variant]
    for c in (0.37, 1.0):
        p, _, b = _lists(torch.float32, 2, 3)
        params = [torch.nn.Parameter(t.clone()) for t in p]
        ref = torch.optim.SGD(params, lr=0.05, foreach=False, **hv)
        for k in range(3):
            g = _lists(torch.float32, 40 + k, 2)[1]
            _gpu_sgd(p, g, b, hv, [k == 0] * len(p), clip_coef=c)
            for q, gr in zip(params, g):
                q.grad = gr * torch.tensor(c, dtype=torch.float32)
            ref.step()
            _same(p, [q.detach() for q in params])
            if hv["momentum"]:
                _same(b, [ref.state[q]["momentum_buffer"] for q in params])


@pytest.mark.parametrize("variant", [3, 4])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sgd_max_norm_follows_the_float64_formulas(compiled: Any, dtype: str, variant: int) -> None:
    hv = SGD_VARIANTS[variant]
    dt = DTYPES[dtype]
    p, _, b = _lists(dt, 6, 3)
    P = [t.to(torch.float64).numpy().copy() for t in p]
    B = [t.to(torch.float64).numpy().copy() for t in b]
    for k in range(3):
        g = _lists(dt, 50 + k, 2)[1]
        g64 = [t.to(torch.float64).numpy() for t in g]
        total = math.sqrt(sum(float(np.sum(a * a)) for a in g64))
        norm = _gpu_sgd(p, g, b, hv, [k == 0] * len(p), max_norm=1.5)
        assert float(norm) == pytest.approx(total, rel=1e-6)
        coef = min(1.0, 1.5 / (total + 1e-6))
        for i in range(len(SIZES)):
            P[i], B[i] = reference.sgd_step(
                P[i], g64[i], B[i], 0.05, hv["momentum"], hv["dampening"],
                hv["weight_decay"], hv["nesterov"], k == 0, coef,
            )  # fmt: skip
            for t, want in ((p[i], P[i]), (b[i], B[i])):
                got = t.to(torch.float64).numpy()
                np.testing.assert_allclose(got, want, rtol=RTOL[dt], atol=RTOL[dt] * 1e-2)
            P[i], B[i] = p[i].to(torch.float64).numpy().copy(), b[i].to(torch.float64).numpy()
            B[i] = B[i].copy()


# ------------------------------------- coefficients float32 cannot hold


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("where", ["host", "device"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_coefficients_outside_float32_give_the_cpu_routes_bits(
    compiled: Any, dtype: str, where: str, maximize: bool
) -> None:
    """A clip coefficient that float32 would flush to 0, hold as a subnormal or
    overflow (1e30 gradients clipped to 1e-30: 1e-60) is applied in float64 and the
    product rounded once, as the CPU route does (``normal_in_type``); in range, the
    float32 product as torch.  AdamW and SGD with momentum, CPU route's bits."""
    dt = DTYPES[dtype]
    big = 1e30 if dt in (torch.float32, torch.bfloat16) else 1e3
    for c in (1e-60, 1e-41, 3e-39, 1e39, 0.37):
        ours = _lists(dt, 9, 5)
        ours[1] = [(t.to(torch.float64) * big).to(dt) for t in ours[1]]
        ours[1][2][:7] = 0.0  # 0 * c: 0, not 0 * inf = NaN
        for k in (2, 3, 4):  # zero moments: a flushed gradient shows in them
            ours[k] = [torch.zeros_like(t) for t in ours[k]]
        cpu = _clone(ours)
        given: Any = torch.tensor(c, dtype=torch.float64) if where == "device" else c
        _gpu_adamw(ours, 1, True, maximize, clip_coef=given)
        _cpu_adamw(cpu, 1, True, maximize, c)
        for got, want in zip(ours, cpu):
            _same(got, want)
        p, g, b = ours[:3]
        hv = SGD_VARIANTS[3]
        _gpu_sgd(p, g, b, hv, None, maximize, clip_coef=given)
        optim.sgd_step_(cpu[0], g, cpu[2], lr=0.05, maximize=maximize, clip_coef=c, **hv)
        _same(p, cpu[0])
        _same(b, cpu[2])


# ------------------------------------------------------ non-finite policies


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_skip_is_decided_in_the_kernel(compiled: Any, dtype: str, bad: float) -> None:
    """The guard (float32 norm for 16/32-bit lists, float64 norm with float64 in them,
    a device clip_coef NaN or < 0): launched, nothing written, no host read; a finite
    norm or coefficient passes the same guard and gives the CPU route's bits."""
    ours = _lists(DTYPES[dtype], 7, 5)
    ours[1][2][3] = bad
    before = _clone(ours)
    norm = _gpu_adamw(ours, 1, True, False, max_norm=1.0, nonfinite="skip")
    assert not math.isfinite(float(norm))
    for coef in (math.nan, -1.0):
        c = torch.tensor(coef, dtype=torch.float64)
        _gpu_adamw(ours, 1, True, False, clip_coef=c, nonfinite="skip")
        p, _, b = ours[:3]
        _gpu_sgd(p, ours[1], b, SGD_VARIANTS[3], None, clip_coef=c, nonfinite="skip")
    assert LAUNCHES.count("fastclip_adamw") == 3 and LAUNCHES.count("fastclip_sgd") == 2
    assert TorchLib.syncs == 0
    for got, want in zip(ours, before):
        _same(got, want)
    ours[1][2][3] = 0.5  # finite: the same guard lets the step through
    cpu = _clone(ours)
    _gpu_adamw(ours, 1, True, False, clip_coef=torch.tensor(0.25, dtype=torch.float64),
               nonfinite="skip")  # fmt: skip
    _cpu_adamw(cpu, 1, True, False, 0.25)
    for got, want in zip(ours, cpu):
        _same(got, want)
    norm = _gpu_adamw(ours, 2, True, False, max_norm=1.0, nonfinite="skip")
    assert math.isfinite(float(norm))
    assert not torch.equal(ours[0][0], cpu[0][0])  # written


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_propagate_and_error(compiled: Any, dtype: str) -> None:
    """Policy "propagate": as the CPU route (an inf gradient: coefficient 0, inf * 0 NaN in
    that tensor; a NaN: NaN everywhere); "error": raises before any launch."""
    ours = _lists(DTYPES[dtype], 8, 5)
    ours[1][2][0] = math.inf
    cpu = _clone(ours)
    norm = _gpu_adamw(ours, 1, False, False, max_norm=1.0)
    assert float(norm) == math.inf
    _cpu_adamw(cpu, 1, False, False, 0.0)
    for got, want in zip(ours, cpu):
        _same(got, want)
    assert torch.isnan(ours[0][2][0]) and torch.isfinite(ours[0][0]).all()
    ours[1][2][0] = math.nan
    _gpu_adamw(ours, 2, False, False, max_norm=1.0)
    assert all(torch.isnan(t).all() for t in ours[0])
    before = _clone(ours)
    LAUNCHES.clear()
    with pytest.raises(NonFiniteNormError):
        _gpu_adamw(ours, 3, False, False, max_norm=1.0, nonfinite="error")
    p, g, b = ours[:3]
    with pytest.raises(NonFiniteNormError):
        _gpu_sgd(p, g, b, SGD_VARIANTS[2], None, max_norm=1.0, nonfinite="error")
    assert LAUNCHES.count("fastclip_adamw") == LAUNCHES.count("fastclip_sgd") == 0
    for got, want in zip(ours, before):
        _same(got, want)


# ---------------------------------------------------- a broken kernel fails


BREAKS = {
    # the vector path stops storing the first moment: the tails alone are right
    "vector_store": ("vm.store(m + i * V);", ""),
    # guard mode 1 (float32 norm) forgotten: a NaN norm writes NaN everywhere
    "guard": ("if (guard_mode == 1) return", "if (guard_mode == 99) return"),
    # the coefficient always rounded to float32 (as the kernels once did)
    "coef_range": ("return in_range ? mul(g, c)", "return true ? mul(g, c)"),
    # Nesterov's look-ahead dropped
    "nesterov": ("gi = nesterov ? fused(bi, mom, gi) : bi;", "gi = bi;"),
}


@pytest.mark.parametrize("which", list(BREAKS))
def test_a_broken_cuda_source_is_caught(
    which: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each break of BREAKS, compiled, fails the check that covers it on a value."""
    lib = _build(tmp_path, hc.broken("optim", *BREAKS[which]))
    _use(lib, monkeypatch)
    with pytest.raises(AssertionError, match="Tensor-likes are not equal"):
        if which == "vector_store":
            test_adamw_gives_the_cpu_routes_bits(lib, "float32", "host", False, False)
        elif which == "coef_range":
            test_coefficients_outside_float32_give_the_cpu_routes_bits(
                lib, "float32", "device", True
            )
        elif which == "guard":
            test_skip_is_decided_in_the_kernel(lib, "float32", math.nan)
        else:
            test_sgd_gives_the_cpu_routes_bits(lib, "float32", 4, "host", False)
