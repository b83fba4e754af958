from __future__ import annotations

from pathlib import Path

import pytest

from medseg.config import ExperimentConfig, load_config
from medseg.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert set(cfg.data.label_map.values()) <= set(cfg.data.labels)


def test_experiments_only_differ_from_base() -> None:
    for path in CONFIGS:
        if path.parent.name == "experiments":
            assert path.read_text().count("base: ../base.yaml") == 1, path.name


def test_relative_data_root_resolves_against_the_file() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/experiments/demo_nuclei.yaml")
    assert cfg.data.root is not None and (cfg.data.root / "images").is_dir()


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "bad.yaml" in msg and "train.epochz" in msg and "epochs" in msg and "batch_size" in msg


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=3e-4", "data.patch_size=[64, 96]", "model.arch=unetplusplus"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.patch_size == (64, 96)
    assert cfg.model.arch == "unetplusplus"


def test_label_map_must_point_at_known_labels() -> None:
    with pytest.raises(ConfigError, match="label_map"):
        load_config(None, ["data.label_map={0: 0, 255: 3}"])


def test_experiment_dicts_replace_base_dicts() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/experiments/hippocampus_2p5d.yaml")
    assert cfg.data.label_map == {0: 0, 1: 1, 2: 2}  # the base's 255 -> 1 must not leak in
    assert cfg.data.labels == {0: "background", 1: "anterior", 2: "posterior"}
    assert cfg.train.optimizer == "adamw"  # untouched keys of a section still come from the base
