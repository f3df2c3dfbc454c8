"""Tunables in one place.  Tests patch these small to force multi-chunk paths.

Each value names the measurement behind it; re-measure with
``python benchmarks/bench_threshold.py`` on a new machine kind.
"""

from __future__ import annotations

import os

#: Total elements below which the serial kernels run.  A parallel launch costs
#: about 2-3 us with the ``omp`` layer (30-50 us with ``workqueue``).  Measured
#: on the 2-core CI-like machine (``python benchmarks/bench_threshold.py``,
#: float32, serial/parallel time ratio for the fused clip and the norm):
#: 32k 0.66/0.64, 65k 0.95/0.88, 131k 1.29/1.24, 262k 1.64/1.82 (a second run:
#: 65k 0.76/0.83, 131k 1.16/1.06, 262k 1.74/1.58).  That tight loop keeps the
#: worker threads awake; one ``clip_by_norm_`` call at a time, as in training,
#: also pays their wake-up (the script's second table; float32, in cache,
#: serial/parallel/NumPy in us:
#: 100k 12.9/16.1/15.0, 150k 19.0/23.8/21.3, 200k 25.0/26.1/27.7, 300k
#: 35.9/31.3/39.6; a later run 100k 13.2/15.8/14.7, 200k 19.9/23.1/20.9, 300k
#: 36.6/35.0/39.4; ``fastclip bench``'s 1e5 case ran parallel in 31 us against
#: NumPy's 27).  The crossover is ~100k in the tight loop and ~200k for single
#: calls: 150k splits it.
PARALLEL_MIN_ELEMENTS: int = 150_000

#: The CPU thread policy above ``PARALLEL_MIN_ELEMENTS`` (``FASTCLIP_THREADS``
#: in the environment when fastclip is imported; this value may be set at any
#: time): ``"auto"`` runs in parallel unless parallel launches are measured
#: slower than serial ones, then serially for a while (``_cpu/_policy.py``);
#: ``"parallel"`` always (fastclip 0.x before the policy); ``"serial"`` never.
#: Any other value raises ValueError at the first launch above the threshold.
THREADS: str = os.environ.get("FASTCLIP_THREADS", "auto")

#: ``auto``: a parallel launch slower than this many times the serial time
#: per element of its size class is a *strike*; ``CONTENTION_STRIKES`` in a
#: row start a back-off.  On a contended 2-core machine parallel launches of
#: 1e6 float32 took 15-50 ms against 1.05 ms serially, often alternating with
#: fast ones (``python benchmarks/bench_busy.py``); on a quiet one parallel is
#: 0.55-0.85x of serial above the threshold (the comment above).  Measured
#: choices (a script interleaving ``THREADS="auto"`` and ``"parallel"`` calls,
#: 40 rounds of 1e7, 2,000 x 1,000 and 3e5 float32, machine loaded ~1.7 by
#: neighbours; then ``bench_busy.py``): 1.25 and one strike backed off 3-4
#: times and cost 7-10% of median time against always-parallel; 2.0 and two
#: strikes missed the alternating slow launches (``clip_by_norm_`` 3.5-11x
#: NumPy's serial time); 2.0 and one strike: no back-off, auto/parallel
#: 0.96-1.09, and 1.16-1.20x NumPy under two busy processes.
CONTENTION_RATIO: float = 2.0
CONTENTION_STRIKES: int = 1
#: ``auto``: the first back-off lasts this long (ms); each slow probe after one
#: doubles it, up to ``BACKOFF_MAX_MS``; a fast probe resets it.  A probe on a
#: contended machine costs one slow parallel launch (up to ~50 ms for 1e6
#: elements, measured as above), so 2 s bounds that cost to ~2.5% of the time
#: while the contention lasts, and 50 ms lets parallel back in soon after it ends.
BACKOFF_MIN_MS: float = 50.0
BACKOFF_MAX_MS: float = 2_000.0

#: Elements per work item of the chunk-parallel kernels (one array may span
#: many chunks; tiny arrays are one chunk each).  256 KiB of float32: big
#: enough to amortise scheduling, small enough to balance two to 64 cores.
CHUNK: int = 65_536

#: Columns per work item when reducing over leading axes (``cols_*`` kernels).
COL_TILE: int = 1_024

#: Read NumPy array headers in bulk from their C structs for lists of arrays
#: (self-checked against NumPy's attributes at first use; off = per-array
#: Python attribute access, about 3 us per array instead of ~40 ns).
FAST_NUMPY_HEADERS: bool = True

#: Arrays in a list below which the per-array Python path is used anyway.
FAST_HEADERS_MIN_ARRAYS: int = 8

#: Calls that take the Python way before an optional kernel (one with a Python
#: equivalent, a per-call speed-up: the bulk header read above) is compiled,
#: unless it is already in the disk cache.  Compiling the header kernel took
#: 0.8-0.9 s of the 3.5-4.3 s cold first ``clip_by_global_norm_`` of the
#: README's quick start, to save ~3 us per array per call: a script or a
#: notebook cell that makes a few calls never earns it back, while a training
#: loop passes 8 calls in its first steps and then runs as before (``python
#: benchmarks/bench_first_call.py``, 2-core machine).
OPTIONAL_KERNEL_AFTER_CALLS: int = 8

#: Columns per parallel work item of the per-sample fused weighted sum (pass 2 of
#: ``clip_per_sample``).  Measured on the 2-core machine, B=256 x 1.07M float32
#: (pass 2 alone, ms): tile 1,024 41, 4,096 35, 8,192 34 (the read floor),
#: 16,384 33; 64 KiB row segments stream well.
PER_SAMPLE_COL_TILE: int = 8_192
#: Rows the per-sample weighted sum adds in its float32 accumulator before
#: flushing into float64.
PER_SAMPLE_ROW_BLOCK: int = 64

# ------------------------------------------------------------------- GPU
#: Threads per block of the GPU kernels (reductions use up to 1,024).
GPU_BLOCK: int = 512
#: Threads of the one-block finishing kernel.
GPU_FINISH_BLOCK: int = 1_024
#: Elements per (tensor, chunk) work item: apex and ATen use 65,536.
GPU_CHUNK: int = 65_536
#: Grid-stride launches use at most this many blocks.
GPU_MAX_BLOCKS: int = 65_535
#: Device tensor tables kept for reuse (keyed by device, stream and content).
GPU_TABLE_CACHE: int = 64

#: ``fastclip.torch.BackwardNorm`` (and ``norm_in_backward=True``): CPU
#: parameters with fewer elements get no post-accumulate-grad hook; their
#: gradients are measured in one packed pass when the norm is asked for.  On
#: the CPU no size pays for a hook, so the default hooks none: a hook's
#: Python runs between autograd's kernels with cold caches (fastclip's norm of
#: a 256-value gradient took 148 us there against 20 us outside), and the
#: large gradients are not in cache either: on GPT-2 small's shapes (90M
#: float32, wte cut to 5,000 rows) hooks on every tensor added 36-52 ms to
#: backward where the packed pass at the step costs 18-21 ms (the 2-core
#: CI-like machine, ``python benchmarks/bench_backward_norm.py --small``).
BACKWARD_HOOK_MIN_NUMEL: int = 1 << 62

#: The same for CUDA parameters: every one is hooked.  A hook only enqueues
#: fastclip's norm kernel on torch's current stream, behind the kernel that
#: wrote the gradient, while the host runs ahead; not measured yet (no GPU
#: was available to this project's sessions).
BACKWARD_HOOK_MIN_NUMEL_CUDA: int = 0
