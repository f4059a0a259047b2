"""The ``irn`` method: train IRN's branches on IR labels from seeds; refine seeds by a random walk.

Training (``labelwise train irn --data SPEC --seeds SEED_DIR --out RUN``): per item, in the
DataLoader, IR labels from the item's seeds (:func:`ir_label`; never from the dataset's
masks), then random rescale / flip / crop of image and label together, the label reduced
to stride 4 (nearest, ``label[::4, ::4]`` as the release's ``cv2.resize(fx=0.25)``); the
losses of :mod:`.losses` on the pairs within ``loss.radius``.

Inference (``labelwise infer RUN --data SPEC --split S --out PRED --what masks[,seeds]
[--seeds SEED_DIR]``): boundary map (+ flip), seeds' CAMs area-pooled to the stride-4
grid, random walk (:func:`labelwise.modeling.irn.random_walk`), upsampled x4 and cropped,
divided by their maximum over all classes (the release), background channel at
``infer.sem_seg_bg`` (or the seeds' ``bg_threshold``), argmax -> class indices; optional
label CRF (``infer.crf``). ``seeds`` writes the walked maps (same normalisation), so
``evaluate semantic --bg-threshold SEM_SEG_BG`` of them equals the masks without CRF.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from labelwise.engine.data import SeededDataset
from labelwise.engine.method import Method, PredictContext, StepContext
from labelwise.errors import LabelwiseError
from labelwise.methods.irn.config import IRNConfig
from labelwise.methods.irn.losses import irn_losses
from labelwise.modeling.irn import IRNet, pair_indices, random_walk, walk_memory_bytes

_CRF_WARNED = False


# --------------------------------------------------------------------------- IR labels
def seed_thresholds(seeds: dict, cfg) -> tuple[float, float, float | None]:
    """``(conf_fg, conf_bg, random-walk background level or None)`` for one image's seeds.

    ``irn.thresholds = auto`` and a ``bg_threshold`` in the seeds file (CoBra's per-image
    value from its ViT's semantic-agnostic attention): ``conf_bg = bg_threshold``,
    ``conf_fg = bg_threshold + irn.fg_gap`` (CoBra supplement Sec. 9.1) and the walk's
    background level ``bg_threshold``; otherwise the config's numbers (and ``None``: the
    walk uses ``infer.sem_seg_bg``). Never derived from ground truth.
    """
    ic = cfg.irn
    bt = seeds.get("bg_threshold")
    if ic.thresholds == "auto" and bt is not None:
        bt = float(bt)
        return bt + ic.fg_gap, bt, bt
    return ic.conf_fg, ic.conf_bg, None


def _crf_on(requested: bool) -> bool:
    global _CRF_WARNED
    if not requested:
        return False
    from labelwise.blocks.crf import crf_available

    if crf_available():
        return True
    if not _CRF_WARNED:
        _CRF_WARNED = True
        warnings.warn("irn: pydensecrf2 is not installed, IR labels are made without the dense CRF "
                      "(pip install 'labelwise[crf]')", stacklevel=2)
    return False


def _label_crf(image: np.ndarray, compact: np.ndarray, n_labels: int, gt_prob: float) -> np.ndarray:
    from labelwise.blocks.crf import crf_refine_label

    return crf_refine_label(image, compact, n_labels, gt_prob=gt_prob)


def ir_label(cams: np.ndarray, keys: np.ndarray, image: np.ndarray, conf_fg: float, conf_bg: float, *,
             crf: bool = True, gt_prob: float = 0.7) -> np.ndarray:
    """IRN's IR label of one image (``cam_to_ir_label.py``): ``H x W`` uint8.

    Confident foreground = argmax over [a background channel at ``conf_fg``, the CAMs]
    (background wins ties), confident background = the same at ``conf_bg``; each refined
    by a label CRF over background + the image's classes (``crf``). Class where the
    foreground map says so, 0 where both maps say background, 255 (ignore) elsewhere.
    """
    H, W = image.shape[:2]
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if len(keys) == 0:
        return np.zeros((H, W), np.uint8)
    lut = np.concatenate([[0], keys]).astype(np.uint8)
    cams = np.asarray(cams, dtype=np.float32)

    def confident(thr: float) -> np.ndarray:
        idx = np.argmax(np.concatenate([np.full((1, H, W), thr, np.float32), cams], 0), 0)
        if crf:
            idx = _label_crf(image, idx, len(keys) + 1, gt_prob)
        return lut[idx]

    fg, bg = confident(conf_fg), confident(conf_bg)
    label = fg.copy()
    label[fg == 0] = 255
    label[(fg == 0) & (bg == 0)] = 0
    return label


def _check_keys(keys: np.ndarray, num_classes: int, item: dict) -> None:
    keys = np.asarray(keys)
    if keys.size and (keys.min() < 1 or keys.max() >= num_classes):
        raise LabelwiseError(f"seeds of image {item.get('image_id')}: class indices {keys.tolist()} outside 1.."
                             f"{num_classes - 1}; write the seeds from a run on this dataset")


def size_divisor(cfg) -> int:
    """Crops must be multiples of this so every level aligns with the stride-4 grid (see IRNet)."""
    m = cfg.model
    return max(int(m.output_stride) if m.output_stride else 32, max(m.feature_strides))


class _IRNTrainTransform:
    """IR label from the item's seeds at image size, then joint rescale / flip / crop, label at stride 4."""

    def __init__(self, cfg, num_classes: int):
        from labelwise.modeling.backbones import pixel_stats

        self.cfg, self.num_classes = cfg, num_classes
        self.fill = pixel_stats(cfg.model.backbone)[0]
        self.crf = _crf_on(cfg.irn.ir_crf)

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        from labelwise.data.transforms import TrainTransform

        seeds = item.get("seeds")
        if seeds is None:
            raise LabelwiseError("irn trains on CAM seeds: pass --seeds SEED_DIR (the --out of labelwise infer "
                                 "RUN --what seeds on the training split)")
        _check_keys(seeds["keys"], self.num_classes, item)
        conf_fg, conf_bg, _ = seed_thresholds(seeds, self.cfg)
        label = ir_label(seeds["cams"], seeds["keys"], item["image"], conf_fg, conf_bg, crf=self.crf,
                         gt_prob=self.cfg.irn.crf_gt_prob)
        g = torch.Generator()
        g.manual_seed(int(rng.integers(0, 2 ** 62)))
        d = self.cfg.data
        j = d.color_jitter
        tf = TrainTransform(crop_size=d.crop_size, scale_range=tuple(d.scale_range), flip_p=0.5 if d.flip else 0.0,
                            jitter=(j, j, j, min(j / 4, 0.5)) if j > 0 else None, fill=self.fill, generator=g)
        out = tf({"image": item["image"], "mask": label})
        lab = out["mask"].as_subclass(torch.Tensor)[::4, ::4].contiguous()  # release: cv2 nearest at 0.25
        return {"image": out["image"].as_subclass(torch.Tensor), "label": lab}


