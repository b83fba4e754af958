"""End to end through the CLI on real data: train -> bundle -> predict/evaluate, 2D and 2.5D, plus bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medseg.bundle import load_bundle
from medseg.cli import app
from medseg.io import read_scan

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples/data/dsb2018_sample"
TINY = ["--set", "data.patch_size=[64, 64]", "--set", "train.batch_size=4", "--set", "inference.tile_size=[128, 128]"]
runner = CliRunner()


@pytest.fixture(scope="module")
def nuclei_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nuclei")
    res = runner.invoke(app, ["train", str(REPO / "configs/experiments/demo_nuclei.yaml"), "--out", str(out),
                              "--epochs", "1", "--limit-cases", "10", *TINY])
    assert res.exit_code == 0, res.output
    return out


def test_train_writes_bundle_curves_and_metrics(nuclei_run: Path) -> None:
    for f in ("bundle/config.yaml", "bundle/labels.json", "bundle/preprocessing.json", "bundle/model_card.md",
              "bundle/weights/model.safetensors", "bundle/splits.json", "progress.png", "metrics.csv", "splits.json"):
        assert (nuclei_run / f).is_file(), f
    b = load_bundle(nuclei_run / "bundle")
    assert b.config.data.limit_cases == 10 and b.labels[1]["name"] == "nucleus"
    assert "val Dice" in b.model_card and "Research use only" in b.model_card
    assert (nuclei_run / "metrics.csv").read_text().count("\n") == 2  # header + 1 epoch
    # The sample has instance maps: the shipped model's object metrics are in the card and the run record.
    assert "val AJI (shipped model" in b.model_card and "val PQ (shipped model" in b.model_card
    import json

    result = json.loads((nuclei_run / "run_info.json").read_text())["result"]
    assert 0.0 <= result["val_aji_shipped"] <= 1.0 and 0.0 <= result["val_pq_shipped"] <= 1.0


def test_predict_writes_masks_and_overlays_and_isolates_bad_files(nuclei_run: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = sorted((SAMPLE / "images").iterdir())[-3:]  # includes a 360x360 image (odd size for the net)
    for p in good:
        shutil.copy(p, inputs / p.name)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(nuclei_run / "bundle"), str(inputs), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "broken.png" in res.output and "3 of 4 inputs segmented" in res.output
    for p in good:
        mask = read_scan(out / f"{p.stem}_mask.png")
        assert mask.spatial_shape == read_scan(p).spatial_shape
        assert set(np.unique(mask.array)) <= {0, 1}  # class indices (README "Prediction outputs")
        assert (out / f"{p.stem}_overlay.png").is_file()
    assert not (out / "broken_mask.png").exists()


def test_evaluate_reports_dice_and_hd95(nuclei_run: Path, tmp_path: Path) -> None:
    csv = tmp_path / "eval.csv"
    res = runner.invoke(app, ["evaluate", str(nuclei_run / "bundle"), "--split", "val", "--out", str(csv)])
    assert res.exit_code == 0, res.output
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("case,label,dice,iou,hd95") and len(lines) == 1 + 2  # 10 cases, 5 folds -> 2 val
    # The sample has instance maps (data.instances_dir): AJI and PQ of the same predictions, per case.
    assert "objects" in res.output and "AJI" in res.output and "PQ" in res.output
    import csv as csvlib

    from medseg.data import discover_cases
    from medseg.inference import Predictor
    from medseg.metrics import object_metrics

    rows = list(csvlib.DictReader(lines))
    case = next(c for c in discover_cases(SAMPLE, instances_dir="instances") if c.id == rows[0]["case"])
    pred = Predictor.from_bundle(nuclei_run / "bundle").predict_scan(read_scan(case.image)).mask
    expected = object_metrics(pred, read_scan(case.instances).array)
    assert float(rows[0]["aji"]) == pytest.approx(expected["aji"]) and float(rows[0]["pq"]) == pytest.approx(expected["pq"])


def test_hippocampus_2p5d_train_and_predict_keeps_geometry(datasets_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "hippo"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
        for p in sorted((datasets_dir / "msd_hippocampus" / sub).iterdir())[:5]:
            shutil.copy(p, data / sub / p.name)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(REPO / "configs/experiments/hippocampus_2p5d.yaml"), "--data", str(data),
                              "--out", str(out), "--epochs", "1", "--set", "data.patch_size=[32, 32]",
                              "--set", "model.pretrained=none"])
    assert res.exit_code == 0, res.output
    assert load_bundle(out / "bundle").preprocessing["input_channels"] == 5
    src = sorted((data / "images").iterdir())[0]
    res = runner.invoke(app, ["predict", str(out / "bundle"), str(src), "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    mask = sitk.ReadImage(str(tmp_path / "pred" / "hippocampus_001_mask.nii.gz"))
    ref = sitk.ReadImage(str(src))
    assert mask.GetSize() == ref.GetSize()
    assert np.allclose(mask.GetSpacing(), ref.GetSpacing())
    assert np.allclose(mask.GetOrigin(), ref.GetOrigin())
    assert np.allclose(mask.GetDirection(), ref.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1, 2}


# ------------------------------------------------------------------------------------------ bad input
def _dataset(tmp_path: Path, n: int = 6) -> Path:
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        for p in sorted((SAMPLE / sub).iterdir())[:n]:
            shutil.copy(p, tmp_path / sub / p.name)
    return tmp_path


def _train_error(tmp_path: Path, data: Path, *extra: str) -> str:
    res = runner.invoke(app, ["train", str(REPO / "configs/experiments/demo_nuclei.yaml"), "--data", str(data),
                              "--out", str(tmp_path / "o"), "--epochs", "1", "--set", "data.folds=3", *TINY, *extra])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:"), res.output
    return res.output


def test_unknown_config_key(tmp_path: Path) -> None:
    out = _train_error(tmp_path, _dataset(tmp_path / "d"), "--set", "train.epochz=2")
    assert "unknown key 'train.epochz'" in out and "epochs" in out


def _train_leaving_out(tmp_path: Path, data: Path) -> str:
    """One bad case among many: reported, left out, and the run still trains on the rest."""
    res = runner.invoke(app, ["train", str(REPO / "configs/experiments/demo_nuclei.yaml"), "--data", str(data),
                              "--out", str(tmp_path / "o"), "--epochs", "1", "--set", "data.folds=3", *TINY])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "left out" in res.output
    assert (tmp_path / "o" / "bundle" / "weights" / "model.safetensors").is_file()
    return res.output


def _poison_mask_values(victim: Path) -> None:
    arr = read_scan(victim).array.copy()
    arr[:5, :5] = 7
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(victim))


def test_mask_values_not_in_label_map(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "d", 6)
    victim = sorted((data / "masks").iterdir())[1]
    _poison_mask_values(victim)
    out = _train_leaving_out(tmp_path, data)
    assert victim.name in out and "[7]" in out and "label map" in out
    card = (tmp_path / "o" / "bundle" / "model_card.md").read_text()
    assert "left out" in card and victim.name in card


def test_many_bad_masks_stop_the_run(tmp_path: Path) -> None:
    # A wrong label map shows up in many masks at once: that is not one bad case to skip.
    data = _dataset(tmp_path / "d", 12)
    victims = sorted((data / "masks").iterdir())[:3]
    for v in victims:
        _poison_mask_values(v)
    out = _train_error(tmp_path, data)
    assert "3 of" in out and victims[0].name in out and "label map" in out


def test_mask_shape_mismatch(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "d", 6)
    victim = sorted((data / "masks").iterdir())[0]
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12), np.uint8)), str(victim))
    out = _train_leaving_out(tmp_path, data)
    assert victim.name in out and "shape" in out


def test_image_without_mask_and_empty_dataset(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "d")
    sorted((data / "masks").iterdir())[2].unlink()
    assert "image without mask" in _train_error(tmp_path, data)
    empty = tmp_path / "e"
    (empty / "images").mkdir(parents=True)
    assert "empty dataset" in _train_error(tmp_path, empty)


def test_corrupt_image_in_training_data(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "d", 6)
    victim = sorted((data / "images").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])
    assert victim.name in _train_leaving_out(tmp_path, data)


def test_4d_input_to_predict_is_refused(nuclei_run: Path, tmp_path: Path) -> None:
    img = sitk.GetImageFromArray(np.zeros((2, 3, 8, 8), np.float32))
    sitk.WriteImage(img, str(tmp_path / "four_d.nii.gz"))
    res = runner.invoke(app, ["predict", str(nuclei_run / "bundle"), str(tmp_path / "four_d.nii.gz"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "four_d.nii.gz" in res.output and "Traceback" not in res.output
