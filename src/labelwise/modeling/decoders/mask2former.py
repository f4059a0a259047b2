"""Mask2Former transformer decoder with OAP's semantic / instance query split.

References
----------
* Mask2Former: Cheng, Misra, Schwing, Kirillov, Girdhar, "Masked-attention Mask Transformer
  for Universal Image Segmentation", CVPR 2022 (masked attention: Sec. 3.2.1; round-robin
  over three feature scales, cross -> self -> FFN order, prediction after the learnable
  query init and after every layer: Sec. 3.2.2 / 3.3). Official code:
  facebookresearch/Mask2Former, ``mask2former_transformer_decoder.py``
  (``MultiScaleMaskedTransformerDecoder``).
* OAP (Online Agglomerative Pooling), Sec. 4.1 / 4.3: the object queries are split into
  *semantic* queries, tagged by a learnable token [SEM], and *instance* queries, tagged by
  [INS]; the tokens "are added to the respective query features at each decoder layer"; both
  groups share all decoder parameters (and the projection head, which lives elsewhere:
  :class:`labelwise.modeling.heads.dino.DINOHead`).

Where the level tokens go (our reading, the paper gives no more detail): ``sem_token`` /
``ins_token`` are added to the query *content* (``tgt``) of their group at the input of each
decoder layer. The initial prediction (made from the learnable query features, before any
layer) already sees the tokens: the tagged initial queries are both the input of that head
and of layer 0, so the tokens are added exactly ``dec_layers`` times. Before the first
self-attention every query's result depends only on its own content, so swapping the tokens
changes only the initial predictions of the matching group; later layers mix the groups
through self-attention (as in the paper, the groups share one decoder).

Parameter names follow the official release where the module exists there
(``query_feat``, ``query_embed``, ``level_embed``, ``input_proj``,
``transformer_{self,cross}_attention_layers.{i}.{self_attn,multihead_attn,norm}``,
``transformer_ffn_layers.{i}.{linear1,linear2,norm}``, ``decoder_norm``,
``mask_embed.layers.{0,1,2}``, ``class_embed``), so the shared parts of an official checkpoint
load with ``strict=False`` (the official ``query_feat`` / ``query_embed`` have
``num_queries`` rows = ``num_semantic_queries + num_instance_queries`` here).

Differences from the official decoder: no class head unless ``num_classes`` is given (OAP
trains the queries by query-wise self-distillation, not classes); the decoder-normalised query
embeddings are returned (optionally projected to ``embed_dim``); the attention mask builder
also does the "fully masked row -> unmasked" fix (the official code does it inside
``forward``); attention masks are boolean, not repeated per head in memory more than needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from labelwise.modeling.decoders.pixel_decoder import PositionEmbeddingSine

__all__ = [
    "MLP",
    "CrossAttentionLayer",
    "FFNLayer",
    "MultiScaleMaskedTransformerDecoder",
    "SelfAttentionLayer",
    "masked_attention_mask",
]


def _xavier_(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention over the queries: ``norm(tgt + MHA(tgt+pos, tgt+pos, tgt))``.
    Tensors are sequence-first, (Q, B, C), as the official code."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        _xavier_(self)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor | None = None) -> torch.Tensor:
        q = k = tgt if query_pos is None else tgt + query_pos
        tgt2 = self.self_attn(q, k, value=tgt, need_weights=False)[0]
        return self.norm(tgt + self.dropout(tgt2))


class CrossAttentionLayer(nn.Module):
    """Post-norm (masked) cross-attention from queries (Q, B, C) to memory (HW, B, C):
    ``norm(tgt + MHA(tgt+query_pos, memory+pos, memory, attn_mask))``.

    ``memory_mask``: bool (B*nhead, Q, HW), ``True`` = not allowed to attend (PyTorch
    convention), e.g. from :func:`masked_attention_mask`."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        _xavier_(self)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
                pos: torch.Tensor | None = None, query_pos: torch.Tensor | None = None) -> torch.Tensor:
        q = tgt if query_pos is None else tgt + query_pos
        k = memory if pos is None else memory + pos
        tgt2 = self.multihead_attn(q, k, value=memory, attn_mask=memory_mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(tgt2))


