"""Backbone wrapper: hooks (attention, keys, blocks), shapes, strides, input sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labelwise.errors import LabelwiseError
from labelwise.modeling.backbones import create_backbone, resolve_name


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_backbone("vit_tiny_test", depth=4).eval()


def _manual_tokens(bb, x):
    """Token sequences entering each block and leaving the last one, by hand (timm sees the
    normalised input: the wrapper takes [0, 1] images and applies the backbone's mean/std)."""
    m = bb.model
    t = m.norm_pre(m._pos_embed(m.patch_embed(bb.normalize(x))))
    ins = []
    for blk in m.blocks:
        ins.append(t)
        t = blk(t)
    return ins, t


def _manual_attention(blk, t):
    a = blk.attn
    B, N, D = t.shape
    qkv = F.linear(blk.norm1(t), a.qkv.weight, a.qkv.bias).reshape(B, N, 3, a.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
    return attn, v


def test_attention_is_the_one_the_block_uses(vit):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        out = vit(x, return_attn=True)
        ins, _ = _manual_tokens(vit, x)
    n_tok = 1 + (40 // 8) * (56 // 8)
    assert len(out.attn) == vit.depth
    for i, (a, t, blk) in enumerate(zip(out.attn, ins, vit.model.blocks)):
        assert a.shape == (2, vit.num_heads, n_tok, n_tok)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, vit.num_heads, n_tok))
        ref, v = _manual_attention(blk, t)
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)
        # the returned attention reproduces the block output (timm ran its fused kernel)
        with torch.no_grad():
            y = t + blk.ls1(blk.attn.proj((a @ v).transpose(1, 2).reshape(t.shape)))
            y = y + blk.ls2(blk.mlp(blk.norm2(y)))
            torch.testing.assert_close(y, blk(t), rtol=1e-4, atol=1e-5)
    # a subset of layers, negative index, head averaging
    with torch.no_grad():
        sub = vit(x, return_attn=True, attn_layers=[-1, 1], average_heads=True)
    assert len(sub.attn) == 2 and sub.attn[0].shape == (2, 1, n_tok, n_tok)
    torch.testing.assert_close(sub.attn[0], out.attn[1].mean(1, keepdim=True))
    torch.testing.assert_close(sub.attn[1], out.attn[-1].mean(1, keepdim=True))


def test_keys_equal_qkv_key_part(vit):
    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        out = vit(x, return_keys=True)
        ins, _ = _manual_tokens(vit, x)
        blk = vit.model.blocks[-1]
        qkv = F.linear(blk.norm1(ins[-1]), blk.attn.qkv.weight, blk.attn.qkv.bias)
    D = vit.embed_dim
    ref = qkv[:, 1:, D:2 * D].reshape(1, 4, 6, D)
    assert out.keys.shape == (1, 4, 6, D)
    torch.testing.assert_close(out.keys, ref)
    # head h occupies channels [h*hd, (h+1)*hd): compare against the per-head reshape
    hd = D // vit.num_heads
    k_heads = qkv.reshape(1, -1, 3, vit.num_heads, hd)[:, 1:, 1]  # B, N, heads, hd
    torch.testing.assert_close(out.keys[..., hd:2 * hd].reshape(1, -1, hd), k_heads[:, :, 1])


def test_hooks_do_not_change_outputs_and_are_removed(vit):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        plain = vit(x)
        hooked = vit(x, return_attn=True, return_keys=True, return_blocks=(-3, 1))
        ref = vit.model.forward_features(vit.normalize(x))  # timm's own path
    assert torch.equal(plain.tokens, hooked.tokens)
    assert torch.equal(plain.cls, hooked.cls)
    torch.testing.assert_close(plain.tokens, ref[:, 1:].transpose(1, 2).reshape(2, -1, 6, 4))
    torch.testing.assert_close(plain.cls, ref[:, 0])
    for blk in vit.model.blocks:
        assert not blk.attn.qkv._forward_hooks
    assert plain.attn == [] and plain.keys is None and plain.blocks == {}


