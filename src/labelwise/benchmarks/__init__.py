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


def check_least(bench: str, checks) -> None:
    """One-line error for the first ``(flag, value, least)`` with ``value < least``."""
    from labelwise.errors import LabelwiseError

    for flag, value, least in checks:
        if value < least:
            raise LabelwiseError(f"bench {bench} {flag} {value}: needs at least {least}")


def run_variant_processes(bench: str, runs, threads: int) -> dict[str, dict]:
    """Run ``labelwise bench BENCH --variant NAME ...`` once per ``(name, argv)`` in ``runs``, each in
    its own process (so peak memory is its own) with torch and BLAS pinned to ``threads``; returns
    ``{name: the child's JSON}``. A failing child is a one-line error naming the variant."""
    import json
    import os
    import subprocess
    import sys

    from labelwise.errors import LabelwiseError

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "LABELWISE_NO_PROGRESS": "1"}
    results: dict[str, dict] = {}
    for name, argv in runs:
        cmd = [sys.executable, "-m", "labelwise", "bench", bench, "--variant", name, *argv]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise LabelwiseError(f"bench {bench} variant {name} failed: {last}")
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
    return results
