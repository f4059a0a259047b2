"""Joint augmentation keeps image and labels aligned; padding, multi-crop, eval, collate, RNG hygiene."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelwise.data.transforms import (EvalTransform, MultiCropTransform, RandomHorizontalFlip, ToTensors,
                                       TrainTransform, collate)
from labelwise.io import VOC_PALETTE

FILL = (0.485, 0.456, 0.406)  # e.g. a backbone's mean colour


def colour_item(h=40, w=56):
    """Image whose colour encodes the label: pixel colour = VOC palette of its class."""
    lab = np.zeros((h, w), np.uint8)
    lab[:, w // 2:] = 1
    lab[h // 2:, : w // 3] = 2
    lab[5:15, 5:12] = 3
    img = VOC_PALETTE[lab]
    return {"image_id": "x", "file_name": "x.jpg", "image": img, "mask": lab.copy(), "parts": lab.copy(),
            "tags": np.array([1, 1, 1], np.float32)}


def denorm(img: torch.Tensor) -> torch.Tensor:
    return img * 255  # transforms give [0, 1] floats; the model normalises


def agreement(img: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of labelled pixels whose colour is that of their label's palette entry."""
    pal = torch.from_numpy(VOC_PALETTE.astype(np.float32))
    # interior pixels only (same label as the 4 neighbours): boundaries blend under bilinear resizing
    m = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]
    interior = ((m[1:-1, 1:-1] == m[:-2, 1:-1]) & (m[1:-1, 1:-1] == m[2:, 1:-1])
                & (m[1:-1, 1:-1] == m[1:-1, :-2]) & (m[1:-1, 1:-1] == m[1:-1, 2:]))
    valid = (mask != 255) & interior
    want = pal[mask.clamp(max=255)].permute(2, 0, 1)
    close = ((denorm(img) - want).abs().amax(0) < 40) & valid
    return float(close.sum() / valid.sum())


def test_train_transform_keeps_alignment_and_pads_with_ignore():
    g = torch.Generator().manual_seed(0)
    t = TrainTransform(crop_size=64, scale_range=(0.5, 1.5), flip_p=0.5, jitter=None, fill=FILL, generator=g)
    saw_pad = False
    for _ in range(12):
        out = t(colour_item())
        img, mask = out["image"], out["mask"]
        assert img.shape == (3, 64, 64) and img.dtype == torch.float32
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0  # [0, 1]: no normalisation here
        assert mask.shape == (64, 64) and mask.dtype == torch.int64
        assert torch.equal(out["mask"], out["parts"])
        assert agreement(img, mask) > 0.99
        assert agreement(img, torch.roll(mask, 2, dims=-1)) < 0.97  # the check detects a 2-px shift
        pad = mask == 255
        if pad.any():
            saw_pad = True
            want = torch.tensor(FILL).view(3, 1)
            assert (img[:, pad] - want).abs().max() < 1e-6  # padded image = the fill colour
    assert saw_pad


def test_flip_mirrors_image_and_masks_together_with_probability_p():
    item = colour_item(40, 40)
    plain = torch.from_numpy(item["mask"]).long()
    img = torch.from_numpy(item["image"]).permute(2, 0, 1).float() / 255
    f = RandomHorizontalFlip(1.0)(ToTensors()(colour_item()))
    assert torch.equal(f["mask"], torch.from_numpy(colour_item()["mask"]).long().flip(-1))
    assert torch.equal(f["image"][0], torch.from_numpy(colour_item()["image"][..., 0]).flip(-1))
    # Inside the pipeline (no rescale, crop = image): each output is the item or its mirror, image and
    # masks alike, and both occur over 40 draws at p = 0.5.
    g = torch.Generator().manual_seed(0)
    t = TrainTransform(crop_size=40, scale_range=(1.0, 1.0), flip_p=0.5, jitter=None, generator=g)
    flips = []
    for _ in range(40):
        out = t(colour_item(40, 40))
        flipped = torch.equal(out["mask"], plain.flip(-1))
        assert flipped or torch.equal(out["mask"], plain)
        assert torch.equal(out["parts"], out["mask"])
        assert torch.allclose(out["image"], img.flip(-1) if flipped else img, atol=1e-6)
        flips.append(flipped)
    assert 5 <= sum(flips) <= 35
    never = TrainTransform(crop_size=40, scale_range=(1.0, 1.0), flip_p=0.0, jitter=None, generator=g)
    assert all(torch.equal(never(colour_item(40, 40))["mask"], plain) for _ in range(10))


def test_generator_gives_reproducible_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = TrainTransform(32, generator=torch.Generator().manual_seed(3), jitter=None)(colour_item())
    b = TrainTransform(32, generator=torch.Generator().manual_seed(3), jitter=None)(colour_item())
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["image"], b["image"])
    assert torch.equal(torch.get_rng_state(), state)  # explicit generator: global RNG not consumed


