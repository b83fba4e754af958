"""Model-scan compatibility (issue 16): fingerprints of real shared datasets against real scans of other kinds."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.data.datalist import discover_cases
from medseg.inference.compatibility import card_val_dice, check_scan, training_quality
from medseg.io import read_scan
from medseg.planning.fingerprint import compute_fingerprint


def _summary(root: Path, n: int = 4) -> dict:
    return compute_fingerprint(discover_cases(root), max_cases=n).summary()


@pytest.fixture(scope="module")
def nuclei_fp(datasets_dir: Path) -> dict:
    return _summary(datasets_dir / "dsb2018_nuclei")


@pytest.fixture(scope="module")
def hippocampus_fp(datasets_dir: Path) -> dict:
    return _summary(datasets_dir / "msd_hippocampus")


def test_a_scan_like_the_training_data_fits(nuclei_fp: dict, hippocampus_fp: dict, datasets_dir: Path) -> None:
    nuclei = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[-1]
    assert check_scan(read_scan(nuclei), nuclei_fp).ok
    hippo = sorted((datasets_dir / "msd_hippocampus" / "images").glob("*.nii.gz"))[-1]
    assert check_scan(read_scan(hippo), hippocampus_fp).ok


def test_a_ct_volume_does_not_fit_a_2d_nuclei_model(nuclei_fp: dict, datasets_dir: Path) -> None:
    ct = read_scan(datasets_dir / "dicom_ct_series" / "dicom")
    fit = check_scan(ct, nuclei_fp)
    assert not fit.ok
    assert any("trained on 2D images; this scan is a 3D volume" in p for p in fit.problems), fit.problems


def test_a_ct_does_not_fit_an_mri_hippocampus_model(hippocampus_fp: dict, datasets_dir: Path) -> None:
    ct = read_scan(datasets_dir / "dicom_ct_series" / "dicom")
    fit = check_scan(ct, {**hippocampus_fp, "modality": "MR"})
    text = fit.text()
    assert "trained on MR scans; this scan is CT" in text
    assert "much larger" in text  # 512 x 512 slices against 30-50 voxel crops
    # Without a stated modality the intensity range still gives it away (HU against MR values).
    assert "intensities" in check_scan(ct, hippocampus_fp).text()


def test_a_grey_xray_does_not_fit_an_rgb_only_model(nuclei_fp: dict, datasets_dir: Path) -> None:
    cxr = read_scan(sorted((datasets_dir / "montgomery_cxr_lung" / "images").glob("*.png"))[0])
    fit = check_scan(cxr, {**nuclei_fp, "channels": [3]})
    assert any("colour (RGB) images; this scan is grey" in p for p in fit.problems), fit.problems


def test_weak_models_are_named_as_such() -> None:
    card = "| metric | value |\n|---|---|\n| val Dice foreground (shipped model, 8 cases) | 0.31 |\n" \
           "| val Dice (foreground mean, shipped model) | 0.2875 |\n"
    assert card_val_dice(card) == pytest.approx(0.2875)
    assert training_quality(2, 0.2875) == "Barely trained: trained 2 epochs, val Dice 0.29"
    assert training_quality(100, 0.91) == ""
    assert training_quality(None, None) == ""
