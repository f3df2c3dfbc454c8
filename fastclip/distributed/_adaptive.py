"""Adaptive clippers and fused optimizers across ranks: one reduced norm, identical state.

A clipper's state (AutoClip's history, ZClip's running mean and variance)
is a function of the norms it saw.  Given the *global* norm, the same on
every rank (one gather, :func:`fastclip.distributed.global_norm`), every
rank's clipper takes the same decisions and keeps the same state; each
scales its local shards by the same coefficient.
"""

from __future__ import annotations

from typing import Any

from fastclip import _dispatch

from ._layout import dtensor_class
from ._reduce import OP_CLIP, by_device, reduce_norms, result_array

__all__ = ["Plan", "clip_with_"]


class Plan:
    """How the arrays of a call are reduced: the arguments of :func:`global_norm`, kept.

    Parameters
    ----------
    group, replicated, layout, tied
        As in :func:`fastclip.distributed.global_norm`.  In ``replicated``,
        ``layout`` (a dict) and ``tied``, arrays may be named by their
        *parameters*: :func:`clip_with_` and the fused optimizers map each
        parameter to its gradient at every step (gradients are new tensors
        after ``zero_grad()``; parameters stay).

    Examples
    --------
    >>> import fastclip.distributed as fcd
    >>> fcd.Plan()
    Plan(group=None, replicated=0, layout=None, tied=0)
    """

    def __init__(
        self, group: Any = None, *, replicated: Any = (), layout: Any = None, tied: Any = None
    ):
        self.group = group
        self.replicated = tuple(replicated) if isinstance(replicated, (list, tuple)) else replicated
        self.layout = layout
        self.tied = tied

    def __repr__(self) -> str:
        n_repl = len(self.replicated) if isinstance(self.replicated, tuple) else 1
        n_tied = len(self.tied) if self.tied else 0
        return (
            f"Plan(group={self.group!r}, replicated={n_repl}, layout={self.layout!r}, "
            f"tied={n_tied})"
        )

    def resolve(self, arrays: list[Any], params: list[Any] | None) -> dict[str, Any]:
        """The keyword arguments of one call, parameters replaced by the positions
        of their gradients in ``arrays``."""

        def at(item: Any) -> Any:
            if params is not None:
                for k, p in enumerate(params):
                    if p is item:
                        return k
            return item

        layout = self.layout
        if isinstance(layout, dict):
            layout = {at(k): v for k, v in layout.items()}
        tied = self.tied
        if tied:
            pairs = tied.items() if isinstance(tied, dict) else tied
            tied = [(at(a), g) for a, g in pairs]
        repl = self.replicated
        repl = [at(r) for r in repl] if isinstance(repl, tuple) else [at(repl)]
        return dict(group=self.group, replicated=repl, layout=layout, tied=tied)


def _local(a: Any) -> Any:
    dtensor = dtensor_class()
    return a.to_local() if dtensor is not None and isinstance(a, dtensor) else a


def _agc_precheck(clipper: Any, grads: list[Any], params: list[Any]) -> None:
    """AGC's own checks, before the gather (a rank refusing after it would leave the
    others with a step it did not take); unit norms must be whole on each rank."""
    if len(grads) != len(params):
        raise ValueError(f"AGC: {len(grads)} gradients for {len(params)} parameters")
    dtensor = dtensor_class()
    for k, (g, p) in enumerate(zip(grads, params)):
        if tuple(_local(g).shape) != tuple(_local(p).shape):
            raise ValueError(
                f"AGC: local gradient shape {tuple(_local(g).shape)} != local parameter shape "
                f"{tuple(_local(p).shape)} (array {k})"
            )
        if dtensor is None or not isinstance(g, dtensor):
            continue
        axes = clipper.unit_axes(tuple(g.shape))
        ndim = len(g.shape)
        reduced = set(range(ndim)) if axes is None else {a % ndim for a in axes}
        for placement in g.placements:
            if placement.is_shard() and placement.dim % max(ndim, 1) in reduced:
                raise NotImplementedError(
                    f"fastclip.distributed.clip_with_: AGC's unit norms of gradient {k} "
                    f"reduce over axis {placement.dim}, which is sharded ({g.placements}): "
                    "a unit is split across ranks; shard these parameters on an axis "
                    "that the unit norms keep (axis 0 for axis='torch')"
                )


