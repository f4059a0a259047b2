"""OAP's network (OAP Sec. 4.3): multi-scale encoder -> Mask2Former pixel decoder -> masked-attention
decoder with [SEM] / [INS] queries -> DINO head on the queries. The teacher is the trainer's EMA
copy of the whole :class:`OAPNet` (``OAPMethod.ema_module``), used by :func:`teacher_targets`.

* encoder (``backbone``): a ViT wrapped in :class:`~labelwise.modeling.backbones.vit_adapter.ViTAdapter`
  (zero-initialised injectors: the keys OAP pools are the plain ViT's at step 0), or a CNN whose
  feature map at ``model.key_stride`` is pooled in place of the keys;
* ``pixel_decoder``: :class:`~labelwise.modeling.decoders.MSDeformAttnPixelDecoder` on strides 4/8/16/32;
* ``decoder``: :class:`~labelwise.modeling.decoders.MultiScaleMaskedTransformerDecoder`;
* ``head``: :class:`~labelwise.modeling.heads.dino.DINOHead` (3-layer MLP, L2 norm, weight-normalised
  K-dim linear) shared by the student's queries and — in the teacher copy — the teacher's mask
  embeddings.

Teacher query embeddings (design decision; the paper does not say how OAP's key-space embeddings
meet the decoder's query space): Eq. 6 (``vote_embeddings``) is applied with the teacher's *own*
mask features (pixel-decoder output, ``mask_dim == hidden_dim``) average-pooled to the key grid as
the per-token features ``X``; the result goes through the teacher decoder's final LayerNorm (as the
student's queries do, ``model.teacher_embed_norm``) and the teacher's DINO head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labelwise.errors import LabelwiseError

LEVEL_IDS = {"semantic": 0, "instance": 1}  # the decoder's query levels (0 = [SEM], 1 = [INS])


class OAPNet(nn.Module):
    def __init__(self, cfg, pretrained: bool = True):
        super().__init__()
        from labelwise.modeling.backbones import create_backbone
        from labelwise.modeling.decoders import MSDeformAttnPixelDecoder, MultiScaleMaskedTransformerDecoder
        from labelwise.modeling.heads.dino import DINOHead

        m = cfg.model
        m.validate()
        bb = create_backbone(m.backbone, pretrained=pretrained and m.pretrained and not m.weights,
                             weights=m.weights if pretrained else None, strides=(4, 8, 16, 32),
                             **dict(m.timm_kwargs))
        self.is_vit = bool(bb.is_vit)
        if self.is_vit and m.adapter:
            from labelwise.modeling.backbones.vit_adapter import ViTAdapter

            enc = ViTAdapter(bb, deform_num_heads=m.adapter_heads)
            # ViTAdapter's multi-scale features use the last block before the final norm: the final
            # norm gets no gradient (DDP needs every trainable parameter used) -> frozen.
            for p in bb.model.norm.parameters():
                p.requires_grad_(False)
            self.key_stride = enc.patch_size
        elif self.is_vit:  # model.adapter=false: the ViT's parameter-free pyramid (resampled last tokens)
            enc = bb
            self.key_stride = enc.patch_size
        else:
            enc = bb
            if m.key_stride not in enc.strides:
                raise LabelwiseError(f"config key 'model.key_stride' = {m.key_stride}: backbone '{m.backbone}' "
                                     f"has strides {list(enc.strides)}")
            self.key_stride = int(m.key_stride)
        self.backbone = enc
        self.pixel_decoder = MSDeformAttnPixelDecoder(list(enc.channels), conv_dim=m.conv_dim, mask_dim=m.mask_dim,
                                                      num_layers=m.pixel_layers, n_heads=m.pixel_heads,
                                                      ffn_dim=m.pixel_ffn, num_feature_levels=3)
        self.decoder = MultiScaleMaskedTransformerDecoder(
            in_channels=m.conv_dim, hidden_dim=m.hidden_dim, num_semantic_queries=m.num_semantic_queries,
            num_instance_queries=m.num_instance_queries, nheads=m.nheads, dim_feedforward=m.dim_feedforward,
            dec_layers=m.dec_layers, mask_dim=m.mask_dim, num_feature_levels=3,
            num_classes=1 if cfg.loss.objectness > 0 else None)  # object / no-object (loss.objectness)
        self.head = DINOHead(m.hidden_dim, m.out_dim, nlayers=3, hidden_dim=m.head_hidden,
                             bottleneck_dim=m.head_bottleneck)
        self.teacher_embed_norm = bool(m.teacher_embed_norm)

    # ------------------------------------------------------------------ pieces
    def encode(self, x: torch.Tensor, keys: bool = False):
        """``(features finest -> coarsest, keys (B, h, w, D) or None)``."""
        if self.is_vit:  # ViTAdapter and the plain Backbone share the call; keys = the last block's
            out = self.backbone(x, return_keys=keys)
            return out.features, out.keys
        out = self.backbone(x)
        k = None
        if keys:
            k = out.features[list(self.backbone.strides).index(self.key_stride)].permute(0, 2, 3, 1)
        return out.features, k

    def forward(self, x: torch.Tensor) -> dict:
        """Student pass on ``x`` (B, 3, H, W) in [0, 1]: the decoder's dict (``pred_masks`` (B, Q, H/4, W/4),
        ``queries`` (B, Q, hidden), ``aux_outputs``, ``level``) plus ``logits`` (B, Q, K) of the DINO head."""
        feats, _ = self.encode(x)
        mask_features, ms = self.pixel_decoder(feats)
        out = self.decoder(ms, mask_features)
        out["logits"] = self.head(out["queries"])
        return out

    def embed_masks(self, emb: torch.Tensor) -> torch.Tensor:
        """Teacher side: Eq. 6 embeddings (K, hidden) -> DINO logits (K, out_dim)."""
        if self.teacher_embed_norm:
            emb = self.decoder.decoder_norm(emb)
        return self.head(emb)


@dataclass
class TeacherTargets:
    """Pseudo-masks of one image of the global view, all levels together."""

    masks: torch.Tensor    # (T, h, w) bool, on the teacher's key grid (given masks: the view's resolution)
    level: torch.Tensor    # (T,) long, 0 = semantic, 1 = instance (the decoder's query levels)
    logits: torch.Tensor   # (T, K) teacher DINO logits (before centring / sharpening)
    scores: torch.Tensor   # (T,)
    features: torch.Tensor  # (T, D) OAP's own Eq. 6 supernode features in key space (L2-normalised)


@torch.no_grad()
def teacher_targets(teacher: OAPNet, x: torch.Tensor, pooling, levels=("semantic", "instance"),
                    max_targets: int = 0, given=None) -> list[TeacherTargets]:
    """OAP on the teacher's keys of the global views ``x`` (B, 3, H, W), batched, every step
    (OAP Sec. 4.2-4.3): per image, the semantic and instance pseudo-masks on the key grid with
    their teacher DINO logits (Eq. 6 votes of the teacher's mask features, see the module doc).

    ``given`` (the ``oap.targets=ground_truth`` control): per image ``(masks (T, H, W) bool, level
    (T,))`` at the view's resolution, used in place of OAP's masks at that resolution (their Eq. 6
    votes from the masks pooled to the key grid, > 0.5; masks that vanish there are dropped);
    scores are 1 and ``features`` empty. ``masks`` of the result are on the key grid for OAP's own
    targets and at the view's resolution for given ones (consumers resample them)."""
    from labelwise.pseudo.oap.pooling import vote_embeddings

    feats, keys = teacher.encode(x, keys=True)
    mask_features, _ = teacher.pixel_decoder(feats)
    B, h, w, _ = keys.shape
    K, A = pooling.prepare(keys)                              # A: (B, N, N) affinity of the keys, once
    results = pooling.pool_prepared(K, A, h, w) if given is None else None
    X = F.adaptive_avg_pool2d(mask_features.float(), (h, w)).flatten(2).transpose(1, 2)  # (B, N, C)
    out = []
    for b in range(B):
        ms, lv, sc, fs = [], [], [], []
        votes = None  # the masks on the key grid that Eq. 6 votes with (OAP's own masks are already there)
        if given is not None:
            gm, gl = given[b]
            pooled = F.adaptive_avg_pool2d(gm[None].float(), (h, w))[0] > 0.5
            keep = pooled.flatten(1).any(1)
            ms, lv, votes = [gm[keep].to(x.device)], [gl[keep].to(x.device)], pooled[keep]
            sc, fs = [torch.ones(int(keep.sum()), device=x.device)], [keys.new_zeros((int(keep.sum()), 0)).float()]
        for name in (levels if given is None else ()):
            res = results[b]
            s = res.level(name)
            masks, scores, feats_k = s.masks, s.scores, s.features
            if max_targets and len(masks) > max_targets:
                keep = torch.argsort(scores, descending=True)[:max_targets]
                masks, scores, feats_k = masks[keep], scores[keep], feats_k[keep]
            ms.append(masks)
            fs.append(feats_k.float())
            sc.append(scores.float())
            lv.append(torch.full((len(masks),), LEVEL_IDS[name], dtype=torch.long, device=x.device))
        masks = torch.cat(ms)
        votes = masks if votes is None else votes
        emb = vote_embeddings(votes.flatten(1), A[b], X[b], sigma=pooling.cfg.sigma, vote=pooling.cfg.vote)
        logits = teacher.embed_masks(emb.to(mask_features.dtype)) if len(masks) else \
            mask_features.new_zeros((0, teacher.head.last_layer.out_features))
        out.append(TeacherTargets(masks=masks, level=torch.cat(lv), logits=logits.float(), scores=torch.cat(sc),
                                  features=torch.cat(fs)))
    return out
