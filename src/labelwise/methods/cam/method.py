"""``cam``: the plain CAM baseline of weakly supervised semantic segmentation.

Training: a multi-label classifier on image-level tags (multilabel soft-margin loss on
the pooled CAM logits; Zhou et al. 2016 CAM with a 1x1-conv head, see ``model.py``).

Inference (``labelwise infer RUN --what seeds|masks``):

* CAMs: multi-scale + flip (``infer.scales``, ``infer.flip``) at image size, ReLU'd,
  summed and max-normalised per class (``labelwise.blocks.cam.multiscale_cam``);
* classes kept: the split's image tags (for the training split these are derived from
  the label PNGs or given by ``ImageSets/Tags`` — standard WSSS practice); for images
  without tags (e.g. a ``folder:`` dataset without ``tags.csv``), the classes whose
  predicted probability (sigmoid of the single-scale logits) exceeds
  ``infer.pred_threshold`` (0.5). ``infer.tags`` forces one or the other;
* ``seeds``: ``PRED/<image_id>.npz`` with ``cams`` (float16, K x H x W, one map per kept
  class) and ``keys`` (their class indices, 1-based);
* ``masks``: ``PRED/<image_id>.png``: argmax over the kept classes' CAMs, background
  where the best score ``<= infer.bg_threshold``; optional dense CRF (``infer.crf``,
  label unary with ``infer.crf_gt_prob``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from labelwise import dist
from labelwise.blocks.cam import cam_to_label, multiscale_cam
from labelwise.engine.data import SeededDataset
from labelwise.engine.method import Method, StepContext
from labelwise.errors import LabelwiseError
from labelwise.methods.cam.config import CAMConfig
from labelwise.methods.cam.model import CAMNet
from labelwise.utils import progress


class _CamTrainTransform:
    """Per-sample augmentation (labelwise.data.transforms) driven by the sampler's seed."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        from labelwise.data.transforms import TrainTransform

        d = self.cfg.data
        if item.get("tags") is None:
            raise LabelwiseError(f"image {item.get('file_name', item.get('image_id'))} has no image-level tags; the "
                                 "cam method trains on tags (voc/coco masks, ImageSets/Tags, or folder tags.csv)")
        g = torch.Generator()
        g.manual_seed(int(rng.integers(0, 2 ** 62)))
        j = d.color_jitter
        tf = TrainTransform(crop_size=d.crop_size, scale_range=tuple(d.scale_range), flip_p=0.5 if d.flip else 0.0,
                            jitter=(j, j, j, min(j / 4, 0.5)) if j > 0 else None,
                            mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), generator=g)  # the model normalises
        out = tf({"image": item["image"]})
        return {"image": out["image"].as_subclass(torch.Tensor),
                "tags": torch.as_tensor(np.asarray(item["tags"], dtype=np.float32))}