def test_color_jitter_changes_image_only():
    torch.manual_seed(0)  # test-side seeding only
    out = TrainTransform(40, scale_range=(1.0, 1.0), flip_p=0.0, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=1.0)(
        colour_item(40, 40))
    assert torch.equal(out["mask"], torch.from_numpy(colour_item(40, 40)["mask"]).long())
    ref = EvalTransform()(colour_item(40, 40))["image"]
    assert not torch.allclose(out["image"], ref)


def test_color_jitter_draws_from_its_generator_only():
    """Jitter on: the same seed gives the same image, and the global RNG is not consumed."""
    state = torch.get_rng_state()
    outs = [TrainTransform(40, scale_range=(1.0, 1.0), flip_p=0.0, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=1.0,
                           generator=torch.Generator().manual_seed(7))(colour_item(40, 40))["image"] for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(torch.get_rng_state(), state)
    other = TrainTransform(40, scale_range=(1.0, 1.0), flip_p=0.0, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=1.0,
                           generator=torch.Generator().manual_seed(8))(colour_item(40, 40))["image"]
    assert not torch.equal(outs[0], other)


def test_color_jitter_brightness_factor_in_range():
    """Brightness only: every pixel of a flat grey image scales by one factor drawn in [1 - b, 1 + b]."""
    from labelwise.data.transforms import ColorJitter
    from torchvision import tv_tensors

    g = torch.Generator().manual_seed(0)
    jitter = ColorJitter(brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0, p=1.0, generator=g)
    factors = []
    for _ in range(30):
        img = jitter({"image": tv_tensors.Image(torch.full((3, 8, 8), 100, dtype=torch.uint8))})["image"]
        assert img.unique().numel() == 1
        factors.append(float(img.flatten()[0]) / 100)
    assert 0.59 <= min(factors) and max(factors) <= 1.41 and max(factors) - min(factors) > 0.3


def test_color_jitter_rejects_negative_strengths():
    from labelwise.data.transforms import ColorJitter

    for kw in ({"brightness": -0.1}, {"contrast": -0.1}, {"saturation": -0.1}, {"hue": 0.6}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            ColorJitter(**kw)


def test_eval_transform_and_multicrop():
    e = EvalTransform(size=20)(colour_item(40, 56))
    assert e["image"].shape == (3, 20, 28) and e["mask"].shape == (40, 56) and e["orig_size"].tolist() == [40, 56]
    e2 = EvalTransform(size=(20, 28), resize_masks=True)(colour_item(40, 56))
    assert e2["mask"].shape == (20, 28) and agreement(e2["image"], e2["mask"]) > 0.9
    g = torch.Generator().manual_seed(1)
    mc = MultiCropTransform(global_size=32, local_size=16, n_global=2, n_local=5, generator=g)(colour_item())
    assert len(mc["global_views"]) == 2 and len(mc["local_views"]) == 5
    assert mc["global_views"][0].shape == (3, 32, 32) and mc["local_views"][0].shape == (3, 16, 16)
    assert mc["local_boxes"].shape == (5, 4) and mc["global_flips"].dtype == torch.bool
    for v, m in zip(mc["global_views"] + mc["local_views"], mc["global_masks"] + mc["local_masks"]):
        assert agreement(v, m) > 0.9
    b = mc["local_boxes"]
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 56).all() and (b[:, 3] <= 40).all()
    areas = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).float() / (40 * 56)
    assert (areas < 0.5).all()


def test_collate():
    t = TrainTransform(24, jitter=None, generator=torch.Generator().manual_seed(0))
    items = [t(colour_item()) for _ in range(3)]
    items[1]["instances"] = [{"category": 1}]
    items[0]["instances"] = []
    items[2]["instances"] = []
    b = collate(items)
    assert b["image"].shape == (3, 3, 24, 24) and type(b["image"]) is torch.Tensor
    assert b["mask"].shape == (3, 24, 24) and b["mask"].dtype == torch.int64
    assert b["tags"].shape == (3, 3) and b["image_id"] == ["x", "x", "x"]
    assert b["instances"] == [[], [{"category": 1}], []]
    mc = MultiCropTransform(global_size=16, local_size=8, n_global=2, n_local=3)
    views = collate([mc(colour_item()) for _ in range(2)])
    assert len(views["local_views"]) == 3 and views["local_views"][0].shape == (2, 3, 8, 8)
    ragged = collate([{"a": np.zeros(2)}, {"a": np.zeros(3)}])
    assert isinstance(ragged["a"], list) and len(ragged["a"]) == 2
