"""``labelwise bench`` benchmarks, one module per benchmark, and what they share."""

from __future__ import annotations


def peak_memory(device) -> dict:
    """Peak memory of this process so far: ``peak_rss_mb`` (resident set size), and on CUDA
    ``peak_gpu_mem_mb`` (``torch.cuda.max_memory_allocated``) and the ``gpu`` name."""
    import resource
    import sys

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"peak_rss_mb": rss / 2 ** 20}
    if device.type == "cuda":
        out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out["gpu"] = torch.cuda.get_device_name(device)
    return out
