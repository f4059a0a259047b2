"""Shared pytest setup: CPU only, quiet progress bars, small thread count."""

import os
import tempfile

os.environ.setdefault("LABELWISE_NO_PROGRESS", "1")
# derived-tag caches of the tests' datasets stay out of the user's ~/.cache
os.environ.setdefault("LABELWISE_CACHE", tempfile.mkdtemp(prefix="labelwise-test-cache-"))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# no hub downloads in tests (CI has no network to the model hubs): a missing file fails fast
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# LABELWISE_TEST_THREADS: fewer threads when something else runs on the same cores
torch.set_num_threads(int(os.environ.get("LABELWISE_TEST_THREADS", min(2, os.cpu_count() or 1))))
