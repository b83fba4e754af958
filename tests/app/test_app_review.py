"""Issue 16, the review loop through the page (AppTest): accept, correct (an edit applied as the canvas would
send it) and reject write the review dataset; the browser test drives the canvas itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from app_inputs import APP_SCRIPT
from streamlit.testing.v1 import AppTest

from app import editor
from app.display import Plane
from medseg.data.datalist import discover_cases
from medseg.io import read_mask
from medseg.review import read_reviews

TIMEOUT = 180


def _button(at: AppTest, key: str):
    return next(b for b in at.button if b.key == key)


def test_accept_then_correct_then_reject_write_the_review_folder(app_env: Path, datasets_dir: Path) -> None:
    reviews = app_env.parent / "reviews"
    image = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[3]
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT).run()
    at.file_uploader(key="scan_files").set_value((image.name, image.read_bytes(), "image/png")).run()
    assert not at.exception and not at.error
    assert _button(at, "review_correct").disabled  # nothing edited yet
    at.text_input(key="review_note").input("looks right").run()
    _button(at, "review_accept").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("Saved as **accepted**" in s.value for s in at.success)
    [row] = read_reviews(reviews)
    assert (row.verdict, row.who, row.note, row.dice_model_vs_final) == ("accepted", "anonymous", "looks right", "1.0000")

    # An edit as the canvas sends it: a brush stroke of label 1 across the image's top-left corner.
    result = at.session_state["result"]
    view = editor.EditorView(Plane.axial, 0, 1, "", "brush", 1, 6.0, False)
    assert editor.apply_event(result, view, {"kind": "stroke", "points": [[5, 5], [40, 5]]}) == ""
    assert result.was_edited and result.mask[5, 5:41].all()
    at.run()
    assert not _button(at, "review_correct").disabled and _button(at, "review_accept").disabled
    _button(at, "review_correct").click().run()
    rows = read_reviews(reviews)
    assert [r.verdict for r in rows] == ["accepted", "corrected"]
    assert float(rows[1].dice_model_vs_final) < 1.0
    saved = read_mask(reviews / rows[1].mask).array
    assert np.array_equal(saved, result.mask.astype(np.uint8) * 255)
    assert len(discover_cases(reviews)) == 1  # one case, its latest (corrected) mask

    _button(at, "review_reject").click().run()
    assert [r.verdict for r in read_reviews(reviews)] == ["accepted", "corrected", "rejected"]
    assert not (reviews / rows[1].mask).exists()


def test_fine_tune_button_only_for_allowed_users_and_versions_listed(app_env: Path, datasets_dir: Path,
                                                                     models_dir: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    import shutil

    from medseg.review import save_review

    reviews = app_env.parent / "reviews"
    for i, image in enumerate(sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[:2]):
        from medseg.io import read_scan

        scan = read_scan(image)
        mask = np.zeros(scan.spatial_shape, np.uint8)
        save_review(reviews, scan=scan, model_mask=mask, final_mask=mask, verdict="accepted", note="", who=None,
                    model="tiny-nuclei", model_version="", weights_hash="x", input_sha256=hashlib.sha256(str(i).encode()).hexdigest(),
                    label_map={0: 0, 255: 1}, num_classes=2)
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT).run()
    assert not [b for b in at.button if b.key == "finetune_start"]  # nobody may fine-tune by default
    monkeypatch.setenv("MEDSEG_FINETUNE_USERS", "anonymous")
    # A second version of the model beside the first: the picker and the sidebar list both.
    models = tmp_path / "models"
    shutil.copytree(models_dir / "tiny-nuclei", models / "tiny-nuclei")
    shutil.copytree(models_dir / "tiny-nuclei", models / "tiny-nuclei-v2")
    import json

    prep = models / "tiny-nuclei-v2" / "preprocessing.json"
    prep.write_text(json.dumps({**json.loads(prep.read_text()), "version": 2,
                                "lineage": {"dice_before": 0.5, "dice_after": 0.75}}))
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(models))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT).run()
    assert not at.exception
    start = _button(at, "finetune_start")
    assert start.label == "Fine-tune from 2 reviewed cases" and not start.disabled
    assert at.selectbox(key="model_path").options == ["tiny-nuclei · barely trained", "tiny-nuclei-v2 · barely trained"]
    versions = " ".join(c.value for c in at.sidebar.caption)
    assert "v1: tiny-nuclei" in versions and "v2: tiny-nuclei-v2" in versions and "0.500 → 0.750" in versions


def test_fine_tune_on_a_remote_service_then_segment_with_the_new_version(app_env: Path, datasets_dir: Path,
                                                                         finetuning_service, monkeypatch) -> None:
    """With MEDSEG_INFERENCE_URL the button uploads the reviews to the service, which trains and then serves the
    version; the sidebar's version picker offers it, and a scan segmented with it names that version."""
    import time

    from medseg.bundle import load_bundle
    from medseg.io import read_scan
    from medseg.review import save_review

    url, versions = finetuning_service
    reviews = app_env.parent / "reviews"
    root = datasets_dir / "dsb2018_nuclei"
    for i, image in enumerate(sorted((root / "images").glob("*.png"))[:3]):
        truth = (read_mask(root / "masks" / image.name).array > 0).astype(np.uint8)
        save_review(reviews, scan=read_scan(image), model_mask=np.zeros_like(truth), final_mask=truth,
                    verdict="corrected", note="", who=None, model="tiny-nuclei", model_version="", weights_hash="x",
                    input_sha256=hashlib.sha256(str(i).encode()).hexdigest(), label_map={0: 0, 255: 1},
                    num_classes=2)
    monkeypatch.setenv("MEDSEG_INFERENCE_URL", url)
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(app_env.parent / "no-models-here"))  # the service has the model
    monkeypatch.setenv("MEDSEG_FINETUNE_USERS", "anonymous")
    monkeypatch.setenv("MEDSEG_FINETUNE_MINUTES", "0.1")
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert not [s for s in at.selectbox if s.key == "remote_version"]  # one model on the service: nothing to pick
    start = _button(at, "finetune_start")
    assert start.label == "Fine-tune from 3 reviewed cases" and "on the inference service" in start.help
    start.click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("Fine-tuning the next version" in i.value for i in at.info)
    deadline = time.monotonic() + 300
    while any("Fine-tuning the next version" in i.value for i in at.info):  # the page polls the service's job
        assert time.monotonic() < deadline, "the service's fine-tuning job did not finish"
        time.sleep(1.5)
        at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("New version ready: **tiny-nuclei-v2**" in s.value and "inference service" in s.value
               for s in at.success), [s.value for s in at.success]
    picker = at.selectbox(key="remote_version")
    assert picker.options[0] == "tiny-nuclei · v1" and picker.options[1].startswith("tiny-nuclei-v2 · v2 · held-aside")
    assert picker.value == "tiny-nuclei"  # the served model stays the default until someone picks the new one
    picker.set_value("tiny-nuclei-v2").run()
    image = sorted((root / "images").glob("*.png"))[8]
    at.file_uploader(key="scan_files").set_value((image.name, image.read_bytes(), "image/png")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    result = at.session_state["result"]
    assert result.info.remote and result.info.version == "2"
    assert result.info.weights_hash == load_bundle(versions / "tiny-nuclei-v2").weights_hash
    assert any("version 2" in c.value for c in at.caption)
