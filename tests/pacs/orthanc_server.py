"""A real PACS for the DICOMweb tests (the fixtures are in conftest.py): Debian's Orthanc with its DICOMweb plugin on loopback ports.

Orthanc starts (about a second) with a throwaway storage folder and HTTP basic auth, and is
loaded through its REST API (``POST /instances``) with two studies made from the shared CT series:

- ``ct``: all 20 slices of the shared series, study date 2022-12-08, description "Abdomen CT".
- ``followup``: 3 of those slices (IM0010-IM0012) as a second study and series (new UIDs), date 2023-03-01,
  description "Follow-up chest", every 4th pixel (128x128, 3.9 mm pixels) stored uncompressed: small enough
  that a round trip segments it on a busy 2-core CPU in seconds.

The shared files carry empty Study/Series/SOP Instance UIDs, which Orthanc refuses; they get the UIDs medseg's
own reader derives for them (``ensure_uids``), plus a pseudonymous PatientID, so what the tests retrieve is what
``read_scan`` of the originals describes. Orthanc is stopped and its storage deleted at the end.

Without ``Orthanc`` on PATH the tests are skipped with the reason, except where ``MEDSEG_REQUIRE_ORTHANC=1``
(``.ci/run`` sets it after installing ``orthanc`` and ``orthanc-dicomweb``), where that is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from medseg.inference.deidentify import ensure_uids
from medseg.io.dicomweb import Endpoint

DICOMWEB_PLUGIN = Path(os.environ.get("MEDSEG_ORTHANC_DICOMWEB_PLUGIN",
                                      "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
USER, PASSWORD = "medseg", "pacs-test-password-6d1f"
AUTH_HEADER = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
PATIENT_ID = "MEDSEG-TEST-0001"  # pseudonymous; the shared files have none
PATIENT_NAME = "Test^Pacs"


@dataclass(frozen=True)
class PacsStudy:
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]  # in the files' slice order (IM0001... order)
    description: str
    date: str


@dataclass(frozen=True)
class Pacs:
    url: str  # Orthanc's root (REST API)
    endpoint: Endpoint  # its DICOMweb root, with the auth header
    ct: PacsStudy
    followup: PacsStudy

    def rest(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": AUTH_HEADER}, timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_binary() -> str:
    binary = shutil.which("Orthanc") or next(
        (str(p) for p in (Path("/usr/sbin/Orthanc"), Path("/usr/bin/Orthanc")) if p.exists()), None)
    if binary is None or not DICOMWEB_PLUGIN.exists():
        reason = ("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; "
                  ".ci/run does)")
        if os.environ.get("MEDSEG_REQUIRE_ORTHANC") == "1":
            raise RuntimeError(reason)
        pytest.skip(reason)
    return binary


def _study_files(src: list[Path], out: Path, *, new_uids: bool, description: str, date: str,
                 step: int = 1) -> PacsStudy:
    """Copies of ``src`` with the UIDs medseg derives for them (or fresh ones), ready for Orthanc."""
    out.mkdir(parents=True)
    datasets = ensure_uids([pydicom.dcmread(f) for f in src])
    study_uid, series_uid = (generate_uid(), generate_uid()) if new_uids else (
        datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID)
    sops = []
    for i, ds in enumerate(datasets):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        if new_uids:
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if step > 1:
            pixels = ds.pixel_array[::step, ::step].copy()
            ds.set_pixel_data(pixels, "MONOCHROME2", int(ds.BitsStored))
            ds.PixelSpacing = [float(v) * step for v in ds.PixelSpacing]
        ds.PatientID, ds.PatientName = PATIENT_ID, PATIENT_NAME
        ds.StudyDescription, ds.StudyDate, ds.SeriesNumber = description, date, 3
        ds.save_as(out / f"{i:03d}.dcm")
        sops.append(str(ds.SOPInstanceUID))
    return PacsStudy(study_uid, series_uid, tuple(sops), description, date)


@contextmanager
def running_orthanc(datasets_dir: Path, root: Path) -> Iterator[Pacs]:
    """Orthanc on free loopback ports with its storage under ``root``, loaded with the two studies; stopped
    (and its storage deleted) on exit."""
    binary = orthanc_binary()
    storage = root / "storage"
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "medseg-test-pacs", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpPort": http_port, "DicomPort": dicom_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "OverwriteInstances": True, "HttpTimeout": 30, "StableAge": 1,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("w")
    proc = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            cwd=root)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/system", headers={"Authorization": AUTH_HEADER}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start; its log: {(root / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.1)
        src = sorted((datasets_dir / "dicom_ct_series" / "dicom").glob("IM*.dcm"))
        ct = _study_files(src, root / "ct", new_uids=False, description="Abdomen CT", date="20221208")
        followup = _study_files(src[9:12], root / "followup", new_uids=True, description="Follow-up chest",
                                date="20230301", step=4)
        with httpx.Client(base_url=url, headers={"Authorization": AUTH_HEADER}, timeout=30) as rest:
            for f in sorted((root / "ct").iterdir()) + sorted((root / "followup").iterdir()):
                rest.post("/instances", content=f.read_bytes()).raise_for_status()
        endpoint = Endpoint(name="test-pacs", url=f"{url}/dicom-web", auth_header=AUTH_HEADER, timeout_s=30)
        yield Pacs(url, endpoint, ct, followup)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(storage, ignore_errors=True)


def write_endpoints_yaml(path: Path, pacs: Pacs) -> Path:
    """The operator's endpoints file naming the test PACS (its auth header inline, as a site might)."""
    e = pacs.endpoint
    path.write_text(yaml.safe_dump({"endpoints": [
        {"name": e.name, "url": e.url, "auth_header": e.auth_header.get_secret_value() if e.auth_header else None},
    ]}))
    return path
