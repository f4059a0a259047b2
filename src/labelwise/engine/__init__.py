"""Training engine shared by all methods: config sections, the :class:`Trainer` loop,
schedules, parameter groups, checkpoints/resume, logging. See ``engine/trainer.py``."""

from labelwise.engine.config import BaseConfig, DataConfig, OptimConfig, TrainConfig
from labelwise.engine.method import Method, StepContext

__all__ = ["BaseConfig", "DataConfig", "OptimConfig", "TrainConfig", "Method", "StepContext"]
