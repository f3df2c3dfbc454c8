"""``GhostClipping``: DP-SGD's clipped sum of per-sample gradients without materialising them.

Forward hooks on the supported layers put a pass-through autograd node (a
"probe") on each layer's output that keeps the layer's input.  A first
backward, taken only as far as the probes (``torch.autograd.grad`` of the
summed loss with respect to one private leaf that every probe takes), gives
each probe the gradient of the loss with respect to that output: the probe
turns it into per-sample squared norms and drops it.  No parameter gradient is
computed in that pass (autograd skips every ``AccumulateGrad`` node it does not
need) and ``.grad`` is not touched.  The second backward, of ``sum_b f_b
loss_b`` with ``f_b = min(1, C / (n_b + eps))``, accumulates the clipped sum
into ``.grad``; there the probes only pass the gradient through.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._ghost_layers import SUPPORTED, check_form, check_shapes, layer_problem, squared_norms

__all__ = ["GhostClipping"]

_WHERE = "fastclip.torch.GhostClipping"


class _Probe(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output's gradient to the clipper."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, leaf: torch.Tensor, owner: Any, record: Any) -> Any:
        ctx.owner, ctx.record = owner, record
        # a detached alias, not ``out`` itself: autograd turns a returned input into a
        # view, which then refuses in-place use (nn.ReLU(inplace=True) after a Linear)
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        if ctx.owner._collecting:
            ctx.owner._collect(ctx.record, grad)
        return grad, None, None, None


class GhostClipping:
    r"""DP-SGD's clipped sum of per-sample gradients by ghost norms, in two backward passes.

    Hooks the supported layers of ``model`` (``nn.Linear``, ``nn.Embedding``,
    ``nn.Conv1d``, ``nn.Conv2d``, ``nn.LayerNorm``). :meth:`backward` takes the
    per-sample losses ``loss_b`` and, without forming any ``[B, ...]``
    per-sample gradient, computes each sample's gradient norm over every
    trainable parameter (see :func:`per_sample_grad_norms` for each layer's
    formula), then accumulates into ``.grad``

    .. math:: n_b = \Big(\sum_{\text{params}} \|\nabla L_b\|^2\Big)^{1/2}, \qquad
              f_b = \min\Big(1, \frac{C}{n_b + \varepsilon}\Big), \qquad
              \texttt{.grad} \mathrel{+}= \frac{1}{R}\sum_b f_b \nabla L_b

    with ``R = B`` for ``loss_reduction="mean"`` and 1 for ``"sum"``: what
    :func:`fastclip.clip_per_sample` with ``reduce=loss_reduction`` returns
    for the materialised per-sample gradients.  Opacus'
    ``GradSampleModuleFastGradientClipping`` with ``DPLossFastGradientClipping``
    gives the same ``n_b`` and ``f_b`` and leaves the clipped *sum* in
    ``.grad`` for either reduction (its optimizer divides by the expected batch
    size), so ``"sum"`` here equals its ``.grad``.  Add the noise yourself.

    Parameters
    ----------
    model : torch.nn.Module
        Every submodule with trainable parameters of its own must be one of
        the supported types (exact type); frozen ones of any type are allowed.
    max_norm : float
        The bound ``C >= 0`` on each sample's gradient norm.
    loss_reduction : {"mean", "sum"}, default "mean"
        Divide the clipped sum by the batch size or not.
    eps : float, default 1e-6
        Added to the norm in the factor (Opacus' 1e-6).
    linear_form : {"auto", "gram", "materialize"}, default "auto"
        The form of the Linear-over-a-sequence and Conv weight norms; see
        :func:`per_sample_grad_norms`.

    Attributes
    ----------
    per_sample_norms : torch.Tensor or None
        ``n_b`` of the last :meth:`backward` (float32, or float64 for a float64
        loss).
    layer_norms : dict of str to torch.Tensor
        Each parameter's per-sample norms (by qualified name) of the last
        :meth:`backward`.

    Raises
    ------
    TypeError
        A submodule with trainable parameters of an unsupported type (its
        name is in the message), or ``model`` not a Module.
    ValueError
        Bad ``max_norm``, ``eps``, ``loss_reduction`` or ``linear_form``.

    Notes
    -----
    Per-sample losses must not mix samples: no BatchNorm in training mode, no
    loss normalised over the batch.  A supported layer called twice before
    :meth:`backward` (weight tying) or a parameter that reaches the loss
    without its layer's forward (as ``nn.MultiheadAttention`` reads
    ``out_proj.weight``) raises in :meth:`backward`, before ``.grad`` is
    written; Opacus raises for tying too.  Memory: per layer, the input it
    already keeps for backward, plus the norm pass's chunked temporaries
    (about 2**24 elements).

    References
    ----------
    Abadi et al., "Deep Learning with Differential Privacy",
    https://arxiv.org/abs/1607.00133; Li et al., "Large Language Models Can Be
    Strong Differentially Private Learners" (ghost clipping),
    https://arxiv.org/abs/2110.05679; Bu et al., "Differentially Private
    Optimization on Large Model at Small Cost" (book-keeping),
    https://arxiv.org/abs/2210.00038.

    Examples
    --------
    >>> import torch
    >>> from fastclip.torch import GhostClipping
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[0.0, 0.0]]))
    >>> ghost = GhostClipping(model, max_norm=1.0, loss_reduction="sum", eps=0.0)
    >>> x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    >>> loss = model(x).squeeze(1) - 0.0  # loss_b = w . x_b, gradient x_b
    >>> ghost.backward(loss)
    tensor([5.0000, 0.5000])
    >>> model.weight.grad  # x_0 / 5 + x_1
    tensor([[0.9000, 1.2000]])
    >>> ghost.remove()
    """

    def __init__(
        self,
        model: torch.nn.Module,
        max_norm: float,
        *,
        loss_reduction: str = "mean",
        eps: float = 1e-6,
        linear_form: str = "auto",
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"{_WHERE}: model must be a torch.nn.Module, got {type(model).__name__}"
            )
        self.max_norm = _nonneg(max_norm, "max_norm", allow_inf=True)
        self.eps = _nonneg(eps, "eps", allow_inf=False)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(
                f"{_WHERE}: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}"
            )
        self.loss_reduction = loss_reduction
        self.linear_form = check_form(linear_form, _WHERE)
        self._names: dict[torch.nn.Module, str] = {}
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            problem = layer_problem(module) if own or type(module) in SUPPORTED else None
            if problem is not None and own:
                raise (TypeError if type(module) not in SUPPORTED else ValueError)(
                    f"{_WHERE}: layer {name or '<model>'!r} has trainable parameters but "
                    f"{problem}; freeze it (requires_grad_(False)) or replace it"
                )
            if type(module) in SUPPORTED:
                self._names[module] = name
        self._owner = {
            id(p): (self._names.get(m), m, pn)
            for m in model.modules()
            for pn, p in m.named_parameters(recurse=False)
        }
        self._leaf = torch.zeros((), requires_grad=True)
        self._collecting = False
        self._records: dict[torch.nn.Module, list[dict[str, torch.Tensor]]] = {}
        self.per_sample_norms: torch.Tensor | None = None
        self.layer_norms: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self._names]

    # ------------------------------------------------------------ hooks

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if not torch.is_grad_enabled() or not isinstance(out, torch.Tensor):
            return None
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            return None
        problem = layer_problem(module)
        if problem is not None:  # scale_grad_by_freq switched on after construction
            raise ValueError(f"{_WHERE}: layer {self._names[module]!r}: {problem}")
        x = args[0] if args else kwargs["input"]
        return _Probe.apply(out, self._leaf, self, (module, x.detach()))

    def _collect(self, record: tuple, grad: torch.Tensor) -> None:
        module, x = record
        name = self._names[module]
        check_shapes(module, x, grad, f"{_WHERE}.backward: layer {name!r}")
        empty = grad.shape[0] == 0  # an empty Poisson-sampled batch: nothing to measure
        sq = {} if empty else squared_norms(module, x, grad.detach(), self.linear_form)
        self._records.setdefault(module, []).append(sq)

    # ------------------------------------------------------------ the step

    def backward(self, loss_per_sample: torch.Tensor) -> torch.Tensor:
        """Accumulate the clipped sum (or mean) of the per-sample gradients into ``.grad``.

        Parameters
        ----------
        loss_per_sample : torch.Tensor
            Shape ``[B]``: each sample's loss (``criterion(..., reduction="none")``,
            averaged or summed over any sequence axis), from a forward through
            the hooked model.

        Returns
        -------
        torch.Tensor
            The per-sample gradient norms ``n_b`` (also :attr:`per_sample_norms`).

        Raises
        ------
        ValueError
            ``loss_per_sample`` not 1-D or not part of an autograd graph, a
            layer whose batch size is not ``B``, a layer called twice, or a
            trainable parameter outside the hooked layers' forward; all before
            ``.grad`` is written.
        """
        where = f"{_WHERE}.backward"
        loss = loss_per_sample
        if not isinstance(loss, torch.Tensor) or loss.ndim != 1 or not loss.is_floating_point():
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"{where}: loss_per_sample must be a 1-D floating tensor [B] (one loss per "
                f"sample: criterion(..., reduction='none') reduced over other axes), got {shape}"
            )
        if loss.grad_fn is None:
            raise ValueError(
                f"{where}: loss_per_sample has no autograd graph (computed under no_grad, "
                "or from no trainable parameter)"
            )
        graph_params = self._check_graph(loss.grad_fn, where)
        self._records = {}
        self._collecting = True
        try:
            torch.autograd.grad(loss.sum(), self._leaf, retain_graph=True, allow_unused=True)
        finally:
            self._collecting = False
        records, self._records = self._records, {}
        total = torch.zeros(loss.shape[0], dtype=torch.float64, device=loss.device)
        layer_norms = {}
        for module, calls in records.items():
            name = self._names[module]
            if len(calls) > 1:
                raise ValueError(
                    f"{where}: layer {name!r} ran {len(calls)} times in this graph (weight "
                    "tying or reuse): its per-sample norm is not the sum of per-call norms"
                )
            for pname, sq in calls[0].items():
                if sq.shape != total.shape:
                    raise ValueError(
                        f"{where}: layer {name!r} has batch size {sq.shape[0]}, the loss "
                        f"{total.shape[0]} (inputs must be batch first)"
                    )
                total += sq.to(total.device)
                layer_norms[f"{name}.{pname}" if name else pname] = sq.sqrt()
        self._check_covered(graph_params, records, where)
        norms = total.sqrt()
        factors = (self.max_norm / (norms + self.eps)).clamp(max=1.0)
        if self.loss_reduction == "mean" and loss.shape[0] > 0:
            factors = factors / loss.shape[0]
        (factors.to(loss.dtype) * loss).sum().backward()
        dtype = torch.float64 if loss.dtype == torch.float64 else torch.float32
        self.layer_norms = {k: v.to(dtype) for k, v in layer_norms.items()}
        self.per_sample_norms = norms.to(dtype)
        return self.per_sample_norms

    def _check_graph(self, root: Any, where: str) -> list[torch.Tensor]:
        """The trainable tensors the loss reaches, each checked to be used exactly once."""
        seen, stack = {root}, [root]
        uses: dict[Any, int] = {}
        while stack:  # about 1 us per node: 3 ms for the 2-layer benchmark transformer
            node = stack.pop()
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                if hasattr(nxt, "variable"):  # AccumulateGrad: count every edge into it
                    uses[nxt] = uses.get(nxt, 0) + 1
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        params = []
        for node, count in uses.items():
            p = node.variable
            if p is self._leaf:
                continue
            if id(p) not in self._owner:
                raise ValueError(
                    f"{where}: the loss depends on a trainable tensor of shape "
                    f"{tuple(p.shape)} that is not a parameter of the model: its per-sample "
                    "gradients would be missing from the norms"
                )
            if count > 1:
                raise ValueError(
                    f"{where}: parameter {self._label(p)!r} is used {count} times in the "
                    "loss's graph (weight tying, a layer called twice, or the weight read "
                    "outside its layer's forward, as nn.MultiheadAttention reads "
                    "out_proj.weight): its per-sample norm is not the sum of per-use norms"
                )
            params.append(p)
        return params

    def _label(self, p: torch.Tensor) -> str:
        name, _, pname = self._owner[id(p)]
        return f"{name}.{pname}" if name else pname

    def _check_covered(self, params: list[torch.Tensor], records: dict, where: str) -> None:
        for p in params:
            if self._owner[id(p)][1] not in records:
                raise ValueError(
                    f"{where}: parameter {self._label(p)!r} reaches the loss without its layer's "
                    "forward (called through another module's code, as "
                    "nn.MultiheadAttention uses out_proj.weight, or not a supported layer)"
                )

    def remove(self) -> None:
        """Remove the hooks (also on leaving a ``with`` block)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> GhostClipping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _nonneg(value: Any, name: str, *, allow_inf: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_WHERE}: {name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (v >= 0.0 and (allow_inf or v < math.inf)):
        raise ValueError(
            f"{_WHERE}: {name} must be {'>= 0' if allow_inf else 'finite and >= 0'}, got {value!r}"
        )
    return v


GhostClipping.__module__ = "fastclip.torch"  # the public path: reprs, docs and pickles name it
