"""ONNX export parity with PyTorch (onnxruntime), and the CLI's export / predict output flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medseg.cli import app
from medseg.inference import Predictor
from medseg.inference.export import export_onnx
from medseg.io import read_scan

ort = pytest.importorskip("onnxruntime")
runner = CliRunner()


def test_onnx_matches_pytorch(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle("ens", {"a": 0, "b": 1}, temperature=1.5)
    out = export_onnx(bundle, tmp_path / "model.onnx")
    sidecar = json.loads(Path(str(out) + ".json").read_text())
    assert sidecar["members"] == 2 and sidecar["output_stride"] == 32 and sidecar["labels"]["1"]["name"] == "nucleus"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    predictor = Predictor.from_bundle(bundle, device="cpu")
    for shape in [(1, 3, 64, 96), (2, 3, 96, 32)]:  # dynamic batch, height and width
        x = torch.rand(*shape)
        onnx_probs = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():  # PyTorch path: each member's full forward, calibrated softmax, mean
            ref = sum(torch.softmax(m(x) / 1.5, dim=1) for m in predictor.members) / 2
        assert onnx_probs.shape == tuple(ref.shape)
        assert float(np.abs(onnx_probs - ref.numpy()).max()) <= 1e-4


def test_cli_export(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle("b", {"a": 0})
    res = runner.invoke(app, ["export", str(bundle), "--onnx", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.onnx").stat().st_size > 100_000 and (tmp_path / "m.onnx.json").is_file()
    res = runner.invoke(app, ["export", str(tmp_path / "missing"), "--onnx", str(tmp_path / "x.onnx")])
    assert res.exit_code == 1 and "missing: not a bundle" in res.output


def test_cli_predict_with_tta_probabilities_and_uncertainty(make_bundle, repo_dir: Path, tmp_path: Path) -> None:
    bundle = make_bundle("b", {"a": 0})
    src = sorted((repo_dir / "examples/data/dsb2018_sample/images").iterdir())[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.open(src).convert("RGB").crop((0, 0, 77, 61)).save(inputs / "crop.png")  # small and odd-sized
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(bundle), str(inputs), "--out", str(out), "--device", "cpu",
                              "--tta", "flips", "--probabilities", "--uncertainty"])
    assert res.exit_code == 0, res.output
    mask = read_scan(out / "crop_mask.png")
    assert mask.spatial_shape == (61, 77)
    probs = np.load(out / "crop_probs.npz")["probabilities"]
    unc = np.load(out / "crop_uncertainty.npz")["uncertainty"]
    assert probs.shape == (2, 61, 77) and unc.shape == (61, 77) and 0 <= unc.min() <= unc.max() <= 1
    assert np.array(Image.open(out / "crop_uncertainty.png")).shape == (61, 77)
    np.testing.assert_array_equal(mask.array, probs.argmax(0))  # class indices by default
    res = runner.invoke(app, ["predict", str(bundle), str(inputs), "--out", str(out), "--tta", "sideways"])
    assert res.exit_code == 1 and "--tta 'sideways'" in res.output
