"""fastclip.distributed on an NCCL group (one rank on one GPU): CPU-offloaded gradients
reduce through a CUDA row (the group cannot take CPU tensors), CUDA gradients on their
device, and a ``cpu:gloo,cuda:nccl`` group keeps CPU gradients on the CPU; each norm and
clip against a float64 NumPy oracle.  Runs in a fresh subprocess (its own process group);
skips with the reason where there is no CUDA device or no NCCL.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _backends import require_gpu_module

torch = require_gpu_module()
if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
    pytest.skip("torch.distributed has no NCCL backend here", allow_module_level=True)

SCRIPT = textwrap.dedent(
    """
    import json, sys, datetime
    import numpy as np, torch, torch.distributed as dist
    import fastclip.distributed as fcd

    port, backend = int(sys.argv[1]), sys.argv[2]
    torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    rng = np.random.default_rng(0)
    data = [rng.standard_normal(n).astype(np.float32) * 3 for n in (1000, 70_000, 5)]
    out = {}
    for where in ("cpu", "cuda"):
        grads = [torch.from_numpy(a.copy()).to(where) for a in data]
        total = fcd.clip_by_global_norm_(grads, 1.0)
        out[where] = {
            "total": float(total),
            "total_device": str(total.device),
            "grads": [g.cpu().double().numpy().tolist() for g in grads],
            "grad_devices": sorted({str(g.device) for g in grads}),
        }
    dist.destroy_process_group()
    print(json.dumps(out))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("backend", ["nccl", "cpu:gloo,cuda:nccl"])
def test_cpu_and_cuda_gradients_on_an_nccl_group_match_the_oracle(backend: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(_free_port()), backend],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rng = np.random.default_rng(0)
    data = [rng.standard_normal(n).astype(np.float32) * 3 for n in (1000, 70_000, 5)]
    ref = float(np.linalg.norm(np.concatenate([a.astype(np.float64) for a in data])))
    for where in ("cpu", "cuda"):
        res = out[where]
        assert res["total"] == pytest.approx(ref, rel=1e-6)
        assert res["grad_devices"] == [("cpu" if where == "cpu" else "cuda:0")]
        # CPU gradients keep a CPU result (the row went through the GPU and came back)
        assert res["total_device"] == ("cpu" if where == "cpu" else "cuda:0")
        coef = 1.0 / (ref + 1e-6)
        for g, a in zip(res["grads"], data):
            np.testing.assert_allclose(g, a.astype(np.float64) * coef, rtol=2e-6, atol=1e-9)
