"""``RemotePredictor``: the inference service behind ``medseg.inference.Predictor``'s interface, for the web app
(used when ``MEDSEG_INFERENCE_URL`` is set) and scripts.

Satisfies ``medseg.inference.protocol.ScanPredictor``: ``predict_scan(scan, tta=..., progress=...)`` uploads the scan (2D uint8/uint16 grey or uint8 RGB as PNG, everything else as NIfTI —
both lossless, so the server sees the same array and geometry), polls the job, downloads the mask (NIfTI) and
the uncertainty (.npz) and returns a ``Prediction`` on the scan's own geometry.

Difference from the in-process Predictor: the service does not return class probabilities, so
``Prediction.probs`` is the one-hot encoding of the mask ``(K, *spatial)`` float32 (0/1). Anything that needs
calibrated probabilities (e.g. a threshold slider) must run in-process.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import TTAMode
from medseg.errors import MedsegError
from medseg.inference.predictor import Prediction
from medseg.inference.protocol import Progress
from medseg.io import Geometry, Scan, write_scan


class RemoteInferenceError(MedsegError):
    """The inference service refused a scan, failed on it, or could not be reached."""


def _error_text(response: Any) -> str:
    try:
        return str(response.json().get("error") or response.text)
    except ValueError:
        return response.text[:200]


def encode_scan(scan: Scan) -> tuple[str, bytes]:
    """``(file name, bytes)`` of a lossless file holding ``scan``'s array and geometry."""
    a = scan.array
    raster_ok = not scan.is_volume and (
        (a.ndim == 2 and a.dtype in (np.uint8, np.uint16)) or (a.ndim == 3 and a.shape[-1] == 3 and a.dtype == np.uint8)
    )
    name = "scan.png" if raster_ok else "scan.nii.gz"
    with tempfile.TemporaryDirectory(prefix="medseg-upload-") as tmp:
        path = write_scan(scan, Path(tmp) / name)
        return name, path.read_bytes()


def _read_nifti_bytes(data: bytes) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="medseg-download-") as tmp:
        path = Path(tmp) / "mask.nii.gz"
        path.write_bytes(data)
        image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), Geometry.from_sitk(image)


