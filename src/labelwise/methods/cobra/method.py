"""``cobra``: the training step (Eq. 3 / 4) and seed / mask inference (Sec. 3.4) — see the package docstring."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from labelwise.blocks.cam import cam_to_label, max_norm
from labelwise.data.transforms import ImageInput
from labelwise.engine.data import SeededDataset
from labelwise.engine.method import Method, PredictContext, StepContext, val_shard
from labelwise.errors import LabelwiseError
from labelwise.methods.cobra import losses as L
from labelwise.methods.cobra.config import CoBraConfig
from labelwise.methods.cobra.model import CoBraNet


class _TrainTransform:
    """Per-sample augmentation driven by the sampler's seed (random rescale, flip, crop padded with
    the CNN's mean colour) + the image-level tags."""

    def __init__(self, cfg):
        from labelwise.modeling.backbones import pixel_stats

        self.cfg = cfg
        self.fill = pixel_stats(cfg.model.cnn if cfg.cobra.cnn else cfg.model.vit)[0]

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        from labelwise.data.transforms import seeded_train_transform

        if item.get("tags") is None:
            raise LabelwiseError(f"image {item.get('file_name', item.get('image_id'))} has no image-level tags; cobra "
                                 "trains on tags (voc/coco masks, ImageSets/Tags, or folder tags.csv)")
        out = seeded_train_transform(self.cfg.data, self.fill, rng)({"image": item["image"]})
        return {"image": out["image"].as_subclass(torch.Tensor),
                "tags": torch.as_tensor(np.asarray(item["tags"], dtype=np.float32))}


def to_grid(t: torch.Tensor, size) -> torch.Tensor:
    """A CNN map (B x C x h x w) on the ViT's patch grid (bilinear) when the grids differ."""
    return t if tuple(t.shape[-2:]) == tuple(size) else F.interpolate(t.float(), size=tuple(size), mode="bilinear",
                                                                      align_corners=False)


@torch.no_grad()
def seed_maps(net: CoBraNet, x: torch.Tensor, scales, flip: bool) -> dict[str, torch.Tensor]:
    """Multi-scale (+ flip) maps at the input size, summed over scales and flips (Sec. 3.4,
    supplement Sec. 10): ``cnn`` = ReLU(M_cnn), ``vit`` = ReLU(M_tran) (x) A_obj (TS-CAM coupling,
    per scale), ``a_obj`` = the semantic-agnostic attention; ``logits`` = the scale-1 image logits
    of each branch. M_cnn / M_tran are max-normalised per class; ``a_obj`` is left raw."""
    B, _, H, W = x.shape
    d = net.size_divisor
    acc: dict[str, torch.Tensor] = {}
    logits: dict[str, torch.Tensor] = {}
    for s in scales:
        size = (max(d, round(H * s / d) * d), max(d, round(W * s / d) * d))
        v = x if size == (H, W) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if flip:
            v = torch.cat([v, v.flip(-1)])
        out = net(v, with_proj=False, with_affinity=False)
        maps = {}
        if "cnn" in out:
            maps["cnn"] = F.relu(out["cnn"]["cams"].float())
        if "vit" in out:
            a_obj = out["vit"]["a_obj"]
            maps["vit"] = F.relu(out["vit"]["cams"].float()) * a_obj
            maps["a_obj"] = a_obj
        for k, m in maps.items():
            m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
            if flip:
                m = m[:B] + m[B:].flip(-1)
            acc[k] = m if k not in acc else acc[k] + m
        if s == 1.0 or not logits:
            logits = {k: o["logits"][:B].float() for k, o in out.items()}
    res = {k: (max_norm(v) if k in ("cnn", "vit") else v) for k, v in acc.items()}
    res["logits"] = logits
    return res


