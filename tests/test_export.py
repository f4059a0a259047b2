"""labelwise export: safetensors weights with their config, ONNX checked with onnxruntime against
PyTorch (dynamic size where the model allows, else the traced size), TorchScript."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labelwise.cli import main

TINY = ["model.pretrained=false", "data.crop_size=64", "train.batch_size=2", "train.eval_at_end=false"]
SECO = ["model.timm_kwargs={patch_size: 8, embed_dim: 48, depth: 3, num_heads: 3, img_size: 64}",
        "model.proj_hidden=64", "seco.par_size=32", "seco.local_size=16", "seco.global_size=32", "seco.n_local=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from labelwise.data.synth import generate, testbed_spec
    from labelwise.engine import api

    tmp = tmp_path_factory.mktemp("export")
    cooc = generate("cooc", tmp / "c", n_train=4, n_val=2, size=64, seed=0)
    parts = testbed_spec("parts", generate("parts", tmp / "p", n_train=4, n_val=2, size=64, seed=0))
    out = {}
    for name, data, extra in (("cam", f"voc:{cooc}", []), ("segmenter", f"voc:{cooc}", []),
                              ("seco", f"voc:{cooc}", SECO), ("kmax", parts, ["loss.instdisc_samples=64"])):
        out[name] = api.train(name, data, tmp / name, preset="cpu", steps=1, overrides=TINY + extra,
                              show_progress=False)
    return out


def test_safetensors_holds_the_inference_weights_and_the_config(runs, tmp_path):
    from safetensors import safe_open

    from labelwise.engine.api import load_run

    f = tmp_path / "cam.safetensors"
    assert main(["export", str(runs["cam"]), "--format", "safetensors", "--out", str(f)]) == 0
    model = load_run(runs["cam"], device="cpu").model
    with safe_open(str(f), "pt") as st:
        meta = st.metadata()
        assert meta["method"] == "cam" and json.loads(meta["config"])["model"]["pretrained"] is False
        for k, v in model.state_dict().items():
            assert torch.equal(st.get_tensor(k), v), k


@pytest.mark.parametrize("name", ["cam", "segmenter", "seco", "kmax"])
def test_onnx_matches_pytorch_in_onnxruntime(runs, tmp_path, name):
    import onnxruntime as ort

    from labelwise.engine.api import load_run

    f = tmp_path / f"{name}.onnx"
    assert main(["export", str(runs[name]), "--format", "onnx", "--out", str(f), "--size", "64", "64"]) == 0
    loaded = load_run(runs[name], device="cpu")
    module = loaded.method.export_module(loaded.model, loaded.cfg).eval()
    sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    sizes = [(64, 64)] if name == "seco" else [(64, 64), (96, 128)]  # seco's ViT: exported at the traced size
    for h, w in sizes:
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            ref = module(x).numpy()
        got = sess.run(None, {"images": x.numpy()})[0]
        assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-3, (name, h, w)


@pytest.mark.parametrize("name", ["cam", "kmax"])
def test_torchscript_matches_pytorch(runs, tmp_path, name):
    from labelwise.engine.api import load_run

    f = tmp_path / f"{name}.pt"
    assert main(["export", str(runs[name]), "--format", "torchscript", "--out", str(f), "--size", "64", "64"]) == 0
    loaded = load_run(runs[name], device="cpu")
    module = loaded.method.export_module(loaded.model, loaded.cfg).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(f))(x), module(x), atol=1e-5)


def test_a_method_without_an_export_module_says_so(runs, tmp_path, capsys, monkeypatch):
    from labelwise.engine.registry import get_method

    monkeypatch.setattr(type(get_method("cam")), "export_module", lambda self, model, cfg: None)
    assert main(["export", str(runs["cam"]), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "no export module" in capsys.readouterr().err
