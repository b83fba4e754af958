"""Fixtures for inference tests: tiny bundles and paths into the shared datasets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from inference_helpers import tiny_config, tiny_state

from medseg.bundle import save_bundle


@pytest.fixture
def make_bundle(tmp_path: Path) -> Callable[..., Path]:
    """``make_bundle(name, members={name: seed}, overrides=[...], temperature=None)`` -> bundle path."""

    def make(
        name: str = "bundle",
        members: dict[str, int] | None = None,
        overrides: list[str] | None = None,
        temperature: float | None = None,
    ) -> Path:
        cfg = tiny_config(*(overrides or []))
        states = {m: tiny_state(cfg, seed) for m, seed in (members or {"model": 0}).items()}
        calibration = {"temperature": temperature} if temperature is not None else None
        return save_bundle(tmp_path / name, cfg, states, {"input_channels": cfg.data.input_channels}, "# tiny",
                           calibration=calibration)

    return make


@pytest.fixture(scope="session")
def ct_dicom_dir(datasets_dir: Path) -> Path:
    return datasets_dir / "dicom_ct_series" / "dicom"


@pytest.fixture(scope="session")
def hippo_image(datasets_dir: Path) -> Path:
    return datasets_dir / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"
