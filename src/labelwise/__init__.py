"""labelwise: label-efficient image segmentation (SeCo, CoBra, OAP, CoCal).

As a library (``docs/api.md``)::

    import labelwise as lw
    run = lw.load("runs/seco")
    out = run.predict("photo.jpg", what="segmentation")

``load``, ``train``, ``infer``, ``evaluate``, ``pseudo_masks``, ``export`` and ``coco_dataset`` are
imported on first use, so
``import labelwise`` stays light.
"""

from labelwise.errors import LabelwiseError

__version__ = "0.1.0"
__all__ = ["LabelwiseError", "__version__", "Run", "load", "train", "infer", "evaluate", "pseudo_masks", "export",
           "coco_dataset"]

_LIBRARY = {"Run", "load", "train", "infer", "evaluate", "pseudo_masks", "export", "coco_dataset"}


def __getattr__(name: str):
    if name in _LIBRARY:
        from labelwise import library

        return getattr(library, name)
    raise AttributeError(f"module 'labelwise' has no attribute {name!r}")
