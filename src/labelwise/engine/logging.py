"""Run logging: ``RUN_DIR/log.jsonl`` (one JSON object per logged step), the same as plain text
lines in ``RUN_DIR/log.txt`` (what a cluster user tails), TensorBoard, optionally Weights & Biases
(``train.wandb_project``), and the window of loss terms between two log steps (:class:`LossWindow`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from labelwise import dist
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_text


class LossWindow:
    """Loss terms summed on the device between log steps (no host sync per step).

    Each term is averaged over the steps in which it was returned (a term staged in half-way
    through a window is not diluted) and over ranks; ranks may return different terms
    (:meth:`reduce` agrees on their union). The window is part of the checkpoint, so a run
    resumed between two log steps logs exactly what an uninterrupted one does.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.images = 0
        self.t0 = time.perf_counter()

    def add(self, terms: dict, images: int) -> None:
        for k, v in terms.items():
            v = v.detach().float().mean() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1
        self.images += images

    def reduce(self, step: int) -> dict[str, float]:
        """Means over steps and ranks (+ ``"_images"``: images of all ranks). Collective: every
        rank calls it at the same steps; raises on every rank alike when a term is not finite."""
        keys = sorted(set().union(*(set(ks) for ks in dist.all_gather_object(sorted(self.sums)))))
        dev = next(iter(self.sums.values())).device if self.sums else torch.device("cpu")
        zero = torch.zeros((), device=dev)
        sums = torch.stack([self.sums.get(k, zero).to(dev) for k in keys]).double().cpu() if keys else \
            torch.zeros(0, dtype=torch.float64)
        counts = torch.tensor([float(self.counts.get(k, 0)) for k in keys] + [float(self.images)], dtype=torch.float64)
        total = dist.all_reduce_sum(torch.cat([sums, counts]))
        n = len(keys)
        means = {k: float(total[i]) / max(float(total[n + i]), 1.0) for i, k in enumerate(keys)}
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            raise LabelwiseError(f"{', '.join(bad)} became non-finite between steps {step - self.steps + 1} and "
                                 f"{step}; lower optim.lr or set train.grad_clip")
        return {**means, "_images": float(total[-1])}

    def state_dict(self) -> dict:
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "counts": dict(self.counts),
                "steps": self.steps, "images": self.images}

    def load_state_dict(self, state: dict, device) -> None:
        self.reset()
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.counts = dict(state["counts"])
        self.steps, self.images = int(state["steps"]), int(state["images"])


def text_line(record: dict, prefix: str = "train", max_steps: int | None = None) -> str:
    """One plain-text log line: ``train step 120/300  loss 0.5120  cls 0.1203 ...  lr 1.20e-03``."""
    step = int(record.get("step", 0))
    head = f"{prefix} step {step}" + (f"/{max_steps}" if max_steps else "")
    parts = []
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        parts.append(f"{k} {v:.2e}" if k.startswith("lr") else f"{k} {v:.4g}")
    return "  ".join([time.strftime("%Y-%m-%d %H:%M:%S"), head, *parts])


class RunLogger:
    """Writes on the main rank only; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 max_steps: int | None = None, wandb_project: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self.text = Path(run_dir) / "log.txt"
        self.max_steps = max_steps
        self.tb = self.wandb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except Exception:  # tensorboard not installed / broken: JSONL only
                self.tb = None
        if enabled and wandb_project:
            try:
                import wandb
            except ImportError:
                raise LabelwiseError("config key 'train.wandb_project' is set but wandb is not installed; "
                                     "pip install wandb (or leave the key empty)") from None
            # one W&B run per labelwise run folder: a resumed run continues it
            self.wandb = wandb.init(project=wandb_project, name=Path(run_dir).name, dir=str(run_dir),
                                    id=_wandb_id(run_dir), resume="allow", config=config or {})

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they will be redone)."""
        if not self.enabled:
            return
        if self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed process
                if int(rec.get("step", 0)) <= step:
                    keep.append(line)
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        if self.text.is_file():
            keep = [line for line in self.text.read_text().splitlines() if _text_step(line) <= step]
            atomic_write_text(self.text, "".join(line + "\n" for line in keep))

    def log(self, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._text(record, prefix)
        self._scalars(_numbers(record), prefix, int(record.get("step", 0)))

    def log_eval(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        scalars = _numbers(metrics)
        self._text({"step": step, **scalars}, "eval")
        self._scalars(scalars, "eval", step)

    def _scalars(self, scalars: dict, prefix: str, step: int) -> None:
        """TensorBoard and W&B get the same ``prefix/key`` scalars."""
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def _text(self, record: dict, prefix: str) -> None:
        with open(self.text, "a") as f:
            f.write(text_line(record, prefix, self.max_steps) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _numbers(record: dict) -> dict:
    """The numeric entries of a record other than its step (booleans are not scalars)."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _text_step(line: str) -> int:
    """The step of a ``log.txt`` line (0 when it has none: kept on resume)."""
    parts = line.split()
    try:
        return int(parts[parts.index("step") + 1].split("/")[0])
    except (ValueError, IndexError):
        return 0


def _wandb_id(run_dir: str | Path) -> str:
    """A W&B run id kept in the run folder, so a resumed labelwise run logs into the same W&B run."""
    path = Path(run_dir) / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    atomic_write_text(path, rid + "\n")
    return rid
