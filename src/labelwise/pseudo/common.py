"""Shared pieces of the pseudo-mask generators: feature extraction, method registry,
mask upsampling / COCO records, and a torch k-means for pseudo classes.

All three methods (OAP, MaskCut, TokenCut) see exactly the same features: the image is
resized to ``resolution x resolution`` (MaskCut's square resize), the backbone normalises
it with its own mean/std, and the backbone's ``keys`` are taken (ViT: last-block attention
keys; CNN: the last feature map), optionally brought to a ``grid x grid`` token map
(:func:`pool_keys`: exact area averaging of a finer map; a coarser one is never upsampled, the
image goes in at ``grid x stride`` px instead, see :func:`backbone_input_size`). Masks come back
on that token grid and are upsampled to the *original*
image size by bilinear interpolation of the 0/1 token mask followed by ``> 0.5``
(a smooth boundary that is exactly the nearest-token mask away from edges).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as Fn

from labelwise.config import param, parse_overrides, resolve_config, to_dict
from labelwise.errors import LabelwiseError
from labelwise.pseudo.maskcut import MaskCutConfig
from labelwise.pseudo.oap.pooling import OAPConfig
from labelwise.pseudo.tokencut import TokenCutConfig

__all__ = ["METHODS", "PseudoMaskConfig", "resolve_pseudo_config", "FeatureExtractor", "build_method",
           "method_config_class", "run_method", "PseudoMasks", "upsample_masks", "mask_records", "kmeans",
           "encode_embedding", "decode_embedding", "pool_keys", "area_weights", "backbone_input_size", "key_stride"]

METHODS = ("oap", "maskcut", "tokencut")


# --------------------------------------------------------------------------- config
@dataclass
class FeaturesConfig:
    backbone: str = param("dino_vitb8", help="feature backbone (ViT keys; efficientnet_lite0 has shipped weights)")
    weights: str | None = param(None, path=True, help="backbone checkpoint file")
    resolution: int = param(448, range=(16, None), help="square input size (raised to grid x stride by grid)")
    grid: int | None = param(None, range=(1, None),
                             help="token grid N x N: the backbone's key map area-averaged down to N x N; when "
                                  "resolution gives fewer tokens, the image goes in at N x stride px instead "
                                  "(keys are never upsampled)")
    batch_size: int = param(4, range=(1, None), help="images per forward")
    num_workers: int = param(2, range=(0, None), help="DataLoader workers decoding and resizing images")
    random_init: bool = param(False, help="random backbone weights (smoke tests only)")


@dataclass
class ClusterConfig:
    k: int | None = param(None, range=(1, None), help="k-means the mask embeddings into k pseudo classes")
    seed: int = param(0, range=(0, None), help="k-means seed")


@dataclass
class PseudoMaskConfig:
    """Everything ``labelwise pseudo-masks`` reads; ``--set`` takes its dotted keys
    (``oap.thresholds=[0.9,0.8]``, ``maskcut.rounds=5``, ``features.resolution=224``)."""

    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    # border strips and corners ranked first on real photos (bench/oap_real_photos.md); the boundary
    # prior is this command's default (chosen on the objects testbed, seed 5); oap.border=none = before
    oap: OAPConfig = field(default_factory=lambda: OAPConfig(border="prior"))
    maskcut: MaskCutConfig = field(default_factory=MaskCutConfig)
    tokencut: TokenCutConfig = field(default_factory=TokenCutConfig)
    levels: list[str] = param(["instance", "semantic"], choices=("instance", "semantic"),
                              help="mask levels written (OAP has both; MaskCut/TokenCut instance only)")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def resolve_pseudo_config(method: str, overrides: Sequence[str] = (), base: dict | None = None) -> PseudoMaskConfig:
    """Defaults <- ``base`` (flags) <- ``--set`` overrides; OAP centres CNN features unless told otherwise."""
    if method not in METHODS:
        raise LabelwiseError(f"unknown pseudo-mask method '{method}'; use one of {', '.join(METHODS)}")
    cfg = resolve_config(PseudoMaskConfig, layers=[("command-line flags", base or {})], overrides=list(overrides))
    given = {k for k, _ in parse_overrides(overrides)}
    if method == "oap" and "oap.center_features" not in given and not _is_vit_name(cfg.features.backbone):
        cfg.oap.center_features = True                     # CNN features: centring helps (method notes)
    return cfg


# --------------------------------------------------------------------------- features
class FeatureExtractor:
    """Images -> keys ``(B, h, w, D)`` on ``device``.

    :meth:`features` takes a batch already resized to ``resolution x resolution`` (floats in
    [0, 1]; the backbone normalises); :meth:`preprocess` does that resize for numpy images.
    With ``grid`` the keys come back as ``grid x grid`` tokens; ``resolution`` is then the
    input size the backbone needs for that (:func:`backbone_input_size`), ``requested_resolution``
    the size asked for.
    """

    def __init__(self, backbone: str = "dino_vitb8", weights: str | None = None, resolution: int = 448,
                 device: Any = "cpu", grid: int | None = None, random_init: bool = False):
        from labelwise.modeling.backbones import create_backbone
        from labelwise.modeling.backbones.registry import resolve_name

        resolve_name(backbone)                              # unknown name -> one-line error
        self.name = backbone
        self.device = torch.device(device)
        self.grid = grid
        # the same names and files as `train`: the local hub cache, a download when online, or --weights
        self.bb = create_backbone(backbone, pretrained=(weights is None and not random_init), weights=weights,
                                  weights_key="--weights")
        self.bb.eval().to(self.device)
        self.stride = key_stride(self.bb)
        self.requested_resolution = int(resolution)
        self.resolution = backbone_input_size(int(resolution), grid, self.stride)

    def resize(self, image: np.ndarray) -> torch.Tensor:
        """One RGB uint8 image -> ``3 x r x r`` float in [0, 1] (MaskCut's square resize, antialiased)."""
        r = self.resolution
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)[None]
        return Fn.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)[0]

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.stack([self.resize(img) for img in images]).to(self.device)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.bb(x.to(self.device), return_keys=True).keys
        return pool_keys(keys.float(), self.grid)

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.features(self.preprocess(images))


