"""Shared model parts: DeepLabV3 ASPP, DeepLabV3+ decoder, DINO head (CPU, fast)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labelwise.modeling.decoders import ASPP, DeepLabV3PlusDecoder
from labelwise.modeling.heads import DINOHead, cancel_last_layer_gradients


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread. With 2 threads on a busy 2-core machine every op
    waits on the OpenMP barrier (measured ~100x slower); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _bn_relu_eval(y: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


# --------------------------------------------------------------------------- ASPP


@pytest.fixture
def aspp():
    torch.manual_seed(0)
    m = ASPP(8, out_channels=6, rates=(1, 2, 3), dropout=0.1)
    _randomise_bn(m, torch.Generator().manual_seed(1))
    return m.eval()


def test_aspp_shape_and_layout(aspp):
    x = torch.randn(2, 8, 9, 11)
    assert aspp(x).shape == (2, 6, 9, 11)
    # 1x1 + one per rate + pooling; projection sees their concatenation.
    assert len(aspp.convs) == 5 and aspp.project[0].in_channels == 5 * 6
    assert all(not isinstance(m, nn.Conv2d) or m.bias is None for m in aspp.modules())


def test_aspp_branches_equal_direct_computation(aspp):
    x = torch.randn(2, 8, 9, 11)
    with torch.no_grad():
        outs = [branch(x) for branch in aspp.convs]
        # 1x1 branch
        c, bn = aspp.convs[0][0], aspp.convs[0][1]
        torch.testing.assert_close(outs[0], _bn_relu_eval(F.conv2d(x, c.weight), bn))
        # atrous branches: padding = dilation = rate, computed by hand
        for i, r in enumerate(aspp.rates, start=1):
            c, bn = aspp.convs[i][0], aspp.convs[i][1]
            assert c.kernel_size == (3, 3)
            ref = _bn_relu_eval(F.conv2d(x, c.weight, padding=r, dilation=r), bn)
            torch.testing.assert_close(outs[i], ref)
        # pooling branch: ReLU(BN(conv(global mean))), broadcast over space
        pool = aspp.convs[-1]
        ref = _bn_relu_eval(F.conv2d(x.mean(dim=(2, 3), keepdim=True), pool[1].weight), pool[2])
        torch.testing.assert_close(outs[-1], ref.expand_as(outs[-1]))
        # spatially constant (bilinear weights of a 1x1 map sum to 1, up to rounding)
        assert (outs[-1] - outs[-1][:, :, :1, :1]).abs().max() < 1e-6
        assert outs[-1].abs().sum() > 0
        # whole module: projection of the concatenation (dropout is off in eval)
        p, bn = aspp.project[0], aspp.project[1]
        torch.testing.assert_close(aspp(x), _bn_relu_eval(F.conv2d(torch.cat(outs, 1), p.weight), bn))


def test_aspp_batch1_training():
    torch.manual_seed(0)
    m = ASPP(4, out_channels=5, rates=(1, 2)).train()
    pool_bn = m.convs[-1][2]
    first_bn = m.convs[0][1]
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    y = m(x)
    assert y.shape == (1, 5, 6, 6) and torch.isfinite(y).all()
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # batch-1 fallback: the pooling BN uses (and leaves) its running stats; others still update
    assert torch.equal(pool_bn.running_mean, torch.zeros(5)) and int(pool_bn.num_batches_tracked) == 0
    assert int(first_bn.num_batches_tracked) == 1
    # with two samples the pooling BN is an ordinary training-mode BN again
    m(torch.randn(2, 4, 6, 6))
    assert int(pool_bn.num_batches_tracked) == 1 and pool_bn.running_mean.abs().sum() > 0


def test_aspp_loads_torchvision_weights():
    tv = pytest.importorskip("torchvision.models.segmentation.deeplabv3")
    torch.manual_seed(0)
    ref = tv.ASPP(8, [1, 2, 3], out_channels=6)
    _randomise_bn(ref, torch.Generator().manual_seed(2))
    ours = ASPP(8, out_channels=6, rates=(1, 2, 3))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x))


# --------------------------------------------------------------------------- DeepLabV3+


def _small_decoder(num_classes=3):
    return DeepLabV3PlusDecoder(
        in_channels_high=12, in_channels_low=6, num_classes=num_classes,
        aspp_channels=16, low_channels=8, rates=(1, 2, 3), decoder_channels=16,
    )


@pytest.mark.parametrize("high_size", [8, 4])  # output stride 16 and 32 for a 128 px image
def test_deeplabv3plus_shape_and_gradients(high_size):
    torch.manual_seed(0)
    dec = _small_decoder().train()
    high = torch.randn(2, 12, high_size, high_size, requires_grad=True)
    low = torch.randn(2, 6, 32, 32, requires_grad=True)
    out = dec(high, low)
    assert out.shape == (2, 3, 32, 32)
    out.square().mean().backward()
    for t in (high, low):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert all(p.grad is not None for p in dec.parameters())
    assert dec.low_proj[0].out_channels == 8 and dec.low_proj[0].kernel_size == (1, 1)


def test_deeplabv3plus_equals_composition():
    """forward = classifier(refine(cat[bilinear_up(ASPP(high)), low_proj(low)])) (eval mode)."""
    torch.manual_seed(0)
    dec = _small_decoder()
    _randomise_bn(dec, torch.Generator().manual_seed(3))
    dec.eval()
    high, low = torch.randn(2, 12, 4, 4), torch.randn(2, 6, 16, 16)
    with torch.no_grad():
        up = F.interpolate(dec.aspp(high), size=(16, 16), mode="bilinear", align_corners=False)
        assert not torch.allclose(up, F.interpolate(dec.aspp(high), size=(16, 16), mode="nearest"))
        ref = dec.classifier(dec.refine(torch.cat([up, dec.low_proj(low)], dim=1)))
        torch.testing.assert_close(dec(high, low), ref)


def test_deeplabv3plus_defaults_follow_paper():
    dec = DeepLabV3PlusDecoder(2048, 256, 21)
    assert dec.aspp.rates == (6, 12, 18) and dec.aspp.project[0].out_channels == 256
    assert dec.low_proj[0].out_channels == 48
    convs = [m for m in dec.refine if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(304, 256, (3, 3)), (256, 256, (3, 3))]
    assert dec.classifier.out_channels == 21 and dec.classifier.kernel_size == (1, 1)


def test_deeplabv3plus_overfits_fixed_batch():
    torch.manual_seed(0)
    dec = _small_decoder().train()
    high = torch.randn(2, 12, 4, 4)
    low = torch.randn(2, 6, 16, 16)
    target = torch.randint(0, 3, (2, 16, 16))
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss = F.cross_entropy(dec(high, low), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = F.cross_entropy(dec(high, low), target).item()
    assert final < 0.1 * losses[0], (losses[0], final)


# --------------------------------------------------------------------------- DINO head

OFFICIAL_KEYS = [
    "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
    "last_layer.weight_g", "last_layer.weight_v",
]


class _OfficialLayoutHead(nn.Module):
    """Reference with the release's module layout, using the (deprecated) old weight_norm."""

    def __init__(self, in_dim, out_dim, use_bn, nlayers, hidden_dim, bottleneck_dim):
        super().__init__()
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else [])
                layers += [nn.GELU()]
            self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weight_norm.*is deprecated", category=FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def test_dino_head_state_dict_keys_match_official():
    head = DINOHead(16, 32, nlayers=3, hidden_dim=24, bottleneck_dim=8)
    assert list(head.state_dict()) == OFFICIAL_KEYS
    assert head.state_dict()["last_layer.weight_g"].shape == (32, 1)
    assert head.state_dict()["last_layer.weight_v"].shape == (32, 8)
    for use_bn in (False, True):
        for nlayers in (1, 2, 3, 4):
            kw = {"use_bn": use_bn, "nlayers": nlayers, "hidden_dim": 24, "bottleneck_dim": 8}
            ours, ref = DINOHead(16, 32, **kw), _OfficialLayoutHead(16, 32, **kw)
            assert {k: v.shape for k, v in ours.state_dict().items()} == {
                k: v.shape for k, v in ref.state_dict().items()
            }, kw
            # same maths: official-layout weights give identical outputs
            ours.load_state_dict(ref.state_dict(), strict=True)
            x = torch.randn(5, 16)
            with torch.no_grad():
                torch.testing.assert_close(ours.eval()(x), ref.eval()(x))


