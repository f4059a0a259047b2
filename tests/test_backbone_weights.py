"""Weight loading: official DINO / DeiT / torchvision / ConvNeXt layouts, pos-embed resizing, errors."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
import torch.nn.functional as F

from labelwise.errors import LabelwiseError
from labelwise.modeling.backbones import create_backbone, create_classifier


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            if name.endswith("running_var"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _vit(seed=0, **kw):
    kw.setdefault("depth", 2)
    return _randomize(create_backbone("vit_tiny_test", **kw).eval(), seed)


def _same_outputs(a, b, x):
    with torch.no_grad():
        oa, ob = a(x, return_keys=True), b(x, return_keys=True)
    torch.testing.assert_close(oa.tokens, ob.tokens)
    torch.testing.assert_close(oa.keys, ob.keys)


def test_official_dino_full_checkpoint(tmp_path):
    src = _vit(1)
    sd = src.model.state_dict()
    assert "blocks.0.attn.qkv.weight" in sd and "cls_token" in sd and "pos_embed" in sd  # DINO's names
    ckpt = {
        "teacher": {**{"backbone." + k: v for k, v in sd.items()},
                    "head.mlp.0.weight": torch.randn(64, 48), "head.last_layer.weight_g": torch.ones(10, 1)},
        "student": {"module.backbone." + k: torch.randn_like(v) for k, v in sd.items()},
        "optimizer": {"state": {}}, "epoch": 100, "args": argparse.Namespace(arch="vit_small"),
    }
    path = tmp_path / "dino_deitsmall8_full_checkpoint.pth"
    torch.save(ckpt, path)
    dst = create_backbone("vit_tiny_test", depth=2, weights=str(path)).eval()
    _same_outputs(src, dst, torch.randn(1, 3, 32, 40))  # teacher weights, not the student's
    # the plain released file (dino_vits8_pretrain.pth style) is the bare state dict
    torch.save(sd, tmp_path / "dino_pretrain.pth")
    _same_outputs(src, create_backbone("vit_tiny_test", depth=2, weights=str(tmp_path / "dino_pretrain.pth")).eval(),
                  torch.randn(1, 3, 24, 24))


def test_deit_checkpoint_with_head_and_classifier(tmp_path):
    src = _vit(2)
    head_w, head_b = torch.randn(1000, 48), torch.randn(1000)
    sd = {**src.model.state_dict(), "head.weight": head_w, "head.bias": head_b}
    torch.save({"model": sd, "optimizer": {}, "epoch": 299}, tmp_path / "deit.pth")
    dst = create_backbone("vit_tiny_test", depth=2, weights=str(tmp_path / "deit.pth")).eval()
    _same_outputs(src, dst, torch.randn(2, 3, 32, 32))
    clf = create_classifier("vit_tiny_test", depth=2, pretrained=False, weights=str(tmp_path / "deit.pth")).eval()
    assert torch.equal(clf.head.weight, head_w) and torch.equal(clf.head.bias, head_b)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), F.linear(src.model(x), head_w, head_b))  # pooled CLS -> head


def test_pos_embed_resized_to_model_grid(tmp_path):
    src = _vit(3)  # 64 px, patch 8 -> 8x8 grid
    torch.save(src.model.state_dict(), tmp_path / "w.pth")
    dst = create_backbone("vit_tiny_test", depth=2, img_size=96, weights=str(tmp_path / "w.pth"))
    pe_src, pe_dst = src.model.pos_embed, dst.model.pos_embed
    assert pe_dst.shape == (1, 1 + 12 * 12, 48)
    assert torch.equal(pe_dst[:, :1], pe_src[:, :1])  # class-token entry untouched
    grid = pe_src[:, 1:].reshape(1, 8, 8, 48).permute(0, 3, 1, 2)
    # bicubic with antialias=True, as timm resamples at every forward
    ref = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(pe_dst[:, 1:], ref.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-5)
    # everything else loaded as is
    assert torch.equal(dst.model.blocks[1].attn.qkv.weight, src.model.blocks[1].attn.qkv.weight)


def test_mismatch_error_is_one_line_with_counts(tmp_path):
    src = _vit(4, depth=3)
    torch.save(src.model.state_dict(), tmp_path / "deep.pth")
    n_block = sum(k.startswith("blocks.2.") for k in src.model.state_dict())
    with pytest.raises(LabelwiseError) as e:
        create_backbone("vit_tiny_test", depth=2, weights=str(tmp_path / "deep.pth"))
    msg = str(e.value)
    assert "\n" not in msg and "deep.pth" in msg
    assert f"{n_block} unexpected keys (blocks.2." in msg
    torch.save(_vit(5, depth=1).model.state_dict(), tmp_path / "shallow.pth")
    with pytest.raises(LabelwiseError, match=rf"{n_block} missing keys \(blocks\.1\."):
        create_backbone("vit_tiny_test", depth=2, weights=str(tmp_path / "shallow.pth"))
    torch.save(_vit(6, embed_dim=24, num_heads=2).model.state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(LabelwiseError, match="shape mismatches"):
        create_backbone("vit_tiny_test", depth=2, weights=str(tmp_path / "narrow.pth"))
    with pytest.raises(LabelwiseError, match="not found"):
        create_backbone("vit_tiny_test", weights=str(tmp_path / "nope.pth"))


def test_torchvision_resnet_layout(tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    tv = _randomize(tvm.resnet18(), 7).eval()
    torch.save(tv.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    bb = create_backbone("resnet18", weights=str(tmp_path / "resnet18-f37072fd.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(bb.normalize(x)))))
        l1 = tv.layer1(h)
        l4 = tv.layer4(tv.layer3(tv.layer2(l1)))
        out = bb(x)
    torch.testing.assert_close(out.features[0], l1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.tokens, l4, rtol=1e-4, atol=1e-4)
    clf = create_classifier("resnet18", pretrained=False, weights=str(tmp_path / "resnet18-f37072fd.pth")).eval()
    with torch.no_grad():
        torch.testing.assert_close(clf(x), tv(x), rtol=1e-4, atol=1e-4)


SMALL_CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40))


def test_torchvision_convnext_layout(tmp_path):
    cnx = pytest.importorskip("torchvision.models.convnext")
    cfg = [cnx.CNBlockConfig(16, 24, 1), cnx.CNBlockConfig(24, 32, 1), cnx.CNBlockConfig(32, 40, 2),
           cnx.CNBlockConfig(40, None, 1)]
    tv = _randomize(cnx.ConvNeXt(cfg, num_classes=10), 8).eval()
    torch.save(tv.state_dict(), tmp_path / "convnext_tv.pth")
    clf = create_classifier("convnext_tiny", pretrained=False, weights=str(tmp_path / "convnext_tv.pth"),
                            num_classes=10, **SMALL_CONVNEXT).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), tv(x), rtol=1e-4, atol=1e-4)
        bb = create_backbone("convnext_tiny", weights=str(tmp_path / "convnext_tv.pth"), **SMALL_CONVNEXT).eval()
        torch.testing.assert_close(bb(x).tokens, tv.features(bb.normalize(x)), rtol=1e-4, atol=1e-4)


def _to_official_convnext(sd):
    """Rename a timm ConvNeXt state dict the way facebookresearch/ConvNeXt names its checkpoints."""
    out = {}
    for k, v in sd.items():
        if k.startswith("stem."):
            k = "downsample_layers.0." + k[len("stem."):]
        elif (m := re.match(r"stages\.(\d+)\.downsample\.(.+)", k)):
            k = f"downsample_layers.{m[1]}.{m[2]}"
        elif (m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", k)):
            rest = m[3].replace("conv_dw.", "dwconv.").replace("mlp.fc1.", "pwconv1.").replace("mlp.fc2.", "pwconv2.")
            k = f"stages.{m[1]}.{m[2]}.{rest}"
        elif k.startswith("head.norm."):
            k = "norm." + k[len("head.norm."):]
        elif k.startswith("head.fc."):
            k = "head." + k[len("head.fc."):]
        out[k] = v
    return out


def test_official_convnext_layout(tmp_path):
    src = _randomize(create_classifier("convnext_tiny", pretrained=False, num_classes=7, **SMALL_CONVNEXT), 9).eval()
    official = _to_official_convnext(src.state_dict())
    assert "downsample_layers.0.0.weight" in official and "stages.2.1.pwconv1.weight" in official
    torch.save({"model": official}, tmp_path / "convnext_tiny_1k_224.pth")
    dst = create_classifier("convnext_tiny", pretrained=False, weights=str(tmp_path / "convnext_tiny_1k_224.pth"),
                            num_classes=7, **SMALL_CONVNEXT).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_pretrained_needs_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # offline and not cached: one line naming the key to set and the file it expects
    with pytest.raises(LabelwiseError, match="could not be downloaded .* set model.weights=PATH"):
        create_backbone("vit_tiny_test", depth=2, pretrained=True)
    with pytest.raises(LabelwiseError, match="set model.vit_weights=PATH to a local file: DeiT's deit_small"):
        create_backbone("deit_small_patch16", depth=1, pretrained=True, weights_key="model.vit_weights")
    with pytest.raises(LabelwiseError, match="Invalid pretrained tag"):
        create_backbone("vit_tiny_patch16_224.nosuchtag", depth=1)
    # a file in the Hugging Face cache layout is found and loaded, no network involved
    from safetensors.torch import save_file

    src = _vit(10)
    repo = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(snap / "model.safetensors"))
    dst = create_backbone("vit_tiny_test", depth=2, pretrained=True).eval()
    _same_outputs(src, dst, torch.randn(1, 3, 32, 32))