def test_blocks_equal_manual_forward(vit):
    torch.manual_seed(4)
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        out = vit(x, return_blocks=(-3, 0, -1))
        ins, last = _manual_tokens(vit, x)
    grid = lambda t: t[:, 1:].transpose(1, 2).reshape(1, vit.embed_dim, 3, 5)  # noqa: E731
    assert set(out.blocks) == {-3, 0, -1}
    torch.testing.assert_close(out.blocks[-3], grid(ins[vit.depth - 2]))  # output of block depth-3
    torch.testing.assert_close(out.blocks[0], grid(ins[1]))
    torch.testing.assert_close(out.blocks[-1], grid(last))  # pre-norm
    assert not torch.allclose(out.blocks[-1], out.tokens)  # tokens are after the final norm
    with pytest.raises(LabelwiseError, match="out of range"):
        vit(x, return_blocks=(vit.depth,))


@pytest.mark.parametrize("patch", [8, 14, 16])
def test_vit_shapes_non_square(patch):
    torch.manual_seed(5)
    bb = create_backbone("vit_tiny_test", patch_size=patch, depth=2, img_size=4 * patch).eval()
    H, W = 3 * patch, 5 * patch
    with torch.no_grad():
        out = bb(torch.randn(2, 3, H, W), return_attn=True, return_keys=True, return_blocks=(-2,))
    assert bb.is_vit and bb.patch_size == patch and bb.strides == [4, 8, 16, 32]
    assert out.tokens.shape == (2, 48, 3, 5)
    assert out.keys.shape == (2, 3, 5, 48)
    assert out.blocks[-2].shape == (2, 48, 3, 5)
    assert [a.shape for a in out.attn] == [(2, 3, 16, 16)] * 2
    for f, s in zip(out.features, bb.strides):
        assert f.shape == (2, 48, -(-H // s), -(-W // s))
    # the pyramid level at the patch stride is the token grid itself
    if patch in bb.strides:
        assert torch.equal(out.features[bb.strides.index(patch)], out.tokens)
    # coarser levels: adaptive average pooling of the grid; finer: bilinear upsampling
    for f, s in zip(out.features, bb.strides):
        if s > patch:
            torch.testing.assert_close(f, F.adaptive_avg_pool2d(out.tokens, f.shape[-2:]))
        elif s < patch:
            torch.testing.assert_close(f, F.interpolate(out.tokens, size=f.shape[-2:], mode="bilinear"))


def test_dinov2_style_patch14_alias():
    bb = create_backbone("vit_small_patch14", depth=1, img_size=56).eval()
    assert resolve_name("vit_small_patch14").timm_name.startswith("vit_small_patch14_dinov2")
    assert bb.patch_size == 14 and bb.num_heads == 6 and bb.embed_dim == 384
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 42, 70), return_keys=True, return_attn=True)
    assert out.tokens.shape == (1, 384, 3, 5) and out.keys.shape == (1, 3, 5, 384)
    torch.testing.assert_close(out.attn[0].sum(-1), torch.ones(1, 6, 16))


def test_input_not_multiple_of_patch(vit):
    x = torch.randn(1, 3, 30, 41)
    with pytest.raises(LabelwiseError, match="multiple of the patch size 8"):
        vit(x)
    padded = create_backbone("vit_tiny_test", depth=4, pad_input=True).eval()
    padded.load_state_dict(vit.state_dict())
    with torch.no_grad():
        out = padded(x)
        # the wrapper pads the *normalised* input with 0, i.e. the image with the mean colour
        mean = vit.pixel_mean
        ref = vit(F.pad(x - mean, (0, 7, 0, 2)) + mean)
    assert out.tokens.shape[-2:] == (4, 6)
    torch.testing.assert_close(out.tokens, ref.tokens)