def image_tensor(image: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float().div_(255.0)


@torch.no_grad()
def image_cams(model: CAMNet, image: np.ndarray, tags: np.ndarray | None, cfg, *, scales=None, flip=None,
               tag_mode: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Normalised CAMs (K x H x W, fp32) of the kept classes and their class indices (K,)."""
    ic = cfg.infer
    dev = next(model.parameters()).device
    x = image_tensor(image, dev)
    H, W = x.shape[-2:]
    if ic.max_size and max(H, W) > ic.max_size:
        s = ic.max_size / max(H, W)
        x = F.interpolate(x, size=(max(1, round(H * s)), max(1, round(W * s))), mode="bilinear", align_corners=False)
    mode = tag_mode or ic.tags
    if mode == "gt" and tags is None:
        raise LabelwiseError("config key 'infer.tags' is gt but the split has no image-level tags; use auto or pred")
    if mode == "pred" or tags is None:
        logits = model(F.interpolate(x, size=_snap(x.shape[-2:], model.size_divisor), mode="bilinear",
                                     align_corners=False))[0][0]
        present = torch.sigmoid(logits.float()) > ic.pred_threshold
    else:
        present = torch.as_tensor(np.asarray(tags) > 0, device=dev)
    keys = (torch.nonzero(present).flatten() + 1).cpu().numpy().astype(np.int64)
    if len(keys) == 0:
        return torch.zeros((0, H, W), device=dev), keys
    cams = multiscale_cam(model.cams, x, scales=list(scales or ic.scales), flip=ic.flip if flip is None else flip,
                          out_size=(H, W))[0]
    return cams[torch.as_tensor(keys - 1, device=dev)], keys


def _snap(hw, d: int) -> tuple[int, int]:
    return tuple(max(d, round(v / d) * d) for v in hw)  # type: ignore[return-value]


def cams_to_mask(cams: torch.Tensor, keys: np.ndarray, image: np.ndarray, cfg) -> np.ndarray:
    H, W = image.shape[:2]
    if len(keys) == 0:
        return np.zeros((H, W), np.uint8)
    label = cam_to_label(cams, keys=torch.as_tensor(keys, device=cams.device),
                         bg_threshold=cfg.infer.bg_threshold).cpu().numpy()
    if cfg.infer.crf:
        from labelwise.blocks.crf import crf_refine_label

        # As IRN's label CRF: the CRF competes only between background and the image's
        # classes, so the unary of the other labels is (1 - gt_prob) / (K - 1) with K = present
        # classes + background, independent of the dataset's class count.
        present = np.concatenate([[0], np.asarray(keys, dtype=np.int64)])
        to_compact = np.zeros(256, np.uint8)
        to_compact[present] = np.arange(len(present))
        refined = crf_refine_label(image, to_compact[label], len(present), gt_prob=cfg.infer.crf_gt_prob)
        label = present[refined].astype(np.uint8)
    return label.astype(np.uint8)


class CAMMethod(Method):
    name = "cam"
    config_cls = CAMConfig
    description = "plain CAM baseline (multi-label classification on tags)"
    infer_outputs = ("masks", "seeds")

    def build_model(self, cfg, info):
        return CAMNet(cfg, info.num_foreground)

    def build_train_dataset(self, cfg, spec, info=None):
        return SeededDataset(self.load_split(cfg, spec, cfg.data.train_split), _CamTrainTransform(cfg))

    def training_step(self, model, batch, step, ctx: StepContext):
        logits, _ = model(batch["image"])
        cls = F.multilabel_soft_margin_loss(logits.float(), batch["tags"].float())
        return {"loss": ctx.cfg.loss.cls_weight * cls, "cls": cls.detach()}

    def evaluate(self, model, ctx: StepContext):
        """Single-scale CAM pseudo-mask mIoU on ``data.val_split`` (tags from the split), sharded over ranks."""
        from labelwise.data.spec import build_dataset
        from labelwise.evaluation import SemanticMetric

        cfg = ctx.cfg
        try:
            ds = build_dataset(ctx.data_spec, cfg.data.val_split)
        except LabelwiseError:
            return None  # no validation split: nothing to report
        n = len(ds) if not cfg.data.eval_max_images else min(len(ds), cfg.data.eval_max_images)
        if n == 0 or ds.load_mask(0) is None:
            return None
        metric = SemanticMetric(ctx.info.num_classes, ctx.info.class_names)
        for i in range(ctx.rank, n, ctx.world_size):
            item = ds[i]
            cams, keys = image_cams(model, item["image"], item.get("tags"), cfg, scales=[1.0], flip=False)
            metric.update(cams_to_mask(cams, keys, item["image"], cfg), item["mask"])
        res = metric.compute()
        return {"val_miou": res["miou"], "val_pixel_acc": res["pixel_acc"]}

    def infer(self, model, cfg, info, spec, split, out: Path, what, **kw):
        from labelwise.data.spec import build_dataset
        from labelwise.io import atomic_save_npz, write_label

        ds = build_dataset(spec, split)
        if ds.num_classes > 1 and ds.num_classes != info.num_classes:  # a plain folder has no class list
            raise LabelwiseError(f"{spec} has {ds.num_classes} classes but the run was trained with "
                                 f"{info.num_classes}; pass a dataset with the same class list")
        rank, world = dist.get_rank(), dist.get_world_size()
        for i in progress(range(rank, len(ds), world), desc=f"cam {what}", total=len(range(rank, len(ds), world))):
            item = ds[i]
            cams, keys = image_cams(model, item["image"], item.get("tags"), cfg)
            path = Path(out) / item["image_id"]
            if what == "seeds":
                atomic_save_npz(path.with_name(path.name + ".npz"), cams=cams.cpu().numpy().astype(np.float16),
                                keys=keys)
            else:
                write_label(path.with_name(path.name + ".png"),
                            cams_to_mask(cams, keys, item["image"], cfg))
        dist.barrier()
        return Path(out)
