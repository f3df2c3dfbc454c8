"""Puts this folder on ``sys.path`` so the multi-process tests can ``import _dist_workers``.

``torch.multiprocessing.spawn`` pickles each rank's entry point by module name
and the spawned interpreters inherit the parent's ``sys.path``, so the module
must be importable by its plain name, as ``reference`` is from the top-level
``tests/conftest.py``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
