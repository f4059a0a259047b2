"""MaskCut (Wang et al. 2023a, CutLER) as released: up to N objects per image by repeated NCut.

Follows ``maskcut_forward`` of facebookresearch/CutLER (``maskcut/maskcut.py``); per round
``i = 0 .. N-1`` (N = ``rounds``, 3):

1. painting (``i >= 1``): ``painting |= current_mask`` and the features of every painted
   token are zeroed (``get_masked_affinity_matrix``). ``current_mask`` is the previous
   round's mask *after* its checks, so a rejected round paints nothing and painting
   holds exactly the accepted masks. Zeroed features have cosine 0 with everything.
2. affinity: cosine similarity of the L2-normalised features in float32 (the release's
   torch product), binarised ``sim > tau`` -> 1 else ``eps`` (1e-5) as a float64 matrix
   (``get_affinity_matrix``; ``tau`` 0.15 on DINO keys).
3. the second-smallest generalised eigenvector of ``(D - A, D)`` (dense float64 ``eigh`` as
   released, or Lanczos), bipartition at its mean, flip when >= 3 of the 4 corners are
   foreground, else when the seed ``argmax |v|`` is outside; keep the connected component
   containing the seed (``detect_box``).
4. checks, only for ``i >= 1`` (round 0's mask is always kept, whatever its area): the mask
   becomes all-zero when ``IoU(current_mask, mask) > 0.5`` (``max_iou``; against the
   previous round's post-check mask only, not all earlier ones) or its area fraction is
   ``<= 0.01`` (``min_area_frac``). The result becomes ``current_mask``.
5. overlap removal: the emitted mask is the mask minus the union of the earlier emitted
   ones (the release subtracts the sum of earlier bipartitions and clips at 0; done here
   on the token grid). A mask that ends up empty is not emitted. Steps 1 and 4 use the
   mask *before* this subtraction, as released.

Scores: masks carry no score in the release; we rank them by discovery order
(``1 - 0.1 * round``, the most salient object first) and ``layers`` holds the round.

An earlier version of this module differed: it painted every mask before the checks, ran
the area check on round 0, compared with all earlier masks and did no overlap removal.

Post-processing at image resolution (:meth:`MaskCut.postprocess`), in the release's order:
dense CRF (``crf.py``: 10 iterations, Gaussian sxy 3 / w 7, bilateral sxy 50 / srgb 5 /
w 10, unary from ``softmax([1 - m, m])``, label = argmax) -> ``binary_fill_holes`` -> drop
the mask when ``IoU(before, after) < 0.5`` (``crf_iou``). The CRF is on by default when
its package (pydensecrf2) is installed, as released (``crf=None``); ``crf=true`` requires
it, ``crf=false`` switches it off (e.g. to time the cut itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch

from labelwise.config import param
from labelwise.errors import LabelwiseError
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
    crf: bool | None = param(None, help="dense CRF at image resolution, as released (None: on when pydensecrf2 "
                                        "is installed; true requires it)")
    fill_holes: bool = param(True, help="fill holes of the image-resolution mask (release: after the CRF)")
    crf_iou: float = param(0.5, range=(0.0, 1.0), help="drop a mask whose IoU before/after CRF is below this")
    max_iou: float = param(0.5, range=(0.0, 1.0),
                           help="from round 1 on, drop a mask with IoU above this to the previous round's mask")
    min_area_frac: float = param(0.01, range=(0.0, 1.0), help="from round 1 on, drop masks with area <= this fraction")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _resolve_crf(requested: bool | None) -> bool:
    """``None`` -> whether pydensecrf2 imports (the release always runs the CRF); ``True``
    without it is a one-line error rather than a silent run without the CRF."""
    from labelwise.blocks.crf import crf_available

    if requested is False:
        return False
    if crf_available():
        return True
    if requested:
        raise LabelwiseError("maskcut.crf=true needs pydensecrf2: pip install pydensecrf2 "
                             "(or set maskcut.crf=false)")
    import warnings

    # the default follows what is installed; say so rather than drop the release's CRF silently
    warnings.warn("maskcut: pydensecrf2 is not installed, so the masks skip the release's dense CRF "
                  "(pip install pydensecrf2 -- it builds from source, about a minute, needs g++; or set "
                  "maskcut.crf=false to silence this)", stacklevel=2)
    return False


class MaskCut(TokenCut):
    """``__call__(keys (B, h, w, D))`` -> per image ``{masks (K,h,w) bool, scores, layers, level}``;
    :meth:`postprocess` refines image-resolution masks (see the module doc)."""

    name = "maskcut"

    def __init__(self, config: MaskCutConfig | None = None, backbone: str | None = None):
        self.cfg = config or MaskCutConfig()
        self.tau = self.cfg.tau if self.cfg.tau is not None else default_tau("maskcut", backbone)
        self.center = self.cfg.center if self.cfg.center is not None else default_center(backbone)
        self.crf = _resolve_crf(self.cfg.crf)               # resolved once: every image gets the same

    def __call__(self, keys: torch.Tensor) -> list[dict]:
        c = self.cfg
        B, h, w, _ = keys.shape
        feats = self._prep(keys)                            # float32, L2-normalised
        out = []
        for b in range(B):                                  # per image, as released
            f = feats[b].copy()
            painting = np.zeros(h * w, dtype=bool)
            current = np.zeros((h, w), dtype=bool)          # previous round's mask after its checks
            taken = np.zeros((h, w), dtype=bool)            # union of the emitted masks
            masks, scores, rounds = [], [], []
            for r in range(c.rounds):
                if r >= 1:                                  # paint the accepted masks only
                    painting |= current.reshape(-1)
                    f[painting] = 0.0
                A = binary_affinity(f, self.tau, c.eps)
                vec = second_eigenvector(A, c.solver)
                part, seed = bipartition(vec, (h, w), corner_rule=True)
                mask = seed_component(part, seed)
                if r >= 1 and (_iou(current, mask) > c.max_iou or mask.sum() / h / w <= c.min_area_frac):
                    mask = np.zeros_like(mask)              # rejected: all zeros, as released
                current = mask
                new = mask & ~taken                         # release: minus earlier bipartitions, clip 0
                taken |= mask
                if new.any():
                    masks.append(new)
                    scores.append(1.0 - 0.1 * r)
                    rounds.append(r)
            arr = np.stack(masks) if masks else np.zeros((0, h, w), bool)
            out.append({"masks": torch.from_numpy(arr), "scores": torch.tensor(scores, dtype=torch.float32),
                        "layers": torch.tensor(rounds, dtype=torch.long), "level": "instance"})
        return out

    def postprocess(self, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """Image-resolution refinement in the release's order: CRF -> fill holes -> drop when
        ``IoU(before, after) < crf_iou``. Returns a keep flag per mask and edits ``masks`` in place.

        The unary is the release's: it feeds the 0/1 mask as *logits* to a softmax, so each
        pixel starts at 0.73 / 0.27 for its side — a weak prior the CRF may overturn (hence
        the IoU check). Without the CRF only the holes are filled (``fill_holes``).
        """
        keep = np.ones(len(masks), dtype=bool)
        for k in range(len(masks)):                         # a handful of masks per image
            m = masks[k]
            if self.crf:
                from labelwise.blocks.crf import dense_crf

                fg = 1.0 / (1.0 + np.exp(1.0 - 2.0 * m.astype(np.float64)))     # softmax([1 - m, m])[1]
                q = dense_crf(image, np.stack([1.0 - fg, fg]), iters=10, pos_xy=3.0, pos_w=7.0,
                              bi_xy=50.0, bi_rgb=5.0, bi_w=10.0)
                new = q.argmax(0) == 1
                if self.cfg.fill_holes:
                    new = scipy.ndimage.binary_fill_holes(new)
                if _iou(m, new) < self.cfg.crf_iou:
                    keep[k] = False
                masks[k] = new
            elif self.cfg.fill_holes:
                masks[k] = scipy.ndimage.binary_fill_holes(m)
        return keep
