"""The arrays of one case, the float64 reference and the correctness check.

All arrays of a case are views into one contiguous *pool*; the base pool keeps
the original values and each storage (host NumPy/torch-CPU memory, a CUDA
tensor, a CuPy array) has one work pool that is reset from it before every
correctness check.  NumPy arrays and torch CPU tensors share the host pool
(``torch.from_numpy``), so the CPU backends clip the same memory.

The reference is computed in float64 from the exact base values, chunk by
chunk (no float64 copy of the data is ever held).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .workloads import Case

DTYPES = ("float32", "float64", "float16", "bfloat16")

#: Largest relative error (per element, against float64) still counted as a
#: correct result.  fastclip backends are held to fastclip's documented accuracy
#: (norm within ~1e-7 relative, so outputs within a few units of the dtype's
#: rounding); peers only to "not wrong" (their norms accumulate in the
#: input dtype: torch's float32 norm is off by ~1e-2 at 1e8 elements).  The
#: measured error of every result is reported either way.
TOLERANCE = {
    "fastclip": {"float64": 1e-10, "float32": 2e-6, "float16": 1.5e-3, "bfloat16": 1e-2},
    "peer": {"float64": 1e-8, "float32": 5e-2, "float16": 1e-1, "bfloat16": 1e-1},
}

_CHUNK = 1 << 22
#: Magnitude added to |reference| when forming a relative error, so values
#: rounded into the subnormal range do not count as wrong.
_TINY = {"float64": 1e-300, "float32": 1e-37, "float16": 1.3e-4, "bfloat16": 1e-37}

MAX_NORM_FRACTION = 0.5  # clip to half the norm, so clipping really happens
CLIP_VALUE = 1.0  # value workload: clamp standard normals to [-1, 1]

#: AdamW hyper-parameters of the ``adamw`` workload (torch.optim.AdamW's, weight decay 0.1).
ADAMW: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
#: Scale of the initial parameters of the ``adamw`` workload.
PARAM_SCALE = 0.02


class Unsupported(Exception):
    """This backend cannot run this case (reported as n/a with the reason)."""


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise Unsupported("torch is not installed") from exc
    return torch


class CaseData:
    """Base values, work pools per storage, and the reference of one case."""

    def __init__(self, case: Case, dtype: str, seed: int = 0) -> None:
        if case.kind == "adamw" and dtype not in ("float32", "float64"):
            raise Unsupported(
                "the AdamW workload runs in float32 and float64 (mixed precision keeps "
                "float32 master weights and optimizer state)"
            )
        if case.kind == "persample" and dtype not in ("float32", "float64"):
            raise Unsupported("the per-sample workload runs in float32 and float64")
        self.case = case
        self.dtype = dtype
        sizes = [math.prod(s) for s in case.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        n = int(self.offsets[-1])
        rng = np.random.default_rng(seed)
        pool: np.ndarray
        if dtype == "float64":
            pool = rng.standard_normal(n)
        else:
            pool = rng.standard_normal(n, dtype=np.float32)
        self.torch_base: Any = None
        if dtype == "bfloat16":
            torch = _torch()
            self.torch_base = torch.from_numpy(pool).to(torch.bfloat16)
            # exact float32 image of the bf16 values, for the reference
            self.ref_pool = self.torch_base.to(torch.float32).numpy()
            self.np_base: np.ndarray | None = None
        else:
            self.np_base = pool.astype(dtype, copy=False)
            self.ref_pool = self.np_base
        self.nbytes = n * (2 if dtype in ("float16", "bfloat16") else np.dtype(dtype).itemsize)
        if case.kind == "persample":  # samples of norms spread over two decades
            scales = 10.0 ** np.random.default_rng(seed + 2).uniform(-1, 1, case.shapes[0][0])
            for x in self.views_of(self.np_base):
                x *= scales.reshape((-1,) + (1,) * (x.ndim - 1)).astype(dtype)
        self.param_base: np.ndarray | None = None
        if case.kind == "adamw":
            prng = np.random.default_rng(seed + 1)
            self.param_base = (prng.standard_normal(n) * PARAM_SCALE).astype(dtype)
        self._pools: dict[str, Any] = {}
        self._reference()

    # ------------------------------------------------------------ reference

    def _chunks(self, k: int) -> Any:
        lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
        for a in range(lo, hi, _CHUNK):
            yield a - lo, self.ref_pool[a : min(hi, a + _CHUNK)].astype(np.float64)

    def _reference(self) -> None:
        case = self.case
        if case.kind in ("clip", "norm", "adamw"):
            total = 0.0
            for k in range(len(case.shapes)):
                for _, c in self._chunks(k):
                    total += float(np.dot(c, c))
            self.ref_norm = math.sqrt(total)
            self.max_norm = MAX_NORM_FRACTION * self.ref_norm
            self.coef = min(1.0, self.max_norm / (self.ref_norm + 1e-6))
        elif case.kind == "rows":
            b, d = case.shapes[0]
            x = self.ref_pool.reshape(b, d).astype(np.float64)
            self.row_norms = np.sqrt(np.einsum("ij,ij->i", x, x))
            self.max_norm = float(np.median(self.row_norms))  # half the rows are clipped
            self.row_coef = np.minimum(1.0, self.max_norm / (self.row_norms + 1e-6))
        elif case.kind == "value":
            self.clip_value = CLIP_VALUE
        elif case.kind == "persample":
            sq = np.zeros(case.shapes[0][0])
            for x in self._sample_rows():
                for b0 in range(0, x.shape[0], 16):
                    r = x[b0 : b0 + 16].astype(np.float64)
                    sq[b0 : b0 + 16] += np.einsum("ij,ij->i", r, r)
            self.sample_norms = np.sqrt(sq)
            self.max_norm = float(np.median(self.sample_norms))  # half the samples clipped
            with np.errstate(divide="ignore", invalid="ignore"):
                f = np.minimum(1.0, self.max_norm / (self.sample_norms + 1e-6))
            self.sample_coef = np.where(self.sample_norms == 0.0, 1.0, f)
            self._persample_expected: list[np.ndarray] | None = None

    def _sample_rows(self) -> list[np.ndarray]:
        """The ``per-sample`` workload's arrays as ``[B, D_k]`` views of the base values."""
        return [v.reshape(v.shape[0], -1) for v in self.views_of(self.ref_pool)]

    def persample_expected(self) -> list[np.ndarray]:
        """float64 ``sum_b f_b g_k[b]`` of every array (computed once)."""
        if self._persample_expected is None:
            out = []
            for x in self._sample_rows():
                acc = np.zeros(x.shape[1])
                for b0 in range(0, x.shape[0], 16):
                    acc += self.sample_coef[b0 : b0 + 16] @ x[b0 : b0 + 16].astype(np.float64)
                out.append(acc)
            self._persample_expected = out
        return self._persample_expected

    # ------------------------------------------------------------ storage

    def pool(self, storage: str) -> Any:
        """The work pool of ``storage`` ("host", "torch-cuda", "cupy"), created on first use."""
        if storage not in self._pools:
            if storage == "host":
                if self.np_base is not None:
                    self._pools[storage] = self.np_base.copy()
                else:
                    self._pools[storage] = self.torch_base.clone()
            elif storage == "torch-cuda":
                torch = _torch()
                src = self.torch_base if self.np_base is None else torch.from_numpy(self.np_base)
                self._pools[storage] = src.to("cuda")
            elif storage == "cupy":
                import cupy

                if self.np_base is None:
                    raise Unsupported("CuPy has no bfloat16")
                self._pools[storage] = cupy.asarray(self.np_base)
            else:  # pragma: no cover
                raise KeyError(storage)
        return self._pools[storage]

    def reset(self, storage: str) -> None:
        pool = self.pool(storage)
        if storage == "host" and self.np_base is not None:
            np.copyto(pool, self.np_base)
        elif storage == "cupy":
            pool.set(self.np_base)
        else:
            torch = _torch()
            src = self.torch_base if self.np_base is None else torch.from_numpy(self.np_base)
            pool.copy_(src)

    def views_of(self, pool: Any) -> list[Any]:
        """``pool`` (any 1-D array of the case's size) cut into the case's arrays."""
        o = self.offsets
        return [pool[int(o[k]) : int(o[k + 1])].reshape(s) for k, s in enumerate(self.case.shapes)]

    def numpy_arrays(self) -> list[np.ndarray]:
        if self.np_base is None:
            raise Unsupported("NumPy has no bfloat16")
        return self.views_of(self.pool("host"))

    def torch_tensors(self, device: str = "cpu") -> list[Any]:
        torch = _torch()
        if device == "cpu":
            pool = self.pool("host")
            if isinstance(pool, np.ndarray):
                pool = torch.from_numpy(pool)
        else:
            pool = self.pool("torch-cuda")
        return self.views_of(pool)

    def torch_params(self, device: str = "cpu") -> list[Any]:
        """Parameters whose ``.grad`` are the work tensors (the data itself takes no memory)."""
        torch = _torch()
        params = []
        for g in self.torch_tensors(device):
            p = torch.nn.Parameter(torch.zeros(1, dtype=g.dtype, device=g.device).expand(g.shape))
            p.grad = g
            params.append(p)
        return params

    def cupy_arrays(self) -> list[Any]:
        return self.views_of(self.pool("cupy"))

    def param_copies(self, library: str, device: str = "cpu") -> list[Any]:
        """A fresh copy of the ``adamw`` workload's initial parameters, one array per
        shape: NumPy (``library="numpy"``), torch ``Parameter`` s on ``device`` whose
        ``.grad`` are the work tensors (``"torch"``), or CuPy (``"cupy"``)."""
        assert self.param_base is not None
        if library == "numpy":
            return self.views_of(self.param_base.copy())
        if library == "cupy":
            import cupy

            return self.views_of(cupy.asarray(self.param_base))
        torch = _torch()
        grads = self.torch_tensors(device)
        pool = torch.from_numpy(self.param_base.copy()).to(device)
        params = []
        for p, g in zip(self.views_of(pool), grads):
            param = torch.nn.Parameter(p)
            param.grad = g
            params.append(param)
        return params

    def release(self) -> None:
        self._pools.clear()

    # ------------------------------------------------------------ checking

    def check(self, output: Any, role: str) -> tuple[float, bool]:
        """(max relative error, within tolerance) of ``output`` against float64.

        ``output`` is the list of clipped arrays (clip, rows, value) in any
        library, or the norm (norm kind).
        """
        tol = TOLERANCE[role][self.dtype]
        if self.case.kind == "adamw":
            err = self._check_adamw(list(output))
            return err, err <= tol
        if self.case.kind == "persample":
            err = self._check_persample(list(output))
            return err, err <= tol
        if self.case.kind == "norm":
            value = float(to_f64(output).reshape(()))
            err = abs(value - self.ref_norm) / max(self.ref_norm, 1e-300)
            return _nan_is_inf(err), err <= tol
        outs = list(output)
        if len(outs) != len(self.case.shapes):
            return math.inf, False
        tiny = _TINY[self.dtype]
        worst = 0.0
        for k, (o, shape) in enumerate(zip(outs, self.case.shapes)):
            if tuple(o.shape) != tuple(shape):
                return math.inf, False
            flat = _flat(o)
            for start, ref in self._chunks(k):
                got = to_f64(flat[start : start + ref.size])
                exp: np.ndarray
                if self.case.kind == "clip":
                    exp = ref * self.coef
                elif self.case.kind == "rows":
                    d = shape[1]
                    rows = (start + np.arange(ref.size)) // d
                    exp = ref * self.row_coef[rows]
                else:
                    exp = np.clip(ref, -self.clip_value, self.clip_value)
                e = np.abs(got - exp) / (np.abs(exp) + tiny)
                worst = max(worst, _nan_is_inf(float(np.max(e, initial=0.0))))
        return worst, worst <= tol

    def _check_adamw(self, outs: list[Any]) -> float:
        """Worst error of the parameters and first moments after one step from zero
        state, per tensor ``max|got - exp| / max|exp|`` against float64:

        ``g' = c g``, ``m = (1 - b1) g'``, ``v = (1 - b2) g'^2``, and at step 1 the bias
        corrections give ``p = p0 (1 - lr wd) - lr g' / (|g'| + eps)``.  The first
        moments carry the clip coefficient ``c`` exactly; the parameters check the
        update (whose first step hardly depends on ``c``).
        """
        n = len(self.case.shapes)
        if len(outs) != 2 * n or self.param_base is None:
            return math.inf
        lr, (b1, _), eps, wd = (ADAMW[k] for k in ("lr", "betas", "eps", "weight_decay"))
        worst = 0.0
        for k, shape in enumerate(self.case.shapes):
            p_out, m_out = outs[k], outs[n + k]
            if tuple(p_out.shape) != tuple(shape) or tuple(m_out.shape) != tuple(shape):
                return math.inf
            lo = int(self.offsets[k])
            dp = ep = dm = em = 0.0
            fp, fm = _flat(p_out), _flat(m_out)
            for start, g in self._chunks(k):
                g = g * self.coef
                p0 = self.param_base[lo + start : lo + start + g.size].astype(np.float64)
                exp_p = p0 * (1 - lr * wd) - lr * g / (np.abs(g) + eps)
                exp_m = (1 - b1) * g
                got_p = to_f64(fp[start : start + g.size])
                got_m = to_f64(fm[start : start + g.size])
                dp = max(dp, _nan_is_inf(float(np.max(np.abs(got_p - exp_p), initial=0.0))))
                dm = max(dm, _nan_is_inf(float(np.max(np.abs(got_m - exp_m), initial=0.0))))
                ep = max(ep, float(np.max(np.abs(exp_p), initial=0.0)))
                em = max(em, float(np.max(np.abs(exp_m), initial=0.0)))
            for d, e in ((dp, ep), (dm, em)):
                worst = max(worst, _nan_is_inf(d / e) if e > 0 else _nan_is_inf(d))
        return worst

    def _check_persample(self, outs: list[Any]) -> float:
        """Worst ``max|got - exp| / max|exp|`` over the arrays of the batch sums."""
        expected = self.persample_expected()
        if len(outs) != len(expected):
            return math.inf
        worst = 0.0
        for o, e, shape in zip(outs, expected, self.case.shapes):
            if tuple(o.shape) != tuple(shape[1:]):
                return math.inf
            got = to_f64(o).reshape(-1)
            d = _nan_is_inf(float(np.max(np.abs(got - e), initial=0.0)))
            m = float(np.max(np.abs(e), initial=0.0))
            worst = max(worst, d / m if m > 0 else d)
        return worst


def _nan_is_inf(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _flat(x: Any) -> Any:
    return x.reshape(-1)


def to_f64(x: Any) -> np.ndarray:
    """Any array (NumPy, torch CPU/CUDA incl. bf16, CuPy, JAX) as a float64 NumPy array."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    mod = type(x).__module__
    if mod.startswith("torch"):
        return x.detach().to("cpu", dtype=_torch().float64).numpy()
    if mod.startswith("cupy"):
        return x.get().astype(np.float64)
    return np.asarray(x, dtype=np.float64)
