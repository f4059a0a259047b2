"""MaskCut (Wang et al. 2023a, CutLER) as released: up to N objects per image by repeated NCut.

Per round: binary affinity (``tau`` 0.15 on DINO keys, ``eps`` 1e-5) of the features in
which the tokens of the masks found so far are zeroed; second-smallest generalised
eigenvector of ``(D - A, D)`` (dense ``eigh`` as released, or Lanczos); bipartition at the
mean; flip when >= 3 of the 4 corners are foreground, else when the seed ``argmax |v|`` is
outside; keep the connected component containing the seed. A mask is dropped when its
IoU with an earlier mask exceeds 0.5 or its area is <= 1% of the image.

Post-processing at image resolution (:meth:`MaskCut.postprocess`, optional because the
CRF package is optional): dense CRF with the released settings (10 iterations, Gaussian
sxy 3 / w 7, bilateral sxy 50 / srgb 5 / w 10) then ``binary_fill_holes``; a mask whose
IoU before vs after the CRF is < 0.5 is dropped. Scores: masks carry no score in the
release; we rank them by discovery order (``1 - 0.1 * round``), the order MaskCut finds
them in (the most salient object first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch

from labelwise.config import param
from labelwise.pseudo.ncut import binary_affinity, bipartition, second_eigenvector, seed_component
from labelwise.pseudo.tokencut import TokenCut, default_center, default_tau

__all__ = ["MaskCutConfig", "MaskCut"]


@dataclass
class MaskCutConfig:
    tau: float | None = param(None, range=(-1.0, 1.0), help="affinity threshold (None: per-backbone default)")
    eps: float = param(1e-5, range=(0.0, 1.0), help="weight of sub-threshold edges")
    rounds: int = param(3, range=(1, None), help="N: masks searched per image")
    solver: str = param("dense", choices=("dense", "lanczos"), help="eigen solver (dense = as released)")
    center: bool | None = param(None, help="subtract the per-image mean feature first (None: per-backbone)")
    crf: bool = param(False, help="dense CRF + hole filling at image resolution (needs pydensecrf2)")
    fill_holes: bool = param(True, help="fill holes of the image-resolution mask (release: after the CRF)")
    crf_iou: float = param(0.5, range=(0.0, 1.0), help="drop a mask whose IoU before/after CRF is below this")
    max_iou: float = param(0.5, range=(0.0, 1.0), help="drop a mask with IoU above this to an earlier one")
    min_area_frac: float = param(0.01, range=(0.0, 1.0), help="drop masks with area <= this fraction")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


class MaskCut(TokenCut):
    name = "maskcut"

    def __init__(self, config: MaskCutConfig | None = None, backbone: str | None = None):
        self.cfg = config or MaskCutConfig()
        self.tau = self.cfg.tau if self.cfg.tau is not None else default_tau("maskcut", backbone)
        self.center = self.cfg.center if self.cfg.center is not None else default_center(backbone)

    def __call__(self, keys: torch.Tensor) -> list[dict]:
        c = self.cfg
        B, h, w, _ = keys.shape
        feats = self._prep(keys)
        out = []
        for b in range(B):                                  # per image, as released
            f = feats[b].copy()
            painting = np.zeros(h * w, dtype=bool)
            masks, scores, rounds = [], [], []
            for r in range(c.rounds):
                f[painting] = 0.0                           # zero the features of found masks
                A = binary_affinity(f, self.tau, c.eps)
                vec = second_eigenvector(A, c.solver)
                part, seed = bipartition(vec, (h, w), corner_rule=True)
                mask = seed_component(part, seed)
                painting |= mask.reshape(-1)
                if mask.sum() <= c.min_area_frac * h * w:
                    continue
                if any(_iou(mask, m) > c.max_iou for m in masks):
                    continue
                masks.append(mask)
                scores.append(1.0 - 0.1 * r)
                rounds.append(r)
            arr = np.stack(masks) if masks else np.zeros((0, h, w), bool)
            out.append({"masks": torch.from_numpy(arr), "scores": torch.tensor(scores, dtype=torch.float32),
                        "layers": torch.tensor(rounds, dtype=torch.long), "level": "instance"})
        return out

    def postprocess(self, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """Image-resolution refinement (CRF, hole filling). Returns a keep flag per mask and edits in place."""
        keep = np.ones(len(masks), dtype=bool)
        for k in range(len(masks)):                         # a handful of masks per image
            m = masks[k]
            if self.cfg.crf:
                from labelwise.blocks.crf import dense_crf

                probs = np.stack([1.0 - m, m]).astype(np.float32).clip(1e-5, 1.0)
                q = dense_crf(image, probs, iters=10, pos_xy=3.0, pos_w=7.0, bi_xy=50.0, bi_rgb=5.0, bi_w=10.0)
                new = q.argmax(0) == 1
                if self.cfg.fill_holes:
                    new = scipy.ndimage.binary_fill_holes(new)
                if _iou(m, new) < self.cfg.crf_iou:
                    keep[k] = False
                masks[k] = new
            elif self.cfg.fill_holes:
                masks[k] = scipy.ndimage.binary_fill_holes(m)
        return keep
