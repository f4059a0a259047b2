"""DeepLab decoders: the DeepLab-v2 ASPP classifier, ASPP (DeepLabV3) and the DeepLabV3+
encoder-decoder head.

References
----------
* DeepLab-v2: Chen, Papandreou, Kokkinos, Murphy, Yuille, "DeepLab: Semantic Image
  Segmentation with Deep Convolutional Nets, Atrous Convolution, and Fully Connected CRFs",
  TPAMI 2017 (ASPP-L: four parallel 3x3 atrous classifiers, rates 6/12/18/24, fused by
  summation; Sec. 3.1, Fig. 4). SeCo's "four 3x3 convolution layers" segmentation head.
* DeepLabV3: Chen, Papandreou, Schroff, Adam, "Rethinking Atrous Convolution for Semantic
  Image Segmentation", arXiv:1706.05587, 2017 (ASPP: Sec. 3.3).
* DeepLabV3+: Chen, Zhu, Papandreou, Schroff, Adam, "Encoder-Decoder with Atrous Separable
  Convolution for Semantic Image Segmentation", ECCV 2018 (decoder: Sec. 3.1, design
  choices: Sec. 4.1, Tables 1-2).

Both modules use plain (not depthwise-separable) convolutions, as torchvision and most
PyTorch re-implementations do; DeepLabV3+ Sec. 3.1 makes separable convolutions an
option for speed, not a requirement of the architecture.

The module/parameter layout of :class:`ASPP` mirrors torchvision's
``torchvision.models.segmentation.deeplabv3.ASPP`` (``convs.{i}.{j}``, ``project.{j}``),
so the ASPP weights of torchvision's DeepLabV3 checkpoints (``classifier.0.*``) load
into it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ASPP", "ASPPConv", "ASPPPooling", "DeepLabV2Classifier", "DeepLabV3Plus", "DeepLabV3PlusDecoder",
           "build_deeplabv3plus", "conv_bn_relu"]


class DeepLabV2Classifier(nn.Module):
    """DeepLab-v2 ASPP classifier: ``sum_r conv3x3_{dilation=r}(x)``, each branch straight to
    ``num_classes`` (with bias), no BN / ReLU / hidden channels; weights N(0, 0.01), biases 0
    (DeepLab-v2 Sec. 3.1). ``forward(x (B, C, h, w)) -> logits (B, num_classes, h, w)``."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=int(r), dilation=int(r))
                                   for r in rates)
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([conv(x) for conv in self.convs]).sum(0)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    """``Conv2d (no bias) -> BatchNorm2d -> ReLU`` with 'same' padding for odd kernels.

    The conv has no bias because the following BatchNorm's shift makes it redundant.
    """
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPConv(nn.Sequential):
    """One atrous branch of ASPP: 3x3 conv with ``padding = dilation = rate``, BN, ReLU.

    ``padding = rate`` keeps the spatial size unchanged for a 3x3 kernel dilated by ``rate``.
    Indices: ``0`` conv, ``1`` BN, ``2`` ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, rate: int) -> None:
        super().__init__(*conv_bn_relu(in_channels, out_channels, kernel_size=3, dilation=rate))
        self.rate = int(rate)


class ASPPPooling(nn.Sequential):
    """Image-level branch of ASPP: global average pool -> 1x1 conv -> BN -> ReLU -> upsample.

    DeepLabV3 Sec. 3.3: as the atrous rate approaches the feature-map size a 3x3 filter
    degenerates to its centre tap, so global context is added explicitly by pooling the
    whole map, projecting it (256 filters + BN) and bilinearly upsampling it back.
    Indices: ``0`` pool, ``1`` conv, ``2`` BN, ``3`` ReLU (torchvision's layout).

    Batch size 1 in training mode: after pooling, BN sees exactly one value per channel,
    for which batch statistics are undefined (PyTorch raises "Expected more than 1 value
    per channel"; TensorFlow, used by the paper, silently outputs the constant BN shift,
    i.e. the branch carries no information). torchvision keeps the BN and simply does not
    support this case. We keep the paper's BN (and torchvision's checkpoint layout) but,
    for that single degenerate case only, normalise with the running statistics and leave
    them untouched, exactly as in eval mode. With two or more samples (or a SyncBatchNorm
    that aggregates over processes) the ordinary training-mode BN runs.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pool, conv, bn, relu = self[0], self[1], self[2], self[3]
        y = conv(pool(x))
        single = y.shape[0] * y.shape[2] * y.shape[3] == 1
        if bn.training and single and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None:
            # Batch statistics of one value are undefined: use the running ones (see class doc).
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            y = bn(y)
        y = relu(y)
        # Upsampling a 1x1 map bilinearly is a broadcast: the branch is spatially constant.
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLabV3 Atrous Spatial Pyramid Pooling (DeepLabV3 Sec. 3.3, Fig. 5).

    Parallel branches on the same feature map, each ``conv (no bias) + BN + ReLU`` with
    ``out_channels`` filters: one 1x1 conv, one 3x3 atrous conv per rate
    (``padding = dilation = rate``), and the image-pooling branch (:class:`ASPPPooling`).
    Their outputs are concatenated and fused by a 1x1 ``conv + BN + ReLU`` projection,
    followed by dropout.

    Args:
        in_channels: channels of the input feature map.
        out_channels: filters per branch and of the projection (256 in the paper).
        rates: atrous rates of the 3x3 branches. (6, 12, 18) for output stride 16; the
            paper doubles them to (12, 24, 36) for output stride 8 (DeepLabV3 Sec. 3.3).
        dropout: dropout probability after the projection (0 disables it).

    Shapes: ``(N, in_channels, H, W) -> (N, out_channels, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        # DeepLabV3 Sec. 3.3: "one 1x1 convolution and three 3x3 convolutions with rates =
        # (6, 12, 18) when output_stride = 16 (all with 256 filters and batch normalization)".
        branches: list[nn.Module] = [conv_bn_relu(in_channels, out_channels, kernel_size=1)]
        branches += [ASPPConv(in_channels, out_channels, r) for r in self.rates]
        # DeepLabV3 Sec. 3.3: image-level features for global context.
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        # DeepLabV3 Sec. 3.3: concatenated branches pass "another 1x1 convolution (also with
        # 256 filters and batch normalization)".
        self.project = nn.Sequential(
            *conv_bn_relu(len(branches) * out_channels, out_channels, kernel_size=1),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLabV3+ decoder (DeepLabV3+ Sec. 3.1, Fig. 2): ASPP + low-level skip refinement.

    ``high`` is the encoder's high-level feature (output stride 16, or 32), ``low`` the
    stride-4 low-level feature (e.g. ResNet ``layer1`` / "Conv2"). ASPP runs on ``high``;
    ``low`` is reduced to ``low_channels`` by ``1x1 conv + BN + ReLU``; the ASPP output is
    bilinearly upsampled to ``low``'s size and concatenated with it; two
    ``3x3 conv + BN + ReLU`` layers refine the result and a 1x1 conv (with bias) gives the
    class logits.

    Args:
        in_channels_high: channels of ``high``.
        in_channels_low: channels of ``low``.
        num_classes: output logits channels.
        aspp_channels: ASPP filters (256, DeepLabV3 Sec. 3.3).
        low_channels: channels the low-level feature is reduced to (48, DeepLabV3+ Sec. 4.1).
        rates: ASPP atrous rates (see :class:`ASPP`).
        decoder_channels: filters of the two 3x3 refinement convs (256, DeepLabV3+ Sec. 4.1).

    ``forward(high, low)`` returns logits ``(N, num_classes, H_low, W_low)``; the caller
    upsamples them to the image size (the paper's final bilinear x4, Sec. 3.1).
    """

    def __init__(
        self,
        in_channels_high: int,
        in_channels_low: int,
        num_classes: int,
        aspp_channels: int = 256,
        low_channels: int = 48,
        rates: Sequence[int] = (6, 12, 18),
        decoder_channels: int = 256,
    ) -> None:
        super().__init__()
        # DeepLabV3+ Sec. 3.1: the encoder is DeepLabV3 (ASPP on the high-level feature).
        self.aspp = ASPP(in_channels_high, aspp_channels, rates)
        # DeepLabV3+ Sec. 3.1/4.1 (Table 1): a 1x1 conv reduces the low-level feature to 48
        # channels so its many channels do not outweigh the rich encoder features.
        self.low_proj = conv_bn_relu(in_channels_low, low_channels, kernel_size=1)
        # DeepLabV3+ Sec. 4.1 (Table 2): [3x3, 256] x 2 after the concatenation works best.
        self.refine = nn.Sequential(
            *conv_bn_relu(aspp_channels + low_channels, decoder_channels, kernel_size=3),
            *conv_bn_relu(decoder_channels, decoder_channels, kernel_size=3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.low_proj(low)
        # DeepLabV3+ Sec. 3.1: encoder features are bilinearly upsampled to the low-level size
        # (x4 for output stride 16) before the concatenation.
        x = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.refine(torch.cat([x, low], dim=1)))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ as a whole (DeepLabV3+ Sec. 3, Fig. 2): backbone -> ASPP + decoder -> logits at input size.

    ``backbone`` is a :class:`labelwise.modeling.backbones.Backbone` (images in [0, 1], it
    normalises them itself) whose ``features`` are ordered by stride: ``features[0]`` is the
    low-level map (stride 4: ResNet ``layer1``, EfficientNet stage 2, a ViT's simple-pyramid
    level 4) and ``features[-1]`` the encoder output (the deepest map, at the output stride).
    :func:`build_deeplabv3plus` builds such a backbone from a name.

    ``decoder=True``: ``head`` is a :class:`DeepLabV3PlusDecoder` (ASPP on the encoder output,
    48-channel low-level skip, two 3x3 convs, 1x1 classifier at stride 4). ``decoder=False``:
    DeepLabV3 (DeepLabV3 Sec. 3.3: ASPP, then "the final 1x1 convolution which generates the
    final logits"; the "Decoder" column of DeepLabV3+ Table 3), and the backbone's only
    feature is the encoder output.

    ``forward(x (B, 3, H, W) in [0, 1]) -> logits (B, num_classes, H, W)``: the head's
    logits are bilinearly upsampled to the input size (DeepLabV3+ Sec. 3.1, the final x4).
    A ViT created with ``pad_input=True`` sees its input zero-padded to a multiple of the
    patch size; its logits are then upsampled to the padded size and cropped back.

    The head's convolutions are initialised Kaiming-normal (fan-out, ReLU), BN to (1, 0), as
    common DeepLabV3+ re-implementations do; the backbone keeps its (pretrained) weights.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, decoder: bool = True, aspp_channels: int = 256,
                 low_channels: int = 48, rates: Sequence[int] = (6, 12, 18), decoder_channels: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.use_decoder = bool(decoder)
        chans = list(backbone.channels)
        if self.use_decoder:
            if len(chans) < 2:
                raise ValueError("DeepLabV3+ needs a backbone with a low-level and an encoder feature")
            self.head: nn.Module = DeepLabV3PlusDecoder(chans[-1], chans[0], num_classes, aspp_channels=aspp_channels,
                                                        low_channels=low_channels, rates=rates,
                                                        decoder_channels=decoder_channels)
            self.head.aspp.project[-1] = nn.Dropout(dropout)  # the decoder's ASPP default is 0.1
        else:
            self.head = nn.Sequential(ASPP(chans[-1], aspp_channels, rates, dropout=dropout),
                                      nn.Conv2d(aspp_channels, num_classes, 1))
        for m in self.head.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def head_logits(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits at the head's resolution (stride 4 with the decoder, the output stride without)."""
        if self.use_decoder:
            return self.head(features[-1], features[0])
        return self.head(features[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        logits = self.head_logits(self.backbone(x).features)
        p = getattr(self.backbone, "patch_size", None)
        if p and getattr(self.backbone, "pad_input", False) and (H % p or W % p):
            Hp, Wp = H + (-H) % p, W + (-W) % p
            return F.interpolate(logits, size=(Hp, Wp), mode="bilinear", align_corners=False)[..., :H, :W]
        return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)


def build_deeplabv3plus(backbone: str, num_classes: int, *, pretrained: bool = False, weights: str | None = None,
                        output_stride: int = 16, decoder: bool = True, aspp_channels: int = 256,
                        low_channels: int = 48, rates: Sequence[int] | None = None, decoder_channels: int = 256,
                        dropout: float = 0.1) -> DeepLabV3Plus:
    """:class:`DeepLabV3Plus` on any backbone name (alias or timm name, CNN or ViT).

    CNN: timm's ``output_stride`` keyword replaces the strides of the last stages by
    dilation (DeepLabV3 Sec. 3.2; ResNet ``layer4`` dilated 2 at output stride 16), and only
    the stride-4 and the deepest stage are kept (everything after it is pruned). ViT: the
    parameter-free simple pyramid gives the stride-4 and stride-``output_stride`` maps of the
    last block (inputs of any size: ``pad_input=True``). ``rates`` default to (6, 12, 18)
    at output stride 16 and are doubled at output stride 8 (DeepLabV3 Sec. 3.3).
    """
    from labelwise.modeling.backbones import create_backbone
    from labelwise.modeling.backbones.registry import resolve_name

    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    if rates is None:
        rates = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}[output_stride]
    strides = (4, output_stride) if decoder else (output_stride,)
    import timm

    from labelwise.modeling.backbones.backbone import _VIT_MODULES

    arch = resolve_name(backbone).timm_name.split(".", 1)[0]
    is_vit = timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1] in _VIT_MODULES
    kwargs: dict = {"pad_input": True} if is_vit else ({"output_stride": output_stride} if output_stride < 32 else {})
    # With dilation several stages share the output stride (ResNet layer3 and layer4 at 16):
    # the backbone keeps both, DeepLabV3Plus reads the stride-4 level and the deepest one.
    bb = create_backbone(backbone, pretrained=pretrained and not weights, weights=weights, strides=strides, **kwargs)
    return DeepLabV3Plus(bb, num_classes, decoder=decoder, aspp_channels=aspp_channels, low_channels=low_channels,
                         rates=rates, decoder_channels=decoder_channels, dropout=dropout)
