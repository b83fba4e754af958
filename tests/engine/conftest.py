"""Fixtures for engine tests: a tiny real dataset (64x64 crops of the CC0 DSB2018 sample) and a tiny config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from engine_data import REPO, TINY_OVERRIDES, make_tiny_dataset

from medseg.config import ExperimentConfig, load_config


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")




@pytest.fixture()
def tiny_cfg(tiny_data: Path) -> Callable[..., ExperimentConfig]:
    """``tiny_cfg("train.epochs=2", ...)``: the demo config on the tiny dataset, small model, no downloads."""

    def make(*overrides: str) -> ExperimentConfig:
        return load_config(REPO / "configs/experiments/demo_nuclei.yaml",
                           [f"data.root={tiny_data}", *TINY_OVERRIDES, *overrides])

    return make
