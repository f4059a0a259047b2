"""The ``cam`` method: CAM baseline for weakly supervised semantic segmentation."""

from labelwise.engine.registry import register_method
from labelwise.methods.cam.config import CAMConfig
from labelwise.methods.cam.method import CAMMethod
from labelwise.methods.cam.model import CAMNet

register_method(CAMMethod)

__all__ = ["CAMConfig", "CAMMethod", "CAMNet"]
