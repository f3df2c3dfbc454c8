# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""Low-level numba intrinsics: 16-bit float bit conversions and raw pointers.

numba cannot read float16 arrays on the CPU (numba issue 4402) and knows no
bfloat16 at all, so 16-bit data travels as integer views and is converted
here, in registers, with the exact IEEE/bfloat16 rules:

* ``uint16`` views carry **bfloat16** bits: widening is a 16-bit shift into a
  float32; narrowing rounds to nearest even and keeps NaN quiet.
* ``int16`` views carry **float16** bits: LLVM ``fpext``/``fptrunc`` on ``half``.

Both were checked bit-exact against torch/NumPy on all 65,536 patterns
(``tests/routes/test_intrinsics.py``).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array


@intrinsic
def f16_bits_to_f32(typingctx, bits):  # type: ignore[no-untyped-def]
    """float16 bits (int16) -> float32."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return sig, codegen


@intrinsic
def f32_to_f16_bits(typingctx, value):  # type: ignore[no-untyped-def]
    """float32 -> float16 bits (int16), IEEE round to nearest even."""
    if value != types.float32:
        return None
    sig = types.int16(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return sig, codegen


@intrinsic
def f32_bits(typingctx, value):  # type: ignore[no-untyped-def]
    """Reinterpret a float32 as uint32."""
    if value != types.float32:
        return None
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def bits_f32(typingctx, bits):  # type: ignore[no-untyped-def]
    """Reinterpret the low 32 bits of an integer as float32."""
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif bits.bitwidth < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return sig, codegen


@intrinsic
def address_as_pointer(typingctx, address, like):  # type: ignore[no-untyped-def]
    """An int64 address -> a typed pointer to ``like``'s element type.

    ``like`` is any array of the wanted dtype (a zero-length marker); the
    pointer keeps nothing alive: the caller owns the memory's lifetime.
    """
    if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
        return None
    sig = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptrty = context.get_value_type(signature.return_type)
        return builder.inttoptr(args[0], ptrty)

    return sig, codegen


@intrinsic
def load_int64(typingctx, address):  # type: ignore[no-untyped-def]
    """Read the int64 stored at ``address`` (used to read ndarray headers)."""
    if not isinstance(address, types.Integer):
        return None
    sig = types.int64(address)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))
        return builder.load(ptr)

    return sig, codegen


@intrinsic
def load_int32(typingctx, address):  # type: ignore[no-untyped-def]
    """Read the int32 stored at ``address``, widened to int64."""
    if not isinstance(address, types.Integer):
        return None
    sig = types.int64(address)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(32)))
        return builder.sext(builder.load(ptr), ir.IntType(64))

    return sig, codegen


@intrinsic
def imin(typingctx, a, b):  # type: ignore[no-untyped-def]
    """The smaller of two integers, as int64.

    The kernels' ``min(lo + chunk, n)`` compiled numba's generic ``min`` on a
    tuple (two functions, 0.07 s of a cold ``clip_by_global_norm_``, measured
    with numba's ``numba:compile`` event listener); this is one compare.
    """
    if not (isinstance(a, types.Integer) and isinstance(b, types.Integer)):
        return None
    sig = types.int64(a, b)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        x = context.cast(builder, args[0], a, types.int64)
        y = context.cast(builder, args[1], b, types.int64)
        return builder.select(builder.icmp_signed("<", x, y), x, y)

    return sig, codegen


def _empty_1d(dtype):  # type: ignore[no-untyped-def]
    """An intrinsic ``(n) -> np.empty(n, dtype)``: a 1-D C-contiguous NRT array."""
    arrty = types.Array(dtype, 1, "C")

    def typer(typingctx, n):  # type: ignore[no-untyped-def]
        if not isinstance(n, types.Integer):
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            count = context.cast(builder, args[0], n, types.intp)
            datatype = context.get_data_type(dtype)
            itemsize = context.get_constant(types.intp, context.get_abi_sizeof(datatype))
            # n >= 0 and n * itemsize in range: callers pass counts of chunks or arrays.
            meminfo = context.nrt.meminfo_alloc_aligned(  # raises MemoryError on NULL
                builder, builder.mul(count, itemsize), context.get_preferred_array_alignment(dtype)
            )
            data = builder.bitcast(
                context.nrt.meminfo_data(builder, meminfo), datatype.as_pointer()
            )
            ary = make_array(arrty)(context, builder)
            populate_array(
                ary,
                data=data,
                shape=cgutils.pack_array(builder, [count]),
                strides=cgutils.pack_array(builder, [itemsize]),
                itemsize=itemsize,
                meminfo=meminfo,
            )
            return ary._getvalue()

        return arrty(n), codegen

    return typer


# ``np.empty`` inside a kernel compiled numba's ``np.empty`` overload and its
# allocator, one function per dtype (0.12-0.18 s of a cold first
# ``clip_by_global_norm_``, numba's ``numba:compile`` event listener); these
# emit the same NRT allocation inline.
empty_f64 = intrinsic(_empty_1d(types.float64))
empty_f64.__doc__ = "``np.empty(n, np.float64)`` inside a kernel, without numba's overload."
empty_i64 = intrinsic(_empty_1d(types.int64))
empty_i64.__doc__ = "``np.empty(n, np.int64)`` inside a kernel, without numba's overload."
