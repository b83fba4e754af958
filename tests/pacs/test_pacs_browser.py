"""The PACS browser and worklist in a real browser (``-m browser``): `medseg app` with the Orthanc endpoint, driven
by Playwright with Debian's Chromium; search, add a series, open it, and screenshot the segmented case
(``test-artifacts/app/pacs_worklist.png``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from orthanc_server import Pacs, write_endpoints_yaml

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "app"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_pacs_worklist_in_the_browser(pacs: Pacs, pacs_bundle: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: run scripts/install_browser_deps.sh")
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny").symlink_to(pacs_bundle, target_is_directory=True)
    port = _free_port()
    env = {**os.environ, "MEDSEG_UPLOAD_DIR": str(tmp_path / "uploads"), "MEDSEG_REVIEW_DIR": str(tmp_path / "rv"),
           "MEDSEG_WORKLIST_DIR": str(tmp_path / "worklists"), "MEDSEG_AUDIT_LOG": str(tmp_path / "audit.log"),
           "MEDSEG_DICOMWEB_ENDPOINTS": str(write_endpoints_yaml(tmp_path / "endpoints.yaml", pacs))}
    env.pop("MEDSEG_INFERENCE_URL", None)
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "medseg.cli", "app", "--models", str(models), "--port",
                                 str(port)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"medseg app did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox",
                                                                            "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1500, "height": 1300})
            page.set_default_timeout(150_000)
            page.goto(url)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            try:
                _drive(page, expect)
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "pacs_worklist_failure.png"), full_page=True)
                raise
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _drive(page, expect) -> None:
    expect.set_options(timeout=150_000)  # a busy 2-core CI machine: searches and segmentation take a while
    page.get_by_role("tab", name="Find in PACS").click()
    page.get_by_label("Description contains").fill("Follow")
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_role("combobox", name="Study", exact=True)).to_be_visible()  # the table is a canvas grid
    page.get_by_role("combobox", name="Study", exact=True).click()
    page.get_by_role("option", name="2023-03-01 · CT · Follow-up chest").click()
    page.get_by_role("combobox", name="Series to add").click()
    page.get_by_role("option").first.click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Add to worklist").click()
    expect(page.get_by_text("Added 1 series to your worklist")).to_be_visible()
    page.get_by_role("tab", name="My cases").click()
    page.locator(".st-key-worklist_open button").click()  # "Open" alone also names the selectboxes' toggles
    expect(page.get_by_text("Review the result first")).to_be_visible()
    expect(page.get_by_text("segmented by")).to_be_visible()
    expect(page.get_by_text("Follow-up chest · CT Body 3.0 · series 3 · done")).to_be_visible()  # the case line
    page.screenshot(path=str(ARTIFACTS / "pacs_worklist.png"), full_page=True)