def test_cnn_strides_channels_and_keys():
    torch.manual_seed(6)
    bb = create_backbone("resnet18").eval()
    assert not bb.is_vit and bb.strides == [4, 8, 16, 32] and bb.channels == [64, 128, 256, 512]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = bb(x, return_keys=True, return_blocks=(0, -1))
        m = bb.model
        l1 = m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(bb.normalize(x))))))
    for f, c, s in zip(out.features, bb.channels, bb.strides):
        assert f.shape == (1, c, 64 // s, 96 // s)
    torch.testing.assert_close(out.features[0], l1)
    assert out.blocks[0].shape == (1, 64, 32, 48)  # stem stage, stride 2
    assert torch.equal(out.tokens, out.features[-1]) and out.cls is None
    torch.testing.assert_close(out.keys, out.tokens.permute(0, 2, 3, 1))
    with pytest.raises(LabelwiseError, match="CNN"):
        bb(x, return_attn=True)
    # odd sizes work for CNNs (no patch constraint)
    with torch.no_grad():
        odd = bb(torch.randn(1, 3, 50, 70))
    assert odd.features[0].shape[-2:] == (13, 18)


def test_unknown_backbone_names_closest():
    with pytest.raises(LabelwiseError, match="did you mean"):
        create_backbone("dino_vits9")


def test_aliases_resolve_to_timm_models():
    import timm

    from labelwise.modeling.backbones import ALIASES

    for alias in ("vit_small_patch16", "vit_base_patch16", "vit_small_patch8", "vit_base_patch8", "dino_vits8",
                  "dino_vits16", "dino_vitb8", "dino_vitb16", "deit_small_patch16", "vit_small_patch14",
                  "resnet50", "resnet101", "resnet152", "convnext_tiny", "efficientnet_lite0"):
        assert alias in ALIASES
        assert timm.is_model(ALIASES[alias].timm_name.split(".")[0]), alias
    assert ALIASES["efficientnet_lite0"].timm_name == "tf_efficientnet_lite0"
    assert resolve_name("vit_small_patch16_224").timm_name == "vit_small_patch16_224"


@pytest.mark.parametrize("name,kw", [("efficientnet_lite0", {}), ("resnet18", {}),
                                     ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)))])
def test_cnn_features_match_declared_strides_and_channels(name, kw):
    # Guards the timm floor: timm 1.0.3-1.0.15 returned ConvNeXt's stem instead of its last stage.
    torch.manual_seed(0)
    bb = create_backbone(name, **kw).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out = bb(x)
    assert [(f.shape[1], 64 // f.shape[2]) for f in out.features] == list(zip(bb.channels, bb.strides))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_strides_build_only_the_layers_used(name):
    torch.manual_seed(0)
    full = create_backbone(name).eval()
    torch.manual_seed(0)
    pruned = create_backbone(name, strides=(8, 16)).eval()
    assert pruned.strides == [8, 16] and pruned.channels == full.channels[1:3]
    n_full = sum(p.numel() for p in full.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    assert n_pruned < n_full
    # the kept parameters keep their upstream names and values
    sd = full.state_dict()
    assert all(k in sd and torch.equal(v, sd[k]) for k, v in pruned.state_dict().items())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = full(x), pruned(x)
    torch.testing.assert_close(b.features[0], a.features[1])
    torch.testing.assert_close(b.features[1], a.features[2])
    assert torch.equal(b.tokens, b.features[-1]) and pruned.embed_dim == full.channels[2]
    # every parameter takes part in a loss on the kept features (what DDP needs)
    pruned.train()
    loss = sum(f.square().mean() for f in pruned(x).features)
    loss.backward()
    assert all(p.grad is not None for p in pruned.parameters())
    with pytest.raises(LabelwiseError, match="no feature level at stride"):
        create_backbone(name, strides=(64,))


def test_backbone_normalises_its_own_input():
    bb = create_backbone("efficientnet_lite0").eval()
    assert bb.mean == (0.5, 0.5, 0.5) and "pixel_mean" not in bb.state_dict()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        final, _ = bb.model.forward_intermediates((x - 0.5) / 0.5, indices=[4])
        torch.testing.assert_close(bb(x).tokens, final)
    vit = create_backbone("dino_vits16", depth=1)
    assert vit.mean == (0.485, 0.456, 0.406) and torch.allclose(vit.pixel_std.flatten(), torch.tensor(vit.std))
