"""CAM head, multi-scale CAM inference and CAM -> label rules (labelwise.blocks.cam)."""

import pytest
import torch
import torch.nn.functional as F

from labelwise.blocks import CAMHead, cam_from_features, cam_seeds, cam_to_label, max_norm, multiscale_cam


def test_gap_logits_are_mean_of_cams_and_match_linear_classifier():
    torch.manual_seed(0)
    head = CAMHead(8, 3, pooling="gap", bias=True)
    f = torch.randn(2, 8, 5, 7)
    logits, cams = head(f)
    assert torch.allclose(logits, cams.mean(dim=(2, 3)), atol=1e-5)
    # CAM consistency: GAP then linear == linear then GAP
    linear = f.mean(dim=(2, 3)) @ head.weight.t() + head.classifier.bias
    assert torch.allclose(logits, linear, atol=1e-5)
    assert torch.allclose(cam_from_features(f, head.classifier.weight) + head.classifier.bias[:, None, None],
                          cams, atol=1e-5)


def test_gmp_and_gwrp_pooling():
    torch.manual_seed(0)
    f = torch.randn(2, 4, 6, 6)
    gmp = CAMHead(4, 3, pooling="gmp")
    logits, cams = gmp(f)
    assert torch.allclose(logits, cams.flatten(2).amax(-1))
    gw = CAMHead(4, 3, pooling="gwrp", gwrp_decay=0.5)
    gw.load_state_dict(gmp.state_dict())
    lg, _ = gw(f)
    mean = cams.flatten(2).mean(-1)
    # GWRP lies between mean and max, strictly for non-constant maps
    assert (lg < logits).all() and (lg > mean).all()
    # decay 1 -> GAP; decay 0 -> GMP
    gw.gwrp_decay = 1.0
    assert torch.allclose(gw(f)[0], mean, atol=1e-5)
    gw.gwrp_decay = 0.0
    assert torch.allclose(gw(f)[0], logits, atol=1e-6)


def test_cam_from_tokens():
    f = torch.randn(2, 10, 6)
    w = torch.randn(3, 6)
    out = cam_from_features(f, w, relu=True)
    assert out.shape == (2, 3, 10)
    assert torch.allclose(out, F.relu(torch.einsum("bnd,cd->bcn", f, w)))


def test_max_norm_per_class():
    cams = torch.zeros(1, 3, 4, 4)
    cams[0, 0, 1, 1] = 5.0
    cams[0, 1] = -1.0  # negative -> relu -> zero map stays zero
    cams[0, 2, 0, 0] = 0.2
    cams[0, 2, 3, 3] = 0.1
    n = max_norm(cams)
    assert n[0, 0].max() > 0.999 and n[0, 1].abs().max() == 0
    assert abs(n[0, 2, 3, 3].item() - 0.5) < 1e-3


