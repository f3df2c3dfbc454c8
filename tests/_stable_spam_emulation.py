"""For ``tests/gpu/emulated/test_gpu_spam_emulated.py``: NumPy transcriptions of the
CUDA kernels of a fused Stable-SPAM step on the GPU route (``fastclip_stable_spam``
and ``fastclip_clipped_sq`` of ``spam_kernels.cu``, and the two ``kernels.cu``
reductions its driver reuses: ``fastclip_partial_pow_sum`` with ord_code 0,
``fastclip_tensor_norms``), the adapters over torch CPU / NumPy memory and the
recorded gradients.

Each reads its tables, rows and outputs through the raw addresses it is given
(``_gpu_emulation.mem``), as the device does, so a wrong argument order, table
offset, column or output position gives wrong numbers.  Arithmetic is the
CUDA source's, operation by operation, in its accumulator type (float32 for
float16 / float32 storage, float64 for float64); the per-chunk float64 sums
are NumPy's (another order than the device's tree: equal to rounding).
"""

from __future__ import annotations

import _gpu_emulation
import numpy as np
import torch
from _gpu_emulation import mem, pow_sum

from fastclip import _spam_hparams as H
from fastclip._gpu._tables import ITEMSIZE

__all__ = [
    "STABLE_KERNELS",
    "STABLE_SHAPES",
    "NumpyHostLib",
    "TorchHostLib",
    "close_to",
    "f64_copy",
    "stable_grads",
    "stable_params",
]

STABLE_SHAPES = [(6, 4), (5,), (2, 3, 2), (3, 7)]


def _acc(dt):
    return np.float64 if dt == np.float64 else np.float32


def _fma(a, b, c, acc):
    """fmaf / fma: one rounding (float32: exact float64 product, then rounded)."""
    return (np.float64(a) * b + c).astype(acc) if acc == np.float32 else a * b + c


def _chunks(sizes, ct, cs, nc, chunk, n_t=None):
    """(chunk, tensor, first, end) of every chunk of the table."""
    nc, chunk = int(nc), int(chunk)
    assert nc > 0
    ct_a, cs_a = mem(ct, nc, np.int64), mem(cs, nc, np.int64)
    n_t = int(ct_a.max()) + 1 if n_t is None else int(n_t)
    size_a = mem(sizes, n_t, np.int64)
    for k in range(nc):
        t, s = int(ct_a[k]), int(cs_a[k])
        yield k, t, s, min(s + chunk, int(size_a[t])), int(size_a[t])


def _ada_clip(g, hat, shrink):
    """fabs(g) > hat ? g * shrink : g (NaN is never scaled)."""
    return np.where(np.abs(g) > hat, g * shrink, g)


def stable_spam(dt):
    """fastclip_stable_spam<T>: one Stable-SPAM pass (see spam_kernels.cu)."""

    def run(grid, block, args):
        ptrs, n_t, sizes, ct, cs, nc, chunk, hparams, amsgrad = args
        assert isinstance(amsgrad, np.int32) and int(hparams) != 0
        n_t, A = int(n_t), _acc(dt)
        table = mem(ptrs, 5 * n_t, np.uint64).reshape(5, n_t)
        rows = mem(hparams, n_t * H.Q_COLS, np.float64).reshape(n_t, H.Q_COLS)
        for _, t, s, e, n in _chunks(sizes, ct, cs, nc, chunk, n_t):
            p, g, m, v = (mem(table[j, t], n, dt)[s:e] for j in range(4))
            r = rows[t]
            c = {name: A(r[getattr(H, "Q_" + name)]) for name in (
                "HAT", "SHRINK", "FACTOR", "DECAY", "B1", "W1", "BETA2", "W2", "BC2_SQRT",
                "EPS", "NEG_STEP",
            )}  # fmt: skip
            pi = p.astype(A) * c["DECAY"] if r[H.Q_USE_DECAY] != 0 else p.astype(A)
            gi = _ada_clip(g.astype(A), c["HAT"], c["SHRINK"]) * c["FACTOR"]
            mi = _fma(gi, c["W1"], m.astype(A) * c["B1"], A)
            vi = _fma(c["W2"] * gi, gi, v.astype(A) * c["BETA2"], A)
            vd = vi
            if amsgrad:  # without it the fifth list holds the params' pointers: untouched
                x = mem(table[4, t], n, dt)[s:e]
                vd = np.where(x.astype(A) >= vi, x.astype(A), vi)  # NaN in vi wins
                x[:] = vd.astype(dt)
            den = np.sqrt(vd) / c["BC2_SQRT"] + c["EPS"]
            p[:] = (pi + (c["NEG_STEP"] * mi) / den).astype(dt)
            reset = r[H.Q_RESET] != 0
            m[:] = 0 if reset else mi.astype(dt)
            v[:] = 0 if reset else vi.astype(dt)

    return run


def clipped_sq(dt):
    """fastclip_clipped_sq<T>: float64 sum of squares per chunk after AdaClip."""

    def run(grid, block, args):
        ptrs, sizes, ct, cs, nc, chunk, clip_rows, partials = args
        A = _acc(dt)
        chunks = list(_chunks(sizes, ct, cs, nc, chunk))
        n_t = max(t for _, t, _, _, _ in chunks) + 1
        ptr_a = mem(ptrs, n_t, np.uint64)
        clip = mem(clip_rows, 2 * n_t, np.float64).reshape(n_t, 2)
        out = mem(partials, len(chunks), np.float64)
        for k, t, s, e, n in chunks:
            g = mem(ptr_a[t], n, dt)[s:e].astype(A)
            c = _ada_clip(g, A(clip[t, 0]), A(clip[t, 1])).astype(np.float64)
            out[k] = np.sum(c * c)

    return run


