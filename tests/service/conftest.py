"""Fixtures for the inference service: a small real bundle and live uvicorn servers on 127.0.0.1.

The bundle is an untrained UNet whose encoder starts from the offline ImageNet Lite0 weights (no training, so it
is built in a second); its masks are not good, but they are non-trivial and deterministic, which is what
comparing the service with the in-process Predictor needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from service_support import REPO, build_tiny_bundle, free_port, running_service  # noqa: F401 - re-exported

from medseg.inference import Predictor
from medseg.service.settings import ServiceSettings


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="session")
def predictor(tiny_bundle: Path) -> Predictor:
    return Predictor.from_bundle(tiny_bundle, device="cpu")


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
