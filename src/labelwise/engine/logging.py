"""Run logging: ``RUN_DIR/log.jsonl`` (one JSON object per logged step) + TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from labelwise.io import atomic_write_text


class RunLogger:
    """Writes on the main rank only; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except Exception:  # tensorboard not installed / broken: JSONL only
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they will be redone)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed process
            if int(rec.get("step", 0)) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def log_eval(self, metrics: dict, step: int) -> None:
        if self.enabled and self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"eval/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