def key_stride(backbone: Any) -> int:
    """Input pixels per key token of a :class:`~labelwise.modeling.backbones.Backbone`: the ViT's
    patch size, or a CNN's deepest stride (its keys are the last feature map)."""
    return int(backbone.patch_size) if backbone.is_vit else int(max(backbone.strides))


def backbone_input_size(resolution: int, grid: int | None, stride: int) -> int:
    """The square input size that gives a key map of at least ``grid x grid`` tokens.

    A ``grid`` finer than the key map at ``resolution`` is met by a larger input
    (``grid * stride`` px, exactly ``grid`` tokens per side for ViT patches and for CNNs alike),
    never by upsampling the keys: OAP (and the graph cuts) compare *neighbouring tokens*, and
    an upsampled token is an interpolation of the same few encoder tokens as its neighbours.
    Measured on efficientnet_lite0 at 448 px (14 x 14 keys) bilinearly upsampled to 28 x 28 (30
    objects-testbed images and skimage's astronaut, coffee, chelsea): the mean first-layer edge
    similarity S (Eq. 4) of 4-neighbours rose from 0.78 to 0.94 (S^f from 0.70 to 0.94), 96-100 % of
    the edges passed tau_1 = 0.8 (native: 42-59 %), and every image became one supernode at layer 1.
    Nearest-neighbour copies do not collapse, but a copy is the same token again: layer 1 only
    re-merges the copies (measured: the same layer-1 supernodes as at 14 x 14), the grid holds no finer
    detail at 16x the affinity cost, and the token-counted area filter phi and Eq. 6's sum over
    members count every encoder token four times. A larger input gives real encoder tokens, which is
    what the paper's graph is built on (``F`` = the encoder's keys, one node per token; Sec. 4.2,
    "Graph Initialization")."""
    if grid is None:
        return resolution
    return max(resolution, grid * stride)


