"""``fastclip bench``: time clipping on this machine against the tools people use today.

Small modules, one job each:

* ``workloads``  what is clipped: single-array size sweep, GPT-2 parameter shapes,
  many tiny tensors, per-row clipping, value clipping, norms;
* ``data``       the arrays (one base pool, one work pool), the float64 reference
  and the correctness check;
* ``registry``   the backends by name: fastclip (CPU, GPU) and the peers (NumPy, torch,
  CuPy, optax, Opacus), each with its probe, timer and storage;
* ``peers``      one module per library: what each backend's timed call does;
* ``timing``     interleaved repeated timing, CUDA events, the measured bandwidth floor;
* ``machine``    CPU model, cores, GPUs, library versions;
* ``report``     the table, ``--compare``, JSON; ``plot`` draws ``--plot``;
* ``runner``     puts it together; ``progress`` is the stderr progress bar.
* ``command``    the ``fastclip bench`` options, checked before the run, and what it prints.

Nothing here is imported by ``import fastclip``.
"""

from __future__ import annotations

from .runner import BenchConfig, run

__all__ = ["BenchConfig", "run"]
