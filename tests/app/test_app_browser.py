"""The web app in a real browser: `medseg app` in a subprocess, driven by Playwright with Debian's Chromium.

Run with ``pytest -m browser`` after ``scripts/install_browser_deps.sh`` (Chromium from apt, the pinned playwright
from pip; Playwright never downloads a browser). Screenshots go to ``test-artifacts/app/``.

The model is trained here for a few minutes on the bundled DSB2018 sample (ImageNet Lite0 weights from the offline
package), so the page shows a real segmentation; ``MEDSEG_TEST_MODELS_DIR`` points at ready bundles instead
(e.g. ``models/`` after ``make demo``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from app_inputs import REPO
from PIL import Image

from medseg.bundle import RESEARCH_NOTICE

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts" / "app"
IMAGE = "003_0121d6759c5a.png"  # H&E, 256 x 320; not in the training sample


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ready = os.environ.get("MEDSEG_TEST_MODELS_DIR")
    if ready:
        return Path(ready)
    from medseg.config import load_config
    from medseg.engine.train import train

    cfg = load_config(REPO / "configs" / "experiments" / "demo_nuclei.yaml", [
        "train.epochs=2", "train.samples_per_epoch=32", "data.patch_size=[128, 128]", "data.limit_cases=12",
    ])
    out = tmp_path_factory.mktemp("browser_run")
    result = train(cfg, out / "run")
    models = out / "models"
    shutil.copytree(result.bundle, models / "demo-nuclei")
    return models


@pytest.fixture(scope="module")
def audit_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def server(trained_models: Path, audit_log: Path, upload_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: run scripts/install_browser_deps.sh")
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "app.log"
    env = {**os.environ, "MEDSEG_AUDIT_LOG": str(audit_log), "MEDSEG_UPLOAD_DIR": str(upload_dir)}
    env.pop("MEDSEG_INFERENCE_URL", None)
    with open(log, "wb") as out:
        # Own process group: the CLI starts Streamlit as its child, and both must stop with the test.
        proc = subprocess.Popen(
            [sys.executable, "-m", "medseg.cli", "app", "--models", str(trained_models), "--port", str(port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
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
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_upload_an_image_and_see_mask_and_area(server: str, browser, datasets_dir: Path, audit_log: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.goto(server)
    banner = page.get_by_test_id("stAlertContentWarning").filter(has_text="Research use only")
    banner.wait_for(timeout=60_000)
    page.get_by_text("Segment a scan").wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "01_start.png"))

    image = datasets_dir / "dsb2018_nuclei" / "images" / IMAGE
    page.get_by_test_id("stFileUploaderDropzoneInput").first.set_input_files(str(image))
    table = page.get_by_test_id("stTable")
    table.wait_for(timeout=300_000)
    overlay = page.get_by_test_id("stImage").locator("img")
    overlay.wait_for(timeout=60_000)
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(ARTIFACTS / "02_result.png"))

    assert banner.is_visible()
    box = overlay.bounding_box()
    assert box is not None and box["width"] > 200 and box["height"] > 150
    assert page.get_by_test_id("stException").count() == 0
    headers = [h.strip() for h in table.locator("thead th").all_inner_texts()]
    cells = [c.strip() for c in table.locator("tbody tr").first.locator("td, th").all_inner_texts()]
    row = dict(zip(headers[-len(cells):], cells, strict=True))
    assert row["Label"] == "nucleus"
    area = float(re.sub(r"[^\d.]", "", row["Area (px²)"]))
    assert area > 0

    # Moving a view control reruns only the viewer fragment: the model does not run again.
    opacity = page.get_by_role("slider").first
    opacity.focus()
    for _ in range(3):
        opacity.press("ArrowLeft")
    page.wait_for_load_state("networkidle")
    time.sleep(2)
    assert len(audit_log.read_text().splitlines()) == 1

    # The mask download is generated on click: the image's size, class indices 0/1, the notice in its text chunk.
    with page.expect_download(timeout=60_000) as download:
        page.get_by_role("button", name="Mask (PNG)").click()
    saved = ARTIFACTS / "downloaded_mask.png"
    download.value.save_as(saved)
    assert re.fullmatch(r"segmentation_[0-9a-f]{12}\.png", download.value.suggested_filename)
    with Image.open(saved) as mask, Image.open(image) as source:
        assert mask.size == source.size
        assert set(np.unique(np.asarray(mask))) <= {0, 1}
        assert mask.text["Disclaimer"] == RESEARCH_NOTICE
    page.screenshot(path=str(ARTIFACTS / "03_after_view_change.png"))
    page.close()


def test_closing_the_tab_deletes_the_upload(server: str, browser, datasets_dir: Path, upload_dir: Path) -> None:
    """Issue 15: the staged upload was still on disk 200 s after the tab closed, until the server stopped."""
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.goto(server)
    image = datasets_dir / "dsb2018_nuclei" / "images" / IMAGE
    named = upload_dir.parent / "Doe_John_1970-01-01.png"
    shutil.copy(image, named)
    before = {p for p in upload_dir.rglob("*") if p.is_file()}  # other sessions' uploads (earlier tests)
    page.get_by_test_id("stFileUploaderDropzoneInput").first.set_input_files(str(named))
    page.get_by_test_id("stTable").wait_for(timeout=300_000)
    staged = [p for p in upload_dir.rglob("*") if p.is_file() and p not in before]
    assert [p.name for p in staged] == ["scan.png"], staged  # neutral name, in the session's folder
    assert "Doe" not in " ".join(str(p) for p in upload_dir.rglob("*"))
    page.close()
    deadline = time.monotonic() + 180
    while any(p.exists() for p in staged):
        assert time.monotonic() < deadline, "the upload outlived its session by 3 minutes"
        time.sleep(2)
