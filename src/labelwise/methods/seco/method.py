"""``seco``: the training step, the knowledge updates and inference (see the package docstring)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from labelwise import dist
from labelwise.blocks.cam import cam_to_label, multiscale_cam
from labelwise.blocks.memory_bank import FIFOQueue
from labelwise.engine.data import SeededDataset
from labelwise.engine.method import Method, PredictContext, StepContext, val_shard
from labelwise.errors import LabelwiseError
from labelwise.methods.seco import decompose as D
from labelwise.methods.seco import losses as L
from labelwise.methods.seco.config import SeCoConfig
from labelwise.methods.seco.model import SeCoNet


class SeCoState(nn.Module):
    """What SeCo keeps across steps (checkpointed by the trainer, outside DDP and the teacher):
    the reservoir of key embeddings with their tags (Eq. 5) and the category prototypes (Eq. 3)."""

    def __init__(self, num_foreground: int, dim: int, reservoir: int):
        super().__init__()
        self.queue = FIFOQueue(reservoir, dim, num_label_fields=1)
        self.register_buffer("prototypes", torch.zeros(num_foreground, dim))
        self.register_buffer("seen", torch.zeros(num_foreground, dtype=torch.bool))


class _TrainTransform:
    """Per-sample augmentation driven by the sampler's seed: the main crop (rescale, flip, crop,
    padded with the backbone's mean colour) with its valid-pixel mask, and the second global
    view (a random resized crop of the whole image, flipped: the weak query view).

    ``carry_masks=True`` (analysis, e.g. ``bench/seco_anchor_tags.py``; training never reads it)
    also returns the item's ground-truth ``mask`` under the same rescale, flip and crop as
    ``gt`` (255 = ignore or padding); the random draws, hence the crop, are unchanged."""

    def __init__(self, cfg, carry_masks: bool = False):
        from labelwise.modeling.backbones import pixel_stats

        self.cfg = cfg
        self.fill = pixel_stats(cfg.model.backbone)[0]
        self.carry_masks = carry_masks

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        from labelwise.data.transforms import MultiCropTransform, TrainTransform

        if item.get("tags") is None:
            raise LabelwiseError(f"image {item.get('file_name', item.get('image_id'))} has no image-level tags; seco "
                                 "trains on tags (voc/coco masks, ImageSets/Tags, or folder tags.csv)")
        d, s = self.cfg.data, self.cfg.seco
        g = torch.Generator()
        g.manual_seed(int(rng.integers(0, 2 ** 62)))
        j = d.color_jitter
        tf = TrainTransform(crop_size=d.crop_size, scale_range=tuple(d.scale_range), flip_p=0.5 if d.flip else 0.0,
                            jitter=(j, j, j, min(j / 4, 0.5)) if j > 0 else None, fill=self.fill, generator=g)
        H, W = item["image"].shape[:2]
        gt = {"objects": item["mask"]} if self.carry_masks and item.get("mask") is not None else {}
        out = tf({"image": item["image"], "mask": np.ones((H, W), np.uint8), **gt})  # padding of the mask = 255
        gsize = s.global_size or d.crop_size
        view = MultiCropTransform(global_size=gsize, n_global=1, n_local=0, global_scale=(0.4, 1.0),
                                  flip_p=0.5 if d.flip else 0.0, generator=g)({"image": item["image"]})
        res = {"image": out["image"].as_subclass(torch.Tensor), "valid": out["mask"].as_subclass(torch.Tensor) == 1,
               "view": view["global_views"][0].as_subclass(torch.Tensor),
               "tags": torch.as_tensor(np.asarray(item["tags"], dtype=np.float32))}
        if gt:
            res["gt"] = out["objects"].as_subclass(torch.Tensor).long()
        return res


class _InferTransform:
    """DataLoader-side: the image as [0, 1] floats, resized so its long side is ``size`` and both
    sides are multiples of the patch size (the ViT's grid)."""

    def __init__(self, size: int, patch: int):
        self.size, self.patch = size, patch

    def __call__(self, item: dict) -> dict:
        x = torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1).float().div_(255.0)
        H, W = x.shape[-2:]
        s = self.size / max(H, W)
        p = self.patch
        h, w = max(p, round(H * s / p) * p), max(p, round(W * s / p) * p)
        return {**item, "input": F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]}


