"""Shared fixtures. Real data comes from ../shared/datasets (read-only); tests skip nothing silently:
if the datasets folder is missing the run fails, because CI always has it beside the clone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("MEDSEG_DATASETS", REPO.parent / "shared" / "datasets"))

# Two cores: keep each test process to a predictable number of threads.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not DATASETS.is_dir():
        raise RuntimeError(f"datasets not found at {DATASETS}; set MEDSEG_DATASETS")
    return DATASETS


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO
