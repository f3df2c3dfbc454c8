# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""Per-element helpers shared by every CPU kernel, specialised by storage dtype.

Kernels are written once, as scalar loops over a storage array; these
intrinsics pick, at compile time, how one stored element is widened to the
accumulation type and narrowed back:

=============  ==============  ============  ==========================
storage        meaning         widened to    accumulated in (blocks)
=============  ==============  ============  ==========================
float32        float32         float32       float32 blocks -> float64
float64        float64         float64       float64
uint16         bfloat16 bits   float32       float32 blocks -> float64
int16          float16 bits    float32       float32 blocks -> float64
complex64      complex64       complex64     float32 blocks -> float64
complex128     complex128      complex128    float64
=============  ==============  ============  ==========================
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# The largest float32 block sum we trust: above it (or NaN) the block is
# recomputed in float64, so squares of |x| ~ 1e20 never turn a norm into inf.
F32_SAFE = np.float32(3.0e38)
# Below this a float32 sum of squares may have lost terms to underflow
# (squares of |x| < 1e-19 flush toward 0): the block is redone in float64.
F32_TINY = np.float32(1.0e-30)


def _is32(t: types.Type) -> bool:
    return t in (types.float32, types.uint16, types.int16, types.complex64)


# The helpers are numba intrinsics, not ``@overload``s: each overload, even one
# marked ``inline="always"``, went through numba's whole compile pipeline on
# its own (about 45 ms apiece, ten of them in the first global-norm call,
# measured with numba's ``numba:compile`` event listener), where an intrinsic
# only emits a few LLVM instructions into the kernel that calls it.


def _cast(context, builder, value, fromty, toty):  # type: ignore[no-untyped-def]
    return context.cast(builder, value, fromty, toty)


def _float(context, builder, ty, value):  # type: ignore[no-untyped-def]
    return context.get_constant(ty, value)


@intrinsic
def widen(typingctx, v):  # type: ignore[no-untyped-def]
    """Stored element -> arithmetic value (float32/float64/complex)."""
    if v == types.uint16:  # bfloat16 bits: the high half of a float32

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            wide = builder.shl(
                builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16)
            )
            return builder.bitcast(wide, ir.FloatType())

        return types.float32(v), codegen
    if v == types.int16:  # float16 bits

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(v), codegen
    if v in (types.float32, types.float64, types.complex64, types.complex128):
        return v(v), lambda context, builder, sig, args: args[0]
    return None


@intrinsic
def narrow(typingctx, w, like):  # type: ignore[no-untyped-def]
    """Arithmetic value -> stored element of ``like``'s type (round to nearest even)."""
    if like == types.uint16:  # bfloat16: round the float32 bits to nearest even

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            # 32-bit lanes: a non-NaN u is at most 0xFF800000 (-inf), so
            # u + 0x7FFF + 1 cannot wrap; NaNs take the other arm of the select.
            # (64-bit lanes halved the vector width: 1.5x slower bfloat16 scaling.)
            i32 = ir.IntType(32)
            f = _cast(context, builder, args[0], sig.args[0], types.float32)
            u = builder.bitcast(f, i32)
            hi = builder.lshr(u, ir.Constant(i32, 16))
            is_nan = builder.icmp_unsigned(
                ">", builder.and_(u, ir.Constant(i32, 0x7FFFFFFF)), ir.Constant(i32, 0x7F800000)
            )
            quiet = builder.or_(hi, ir.Constant(i32, 0x40))  # NaN: keep it quiet
            odd = builder.and_(hi, ir.Constant(i32, 1))
            rounded = builder.lshr(
                builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), odd), ir.Constant(i32, 16)
            )
            return builder.trunc(builder.select(is_nan, quiet, rounded), ir.IntType(16))

        return types.uint16(w, like), codegen
    if like == types.int16:  # float16: LLVM's fptrunc rounds to nearest even

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            f = _cast(context, builder, args[0], sig.args[0], types.float32)
            return builder.bitcast(builder.fptrunc(f, ir.HalfType()), ir.IntType(16))

        return types.int16(w, like), codegen
    if like in (types.float32, types.float64, types.complex64, types.complex128):

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            return _cast(context, builder, args[0], sig.args[0], sig.return_type)

        return like(w, like), codegen
    return None