class RemotePredictor:
    """Predict through the service at ``base_url`` (e.g. ``http://gpu-1:8000``).

    ``timeout``: seconds per HTTP request. ``wait_timeout``: seconds one scan may take in total (queue + run);
    a full queue (429) is retried after the server's Retry-After within that time. ``poll_interval``: seconds
    between status polls. ``transport``: an ``httpx`` transport (tests, proxies); None for the network.
    ``token``: the service's API token (``MEDSEG_SERVICE_API_TOKEN`` there); None: ``MEDSEG_INFERENCE_TOKEN``.
    Every request carries the ``X-Medseg-Client`` header the service requires on uploads.
    """

    def __init__(self, base_url: str, timeout: float = 60.0, wait_timeout: float = 600.0, poll_interval: float = 0.25,
                 transport: Any = None, token: str | None = None) -> None:
        import httpx

        from medseg import __version__
        from medseg.service.guards import CLIENT_HEADER

        self.base_url = base_url.rstrip("/")
        self.wait_timeout = wait_timeout
        self.poll_interval = poll_interval
        token = token if token is not None else os.environ.get("MEDSEG_INFERENCE_TOKEN", "").strip() or None
        headers = {CLIENT_HEADER: f"medseg/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport, headers=headers)
        info = self._get_json("/v1/models")["models"][0]
        self.info = info
        self.name: str = info["name"]
        self.weights_hash: str = info["weights_hash"]
        self.labels: dict[int, dict[str, str]] = {int(k): dict(v) for k, v in info["labels"].items()}
        self.num_classes: int = int(info["num_classes"])
        self.model_card: str = info.get("model_card", "")
        self.label_map: dict[int, int] = {int(k): int(v) for k, v in info["label_map"].items()}
        self._device = info["device"]
        self.version: str = ""  # the version number when known (the app sets it from GET /v1/versions)

    @property
    def device(self):
        """The server's device (``torch.device``, e.g. ``cuda:0``); nothing runs on it here."""
        import torch

        return torch.device(self._device)

    @property
    def cfg(self):
        """The bundle's experiment config (dataset paths removed by the server)."""
        from medseg.config import validate_config

        return validate_config(self.info["config"], f"{self.base_url}/v1/models")

    # ---------------------------------------------------------------------------------------- HTTP

    def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        import httpx

        try:
            return self._http.request(method, url, **kwargs)
        except httpx.HTTPError as e:
            raise RemoteInferenceError(f"inference service {self.base_url}: {type(e).__name__}: {e}") from None

    def _get_json(self, url: str) -> dict[str, Any]:
        r = self._request("GET", url)
        if r.status_code != 200:
            raise RemoteInferenceError(f"inference service {self.base_url}{url}: {r.status_code} {_error_text(r)}")
        return r.json()

    def _get_bytes(self, url: str) -> bytes:
        r = self._request("GET", url)
        if r.status_code != 200:
            raise RemoteInferenceError(f"inference service {self.base_url}{url}: {r.status_code} {_error_text(r)}")
        return r.content

    # ------------------------------------------------------------------------------------------ jobs

    def submit(self, name: str, data: bytes, tta: TTAMode | str | None = None, series_uid: str | None = None,
               run_anyway: bool = False) -> str:
        """Upload one file; returns the job id. Waits out 429s (Retry-After) until ``wait_timeout``.
        ``tta``: this job's test-time augmentation (None: the served bundle's). ``run_anyway``: segment a scan
        the service finds unlike the model's training data (refused otherwise)."""
        fields = {"tta": None if tta is None else str(TTAMode(tta)), "series_uid": series_uid}
        form = {k: v for k, v in fields.items() if v is not None}
        if run_anyway:
            form["run_anyway"] = "true"
        deadline = time.monotonic() + self.wait_timeout
        while True:
            r = self._request("POST", "/v1/segment", files={"file": (name, data)}, data=form)
            if r.status_code == 202:
                return r.json()["job_id"]
            if r.status_code == 429 and time.monotonic() < deadline:
                time.sleep(min(float(r.headers.get("Retry-After", "1")), max(0.0, deadline - time.monotonic())))
                continue
            raise RemoteInferenceError(f"{name}: the inference service refused it ({r.status_code}): {_error_text(r)}")

    def wait(self, job_id: str, progress: Progress | None = None) -> dict[str, Any]:
        """Poll until the job is done (returns its status) or failed (raises)."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            status = self._get_json(f"/v1/jobs/{job_id}")
            if progress is not None:
                progress(float(status["progress"]))
            if status["status"] == "done":
                return status
            if status["status"] == "failed":
                raise RemoteInferenceError(f"job {job_id} failed on the inference service: {status['error']}")
            if time.monotonic() > deadline:
                raise RemoteInferenceError(f"job {job_id}: not done after {self.wait_timeout:.0f} s")
            time.sleep(self.poll_interval)

    def fetch(self, job_id: str) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """A finished job's ``(mask as class indices, uncertainty, geometry)`` as the server wrote them."""
        mask, geometry = _read_nifti_bytes(self._get_bytes(f"/v1/jobs/{job_id}/mask?format=nifti&values=indices"))
        with np.load(io.BytesIO(self._get_bytes(f"/v1/jobs/{job_id}/uncertainty?format=npz")), allow_pickle=False) as z:
            uncertainty = np.asarray(z["uncertainty"], dtype=np.float32)
        return mask.astype(np.uint8), uncertainty, geometry

    def report(self, job_id: str) -> dict[str, Any]:
        return self._get_json(f"/v1/jobs/{job_id}/report")

    def _prediction(self, mask: np.ndarray, uncertainty: np.ndarray, geometry: Geometry) -> Prediction:
        probs = np.zeros((self.num_classes, *mask.shape), dtype=np.float32)
        np.put_along_axis(probs, mask[None].astype(np.int64), 1.0, axis=0)  # one-hot: see module docstring
        return Prediction(probs, mask, uncertainty, geometry)

    # ----------------------------------------------------------------------------------- fine-tuning

    def versions(self) -> list[dict[str, Any]]:
        """The served bundle and its fine-tuned versions (``GET /v1/versions``: name, version, weights_hash,
        dice_before/after, base_path); just the served model when the service does not fine-tune."""
        r = self._request("GET", "/v1/versions")
        if r.status_code == 404:  # fine-tuning is off on this service (or it predates it)
            return [{"name": self.name, "version": 1, "weights_hash": self.weights_hash, "base_path": ""}]
        if r.status_code != 200:
            raise RemoteInferenceError(f"inference service {self.base_url}/v1/versions: {r.status_code} "
                                       f"{_error_text(r)}")
        return list(r.json()["versions"])

    def start_finetune(self, reviews_zip: Path, model: str | None = None, max_minutes: float | None = None) -> str:
        """Upload a zipped review folder (``medseg.review.zip_reviews``) to train the next version on the service;
        returns the fine-tuning job's id. ``model``: the version to start from (default: the served bundle)."""
        form = {k: str(v) for k, v in {"model": model, "max_minutes": max_minutes}.items() if v is not None}
        with open(reviews_zip, "rb") as f:
            r = self._request("POST", "/v1/finetune", files={"reviews": ("reviews.zip", f, "application/zip")},
                              data=form)
        if r.status_code != 202:
            raise RemoteInferenceError(f"the inference service did not start fine-tuning ({r.status_code}): "
                                       f"{_error_text(r)}")
        return str(r.json()["job_id"])

    def finetune_status(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/finetune/{id}``: status (running/done/failed), and when done the new version's name
        (``model``), version, weights hash and held-aside Dice before/after."""
        return self._get_json(f"/v1/finetune/{job_id}")

    # -------------------------------------------------------------------------- Predictor interface

    def predict_scan(
        self, scan: Scan, *, tta: TTAMode | str | None = None, progress: Progress | None = None,
        run_anyway: bool = False,
    ) -> Prediction:
        """Segment ``scan`` on the server; the Prediction is on ``scan.geometry``. ``progress(fraction)``
        is called while waiting."""
        name, data = encode_scan(scan)
        job_id = self.submit(name, data, tta, run_anyway=run_anyway)
        self.wait(job_id, progress)
        mask, uncertainty, _ = self.fetch(job_id)
        if tuple(mask.shape) != tuple(scan.spatial_shape):
            raise RemoteInferenceError(
                f"{scan.source or 'scan'}: the service returned a mask of shape {mask.shape}, "
                f"expected {scan.spatial_shape}"
            )
        return self._prediction(mask, uncertainty, scan.geometry)

    def predict_file(self, path: str | Path, *, tta: TTAMode | str | None = None, progress: Progress | None = None,
                     series_uid: str | None = None) -> Prediction:
        """Send a file as it is (e.g. a .zip of a DICOM series); the Prediction carries the geometry the server
        read. The file's name is sent only by its suffix."""
        path = Path(path)
        from medseg.io.formats import full_suffix

        job_id = self.submit(f"upload{full_suffix(path)}", path.read_bytes(), tta, series_uid)
        self.wait(job_id, progress)
        return self._prediction(*self.fetch(job_id))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemotePredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemotePredictor({self.base_url!r}, model={self.name!r}, weights={self.weights_hash})"