class _IRNInferTransform:
    """DataLoader-side: the image as a [0, 1] tensor; the item keeps its ``seeds``."""

    def __call__(self, item: dict) -> dict:
        x = torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1).float().div_(255.0)
        return {**item, "input": x}


class IRNMethod(Method):
    name = "irn"
    config_cls = IRNConfig
    description = "IRN: inter-pixel relations (boundary + displacement) refine any method's CAM seeds"
    outputs = {"masks": "label_png", "seeds": "cam_npz"}
    needs_seeds = True

    def build_model(self, cfg, info, *, pretrained=True):
        m = cfg.model
        return IRNet(m.backbone, pretrained=pretrained and m.pretrained, weights=m.weights if pretrained else None,
                     feature_strides=m.feature_strides, output_stride=m.output_stride, stem=m.stem,
                     edge_channels=m.edge_channels, disp_fine_channels=m.disp_fine_channels,
                     disp_channels=m.disp_channels)

    def build_train_dataset(self, cfg, spec, info=None, *, labels_dir=None, seeds_dir=None):
        if labels_dir is not None:
            raise LabelwiseError("irn learns from CAM seeds, not label PNGs: drop --labels and pass --seeds SEED_DIR")
        if seeds_dir is None:
            raise LabelwiseError("irn trains on CAM seeds: pass --seeds SEED_DIR (the --out of labelwise infer "
                                 "RUN --what seeds on the training split)")
        d = size_divisor(cfg)
        if cfg.data.crop_size % d:
            raise LabelwiseError(f"config key 'data.crop_size' = {cfg.data.crop_size} must be a multiple of {d} "
                                 "(the backbone's output stride) for IRN's stride-4 pairs")
        ds = self.load_split(cfg, spec, cfg.data.train_split, seeds_dir=seeds_dir)
        n = cfg.data.crop_size // 4
        pair_indices(cfg.loss.radius, n, n)  # a crop too small for the radius fails here, before training
        return SeededDataset(ds, _IRNTrainTransform(cfg, ds.num_classes))

    def param_groups(self, model, cfg):
        # the release: boundary layers at lr, displacement layers at 10 x lr; the backbone is frozen
        groups = {"backbone": [], "boundary": [], "displacement": []}
        for name, p in model.named_parameters():
            groups[name.split(".", 1)[0]].append((name, p))
        return [{"name": "backbone", "params": groups["backbone"], "lr_mult": 0.0},
                {"name": "boundary", "params": groups["boundary"], "lr_mult": 1.0},
                {"name": "displacement", "params": groups["displacement"], "lr_mult": cfg.model.disp_lr_mult}]

    def training_step(self, model, batch, ctx: StepContext):
        edge, disp = model(batch["image"])
        h, w = edge.shape[-2:]
        label = batch["label"]
        if tuple(label.shape[-2:]) != (h, w):
            raise RuntimeError(f"IR label grid {tuple(label.shape[-2:])} != boundary grid {(h, w)}")
        index = pair_indices(ctx.cfg.loss.radius, h, w, edge.device)
        return irn_losses(edge, disp, label.long(), index, aff_weight=ctx.cfg.loss.aff_weight,
                          disp_weight=ctx.cfg.loss.disp_weight)

    # ------------------------------------------------------------------ inference
    def inference_transform(self, cfg, info):
        return _IRNInferTransform()

    def predict(self, model, batch, ctx: PredictContext):
        cfg, ic = ctx.cfg, ctx.cfg.infer
        items, x = batch["items"], batch["inputs"]
        for item in items:
            if item.get("seeds") is None:
                raise LabelwiseError("irn refines CAM seeds: pass --seeds SEED_DIR to labelwise infer (seeds of "
                                     "this split from labelwise infer RUN --what seeds)")
            _check_keys(item["seeds"]["keys"], ctx.info.num_classes, item)
        boundary, _ = model.predict_maps(x, flip=ic.flip)  # B x h x w
        B, h, w = boundary.shape
        H, W = x.shape[-2:]
        kmax = max(len(it["seeds"]["keys"]) for it in items)
        cams = boundary.new_zeros(B, kmax, h, w)
        for b, it in enumerate(items):  # per image: its own classes (a handful)
            c = torch.as_tensor(it["seeds"]["cams"], dtype=torch.float32, device=boundary.device)
            if c.shape[0]:
                cams[b, :c.shape[0]] = F.adaptive_avg_pool2d(c[None], (h, w))[0]  # the stride-4 CAM
        chunk = max(1, int(ic.rw_memory_gib * 2 ** 30 // walk_memory_bytes(h * w, ic.rw_mode)))
        walked = torch.cat([random_walk(cams[i:i + chunk], boundary[i:i + chunk], beta=ic.beta,
                                        exp_times=ic.exp_times, radius=ic.radius, mode=ic.rw_mode)
                            for i in range(0, B, chunk)]) if kmax else cams
        up = F.interpolate(walked, scale_factor=4, mode="bilinear", align_corners=False)[..., :H, :W] if kmax else None
        out = []
        for b, it in enumerate(items):
            keys = np.asarray(it["seeds"]["keys"], dtype=np.int64).reshape(-1)
            K = len(keys)
            res = {}
            if K == 0:
                maps = torch.zeros(0, H, W)
                mask = np.zeros((H, W), np.uint8)
            else:
                maps = up[b, :K]
                maps = maps / maps.max().clamp_min(1e-5)  # the release: one maximum over all classes
                _, _, bg = seed_thresholds(it["seeds"], cfg)
                level = ic.sem_seg_bg if bg is None else bg
                idx = torch.cat([maps.new_full((1, H, W), level), maps]).argmax(0).cpu().numpy()
                mask = np.concatenate([[0], keys]).astype(np.uint8)[idx]
                if ic.crf:
                    from labelwise.blocks.crf import crf_refine_present

                    mask = crf_refine_present(it["image"], mask, keys, gt_prob=ic.crf_gt_prob)
            if "seeds" in ctx.what:
                res["seeds"] = {"cams": maps.cpu().numpy().astype(np.float16), "keys": keys}
            if "masks" in ctx.what:
                res["masks"] = mask
            out.append(res)
        return out


__all__ = ["IRNMethod", "ir_label", "seed_thresholds", "size_divisor"]
