"""The ``torch.nn.utils``-compatible clipping functions of :mod:`fastclip.torch`.

``clip_grad_norm_`` reads as torch's own ``clip_grad.py``: the total norm, then
the scaling by it.  For a norm (``norm_type`` > 0) both steps run as one call of
fastclip's ``clip_by_global_norm_`` (one pass over packed tables per dtype on
the CPU); that fused path is an internal detail with the same results.
"""

from __future__ import annotations

import operator
import types
import warnings
from collections.abc import Iterable, Sequence
from typing import Union

import torch

from fastclip import _api
from fastclip._errors import NonFiniteNormError, public, torch_nonfinite_message
from fastclip._validate import check_max_norm, check_ord, scalar_value
from fastclip.distributed import has_dtensor

from . import _ops  # torch.compile: the functions below as custom operators

__all__ = [
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
]

TensorOrTensors = Union[torch.Tensor, Iterable[torch.Tensor]]

_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_EPS = 1e-6  # torch's: clip_coef = max_norm / (total_norm + 1e-6)


class _Grads(list):  # type: ignore[type-arg]
    """The gradients of a call, with the parameters' names when they came from an
    ``nn.Module`` (``names[i]`` names ``self[i]``; None otherwise), for the
    non-finite error."""

    names: tuple[str, ...] | None = None


def _module_grads(module: torch.nn.Module) -> _Grads:
    """The gradients of ``module.named_parameters()`` that are not None, named."""
    named = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
    grads = _Grads(g for _, g in named)
    grads.names = tuple(n for n, _ in named)
    return grads


def _tensors(tensors: TensorOrTensors | torch.nn.Module) -> list[torch.Tensor]:
    """``get_total_norm``'s tensors: one tensor, an iterable, or a Module's gradients."""
    if isinstance(tensors, torch.nn.Module):
        return _module_grads(tensors)
    if isinstance(tensors, _Grads):  # from clip_grad_norm_: keep the names
        return tensors
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    items = list(tensors)
    if items and not isinstance(items[0], torch.Tensor):  # the rest: one library, checked later
        raise TypeError(
            f"tensors[0] must be a torch tensor, got {type(items[0]).__module__}."
            f"{type(items[0]).__qualname__}; for NumPy (or any Array API) arrays use the "
            "array API: fastclip.global_norm(arrays, ord)"
        )
    return items


def _grads(
    parameters: TensorOrTensors | torch.nn.Module, warn_empty_generator: bool = False
) -> list[torch.Tensor]:
    if isinstance(parameters, torch.nn.Module):
        return _module_grads(parameters)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if warn_empty_generator and is_generator and not parameters:
            warnings.warn(
                "`parameters` is an empty generator, no gradient clipping will occur.",
                stacklevel=3,
            )
    try:
        return [g for g in map(_GRAD, parameters) if g is not None]
    except AttributeError:
        i, bad = next((i, p) for i, p in enumerate(parameters) if not hasattr(p, "grad"))
        raise TypeError(
            f"parameters[{i}] must be a torch tensor (parameters must be torch tensors: their "
            f".grad is clipped), got {type(bad).__module__}.{type(bad).__qualname__}; to clip "
            "arrays of gradients themselves (NumPy or any Array API library) use the array "
            "API: fastclip.clip_by_global_norm_(grads, max_norm) / "
            "fastclip.clip_by_value_(grads, -clip_value, clip_value)"
        ) from None


