"""Fine-tuning through the inference service (issue 16): the app's reviewed cases uploaded as a zip, the next version
trained on the service's machine, then listed by ``GET /v1/versions`` and served under ``/versions/<name>``."""

from __future__ import annotations

import hashlib
import io
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import running_service

from medseg.bundle import load_bundle
from medseg.inference import Predictor
from medseg.io import read_mask, read_scan
from medseg.review import save_review, zip_reviews
from medseg.service.client import RemoteInferenceError, RemotePredictor
from medseg.service.guards import CLIENT_HEADER
from medseg.service.settings import ServiceSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))
from app_inputs import make_tiny_bundle  # noqa: E402

HEADERS = {CLIENT_HEADER: "test"}


def _reviews(folder: Path, datasets_dir: Path, n: int) -> Path:
    """``n`` real nuclei images corrected to their ground truth, saved as the app saves them."""
    root = datasets_dir / "dsb2018_nuclei"
    for i, image in enumerate(sorted((root / "images").glob("*.png"))[:n]):
        scan = read_scan(image)
        truth = (read_mask(root / "masks" / image.name).array > 0).astype(np.uint8)
        save_review(folder, scan=scan, model_mask=np.zeros_like(truth), final_mask=truth, verdict="corrected",
                    note="", who="tester", model="tiny-nuclei", model_version="", weights_hash="x",
                    input_sha256=hashlib.sha256(str(i).encode()).hexdigest(), label_map={0: 0, 255: 1}, num_classes=2)
    return folder


@pytest.fixture(scope="module")
def served_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("served") / "tiny-nuclei")


def _settings(tmp_path: Path, **kw) -> ServiceSettings:
    return ServiceSettings(work_dir=tmp_path / "work", device="cpu", finetune_dir=tmp_path / "versions",
                           finetune_max_minutes=0.25, **kw)


def test_fine_tuning_is_off_unless_a_versions_folder_is_set(service: str, tmp_path: Path, datasets_dir: Path) -> None:
    zipped = zip_reviews(_reviews(tmp_path / "reviews", datasets_dir, 2), tmp_path / "reviews.zip")
    r = httpx.post(f"{service}/v1/finetune", headers=HEADERS, files={"reviews": zipped.read_bytes()})
    assert r.status_code == 404
    with RemotePredictor(service) as client:
        assert [v["base_path"] for v in client.versions()] == [""]  # just the served model
        with pytest.raises(RemoteInferenceError, match=r"did not start fine-tuning \(404\)"):
            client.start_finetune(zipped)


