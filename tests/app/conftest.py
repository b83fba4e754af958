"""Fixtures for the web app's tests: a tiny untrained model bundle in a models folder, and the app's environment.

The bundle is random-weight (nothing to download, built in about a second): tests check that the app shows, measures
and exports *whatever the model predicts*, not that the model is good. The browser test trains its own model.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from app_inputs import add_training_fingerprint, make_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
# pytest puts tests/ on sys.path (rootdir conftest), where tests/app would shadow the app package as a namespace
# package; the repository root must come first.
if str(REPO) not in sys.path[:1]:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    make_tiny_bundle(folder / "tiny-nuclei")
    return folder


@pytest.fixture(scope="session")
def fingerprinted_models_dir(tmp_path_factory: pytest.TempPathFactory, datasets_dir: Path) -> Path:
    """The tiny model with the fingerprint of the real nuclei images it stands for (2D, RGB/grey, 8-bit)."""
    folder = tmp_path_factory.mktemp("fp-models")
    add_training_fingerprint(make_tiny_bundle(folder / "tiny-nuclei"), datasets_dir / "dsb2018_nuclei")
    return folder


@pytest.fixture
def app_env(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Environment for one AppTest: the tiny model, an audit log file, no remote service. Returns the log path."""
    audit = tmp_path / "audit.log"
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("MEDSEG_AUDIT_LOG", str(audit))
    monkeypatch.setenv("MEDSEG_UPLOAD_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("MEDSEG_REVIEW_DIR", str(tmp_path / "reviews"))
    monkeypatch.delenv("MEDSEG_FINETUNE_USERS", raising=False)
    monkeypatch.delenv("MEDSEG_INFERENCE_URL", raising=False)
    monkeypatch.delenv("MEDSEG_MAX_UPLOAD_MB", raising=False)
    monkeypatch.delenv("MEDSEG_MAX_VOXELS", raising=False)
    return audit


@pytest.fixture(scope="session")
def inference_service(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real inference service (``medseg.service``) over the tiny bundle, on a loopback port; yields its URL."""
    from medseg.service.settings import ServiceSettings

    settings = ServiceSettings(work_dir=tmp_path_factory.mktemp("service"), device="cpu")
    with serve(models_dir / "tiny-nuclei", settings) as url:
        yield url


@pytest.fixture
def finetuning_service(models_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The inference service with fine-tuning on (versions written to the returned folder); yields (URL, folder)."""
    from medseg.service.settings import ServiceSettings

    versions = tmp_path / "service-versions"
    settings = ServiceSettings(work_dir=tmp_path / "service-work", device="cpu", finetune_dir=versions,
                               finetune_max_minutes=0.1)
    with serve(models_dir / "tiny-nuclei", settings) as url:
        yield url, versions


@contextmanager
def serve(bundle: Path, settings) -> Iterator[str]:
    """``create_app(bundle, settings)`` in uvicorn on a free loopback port, stopped when the block ends."""
    import uvicorn

    from medseg.service.app import create_app

    service = create_app(bundle, settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(service, host="127.0.0.1", port=port, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, name="medseg-service-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the inference service did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
