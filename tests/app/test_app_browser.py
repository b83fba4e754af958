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
def review_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reviews") / "reviews"


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def server(trained_models: Path, audit_log: Path, upload_dir: Path, review_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: run scripts/install_browser_deps.sh")
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "app.log"
    env = {**os.environ, "MEDSEG_AUDIT_LOG": str(audit_log), "MEDSEG_UPLOAD_DIR": str(upload_dir),
           "MEDSEG_REVIEW_DIR": str(review_dir), "MEDSEG_FINETUNE_USERS": "anonymous",
           "MEDSEG_FINETUNE_MINUTES": "0.5"}
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
    page.get_by_text("Segment a scan").wait_for(timeout=180_000)  # the first page imports torch: slow on a busy CPU
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


# ------------------------------------------------------------------------------------ issue 16: safety, review loop


def _open(browser, url: str, width: int = 1440, height: int = 900):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    page.get_by_text("Segment a scan").wait_for(timeout=180_000)  # the first page imports torch: slow on a busy CPU
    return page


def _upload(page, *paths: Path) -> None:
    page.get_by_test_id("stFileUploaderDropzoneInput").first.set_input_files([str(p) for p in paths])


def _mask_download(page, label: str = "Mask (PNG)") -> np.ndarray:
    with page.expect_download(timeout=60_000) as download:
        page.get_by_role("button", name=label).click()
    path = download.value.path()
    with Image.open(path) as im:
        return (np.asarray(im) > 0).astype(np.uint8)


def _settle(page, seconds: float = 1.5) -> None:
    """Wait until the script (or fragment) run that the last action started has finished."""
    time.sleep(seconds)
    page.wait_for_function(
        "() => ['notRunning', 'initial'].includes("
        "document.querySelector('[data-testid=\"stApp\"]')?.getAttribute('data-test-script-state'))",
        timeout=300_000,
    )
    time.sleep(0.3)


def _small_ct(tmp_path: Path, datasets_dir: Path) -> Path:
    """The real CT, all 20 slices, cropped to 256 x 256 (a volume the nuclei model segments in seconds)."""
    from medseg.io import Geometry, read_scan, write_scan

    scan = read_scan(datasets_dir / "dicom_ct_series" / "images" / "ct.nii.gz")
    scan.array = np.ascontiguousarray(scan.array[:, 128:384, 128:384])
    scan.geometry = Geometry.identity(scan.array.shape)
    return write_scan(scan, tmp_path / "small_ct.nii.gz")


def test_mismatched_scan_needs_run_anyway_and_progress_moves(server: str, browser, datasets_dir: Path,
                                                             tmp_path: Path, audit_log: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = _open(browser, server)
    _upload(page, _small_ct(tmp_path, datasets_dir))
    refusal = page.get_by_test_id("stAlertContentError").filter(has_text="does not look like what the model")
    refusal.wait_for(timeout=120_000)
    assert "3D volume" in refusal.inner_text()
    assert page.get_by_test_id("stTable").count() == 0
    page.screenshot(path=str(ARTIFACTS / "10_mismatch.png"))
    runs_before = len(audit_log.read_text().splitlines()) if audit_log.exists() else 0
    page.get_by_role("button", name="Run anyway").click()
    seen: list[str] = []
    deadline = time.monotonic() + 300
    while page.get_by_test_id("stTable").count() == 0:
        assert time.monotonic() < deadline, f"no result; progress seen: {seen}"
        text = page.evaluate("() => document.querySelector('[data-testid=\"stProgress\"]')?.innerText || ''")
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        time.sleep(0.02)
    percents = {int(m) for t in seen for m in re.findall(r"(\d+)%", t)}
    assert len(percents - {0, 100}) >= 2, seen  # the bar moved (slice by slice), it did not sit at 0 %
    assert any("elapsed" in t for t in seen), seen
    warning = page.get_by_test_id("stAlertContentWarning").filter(has_text="Run anyway")
    warning.wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "11_run_anyway.png"))
    lines = audit_log.read_text().splitlines()
    assert len(lines) == runs_before + 1 and '"run_anyway": true' in lines[-1]
    page.close()