def test_uploads_that_are_not_a_review_folder_are_refused(served_bundle: Path, tmp_path: Path,
                                                          datasets_dir: Path) -> None:
    reviews = _reviews(tmp_path / "reviews", datasets_dir, 1)

    def zipped(extra: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.write(reviews / "reviews.csv", "reviews.csv")
            for sub in ("images", "masks"):
                for p in (reviews / sub).iterdir():
                    zf.write(p, f"{sub}/{p.name}")
            for name, data in extra.items():
                zf.writestr(name, data)
        return buf.getvalue()

    with running_service(served_bundle, _settings(tmp_path, api_token="s3cret")) as url:
        auth = {**HEADERS, "Authorization": "Bearer s3cret"}

        def post(data: bytes) -> httpx.Response:
            return httpx.post(f"{url}/v1/finetune", headers=auth, files={"reviews": ("r.zip", data)})

        assert post(b"not a zip").status_code == 422
        # A MetaImage header could point at any file on the service's disk: nothing but PNG/NIfTI is taken.
        r = post(zipped({"images/case_0123456789abcdef.mhd": b"ElementDataFile = /etc/passwd\n"}))
        assert r.status_code == 422 and "unexpected member 'case_0123456789abcdef.mhd'" in r.json()["error"]
        r = post(zipped({}))  # one reviewed case: nothing to hold aside
        assert r.status_code == 422 and "needs at least 2" in r.json()["error"]
        # The token guards the versions' APIs like /v1.
        assert httpx.get(f"{url}/versions/tiny-nuclei-v2/v1/models").status_code == 401
        r = httpx.get(f"{url}/versions/tiny-nuclei-v2/v1/models", headers=auth)
        assert r.status_code == 404 and "no fine-tuned version" in r.json()["error"]
        assert httpx.post(f"{url}/v1/finetune", headers={"Authorization": "Bearer s3cret"},
                          files={"reviews": ("r.zip", zipped({}))}).status_code == 403  # no client header


def test_fine_tune_over_http_then_the_new_version_is_listed_and_served(served_bundle: Path, tmp_path: Path,
                                                                       datasets_dir: Path) -> None:
    zipped = zip_reviews(_reviews(tmp_path / "reviews", datasets_dir, 5), tmp_path / "reviews.zip")
    image = read_scan(sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[10])
    with running_service(served_bundle, _settings(tmp_path)) as url, RemotePredictor(url) as client:
        job = client.start_finetune(zipped, max_minutes=0.1)
        with pytest.raises(RemoteInferenceError, match=r"\(409\).*running"):  # one job at a time
            client.start_finetune(zipped)
        deadline = time.monotonic() + 300
        while (status := client.finetune_status(job))["status"] == "running":
            assert time.monotonic() < deadline, status
            time.sleep(1)
        assert status["status"] == "done", status
        assert (status["version"], status["model"], status["parent"]) == (2, "tiny-nuclei-v2", "tiny-nuclei")
        new = load_bundle(tmp_path / "versions" / "tiny-nuclei-v2")
        assert status["weights_hash"] == new.weights_hash != client.weights_hash  # it trained
        assert new.preprocessing["lineage"]["parent_weights_hash"] == client.weights_hash
        assert (new.preprocessing["lineage"]["reviewed_train_cases"], new.preprocessing["lineage"]["held_aside_cases"]) \
            == (4, 1)

        listed = client.versions()
        assert [(v["name"], v["version"], v["base_path"]) for v in listed] == [
            ("tiny-nuclei", 1, ""), ("tiny-nuclei-v2", 2, "/versions/tiny-nuclei-v2")]
        assert listed[1]["dice_after"] == status["dice_after"]
        # The version's API is the whole service API: segment with it exactly as in-process.
        with RemotePredictor(url + listed[1]["base_path"]) as v2:
            assert v2.weights_hash == new.weights_hash
            remote = v2.predict_scan(image, tta="none")
        local = Predictor.from_bundle(new, device="cpu").predict_scan(image, tta="none")
        assert np.array_equal(remote.mask, local.mask)
        # The served bundle still answers at the root, unchanged.
        assert client.predict_scan(image, tta="none").mask.shape == local.mask.shape


def test_serve_finetune_dir_flag_turns_fine_tuning_on(served_bundle: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`medseg serve --finetune-dir` (not only the environment) reaches the settings, and a service built from
    them has the fine-tuning and versions routes."""
    from dataclasses import replace

    from typer.testing import CliRunner

    import medseg.service.server
    from medseg.cli import app

    monkeypatch.delenv("MEDSEG_SERVICE_FINETUNE_DIR", raising=False)
    monkeypatch.delenv("MEDSEG_SERVICE_FINETUNE_MAX_MINUTES", raising=False)
    seen: list[ServiceSettings] = []
    monkeypatch.setattr(medseg.service.server, "serve", lambda bundle, host, port, settings: seen.append(settings))
    runner = CliRunner()
    res = runner.invoke(app, ["serve", str(served_bundle), "--device", "cpu", "--finetune-dir",
                              str(tmp_path / "versions"), "--finetune-max-minutes", "5"])
    assert res.exit_code == 0, res.output
    assert (seen[0].finetune_dir, seen[0].finetune_max_minutes) == (tmp_path / "versions", 5.0)
    assert runner.invoke(app, ["serve", str(served_bundle), "--device", "cpu"]).exit_code == 0
    assert seen[1].finetune_dir is None  # off without the flag or the variable
    assert "--finetune-dir" in runner.invoke(app, ["serve", "--help"]).output

    with running_service(served_bundle, replace(seen[0], work_dir=tmp_path / "work")) as url:
        listed = httpx.get(f"{url}/v1/versions")
        assert listed.status_code == 200 and [v["base_path"] for v in listed.json()["versions"]] == [""]
        r = httpx.post(f"{url}/v1/finetune", headers=HEADERS, files={"reviews": ("r.zip", b"not a zip")})
        assert r.status_code == 422  # the route is there (404 with fine-tuning off) and vets the upload
        r = httpx.get(f"{url}/versions/tiny-nuclei-v2/v1/models")
        assert r.status_code == 404 and "no fine-tuned version" in r.json()["error"]
    assert (tmp_path / "versions").is_dir()
