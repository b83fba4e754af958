"""Fixtures for the reliability suite: seed files from the real datasets and one memory-capped reader worker
per session (see robust_harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import robust_harness as h  # noqa: E402


@pytest.fixture(scope="session")
def seeds(datasets_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> h.Seeds:
    return h.make_seeds(datasets_dir, tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="session")
def worker() -> Iterator[h.ReaderWorker]:
    with h.ReaderWorker() as w:
        yield w


@pytest.fixture(scope="session")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session folder for generated inputs (hypothesis cannot use function-scoped tmp_path)."""
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory: pytest.TempPathFactory, repo_dir: Path) -> Path:
    """A nuclei bundle (the demo config) with randomly initialised weights: prediction quality is irrelevant
    to isolation and privacy, the whole read -> predict -> write path is not."""
    import torch

    from medseg.bundle import save_bundle
    from medseg.config import load_config
    from medseg.engine.train import preprocessing_record
    from medseg.models import build_model

    cfg = load_config(repo_dir / "configs/experiments/demo_nuclei.yaml",
                      ["model.pretrained=none", "inference.tile_size=[128, 128]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes)
    return save_bundle(tmp_path_factory.mktemp("bundle") / "bundle", cfg, {"model": model.state_dict()},
                       preprocessing_record(cfg), "# random weights, for tests")