def test_dino_head_init_and_frozen_weight_g():
    torch.manual_seed(0)
    head = DINOHead(64, 100, hidden_dim=256, bottleneck_dim=32)
    assert torch.equal(head.last_layer.weight_g, torch.ones(100, 1))
    assert not head.last_layer.weight_g.requires_grad and head.last_layer.weight_v.requires_grad
    for i in (0, 2, 4):
        lin = head.mlp[i]
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        assert abs(lin.weight.std().item() - 0.02) < 0.003
    head(torch.randn(4, 64)).sum().backward()
    assert head.last_layer.weight_g.grad is None and head.last_layer.weight_v.grad is not None
    free = DINOHead(64, 100, norm_last_layer=False, hidden_dim=256, bottleneck_dim=32)
    assert free.last_layer.weight_g.requires_grad


def _hand_state_dict(gen, in_dim=16, hidden=24, bottleneck=8, out_dim=32):
    shapes = {
        "mlp.0.weight": (hidden, in_dim), "mlp.0.bias": (hidden,),
        "mlp.2.weight": (hidden, hidden), "mlp.2.bias": (hidden,),
        "mlp.4.weight": (bottleneck, hidden), "mlp.4.bias": (bottleneck,),
        "last_layer.weight_g": (out_dim, 1), "last_layer.weight_v": (out_dim, bottleneck),
    }
    sd = {k: torch.randn(s, generator=gen) * 0.3 for k, s in shapes.items()}
    sd["last_layer.weight_g"] = sd["last_layer.weight_g"].abs() + 0.5
    return sd


