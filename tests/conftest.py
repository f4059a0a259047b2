"""Shared pytest setup: CPU only, quiet progress bars, small thread count."""

import os

os.environ.setdefault("LABELWISE_NO_PROGRESS", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
