"""``grad_norm``: the per-parameter gradient norms that Lightning users log, in one pass.

Lightning's ``lightning.pytorch.utilities.grad_norm`` computes one
``p.grad.norm(norm_type)`` per parameter (one kernel launch each), then the
total as ``torch.tensor(list(norms.values())).norm(norm_type)``, which reads
every norm back to the host.  This version gets the per-parameter norms and
the total from ``fastclip.global_norm(..., per_array=True)``: one launch per
gradient dtype, and no host read on the GPU.
"""

from __future__ import annotations

import torch

from fastclip import _api
from fastclip._errors import public

__all__ = ["grad_norm"]

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


@public("fastclip.torch.grad_norm", tracing=torch.compiler.is_compiling)
def grad_norm(
    module: torch.nn.Module, norm_type: float | int | str, group_separator: str = "/"
) -> dict[str, torch.Tensor]:
    r"""Each parameter's gradient norm and their total norm, as a dict for logging.

    A drop-in for Lightning's ``lightning.pytorch.utilities.grad_norm`` (same
    arguments, keys, dtypes and values), computed by one fastclip launch per
    gradient dtype instead of one per parameter.

    Parameters
    ----------
    module : torch.nn.Module
        Its ``named_parameters()`` whose ``.grad`` is not None are measured.
    norm_type : float, int or str
        The p of the p-norm, read as ``float(norm_type)`` (``"inf"`` is the
        max-norm); it must be > 0.
    group_separator : str, default "/"
        Between ``grad_{p}_norm`` and the parameter's name (loggers group keys
        by it).

    Returns
    -------
    dict of str to torch.Tensor
        ``{f"grad_{p}_norm{group_separator}{name}": ||grad||_p}`` for each
        parameter with a gradient, in ``named_parameters()`` order, plus
        ``f"grad_{p}_norm_total"``: the norm of the per-parameter norms (the
        norm of all gradients as one vector), ``p = float(norm_type)``.  Values
        are 0-d tensors; each parameter's has its gradient's (real) dtype and
        device, as ``grad.norm`` gives, and the total has the promoted dtype of
        those.  No gradients: an empty dict.

    Raises
    ------
    ValueError
        ``norm_type`` is not > 0 (Lightning's message), or NaN.

    Notes
    -----
    Differences from Lightning, deliberate: the norms are accumulated in
    float32 blocks combined in float64 (Lightning: ``grad.norm`` in the
    gradient's dtype), and the total is computed from the gradients
    themselves and stays on their device (Lightning builds it on the CPU from
    the per-parameter values, one host read each).

    Examples
    --------
    >>> import torch, fastclip.torch as fct
    >>> layer = torch.nn.Linear(2, 1)
    >>> layer.weight.grad = torch.tensor([[3.0, 4.0]])
    >>> layer.bias.grad = torch.tensor([12.0])
    >>> fct.grad_norm(layer, 2)
    {'grad_2.0_norm/weight': tensor(5.), 'grad_2.0_norm/bias': tensor(12.), 'grad_2.0_norm_total': tensor(13.)}
    """
    p = float(norm_type)
    if p <= 0:
        raise ValueError(f"`norm_type` must be a positive number or 'inf' (infinity norm). Got {p}")
    named = [(n, q.grad) for n, q in module.named_parameters() if q.grad is not None]
    if not named:
        return {}
    grads = [g for _, g in named]
    with torch.no_grad():
        total, per = _api.global_norm(grads, p, per_array=True)
    dtypes = [_REAL.get(g.dtype, g.dtype) for g in grads]
    if len(set(dtypes)) == 1:  # one dtype: one cast, and the 0-d views of its rows
        values = list(per.to(dtypes[0]).unbind())
    else:
        values = [v.to(d) for v, d in zip(per.unbind(), dtypes)]
    result_dtype = dtypes[0]
    for d in dtypes[1:]:
        result_dtype = torch.promote_types(result_dtype, d)
    prefix = f"grad_{p}_norm"
    norms = {f"{prefix}{group_separator}{name}": v for (name, _), v in zip(named, values)}
    norms[f"{prefix}_total"] = total.to(result_dtype)
    return norms


grad_norm.__module__ = "fastclip.torch"
