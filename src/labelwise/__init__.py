"""labelwise: label-efficient image segmentation (SeCo, CoBra, OAP, CoCal)."""

from labelwise.errors import LabelwiseError

__version__ = "0.1.0"
__all__ = ["LabelwiseError", "__version__"]
