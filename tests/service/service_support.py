"""Helpers of the service tests: a tiny bundle and a real uvicorn server on a free port (imported from here, not
from conftest: which conftest module ``import conftest`` finds depends on the run)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

from medseg.bundle import save_bundle
from medseg.config import load_config
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


def wait_finished(url: str, job_id: str, timeout: float = 300.0) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` until the job is done or failed; its last status. Fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if status["status"] in ("done", "failed"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished after {timeout} s")
