"""The intra-op thread count every engine of a bench runs with, and setting it where each library reads it.

Left to themselves the libraries disagree: PyTorch follows OMP_NUM_THREADS (1 under `OMP_NUM_THREADS=1`) while ONNX
Runtime sizes its own pool from the cores, so a speed ratio would compare different amounts of hardware. The bench
therefore always passes an explicit count: `runtime.threads`, or the machine's physical cores.
"""

from __future__ import annotations

import contextlib
import os


def default_threads() -> int:
    """The machine's physical cores (hyper-threads share one core's arithmetic units, and decoding is bound by memory and
    vector units, so a second thread per core rarely helps), capped by the CPUs this process may run on; the logical
    count where psutil cannot tell physical cores."""
    import psutil

    cores = psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return max(1, min(cores, usable))


def resolve_threads(threads: int) -> int:
    """`runtime.threads` when set (> 0), else `default_threads()`."""
    return threads if threads > 0 else default_threads()


def set_torch_threads(threads: int) -> None:
    """PyTorch's intra-op pool to `threads` (overrides OMP_NUM_THREADS) and its inter-op pool to 1 thread.

    One model's forward pass runs no independent ops side by side, so inter-op threads would only compete with the
    intra-op pool (ONNX Runtime's engines get inter_op_num_threads = 1 for the same reason). torch accepts the inter-op
    setting only before its first parallel work; after that it keeps its pool, which `info()` then reports."""
    import torch

    torch.set_num_threads(threads)
    # RuntimeError: the inter-op pool already started in this process (an in-process bench after other work)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
