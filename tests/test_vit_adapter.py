"""ViT-Adapter multi-scale encoder (OAP Sec. 4.3): zero-initialised injectors keep the ViT exact."""

import pytest
import torch

from labelwise.errors import LabelwiseError
from labelwise.modeling.backbones import create_backbone
from labelwise.modeling.backbones.vit_adapter import (
    Injector,
    ViTAdapter,
    default_interaction_indexes,
)

# Tiny random ViTs (no downloads): patch 8 + class token (vit_tiny_test, 3 blocks), patch 16
# without class token (4 blocks -> 4 interactions), patch 16 with class token + 2 registers.
CONFIGS = {
    "p8_cls": dict(name="vit_tiny_test"),
    "p16_nocls": dict(name="vit_tiny_patch16_224", embed_dim=48, depth=4, num_heads=3, mlp_ratio=2.0,
                      img_size=64, class_token=False, global_pool="avg"),
    "p16_reg": dict(name="vit_tiny_patch16_224", embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0,
                    img_size=64, reg_tokens=2),
}


def _make(cfg="p8_cls", seed=0, **kw):
    torch.manual_seed(seed)
    c = dict(CONFIGS[cfg])
    vit = create_backbone(c.pop("name"), **c, **{k: v for k, v in kw.items() if k == "pad_input"})
    ad = ViTAdapter(vit, conv_inplanes=8, deform_num_heads=3, **{k: v for k, v in kw.items() if k != "pad_input"})
    return vit, ad


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("train", [False, True])
def test_zero_init_vit_path_equals_plain_backbone(cfg, train):
    vit, ad = _make(cfg)
    ad.train(train)
    assert all(float(m.gamma.detach().abs().max()) == 0.0 for m in ad.modules() if isinstance(m, Injector))
    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 96)
    out = ad(x)
    ref = vit(x, return_keys=True)
    assert torch.equal(out.keys, ref.keys)
    assert torch.equal(out.tokens, ref.tokens)
    if ref.cls is None:
        assert out.cls is None
    else:
        assert torch.equal(out.cls, ref.cls)


def test_nonzero_gamma_changes_keys_and_tokens():
    vit, ad = _make("p8_cls")
    ad.eval()
    x = torch.rand(2, 3, 48, 64)
    ref = vit(x, return_keys=True)
    with torch.no_grad():
        ad.interactions[0].injector.gamma.fill_(0.5)
    out = ad(x)
    assert not torch.allclose(out.keys, ref.keys, atol=1e-4)
    assert not torch.allclose(out.tokens, ref.tokens, atol=1e-4)
    # Only the last interaction's injector: its output still runs through the last block.
    with torch.no_grad():
        ad.interactions[0].injector.gamma.zero_()
        ad.interactions[-1].injector.gamma.fill_(0.5)
    assert not torch.allclose(ad(x).keys, ref.keys, atol=1e-4)