def online_cams(net: SeCoNet, x: torch.Tensor, scales, K: int, flip_reduce: str = "max",
                norm: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Final and auxiliary CAMs of ``x`` at image size: multi-scale + flip, ReLU'd, summed over scales,
    normalised per class (no grad; the release's flip-max and min-max by default). One forward per
    scale serves both heads."""
    both = multiscale_cam(lambda v: torch.cat(net.cams(v), dim=1), x, scales=list(scales), flip=True,
                          out_size=tuple(x.shape[-2:]), flip_reduce=flip_reduce, norm=norm)
    return both[:, :K], both[:, K:]


class SeCoMethod(Method):
    name = "seco"
    config_cls = SeCoConfig
    description = "SeCo: separate and conquer co-occurrence (single-stage WSSS, image tags)"
    outputs = {"segmentation": "label_png", "seeds": "cam_npz", "masks": "label_png"}
    uses_ema = True
    supports_accumulation = False  # after_optimizer_step uses the state of the step's one forward
    testbed = "cooc"

    # ------------------------------------------------------------------ model and state
    def build_model(self, cfg, info, *, pretrained=True):
        if cfg.seco.rectify and not cfg.seco.lil:
            raise LabelwiseError("config key 'seco.rectify' is true but 'seco.lil' is false: tag rectification "
                                 "compares anchors with the reservoir that LiL maintains (Table 2 has no such row)")
        return SeCoNet(cfg, info.num_foreground, pretrained=pretrained)

    def build_state(self, cfg, info):
        return SeCoState(info.num_foreground, self._arch(cfg)[0], cfg.seco.reservoir)

    @staticmethod
    def _arch(cfg) -> tuple[int, int]:
        """``(embed_dim, patch_size)`` of the configured ViT, from a one-block build that leaves the
        global RNG alone (no weights are loaded)."""
        from labelwise.modeling.backbones import create_backbone

        kw = {k: v for k, v in dict(cfg.model.timm_kwargs).items() if k != "depth"}
        with torch.random.fork_rng(devices=[]):
            bb = create_backbone(cfg.model.backbone, depth=1, **kw)
        return bb.embed_dim, bb.patch_size

    def ema_module(self, model):
        return model.embedder  # the local teacher: EMA of encoder + projection head (Sec. 3.5)

    def ema_momentum(self, cfg, step, max_steps):
        return cfg.seco.teacher_momentum

    def ddp_options(self, cfg):
        # the projection head is idle before loss.stage_contrast (and in the baseline row), the
        # segmentation head before loss.stage_seg
        return {**super().ddp_options(cfg), "find_unused_parameters": True}

    def build_train_dataset(self, cfg, spec, info=None, *, labels_dir=None, seeds_dir=None):
        if labels_dir is not None or seeds_dir is not None:
            raise LabelwiseError("seco trains on image-level tags only (single stage); --labels / --seeds do not apply")
        return SeededDataset(self.load_split(cfg, spec, cfg.data.train_split), _TrainTransform(cfg))

    # ------------------------------------------------------------------ one step
    def training_step(self, model, batch, ctx: StepContext):
        sc, lc = ctx.cfg.seco, ctx.cfg.loss
        net: SeCoNet = ctx.module
        x, valid, tags = batch["image"], batch["valid"], batch["tags"].float()
        B, _, H, W = x.shape
        K = tags.shape[1]
        contrast = (sc.lig or sc.lil) and ctx.step >= lc.stage_contrast
        segment = ctx.step >= lc.stage_seg

        with torch.no_grad():  # online pseudo supervision from the current model
            cams, cams_aux = online_cams(net, x, sc.cam_scales, K, sc.cam_flip, sc.cam_norm)
        views = view_tags = view_img = None
        if contrast:  # SeCo Sec. 3.3: decompose the image into tagged patches
            roi = D.roi_mask(cams if ctx.step >= sc.roi_switch else cams_aux, tags, valid, sc.high, sc.low)
            boxes = D.sample_crop_boxes(roi, sc.n_local, sc.local_size)
            local_tags = D.crop_tags(roi, boxes, K + 1, phi=sc.phi, fill_single_class=sc.fill_single_class)
            g_tags = D.global_tags(roi)
            gsize = sc.global_size or H
            main = x if gsize == H else F.interpolate(x, size=(gsize, gsize), mode="bilinear", align_corners=False)
            views = [torch.cat([main, batch["view"]]), D.extract_crops(x, boxes, crop_size=sc.local_size)]
            # key blur in pixels of the release's 448-px image, scaled to what each view shows
            blur_ref = [448.0, sc.local_size * 448.0 / H]
            img = torch.arange(B, device=x.device)
            view_tags = torch.cat([g_tags, g_tags, local_tags.flatten()])
            view_img = torch.cat([img, img, img.repeat_interleave(sc.n_local)])

        out = model(x, views=views)
        cls = F.multilabel_soft_margin_loss(out["logits"].float(), tags)
        cls_aux = F.multilabel_soft_margin_loss(out["logits_aux"].float(), tags)
        h, w = out["tokens"].shape[-2:]
        ptc = L.ptc_loss(out["tokens"], L.token_labels(cams_aux, tags, (h, w), sc.high, sc.low, valid))
        total = lc.cls * cls + lc.cls_aux * cls_aux + lc.ptc * ptc
        logs = {"cls": cls.detach(), "cls_aux": cls_aux.detach(), "ptc": ptc.detach()}

        self._keys = None
        if contrast:
            q = out["q"]
            state: SeCoState = ctx.state
            bank, bank_tags = state.queue.get()
            t = view_tags
            if sc.rectify and len(bank):  # Eqs. 6-7
                t = L.rectify_tags(q.detach(), view_tags, bank, bank_tags, sc.sigma)
                logs["rectified"] = ((t == -1) & (view_tags >= 0)).float().sum() / (view_tags >= 0).sum().clamp(min=1)
            if sc.lil:  # Eq. 8 against R(x, t) = current queries, current keys, queue (Eq. 5)
                with torch.no_grad():  # SeCo Eq. 2: key views (strong augmentation) through the local teacher
                    k = torch.cat([ctx.teacher(D.strong_augment(v, blur_ref_size=r)) for v, r in zip(views, blur_ref)])
                cand = torch.cat([q.detach(), k, bank])
                cand_tags = torch.cat([t, t, bank_tags])
                lil = L.lil_loss(q, t, cand, cand_tags, torch.arange(len(q), device=q.device), lc.tau_lil,
                                 form=lc.lil_form)
                total = total + lc.lil * lil
                logs["lil"] = lil.detach()
                self._keys = (k, t)
            if sc.lig:  # Eq. 4; P_s = the categories that appear in the batch, or in the anchor's image
                if sc.lig_negatives == "image":
                    allowed = tags[view_img] > 0
                else:
                    allowed = (tags.sum(0) > 0)[None].expand(len(q), -1)
                pos, neg = L.lig_pairs(t, state.seen, allowed)
                lig = L.lig_loss(q, t, state.prototypes, state.seen, allowed, lc.tau_lig, pairs=(pos, neg))
                total = total + lc.lig * lig
                anchors = pos.any(1)
                # an anchor without a negative prototype contributes log 1 = 0: the share that has one
                # says how much of L_LiG acts (issue: the image reading leaves most anchors without)
                logs.update(lig=lig.detach(), lig_anchors=anchors.float().sum(),
                            lig_with_negative=(anchors & neg.any(1)).float().sum() / anchors.sum().clamp(min=1))
        if segment:  # L_seg on PAR-refined pseudo labels + the dense CRF energy regulariser
            from labelwise.blocks.energy import dense_crf_loss, energy_gate, spatial_kernel_mass

            labels = self._pseudo_labels(x, cams, tags, valid, sc)
            seg_logits = F.interpolate(out["seg"].float(), size=(H, W), mode="bilinear", align_corners=False)
            seg = L.seg_loss(seg_logits, labels)
            probs = torch.softmax(seg_logits, dim=1)
            roi = valid.float()
            gate = energy_gate(probs, labels, roi)
            energy = dense_crf_loss(probs, x * 255.0, sigma_rgb=lc.reg_sigma_rgb, sigma_xy=lc.reg_sigma_xy,
                                    scale=lc.reg_scale, gate=gate, roi=roi)
            # per-pixel disagreement: the same loss weight whatever the resolution (see loss.reg)
            h_e, w_e = max(1, int(H * lc.reg_scale)), max(1, int(W * lc.reg_scale))
            reg = energy / (h_e * w_e * spatial_kernel_mass(h_e, w_e, lc.reg_sigma_xy * lc.reg_scale))
            total = total + lc.seg * seg + lc.reg * reg
            logs.update(seg=seg.detach(), reg=reg.detach())
        self._cls = (out["cls"].detach(), tags) if sc.lig and ctx.step >= sc.proto_start else None
        return {"loss": total, **logs}

    def _pseudo_labels(self, x, cams, tags, valid, sc) -> torch.Tensor:
        """Segmentation targets: the final CAM refined by PAR (on the image shrunk to ``seco.par_size``)
        against a background of ``high`` and of ``low``: class where the high one says so, background
        where both do, ignored otherwise and outside the crop (as released)."""
        from labelwise.blocks.par import PAR, pseudo_labels_high_low

        H, W = x.shape[-2:]
        s = min(1.0, sc.par_size / max(H, W))
        size = (max(1, round(H * s)), max(1, round(W * s)))
        with torch.no_grad():
            small = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            return pseudo_labels_high_low(PAR(num_iter=sc.par_iters), small, cams, tags, high=sc.high, low=sc.low,
                                          ignore_index=L.IGNORE, valid=valid, out_size=(H, W))

    def after_optimizer_step(self, model, ctx: StepContext):
        state: SeCoState = ctx.state
        if self._keys is not None:  # Eq. 5: newest keys with their (rectified) tags in, oldest out
            k, t = self._keys
            state.queue.enqueue(k, t[:, None])
        if self._cls is not None:  # Eq. 3, identical on every rank (gathered in rank order)
            z, tags = self._cls
            L.update_prototypes(state.prototypes, state.seen, dist.all_gather_cat(z), dist.all_gather_cat(tags),
                                ctx.cfg.seco.proto_momentum, ctx.cfg.seco.proto_update)
        self._keys = self._cls = None

    def evaluate(self, model, ctx: StepContext):
        """Single-scale segmentation mIoU on ``data.val_split`` (periodic evaluation)."""
        from labelwise.evaluation import SemanticMetric

        cfg = ctx.cfg
        shard = val_shard(ctx)
        if shard is None:
            return None
        ds, indices = shard
        metric = SemanticMetric(ctx.info.num_classes, ctx.info.class_names)
        tf = _InferTransform(cfg.infer.size or cfg.data.crop_size, ctx.module.patch_size)
        for i in indices:
            item = tf(ds[i])
            logits = ctx.module.segment(item["input"][None].to(ctx.device))
            pred = F.interpolate(logits.float(), size=item["image"].shape[:2], mode="bilinear", align_corners=False)
            metric.update(pred.argmax(1)[0], torch.as_tensor(item["mask"]))
        res = metric.compute()
        return {"val_miou": res["miou"], "val_confusion_ratio": res["confusion_ratio"]}

    # ------------------------------------------------------------------ inference
    def export_module(self, model, cfg):
        from labelwise.engine.export import MapsAtInputSize

        return MapsAtInputSize(model, "segment")  # segmentation logits at the input size

    def inference_transform(self, cfg, info):
        return _InferTransform(cfg.infer.size or cfg.data.crop_size, self._arch(cfg)[1])

    def predict(self, model, batch, ctx: PredictContext):
        cfg, ic = ctx.cfg, ctx.cfg.infer
        x, items = batch["inputs"], batch["items"]
        K = ctx.info.num_foreground
        res: list[dict] = [{} for _ in items]
        if "seeds" in ctx.what or "masks" in ctx.what:
            def cam_at(scales):  # the release's tools/infer_cam.py: flip-max, summed over scales, min-max
                return multiscale_cam(lambda v: model.cams(v)[0], x, scales=list(scales), flip=True,
                                      out_size=tuple(x.shape[-2:]), flip_reduce=ic.cam_flip, norm=ic.cam_norm)

            present = self._present(model, x, items, K)
            if "seeds" in ctx.what:  # Table 1 / 2 "CAM": single-scale by default
                cams = cam_at(ic.cam_scales)
            if "masks" in ctx.what:  # Table 1 "Mask": the 7-scale CAM cut at the background threshold
                ms_cams = cam_at(ic.mask_scales)
                if ic.mask_refine == "par":
                    from labelwise.blocks.par import PAR, refine_cams_with_background

                    masks = refine_cams_with_background(PAR(num_iter=cfg.seco.par_iters), x, ms_cams,
                                                        present.float(), bg_score=ic.bg_threshold)
                else:
                    masks = cam_to_label(ms_cams, present.float(), ic.bg_threshold)
            for b, item in enumerate(items):
                keys = (torch.nonzero(present[b]).flatten() + 1).cpu().numpy().astype(np.int64)
                if "seeds" in ctx.what:
                    c = _resize(cams[b, torch.as_tensor(keys - 1, device=x.device)], item["image"])
                    res[b]["seeds"] = {"cams": c.cpu().numpy().astype(np.float16), "keys": keys}
                if "masks" in ctx.what:
                    res[b]["masks"] = _resize_label(masks[b], item["image"])
        if "segmentation" in ctx.what:
            logits = None
            for s in ic.seg_scales:  # as released: logits summed over the flip, max over scales
                size = tuple(max(model.patch_size, round(v * s / model.patch_size) * model.patch_size)
                             for v in x.shape[-2:])
                v = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                lg = model.segment(torch.cat([v, v.flip(-1)]))
                lg = F.interpolate(lg.float(), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
                lg = lg[: len(x)] + lg[len(x):].flip(-1)
                logits = lg if logits is None else torch.maximum(logits, lg)
            for b, item in enumerate(items):
                lg = F.interpolate(logits[b:b + 1], size=item["image"].shape[:2], mode="bilinear",
                                   align_corners=False)[0]
                if ic.crf:
                    from labelwise.blocks.crf import dense_crf

                    pred = dense_crf(item["image"], torch.softmax(lg, 0).cpu().numpy()).argmax(0)
                else:
                    pred = lg.argmax(0).cpu().numpy()
                res[b]["segmentation"] = pred.astype(np.uint8)
        return res

    @staticmethod
    def _present(model, x, items, K) -> torch.Tensor:
        """B x K classes whose CAMs are kept: the image's tags, or (no tags) the classes predicted
        with probability > 0.5."""
        present = torch.zeros(len(items), K, dtype=torch.bool, device=x.device)
        need = [it.get("tags") is None for it in items]
        if any(need):
            probs = torch.sigmoid(model(x)["logits"].float())
            present |= (probs > 0.5) & torch.tensor(need, device=x.device)[:, None]
        for b, it in enumerate(items):
            if not need[b]:
                present[b] = torch.as_tensor(np.asarray(it["tags"]) > 0, device=x.device)
        return present


def _resize(maps: torch.Tensor, image: np.ndarray) -> torch.Tensor:
    H, W = image.shape[:2]
    if maps.shape[0] == 0:
        return maps.new_zeros((0, H, W))
    return F.interpolate(maps[None].float(), size=(H, W), mode="bilinear", align_corners=False)[0]


def _resize_label(label: torch.Tensor, image: np.ndarray) -> np.ndarray:
    H, W = image.shape[:2]
    return F.interpolate(label[None, None].float(), size=(H, W), mode="nearest")[0, 0].to(torch.uint8).cpu().numpy()