_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _result_dtype(tensors: list[torch.Tensor], norm_dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's total norm has: the promoted dtype of the gradients'
    per-tensor norms (real: complex64 gradients give a float32 norm).

    fastclip's norm (``norm_dtype``) is float64 exactly when a gradient is
    float64 or complex128, and then so is torch's; a float32 or complex64
    gradient also fixes the result.  Only lists starting with a 16-bit
    gradient need the scan (all float16 gives float16, mixed 16-bit float32).
    """
    if norm_dtype == torch.float64 or tensors[0].dtype in (torch.float32, torch.complex64):
        return norm_dtype
    dtypes = set(map(_DTYPE, tensors))
    dtype = dtypes.pop()
    for other in dtypes:
        dtype = torch.promote_types(dtype, other)
    return _REAL.get(dtype, dtype)


def _norm_type(norm_type: object) -> float:
    """``norm_type`` as torch reads it (``float(norm_type)``: strings such as "inf" too),
    with a ValueError for ints beyond float64's range."""
    if isinstance(norm_type, str):
        value = float(norm_type)
    else:
        value = scalar_value(norm_type, "norm_type", "norm_type=math.inf is the max-norm")
    if value != value:  # NaN (torch would compute NaN gradients): check_ord's ValueError
        check_ord(value, "norm_type")
    return value


def _nonfinite_error(
    norm_type: float, tensors: list[torch.Tensor], indices: Sequence[int] | None = None
) -> NonFiniteNormError:
    """torch's error, plus ``indices`` (positions among ``tensors``, the gradients that
    are not None) of the tensors whose norms are not finite, and their ``names`` when
    the tensors came from an ``nn.Module``.  Found here, if not given, by one more
    pass (only when raising)."""
    if indices is None:
        with torch.no_grad():
            if _torch_defined(norm_type):
                norms = [torch.linalg.vector_norm(t, norm_type) for t in tensors]
                indices = [i for i, n in enumerate(norms) if not bool(torch.isfinite(n))]
            else:
                per = _api.global_norm(tensors, norm_type, per_array=True)[1]
                indices = torch.nonzero(~torch.isfinite(per)).reshape(-1).tolist()
    all_names = getattr(tensors, "names", None)
    names = None if all_names is None else [all_names[i] for i in indices]
    message = torch_nonfinite_message(norm_type, indices, names)
    if not indices:  # every gradient's norm is finite: the total overflows the result dtype
        dtype = str(_result_dtype(tensors, torch.float32)).replace("torch.", "")
        message += f" (each gradient's norm is finite; their total is beyond {dtype}'s range)"
    return NonFiniteNormError(message, indices, names)


def _torch_defined(norm_type: float) -> bool:
    """``norm_type`` values torch accepts that are not norms (p <= 0, -inf)."""
    return norm_type <= 0.0


def _torch_total_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """torch.nn.utils.get_total_norm's own formula, for ``norm_type`` <= 0."""
    if has_dtensor(tensors):
        raise ValueError(
            f"norm_type={norm_type} (not a norm) is not supported for DTensor gradients; "
            "use a p > 0 or inf"
        )
    with torch.no_grad():
        device = tensors[0].device
        norms = [torch.linalg.vector_norm(t, norm_type).to(device) for t in tensors]
        return torch.linalg.vector_norm(torch.stack(norms), norm_type)


@public("fastclip.torch.get_total_norm", tracing=torch.compiler.is_compiling)
def get_total_norm(
    tensors: TensorOrTensors | torch.nn.Module,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Norm of an iterable of tensors, as if they were concatenated into one vector.

    Mirrors ``torch.nn.utils.get_total_norm``; an empty iterable gives ``tensor(0.)``.
    Raises :class:`fastclip.NonFiniteNormError` (a RuntimeError, with torch's message)
    when ``error_if_nonfinite`` and the norm is NaN or inf.
    ``tensors`` may also be an ``nn.Module`` (its parameters' gradients); the error's
    ``indices`` are positions among the gradients that are not None, and with a Module
    its ``names`` (and message) name the parameters.
    """
    if torch.compiler.is_compiling():  # Dynamo cannot trace numba: a custom op
        return _ops.traced_get_total_norm(tensors, norm_type, error_if_nonfinite)
    tensors = _tensors(tensors)
    norm_type = _norm_type(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    if _torch_defined(norm_type):
        total = _torch_total_norm(tensors, norm_type)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise _nonfinite_error(norm_type, tensors)
        return total
    if has_dtensor(tensors):  # sharded gradients: reduce over the DTensors' mesh
        from fastclip import distributed

        return distributed.get_total_norm(tensors, norm_type, error_if_nonfinite)
    with torch.no_grad():
        total = _api.global_norm(tensors, norm_type)
    total = total.to(_result_dtype(tensors, total.dtype))
    # Checked in the returned dtype: a finite norm beyond float16's range is inf there,
    # and torch raises for it.
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise _nonfinite_error(norm_type, tensors)
    return total


@public("fastclip.torch.clip_grads_with_norm_", tracing=torch.compiler.is_compiling)
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
) -> None:
    """Scale gradients by ``min(1, max_norm / (total_norm + 1e-6))`` in place.

    Mirrors ``torch.nn.utils.clip_grads_with_norm_``.
    """
    if torch.compiler.is_compiling():  # Dynamo cannot trace numba: a custom op
        return _ops.traced_clip_grads_with_norm_(parameters, max_norm, total_norm)
    max_norm = check_max_norm(max_norm)
    grads = _grads(parameters)
    if not grads:
        return
    if has_dtensor(grads) or has_dtensor([total_norm]):
        from fastclip import distributed

        grads = distributed.local_tensors(grads)
        if has_dtensor([total_norm]):
            total_norm = total_norm.full_tensor()  # type: ignore[attr-defined]  # Replicate DTensor
    _clip_grads_with_norm(grads, max_norm, total_norm)


def _clip_grads_with_norm(grads: list[torch.Tensor], max_norm: float, total_norm: object) -> None:
    """``clip_grads_with_norm_`` on gradients already gathered (DTensors unwrapped)."""
    device = grads[0].device
    total = (
        total_norm.detach().to(device)
        if isinstance(total_norm, torch.Tensor)
        else torch.tensor(scalar_value(total_norm, "total_norm"), device=device)
    )
    # The coefficient stays a tensor on the gradients' device: no host sync on GPUs.
    # Clamped to 1 rather than tested (`if coef < 1:`): the test would read it on the host.
    coef = torch.clamp(max_norm / (total.to(torch.float64) + _EPS), max=1.0)
    with torch.no_grad():
        _api.scale_(grads, coef)


@public("fastclip.torch.clip_grad_norm_", tracing=torch.compiler.is_compiling)
def clip_grad_norm_(
    parameters: TensorOrTensors | torch.nn.Module,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Clip the global norm of the gradients of ``parameters`` in place; return that norm.

    Mirrors ``torch.nn.utils.clip_grad_norm_``: ``.grad is None`` is skipped,
    gradients are multiplied by ``min(1, max_norm / (total_norm + 1e-6))``,
    the total norm (before clipping) is returned in the gradients' dtype.
    ``parameters`` may also be an ``nn.Module``; a :class:`fastclip.NonFiniteNormError`
    says which gradients are not finite (``.indices``, ``.names``), before any write.
    """
    if torch.compiler.is_compiling():  # Dynamo cannot trace numba: a custom op
        return _ops.traced_clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite)
    max_norm = check_max_norm(max_norm)
    norm_type = _norm_type(norm_type)
    grads = _grads(parameters, warn_empty_generator=True)
    if not grads:
        return torch.tensor(0.0)
    if not _torch_defined(norm_type):  # a norm: the two steps below as one fastclip call
        return _norm_and_clip_fused(grads, max_norm, norm_type, error_if_nonfinite)
    total_norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)  # raises first
    _clip_grads_with_norm(grads, max_norm, total_norm)
    return total_norm


def _norm_and_clip_fused(
    grads: list[torch.Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool
) -> torch.Tensor:
    """``get_total_norm`` then ``clip_grads_with_norm_`` as one fastclip call, for a norm.

    Same norm, coefficient and result; the list is validated and packed once,
    and checked for the in-place write before its norm is computed.
    """
    if has_dtensor(grads):  # FSDP2 / tensor parallel: reduce over the DTensors' mesh
        from fastclip import distributed

        return distributed.clip_grad_norm_(grads, max_norm, norm_type, error_if_nonfinite)
    if error_if_nonfinite and _result_dtype(grads, torch.float32) != torch.float64:
        # The norm is returned in the gradients' dtype, where a finite norm can be inf
        # (float16 gradients of norm 1e5): torch raises for it, so the norm is taken and
        # checked in that dtype before anything is written, then used for the clip.
        total = get_total_norm(grads, norm_type, True)
        with torch.no_grad():
            _api.clip_by_global_norm_(grads, max_norm, norm_type, eps=_EPS, total_norm=total)
        return total
    try:
        with torch.no_grad():
            total = _api.clip_by_global_norm_(
                grads, max_norm, norm_type, eps=_EPS, error_if_nonfinite=error_if_nonfinite
            )
    except NonFiniteNormError as exc:
        raise _nonfinite_error(norm_type, grads, exc.indices) from None  # torch's wording
    return total.to(_result_dtype(grads, total.dtype))


@public("fastclip.torch.clip_grad_value_", tracing=torch.compiler.is_compiling)
def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float,
    foreach: bool | None = None,
) -> None:
    """Clamp every gradient to ``[-clip_value, clip_value]`` in place.

    Mirrors ``torch.nn.utils.clip_grad_value_`` (a negative or NaN
    ``clip_value`` raises ValueError instead of clamping everything to it).
    Every gradient is validated before any is clamped; complex gradients are
    a TypeError (torch: NotImplementedError).
    """
    if torch.compiler.is_compiling():  # Dynamo cannot trace numba: a custom op
        return _ops.traced_clip_grad_value_(parameters, clip_value)
    clip_value = scalar_value(clip_value, "clip_value", "clip_value=math.inf clamps nothing")
    if not clip_value >= 0:  # also NaN
        raise ValueError(f"clip_value must be >= 0 and not NaN, got {clip_value}")
    grads = _grads(parameters)
    if not grads:
        return
    # Gradients may require grad (backward(create_graph=True)); torch clamps them under
    # no_grad too.
    with torch.no_grad():
        try:
            _api.clip_values_(grads, -clip_value, clip_value)
        except ValueError:  # refused before any write (shared memory, among others)
            # The same gradient twice (a parameter listed twice) is clamped once: clamping
            # is idempotent, so that is torch's result.  Looked for only after a refusal,
            # so the common call pays nothing for it.
            unique = list({id(g): g for g in grads}.values())
            if len(unique) == len(grads):
                raise
            _api.clip_values_(unique, -clip_value, clip_value)


for _function in (clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm):
    _function.__module__ = "fastclip.torch"  # the public path, as torch.nn.utils does
del _function