class CoBraMethod(Method):
    name = "cobra"
    config_cls = CoBraConfig
    description = "CoBra: CNN + ViT complementary branches (image tags), seeds for IRN and a segmenter"
    outputs = {"seeds": "cam_npz", "masks": "label_png"}
    testbed = "cooc"

    # ------------------------------------------------------------------ model
    def build_model(self, cfg, info, *, pretrained=True):
        c = cfg.cobra
        if not (c.cnn and c.vit):
            on = [k for k in ("l_cam", "l_cap", "l_sap") if getattr(c, k)]
            if on:
                raise LabelwiseError(f"config key 'cobra.{on[0]}' needs both branches (cobra.cnn and cobra.vit); a "
                                     "single-branch row of Table 3 sets cobra.l_cam=false cobra.l_cap=false "
                                     "cobra.l_sap=false")
        net = CoBraNet(cfg, info.num_foreground, pretrained=pretrained)
        if net.vit is not None and cfg.data.crop_size % net.size_divisor:
            raise LabelwiseError(f"config key 'data.crop_size' = {cfg.data.crop_size} is not a multiple of the ViT "
                                 f"patch size {net.size_divisor}; pick a multiple")
        self._check_source(cfg)
        return net

    @staticmethod
    def _source(cfg) -> str:
        c, s = cfg.cobra, cfg.infer.source
        if s == "auto":
            return "fuse" if c.cnn and c.vit else ("cnn" if c.cnn else "vit")
        return s

    def _check_source(self, cfg) -> None:
        s, c = self._source(cfg), cfg.cobra
        need = {"cnn": (True, False), "vit": (False, True)}.get(s, (True, True))
        if (need[0] and not c.cnn) or (need[1] and not c.vit):
            raise LabelwiseError(f"config key 'infer.source' = {s}: this run has no "
                                 f"{'CNN' if need[0] and not c.cnn else 'ViT'} branch; use infer.source=auto")

    def param_groups(self, model, cfg):
        """Backbones at ``optim.backbone_lr_mult``, the new layers (CAM heads, projections) at the full lr
        (the paper's 10x); with ``model.vit_lr_mult`` set, the whole SAK branch (a ViT trained from
        scratch and its heads, the cpu preset) at that multiplier instead."""
        from labelwise.engine.optim import default_param_groups

        mult = cfg.model.vit_lr_mult
        if mult is None:
            return default_param_groups(model)
        named = list(model.named_parameters())
        vit = [(n, p) for n, p in named if ".vit." in f".{n}"]
        groups = default_param_groups(model)
        ids = {id(p) for _, p in vit}
        for g in groups:
            g["params"] = [(n, p) for n, p in g["params"] if id(p) not in ids]
        return groups + [{"name": "vit", "params": vit, "lr_mult": mult}]

    def ddp_options(self, cfg):
        # the projections are idle before loss.contrast_start_epoch
        return {**super().ddp_options(cfg), "find_unused_parameters": True}

    def build_train_dataset(self, cfg, spec, info=None, *, labels_dir=None, seeds_dir=None):
        if labels_dir is not None or seeds_dir is not None:
            raise LabelwiseError("cobra trains on image-level tags only; --labels / --seeds are for irn and segmenter")
        return SeededDataset(self.load_split(cfg, spec, cfg.data.train_split), _TrainTransform(cfg))

    # ------------------------------------------------------------------ one step (Eq. 3 / 4)
    def training_step(self, model, batch, ctx: StepContext):
        cfg = ctx.cfg
        c, lc = cfg.cobra, cfg.loss
        x, tags = batch["image"], batch["tags"].float()
        epoch = ctx.step / max(ctx.steps_per_epoch, 1)  # fractional: staging works at any batch size
        both = c.cnn and c.vit
        use_cam = both and c.l_cam and epoch >= lc.cam_start_epoch
        contrast = both and epoch >= lc.contrast_start_epoch
        out = model(x, with_proj=contrast, with_affinity=contrast and c.l_cap)
        logs, total = {}, 0.0
        for b in ("cnn", "vit"):  # L_cls = L_cls-cnn + L_cls-tran
            if b in out:
                loss = L.cls_loss(out[b]["logits"], tags)
                total = total + lc.cls * loss
                logs[f"cls_{b}"] = loss.detach()
        if both:
            grid = out["vit"]["cams"].shape[-2:]
            m_cnn = to_grid(out["cnn"]["cams"], grid)
            if use_cam:  # Sec. 3.3.1, lambda_1
                cam = L.cam_loss(m_cnn, out["vit"]["cams"], tags, lc.cam_form)
                total = total + lc.lambda1 * cam
                logs["cam"] = cam.detach()
            if contrast and c.l_cap:  # Eq. 1, lambda_2: ViT patch affinity -> CNN projection
                v_c = F.normalize(to_grid(out["cnn"]["proj"], grid), dim=1).flatten(2)
                cap = L.cap_loss(v_c, out["vit"]["affinity"], lc.k_cap_pos, lc.k_cap_neg, lc.tau, lc.patch_reduction)
                total = total + lc.lambda2 * cap
                logs["cap"] = cap.detach()
            if contrast and c.l_sap:  # Eq. 2, lambda_2: CNN pseudo labels -> ViT projection
                probs, labels = L.cnn_pseudo_labels(m_cnn, tags)
                sap = L.sap_loss(out["vit"]["proj"].flatten(2), probs, labels, tags, lc.k_sap_pos, lc.k_sap_neg,
                                 lc.tau, lc.patch_reduction)
                total = total + lc.lambda2 * sap
                logs["sap"] = sap.detach()
        return {"loss": total, **logs}

    def evaluate(self, model, ctx: StepContext):
        """Single-scale seed mIoU on ``data.val_split`` with the configured source and background rule."""
        from labelwise.evaluation import SemanticMetric

        shard = val_shard(ctx)
        if shard is None:
            return None
        ds, indices = shard
        metric = SemanticMetric(ctx.info.num_classes, ctx.info.class_names)
        tf = ImageInput(long_side=ctx.cfg.infer.size)
        net = ctx.module
        for i in indices:
            item = tf(ds[i])
            [res] = self._seeds_and_masks(net, item["input"][None].to(ctx.device), [item], ctx.cfg,
                                          ("masks",), scales=[1.0], flip=False, crf=False)
            metric.update(res["masks"], item["mask"])
        res = metric.compute()
        return {"val_miou": res["miou"], "val_confusion_ratio": res["confusion_ratio"]}

    # ------------------------------------------------------------------ inference
    def inference_transform(self, cfg, info):
        return ImageInput(long_side=cfg.infer.size)

    def predict(self, model, batch, ctx: PredictContext):
        ic = ctx.cfg.infer
        crf = ic.crf and _crf_available()
        if ic.crf and not crf and not getattr(self, "_warned", False):
            import warnings

            warnings.warn("cobra: infer.crf is true but pydensecrf2 is not installed: masks are the thresholded "
                          "seeds (pip install 'labelwise[crf]', or --set infer.crf=false to silence this)", stacklevel=2)
            self._warned = True
        return self._seeds_and_masks(model, batch["inputs"], batch["items"], ctx.cfg, ctx.what, scales=ic.scales,
                                     flip=ic.flip, crf=crf)

    def _seeds_and_masks(self, net, x, items, cfg, what, *, scales, flip, crf) -> list[dict]:
        ic = cfg.infer
        self._check_source(cfg)
        maps = seed_maps(net, x, scales, flip)
        source = self._source(cfg)
        seed = L.fuse_seeds(maps.get("cnn"), maps.get("vit"), source)
        # supplement Sec. 9.1: each image's background threshold from the semantic-agnostic attention,
        # written with the seeds for IRN's IR labels (a CNN-only run has no attention map: none)
        attn_bg = None
        if "a_obj" in maps and ("seeds" in what or ic.bg_source == "attention"):
            lo, hi = ic.bg_range
            attn_bg = L.attention_bg_threshold(maps["a_obj"][:, 0], ic.bg_quantile, ic.bg_snap, lo, hi,
                                               ic.bg_attention_norm).tolist()
        # the masks' background: infer.bg_threshold, or (bg_source attention) the attention's per image
        bg = attn_bg if ic.bg_source == "attention" and attn_bg is not None else [ic.bg_threshold] * len(items)
        present = self._present(maps["logits"], items, cfg).cpu()
        out = []
        for b, item in enumerate(items):
            keys = (torch.nonzero(present[b]).flatten() + 1).numpy().astype(np.int64)
            cams = _to_image_size(seed[b, torch.as_tensor(keys - 1, device=seed.device)], item["image"])
            res = {}
            if "seeds" in what:
                res["seeds"] = {"cams": cams.cpu().numpy().astype(np.float16), "keys": keys}
                if attn_bg is not None:
                    res["seeds"]["bg_threshold"] = np.float32(attn_bg[b])
            if "masks" in what:
                H, W = item["image"].shape[:2]
                if len(keys) == 0:
                    label = np.zeros((H, W), np.uint8)
                else:
                    label = cam_to_label(cams, keys=torch.as_tensor(keys, device=cams.device),
                                         bg_threshold=bg[b]).cpu().numpy().astype(np.uint8)
                    if crf:
                        from labelwise.blocks.crf import crf_refine_present

                        label = crf_refine_present(item["image"], label, keys, gt_prob=ic.crf_gt_prob)
                res["masks"] = label
            out.append(res)
        return out

    @staticmethod
    def _present(logits: dict, items, cfg) -> torch.Tensor:
        """B x K classes whose seeds are kept: the image's tags (``infer.tags`` auto / gt), or the classes
        whose mean branch probability exceeds ``infer.pred_threshold``."""
        ic = cfg.infer
        if ic.tags == "gt" and any(it.get("tags") is None for it in items):
            raise LabelwiseError("config key 'infer.tags' is gt but the split has no image-level tags; use auto or pred")
        probs = torch.stack([torch.sigmoid(v) for v in logits.values()]).mean(0)
        present = probs > ic.pred_threshold
        for b, it in enumerate(items):
            if ic.tags != "pred" and it.get("tags") is not None:
                present[b] = torch.as_tensor(np.asarray(it["tags"]) > 0, device=present.device)
        return present


def _crf_available() -> bool:
    from labelwise.blocks.crf import crf_available

    return crf_available()


def _to_image_size(maps: torch.Tensor, image: np.ndarray) -> torch.Tensor:
    H, W = image.shape[:2]
    if maps.shape[0] == 0:
        return maps.new_zeros((0, H, W))
    if tuple(maps.shape[-2:]) == (H, W):
        return maps
    return F.interpolate(maps[None].float(), size=(H, W), mode="bilinear", align_corners=False)[0]