def _blob_forward(images):
    """A fake CAM network: class 0 responds to the red channel, class 1 to the left half
    (asymmetric, so flipping must be undone). Output at stride 4."""
    red = images[:, :1]
    w = images.shape[-1]
    left = torch.zeros_like(red)
    left[..., : w // 2] = 1.0
    cams = torch.cat([red, left * images.mean(1, keepdim=True) - 0.1], dim=1)
    return F.avg_pool2d(cams, 4)


def test_multiscale_cam_batched_flip_and_normalised():
    img = torch.zeros(2, 3, 32, 48)
    img[0, 0, 4:12, 30:40] = 1.0  # red square right of centre in image 0
    img[1, 1:] = 1.0
    calls = []

    def fwd(x):
        calls.append(x.shape[0])
        return _blob_forward(x)

    cams = multiscale_cam(fwd, img, scales=(1.0, 0.5, 1.5), flip=True)
    assert cams.shape == (2, 2, 32, 48) and cams.dtype == torch.float32
    assert calls == [4, 4, 4]  # one batched forward (images + flips) per scale
    assert cams.min() >= 0 and cams.max() <= 1
    # red class peaks inside the square (flip undone), not at its mirror position
    r = cams[0, 0]
    assert r[4:12, 30:40].mean() > 0.5 and r[4:12, 8:18].mean() < 0.05
    # class 1 of image 1: the flipped branch responds on the right half in flipped coords
    # -> after un-flip both halves are covered ; its max is 1
    assert abs(cams[1, 1].max().item() - 1.0) < 1e-3
    big = multiscale_cam(fwd, img, scales=(1.0,), flip=False, out_size=(64, 96))
    assert big.shape[-2:] == (64, 96)


def test_cam_to_label_tags_and_keys():
    cams = torch.zeros(3, 2, 4)
    cams[0, 0, :] = torch.tensor([0.9, 0.6, 0.4, 0.1])
    cams[1, 0, :] = torch.tensor([0.2, 0.8, 0.3, 0.0])
    cams[2, 1, :] = 0.95  # class 3 present in the maps but not in the tags
    tags = torch.tensor([1, 1, 0])
    lab = cam_to_label(cams, tags, bg_threshold=0.5)
    assert lab.dtype == torch.uint8
    assert lab[0].tolist() == [1, 2, 0, 0]
    assert lab[1].tolist() == [0, 0, 0, 0]  # class 3 suppressed by tags
    # batched tags
    lab_b = cam_to_label(cams[None].repeat(2, 1, 1, 1), torch.tensor([[1, 1, 0], [0, 0, 1]]), 0.5)
    assert lab_b[1, 1].tolist() == [3, 3, 3, 3] and lab_b[1, 0].tolist() == [0, 0, 0, 0]
    # keys: channels of a seeds file are (class 7, class 2)
    seeds = cams[:2]
    lab_k = cam_to_label(seeds, keys=torch.tensor([7, 2]), bg_threshold=0.5)
    assert lab_k[0].tolist() == [7, 2, 0, 0]
    # no tag present -> all background
    assert cam_to_label(cams, torch.zeros(3), 0.5).max() == 0


def test_cam_seeds_uncertain_band():
    cams = torch.tensor([0.9, 0.7, 0.5, 0.25, 0.1]).reshape(1, 1, 5)
    seeds = cam_seeds(cams, high=0.7, low=0.25)
    # > high: class; low < v <= high: 255; <= low: background
    assert seeds[0].tolist() == [1, 255, 255, 0, 0]
    two = torch.stack([cams[0], cams[0].flip(-1)])  # class 2 strongest on the right
    seeds2 = cam_seeds(two, 0.7, 0.25, tags=torch.tensor([1, 1]))
    assert seeds2[0].tolist() == [1, 255, 255, 255, 2]
    assert cam_seeds(two, 0.7, 0.25, tags=torch.tensor([0, 1]))[0].tolist() == [0, 0, 255, 255, 2]


def test_multiscale_cam_grad_flag():
    conv = torch.nn.Conv2d(3, 2, 1)
    img = torch.rand(1, 3, 16, 16)
    assert not multiscale_cam(conv, img, scales=(1.0, 0.5)).requires_grad  # inference: no graph
    out = multiscale_cam(conv, img, scales=(1.0, 0.5), grad=True, normalize=False)
    out.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_multiscale_cam_flip_max_and_min_max_equal_the_release_computation():
    """ToCo / SeCo's multi_scale_cam: per scale max(cam, flip(cam(flip x))), ReLU, summed over
    scales, then (c - min) / (max - min + 1e-5) per image and class."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    img = torch.rand(2, 3, 16, 24, generator=g)
    got = multiscale_cam(conv, img, scales=(1.0, 0.5), flip=True, flip_reduce="max", norm="minmax")
    ref = torch.zeros(2, 2, 16, 24)
    with torch.no_grad():
        for s in (1.0, 0.5):
            x = img if s == 1.0 else F.interpolate(img, size=(round(16 * s), round(24 * s)), mode="bilinear",
                                                   align_corners=False)
            for b in range(2):
                a = F.interpolate(conv(x[b:b + 1]), size=(16, 24), mode="bilinear", align_corners=False)[0]
                f = F.interpolate(conv(x[b:b + 1].flip(-1)), size=(16, 24), mode="bilinear",
                                  align_corners=False)[0].flip(-1)
                ref[b] += torch.relu(torch.maximum(a, f))
    for b in range(2):
        for c in range(2):
            m = ref[b, c] - ref[b, c].min()
            ref[b, c] = m / (m.max() + 1e-5)
    assert torch.allclose(got, ref, atol=1e-5)
    assert float(got.amin(dim=(-2, -1)).max()) == 0.0  # every map's floor is 0 after min-max
    # the default (flip summed, max-normalised) differs from it and keeps a positive floor
    summed = multiscale_cam(conv, img, scales=(1.0, 0.5), flip=True)
    assert not torch.allclose(summed, got, atol=1e-3)
    with pytest.raises(ValueError, match="flip_reduce"):
        multiscale_cam(conv, img, flip_reduce="mean")
    with pytest.raises(ValueError, match="norm"):
        multiscale_cam(conv, img, norm="softmax")
