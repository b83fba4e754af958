"""The web app (Streamlit AppTest) and the inference service (FastAPI over uvicorn): no patient identifiers in
what they show, log, audit or hand out, and 8 users at once get their own results, without errors.

The load tests are ``slow`` (8 inferences at once on a shared CPU): ``pytest -m slow tests/reliability``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import robust_harness as h

from medseg.io import read_scan

REPO = Path(__file__).resolve().parents[2]
APP_SCRIPT = REPO / "app" / "streamlit_app.py"
TIMEOUT = 300  # seconds per AppTest script run / service job on a shared 2-core CPU
CLIENT = {"X-Medseg-Client": "tests"}  # the service refuses POSTs without it
pytestmark = pytest.mark.skipif(not APP_SCRIPT.is_file() or not (REPO / "medseg/service/app.py").is_file(),
                                reason="app/ or medseg/service not present")


@pytest.fixture(scope="module")
def models_dir(random_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(random_bundle, folder / "random-nuclei")
    return folder


@pytest.fixture(scope="module")
def identified_zip(seeds: h.Seeds, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = tmp_path_factory.mktemp("identified")
    series = h.write_identified_series(seeds, folder / "series", h.IDENTIFIERS)
    # Member folders named after the patient, as PACS exports do.
    return h.zip_folder(series, folder / "upload.zip", prefix="PID7Q93817/Zqxwv_Privacyname/").read_bytes()


# ------------------------------------------------------------------------------------------------ app


@pytest.fixture
def app_env(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import sys

    if str(REPO) not in sys.path[:1]:
        sys.path.insert(0, str(REPO))  # tests/ on sys.path must not shadow the app package
    audit = tmp_path / "audit.log"
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("MEDSEG_AUDIT_LOG", str(audit))
    monkeypatch.delenv("MEDSEG_INFERENCE_URL", raising=False)
    return audit


@contextmanager
def recorded_downloads() -> Iterator[list[tuple[str, str, bytes]]]:
    """(label, file name, bytes) of every st.download_button the page creates."""
    import streamlit as st

    real = st.download_button
    seen: list[tuple[str, str, bytes]] = []

    def download_button(label, data, file_name=None, *args, **kwargs):
        raw = data() if callable(data) else data  # Streamlit accepts a callable that makes the bytes on click
        raw = raw.getvalue() if isinstance(raw, io.BytesIO) else raw.encode() if isinstance(raw, str) else bytes(raw)
        seen.append((str(label), str(file_name), raw))
        return real(label, data, file_name, *args, **kwargs)

    st.download_button = download_button
    try:
        yield seen
    finally:
        st.download_button = real


def _page_text(at) -> str:
    """Every string the page holds (all elements' protobufs, main area and sidebar)."""
    parts: list[str] = []

    def walk(node) -> None:
        proto = getattr(node, "proto", None)
        if proto is not None:
            parts.append(str(proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return "\n".join(parts)


def _app_upload(name: str, data: bytes):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT).run()
    at.file_uploader(key="scan_files").set_value((name, data, "application/zip"))
    return at.run()


def test_app_shows_logs_and_exports_no_identifiers(app_env: Path, identified_zip: bytes,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    with recorded_downloads() as downloads:
        at = _app_upload("upload.zip", identified_zip)
    assert not at.exception, [e.message for e in at.exception]
    result = at.session_state["result"]
    assert result.mask.shape == (6, 96, 96)
    hits = [f"page: {n}" for n in h.find_identifiers(_page_text(at))]
    hits += [f"audit log: {n}" for n in h.find_identifiers(app_env.read_bytes())]
    out, err = capfd.readouterr()
    hits += [f"stdout/stderr: {n}" for n in h.find_identifiers(out + err)]
    assert downloads, "no download offered"
    saved = app_env.parent / "downloads"
    saved.mkdir()
    for i, (label, file_name, data) in enumerate(downloads):
        hits += [f"download file name {file_name}: {n}" for n in h.find_identifiers(file_name)]
        if data[128:132] != b"DICM":  # a DICOM SEG carries the patient module by definition
            (saved / f"{i}_{label.split()[0]}").write_bytes(data)
    hits += [f"download {hit}" for hit in h.scan_tree(saved)]
    assert not hits, hits
    record = json.loads(app_env.read_text().splitlines()[-1])
    assert record["input_sha256"] and "upload" not in app_env.read_text()


def test_app_with_a_broken_upload_names_no_patient_folder(app_env: Path, identified_zip: bytes) -> None:
    """A slice cut inside its header, in a folder named after the patient: the warning names the file only."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(identified_zip)) as src, zipfile.ZipFile(buf, "w") as dst:
        for i, name in enumerate(src.namelist()):
            data = src.read(name)
            dst.writestr(name, data[:1500] if i == 2 else data)
    at = _app_upload("upload.zip", buf.getvalue())
    assert not at.exception, [e.message for e in at.exception]
    text = _page_text(at)
    assert "could not be parsed" in text and "IM0003.dcm" in text, text[:3000]
    assert not h.find_identifiers(text)


def _predict_in_process(bundle: Path, paths: list[Path]) -> list[np.ndarray]:
    from medseg.inference import Predictor

    predictor = Predictor.from_bundle(bundle, device="cpu")
    return [predictor.predict_scan(read_scan(p)).mask for p in paths]


def _user_inputs(datasets_dir: Path) -> list[Path]:
    """8 different real images (several sizes) for 8 users."""
    images = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))
    return images[:8]


@pytest.mark.slow
def test_app_eight_concurrent_sessions_get_their_own_results(app_env: Path, datasets_dir: Path,
                                                             random_bundle: Path) -> None:
    from streamlit.testing.v1 import AppTest

    paths = _user_inputs(datasets_dir)
    expected = _predict_in_process(random_bundle, paths)
    sessions = [AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT).run() for _ in paths]
    barrier = threading.Barrier(len(paths))

    def user(i: int):
        at = sessions[i]
        at.file_uploader(key="scan_files").set_value((paths[i].name, paths[i].read_bytes(), "image/png"))
        barrier.wait()  # all press "upload" together
        return at.run()

    with ThreadPoolExecutor(len(paths)) as pool:
        finished = list(pool.map(user, range(len(paths))))
    for i, at in enumerate(finished):
        assert not at.exception, (paths[i].name, [e.message for e in at.exception])
        assert not at.error, (paths[i].name, [e.value for e in at.error])
        mask = at.session_state["result"].mask
        label_map_mask = (mask > 0)
        assert mask.shape == expected[i].shape, paths[i].name
        assert np.array_equal(label_map_mask, expected[i] > 0), f"session {i} got another user's mask"
    lines = [json.loads(line) for line in app_env.read_text().splitlines()]
    want = {hashlib.sha256(hashlib.sha256(p.read_bytes()).digest()).hexdigest() for p in paths}
    assert {r["input_sha256"] for r in lines} == want and len(lines) == len(paths)


# ------------------------------------------------------------------------------------------------ service


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_service(bundle: Path, work_dir: Path, max_queued: int = 16) -> Iterator[str]:
    import uvicorn

    from medseg.service.app import create_app
    from medseg.service.settings import ServiceSettings

    app = create_app(bundle, ServiceSettings(work_dir=work_dir, device="cpu", max_queued=max_queued))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_config=None,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "service did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(60)


def _segment(client, name: str, data: bytes) -> tuple[str, dict]:
    r = client.post("/v1/segment", files={"file": (name, data, "application/octet-stream")})
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job}").json()
        if status["status"] in ("done", "failed"):
            return job, status
        time.sleep(0.2)
    raise AssertionError(f"job {job} not finished in {TIMEOUT} s")


def test_service_logs_and_results_hold_no_identifiers(random_bundle: Path, identified_zip: bytes, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    import httpx

    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    responses = tmp_path / "responses"
    responses.mkdir()
    with running_service(random_bundle, tmp_path / "work") as url, httpx.Client(base_url=url, timeout=60, headers=CLIENT) as client:
        job, status = _segment(client, "upload.zip", identified_zip)
        assert status["status"] == "done", status
        texts.append(json.dumps(status))
        for path in ("/mask?format=nifti", "/uncertainty?format=npz", "/report"):
            r = client.get(f"/v1/jobs/{job}{path}")
            assert r.status_code == 200, (path, r.text)
            texts.append(r.headers.get("content-disposition", ""))
            (responses / f"{len(texts)}").write_bytes(r.content)
        seg = client.get(f"/v1/jobs/{job}/mask", params={"format": "dicom-seg"})
        texts.append(seg.headers.get("content-disposition", ""))  # the SEG body carries the patient module
        slip = h.raw_zip([{"name": "../PID7Q93817/Zqxwv_Privacyname/IM0001.dcm", "data": b"x"}])
        r = client.post("/v1/segment", files={"file": ("upload2.zip", slip, "application/zip")})
        assert r.status_code == 422, r.text
        texts.append(r.text)
        texts.append(client.get("/v1/models").text)
        texts.append(client.get("/health").text)
        work_names = "\n".join(str(p.relative_to(tmp_path / "work")) for p in (tmp_path / "work").rglob("*"))
    texts.append(caplog.text)
    texts += h.scan_tree(responses)  # mask, uncertainty and report bodies, decoded
    out, err = capfd.readouterr()
    texts += [out, err, work_names]
    hits = h.find_identifiers("\n".join(texts))
    assert not hits, (hits, [t[:500] for t in texts if h.find_identifiers(t)])


@pytest.mark.slow
def test_service_eight_concurrent_clients_get_their_own_masks(random_bundle: Path, datasets_dir: Path,
                                                              tmp_path: Path) -> None:
    import httpx
    import SimpleITK as sitk

    paths = _user_inputs(datasets_dir)
    expected = _predict_in_process(random_bundle, paths)
    barrier = threading.Barrier(len(paths))

    def client_run(i: int, url: str) -> np.ndarray:
        with httpx.Client(base_url=url, timeout=120, headers=CLIENT) as client:
            barrier.wait()
            job, status = _segment(client, paths[i].name, paths[i].read_bytes())
            assert status["status"] == "done", (paths[i].name, status)
            r = client.get(f"/v1/jobs/{job}/mask", params={"format": "nifti"})
            assert r.status_code == 200, r.text
            f = tmp_path / f"mask_{i}.nii.gz"
            f.write_bytes(r.content)
            return sitk.GetArrayFromImage(sitk.ReadImage(str(f)))

    with running_service(random_bundle, tmp_path / "work") as url, ThreadPoolExecutor(len(paths)) as pool:
        masks = list(pool.map(lambda i: client_run(i, url), range(len(paths))))
    for i, mask in enumerate(masks):
        assert mask.shape == expected[i].shape, paths[i].name
        assert np.array_equal(mask > 0, expected[i] > 0), f"client {i} got another client's mask"
