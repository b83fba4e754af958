"""The web app through Streamlit's AppTest: real uploads from the shared datasets, the tiny test model.

Each test drives the page like a user (upload, choose, move the slider) and checks what the page shows against
values computed here independently (pixel counts, spacing, Dice), so a wrong number or a silent failure fails.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from app_inputs import APP_SCRIPT, TWO_SERIES_UID, dicom_zip
from PIL import Image
from streamlit.testing.v1 import AppTest

from medseg.io import read_scan

TIMEOUT = 180  # seconds per script run: inference on a shared 2-core CPU


def _app() -> AppTest:
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT)
    return at.run()


def _upload(at: AppTest, name: str, data: bytes, mime: str = "application/octet-stream") -> AppTest:
    at.file_uploader(key="scan_files").set_value((name, data, mime))
    return at.run()


def _assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _table(at: AppTest):
    assert len(at.table) >= 1, "the measurement table is missing"
    # Rows are headed by the label name; with a ground truth the comparison is a second table.
    merged = at.table[0].value
    for extra in at.table[1:]:
        merged = merged.join(extra.value)
    return merged.reset_index()


def _runs(at: AppTest) -> int:
    return at.session_state["inference_runs"] if "inference_runs" in at.session_state else 0


def _banner_shown(at: AppTest) -> bool:
    return any("Research use only" in w.value for w in at.warning)


def test_without_a_model_the_page_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(tmp_path))
    monkeypatch.delenv("MEDSEG_INFERENCE_URL", raising=False)
    at = _app()
    assert not at.exception
    text = " ".join(i.value for i in at.info)
    assert "No model found" in text and "make demo" in text and "medseg train" in text
    assert _banner_shown(at)


def test_png_upload_shows_mask_measurements_and_downloads(app_env: Path, datasets_dir: Path) -> None:
    image = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[0]
    data = image.read_bytes()
    at = _app()
    assert _banner_shown(at)
    at = _upload(at, image.name, data, "image/png")
    _assert_clean(at)
    assert _banner_shown(at)
    assert _runs(at) == 1

    result = at.session_state["result"]
    height, width = np.asarray(Image.open(image)).shape[:2]
    assert result.mask.shape == (height, width)
    assert len(at.image) == 1 and at.image[0].captions == ["pixel size unknown"]  # the overlay

    table = _table(at)
    row = table[table["Label"] == "nucleus"].iloc[0]
    pixels = int(np.count_nonzero(result.mask == 1))
    assert row["Pixels"] == pixels
    assert row["Area (px²)"] == pytest.approx(pixels)  # DSB PNGs state no pixel size: 1 px² per pixel
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Mask (PNG)", "Overlay (PNG, this view)"]

    # One audit line: input hash, model hash, timing; nothing that names the file.
    lines = app_env.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["input_sha256"] == hashlib.sha256(hashlib.sha256(data).digest()).hexdigest()
    assert record["weights_hash"] == result.info.weights_hash and record["model"] == "tiny-nuclei"
    assert record["seconds"] > 0
    assert record["device"] == ("CPU" if not torch.cuda.is_available() else f"GPU ({torch.cuda.get_device_name(0)})")
    assert image.stem not in lines[0]


def test_ground_truth_adds_dice_without_running_the_model_again(app_env: Path, datasets_dir: Path) -> None:
    image = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[0]
    truth_file = datasets_dir / "dsb2018_nuclei" / "masks" / image.name
    at = _upload(_app(), image.name, image.read_bytes(), "image/png")
    at.file_uploader(key="truth_file").set_value((truth_file.name, truth_file.read_bytes(), "image/png"))
    at.run()
    _assert_clean(at)
    assert _runs(at) == 1

    pred = at.session_state["result"].mask == 1
    truth = np.asarray(Image.open(truth_file)) == 255
    expected = 2 * np.count_nonzero(pred & truth) / (np.count_nonzero(pred) + np.count_nonzero(truth))
    row = _table(at).iloc[0]
    assert row["Dice"] == pytest.approx(expected, abs=1e-6)
    assert row["Truth area (px²)"] == np.count_nonzero(truth)
    assert "HD95 (px)" in _table(at).columns and len(at.table) == 2
    assert [c.label for c in at.get("segmented_control")] == ["Ground truth"]


def test_ground_truth_of_another_grid_is_refused_by_name(app_env: Path, datasets_dir: Path) -> None:
    images = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))
    image = images[0]
    other = next(p for p in images if Image.open(p).size != Image.open(image).size)
    truth_file = datasets_dir / "dsb2018_nuclei" / "masks" / other.name
    at = _upload(_app(), image.name, image.read_bytes(), "image/png")
    at.file_uploader(key="truth_file").set_value((truth_file.name, truth_file.read_bytes(), "image/png"))
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and truth_file.name in at.error[0].value and "Ground truth not used" in at.error[0].value
    assert "Dice" not in _table(at).columns  # the model's result is still shown, without a comparison


def test_nifti_volume_slider_planes_and_volume_without_rerunning_the_model(app_env: Path, datasets_dir: Path) -> None:
    path = datasets_dir / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"
    scan = read_scan(path)
    z, y, x = scan.spatial_shape
    at = _upload(_app(), path.name, path.read_bytes())
    _assert_clean(at)
    assert _runs(at) == 1
    result = at.session_state["result"]

    table = _table(at)
    voxels = int(np.count_nonzero(result.mask == 1))
    assert table.iloc[0]["Voxels"] == voxels
    assert table.iloc[0]["Volume (mL)"] == pytest.approx(voxels * np.prod(scan.geometry.spacing) / 1000)

    slider = at.slider(key=next(k for k in _keys(at, "slider") if k.startswith("slice_Axial")))
    assert (slider.min, slider.max) == (1, z)
    slider.set_value(3).run()
    _assert_clean(at)
    assert at.image[0].captions[0].startswith(f"Axial slice 3 of {z}")

    at.segmented_control(key=next(k for k in _keys(at, "segmented_control") if k.startswith("plane_"))).set_value(
        "Coronal"
    ).run()
    coronal = at.slider(key=next(k for k in _keys(at, "slider") if k.startswith("slice_Coronal")))
    assert coronal.max == y
    coronal.set_value(1).run()
    _assert_clean(at)
    assert at.image[0].captions[0].startswith(f"Coronal slice 1 of {y}")
    # Viewing never re-runs the model, and the audit log has one line for the one inference.
    assert _runs(at) == 1
    assert len(app_env.read_text().splitlines()) == 1
    assert [b.label for b in at.get("download_button")][0] == "Mask (NIfTI)"


def _keys(at: AppTest, kind: str) -> list[str]:
    return [w.key for w in at.get(kind) if w.key]


def test_dicom_zip_with_two_series_asks_which_then_offers_dicom_seg(app_env: Path, datasets_dir: Path) -> None:
    data = dicom_zip(datasets_dir, range(4), second_series=[0, 1, 2])
    at = _upload(_app(), "study.zip", data, "application/zip")
    assert not at.exception
    assert _runs(at) == 0  # nothing is segmented until a series is chosen
    picker = at.selectbox(key=next(k for k in _keys(at, "selectbox") if k.startswith("series_uid_")))
    # Issue 16: the picker leads with what a clinician recognises (description, date and time of the series, slice
    # count), not a 64-character UID, and never with the patient's name, ID or birth date.
    assert sorted(picker.options) == sorted([
        "CT Body 3.0 · CT · 2022-12-08 14:05:39 · 4 slices of 512×512",
        f"CT Body copy · CT · 2023-01-05 09:30 · 3 slices of 512×512 · series 2 · …{TWO_SERIES_UID[-8:]}"])
    assert not any(word in " ".join(picker.options) for word in ("Doe", "Jane", "PID-4711", "1961"))
    picker.set_value(TWO_SERIES_UID).run()
    _assert_clean(at)
    assert _runs(at) == 1
    result = at.session_state["result"]
    assert result.mask.shape == (3, 512, 512)
    assert result.scan.meta["series_uid"] == TWO_SERIES_UID
    assert [b.label for b in at.get("download_button")] == ["Mask (NIfTI)", "Overlay (PNG, this view)", "DICOM SEG"]
    at.run()  # any later rerun (another widget) keeps the chosen series and its result
    assert at.selectbox(key=picker.key).value == TWO_SERIES_UID
    assert _runs(at) == 1 and at.session_state["result"].scan.meta["series_uid"] == TWO_SERIES_UID
    # CT gets the window stored in the DICOM header by default, and the radiology presets.
    window = at.selectbox(key=next(k for k in _keys(at, "selectbox") if k.startswith("window_")))
    assert window.value == "From file"
    assert window.options[1:-1] == ["From file (W 300 / L 40)", "Soft tissue (W 400 / L 40)", "Lung (W 1500 / L -600)",
                                    "Bone (W 2500 / L 480)", "Brain (W 80 / L 40)", "Liver (W 150 / L 90)"]


def test_dicom_with_a_missing_slice_is_refused_unless_the_user_allows_it(app_env: Path, datasets_dir: Path) -> None:
    data = dicom_zip(datasets_dir, [0, 1, 2, 4, 5])  # slice 3 left out
    at = _upload(_app(), "gap.zip", data, "application/zip")
    assert not at.exception
    assert len(at.error) == 1 and "gap.zip: missing slices" in at.error[0].value
    assert "result" not in at.session_state and _runs(at) == 0  # no silently shifted mask
    at.checkbox(key=next(k for k in _keys(at, "checkbox") if k.startswith("allow_missing_"))).check()
    at.run()
    _assert_clean(at)
    notes = [w.value for w in at.warning if "missing slices" in w.value]
    assert len(notes) == 1 and "gap.zip" in notes[0]
    assert at.session_state["result"].mask.shape == (5, 512, 512)
    at.run()  # the choice persists on the next rerun
    _assert_clean(at)
    assert _runs(at) == 1


def test_corrupt_file_gets_a_one_line_error_naming_it(app_env: Path) -> None:
    at = _upload(_app(), "broken_scan.nii.gz", b"\x1f\x8b\x08\x00 not really a gzip stream at all")
    assert not at.exception  # no traceback on the page
    assert len(at.error) == 1
    message = at.error[0].value
    assert message.startswith("broken_scan.nii.gz") and "\n" not in message
    assert _runs(at) == 0 and "result" not in at.session_state


def test_with_sign_in_configured_nothing_shows_before_signing_in(app_env: Path) -> None:
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT)
    at.secrets["auth"] = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "test",
                          "client_id": "medseg", "client_secret": "test",
                          "server_metadata_url": "https://id.example.org/.well-known/openid-configuration"}
    at.user["is_logged_in"] = False
    at.run()
    assert not at.exception and _banner_shown(at)
    assert [b.label for b in at.button] == ["Sign in"]
    assert len(at.file_uploader) == 0  # no upload before signing in
    at.user["is_logged_in"] = True
    at.run()
    assert [b.label for b in at.button] == ["Sign out"]
    assert any(c.value == "Signed in as test@example.com" for c in at.caption)
    assert len(at.file_uploader) == 3  # scan files, DICOM folder, ground truth


def test_remote_service_mode_segments_through_the_service(
    app_env: Path, inference_service: str, datasets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDSEG_INFERENCE_URL", inference_service)
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(app_env.parent / "no-models-here"))  # the service has the model
    image = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[1]
    at = _upload(_app(), image.name, image.read_bytes(), "image/png")
    _assert_clean(at)
    result = at.session_state["result"]
    assert result.info.remote and result.info.name == "tiny-nuclei"
    assert result.info.device == "CPU (cpu) on the inference service"
    assert any("inference service" in c.value for c in at.caption)
    assert _table(at).iloc[0]["Pixels"] == np.count_nonzero(result.mask == 1)
    record = json.loads(app_env.read_text().splitlines()[-1])
    assert record["remote"] is True and record["weights_hash"] == result.info.weights_hash


def test_bundle_label_names_are_shown_as_text_not_markup(app_env: Path, datasets_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: a crafted labels.json hid the research-use banner (CSS) and showed a fake sign-in field."""
    from app_inputs import make_tiny_bundle

    models = tmp_path / "models"
    crafted = make_tiny_bundle(models / "crafted")
    labels = json.loads((crafted / "labels.json").read_text())
    hostile = '<style>.stAlert{display:none}</style><input placeholder="Password"> [sign in](http://x)'
    labels["1"]["name"] = hostile
    (crafted / "labels.json").write_text(json.dumps(labels))
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(models))
    image = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[0]
    at = _upload(_app(), image.name, image.read_bytes(), "image/png")
    _assert_clean(at)
    html = [e.proto.body for e in at.get("html")]
    assert html, "the legend swatches are missing"
    assert not any("<style" in body or "<input" in body for body in html), html
    labels_shown = [c.label for c in at.checkbox]
    assert not any("[sign in](" in label for label in labels_shown), labels_shown
    assert _banner_shown(at)


def test_uploads_sit_in_the_session_folder_under_neutral_names(app_env: Path, datasets_dir: Path,
                                                               tmp_path: Path) -> None:
    import time

    from app import session_files

    image = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[0]
    at = _upload(_app(), "Doe_John_1970-01-01.png", image.read_bytes(), "image/png")
    _assert_clean(at)
    root = tmp_path / "uploads"
    staged = [p for p in root.rglob("*") if p.is_file()]
    assert [p.name for p in staged] == ["scan.png"] and "Doe" not in str(staged)
    assert "Doe_John_1970-01-01.png" in " ".join(c.value for c in at.caption)  # the page names the user's file
    # The session ends (the runtime no longer lists it): its folder goes at the next sweep after the grace.
    session_files.sweep(root, lambda _sid: False, idle_s=0, now=time.time() + session_files.GONE_GRACE_S + 1)
    assert not any(p.exists() for p in staged)
