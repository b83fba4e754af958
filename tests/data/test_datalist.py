from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.config import Intensity
from medseg.data import Case, discover_cases, load_or_make_splits, make_folds, read_datalist, train_val_ids
from medseg.data.preprocess import map_labels, normalize_intensity, to_channels
from medseg.errors import DatasetError
from medseg.io import read_scan

SAMPLE = Path(__file__).resolve().parents[2] / "examples/data/dsb2018_sample"


def test_discovers_pairs_by_stem() -> None:
    cases = discover_cases(SAMPLE, instances_dir="instances")
    assert len(cases) == 36
    for c in cases:
        assert c.image.stem == c.mask.stem == c.instances.stem == c.id


def test_nifti_stems(datasets_dir: Path) -> None:
    cases = discover_cases(datasets_dir / "msd_hippocampus")
    assert cases[0].id == "hippocampus_001" and cases[0].mask.name == "hippocampus_001.nii.gz"


def test_image_without_mask_is_named(tmp_path: Path) -> None:
    shutil.copytree(SAMPLE / "images", tmp_path / "images")
    shutil.copytree(SAMPLE / "masks", tmp_path / "masks")
    victim = sorted((tmp_path / "masks").iterdir())[3]
    victim.unlink()
    with pytest.raises(DatasetError, match=f"image without mask: {victim.name}"):
        discover_cases(tmp_path)


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="empty dataset"):
        discover_cases(tmp_path)


def test_csv_datalist_with_groups(tmp_path: Path) -> None:
    imgs = sorted((SAMPLE / "images").iterdir())[:6]
    lines = ["image,mask,group"] + [f"{p},{SAMPLE / 'masks' / p.name},{i // 2}" for i, p in enumerate(imgs)]
    (tmp_path / "list.csv").write_text("\n".join(lines))
    cases = read_datalist(tmp_path / "list.csv")
    assert [c.group for c in cases] == ["0", "0", "1", "1", "2", "2"]
    folds = make_folds(cases, 3, seed=1)
    for fold in folds:  # each group sits whole in one fold
        assert len({c.group for c in cases if c.id in fold}) == 1


def test_group_column_from_config_keeps_each_patient_in_one_fold(tmp_path: Path) -> None:
    from medseg.config import load_config
    from medseg.engine.train import load_cases, split_cases

    imgs = sorted((SAMPLE / "images").iterdir())[:8]
    lines = ["image,mask,patient_id"] + [f"{p},{SAMPLE / 'masks' / p.name},P{i // 2}" for i, p in enumerate(imgs)]
    (tmp_path / "list.csv").write_text("\n".join(lines))
    cfg = load_config(None, [f"data.datalist={tmp_path / 'list.csv'}", "data.group_column=patient_id", "data.folds=4"])
    cases = load_cases(cfg)
    assert [c.group for c in cases] == ["P0", "P0", "P1", "P1", "P2", "P2", "P3", "P3"]
    train, val = split_cases(cfg, cases, tmp_path)
    assert len(val) == 2 and val[0].group == val[1].group
    assert val[0].group not in {c.group for c in train}

    with pytest.raises(DatasetError, match="list.csv: no column 'patient'.*patient_id"):
        read_datalist(tmp_path / "list.csv", group_column="patient")
    with pytest.raises(Exception, match="group_column.*needs data.datalist"):
        load_cases(load_config(None, [f"data.root={SAMPLE}", "data.group_column=patient_id"]))


def test_splits_are_seeded_saved_and_reused(tmp_path: Path) -> None:
    cases = [Case(id=f"c{i}", image=Path(f"c{i}.png")) for i in range(20)]
    f1 = load_or_make_splits(tmp_path / "splits.json", cases, 5, seed=3)
    saved = json.loads((tmp_path / "splits.json").read_text())
    assert saved["folds"] == f1 and sorted(sum(f1, [])) == sorted(c.id for c in cases)
    assert load_or_make_splits(tmp_path / "splits.json", cases, 5, seed=3) == f1
    assert make_folds(cases, 5, seed=4) != f1
    train, val = train_val_ids(f1, 2)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 20


def test_label_mapping_and_errors() -> None:
    img = read_scan(SAMPLE / "images" / "000_00071198d059.png")
    mask = read_scan(SAMPLE / "masks" / "000_00071198d059.png")
    y = map_labels(mask, {0: 0, 255: 1}, img.spatial_shape, "m.png")
    assert set(np.unique(y)) == {0, 1} and (y == 1).sum() == (mask.array == 255).sum()
    with pytest.raises(DatasetError, match=r"m.png: mask values \[255\] are not in the label map"):
        map_labels(mask, {0: 0, 1: 1}, img.spatial_shape, "m.png")
    with pytest.raises(DatasetError, match="m.png: mask shape"):
        map_labels(mask, {0: 0, 255: 1}, (10, 10), "m.png")


def test_channels_and_intensity() -> None:
    gray = np.random.default_rng(0).random((1, 8, 8)).astype(np.float32) * 1000
    assert to_channels(gray, 3).shape == (3, 8, 8)
    assert to_channels(np.stack([gray[0]] * 3), 1).shape == (1, 8, 8)
    n = normalize_intensity(gray, Intensity.percentile)
    assert 0 <= n.min() and n.max() <= 1 and n.max() == 1
    ct = normalize_intensity(np.array([[-1000.0, 40.0, 1000.0]]), Intensity.ct_window, (400, 40))
    assert ct.tolist() == [[0.0, 0.5, 1.0]]


def test_touching_borders_open_a_gap_between_touching_objects_only() -> None:
    from medseg.data.preprocess import touching_borders

    inst = np.zeros((10, 20), np.int64)
    inst[2:8, 2:10] = 1
    inst[2:8, 10:16] = 2  # touches 1 along x = 9|10
    inst[0:2, 17:20] = 3  # isolated
    border = touching_borders(inst)
    assert border[2:8, 9].all() and border[2:8, 10].all()
    assert not border[:, :9].any() and not border[:, 11:].any()
    assert not border[inst == 0].any()
