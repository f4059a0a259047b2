"""DINO projection head (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021), with the parameter layout of the official release
(facebookresearch/dino, ``vision_transformer.DINOHead``) so its checkpoints load as is.

Official state-dict keys for ``nlayers=3, use_bn=False``::

    mlp.0.weight mlp.0.bias  mlp.2.weight mlp.2.bias  mlp.4.weight mlp.4.bias
    last_layer.weight_g (out_dim, 1)  last_layer.weight_v (out_dim, bottleneck_dim)

(``nn.Sequential(Linear, GELU, Linear, GELU, Linear)``; with ``use_bn`` a BatchNorm1d
follows each hidden Linear and shifts the indices; ``nlayers=1`` makes ``mlp`` a bare
Linear: ``mlp.weight``/``mlp.bias``.)

Why an explicit weight-norm layer: the official code wraps ``last_layer`` with
``torch.nn.utils.weight_norm``, which is deprecated (FutureWarning), while its replacement
``torch.nn.utils.parametrizations.weight_norm`` renames the parameters to
``last_layer.parametrizations.weight.original0/1``, which no longer match the official
checkpoints. :class:`WeightNormLinear` computes the same thing, ``W = g * v / ||v||`` with the
norm taken per output row (``dim=0`` in the old API), and names its parameters ``weight_g``
and ``weight_v`` with the old shapes.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "ProjectionMLP", "WeightNormLinear", "build_mlp", "cancel_last_layer_gradients"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation (Salimans & Kingma, 2016).

    ``weight = weight_g * weight_v / ||weight_v||_row``: ``weight_v`` (out, in) gives the
    direction of each output row, ``weight_g`` (out, 1) its length. Same maths, parameter
    names and shapes as ``torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))``.
    At construction ``weight_v`` gets ``nn.Linear``'s default init and ``weight_g`` its row
    norms, so the effective weight starts equal to that Linear's, as with the old API.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's default weight init
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(v)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (normalised) weight, (out_features, in_features)."""
        # No epsilon, as torch._weight_norm: a zero row of v is a bug, not a case to smooth.
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    """DINO projection head: MLP -> L2 normalisation -> weight-normalised linear (prototypes).

    DINO Sec. 3.1 ("Network architecture"): "a 3-layer multi-layer perceptron (MLP) with hidden dimension 2048
    followed by l2 normalization and a weight normalized fully connected layer with K
    dimensions" (design taken from SwAV).

    Args:
        in_dim: backbone feature size.
        out_dim: K, the number of output dimensions (65536 for the official ViT runs).
        use_bn: BatchNorm1d after each hidden Linear (off for ViTs in the release).
        norm_last_layer: freeze ``last_layer.weight_g`` at 1, i.e. keep the prototypes
            unit-norm; the official code notes this makes training more stable.
        nlayers: Linear layers in the MLP (at least 1).
        hidden_dim: hidden width of the MLP.
        bottleneck_dim: MLP output size, the input of ``last_layer``.

    Init (as the release): trunc-normal(std=.02) weights and zero biases for the MLP
    Linears; ``last_layer.weight_v`` keeps nn.Linear's default init and ``weight_g`` is
    filled with 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        self.mlp = build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        if norm_last_layer:
            # Prototypes stay on the unit sphere: only their directions (weight_v) are learnt.
            self.last_layer.weight_g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_dim) -> (..., out_dim)`` logits (cosine similarities times weight_g)."""
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        # Bounds (-2, 2) are absolute, as in DINO's utils.trunc_normal_: ~100 std here.
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_mlp(in_dim: int, hidden_dim: int, out_dim: int, nlayers: int = 3, use_bn: bool = False) -> nn.Module:
    """DINO's projection MLP: ``nlayers`` Linears with GELU (and optional BatchNorm1d) between
    them, trunc-normal(std=.02) weights, zero biases. ``nlayers=1`` is a bare Linear (official
    layout: keys ``weight``/``bias``), otherwise an ``nn.Sequential`` (keys ``0.weight``, ...)."""
    nlayers = max(int(nlayers), 1)
    if nlayers == 1:
        mlp: nn.Module = nn.Linear(in_dim, out_dim)
    else:
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1)
        for d_in, d_out in itertools.pairwise(dims):
            layers.append(nn.Linear(d_in, d_out))
            if use_bn:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, out_dim))
        mlp = nn.Sequential(*layers)
    mlp.apply(_init_weights)
    return mlp


class ProjectionMLP(nn.Module):
    """DINO's MLP followed by L2 normalisation, without the weight-normalised last layer: the
    projection head of SeCo (``O_q`` / ``O_k`` of SeCo Eq. 2; 768 -> 2048 -> 2048 -> 768 as
    released). ``forward(x (..., in_dim)) -> (..., out_dim)`` unit vectors."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, nlayers: int = 3, use_bn: bool = False):
        super().__init__()
        self.mlp = build_mlp(in_dim, hidden_dim, out_dim, nlayers, use_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)


def cancel_last_layer_gradients(head: nn.Module, epoch: int, freeze_last_layer_epochs: int) -> None:
    """DINO's ``cancel_gradients_last_layer``: drop the last layer's gradients early on.

    During the first ``freeze_last_layer_epochs`` epochs (``epoch < freeze``), every
    parameter whose name contains ``"last_layer"`` gets ``grad = None``, so the optimizer
    skips it that step (the release freezes the prototypes for the first epoch, which it
    found to help the start of training). Call after ``backward()`` and before
    ``optimizer.step()``. ``head`` may be any module containing the head (names are
    matched as substrings, as in the release).
    """
    if epoch >= freeze_last_layer_epochs:
        return
    for name, p in head.named_parameters():
        if "last_layer" in name:
            p.grad = None
