"""Fixtures for the PACS tests: a real Orthanc (``orthanc_server.running_orthanc``, session-wide) and a tiny
untrained model that segments what it retrieves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from orthanc_server import Pacs, running_orthanc

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
