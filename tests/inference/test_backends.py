"""Inference backends (medseg.inference.backends): each predicts what eager PyTorch does, through the Predictor,
the CLI and the service settings; compile and export failures fall back to eager."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.config import InferenceConfig
from medseg.inference import Predictor
from medseg.inference.backends import Backend, default_backend
from medseg.io import Geometry, Scan


def _image(shape: tuple[int, int] = (70, 53)) -> Scan:
    rng = np.random.default_rng(0)
    return Scan(rng.integers(0, 256, shape, dtype=np.uint8), Geometry.identity(shape), "img.png")


# torch.compile builds C++ kernels for the whole network (~30 s here): that parity check runs with the slow
# tests in .ci/run; ONNX Runtime exports in about a second and stays in the fast suite.
@pytest.mark.parametrize("backend", [pytest.param("compile", marks=pytest.mark.slow), "onnxruntime"])
def test_backend_probabilities_match_eager(make_bundle, backend, monkeypatch, caplog) -> None:
    # Odd sizes: the image is tiled and the last tile is padded to the stride (the ONNX runner pads itself).
    bundle = make_bundle("b", {"a": 3, "b": 4}, overrides=["inference.tile_size=[64, 64]"])
    eager = Predictor.from_bundle(bundle, device="cpu", backend="torch")
    other = Predictor.from_bundle(bundle, device="cpu", backend=backend)
    assert other.backend == backend and eager.backend == "torch"
    calls = []
    if backend == "compile":
        real = __import__("torch").compile

        def spy(model, **kwargs):
            fn = real(model, **kwargs)

            def run(x):
                calls.append(tuple(x.shape))
                return fn(x)

            return run

        monkeypatch.setattr("medseg.inference.backends.torch.compile", spy)
    scan = _image()
    with caplog.at_level("WARNING", logger="medseg"):
        got = other.predict_scan(scan)
    want = eager.predict_scan(scan)
    assert float(np.abs(got.probs - want.probs).max()) <= 1e-4
    np.testing.assert_array_equal(got.mask, want.mask)
    if backend == "compile":
        assert calls, "the compiled module was never called"
        if shutil.which("g++") or shutil.which("c++"):  # inductor needs a C++ compiler on CPU
            assert "running eagerly" not in caplog.text, caplog.text


def test_onnxruntime_backend_leaves_members_usable(make_bundle) -> None:
    # The ONNX runner exports the member in memory; the eager module must keep predicting the same.
    bundle = make_bundle("m", {"a": 3})
    p = Predictor.from_bundle(bundle, device="cpu", backend="onnxruntime")
    first = p.predict_scan(_image()).probs
    eager = Predictor(p.members, p.cfg, p.labels, device="cpu", backend="torch").predict_scan(_image()).probs
    assert float(np.abs(first - eager).max()) <= 1e-4


def test_compile_failure_falls_back_to_eager(make_bundle, monkeypatch, caplog) -> None:
    bundle = make_bundle("f", {"a": 3})
    eager = Predictor.from_bundle(bundle, device="cpu", backend="torch")

    def broken(model, **kwargs):
        def run(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return run

    monkeypatch.setattr("medseg.inference.backends.torch.compile", broken)
    predictor = Predictor.from_bundle(bundle, device="cpu", backend="compile")
    with caplog.at_level("WARNING", logger="medseg"):
        probs = predictor.predict_scan(_image()).probs
    np.testing.assert_allclose(probs, eager.predict_scan(_image()).probs, atol=1e-6)
    assert "InvalidCxxCompiler" in caplog.text and "running eagerly" in caplog.text


def test_onnx_export_failure_falls_back_to_eager(make_bundle, monkeypatch, caplog) -> None:
    bundle = make_bundle("x", {"a": 3})
    eager = Predictor.from_bundle(bundle, device="cpu", backend="torch")

    def broken(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::exotic' to ONNX opset version 17 is not supported")

    monkeypatch.setattr("medseg.inference.backends.torch.onnx.export", broken)
    predictor = Predictor.from_bundle(bundle, device="cpu")  # auto: onnxruntime on a CPU
    assert predictor.backend == Backend.ONNXRUNTIME
    with caplog.at_level("WARNING", logger="medseg"):
        probs = predictor.predict_scan(_image()).probs
    np.testing.assert_allclose(probs, eager.predict_scan(_image()).probs, atol=1e-6)
    assert "aten::exotic" in caplog.text and "running eagerly" in caplog.text


def test_backend_comes_from_the_bundle_unless_the_caller_chooses(make_bundle) -> None:
    bundle = make_bundle("c", {"a": 3}, overrides=["inference.backend=onnxruntime"])
    assert Predictor.from_bundle(bundle, device="cpu").backend == Backend.ONNXRUNTIME
    assert Predictor.from_bundle(bundle, device="cpu", backend="torch").backend == Backend.TORCH
    # auto resolves to the backend measured fastest for the device (README "Inference backends")
    assert Predictor.from_bundle(make_bundle("d", {"a": 3}), device="cpu").backend == Backend.ONNXRUNTIME
    assert default_backend(torch.device("cuda")) == Backend.TORCH


def test_bundles_written_with_inference_compile_still_load() -> None:
    assert InferenceConfig.model_validate({"compile": True}).backend == "compile"
    assert InferenceConfig.model_validate({"compile": False}).backend == "auto"


def test_cli_predict_backend_option(make_bundle, tmp_path) -> None:
    from PIL import Image

    from medseg.cli import app

    bundle = make_bundle("cli", {"a": 3})
    Image.fromarray(_image().array).save(tmp_path / "x.png")
    runner = CliRunner()
    bad = runner.invoke(app, ["predict", str(bundle), str(tmp_path / "x.png"), "--out", str(tmp_path / "o0"),
                              "--backend", "tensorrt"])
    assert bad.exit_code != 0 and "--backend 'tensorrt'" in bad.output
    outs = {}
    for backend in ("torch", "onnxruntime"):
        r = runner.invoke(app, ["predict", str(bundle), str(tmp_path / "x.png"), "--out", str(tmp_path / backend),
                                "--backend", backend, "--device", "cpu"])
        assert r.exit_code == 0, r.output
        outs[backend] = np.asarray(Image.open(next((tmp_path / backend).glob("x*mask*.png"))))
    np.testing.assert_array_equal(outs["torch"], outs["onnxruntime"])


def test_service_settings_backend_from_environment(monkeypatch) -> None:
    from medseg.service.settings import ServiceSettings

    monkeypatch.setenv("MEDSEG_SERVICE_BACKEND", "compile")
    assert ServiceSettings.from_env().backend == "compile"
