"""Uploads are really gone after a session (issue 15, finding 4): neutral names on disk, folders swept."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from app_inputs import dicom_zip

from app import session_files
from app.settings import load_settings
from app.uploads import StagedUpload, UploadedBytes, read_staged
from medseg.errors import ScanReadError


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEDSEG_UPLOAD_DIR", str(tmp_path / "uploads"))
    for name in ("MEDSEG_MAX_UPLOAD_MB", "MEDSEG_MAX_VOXELS"):
        monkeypatch.delenv(name, raising=False)
    return load_settings()


def _all_names(root: Path) -> str:
    return " ".join(str(p.relative_to(root)) for p in root.rglob("*"))


def test_staged_files_carry_no_uploaded_name_but_messages_do(settings, datasets_dir: Path) -> None:
    folder = session_files.session_folder(settings.upload_dir, "session-1")
    image = datasets_dir / "dsb2018_nuclei" / "images" / "000_00071198d059.png"
    stage = StagedUpload(UploadedBytes.from_files([("Doe_John_1970-01-01.png", image.read_bytes())]), settings, folder)
    assert "Doe" not in _all_names(settings.upload_dir) and stage.root.parent == folder
    assert read_staged(stage, settings).scan.source == "Doe_John_1970-01-01.png"  # the user sees their name
    stage.close()

    broken = StagedUpload(UploadedBytes.from_files([("Doe_Jane.nii.gz", b"\x1f\x8b\x08\x00 not gzip")]), settings,
                          folder)
    assert "Doe" not in _all_names(settings.upload_dir)
    with pytest.raises(ScanReadError, match=r"^Doe_Jane\.nii\.gz: "):
        read_staged(broken, settings)
    broken.close()

    # A DICOM folder upload (relative paths that name the patient) and a zip of one: neutral names, no extraction
    # left behind in the session folder.
    files = sorted((datasets_dir / "dicom_ct_series" / "dicom").glob("*.dcm"))[:2]
    series = StagedUpload(UploadedBytes.from_files([(f"Doe^John/{f.name}", f.read_bytes()) for f in files]),
                          settings, folder)
    assert "Doe" not in _all_names(settings.upload_dir) and "IM0" not in _all_names(settings.upload_dir)
    assert read_staged(series, settings).scan.spatial_shape[0] == 2
    zipped = StagedUpload(UploadedBytes.from_files([("Doe_John_CT.zip", dicom_zip(datasets_dir, range(2)))]),
                          settings, folder)
    assert read_staged(zipped, settings).scan.source == "Doe_John_CT.zip"
    assert "Doe" not in _all_names(settings.upload_dir) and "IM0" not in _all_names(settings.upload_dir)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folders_of_ended_sessions_and_dead_servers_are_swept(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    live = session_files.session_folder(root, "live")
    ended = session_files.session_folder(root, "ended")
    (ended / "upload-x").mkdir()
    (ended / "upload-x" / "scan.png").write_bytes(b"pixels")
    dead_server = root / str(_dead_pid()) / "old-session"
    dead_server.mkdir(parents=True)
    assert oct(root.stat().st_mode & 0o777) == "0o700" and oct(live.stat().st_mode & 0o777) == "0o700"

    # Just ended: kept for the grace period (a reconnecting tab keeps its files), then deleted.
    active = {"live"}.__contains__
    assert session_files.sweep(root, active, idle_s=3600) == [dead_server.parent.name]
    assert ended.exists()
    later = time.time() + session_files.GONE_GRACE_S + 1
    assert session_files.sweep(root, active, idle_s=3600, now=later) == ["ended"]
    assert live.exists() and not ended.exists() and not dead_server.parent.exists()

    # Without a Streamlit runtime to ask, a folder unused for idle_s goes.
    assert session_files.sweep(root, None, idle_s=60, now=time.time() + 30) == []
    assert session_files.sweep(root, None, idle_s=60, now=time.time() + 61) == ["live"]


def test_the_janitor_thread_sweeps_on_its_own(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    folder = session_files.session_folder(root, "gone")
    old = time.time() - 10
    os.utime(folder, (old, old))
    janitor = session_files.Janitor(root, idle_s=1, interval_s=0.05).start()
    try:
        deadline = time.monotonic() + 30
        while folder.exists():
            assert time.monotonic() < deadline, "the janitor did not remove the folder"
            time.sleep(0.05)
    finally:
        janitor.stop()