def _constant(value32, value64):  # type: ignore[no-untyped-def]
    """An intrinsic giving value32 (float32) for 32-bit storage, value64 (float64) otherwise."""

    def typer(typingctx, v):  # type: ignore[no-untyped-def]
        ty = types.float32 if _is32(v) else types.float64
        value = float(value32) if _is32(v) else float(value64)

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            return _float(context, builder, ty, value)

        return ty(v), codegen

    return typer


acc_zero = intrinsic(_constant(0.0, 0.0))
acc_zero.__doc__ = "A zero of the block accumulator type for stored element ``v``."
acc_limit = intrinsic(_constant(F32_SAFE, np.inf))
acc_limit.__doc__ = "Largest trusted block sum for ``v``'s accumulator (inf for float64)."
acc_tiny = intrinsic(_constant(F32_TINY, -1.0))
acc_tiny.__doc__ = "Smallest trusted float32 block sum of squares (-1, never reached, for float64)."


@intrinsic
def coef_like(typingctx, c, v):  # type: ignore[no-untyped-def]
    """A float64 coefficient in the arithmetic precision of stored element ``v``."""
    ty = types.float32 if _is32(v) else types.float64

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return _cast(context, builder, args[0], sig.args[0], ty)

    return ty(c, v), codegen


@intrinsic
def abs2(typingctx, w):  # type: ignore[no-untyped-def]
    """|w|**2 of a widened value (re**2 + im**2 for complex)."""
    if isinstance(w, types.Complex):

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            z = context.make_complex(builder, sig.args[0], value=args[0])
            return builder.fadd(builder.fmul(z.real, z.real), builder.fmul(z.imag, z.imag))

        return w.underlying_float(w), codegen
    if isinstance(w, types.Float):
        return w(w), lambda context, builder, sig, args: builder.fmul(args[0], args[0])
    return None


def _abs_codegen(argty, absty):  # type: ignore[no-untyped-def]
    """Codegen of abs() on ``absty`` after casting the argument from ``argty``."""
    resty = absty.underlying_float if isinstance(absty, types.Complex) else absty

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        value = _cast(context, builder, args[0], argty, absty)
        impl = context.get_function(abs, resty(absty))
        return impl(builder, [value])

    return resty, codegen


@intrinsic
def abs1(typingctx, w):  # type: ignore[no-untyped-def]
    """|w| of a widened value."""
    if not isinstance(w, (types.Float, types.Complex)):
        return None
    resty, codegen = _abs_codegen(w, w)
    return resty(w), codegen


@intrinsic
def abs64(typingctx, w):  # type: ignore[no-untyped-def]
    """|w| of a widened value, in float64 (complex64 is widened to complex128 first:
    |3e38 + 3e38j| = 4.2e38 overflows float32, and the norm came out inf)."""
    if isinstance(w, types.Complex):
        resty, codegen = _abs_codegen(w, types.complex128)
    elif isinstance(w, types.Float):
        resty, codegen = _abs_codegen(w, types.float64)
    else:
        return None
    return resty(w), codegen


@intrinsic
def abs2_64(typingctx, w):  # type: ignore[no-untyped-def]
    """|w|**2 of a widened value, in float64: each part is widened before it is squared,
    so no square rounds to float32 (re**2 + im**2 for complex)."""
    if isinstance(w, types.Complex):

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            z = context.make_complex(builder, sig.args[0], value=args[0])
            f64 = ir.DoubleType()
            re, im = z.real, z.imag
            if sig.args[0] == types.complex64:
                re, im = builder.fpext(re, f64), builder.fpext(im, f64)
            return builder.fadd(builder.fmul(re, re), builder.fmul(im, im))

        return types.float64(w), codegen
    if isinstance(w, types.Float):

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            v = _cast(context, builder, args[0], sig.args[0], types.float64)
            return builder.fmul(v, v)

        return types.float64(w), codegen
    return None