def test_two_sessions_each_see_only_their_own_read_warnings(server: str, browser, datasets_dir: Path,
                                                            tmp_path: Path) -> None:
    from app_inputs import dicom_zip

    zips = {}
    for name, slices in (("first.zip", [0, 1, 2, 4]), ("second.zip", [5, 6, 8, 9])):
        zips[name] = tmp_path / name
        zips[name].write_bytes(dicom_zip(datasets_dir, slices))
    pages = {name: _open(browser, server) for name in zips}
    for name, page in pages.items():
        _upload(page, zips[name])
    boxes = {name: page.get_by_test_id("stCheckbox").filter(has_text="Segment this series anyway")
             for name, page in pages.items()}
    for box in boxes.values():
        box.wait_for(timeout=120_000)
    for box in boxes.values():  # both ticked at about the same time: both reads run at once
        box.locator("label").click()
    for name, page in pages.items():
        other = next(n for n in zips if n != name)
        note = page.get_by_test_id("stAlertContentWarning").filter(has_text="missing slices")
        note.first.wait_for(timeout=120_000)
        texts = " ".join(page.get_by_test_id("stAlertContentWarning").all_inner_texts())
        assert name in texts and other not in texts, texts
    for page in pages.values():
        page.close()


def test_twenty_mask_downloads_after_slider_moves_all_arrive(server: str, browser, datasets_dir: Path) -> None:
    page = _open(browser, server)
    _upload(page, datasets_dir / "dsb2018_nuclei" / "images" / IMAGE)
    page.get_by_test_id("stTable").wait_for(timeout=300_000)
    first = None
    opacity = page.get_by_role("slider").first
    for i in range(20):
        opacity.focus()
        opacity.press("ArrowLeft" if i % 2 else "ArrowRight")
        mask = _mask_download(page)  # right after the move, as the clinician did
        first = mask if first is None else first
        assert np.array_equal(mask, first), f"download {i + 1} differs"
    page.close()


def _editor_point(page, rows: int, cols: int, r: float, c: float) -> tuple[float, float]:
    """Screen coordinates of slice pixel (r, c)'s centre on the editor's image."""
    image = page.locator('[data-testid="medsegEditor"] img')
    image.scroll_into_view_if_needed()  # a click on a control may have scrolled the image out of the viewport
    box = image.bounding_box()
    assert box is not None
    return box["x"] + (c + 0.5) * box["width"] / cols, box["y"] + (r + 0.5) * box["height"] / rows


def _drag(page, rows: int, cols: int, r: int, c0: int, c1: int) -> list[tuple[int, int]]:
    x0, y = _editor_point(page, rows, cols, r, c0)
    x1, _ = _editor_point(page, rows, cols, r, c1)
    page.mouse.move(x0, y)
    page.mouse.down()
    page.mouse.move(x1, y, steps=12)
    page.mouse.up()
    _settle(page)
    return [(c0, r), (c1, r)]


def _tool(page, name: str) -> None:
    tool = page.get_by_test_id("stButtonGroup").get_by_role("radio", name=name, exact=True)
    # Centred, as a user would look at it: Playwright's own scrolling may leave a control at the viewport's top edge,
    # under Streamlit's fixed header, which then takes the click (the lost "Click prompt" clicks of the wrapped row).
    tool.evaluate("e => e.scrollIntoView({block: 'center'})")
    tool.click()
    _settle(page, 0.8)
    assert tool.get_attribute("aria-checked") == "true", f"the {name} tool was not chosen"


def _click(page, rows: int, cols: int, r: int, c: int, shift: bool = False) -> None:
    x, y = _editor_point(page, rows, cols, r, c)
    if shift:
        page.keyboard.down("Shift")
    page.mouse.click(x, y)
    if shift:
        page.keyboard.up("Shift")
    _settle(page)


