"""The ``irn`` method: train IRN's branches on IR labels from seeds; refine seeds by a random walk.

Training (``labelwise train irn --data SPEC --seeds SEED_DIR --out RUN``): per item, in the
DataLoader, IR labels from the item's seeds (:func:`ir_label`; never from the dataset's
masks), then random rescale / flip / crop of image and label together, the label reduced
to stride 4 at the cell centres (``label[2::4, 2::4]``: the release's PIL nearest rescale by
0.25 samples pixel 4i + 2); the losses of :mod:`.losses` on the pairs within ``loss.radius``.
Each step logs its IR labels (:func:`ir_label_stats`): the fractions of foreground,
background and ignored cells, the share of crops without foreground, and the negative
pairs per crop (the only pairs that teach a boundary).

Inference (``labelwise infer RUN --data SPEC --split S --out PRED --what masks[,seeds]
[--seeds SEED_DIR]``): boundary map (+ flip), seeds' CAMs area-pooled to the stride-4
grid, random walk (:func:`labelwise.modeling.irn.random_walk`) of 2^``infer.exp_times``
steps (null: :func:`walk_exp_times`, the release's reach relative to the grid), upsampled
x4 and cropped, divided by their maximum over all classes (the release), background
channel at ``infer.sem_seg_bg`` (``infer.walk_bg``), argmax -> class indices; optional
label CRF (``infer.crf``). ``seeds`` writes the walked maps (same normalisation) with the
image's walk length and boundary-map percentiles, so ``evaluate semantic --bg-threshold
SEM_SEG_BG`` of them equals the masks without CRF.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from labelwise.engine.data import SeededDataset
from labelwise.engine.method import Method, PredictContext, StepContext
from labelwise.errors import LabelwiseError
from labelwise.methods.irn.config import IRNConfig
from labelwise.methods.irn.losses import irn_losses
from labelwise.modeling.irn import IRNet, pair_indices, pair_labels, random_walk, walk_memory_bytes

# --------------------------------------------------------------------------- IR labels
def seed_thresholds(seeds: dict, cfg) -> tuple[float, float]:
    """``(conf_fg, conf_bg)`` of one image's IR labels.

    ``irn.thresholds = fixed`` (the release): the config's numbers. ``seeds`` and a
    ``bg_threshold`` in the seeds file (CoBra's per-image value from its ViT's
    semantic-agnostic attention): ``conf_bg = bg_threshold``, ``conf_fg = conf_bg + irn.fg_gap``
    (CoBra supplement Sec. 9.1), with ``conf_fg`` capped at ``irn.max_conf_fg`` and ``conf_bg``
    kept ``fg_gap`` below it: on max-normalised CAMs a ``conf_fg >= 1`` leaves no confident
    foreground, and the object would be labelled background. Never derived from ground truth.
    """
    ic = cfg.irn
    bt = seeds.get("bg_threshold")
    if ic.thresholds == "seeds" and bt is not None:
        fg = min(float(bt) + ic.fg_gap, ic.max_conf_fg)
        return fg, min(float(bt), max(fg - ic.fg_gap, 0.0))
    return ic.conf_fg, ic.conf_bg


def walk_exp_times(cells: int, cfg) -> int:
    """The walk length 2^t for a stride-4 grid of ``cells`` nodes: ``infer.exp_times``, or (null)
    the release's reach relative to the image. The release walks 2^8 steps on VOC's stride-4
    grids (mean 125 x 94 = ``infer.walk_reference_cells``); a walk's reach grows with the
    square root of its steps, so the same reach relative to a grid of ``cells`` nodes takes
    2^8 ``cells / reference`` steps: 2^5 on the 40 x 40 grid of a 160 px image. A walk far
    longer than the grid flattens every map and the global-max normalisation then claims the
    whole image (measured: 2^8 steps on 32 x 32 grids, 0.27 mIoU; 2^3, 0.42; seeds 0.40)."""
    ic = cfg.infer
    if ic.exp_times is not None:
        return int(ic.exp_times)
    t = round(float(np.log2(256.0 * max(cells, 1) / ic.walk_reference_cells)))
    return int(min(max(t, 0), 16))


def require_ir_crf(cfg) -> bool:
    """IR labels need the dense CRF (``irn.ir_crf``): without it they keep 0.7-70 % of the
    negative pairs that cross true edges (measured), so training stops instead of warning."""
    if not cfg.irn.ir_crf:
        return False
    from labelwise.blocks.crf import crf_available

    if not crf_available():
        raise LabelwiseError("irn: IR labels need the dense CRF but pydensecrf2 is not installed: pip install "
                             "'labelwise[crf]' (or pydensecrf2), or pass --set irn.ir_crf=false knowingly (weaker "
                             "boundaries)")
    return True


def ir_label_stats(label: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image IR-label statistics of a batch of stride-4 labels ``B x h x w`` (255 = ignore),
    averaged over the batch: fractions of foreground / background / ignored cells, the share of
    images with no foreground cell, and negative pairs per image (``neg``: the negative-pair mask
    of :func:`pair_labels`, ``B x ...``). Tensors on the label's device: logging them costs no
    host sync."""
    lab = label.reshape(label.shape[0], -1)
    n = lab.shape[1]
    fg = ((lab > 0) & (lab != 255)).sum(1).float() / n
    bg = (lab == 0).sum(1).float() / n
    return {"ir_fg": fg.mean(), "ir_bg": bg.mean(), "ir_ignore": (1.0 - fg - bg).mean(),
            "ir_no_fg": (fg == 0).float().mean(), "ir_neg_pairs": neg.flatten(1).sum(1).float().mean()}


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
        self.crf = require_ir_crf(cfg)

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        from labelwise.data.transforms import TrainTransform

        seeds = item.get("seeds")
        if seeds is None:
            raise LabelwiseError("irn trains on CAM seeds: pass --seeds SEED_DIR (the --out of labelwise infer "
                                 "RUN --what seeds on the training split)")
        _check_keys(seeds["keys"], self.num_classes, item)
        conf_fg, conf_bg = seed_thresholds(seeds, self.cfg)
        label = ir_label(seeds["cams"], seeds["keys"], item["image"], conf_fg, conf_bg, crf=self.crf,
                         gt_prob=self.cfg.irn.crf_gt_prob)
        g = torch.Generator()
        g.manual_seed(int(rng.integers(0, 2 ** 62)))
        d = self.cfg.data
        j = d.color_jitter
        tf = TrainTransform(crop_size=d.crop_size, scale_range=tuple(d.scale_range), flip_p=0.5 if d.flip else 0.0,
                            jitter=(j, j, j, min(j / 4, 0.5)) if j > 0 else None, fill=self.fill, generator=g)
        out = tf({"image": item["image"], "mask": label})
        # the release's PIL nearest rescale by 0.25 samples the cell centre 4i + 2 (measured)
        lab = out["mask"].as_subclass(torch.Tensor)[2::4, 2::4].contiguous()
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
        if cfg.irn.thresholds == "seeds" and len(ds) and ds[0]["seeds"].get("bg_threshold") is None:
            import warnings

            warnings.warn(f"irn.thresholds=seeds but the seeds in {seeds_dir} hold no bg_threshold: IR labels use "
                          f"irn.conf_fg / irn.conf_bg ({cfg.irn.conf_fg} / {cfg.irn.conf_bg})", stacklevel=2)
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
        label = label.long()
        pairs = pair_labels(label, index)  # IRN Eq. 4, shared by the losses and the logged statistics
        out = irn_losses(edge, disp, label, index, aff_weight=ctx.cfg.loss.aff_weight,
                         disp_weight=ctx.cfg.loss.disp_weight, pairs=pairs)
        return {**out, **ir_label_stats(label, pairs[2])}

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
        # the walk length follows each image's own stride-4 grid (not the batch's padding)
        cells = [(-(-it["image"].shape[0] // 4), -(-it["image"].shape[1] // 4)) for it in items]
        steps = [walk_exp_times(ch * cw, cfg) for ch, cw in cells]
        chunk = max(1, int(ic.rw_memory_gib * 2 ** 30 // walk_memory_bytes(h * w, ic.rw_mode)))
        walked = cams
        if kmax:
            walked = torch.empty_like(cams)
            for t in sorted(set(steps)):
                sel = [b for b in range(B) if steps[b] == t]
                for i in range(0, len(sel), chunk):
                    part = sel[i:i + chunk]
                    walked[part] = random_walk(cams[part], boundary[part], beta=ic.beta, exp_times=t,
                                               radius=ic.radius, mode=ic.rw_mode)
        up = F.interpolate(walked, scale_factor=4, mode="bilinear", align_corners=False)[..., :H, :W] if kmax else None
        # written with the walked seeds, per image: the boundary map's 50 / 90 / 99th percentiles
        # inside the image (the walk needs a peak of about 0.5 to stop at an edge); one transfer
        if "seeds" in ctx.what:
            q = boundary.new_tensor([0.5, 0.9, 0.99])
            bq = torch.stack([torch.quantile(boundary[b, :ch, :cw].flatten().float(), q)
                              for b, (ch, cw) in enumerate(cells)]).cpu().numpy()
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
                bt = it["seeds"].get("bg_threshold")
                level = float(bt) if ic.walk_bg == "seeds" and bt is not None else ic.sem_seg_bg
                idx = torch.cat([maps.new_full((1, H, W), level), maps]).argmax(0).cpu().numpy()
                mask = np.concatenate([[0], keys]).astype(np.uint8)[idx]
                if ic.crf:
                    from labelwise.blocks.crf import crf_refine_present

                    mask = crf_refine_present(it["image"], mask, keys, gt_prob=ic.crf_gt_prob)
            if "seeds" in ctx.what:
                res["seeds"] = {"cams": maps.cpu().numpy().astype(np.float16), "keys": keys,
                                "walk_exp_times": steps[b], "boundary_quantiles": bq[b]}
            if "masks" in ctx.what:
                res["masks"] = mask
            out.append(res)
        return out


__all__ = ["IRNMethod", "ir_label", "ir_label_stats", "require_ir_crf", "seed_thresholds", "size_divisor",
           "walk_exp_times"]
