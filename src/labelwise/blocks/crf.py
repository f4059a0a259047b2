"""Dense CRF refinement (Krähenbühl & Koltun 2011) through the optional ``pydensecrf2`` package.

Install with ``pip install 'labelwise[crf]'`` (import name ``pydensecrf.densecrf``). Without
it, every function here raises a one-line :class:`~labelwise.errors.LabelwiseError`.

Parameters follow the DeepLab naming: ``*_xy`` / ``bi_rgb`` are kernel standard deviations
(pydensecrf's ``sxy`` / ``srgb``, in pixels / intensity levels) and ``*_w`` are the Potts
compatibility weights (``compat``). Two presets:

* :func:`dense_crf` (probability unary): defaults are the SeCo evaluation setting from
  the method notes, "10 iters; pos 1/1; bilateral xy 121, rgb 5, w 4", read as
  ``pos_xy=1, pos_w=1, bi_xy=121, bi_rgb=5, bi_w=4`` (the DeepLab-v2 CRF layout:
  ``pos_xy_std / pos_w`` and ``bi_xy_std / bi_rgb_std / bi_w``).
* :func:`crf_refine_label` (label unary, CoBra/IRN style): the label gets probability
  ``gt_prob`` (0.7), the other classes share the rest; pixels equal to ``ignore_index`` get a
  uniform unary. Pairwise defaults are IRN's label CRF: Gaussian sxy 3 / compat 3,
  bilateral sxy 50 / srgb 5 / compat 10, 10 iterations.

Inputs may be numpy arrays or torch tensors (moved to the CPU); outputs are numpy.
"""

from __future__ import annotations

import numpy as np

from labelwise.errors import LabelwiseError

__all__ = ["dense_crf", "crf_refine_label", "crf_available", "label_unary"]

_MISSING = "dense CRF needs pydensecrf2: pip install 'labelwise[crf]'"


def _dcrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:  # pragma: no cover - depends on the environment
        raise LabelwiseError(_MISSING) from None
    return dcrf


def crf_available() -> bool:
    """Whether the optional ``pydensecrf2`` backend can be imported."""
    try:
        _dcrf()
    except LabelwiseError:
        return False
    return True


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_image(image, hw: tuple[int, int]) -> np.ndarray:
    img = _to_numpy(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"dense CRF needs an H x W x 3 image, got shape {img.shape}")
    if img.shape[:2] != tuple(hw):
        raise ValueError(f"image is {img.shape[:2]} but the probabilities are {tuple(hw)}")
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def _run(image: np.ndarray, unary: np.ndarray, iters: int, pos_xy: float, pos_w: float,
         bi_xy: float, bi_rgb: float, bi_w: float) -> np.ndarray:
    dcrf = _dcrf()
    c, h, w = unary.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(c, -1), dtype=np.float32))
    if pos_w > 0:
        d.addPairwiseGaussian(sxy=pos_xy, compat=pos_w)
    if bi_w > 0:
        d.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=image, compat=bi_w)
    q = d.inference(int(iters))
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def dense_crf(image, probs, iters: int = 10, pos_xy: float = 1.0, pos_w: float = 1.0, bi_xy: float = 121.0,
              bi_rgb: float = 5.0, bi_w: float = 4.0, eps: float = 1e-5) -> np.ndarray:
    """Refine class probabilities ``probs`` (C, H, W) on ``image`` (H, W, 3 uint8).

    Unary = ``-log(clip(probs, eps, 1))``. Returns the CRF marginals (C, H, W) float32
    (argmax over axis 0 for labels). See the module doc for the parameter reading.
    """
    p = _to_numpy(probs).astype(np.float32, copy=False)
    if p.ndim != 3:
        raise ValueError(f"dense_crf needs probabilities of shape (C, H, W), got {p.shape}")
    img = _check_image(image, p.shape[1:])
    unary = -np.log(np.clip(p, eps, 1.0))
    return _run(img, unary, iters, pos_xy, pos_w, bi_xy, bi_rgb, bi_w)


def label_unary(label: np.ndarray, num_classes: int, gt_prob: float = 0.7, ignore_index: int = 255) -> np.ndarray:
    """Unary energy (C, H, W) from a label map: ``-log gt_prob`` for the label,
    ``-log((1 - gt_prob) / (C - 1))`` for others; uniform where ``label == ignore_index``."""
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    lab = _to_numpy(label).astype(np.int64)
    known = lab != ignore_index
    if np.any(known & ((lab < 0) | (lab >= num_classes))):
        raise ValueError(f"label values must be in [0, {num_classes}) or {ignore_index}")
    off = (1.0 - gt_prob) / max(num_classes - 1, 1)
    prob = np.full((num_classes,) + lab.shape, off, dtype=np.float32)
    onehot = np.arange(num_classes)[:, None, None] == np.where(known, lab, -1)[None]
    prob[onehot] = gt_prob
    prob[:, ~known] = 1.0 / num_classes
    return -np.log(prob)


def crf_refine_label(image, label, num_classes: int, gt_prob: float = 0.7, iters: int = 10,
                     pos_xy: float = 3.0, pos_w: float = 3.0, bi_xy: float = 50.0, bi_rgb: float = 5.0,
                     bi_w: float = 10.0, ignore_index: int = 255) -> np.ndarray:
    """Refine a label map (H, W) on ``image`` (H, W, 3 uint8) with a label unary (IRN/CoBra).

    Returns the refined label map (H, W) uint8 (the argmax of the CRF marginals).
    """
    unary = label_unary(label, num_classes, gt_prob, ignore_index)
    img = _check_image(image, unary.shape[1:])
    q = _run(img, unary, iters, pos_xy, pos_w, bi_xy, bi_rgb, bi_w)
    return q.argmax(0).astype(np.uint8)


def crf_refine_present(image, label, keys, gt_prob: float = 0.7, **kw) -> np.ndarray:
    """:func:`crf_refine_label` restricted to background and the image's classes ``keys`` (IRN's
    label CRF): the other labels' unary is ``(1 - gt_prob) / (K - 1)`` with K = len(keys) + 1,
    whatever the dataset's class count. ``label`` (H, W) holds 0, values of ``keys`` and 255;
    returns dataset class indices (H, W) uint8."""
    present = np.concatenate([[0], np.asarray(keys, dtype=np.int64).reshape(-1)])
    to_compact = np.full(256, 255, np.uint8)
    to_compact[present] = np.arange(len(present))
    lab = np.asarray(_to_numpy(label)).astype(np.int64)
    refined = crf_refine_label(image, to_compact[lab], len(present), gt_prob=gt_prob, **kw)
    return present[refined].astype(np.uint8)
