"""The app's PACS browser and worklist through the page (Streamlit AppTest) against the real Orthanc: search,
add a series to the worklist, open it (retrieve + segment), review, confirm, send the SEG by STOW-RS, and find
it on the PACS referencing the source series."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pytest
from dicomweb_client import DICOMwebClient
from orthanc_server import PATIENT_ID, PATIENT_NAME, Pacs, write_endpoints_yaml
from streamlit.testing.v1 import AppTest

from medseg.io.dicomweb import find_segs

REPO = Path(__file__).resolve().parents[2]
APP_SCRIPT = REPO / "app" / "streamlit_app.py"
TIMEOUT = 240


@pytest.fixture
def pacs_app_env(pacs: Pacs, pacs_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny").symlink_to(pacs_bundle, target_is_directory=True)
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(models))
    monkeypatch.setenv("MEDSEG_AUDIT_LOG", str(tmp_path / "audit.log"))
    monkeypatch.setenv("MEDSEG_UPLOAD_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("MEDSEG_REVIEW_DIR", str(tmp_path / "reviews"))
    monkeypatch.setenv("MEDSEG_WORKLIST_DIR", str(tmp_path / "worklists"))
    monkeypatch.setenv("MEDSEG_DICOMWEB_ENDPOINTS", str(write_endpoints_yaml(tmp_path / "endpoints.yaml", pacs)))
    for name in ("MEDSEG_INFERENCE_URL", "MEDSEG_FINETUNE_USERS", "MEDSEG_MAX_UPLOAD_MB", "MEDSEG_MAX_VOXELS"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _button(at: AppTest, key: str):
    return next(b for b in at.button if b.key == key)


def _tables(at: AppTest, column: str) -> list:
    """The tables on the page that have ``column`` (AppTest does not expose dataframe keys)."""
    return [d.value for d in at.dataframe if column in d.value.columns]


def _worklist(env: Path) -> list[dict]:
    [path] = (env / "worklists").glob("*.json")
    assert len(path.stem) == 24 and "anonymous" not in path.name  # named by a hash of the user
    text = path.read_text()
    assert PATIENT_NAME not in text and PATIENT_ID not in text
    return json.loads(text)["cases"]


def test_browse_add_open_review_and_send_the_seg(pacs: Pacs, pacs_app_env: Path, tmp_path: Path) -> None:
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    at.text_input(key="pacs_description").input("Follow-up")
    next(b for b in at.button if b.label == "Search").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    [studies] = _tables(at, "Accession")
    assert list(studies.columns) == ["Date", "Modalities", "Description", "Patient", "Patient ID", "Accession",
                                     "Series"]
    assert list(studies["Description"]) == ["Follow-up chest"] and list(studies["Date"]) == ["20230301"]
    at.selectbox(key="pacs_study").select(0).run()
    [series] = _tables(at, "Images")
    assert list(series["Modality"]) == ["CT"] and list(series["Images"]) == ["3"]
    at.multiselect(key="pacs_series").select(0).run()
    _button(at, "pacs_add").click().run()
    [case] = _worklist(pacs_app_env)
    assert case["status"] == "queued" and case["series_uid"] == pacs.followup.series_uid
    assert case["label"].startswith("2023-03-01 · CT · Follow-up chest")

    _button(at, "worklist_open").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    result = at.session_state["result"]
    assert result.scan.meta["series_uid"] == pacs.followup.series_uid and result.mask.shape == (3, 128, 128)
    assert _worklist(pacs_app_env)[0]["status"] == "done"
    assert not any(b.key == "worklist_send" for b in at.button)  # nothing to send before a review

    _button(at, "review_accept").click().run()
    assert _worklist(pacs_app_env)[0]["status"] == "reviewed"
    assert _button(at, "worklist_send").disabled  # not before the user confirms
    at.checkbox(key=f"send_confirm_{case['case_id']}").check().run()
    _button(at, "worklist_send").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    [sent] = _worklist(pacs_app_env)
    assert sent["status"] == "sent" and sent["seg_sop_uid"]

    study = pacs.followup
    stored = [s for s in find_segs(pacs.endpoint, study.study_uid, study.series_uid)]
    client = DICOMwebClient(pacs.endpoint.url, headers=pacs.endpoint.headers())
    segs = []
    for s in stored:
        for meta in client.search_for_instances(study.study_uid, s["SeriesInstanceUID"]):
            if meta["00080018"]["Value"][0] == sent["seg_sop_uid"]:
                segs.append(client.retrieve_instance(study.study_uid, s["SeriesInstanceUID"], sent["seg_sop_uid"]))
    [ds] = segs
    ds.save_as(tmp_path / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uid
    assert int(seg.NumberOfFrames) == sum(int((result.mask[z] == 1).any()) for z in range(3))
    audit = (pacs_app_env / "audit.log").read_text() if (pacs_app_env / "audit.log").exists() else ""
    assert PATIENT_NAME not in audit and PATIENT_ID not in audit
