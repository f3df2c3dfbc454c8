"""Per-sample gradient norms of one layer from its input and its output's gradient.

The "ghost norm" of Goodfellow (arXiv 1510.01799), Li et al. (arXiv
2110.05679) and Bu et al.'s book-keeping (arXiv 2210.00038): the norm of
sample ``b``'s gradient of a layer's weight, computed from the activations
``a_b`` the layer saw and the gradient ``g_b`` of the loss with respect to its
output, without forming the ``[B, *weight.shape]`` per-sample gradients.

For a linear map ``y_t = W a_t + c`` over positions ``t`` (a sequence, the
output pixels of a convolution), ``dL_b/dW = sum_t g_t a_t^T`` and

.. math:: \\|\\partial_W L_b\\|_F^2 = \\sum_{t,s} (a_t \\cdot a_s)(g_t \\cdot g_s)

(the Gram form: ``O(T^2 (d_in + d_out))`` work and ``T^2`` memory per sample)
or the same number from the materialised ``sum_t g_t a_t^T`` (``O(T d_in
d_out)`` work, ``d_in d_out`` memory).  ``form="auto"`` takes the one with
fewer multiply-adds, as Bu et al.'s mixed ghost clipping does (arXiv
2205.10683, which compares ``2T^2`` with ``d_in d_out``).

Row norms of 32768 elements or more go through :func:`fastclip.norm`
(``axis=1``) when torch has more than one thread, others through torch
(measurements at ``_TORCH_ROWS_BELOW``);
the products are torch's BLAS (``bmm``), which fastclip has no kernel for.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fastclip import _api

__all__ = ["SUPPORTED", "per_sample_grad_norms", "squared_norms"]

SUPPORTED = (
    torch.nn.Linear,
    torch.nn.Embedding,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.LayerNorm,
)
FORMS = ("auto", "gram", "materialize")

# Samples per chunk so that a chunk's temporaries (the two T x T Grams, the
# d_out x d_in materialised gradients or a convolution's unfolded input) stay
# near 2**24 elements (64 MiB of float32) whatever the batch size: the point
# of ghost clipping is memory, and an unchunked [512, 512, 512] Gram is 0.5 GiB.
_CHUNK_ELEMENTS = 1 << 24
# Row norms: measured by benchmarks/bench_ghost.py --part forms on 2 cores shared with
# other jobs.  With one thread torch's float32 reduction wins (fastclip.norm 0.2-0.5x
# at [1024, 128], [128, 49152], [128, 128000]: its float64 accumulation costs more per
# element); with two, each of torch's parallel reductions paid an OpenMP wake-up of
# 12-24 ms there and fastclip.norm won 6-290x.  Below torch's intra-op grain size
# (32768 elements) torch runs serially in 4-8 us, under fastclip's 30-45 us call.
_TORCH_ROWS_BELOW = 32768


def _chunks(batch: int, per_sample: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, per_sample))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def use_fastclip_rows(numel: int) -> bool:
    """Whether ``fastclip.norm`` takes the row norms of ``numel`` elements (see above)."""
    return numel >= _TORCH_ROWS_BELOW and torch.get_num_threads() > 1


def _sq_rows(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row of ``x`` (``[B, ...]``), in float32 or float64."""
    rows = x.reshape(x.shape[0], -1)
    if use_fastclip_rows(rows.numel()):
        return _api.norm(rows, axis=1) ** 2
    return torch.linalg.vector_norm(rows, dim=1) ** 2


def _trainable(p: torch.Tensor | None) -> bool:
    return p is not None and p.requires_grad


def pick_form(positions: int, d_in: int, d_out: int, form: str) -> str:
    """``"gram"`` or ``"materialize"`` for a linear map over ``positions`` positions."""
    if form != "auto":
        return form
    # multiply-adds per sample: two T x d x T Gram products vs one d_out x T x d_in product
    return "gram" if positions * (d_in + d_out) < d_in * d_out else "materialize"


