"""Config sections shared by every method (``train``, ``optim``, ``data``, ``infer``).

A method's config is a dataclass that inherits :class:`BaseConfig` (which composes these
three sections) and adds its own ``model`` / ``loss`` sections. Values are validated by
:mod:`labelwise.config` (``param`` ranges/choices); the fully resolved config is saved to
``RUN_DIR/config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from labelwise.config import param
from labelwise.errors import LabelwiseError


@dataclass
class TrainConfig:
    max_steps: int = param(1000, range=(1, None), help="number of optimisation steps (--steps N); "
                                                       "ignored when train.epochs > 0")
    epochs: int = param(0, range=(0, None), help="train for this many passes over the training split instead "
                                                 "of train.max_steps (0 = use max_steps; --epochs N)")
    batch_size: int = param(8, range=(1, None),
                            help="images per optimiser step over all ranks (the global batch, as papers state it); "
                                 "each rank takes train.batch_per_gpu of them per forward, accumulating the rest")
    batch_per_gpu: int | None = param(None, range=(1, None),
                                      help="images per rank and forward (the memory you allow); None = batch_size / "
                                           "world size. batch_size / (batch_per_gpu x world size) forwards are "
                                           "accumulated per step")
    seed: int = param(0, range=(0, None), help="base seed; rank r uses seed + r for model-side randomness")
    log_every: int = param(10, range=(1, None), help="steps between log.jsonl / TensorBoard records")
    eval_every: int = param(0, range=(0, None), help="steps between periodic evaluations (0 = only at the end)")
    eval_at_end: bool = param(True, help="run the method's evaluation once training finishes")
    ckpt_every: int = param(500, range=(1, None), help="steps between checkpoints (one is always written at the end)")
    keep_last: int = param(2, range=(0, None), help="step-numbered checkpoints kept besides checkpoints/last.pt")
    amp: str = param("none", choices=("none", "bf16", "fp16"), help="mixed precision (fp16 uses a GradScaler; GPU only)")
    grad_clip: float = param(0.0, range=(0.0, None), help="max global grad norm (0 = off)")
    num_workers: int = param(0, range=(0, None), help="DataLoader worker processes per rank")
    sync_bn: bool = param(False, help="convert BatchNorm layers to SyncBatchNorm under torchrun (CUDA only)")
    device: str = param("auto", help="auto | cpu | cuda | cuda:N (under torchrun, cuda means cuda:LOCAL_RANK)")
    wandb_project: str | None = param(None, help="also log to this Weights & Biases project (pip install wandb; "
                                                 "off when empty)")


@dataclass
class OptimConfig:
    name: str = param("adamw", choices=("adamw", "sgd"), help="optimiser")
    lr: float = param(1e-3, range=(0.0, None), help="peak learning rate of the head (new layers)")
    weight_decay: float = param(1e-2, range=(0.0, None), help="weight decay (never on norms, biases, pos-embeds, tokens)")
    backbone_lr_mult: float = param(0.1, range=(0.0, None), help="backbone lr = lr x this")
    betas: tuple[float, float] = param((0.9, 0.999), range=(0.0, 1.0), help="AdamW betas")
    momentum: float = param(0.9, range=(0.0, 1.0), help="SGD momentum")
    nesterov: bool = param(False, help="SGD Nesterov momentum")
    schedule: str = param("poly", choices=("poly", "cosine", "constant"), help="lr decay after warmup (per step)")
    poly_power: float = param(0.9, range=(0.0, None), help="exponent of the poly schedule")
    min_lr_ratio: float = param(0.0, range=(0.0, 1.0), help="floor of the decayed lr as a fraction of the peak")
    warmup_steps: int = param(0, range=(0, None), help="linear warmup steps")
    warmup_init_lr: float = param(1e-6, range=(0.0, None), help="lr at step 0 of the warmup (scaled per group)")


@dataclass
class DataConfig:
    crop_size: int = param(448, range=(16, None), help="training crop (square, px)")
    scale_range: tuple[float, float] = param((0.5, 2.0), range=(0.01, None), help="random rescale range before cropping")
    flip: bool = param(True, help="random horizontal flip")
    color_jitter: float = param(0.0, range=(0.0, 1.0), help="colour jitter strength (0 = off)")
    train_split: str = param("train", help="split used for training")
    val_split: str = param("val", help="split used for periodic evaluation")
    eval_max_images: int = param(0, range=(0, None), help="cap on images used by periodic evaluation (0 = all)")
    skip_bad: bool = param(False, help="skip unreadable/invalid training items with a counted warning; "
                                       "the list goes to RUN_DIR/skipped.txt (default: stop at the first)")

    def validate(self) -> None:
        lo, hi = self.scale_range
        if lo > hi:
            raise LabelwiseError(f"config key 'data.scale_range' must be [low, high] with low <= high, got {list(self.scale_range)}")


@dataclass
class InferConfig:
    """Settings of ``labelwise infer`` every method has; a method's own ``infer`` section subclasses it."""

    batch_size: int = param(4, range=(1, None), help="images per forward (consecutive images of one size)")
    num_workers: int = param(2, range=(0, None), help="DataLoader worker processes decoding images")


@dataclass
class BaseConfig:
    """What every method config has. Subclass it and add ``model`` / ``loss`` sections (and an
    ``infer`` section that subclasses :class:`InferConfig`)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    infer: InferConfig = field(default_factory=InferConfig)
