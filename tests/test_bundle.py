from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medseg.bundle import find_bundles, load_bundle, save_bundle
from medseg.config import load_config
from medseg.errors import BundleError


def _save(path: Path, value: float = 1.0) -> Path:
    cfg = load_config(None, ["name=tiny", "data.labels={0: bg, 1: thing}"])
    members = {"fold0": {"w": torch.full((2, 3), value)}, "fold1": {"w": torch.zeros(2, 3)}}
    return save_bundle(path, cfg, members, {"channels": 3}, "# tiny", calibration={"temperature": 1.5},
                       extra_files={"splits.json": "{}"})


def test_round_trip(tmp_path: Path) -> None:
    b = load_bundle(_save(tmp_path / "b"))
    assert b.config.name == "tiny"
    assert b.labels[1]["name"] == "thing" and b.labels[1]["color"].startswith("#")
    members = b.load_members()
    assert sorted(members) == ["fold0", "fold1"]
    assert torch.equal(members["fold0"]["w"], torch.ones(2, 3))
    assert b.calibration == {"temperature": 1.5}
    assert (b.path / "splits.json").is_file()
    assert len(b.weights_hash) == 16
    assert find_bundles(tmp_path) == [tmp_path / "b"]


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tmp_path: Path) -> None:
    _save(tmp_path / "b", 1.0)
    h1 = load_bundle(tmp_path / "b").weights_hash
    _save(tmp_path / "b", 2.0)
    b = load_bundle(tmp_path / "b")
    assert b.weights_hash != h1 and torch.equal(b.load_members()["fold0"]["w"], torch.full((2, 3), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_incomplete_bundle_is_named(tmp_path: Path) -> None:
    path = _save(tmp_path / "b")
    (path / "labels.json").unlink()
    with pytest.raises(BundleError, match="b: incomplete bundle, labels.json is missing"):
        load_bundle(path)
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(tmp_path / "nothing")
