"""optax (``optax``): ``optax.clip_by_global_norm`` / ``optax.clip`` /
``optax.global_norm`` under ``jax.jit`` (in-place mode donates the input
buffers), ``per_example_global_norm_clip`` for ``per-sample`` and
``optax.chain(clip_by_global_norm, adamw)`` for ``adamw``."""

from __future__ import annotations

from typing import Any

from ..data import ADAMW, CaseData, Unsupported
from ._common import Op


def make_optax(d: CaseData, inplace: bool) -> Op:
    import jax
    import jax.numpy as jnp
    import optax

    kind = d.case.kind
    if kind == "rows":
        raise Unsupported("optax has no per-row clip that keeps the rows")
    if kind == "adamw":
        return _optax_adamw(d)
    if kind == "persample":
        if d.dtype == "float64" and not jax.config.read("jax_enable_x64"):
            raise Unsupported("JAX computes in float32 unless jax_enable_x64 is set")
        g = _jax_arrays(d)
        clip = jax.jit(lambda gs: optax.per_example_global_norm_clip(gs, d.max_norm)[0])
        return lambda: jax.block_until_ready(clip(g))
    dtype = jnp.bfloat16 if d.dtype == "bfloat16" else d.dtype
    grads = [a.astype(dtype) for a in _jax_arrays(d)]
    if kind == "norm":
        f = jax.jit(optax.global_norm)
        return lambda: f(grads).block_until_ready()
    tx = optax.clip_by_global_norm(d.max_norm) if kind == "clip" else optax.clip(d.clip_value)
    state = tx.init(grads)

    def update(g: Any) -> Any:
        return tx.update(g, state)[0]

    if not inplace:
        f = jax.jit(update)
        return lambda: jax.block_until_ready(f(grads))
    fd = jax.jit(update, donate_argnums=0)  # the input buffers are reused: "in place"
    box = [grads]

    def donated() -> Any:
        box[0] = jax.block_until_ready(fd(box[0]))
        return box[0]

    return donated


def _jax_arrays(d: CaseData) -> list[Any]:
    """The case's base values as JAX arrays (copies: JAX owns its buffers)."""
    import jax.numpy as jnp

    return [jnp.asarray(v) for v in d.views_of(d.ref_pool)]


def _optax_adamw(d: CaseData) -> Op:
    """``optax.chain(clip_by_global_norm, adamw)`` under ``jax.jit``, buffers donated."""
    import jax
    import jax.numpy as jnp
    import optax

    if d.dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise Unsupported("JAX computes in float32 unless jax_enable_x64 is set")
    (b1, b2) = ADAMW["betas"]
    tx = optax.chain(
        optax.clip_by_global_norm(d.max_norm),
        optax.adamw(
            ADAMW["lr"], b1=b1, b2=b2, eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"]
        ),
    )
    grads = _jax_arrays(d)
    params = [jnp.asarray(p) for p in d.param_copies("numpy")]

    def update(params: Any, state: Any, grads: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    f = jax.jit(update, donate_argnums=(0, 1))
    box = [params, tx.init(params)]

    def op() -> list[Any]:
        box[0], box[1] = jax.block_until_ready(f(box[0], box[1], grads))
        return list(box[0]) + list(box[1][1][0].mu)  # (clip, (scale_by_adam, ...))

    return op