@_dispatch.public("fastclip.distributed.clip_with_", "grads")
def clip_with_(clipper: Any, grads: Any, params: Any = None, *, plan: Plan | None = None) -> Any:
    r"""Run an adaptive clipper on gradients sharded over ranks; every rank's state stays equal.

    The global norm comes from one gather (:func:`global_norm` with ``plan``'s
    arguments); then ``clipper(local_grads, local_params, total_norm=norm)``
    clips every rank's local shards by the coefficient that norm gives.  The
    clip's refusals (read-only, overlapping arrays, AGC's shape checks) are
    made before the gather and travel in it, so every rank refuses together
    and no clipper's state moves.

    Parameters
    ----------
    clipper : GlobalNormClipper, AutoClip, ZClip or AGC
        One instance per rank, built with the same arguments.
    grads : array or iterable of arrays
        This rank's gradients (torch tensors, DTensors on any meshes, NumPy).
    params : iterable of arrays, optional
        The parameters (AGC only), in the order of ``grads``.
    plan : Plan, optional
        How the gradients are laid out (default: as :func:`global_norm`).

    Returns
    -------
    array
        The global norm before clipping, as the clipper returns it.

    Notes
    -----
    AGC clips unit by unit from the *local* unit norms: a unit must be whole
    on each rank (DTensors sharded on axis 0 with ``axis="torch"``, as FSDP2
    shards them; a shard on a reduced axis is refused).  The returned norm
    and the non-finite policy use the global norm.

    Examples
    --------
    >>> import datetime, socket, torch, torch.distributed as dist
    >>> import fastclip.distributed as fcd
    >>> from fastclip.adaptive import AutoClip
    >>> with socket.socket() as s:
    ...     _ = s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
    ...                         world_size=1, timeout=datetime.timedelta(seconds=30))
    >>> clipper = AutoClip(percentile=50)
    >>> fcd.clip_with_(clipper, [torch.tensor([3.0, 4.0])])
    tensor(5.)
    >>> clipper.state_dict()["norms"]
    [5.0]
    >>> dist.destroy_process_group()
    """
    items = _dispatch.as_array_list(grads)
    plist = None if params is None else _dispatch.as_array_list(params)
    kwargs = (plan or Plan()).resolve(items, plist)
    is_agc = hasattr(clipper, "unit_axes")

    def precheck() -> None:
        if not items:  # the clipper would count no step here and a step elsewhere
            raise ValueError(
                "fastclip.distributed.clip_with_: this rank passed no gradients; every rank "
                "passes its gradients (empty shards are fine), so that every clipper counts "
                "the same steps"
            )
        if len(by_device([_local(a) for a in items])) > 1:
            raise ValueError(
                "fastclip.distributed.clip_with_: the gradients are on several devices; a "
                "clipper scales one library and device per call"
            )
        if is_agc:
            if plist is None:
                raise ValueError("AGC needs the parameters: call clip_with_(agc, grads, params)")
            _agc_precheck(clipper, items, plist)

    red = reduce_norms(
        items,
        clipper.ord,
        kwargs["group"],
        kwargs["replicated"],
        OP_CLIP,
        0.0,
        0.0,
        True,
        kwargs["layout"],
        kwargs["tied"],
        precheck,
    )
    total = result_array(red.total, red.loc, red.loc.arrays)
    local_params = None if plist is None else [_local(p) for p in plist]
    return clipper(red.loc.arrays, local_params, total_norm=total)
