"""TokenCut (Wang et al. 2023b) as released: one salient object per image by normalised cut.

Binary affinity at ``tau`` (0.2 for DINO keys) with ``eps`` 1e-5 (cosine similarity in
float32 as released, see :func:`~labelwise.pseudo.ncut.binary_affinity`), second-smallest
generalised eigenvector of ``(D - A, D)``, bipartition at its mean, seed ``argmax |v|``,
flip when the seed is outside, keep the connected component containing the seed.
``tau=None`` picks the per-backbone default (:func:`default_tau`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as Fn

from labelwise.config import param
from labelwise.pseudo.ncut import binary_affinity, bipartition, second_eigenvector, seed_component

__all__ = ["TokenCutConfig", "TokenCut", "default_tau"]

# Cosine thresholds for the binary graph. DINO keys: the released values. CNN features
# (not centred) are almost all pairwise above 0.15-0.2, which makes the graph complete and
# the cut meaningless; for them the features are centred per image (see `center`) and a
# higher threshold is used.
_DEFAULT_TAU = {"maskcut": {"vit": 0.15, "cnn": 0.3}, "tokencut": {"vit": 0.2, "cnn": 0.3}}


def default_tau(method: str, backbone: str | None) -> float:
    kind = "vit" if (backbone is None or "vit" in backbone or "dino" in backbone or "deit" in backbone) else "cnn"
    return _DEFAULT_TAU[method][kind]


def default_center(backbone: str | None) -> bool:
    return default_tau("tokencut", backbone) != _DEFAULT_TAU["tokencut"]["vit"]


@dataclass
class TokenCutConfig:
    tau: float | None = param(None, range=(-1.0, 1.0), help="affinity threshold (None: per-backbone default)")
    eps: float = param(1e-5, range=(0.0, 1.0), help="weight of sub-threshold edges")
    solver: str = param("dense", choices=("dense", "lanczos"), help="eigen solver (dense = as released)")
    center: bool | None = param(None, help="subtract the per-image mean feature first (None: per-backbone)")


class TokenCut:
    """``__call__(keys (B, h, w, D)) -> list of dicts {masks (K,h,w) bool, scores (K,), level}``."""

    name = "tokencut"

    def __init__(self, config: TokenCutConfig | None = None, backbone: str | None = None):
        self.cfg = config or TokenCutConfig()
        self.tau = self.cfg.tau if self.cfg.tau is not None else default_tau("tokencut", backbone)
        self.center = self.cfg.center if self.cfg.center is not None else default_center(backbone)

    def _prep(self, keys: torch.Tensor) -> np.ndarray:
        """Keys (B, h, w, D) -> L2-normalised float32 tokens (B, h*w, D), optionally centred.

        Kept in float32: the release normalises and multiplies its torch float32 features,
        and the binary graph depends on which side of ``tau`` each cosine falls.
        """
        x = keys.detach().float().cpu()
        B, h, w, D = x.shape
        x = x.reshape(B, h * w, D)
        if self.center:
            x = x - x.mean(1, keepdim=True)
        return Fn.normalize(x, dim=-1).numpy()

    def __call__(self, keys: torch.Tensor) -> list[dict]:
        B, h, w, _ = keys.shape
        feats = self._prep(keys)
        out = []
        for b in range(B):                                  # the baseline is per image by design
            A = binary_affinity(feats[b], self.tau, self.cfg.eps)
            vec = second_eigenvector(A, self.cfg.solver)
            part, seed = bipartition(vec, (h, w), corner_rule=False)
            mask = seed_component(part, seed)
            masks = mask[None] if mask.any() else np.zeros((0, h, w), bool)
            out.append({"masks": torch.from_numpy(masks), "scores": torch.ones(len(masks)),
                        "layers": torch.zeros(len(masks), dtype=torch.long), "level": "instance"})
        return out