def _weight_sq(a: torch.Tensor, g: torch.Tensor, form: str) -> torch.Tensor:
    """``||sum_t g_t a_t^T||_F^2`` per sample, for ``a: [B, T, d_in]``, ``g: [B, T, d_out]``."""
    batch, positions, d_in = a.shape
    d_out = g.shape[2]
    if positions == 1:  # ||g a^T||_F = |g| |a|
        return _sq_rows(a) * _sq_rows(g)
    parts = []
    if pick_form(positions, d_in, d_out, form) == "gram":
        for s in _chunks(batch, 2 * positions * positions):
            aa = torch.bmm(a[s], a[s].transpose(1, 2))
            gg = torch.bmm(g[s], g[s].transpose(1, 2))
            # rounding can push a sum of products of a PSD pair just below 0
            parts.append(torch.einsum("bij,bij->b", aa, gg).clamp_(min=0))
    else:
        for s in _chunks(batch, d_in * d_out):
            parts.append(_sq_rows(torch.bmm(g[s].transpose(1, 2), a[s])))
    return torch.cat(parts)


def _linear(layer: torch.nn.Linear, a: torch.Tensor, g: torch.Tensor, form: str) -> dict:
    batch = g.shape[0]
    g3 = g.reshape(batch, -1, g.shape[-1])
    out = {}
    if _trainable(layer.weight):
        a3 = a.to(g.dtype).reshape(batch, -1, a.shape[-1])
        out["weight"] = _weight_sq(a3, g3, form)
    if _trainable(layer.bias):
        out["bias"] = _sq_rows(g3.sum(1))
    return out


def _embedding(layer: torch.nn.Embedding, ids: torch.Tensor, g: torch.Tensor) -> dict:
    if not _trainable(layer.weight):
        return {}
    batch, vocab = g.shape[0], layer.num_embeddings
    ids = ids.reshape(batch, -1)
    rows = g.reshape(-1, g.shape[-1])
    if layer.padding_idx is not None:  # torch gives the padding row no gradient
        rows = rows * (ids.reshape(-1, 1) != layer.padding_idx).to(rows.dtype)
    # sample b's gradient has one row per distinct id: the sum of g_t over its positions
    key = (torch.arange(batch, device=ids.device).unsqueeze(1) * vocab + ids).reshape(-1)
    uniq, inverse = torch.unique(key, return_inverse=True)
    summed = torch.zeros(uniq.numel(), rows.shape[1], dtype=rows.dtype, device=rows.device)
    summed.index_add_(0, inverse, rows)
    row_sq = _sq_rows(summed)
    sq = torch.zeros(batch, dtype=row_sq.dtype, device=rows.device)
    sq.index_add_(0, uniq // vocab, row_sq)
    return {"weight": sq}


def _conv(layer: torch.nn.Conv1d | torch.nn.Conv2d, x: torch.Tensor, g: torch.Tensor, form: str):
    batch, groups = g.shape[0], layer.groups
    out: dict[str, torch.Tensor] = {}
    g3 = g.reshape(batch, g.shape[1], -1)  # [B, C_out, L]
    if _trainable(layer.weight):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        # torch pads like this itself for padding modes other than zeros and for "same"
        x = F.pad(x.to(g.dtype), layer._reversed_padding_repeated_twice, mode=mode)
        if isinstance(layer, torch.nn.Conv1d):
            x = x.unsqueeze(2)
            kernel, dil, stride = (1, *layer.kernel_size), (1, *layer.dilation), (1, *layer.stride)
        else:
            kernel, dil, stride = layer.kernel_size, layer.dilation, layer.stride
        positions, c_out = g3.shape[2], g3.shape[1] // groups
        p_in = layer.weight[0].numel()
        parts = []
        for s in _chunks(batch, groups * p_in * positions):
            cols = F.unfold(x[s], kernel, dilation=dil, stride=stride)  # [b, C_in*k, L]
            n = cols.shape[0]
            a = cols.reshape(n * groups, p_in, positions).transpose(1, 2)
            gs = g3[s].reshape(n * groups, c_out, positions).transpose(1, 2)
            parts.append(_weight_sq(a, gs, form).reshape(n, groups).sum(1))
        out["weight"] = torch.cat(parts)
    if _trainable(layer.bias):
        out["bias"] = _sq_rows(g3.sum(2))
    return out


def _layer_norm(layer: torch.nn.LayerNorm, x: torch.Tensor, g: torch.Tensor) -> dict:
    batch = g.shape[0]
    shape = (batch, -1, *layer.normalized_shape)
    out = {}
    if _trainable(layer.weight):
        x_hat = F.layer_norm(x.to(g.dtype), layer.normalized_shape, eps=layer.eps)
        out["weight"] = _sq_rows((x_hat * g).reshape(shape).sum(1))
    if _trainable(layer.bias):
        out["bias"] = _sq_rows(g.reshape(shape).sum(1))
    return out


def squared_norms(
    layer: torch.nn.Module, activation: torch.Tensor, output_grad: torch.Tensor, form: str
) -> dict[str, torch.Tensor]:
    """Each trainable parameter's per-sample squared gradient norms, float64 (no validation)."""
    if isinstance(layer, torch.nn.Linear):
        sq = _linear(layer, activation, output_grad, form)
    elif isinstance(layer, torch.nn.Embedding):
        sq = _embedding(layer, activation, output_grad)
    elif isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d)):
        sq = _conv(layer, activation, output_grad, form)
    else:
        sq = _layer_norm(layer, activation, output_grad)  # type: ignore[arg-type]
    return {k: v.to(torch.float64) for k, v in sq.items()}


