"""Issue 16, safety: the app refuses a scan unlike the model's training data until "Run anyway", records the
override, and names a barely trained model next to its name. Real scans, the tiny model with a real fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from app_inputs import APP_SCRIPT, dicom_zip
from streamlit.testing.v1 import AppTest

TIMEOUT = 180


@pytest.fixture
def fp_env(app_env: Path, fingerprinted_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(fingerprinted_models_dir))
    return app_env


def _runs(at: AppTest) -> int:
    return at.session_state["inference_runs"] if "inference_runs" in at.session_state else 0


def test_a_ct_for_the_nuclei_model_needs_run_anyway_and_is_recorded(fp_env: Path, datasets_dir: Path) -> None:
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT).run()
    at.file_uploader(key="scan_files").set_value(("ct.zip", dicom_zip(datasets_dir, range(3)), "application/zip"))
    at.run()
    assert not at.exception
    assert _runs(at) == 0  # nothing ran
    refusal = " ".join(e.value for e in at.error)
    assert "does not look like what the model was trained on" in refusal
    assert "trained on 2D images; this scan is a 3D volume" in refusal
    anyway = next(b for b in at.button if b.label == "Run anyway")
    anyway.click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert _runs(at) == 1
    assert any("Run anyway" in w.value and "3D volume" in w.value for w in at.warning)
    record = json.loads(fp_env.read_text().splitlines()[-1])
    assert record["run_anyway"] is True
    # The choice holds for this upload and model: moving on does not ask again or run again.
    at.run()
    assert _runs(at) == 1 and not at.error


def test_a_scan_that_fits_runs_without_asking_and_a_weak_model_is_named(fp_env: Path, datasets_dir: Path) -> None:
    image = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[2]
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT).run()
    # The tiny model's card states val Dice 0: the sidebar says so under its name, and the picker next to it.
    assert any("Barely trained" in w.value for w in at.sidebar.warning)
    assert at.selectbox(key="model_path").options == ["tiny-nuclei · barely trained"]
    at.file_uploader(key="scan_files").set_value((image.name, image.read_bytes(), "image/png"))
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert _runs(at) == 1
    assert "run_anyway" not in json.loads(fp_env.read_text().splitlines()[-1])