def partial_pow_sum(dt):
    """kernels.cu's fastclip_partial_pow_sum<T>, as Stable-SPAM's driver calls it (max)."""

    def run(grid, block, args):
        ptrs, sizes, ct, cs, nc, chunk, ord_code, p, partials = args
        assert (int(ord_code), float(p)) == (0, np.inf)  # max |g| only
        chunks = list(_chunks(sizes, ct, cs, nc, chunk))
        n_t = max(t for _, t, _, _, _ in chunks) + 1
        ptr_a = mem(ptrs, n_t, np.uint64)
        out = mem(partials, len(chunks), np.float64)
        for k, t, s, e, n in chunks:
            out[k] = pow_sum(mem(ptr_a[t], n, dt)[s:e], 0, np.inf)

    return run


def tensor_norms(nt):
    """kernels.cu's fastclip_tensor_norms<double>: combine each tensor's partials
    (ord_code 0: max, NaN wins; 1: sum) into out[pos[t]]; tensors without chunks: 0."""
    assert nt == np.float64

    def run(grid, block, args):
        partials, ct, nc, n_t, pos, ord_code, _p, out = args
        nc, n_t, code = int(nc), int(n_t), int(ord_code)
        assert code in (0, 1) and int(pos) != 0
        parts, ct_a = mem(partials, nc, np.float64), mem(ct, nc, np.int64)
        pos_a = mem(pos, n_t, np.int64)
        dst = mem(out, int(pos_a.max()) + 1, np.float64)
        for t in range(n_t):
            vals = parts[ct_a == t]
            if code == 0:
                dst[pos_a[t]] = np.nan if np.isnan(vals).any() else max(vals, default=0.0)
            else:
                dst[pos_a[t]] = float(np.sum(vals))

    return run


#: (feature, kernel name) -> a builder taking the element's NumPy dtype.
STABLE_KERNELS = {
    ("spam", "fastclip_stable_spam"): stable_spam,
    ("spam", "fastclip_clipped_sq"): clipped_sq,
    ("core", "fastclip_partial_pow_sum"): partial_pow_sum,
    ("core", "fastclip_tensor_norms"): tensor_norms,
}


# ------------------------------------------------ adapters and recorded data


def _kind(x):
    name = str(x.dtype).removeprefix("torch.")
    return name if name in ITEMSIZE else None


class TorchHostLib(_gpu_emulation.HostLib):
    """The GPU adapter interface over torch CPU tensors (the step's arrays) and
    NumPy arrays (scratch and uploads); counts the copies to the host."""

    syncs = 0
    kind = staticmethod(_kind)
    ptr = staticmethod(lambda x: x.data_ptr() if torch.is_tensor(x) else x.ctypes.data)
    numel = staticmethod(lambda x: x.numel() if torch.is_tensor(x) else x.size)
    contiguous = staticmethod(
        lambda x: x.is_contiguous() if torch.is_tensor(x) else x.flags.c_contiguous
    )
    as_contiguous = staticmethod(lambda x: x.contiguous())
    write_back = staticmethod(lambda x, values: x.copy_(values))

    @classmethod
    def host_array(cls, x):
        cls.syncs += 1
        return np.array(x)


class NumpyHostLib(_gpu_emulation.HostLib):
    """The adapter interface over NumPy memory, with the copy to the host."""

    kind = staticmethod(lambda x: str(x.dtype) if str(x.dtype) in ITEMSIZE else None)

    @staticmethod
    def host_array(x):
        return np.array(x)


def stable_grads(steps=30, seed=0, nonfinite_at=None):
    """Seeded gradients with spikes: one element x1e3 at steps 9 and 17, a whole
    tensor x40 at step 23; optionally a NaN at ``nonfinite_at``."""
    rng = np.random.default_rng(seed)
    seq = []
    for t in range(steps):
        gs = [rng.normal(size=s) * 0.1 * (i + 1) for i, s in enumerate(STABLE_SHAPES)]
        if t in (9, 17):
            gs[0].flat[5] *= 1e3
        if t == 23:
            gs[3] *= 40.0
        if t == nonfinite_at:
            gs[1].flat[3] = np.nan
        seq.append(gs)
    return seq


def stable_params(dts, strided, seed=99):
    rng = np.random.default_rng(seed)
    out = []
    for s, d in zip(STABLE_SHAPES, dts):
        x = rng.normal(size=s)
        t = torch.tensor(x, dtype=d)
        if strided and t.dim() == 2:
            t = torch.tensor(x.T.copy(), dtype=d).t()  # same values, transposed strides
        out.append(torch.nn.Parameter(t))
    return out


def close_to(got, want, rtol, cancel=1e-2, floor=0.0):
    """To ``rtol``; entries near 0 to ``rtol * cancel`` of the largest magnitude, or
    ``floor`` (float16: its subnormal spacing, which second moments ~1e-6 reach)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=max(rtol * scale * cancel, floor))


def f64_copy(t):
    """float64 copy (for float64 tensors ``.double().numpy()`` would share memory)."""
    return np.array(t.detach().double().numpy())
