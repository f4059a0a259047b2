from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from labelwise.config import (
    all_keys, apply_overrides, from_dict, load_config, param, resolve_config, save_config, to_dict,
)
from labelwise.errors import LabelwiseError


@dataclass
class Optim:
    lr: float = param(1e-3, range=(0.0, None))
    schedule: str = param("poly", choices=("poly", "cosine"))
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Train:
    max_steps: int = param(100, range=(1, None))
    amp: Literal["none", "bf16", "fp16"] = "none"
    weights: Optional[str] = None
    scales: list[float] = param([1.0, 0.5])
    flip: bool = True


@dataclass
class Exp:
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)
    name: str = "x"


def test_defaults_and_roundtrip(tmp_path):
    cfg = from_dict(Exp, {})
    assert cfg.optim.lr == 1e-3 and cfg.train.scales == [1.0, 0.5]
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(Exp, tmp_path / "c.yaml")
    assert again == cfg
    assert to_dict(again)["optim"]["betas"] == [0.9, 0.999]


def test_overrides_are_typed():
    cfg = resolve_config(Exp, overrides=["optim.lr=1e-4", "train.max_steps=7", "train.flip=false",
                                         "train.scales=[1, 2]", "train.weights=/w.pth", "optim.betas=[0.5, 0.6]"])
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)  # YAML reads 1e-4 as str
    assert cfg.train.max_steps == 7 and cfg.train.flip is False
    assert cfg.train.scales == [1.0, 2.0] and cfg.train.weights == "/w.pth"
    assert cfg.optim.betas == (0.5, 0.6)
    assert resolve_config(Exp, overrides=["train.weights=none"]).train.weights is None


def test_unknown_key_names_closest():
    with pytest.raises(LabelwiseError, match=r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        resolve_config(Exp, overrides=["optim.lrr=0.1"])
    with pytest.raises(LabelwiseError, match=r"did you mean 'train.max_steps'"):
        from_dict(Exp, {"train": {"max_step": 3}}, source="f.yaml")


def test_validation_messages():
    with pytest.raises(LabelwiseError, match=r"'train.max_steps'.*expects an integer"):
        resolve_config(Exp, overrides=["train.max_steps=2.5"])
    with pytest.raises(LabelwiseError, match=r"'train.max_steps'.*must be in \[1, inf\]"):
        resolve_config(Exp, overrides=["train.max_steps=0"])
    with pytest.raises(LabelwiseError, match=r"'optim.schedule'.*one of"):
        resolve_config(Exp, overrides=["optim.schedule=step"])
    with pytest.raises(LabelwiseError, match=r"'train.amp'.*one of"):
        resolve_config(Exp, overrides=["train.amp=fp8"])
    with pytest.raises(LabelwiseError, match=r"'train.flip'.*true or false"):
        resolve_config(Exp, overrides=["train.flip=3"])
    with pytest.raises(LabelwiseError, match=r"key=value"):
        resolve_config(Exp, overrides=["optim.lr"])


def test_layers_files_overrides_priority(tmp_path):
    f = tmp_path / "user.yaml"
    f.write_text("optim:\n  lr: 0.5\ntrain:\n  max_steps: 9\n")
    cfg = resolve_config(Exp, layers=[("preset cpu", {"optim": {"lr": 0.1, "schedule": "cosine"}})],
                         files=[f], overrides=["train.max_steps=11"])
    assert cfg.optim.lr == 0.5 and cfg.optim.schedule == "cosine" and cfg.train.max_steps == 11
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(LabelwiseError, match=r"bad.yaml is not valid YAML"):
        resolve_config(Exp, files=[bad])
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  lrate: 0.1\n")
    with pytest.raises(LabelwiseError, match=r"typo.yaml.*did you mean 'optim.lr'"):
        resolve_config(Exp, files=[typo])
    with pytest.raises(LabelwiseError, match=r"missing.yaml does not exist"):
        resolve_config(Exp, files=[tmp_path / "missing.yaml"])


def test_all_keys_lists_sections_and_leaves():
    keys = all_keys(Exp)
    assert "optim" in keys and "optim.lr" in keys and "train.scales" in keys and "name" in keys


def test_apply_overrides_without_class_is_permissive():
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}