def test_review_loop_edit_prompt_save_and_finetune(server: str, browser, datasets_dir: Path, trained_models: Path,
                                                   review_dir: Path) -> None:
    """Brush, eraser and undo change the mask exactly where drawn; a click prompt adds the region the model's
    probabilities support and another removes a component; correct and accept write the review folder; a
    fine-tune job produces a new version that the app then offers."""
    from app import editing
    from medseg.inference import Predictor
    from medseg.io import read_scan
    from medseg.review import read_reviews

    image = datasets_dir / "dsb2018_nuclei" / "images" / IMAGE
    page = _open(browser, server)
    _upload(page, image)
    page.get_by_test_id("stTable").wait_for(timeout=300_000)
    model = _mask_download(page)
    rows, cols = model.shape
    page.get_by_text("Edit mask", exact=True).click()
    page.locator('[data-testid="medsegEditor"] img').wait_for(timeout=60_000)
    _settle(page)

    # Brush (label nucleus, radius 4) along row 40, then the eraser along part of it, then undo the eraser.
    brushed = editing.brush(model, _drag(page, rows, cols, 40, 20, 80), 4, 1)
    assert np.array_equal(_mask_download(page), brushed)
    _tool(page, "Eraser")
    erased = editing.erase(brushed, _drag(page, rows, cols, 40, 40, 60), 4, 1)
    after_erase = _mask_download(page)
    page.screenshot(path=str(ARTIFACTS / "12_editing.png"))
    assert (brushed != erased).sum() > 0
    assert np.array_equal(after_erase, erased), (int((after_erase != erased).sum()), int((after_erase != brushed).sum()),
                                                 np.argwhere(after_erase != erased)[:10].tolist())
    page.get_by_role("button", name="Undo").click()
    _settle(page)
    assert np.array_equal(_mask_download(page), brushed)

    # Click prompts: where the model half-saw a nucleus (probability below the mask's threshold), a click adds the
    # region its probabilities support; a shift-click on a component removes it.
    predictor = Predictor.from_bundle(trained_models / "demo-nuclei", device="cpu")
    probs = predictor.predict_scan(read_scan(image), tta="none").probs[1]
    candidates = np.where((brushed == 0) & (probs < 0.5), probs, 0)
    r, c = np.unravel_index(int(np.argmax(candidates)), candidates.shape)
    assert candidates[r, c] >= editing.PROMPT_MIN_PROBABILITY, "the trained model has no uncertain region to prompt"
    _tool(page, "Click prompt")
    _click(page, rows, cols, int(r), int(c))
    prompted = editing.prompt_add(brushed, probs, int(c), int(r), 1)
    assert np.array_equal(_mask_download(page), prompted) and prompted.sum() > brushed.sum()
    fr, fc = np.argwhere(model > 0)[0]  # a component of the model's own mask, treated as a false positive
    _click(page, rows, cols, int(fr), int(fc), shift=True)
    removed = editing.prompt_remove(prompted, int(fc), int(fr))
    assert np.array_equal(_mask_download(page), removed)
    page.screenshot(path=str(ARTIFACTS / "13_prompts.png"))

    # Save the correction; accept a second image as it is.
    page.get_by_role("button", name="Save correction").click()
    page.get_by_test_id("stAlertContentSuccess").filter(has_text="Saved as corrected").wait_for(timeout=60_000)
    other = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[5]
    page.close()
    page = _open(browser, server)  # a second reviewer's session (one upload each: files add up in one uploader)
    _upload(page, other)
    page.get_by_test_id("stTable").wait_for(timeout=300_000)
    _settle(page)
    page.get_by_role("button", name="Accept").click()
    page.get_by_test_id("stAlertContentSuccess").filter(has_text="Saved as accepted").wait_for(timeout=60_000)
    reviews = read_reviews(review_dir)
    assert [r.verdict for r in reviews][-2:] == ["corrected", "accepted"]
    assert float(reviews[-2].dice_model_vs_final) < 1.0 and reviews[-1].who == "anonymous"
    corrected = (np.asarray(Image.open(review_dir / reviews[-2].mask)) > 0).astype(np.uint8)
    assert np.array_equal(corrected, removed)

    # Fine-tune: the job runs in the background; the new version is then offered by the model picker.
    page.get_by_role("button", name=re.compile(r"Fine-tune from \d+ reviewed cases")).click()
    page.get_by_test_id("stAlertContentSuccess").filter(has_text="New version ready").wait_for(timeout=600_000)
    page.screenshot(path=str(ARTIFACTS / "14_new_version.png"))
    assert (trained_models / "demo-nuclei-v2" / "config.yaml").is_file()
    versions = " ".join(page.get_by_test_id("stSidebar").get_by_test_id("stCaptionContainer").all_inner_texts())
    assert "v2: demo-nuclei-v2" in versions, versions
    page.close()


@pytest.mark.parametrize("width", [1280, 820])
def test_layout_does_not_clip_at_laptop_and_tablet_widths(server: str, browser, datasets_dir: Path,
                                                          width: int) -> None:
    page = _open(browser, server, width=width, height=900)
    _upload(page, datasets_dir / "dsb2018_nuclei" / "images" / IMAGE)
    page.get_by_test_id("stTable").wait_for(timeout=300_000)
    _settle(page)
    page.screenshot(path=str(ARTIFACTS / f"15_layout_{width}.png"), full_page=True)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{overflow} px clipped at {width} px"
    for element in (page.get_by_test_id("stImage").locator("img"), page.get_by_test_id("stTable").first,
                    page.get_by_role("button", name="Mask (PNG)")):
        box = element.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width + 1, (element, box)
    page.close()


def test_a_refused_upload_says_why_in_the_page(server: str, browser, tmp_path: Path) -> None:
    """Issue 16: the browser refused a wrong type (or a too large file) with a reason only in a tooltip."""
    page = _open(browser, server)
    wrong = tmp_path / "report.docx"
    wrong.write_bytes(b"PK\x03\x04 not a scan")
    _upload(page, wrong)
    error = page.get_by_test_id("stAlertContentError").filter(has_text="report.docx")
    error.wait_for(timeout=60_000)
    assert "does not read that type" in error.inner_text()
    page.close()


