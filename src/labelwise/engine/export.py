"""``labelwise export RUN --format {safetensors,onnx,torchscript} --out FILE``.

* ``safetensors``: the inference model's weights (the tensors ``labelwise infer`` uses) with the
  run's method, resolved config and labelwise version in the file's metadata; read back with
  ``safetensors.torch.load_file`` (no pickle).
* ``onnx`` / ``torchscript``: the method's *export module* (``Method.export_module``): images
  ``B x 3 x H x W`` in [0, 1] -> the network's raw maps at the input size (cam: CAMs; seco and
  segmenter: segmentation logits; kmax / cocal: per-level class probabilities). Post-processing
  (thresholds, CRF, multi-scale) stays in Python. Batch, height and width are dynamic axes where
  the model allows (a ViT whose position embedding is resampled for the traced size is exported
  at that fixed size, ``--size``). After writing, the file is run once (onnxruntime / torch.jit.load) on a
  random input and compared with PyTorch; the largest difference is reported and an export
  that disagrees beyond ``tol`` stops with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from labelwise.errors import LabelwiseError

FORMATS = ("safetensors", "onnx", "torchscript")

__all__ = ["export_run", "FORMATS", "MapsAtInputSize"]


class MapsAtInputSize(torch.nn.Module):
    """``fn(images) -> maps`` resized (bilinear) to the input's height and width: what the export
    formats carry for a method (``Method.export_module``)."""

    def __init__(self, model: torch.nn.Module, fn: str, index: int = 0):
        super().__init__()
        self.model, self.fn, self.index = model, fn, index

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = getattr(self.model, self.fn)(images)
        if isinstance(out, (tuple, list)):
            out = out[self.index]
        return torch.nn.functional.interpolate(out.float(), size=images.shape[-2:], mode="bilinear",
                                               align_corners=False)


def export_run(run_dir: str | Path, fmt: str, out: str | Path, *, size: tuple[int, int] = (224, 224),
               opset: int = 17, tol: float = 1e-3) -> dict:
    from labelwise import __version__
    from labelwise.config import to_dict
    from labelwise.engine.api import load_run

    if fmt not in FORMATS:
        raise LabelwiseError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    loaded = load_run(run_dir, device="cpu")
    method, cfg = loaded.method, loaded.cfg
    meta = {"method": method.name, "labelwise": __version__, "config": json.dumps(to_dict(cfg)),
            "class_names": json.dumps(list(loaded.info.class_names))}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous().clone() for k, v in loaded.model.state_dict().items()}
        tmp = out.with_name(f".{out.name}.tmp")
        save_file(sd, str(tmp), metadata=meta)
        tmp.replace(out)
        return {"format": fmt, "out": str(out), "tensors": len(sd)}
    module = method.export_module(loaded.model, cfg)
    if module is None:
        raise LabelwiseError(f"method '{method.name}' has no export module for {fmt}; export its weights with "
                             "--format safetensors")
    module = module.eval()
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        ref = module(x)
    tmp = out.with_name(f".{out.name}.tmp")
    fixed_size = False
    if fmt == "onnx":
        def onnx_export(spatial: bool) -> None:
            axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
            try:
                torch.onnx.export(module, (x,), str(tmp), input_names=["images"], output_names=["maps"],
                                  opset_version=opset, dynamic_axes={"images": axes, "maps": axes}, dynamo=False)
            except Exception as e:  # noqa: BLE001 -- the exporter's own errors are long; one line
                tmp.unlink(missing_ok=True)
                raise LabelwiseError(f"ONNX export of the {method.name} model failed: {str(e).splitlines()[0]}") \
                    from None

        onnx_export(spatial=True)
        got = _run_onnx(tmp, x)
        # the dynamic axes: another batch and size must match too; a ViT whose position embedding is
        # resampled at the traced size is exported at that fixed size instead
        x2 = torch.rand(2, 3, size[0] + 32, size[1] + 32)
        if _onnx_diff(module, tmp, x2) > tol:
            fixed_size = True
            onnx_export(spatial=False)
            got = _run_onnx(tmp, x)
            if _onnx_diff(module, tmp, torch.rand(2, 3, *size)) > tol:
                tmp.unlink(missing_ok=True)
                raise LabelwiseError(f"the ONNX export of the {method.name} model does not reproduce PyTorch for a "
                                     "batch of 2; export torchscript or safetensors instead")
    else:
        with torch.no_grad():
            traced = torch.jit.trace(module, (x,), check_trace=False)
        traced.save(str(tmp))
        with torch.no_grad():
            got = torch.jit.load(str(tmp))(x)
    diff = float((got - ref).abs().max())
    if diff > tol:
        tmp.unlink(missing_ok=True)
        raise LabelwiseError(f"the exported {fmt} model differs from PyTorch by {diff:.2e} (> {tol}); not written")
    tmp.replace(out)
    return {"format": fmt, "out": str(out), "max_abs_diff": diff, "input": list(x.shape), "output": list(ref.shape),
            "fixed_size": fixed_size}


def _onnx_diff(module, path: Path, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = module(x)
    try:
        return float((_run_onnx(path, x) - ref).abs().max())
    except LabelwiseError:
        raise
    except Exception:  # noqa: BLE001 -- onnxruntime rejects the shape
        return float("inf")


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    try:
        import onnxruntime as ort
    except ImportError:
        raise LabelwiseError("checking an ONNX export needs onnxruntime: pip install onnxruntime "
                             "(or pip install 'labelwise[export]')") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # a rejected shape is reported by the caller, not logged here
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