def test_dino_head_forward_equals_direct_computation_and_round_trips():
    sd = _hand_state_dict(torch.Generator().manual_seed(0))
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    head.load_state_dict(sd, strict=True)
    out_sd = head.state_dict()
    assert list(out_sd) == OFFICIAL_KEYS and all(torch.equal(out_sd[k], sd[k]) for k in sd)
    x = torch.randn(7, 16)
    h = F.gelu(F.linear(x, sd["mlp.0.weight"], sd["mlp.0.bias"]))
    h = F.gelu(F.linear(h, sd["mlp.2.weight"], sd["mlp.2.bias"]))
    h = F.linear(h, sd["mlp.4.weight"], sd["mlp.4.bias"])
    g, v = sd["last_layer.weight_g"], sd["last_layer.weight_v"]
    ref = F.linear(F.normalize(h, dim=-1), g * v / v.norm(dim=1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(head(x), ref)
        torch.testing.assert_close(F.linear(F.normalize(head.mlp(x), dim=-1), head.last_layer.weight), ref)
    # leading dims are free (e.g. (batch, tokens, dim))
    assert head(torch.randn(2, 3, 16)).shape == (2, 3, 32)


def test_cancel_last_layer_gradients():
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "backbone": nn.Linear(10, 16),
        "head": DINOHead(16, 32, norm_last_layer=False, hidden_dim=24, bottleneck_dim=8),
    })

    def backward():
        model.zero_grad(set_to_none=True)
        model["head"](model["backbone"](torch.randn(4, 10))).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    grads = backward()
    assert len(grads) == len(list(model.parameters()))  # every parameter got a gradient
    last = {n for n in grads if "last_layer" in n}
    assert last == {"head.last_layer.weight_g", "head.last_layer.weight_v"}

    cancel_last_layer_gradients(model, epoch=0, freeze_last_layer_epochs=1)
    for n, p in model.named_parameters():
        if n in last:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads[n]), n

    grads = backward()
    cancel_last_layer_gradients(model, epoch=1, freeze_last_layer_epochs=1)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    cancel_last_layer_gradients(model, epoch=0, freeze_last_layer_epochs=0)  # 0 epochs: never frozen
    assert all(p.grad is not None for p in model.parameters())