def _slider_value(page, label: str) -> str:
    return page.get_by_test_id("stSlider").filter(has_text=label).get_by_test_id("stSliderThumbValue").inner_text()


def _slice_number(page) -> int:
    return int(_slider_value(page, "Slice"))


def _scrolls_sideways(locator) -> list[str]:
    """Elements inside ``locator`` whose content is wider than they are and that scroll (or clip) it."""
    return locator.evaluate(
        "el => [el, ...el.querySelectorAll('*')].filter(e => e.scrollWidth > e.clientWidth + 1 && "
        "getComputedStyle(e).overflowX !== 'visible').map(e => e.tagName + '.' + e.className)")


def test_wheel_and_keys_move_slices_only_on_the_hovered_or_focused_canvas(server: str, browser, datasets_dir: Path,
                                                                          tmp_path: Path) -> None:
    """Issue 16: the wheel and the arrow / Page keys move through slices over the editing canvas (hovered) or while
    it has the focus, and nowhere else: scrolling the side column or pressing keys in another widget leaves the
    slice alone."""
    page = _open(browser, server)
    _upload(page, _small_ct(tmp_path, datasets_dir))
    page.get_by_role("button", name="Run anyway").click(timeout=120_000)
    page.get_by_test_id("stTable").first.wait_for(timeout=300_000)
    page.get_by_text("Edit mask", exact=True).click()
    stage = page.locator('[data-testid="medsegEditor"]')
    stage.locator("img").wait_for(timeout=60_000)
    _settle(page)
    _tool(page, "View")
    start = _slice_number(page)

    # Outside the canvas: the wheel over the measurements and keys in the page or in another widget.
    page.get_by_test_id("stTable").first.hover()
    page.mouse.wheel(0, 300)
    _settle(page)
    page.get_by_text("Measurements", exact=True).click()  # focus leaves every widget
    for key in ("ArrowDown", "PageDown", "ArrowRight"):
        page.keyboard.press(key)
    _settle(page)
    before = _slider_value(page, "Fill opacity")
    opacity = page.get_by_test_id("stSlider").filter(has_text="Fill opacity").get_by_role("slider")
    opacity.focus()
    opacity.press("ArrowLeft")  # the opacity slider's own key
    _settle(page)
    assert _slider_value(page, "Fill opacity") != before
    assert _slice_number(page) == start, "the slice moved though neither the canvas was hovered nor focused"

    # On the canvas: the wheel while hovered, the keys while focused.
    stage.hover()
    page.mouse.wheel(0, 120)
    _settle(page)
    assert _slice_number(page) == start + 1
    stage.click()  # the View tool: a click only focuses the canvas
    page.keyboard.press("PageDown")
    _settle(page)
    assert _slice_number(page) == start + 6
    page.screenshot(path=str(ARTIFACTS / "16_wheel_keys.png"))
    plane = page.get_by_test_id("stButtonGroup").filter(has_text="Sagittal")
    assert _scrolls_sideways(plane) == [], _scrolls_sideways(plane)  # all three planes visible at 1440 px
    page.close()


def test_editing_toolbar_wraps_instead_of_scrolling_at_1440(server: str, browser, datasets_dir: Path) -> None:
    """Issue 16: at 1440 x 900 the editing tools scrolled sideways in the side column; they wrap now, every tool
    visible inside the column."""
    page = _open(browser, server, width=1440, height=900)
    _upload(page, datasets_dir / "dsb2018_nuclei" / "images" / IMAGE)
    page.get_by_test_id("stTable").first.wait_for(timeout=300_000)
    page.get_by_text("Edit mask", exact=True).click()
    page.locator('[data-testid="medsegEditor"] img').wait_for(timeout=60_000)
    _settle(page)
    _tool(page, "Click prompt")  # shows the second control too (Add / Remove region)
    tools = page.get_by_test_id("stButtonGroup").filter(has_text="Brush")
    tools.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "17_toolbar_1440.png"))
    column = tools.locator("xpath=ancestor::*[@data-testid='stColumn'][1]").bounding_box()
    assert column is not None
    for name in ("View", "Brush", "Eraser", "Fill hole", "Delete region", "Click prompt"):
        box = tools.get_by_text(name, exact=True).bounding_box()
        assert box is not None and column["x"] <= box["x"] and box["x"] + box["width"] <= column["x"] + column["width"] + 1, \
            (name, box, column)
    for group in (tools, page.get_by_test_id("stButtonGroup").filter(has_text="Remove region")):
        assert _scrolls_sideways(group) == [], _scrolls_sideways(group)
    page.close()