def area_weights(n_in: int, n_out: int, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """``(n_out, n_in)`` exact box-filter weights that average ``n_in`` cells down to ``n_out``:
    output cell ``i`` covers ``[i n_in / n_out, (i + 1) n_in / n_out)`` of the input axis and takes
    each input cell with the length of their overlap (rows sum to 1). Computed in integers scaled
    by ``n_out`` (cell ``j`` is ``[j n_out, (j + 1) n_out)``), so the overlaps are exact."""
    if n_out > n_in:
        raise ValueError(f"area_weights only averages down ({n_in} -> {n_out} cells)")
    i = torch.arange(n_out, device=device)[:, None]
    j = torch.arange(n_in, device=device)[None, :]
    lo = torch.maximum(i * n_in, j * n_out)
    hi = torch.minimum((i + 1) * n_in, (j + 1) * n_out)
    return (hi - lo).clamp(min=0).to(dtype) / n_in


def pool_keys(keys: torch.Tensor, grid: int | None) -> torch.Tensor:
    """``(B, h, w, D)`` keys -> ``(B, grid, grid, D)`` by exact area averaging (no-op for None or
    when already ``grid x grid``).

    Each new token is the area-weighted mean of the keys under its cell, like the key of a
    coarser patch; adjacent cells share no input token when the map size is a multiple of ``grid``, and only
    the overlapping fraction of one boundary token otherwise (an adaptive average pool would
    give a shared boundary token its full weight in both cells). Finer grids are refused: see
    :func:`backbone_input_size` for why keys are never upsampled."""
    if grid is None:
        return keys
    h, w = keys.shape[1:3]
    if (h, w) == (grid, grid):
        return keys
    if grid > h or grid > w:
        raise LabelwiseError(
            f"features.grid={grid} (--grid) is finer than the {h}x{w} key map: upsampled keys are "
            f"interpolations of their neighbours and make OAP merge the whole image; give an input of "
            f"at least grid x stride px (--resolution) or a grid <= {min(h, w)}")
    rows = area_weights(h, grid, keys.dtype, keys.device)              # (grid, h)
    cols = area_weights(w, grid, keys.dtype, keys.device)              # (grid, w)
    return torch.einsum("yh,bhwd,xw->byxd", rows, keys, cols).contiguous()


# --------------------------------------------------------------------------- methods
def method_config_class(method: str) -> type:
    return {"oap": OAPConfig, "maskcut": MaskCutConfig, "tokencut": TokenCutConfig}[method]


def build_method(method: str, cfg: PseudoMaskConfig) -> Callable:
    """A callable ``keys (B,h,w,D) -> list[PseudoMasks]`` for ``method`` with the settings of ``cfg``."""
    backbone = cfg.features.backbone
    if method == "oap":
        from labelwise.pseudo.oap.pooling import OnlineAgglomerativePooling

        impl = OnlineAgglomerativePooling(cfg.oap)
    elif method == "maskcut":
        from labelwise.pseudo.maskcut import MaskCut
        impl = MaskCut(cfg.maskcut, backbone=backbone)
    else:
        from labelwise.pseudo.tokencut import TokenCut
        impl = TokenCut(cfg.tokencut, backbone=backbone)

    def run(keys: torch.Tensor) -> list[PseudoMasks]:
        return run_method(impl, keys)

    run.impl = impl  # type: ignore[attr-defined]
    run.config = to_dict(getattr(cfg, method))  # type: ignore[attr-defined]
    if method == "maskcut":                               # what ran, not "auto": a resume elsewhere must match
        run.config["crf"] = bool(impl.crf)  # type: ignore[attr-defined]
    return run


def _is_vit_name(name: str) -> bool:
    return any(s in name for s in ("vit", "dino", "deit"))


@dataclass
class PseudoMasks:
    """Token-level masks of one image, any method."""

    masks: torch.Tensor       # (K, h, w) bool
    scores: torch.Tensor      # (K,)
    levels: list[str]         # "instance" | "semantic" per mask
    layers: torch.Tensor      # (K,) OAP layer / MaskCut round
    embeddings: torch.Tensor  # (K, D) L2-normalised mask embeddings


def run_method(impl: Any, keys: torch.Tensor) -> list[PseudoMasks]:
    from labelwise.pseudo.oap.pooling import OnlineAgglomerativePooling

    out = []
    if isinstance(impl, OnlineAgglomerativePooling):
        for r in impl(keys):
            sets = [(lvl, r.level(lvl)) for lvl in ("instance", "semantic")]
            out.append(PseudoMasks(
                masks=torch.cat([s.masks for _, s in sets]).cpu(),
                scores=torch.cat([s.scores for _, s in sets]).float().cpu(),
                levels=[lvl for lvl, s in sets for _ in range(len(s))],
                layers=torch.cat([s.layers for _, s in sets]).cpu(),
                embeddings=torch.cat([s.features for _, s in sets]).float().cpu()))
        return out
    feats = Fn.normalize(keys.float(), dim=-1).cpu()
    for b, r in enumerate(impl(keys)):
        m = r["masks"].bool()
        emb = torch.einsum("khw,hwd->kd", m.float(), feats[b]) / m.flatten(1).sum(1).clamp(min=1)[:, None]
        out.append(PseudoMasks(masks=m, scores=r["scores"].float(), levels=[r["level"]] * len(m),
                               layers=r["layers"], embeddings=Fn.normalize(emb, dim=-1)))
    return out


# --------------------------------------------------------------------------- masks -> records
def upsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Token masks (K, h, w) -> image masks (K, H, W) bool: bilinear of the 0/1 mask, then > 0.5."""
    if masks.shape[0] == 0:
        return np.zeros((0,) + tuple(size), dtype=bool)
    up = Fn.interpolate(masks[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return (up[:, 0] > 0.5).numpy()


def _bboxes(masks: np.ndarray) -> np.ndarray:
    rows, cols = masks.any(2), masks.any(1)
    H, W = masks.shape[1:]
    y0 = rows.argmax(1)
    y1 = H - 1 - rows[:, ::-1].argmax(1)
    x0 = cols.argmax(1)
    x1 = W - 1 - cols[:, ::-1].argmax(1)
    box = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], 1).astype(np.float64)
    box[~rows.any(1)] = 0
    return box


def encode_embedding(v: torch.Tensor) -> str:
    return base64.b64encode(v.numpy().astype(np.float16).tobytes()).decode("ascii")


def decode_embedding(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=np.float16).astype(np.float32)


def mask_records(pm: PseudoMasks, image_masks: np.ndarray, keep: np.ndarray | None = None) -> list[dict]:
    """COCO result records (without image ids) for the image-resolution masks of one image."""
    from labelwise.masks import encode_masks

    idx = np.arange(len(image_masks)) if keep is None else np.nonzero(keep)[0]
    idx = idx[image_masks[idx].reshape(len(idx), -1).any(1)] if len(idx) else idx
    if len(idx) == 0:
        return []
    ms = image_masks[idx]
    rles = encode_masks(ms)
    boxes = _bboxes(ms)
    areas = ms.reshape(len(ms), -1).sum(1)
    return [{"category_id": 1, "segmentation": rle, "score": round(float(pm.scores[k]), 6),
             "bbox": [float(v) for v in box], "area": int(a), "level": pm.levels[k], "layer": int(pm.layers[k]),
             "embedding": encode_embedding(pm.embeddings[k])}
            for k, rle, box, a in zip(idx.tolist(), rles, boxes, areas)]


# --------------------------------------------------------------------------- k-means
def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (cosine) with k-means++ seeding; returns (labels (n,), centres (k, d)).

    Vectorised over points; the only loops are over k-means++ picks and Lloyd iterations.
    A ``torch.Generator`` seeds it (the global RNG is untouched).
    """
    x = Fn.normalize(x.float(), dim=-1)
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(k, x.shape[1])
    k = min(k, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    d2 = (2 - 2 * x @ x[first]).clamp(min=0)
    for _ in range(1, k):                                   # k-means++ picks
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n)
        nxt = int(torch.multinomial(p.cpu(), 1, generator=g))
        centres.append(x[nxt])
        d2 = torch.minimum(d2, (2 - 2 * x @ x[nxt]).clamp(min=0))
    c = torch.stack(centres)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):                                  # Lloyd iterations
        new = (x @ c.t()).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, new, x)
        cnt = torch.bincount(new, minlength=k)
        c = torch.where(cnt[:, None] > 0, Fn.normalize(sums, dim=-1), c)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, c
