"""SeCo image decomposition (Sec. 3.3): ROI map, crop boxes, tags, crops, key-view augmentation."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from labelwise.methods.seco.decompose import (
    adjust_hue,
    crop_tags,
    extract_crops,
    extract_crops_2d,
    gaussian_blur,
    global_tags,
    hsv_to_rgb,
    rgb_to_hsv,
    roi_mask,
    sample_crop_boxes,
    strong_augment,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ roi_mask

def test_roi_mask_thresholds_absent_classes_and_padding():
    cams = torch.zeros(1, 3, 2, 4)
    cams[0, 0, 0] = torch.tensor([0.9, 0.7, 0.5, 0.25])     # class 1: >high, =high, mid, =low
    cams[0, 1, 1] = torch.tensor([0.1, 0.8, 0.3, 0.2])      # class 2
    cams[0, 2] = 0.99                                       # class 3: absent from the tags
    tags = torch.tensor([[1.0, 1.0, 0.0]])
    valid = torch.ones(1, 2, 4, dtype=torch.bool)
    valid[0, 1, 3] = False
    roi = roi_mask(cams, tags, valid, high=0.7, low=0.25)
    assert roi.dtype == torch.int64
    assert roi[0].tolist() == [[1, -1, -1, 0], [0, 2, -1, 255]]
    # the absent class would win everywhere if it were not zeroed
    assert roi_mask(cams, torch.ones(1, 3), None).eq(3).all()


# ------------------------------------------------------------------ tags: the phi rule

def _box(x0, y0, s):
    return [x0, y0, x0 + s, y0 + s]


def test_crop_tags_phi_rule_constructed():
    # 2 images of 20 x 40, crops 10 x 10 at x = 0, 10, 20, 30 (four 10x10 quadrants of the top half)
    roi = torch.zeros(2, 20, 40, dtype=torch.long)
    roi[0, 0, 0:10] = 2                  # crop A: 10 % class 2 -> background with phi 0.2
    roi[0, 0:5, 10:20] = 3               # crop B: 50 % class 3 -> 3
    roi[0, 0:3, 20:30] = 1               # crop C: 30 % class 1 + 30 % class 2 -> -1
    roi[0, 3:6, 20:30] = 2
    roi[0, 0:5, 30:40] = -1              # crop D: only uncertain (50 %) -> -1 (image has 3 classes: no fill)
    roi[1, 0:5, 0:10] = -1               # image 1: single confident class 4, crop A' only uncertain
    roi[1, 10:20, 0:10] = 4
    roi[1, 0:10, 10:16] = 255            # crop B': 60 padding pixels; 16 of the 40 valid ones class 4:
    roi[1, 0:4, 16:20] = 4               # 16/40 = 0.4 > phi, while 16/100 would be <= phi
    roi[1, 0:10, 20:30] = 255            # crop C': all padding
    boxes = torch.tensor([[_box(0, 0, 10), _box(10, 0, 10), _box(20, 0, 10), _box(30, 0, 10)]] * 2)
    t = crop_tags(roi, boxes, num_classes=5, phi=0.2, fill_single_class=False)
    assert t[0].tolist() == [0, 3, -1, -1]
    assert t[1, 0] == -1                 # only uncertain, no fill
    assert t[1, 1] == 4                  # the fraction is over the valid pixels
    assert t[1, 2] == -1                 # no valid pixel
    # 10 % vs phi: a lower phi makes crop A a class-2 crop
    assert crop_tags(roi, boxes, 5, phi=0.05, fill_single_class=False)[0, 0] == 2
    # fill_single_class: the only-uncertain crop of the single-class image becomes class 4,
    # the multi-class image keeps -1
    tf = crop_tags(roi, boxes, 5, phi=0.2, fill_single_class=True)
    assert tf[1, 0] == 4 and tf[0, 3] == -1 and tf[0].tolist() == t[0].tolist()
    # image_classes overrides the single class (ids or multi-hot)
    assert crop_tags(roi, boxes, 5, image_classes=torch.tensor([-1, 2]))[1, 0] == 2
    hot = torch.zeros(2, 4)
    hot[0, 0] = hot[0, 1] = 1
    hot[1, 0] = 1
    assert crop_tags(roi, boxes, 5, image_classes=hot)[1, 0] == 1
    assert crop_tags(roi, boxes, 5, image_classes=hot)[0, 3] == -1


def test_global_tags():
    roi = torch.zeros(3, 6, 6, dtype=torch.long)
    roi[0, :2] = 3
    roi[0, 2:4] = -1
    roi[0, 5] = 255
    roi[1, :2] = 3
    roi[1, 3] = 1
    roi[2, :2] = -1                      # no confident class -> -1 (release: 1)
    assert global_tags(roi).tolist() == [3, -1, -1]


def _reference_tags(roi, boxes, phi, fill):
    out = []
    for b in range(roi.shape[0]):
        conf_img = {int(v) for v in roi[b].unique() if 0 < v < 255}
        single = next(iter(conf_img)) if len(conf_img) == 1 else None
        row = []
        for x0, y0, x1, y1 in boxes[b].tolist():
            m = roi[b, y0:y1, x0:x1].flatten().tolist()
            valid = [v for v in m if v != 255]
            if not valid:
                row.append(-1)
                continue
            target = sum(1 for v in valid if v != 0)
            if target / len(valid) <= phi:
                row.append(0)
                continue
            cls = {v for v in valid if v > 0}
            if fill and single is not None and -1 in valid:
                cls.add(single)
            row.append(next(iter(cls)) if len(cls) == 1 else -1)
        out.append(row)
    return out


@pytest.mark.parametrize("fill", [False, True])
def test_crop_tags_match_per_crop_reference(fill):
    g = _gen(3)
    B, K, H, W, n = 3, 5, 40, 48, 7
    # blocky random maps so that every tag kind occurs: image 0 single-class, 1 and 2 mixed
    values = torch.tensor([0, -1] + list(range(1, K + 1)))
    probs = torch.tensor([0.55, 0.2] + [0.25 / K] * K)
    low = values[torch.multinomial(probs, B * 30, replacement=True, generator=g)].view(B, 5, 6)
    low[0] = torch.where(low[0] > 0, 2, low[0])         # image 0: a single confident class
    low[0, 0, 0] = 2
    low[1, :, :2] = 255                                 # image 1: padding on the left
    roi = F.interpolate(low[:, None].float(), size=(H, W), mode="nearest")[:, 0].long()
    noise = torch.randint(-1, K + 1, (B, H, W), generator=g)
    noise[:2] = noise[:2].clamp(max=0)                  # pixel noise: classes only in image 2
    roi = torch.where((torch.rand(B, H, W, generator=g) < 0.05) & (roi != 255), noise, roi)
    changed = False
    tags_all = []
    for s in (6, 12, 17):
        x0 = torch.randint(0, W - s + 1, (B, n), generator=g)
        y0 = torch.randint(0, H - s + 1, (B, n), generator=g)
        boxes = torch.stack([x0, y0, x0 + s, y0 + s], -1)
        got = crop_tags(roi, boxes, num_classes=K + 1, phi=0.2, fill_single_class=fill)
        assert got.tolist() == _reference_tags(roi, boxes, 0.2, fill)
        tags_all += got.flatten().tolist()
        changed |= not torch.equal(got, crop_tags(roi, boxes, K + 1, phi=0.2, fill_single_class=not fill))
    assert {0, -1} <= set(tags_all) and any(t > 0 for t in tags_all)
    assert changed                                      # the fill rule matters on these maps


# ------------------------------------------------------------------ crop boxes

def _centres(boxes, crop):
    return boxes[..., 0] + crop // 2, boxes[..., 1] + crop // 2


def test_boxes_inside_and_on_distinct_uncertain_pixels():
    B, H, W, n, crop = 2, 30, 36, 10, 8
    roi = torch.zeros(B, H, W, dtype=torch.long)
    roi[0, 5:25, 3:9] = -1               # partly too close to the left border
    roi[1, 0:2, :] = -1                  # too close to the top border: none of these fit
    roi[1, 10:14, 10:14] = -1            # 16 that fit
    boxes = sample_crop_boxes(roi, n, crop, generator=_gen(1))
    assert boxes.shape == (B, n, 4) and boxes.dtype == torch.int64
    assert (boxes[..., 2] - boxes[..., 0] == crop).all() and (boxes[..., 3] - boxes[..., 1] == crop).all()
    assert (boxes[..., :2] >= 0).all() and (boxes[..., 2] <= W).all() and (boxes[..., 3] <= H).all()
    cx, cy = _centres(boxes, crop)
    for b in range(B):
        assert (roi[b, cy[b], cx[b]] == -1).all()
        assert len({(int(x), int(y)) for x, y in zip(cx[b], cy[b])}) == n


def test_boxes_take_all_uncertain_when_exactly_n():
    roi = torch.zeros(1, 20, 20, dtype=torch.long)
    pts = [(5, 5), (6, 9), (12, 7), (14, 14)]
    for y, x in pts:
        roi[0, y, x] = -1
    boxes = sample_crop_boxes(roi, 4, 6, generator=_gen(2))
    cx, cy = _centres(boxes, 6)
    assert {(int(y), int(x)) for x, y in zip(cx[0], cy[0])} == set(pts)


def test_boxes_fallback_with_few_uncertain_pixels():
    B, H, W, n, crop = 3, 24, 24, 6, 8
    roi = torch.zeros(B, H, W, dtype=torch.long)
    roi[:, 10, 10] = -1                  # 1 uncertain pixel < n
    roi[1, :, 12:] = 255                 # image 1: right half padding -> centres stay inside
    roi[2] = 255                         # image 2: all padding -> any fitting centre
    roi[2, 4, 4] = 0
    for seed in range(5):
        boxes = sample_crop_boxes(roi, n, crop, generator=_gen(seed))
        assert (boxes[..., :2] >= 0).all() and (boxes[..., 2:] <= H).all()
        cx, cy = _centres(boxes, crop)
        assert (roi[1, cy[1], cx[1]] != 255).all()
        for b in range(B):
            assert len({(int(x), int(y)) for x, y in zip(cx[b], cy[b])}) == n
    # the fallback does not keep to the uncertain pixel: with 6 of ~289 candidates it is rarely picked
    hits = sum(bool(((_centres(sample_crop_boxes(roi, n, crop, generator=_gen(s)), crop)[0][0] == 10)).any())
               for s in range(20))
    assert hits < 20
    with pytest.raises(ValueError):
        sample_crop_boxes(roi, n, 25)
    with pytest.raises(ValueError):
        sample_crop_boxes(torch.zeros(1, 8, 8, dtype=torch.long), 2, 8)   # one position only


def test_boxes_reproducible_and_global_rng_untouched():
    roi = torch.full((2, 32, 32), -1, dtype=torch.long)
    state = torch.get_rng_state()
    a = sample_crop_boxes(roi, 5, 8, generator=_gen(7))
    b = sample_crop_boxes(roi, 5, 8, generator=_gen(7))
    c = sample_crop_boxes(roi, 5, 8, generator=_gen(8))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = sample_crop_boxes(roi, 5, 8)
    torch.manual_seed(0)
    assert torch.equal(d, sample_crop_boxes(roi, 5, 8))


# ------------------------------------------------------------------ crops

def test_extract_crops_equals_slicing_and_resize():
    g = _gen(4)
    B, C, H, W, n, s = 2, 3, 20, 25, 4, 7
    img = torch.rand(B, C, H, W, generator=g)
    x0 = torch.randint(0, W - s + 1, (B, n), generator=g)
    y0 = torch.randint(0, H - s + 1, (B, n), generator=g)
    boxes = torch.stack([x0, y0, x0 + s, y0 + s], -1)
    crops = extract_crops(img, boxes)
    ref = torch.stack([img[b, :, y0[b, i]:y0[b, i] + s, x0[b, i]:x0[b, i] + s] for b in range(B) for i in range(n)])
    assert crops.shape == (B * n, C, s, s) and torch.equal(crops, ref)
    assert torch.equal(extract_crops(img, boxes, out_size=s, crop_size=s), ref)
    up = extract_crops(img, boxes, out_size=11, crop_size=s)
    assert torch.allclose(up, F.interpolate(ref, size=(11, 11), mode="bilinear", align_corners=False))
    lab = torch.randint(-1, 5, (B, H, W), generator=g)
    ref2 = torch.stack([lab[b, y0[b, i]:y0[b, i] + s, x0[b, i]:x0[b, i] + s] for b in range(B) for i in range(n)])
    assert torch.equal(extract_crops_2d(lab, boxes), ref2)


# ------------------------------------------------------------------ strong augmentation

def test_hsv_round_trip_and_zero_hue_shift():
    x = torch.rand(4, 3, 9, 9, generator=_gen(5))
    x[0, :, 0, 0] = 0.5                  # gray pixel (zero saturation)
    x[0, :, 0, 1] = 0.0                  # black
    x[0, :, 0, 2] = torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-6)
    assert torch.allclose(adjust_hue(x, torch.zeros(4)), x, atol=1e-6)
    hsv = rgb_to_hsv(x)
    assert hsv.min() >= 0 and hsv.max() <= 1
    # pure red shifted by a third of a turn is pure green
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 1.0
    assert torch.allclose(adjust_hue(red, torch.tensor([1 / 3])).flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def test_gaussian_blur_matches_torchvision_per_sample():
    x = torch.rand(4, 3, 16, 16, generator=_gen(6))
    sigma = torch.tensor([0.1, 0.7, 1.6, 4.0])   # the last one's kernel is capped to 15
    out = gaussian_blur(x, sigma, max_sigma=4.0)
    for i in range(4):
        k = min(2 * math.ceil(3 * float(sigma[i])) + 1, 15)
        ref = TF.gaussian_blur(x[i:i + 1], [k, k], [float(sigma[i])] * 2)
        assert torch.allclose(out[i:i + 1], ref, atol=1e-5), i


def test_strong_augment_identity_flip_blur():
    x = torch.rand(5, 3, 12, 12, generator=_gen(7))
    off = {"jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0, "flip_p": 0.0}
    assert torch.equal(strong_augment(x, _gen(0), **off), x)
    assert torch.equal(strong_augment(x, _gen(0), **{**off, "flip_p": 1.0}), x.flip(-1))
    gray = strong_augment(x, _gen(0), **{**off, "gray_p": 1.0})
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 0], gray[:, 2])
    # blur with a fixed sigma: 0.7 at the 224 convention is 0.7 * 12 / 224 px; None keeps pixels
    for ref_size, sig in ((None, 1.2), (224, 1.2 * 12 / 224)):
        out = strong_augment(x, _gen(0), **{**off, "blur_p": 1.0}, blur_sigma=(1.2, 1.2), blur_ref_size=ref_size)
        k = 2 * math.ceil(3 * sig) + 1
        assert torch.allclose(out, TF.gaussian_blur(x, [k, k], [sig, sig]), atol=1e-5)


def test_strong_augment_range_reproducible_changes_colours():
    x = torch.rand(16, 3, 24, 24, generator=_gen(8))
    state = torch.get_rng_state()
    a = strong_augment(x, _gen(1))
    b = strong_augment(x, _gen(1))
    c = strong_augment(x, _gen(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype and a.min() >= 0 and a.max() <= 1
    jit = strong_augment(x, _gen(1), jitter_p=1.0, gray_p=0.0, blur_p=0.0, flip_p=0.0)
    # every sample's mean colour moves (brightness/contrast/saturation/hue are all drawn)
    assert ((jit - x).mean(dim=(2, 3)).abs().amax(1) > 1e-3).all()
    # hue alone: pixels change but luma-independent value (max channel) is kept
    hue = strong_augment(x, _gen(1), brightness=0, contrast=0, saturation=0, hue=0.5, jitter_p=1.0,
                         gray_p=0.0, blur_p=0.0, flip_p=0.0)
    assert (hue - x).abs().max() > 0.05
    assert torch.allclose(hue.amax(1), x.amax(1), atol=1e-5)
    # half precision in, half precision out
    assert strong_augment(x.half(), _gen(1)).dtype == torch.float16
