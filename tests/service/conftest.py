"""Fixtures for the inference service: a small real bundle and live uvicorn servers on 127.0.0.1.

The bundle is an untrained UNet whose encoder starts from the offline ImageNet Lite0 weights (no training, so it
is built in a second); its masks are not good, but they are non-trivial and deterministic, which is what
comparing the service with the in-process Predictor needs.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from medseg.bundle import save_bundle
from medseg.config import load_config
from medseg.inference import Predictor
from medseg.models import build_model
from medseg.service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs/experiments/demo_nuclei.yaml"
SMALL = ["inference.tile_size=[128, 128]", "data.patch_size=[64, 64]"]


def build_tiny_bundle(out: Path, seed: int = 0) -> Path:
    cfg = load_config(CONFIG, SMALL)
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes)
    from medseg.engine.train import preprocessing_record

    return save_bundle(out, cfg, {"model": model.state_dict()}, preprocessing_record(cfg),
                       f"# {cfg.name}\n\nUntrained test bundle.\n")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="session")
def predictor(tiny_bundle: Path) -> Predictor:
    return Predictor.from_bundle(tiny_bundle, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_service(predictor: Any, settings: ServiceSettings, model_card: str = "") -> Iterator[str]:
    """A real uvicorn server for ``create_app(predictor, settings)`` on a free loopback port; yields its URL."""
    import uvicorn

    from medseg.service.app import create_app
    from medseg.service.server import uvicorn_options

    app = create_app(predictor, settings, model_card)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning",
                                           **uvicorn_options(settings)))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def service(predictor: Predictor, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The default service (module-wide): 4 MB upload cap, 4 queued jobs."""
    settings = ServiceSettings(max_upload_bytes=4 * 1024 * 1024, max_queued=4,
                               work_dir=tmp_path_factory.mktemp("service-work"))
    with running_service(predictor, settings, "# model card") as url:
        yield url


@pytest.fixture
def start_service() -> Iterator[Callable[..., str]]:
    """Start extra services with their own settings (stopped after the test)."""
    stack: list[Any] = []

    def start(predictor: Any, settings: ServiceSettings) -> str:
        cm = running_service(predictor, settings)
        stack.append(cm)
        return cm.__enter__()

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


class GatedPredictor:
    """The real predictor, held at a gate so a test decides when the worker is busy."""

    def __init__(self, inner: Predictor, gate: threading.Event):
        self.inner, self.gate = inner, gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict_scan(self, scan, *, tta=None, progress=None):
        assert self.gate.wait(120), "test gate never opened"
        return self.inner.predict_scan(scan, tta=tta, progress=progress)


class FailingOncePredictor(GatedPredictor):
    """Fails its first scan like a GPU running out of memory, then works."""

    def __init__(self, inner: Predictor):
        super().__init__(inner, threading.Event())
        self.gate.set()
        self.calls = 0

    def predict_scan(self, scan, *, tta=None, progress=None):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().predict_scan(scan, tta=tta, progress=progress)


@pytest.fixture
def gated_predictor(predictor: Predictor) -> Iterator[tuple[GatedPredictor, threading.Event]]:
    gate = threading.Event()
    yield GatedPredictor(predictor, gate), gate
    gate.set()  # never leave a worker thread waiting


@pytest.fixture
def failing_once_predictor(predictor: Predictor) -> FailingOncePredictor:
    return FailingOncePredictor(predictor)


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"
