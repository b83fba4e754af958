"""The worklist's store (per-user file, statuses, no identifiers in names) and an upload case through the page;
the PACS cases are tested against a real Orthanc in tests/pacs/test_app_pacs.py."""

from __future__ import annotations

import json
from pathlib import Path

from app_inputs import APP_SCRIPT
from streamlit.testing.v1 import AppTest

from app.worklist import CaseStatus, Worklist, status_after_result, worklist_file

TIMEOUT = 180


def test_worklist_file_per_user_dedupe_and_statuses(tmp_path: Path) -> None:
    alice = Worklist.load(tmp_path, "alice@example.org")
    case = alice.add_pacs("pacs", "1.2.3", "1.2.3.4", "2023-03-01 · CT · Chest")
    assert alice.add_pacs("pacs", "1.2.3", "1.2.3.4", "again") is case  # one case per series
    upload = alice.add_upload("ab" * 32, "upload · 1 file(s)")
    assert [c.status for c in alice.cases] == [CaseStatus.queued, CaseStatus.queued]
    alice.update(case, status=CaseStatus.done)
    path = worklist_file(tmp_path, "alice@example.org")
    assert "alice" not in path.name and path.stat().st_mode & 0o777 == 0o600
    again = Worklist.load(tmp_path, "alice@example.org")
    assert [(c.case_id, c.status) for c in again.cases] == [(case.case_id, "done"), (upload.case_id, "queued")]
    assert Worklist.load(tmp_path, "bob").cases == []  # each user has their own list
    assert status_after_result(again.cases[0], None) == CaseStatus.done
    assert status_after_result(again.cases[0], "accepted") == CaseStatus.reviewed
    again.update(again.cases[0], status=CaseStatus.sent)
    assert status_after_result(again.cases[0], "accepted") == CaseStatus.sent  # sent stays sent
    again.remove(upload.case_id)
    assert [c.case_id for c in Worklist.load(tmp_path, "alice@example.org").cases] == [case.case_id]
    path.write_text("{not json")
    assert Worklist.load(tmp_path, "alice@example.org").cases == []  # damaged: set aside, not a crash
    assert path.with_suffix(".damaged").exists()


def test_an_upload_goes_into_the_worklist_and_opens(app_env: Path, datasets_dir: Path,
                                                    monkeypatch) -> None:
    lists = app_env.parent / "worklists"
    monkeypatch.setenv("MEDSEG_WORKLIST_DIR", str(lists))
    image = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[2]
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT).run()
    assert any("No PACS is configured" in c.value for c in at.caption)
    at.file_uploader(key="scan_files").set_value((image.name, image.read_bytes(), "image/png")).run()
    next(b for b in at.button if b.key == "worklist_add_upload").click().run()
    [path] = lists.glob("*.json")
    [case] = json.loads(path.read_text())["cases"]
    assert case["source"] == "upload" and case["status"] == "queued" and image.stem not in path.read_text()
    next(b for b in at.button if b.key == "worklist_open").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert json.loads(path.read_text())["cases"][0]["status"] == "done"
    next(b for b in at.button if b.key == "review_accept").click().run()
    assert json.loads(path.read_text())["cases"][0]["status"] == "reviewed"
    assert not any(b.key == "worklist_send" for b in at.button)  # uploads have no PACS to send to
