"""CPU threads for torch inside Ray workers (Ray sets OMP_NUM_THREADS=1 there)."""

from __future__ import annotations

import math
import os
from typing import Any


def configure_threads(torch: Any) -> int:
    """Use EAGLE_TORCH_THREADS if set, else the CPUs Ray assigned to this worker (at least 1)."""
    wanted = os.environ.get("EAGLE_TORCH_THREADS")
    if wanted:
        n = int(wanted)
    else:
        import ray

        # get_runtime_context() would start a local Ray when called outside one
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
        n = max(1, math.floor(cpus))
    torch.set_num_threads(n)
    return n