class FFNLayer(nn.Module):
    """Post-norm feed-forward block: ``norm(tgt + linear2(dropout(relu(linear1(tgt)))))``."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        _xavier_(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm(tgt + self.dropout(tgt2))


class MLP(nn.Module):
    """Plain MLP (Linear + ReLU between layers, none after the last); ``layers.{i}`` as DETR."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def masked_attention_mask(mask_logits: torch.Tensor, size: Sequence[int], nheads: int,
                          threshold: float = 0.5) -> torch.Tensor:
    """Mask2Former's attention mask from the previous layer's mask logits.

    ``mask_logits`` (B, Q, H, W) are resized bilinearly (``align_corners=False``) to ``size``
    = (h, w) of the memory level; a position is masked (``True``) where
    ``sigmoid(logit) < threshold``. A query whose whole row would be masked is left fully
    unmasked (it attends everywhere), as the official decoder does. Returns a detached bool
    tensor (B * nheads, Q, h*w), batch-major then head, as ``nn.MultiheadAttention`` expects.
    """
    b, q = mask_logits.shape[:2]
    m = F.interpolate(mask_logits.detach().float(), size=tuple(size), mode="bilinear", align_corners=False)
    mask = m.sigmoid().flatten(2) < threshold  # (B, Q, hw)
    mask = mask & ~mask.all(dim=-1, keepdim=True)
    return mask.unsqueeze(1).expand(b, nheads, q, mask.shape[-1]).reshape(b * nheads, q, mask.shape[-1])


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Mask2Former transformer decoder with [SEM] / [INS] query groups (OAP Sec. 4.3).

    Args:
        in_channels: channels of the multi-scale features (1x1 ``input_proj`` when different
            from ``hidden_dim``, identity otherwise, as the official code).
        hidden_dim: query / memory width.
        num_semantic_queries, num_instance_queries: sizes of the two groups; queries
            ``[0, S)`` are semantic (level 0), ``[S, S+I)`` instance (level 1).
        nheads, dim_feedforward, dec_layers: transformer settings (9 layers in OAP /
            Mask2Former).
        mask_dim: channels of ``mask_features``; output of the 3-layer ``mask_embed`` MLP.
        num_feature_levels: number of multi-scale features, visited round-robin.
        embed_dim: if given, a linear ``query_proj`` maps the returned query embeddings to this
            width (else they are the ``hidden_dim`` decoder-normalised queries).
        num_classes: if given, a linear ``class_embed`` to ``num_classes + 1`` logits (last =
            no-object, as Mask2Former) is applied with every prediction.
        level_tokens: OAP's [SEM] / [INS] tokens (``False``: plain Mask2Former; the two query
            groups are then told apart only by their learnable queries, e.g. the part and
            object groups of object parsing).

    ``forward(x, mask_features)``: ``x`` a list of ``num_feature_levels`` maps (B, in_channels,
    h_l, w_l), in the official order (lowest resolution first), ``mask_features``
    (B, mask_dim, H, W). Returns a dict

    * ``pred_masks`` (B, Q, H, W) mask logits of the last layer,
    * ``queries`` (B, Q, hidden_dim or embed_dim) its query embeddings,
    * ``mask_embed`` (B, Q, mask_dim) the mask kernels (``pred_masks = mask_embed . mask_features``),
    * ``pred_logits`` (B, Q, num_classes + 1), only with ``num_classes``,
    * ``aux_outputs``: ``dec_layers`` dicts with the same keys (no ``level``), the prediction
      after the query init and after layers ``0 .. dec_layers-2``,
    * ``level`` LongTensor (Q,): 0 = semantic query, 1 = instance query.
    """

    def __init__(self, in_channels: int = 256, hidden_dim: int = 256, num_semantic_queries: int = 50,
                 num_instance_queries: int = 150, nheads: int = 8, dim_feedforward: int = 2048,
                 dec_layers: int = 9, mask_dim: int = 256, num_feature_levels: int = 3,
                 embed_dim: int | None = None, num_classes: int | None = None, dropout: float = 0.0,
                 level_tokens: bool = True) -> None:
        super().__init__()
        if hidden_dim % 2 or hidden_dim % nheads:
            raise ValueError("hidden_dim must be even and divisible by nheads")
        if num_semantic_queries < 0 or num_instance_queries < 0 or num_semantic_queries + num_instance_queries < 1:
            raise ValueError("need at least one query")
        if dec_layers < 1 or num_feature_levels < 1:
            raise ValueError("dec_layers and num_feature_levels must be >= 1")
        self.hidden_dim = int(hidden_dim)
        self.num_heads = int(nheads)
        self.num_layers = int(dec_layers)
        self.num_feature_levels = int(num_feature_levels)
        self.num_semantic_queries = int(num_semantic_queries)
        self.num_instance_queries = int(num_instance_queries)
        self.num_queries = self.num_semantic_queries + self.num_instance_queries

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.query_feat = nn.Embedding(self.num_queries, hidden_dim)  # learnable query content
        self.query_embed = nn.Embedding(self.num_queries, hidden_dim)  # learnable query position
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)  # memory scale embedding
        # OAP's [SEM] / [INS] tokens (small init as other learnable tokens, e.g. ViT's cls token).
        self.sem_token = self.ins_token = None
        if level_tokens:
            self.sem_token = nn.Parameter(torch.empty(hidden_dim))
            self.ins_token = nn.Parameter(torch.empty(hidden_dim))
            nn.init.trunc_normal_(self.sem_token, std=0.02)
            nn.init.trunc_normal_(self.ins_token, std=0.02)
        self.register_buffer(
            "level", torch.cat([torch.zeros(self.num_semantic_queries, dtype=torch.long),
                                torch.ones(self.num_instance_queries, dtype=torch.long)]), persistent=False)

        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(conv.weight, a=1)  # detectron2 c2_xavier_fill
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())

        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1) if num_classes is not None else None
        self.query_proj = nn.Linear(hidden_dim, embed_dim) if embed_dim is not None else None

    # ------------------------------------------------------------------------------------------
    def level_tokens(self) -> torch.Tensor | None:
        """(Q, hidden_dim): ``sem_token`` for the semantic rows, ``ins_token`` for the instance rows
        (``None`` without level tokens)."""
        if self.sem_token is None:
            return None
        return torch.stack([self.sem_token, self.ins_token])[self.level]

    def forward_prediction_heads(self, output: torch.Tensor, mask_features: torch.Tensor,
                                 attn_mask_target_size: Sequence[int] | None) -> tuple[dict, torch.Tensor | None]:
        """Heads on the (Q, B, C) queries: returns the prediction dict and the attention mask
        for the next layer (``None`` if ``attn_mask_target_size`` is ``None``)."""
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # (B, Q, C)
        mask_embed = self.mask_embed(decoder_output)
        pred_masks = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        queries = decoder_output if self.query_proj is None else self.query_proj(decoder_output)
        out = {"pred_masks": pred_masks, "queries": queries, "mask_embed": mask_embed}
        if self.class_embed is not None:
            out["pred_logits"] = self.class_embed(decoder_output)
        attn_mask = None
        if attn_mask_target_size is not None:
            attn_mask = masked_attention_mask(pred_masks, attn_mask_target_size, self.num_heads)
        return out, attn_mask

    def forward(self, x: Sequence[torch.Tensor], mask_features: torch.Tensor) -> dict:
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        src, pos, size_list = [], [], []
        for i, feat in enumerate(x):
            size_list.append(feat.shape[-2:])
            pos.append(self.pe_layer(feat).flatten(2).permute(2, 0, 1))  # (HW, B, C)
            s = self.input_proj[i](feat).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.permute(2, 0, 1))

        bs = mask_features.shape[0]
        query_embed = self.query_embed.weight.unsqueeze(1).expand(-1, bs, -1)  # (Q, B, C)
        tokens = self.level_tokens()
        tokens = None if tokens is None else tokens.unsqueeze(1)  # (Q, 1, C)
        output = self.query_feat.weight.unsqueeze(1).expand(-1, bs, -1)
        if tokens is not None:
            output = output + tokens

        predictions = []
        pred, attn_mask = self.forward_prediction_heads(output, mask_features, size_list[0])
        predictions.append(pred)
        for i in range(self.num_layers):
            level_index = i % self.num_feature_levels
            if i > 0 and tokens is not None:  # layer 0's input is the tagged initial query set already
                output = output + tokens
            output = self.transformer_cross_attention_layers[i](
                output, src[level_index], memory_mask=attn_mask, pos=pos[level_index], query_pos=query_embed)
            output = self.transformer_self_attention_layers[i](output, query_pos=query_embed)
            output = self.transformer_ffn_layers[i](output)
            last = i == self.num_layers - 1
            next_size = None if last else size_list[(i + 1) % self.num_feature_levels]
            pred, attn_mask = self.forward_prediction_heads(output, mask_features, next_size)
            predictions.append(pred)

        out = dict(predictions[-1])
        out["aux_outputs"] = predictions[:-1]
        out["level"] = self.level
        return out