@pytest.mark.parametrize("cfg,size", [("p8_cls", (40, 72)), ("p16_nocls", (64, 96)), ("p16_reg", (80, 48))])
def test_output_shapes_and_strides_non_square(cfg, size):
    vit, ad = _make(cfg)
    ad.eval()
    H, W = size
    out = ad(torch.rand(2, 3, H, W))
    assert ad.strides == [4, 8, 16, 32] and ad.channels == [48] * 4
    assert len(out.features) == 4
    for f, s in zip(out.features, ad.strides):
        assert tuple(f.shape) == (2, 48, -(-H // s), -(-W // s))
        assert torch.isfinite(f).all()
    p = vit.patch_size
    assert tuple(out.keys.shape) == (2, H // p, W // p, 48)
    assert tuple(out.tokens.shape) == (2, 48, H // p, W // p)


def test_pad_input_matches_plain_backbone():
    vit, ad = _make("p8_cls", pad_input=True)
    ad.eval()
    x = torch.rand(1, 3, 45, 70)  # not multiples of 8: both pad to 48 x 72
    out = ad(x)
    ref = vit(x, return_keys=True)
    assert torch.equal(out.keys, ref.keys)
    assert tuple(out.keys.shape) == (1, 6, 9, 48)
    assert tuple(out.features[0].shape[-2:]) == (12, 18)
    _, strict = _make("p8_cls")
    with pytest.raises(LabelwiseError, match="multiple of the patch size"):
        strict(x)


def _loss(out, seed=2):
    # Random weights: a plain sum through train-mode BatchNorm has zero gradient.
    g = torch.Generator().manual_seed(seed)
    loss = sum((f.float() * torch.randn(f.shape, generator=g)).mean() for f in out.features)
    return loss + (out.keys.float() * torch.randn(out.keys.shape, generator=g)).mean()


def test_gamma_gets_gradient_at_init_and_all_adapter_params_after_optimiser_steps():
    _, ad = _make("p16_nocls")
    ad.train()
    x = torch.rand(2, 3, 64, 96)
    _loss(ad(x)).backward()
    for i, blk in enumerate(ad.interactions):
        assert blk.injector.gamma.grad.abs().sum() > 0, f"gamma {i} has no gradient at init"
        # With gamma == 0 the injector's attention does not reach the loss yet.
        assert blk.injector.attn.output_proj.weight.grad.abs().sum() == 0
    opt = torch.optim.SGD([p for _, p in ad.adapter_parameters()], lr=0.1)
    opt.step()  # gamma != 0: the injectors' attention now reaches the loss
    assert all(float(blk.injector.gamma.detach().abs().min()) > 0 for blk in ad.interactions)
    opt.zero_grad(set_to_none=True)
    _loss(ad(x)).backward()
    assert all(blk.injector.attn.output_proj.weight.grad.abs().sum() > 0 for blk in ad.interactions)
    # The injectors' query_norm is one link further: MSDeformAttn's query-dependent weights
    # (sampling_offsets / attention_weights) start at zero (Deformable DETR init) and only
    # become non-zero with this second step.
    opt.step()
    opt.zero_grad(set_to_none=True)
    _loss(ad(x)).backward()
    names = [n for n, _ in ad.adapter_parameters()]
    assert any(".injector." in n for n in names) and any("spm." in n for n in names) and "level_embed" in names
    dead = [n for n, p in ad.adapter_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
    assert not dead, f"no gradient: {dead}"


def test_bf16_autocast():
    vit, ad = _make("p8_cls")
    ad.train()
    x = torch.rand(2, 3, 48, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ad(x)
        ref = vit(x, return_keys=True)
        loss = _loss(out)
    assert torch.equal(out.keys, ref.keys)  # the zero injection does not change the dtype path
    assert all(torch.isfinite(f.float()).all() for f in out.features)
    assert [tuple(f.shape[-2:]) for f in out.features] == [(12, 16), (6, 8), (3, 4), (2, 2)]
    loss.backward()
    assert ad.interactions[0].injector.gamma.grad.abs().sum() > 0


def test_state_dict_keeps_vit_names_and_loads_official_weights(tmp_path):
    vit, ad = _make("p8_cls")
    sd = ad.state_dict()
    vit_keys = {k[len("vit."):] for k in sd if k.startswith("vit.")}
    assert vit_keys == set(vit.state_dict())
    assert "vit.model.blocks.2.attn.qkv.weight" in sd
    # Other weights (a different seed standing in for a pretrained checkpoint) load strictly into
    # adapter.vit, and at zero init the adapter then reproduces that backbone's keys.
    torch.manual_seed(123)
    other = create_backbone("vit_tiny_test")
    ad.vit.load_state_dict(other.state_dict(), strict=True)
    # ... and the timm-layout file a Backbone loads with weights=PATH works the same way.
    path = tmp_path / "vit.pth"
    torch.save(other.model.state_dict(), path)
    loaded = create_backbone("vit_tiny_test", weights=str(path))
    ad2 = ViTAdapter(loaded, conv_inplanes=8, deform_num_heads=3).eval()
    ad.eval()
    x = torch.rand(1, 3, 32, 48)
    ref = other(x, return_keys=True).keys
    assert torch.equal(ad(x).keys, ref)
    assert torch.equal(ad2(x).keys, ref)


def test_interaction_indexes_and_errors():
    assert default_interaction_indexes(12) == [[0, 2], [3, 5], [6, 8], [9, 11]]
    assert default_interaction_indexes(3) == [[0, 0], [1, 1], [2, 2]]
    _, ad = _make("p16_nocls")
    assert ad.interaction_indexes == [[0, 0], [1, 1], [2, 2], [3, 3]] and len(ad.interactions) == 4
    assert ad.interactions[-1].extra_extractor and not ad.interactions[0].extra_extractor
    vit, _ = _make("p16_nocls")
    ad2 = ViTAdapter(vit, interaction_indexes=[[0, 1], [2, 3]], conv_inplanes=8, deform_num_heads=3)
    assert len(ad2.interactions) == 2
    for bad in ([[0, 1], [3, 3]], [[0, 2]], [[1, 3]]):
        with pytest.raises(LabelwiseError, match="interaction_indexes"):
            ViTAdapter(vit, interaction_indexes=bad, conv_inplanes=8, deform_num_heads=3)
    with pytest.raises(LabelwiseError, match="divisible"):
        ViTAdapter(vit, deform_num_heads=5)
    with pytest.raises(LabelwiseError, match="ViT backbone"):
        ViTAdapter(torch.nn.Linear(2, 2))