def layer_problem(layer: torch.nn.Module) -> str | None:
    """Why a layer's per-sample norms cannot be taken here, or None."""
    if type(layer) not in SUPPORTED:
        names = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED)
        return (
            f"{type(layer).__name__} has no ghost-norm rule (supported: {names}, "
            "matched by exact type since a subclass may change forward)"
        )
    if isinstance(layer, torch.nn.Embedding) and layer.scale_grad_by_freq:
        return (
            "nn.Embedding(scale_grad_by_freq=True) scales each row's gradient by its "
            "frequency in the whole batch, so one sample's gradient depends on the others"
        )
    return None


def check_form(form: object, where: str) -> str:
    if not (isinstance(form, str) and form in FORMS):
        raise ValueError(f"{where}: linear_form must be one of {FORMS}, got {form!r}")
    return form


def per_sample_grad_norms(
    layer: torch.nn.Module,
    activation: torch.Tensor,
    output_grad: torch.Tensor,
    *,
    linear_form: str = "auto",
) -> dict[str, torch.Tensor]:
    r"""Per-sample gradient norms of one layer's parameters, from its input and output gradient.

    For users with their own hooks: ``activation`` is what the layer's
    forward received (``[B, ...]``; token ids for ``nn.Embedding``) and
    ``output_grad`` the gradient of the loss with respect to its output
    (``[B, ...]``), where the loss is the *sum* of the per-sample losses
    (Opacus multiplies the gradient of a mean loss by ``B`` to get it).  For
    a linear map over positions ``t`` (the sequence of a ``[B, T, d]``
    input, the output pixels of a convolution):

    .. math:: \|\nabla_W L_b\|_F^2 = \sum_{t,s} (a_{b,t} \cdot a_{b,s})
              (g_{b,t} \cdot g_{b,s}), \qquad
              \|\nabla_c L_b\|^2 = \Big\|\sum_t g_{b,t}\Big\|^2

    (the Gram form), or the same value from the materialised
    ``sum_t g_{b,t} a_{b,t}^T``.  ``nn.Embedding``: the rows of sample ``b``'s
    gradient are the sums of ``g_{b,t}`` over the positions of each distinct
    id (``padding_idx`` positions excluded, as torch gives that row no
    gradient).  ``nn.LayerNorm``: ``sum_t \hat x_{b,t} \odot g_{b,t}`` and
    ``sum_t g_{b,t}``, materialised (they are ``normalized_shape`` big).

    Parameters
    ----------
    layer : nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d or nn.LayerNorm
        Matched by exact type.  Only parameters with ``requires_grad`` are
        measured.
    activation : torch.Tensor
        The layer's input, batch first.
    output_grad : torch.Tensor
        The gradient with respect to the layer's output, batch first.
    linear_form : {"auto", "gram", "materialize"}, default "auto"
        For Linear (with more than one position per sample) and Conv weights:
        ``"auto"`` takes the form with fewer multiply-adds, ``T (d_in + d_out)
        < d_in d_out`` choosing the Gram form (Bu et al.'s mixed ghost
        clipping, arXiv 2205.10683).  Opacus 1.6 always takes the Gram form
        for ``[B, T, d]`` Linear inputs and materialises Conv gradients.

    Returns
    -------
    dict of str to torch.Tensor
        ``{"weight": norms, "bias": norms}`` (the trainable ones), each of shape
        ``[B]``, float32 (float64 for float64 layers).

    Raises
    ------
    TypeError
        An unsupported layer, or ``activation`` / ``output_grad`` not tensors.
    ValueError
        Batch sizes that differ, ``output_grad`` whose last axis (channel axis
        for Conv) is not the layer's output size, ``nn.Embedding`` with
        ``scale_grad_by_freq=True``, or a bad ``linear_form``.

    References
    ----------
    Goodfellow, "Efficient Per-Example Gradient Computations",
    https://arxiv.org/abs/1510.01799; Li et al., "Large Language Models Can Be
    Strong Differentially Private Learners", https://arxiv.org/abs/2110.05679;
    Bu et al., "Differentially Private Optimization on Large Model at Small
    Cost", https://arxiv.org/abs/2210.00038.

    Examples
    --------
    >>> import torch
    >>> from fastclip.torch import per_sample_grad_norms
    >>> layer = torch.nn.Linear(2, 1, bias=False)
    >>> a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # B=1, T=2
    >>> g = torch.tensor([[[3.0], [4.0]]])
    >>> per_sample_grad_norms(layer, a, g)["weight"]  # ||[3, 4]||
    tensor([5.])
    """
    where = "fastclip.torch.per_sample_grad_norms"
    problem = layer_problem(layer)
    if problem is not None:
        raise (TypeError if type(layer) not in SUPPORTED else ValueError)(f"{where}: {problem}")
    form = check_form(linear_form, where)
    for name, t in (("activation", activation), ("output_grad", output_grad)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim == 0:
            raise ValueError(f"{where}: {name} must be batch first ([B, ...]), got a 0-d tensor")
    check_shapes(layer, activation, output_grad, where)
    with torch.no_grad():
        sq = squared_norms(layer, activation.detach(), output_grad.detach(), form)
    dtype = torch.float64 if output_grad.dtype == torch.float64 else torch.float32
    return {k: v.sqrt().to(dtype) for k, v in sq.items()}


def check_shapes(layer: torch.nn.Module, a: torch.Tensor, g: torch.Tensor, where: str) -> None:
    if a.shape[0] != g.shape[0]:
        raise ValueError(
            f"{where}: activation and output_grad have batch sizes {a.shape[0]} and "
            f"{g.shape[0]} (both must be batch first)"
        )
    if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d)):
        size, axis = layer.out_channels, 1
    elif isinstance(layer, torch.nn.Linear):
        size, axis = layer.out_features, -1
    elif isinstance(layer, torch.nn.Embedding):
        size, axis = layer.embedding_dim, -1
    else:
        size, axis = None, -1
    if g.ndim < 2 or (size is not None and g.shape[axis] != size):
        raise ValueError(
            f"{where}: output_grad of shape {tuple(g.shape)} does not match "
            f"{type(layer).__name__}'s output size {size} (batch first)"
        )


per_sample_grad_norms.__module__ = "fastclip.torch"  # the public path in docs and reprs
