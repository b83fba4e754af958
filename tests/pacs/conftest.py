"""Fixtures for the PACS tests: a real Orthanc (``orthanc_server.running_orthanc``, session-wide) and a tiny
untrained model that segments what it retrieves."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from orthanc_server import Pacs, running_orthanc, write_endpoints_yaml

from medseg.bundle import save_bundle
from medseg.config import load_config
from medseg.inference import Predictor
from medseg.models import build_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pacs(datasets_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    with running_orthanc(datasets_dir, tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def build_pacs_bundle(out: Path) -> Path:
    """An untrained UNet (offline ImageNet encoder): non-trivial, deterministic masks in a second."""
    from medseg.engine.train import preprocessing_record

    cfg = load_config(REPO / "configs/experiments/demo_nuclei.yaml",
                      ["inference.tile_size=[128, 128]", "data.patch_size=[64, 64]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes)
    return save_bundle(out, cfg, {"model": model.state_dict()}, preprocessing_record(cfg), "# tiny\n")


@pytest.fixture(scope="session")
def pacs_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pacs_bundle(tmp_path_factory.mktemp("pacs-bundle") / "bundle")


@pytest.fixture(scope="session")
def pacs_predictor(pacs_bundle: Path) -> Predictor:
    return Predictor.from_bundle(pacs_bundle, device="cpu")


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """A real uvicorn server for ``app`` on a free loopback port; yields its URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-pacs-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
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
def pacs_service(pacs: Pacs, pacs_predictor: Predictor, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The inference service with the test PACS configured as its one DICOMweb endpoint."""
    from medseg.service.app import create_app
    from medseg.service.settings import ServiceSettings

    folder = tmp_path_factory.mktemp("pacs-service")
    settings = ServiceSettings(work_dir=folder / "work", device="cpu",
                               dicomweb_endpoints=write_endpoints_yaml(folder / "endpoints.yaml", pacs))
    with serving(create_app(pacs_predictor, settings)) as url:
        yield url
