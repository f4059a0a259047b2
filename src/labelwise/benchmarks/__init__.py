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


class StepClock:
    """A trainer hook timing every step after ``warmup`` untimed ones (``times``, seconds); on CUDA it
    synchronises before reading the clock and resets the peak-memory counter when timing starts."""

    def __init__(self, device, warmup: int):
        import time

        self.device, self.warmup, self.times = device, int(warmup), []
        self._last = time.perf_counter()

    def __call__(self, trainer, step: int) -> None:
        import time

        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step > self.warmup:
            self.times.append(now - self._last)
        self._last = now
        if step == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def summary(self, batch: int) -> dict:
        """Median and min..max step time in ms, images per second at ``batch``."""
        import statistics

        med = statistics.median(self.times)
        return {"ms_per_step": 1000 * med, "ms_per_step_min": 1000 * min(self.times),
                "ms_per_step_max": 1000 * max(self.times), "images_per_s": batch / med, "batch_size": batch,
                "steps": len(self.times)}
