"""Uploads: limits that agree with each other, temporary files that go away, warnings captured, ground truths."""

from __future__ import annotations

import gc
import gzip
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from app_inputs import dicom_zip

from app.settings import ZIP_EXPANSION_ALLOWANCE, load_settings
from app.uploads import SCAN_TYPES, StagedUpload, UploadedBytes, UploadError, read_ground_truth, read_staged
from medseg.errors import ScanReadError, UnsafeArchiveError, UnsupportedFormatError
from medseg.io import read_scan

LABELS = {0: {"name": "background"}, 1: {"name": "anterior"}, 2: {"name": "posterior"}}


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch):
    for name in ("MEDSEG_MAX_UPLOAD_MB", "MEDSEG_MAX_VOXELS"):
        monkeypatch.delenv(name, raising=False)
    return load_settings()


def test_limits_follow_the_upload_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_MAX_UPLOAD_MB", "300")
    monkeypatch.setenv("MEDSEG_MAX_VOXELS", "5000")
    s = load_settings()
    assert s.upload_bytes == 300 * 1024**2
    assert s.archive_limits.max_total_bytes == ZIP_EXPANSION_ALLOWANCE * 300 * 1024**2
    assert s.max_pixels == 5000
    assert "300 MB per upload" in s.limits_text() and "1,200 MB unpacked" in s.limits_text()
    assert load_settings(server_upload_mb=200).upload_mb == 200  # never above Streamlit's own server cap
    monkeypatch.setenv("MEDSEG_MAX_UPLOAD_MB", "lots")
    with pytest.raises(ValueError, match="MEDSEG_MAX_UPLOAD_MB='lots' is not a whole number"):
        load_settings()


def test_voxel_cap_refuses_a_large_scan_with_its_name(datasets_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_MAX_VOXELS", "1000")
    path = datasets_dir / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"
    stage = StagedUpload(UploadedBytes.from_files([(path.name, path.read_bytes())]), load_settings())
    with pytest.raises(ScanReadError, match=r"^hippocampus_001\.nii\.gz: .*above the cap of 1,000"):
        read_staged(stage, load_settings())
    stage.close()


def test_too_large_upload_and_mixed_zip_are_refused(settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_MAX_UPLOAD_MB", "1")
    big = UploadedBytes.from_files([("a.nii.gz", b"x" * (1024**2 + 1))])
    with pytest.raises(UploadError, match="above this server's limit of 1 MB"):
        StagedUpload(big, load_settings())
    mixed = UploadedBytes.from_files([("a.zip", b"PK"), ("b.dcm", b"DICM")])
    with pytest.raises(UploadError, match="a.zip: upload a zip on its own"):
        StagedUpload(mixed, settings)


def test_zip_caps_apply_to_uploads(datasets_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_MAX_UPLOAD_MB", "1")  # so at most 4 MB may come out of a zip
    # A real label volume, 20 x 512 x 512, stored raw: a 40 kB zip that unpacks to more than 5 MB.
    raw = gzip.decompress((datasets_dir / "dicom_ct_series" / "model_seg" / "ct.nii.gz").read_bytes())
    assert len(raw) > 4 * 1024**2
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("seg.nii", raw)
    data = buf.getvalue()
    assert len(data) < 1024**2
    stage = StagedUpload(UploadedBytes.from_files([("series.zip", data)]), load_settings())
    with pytest.raises(UnsafeArchiveError, match="^series.zip: uncompressed size exceeds the cap"):
        read_staged(stage, load_settings())
    stage.close()


def test_staged_files_are_deleted_with_the_session(datasets_dir: Path, settings) -> None:
    data = dicom_zip(datasets_dir, range(3))
    stage = StagedUpload(UploadedBytes.from_files([("ct.zip", data)]), settings)
    root = stage.root
    result = read_staged(stage, settings)
    assert result.scan.spatial_shape[0] == 3 and len(result.scan.meta["dicom_datasets"]) == 3  # SEG export needs these
    del stage, result
    gc.collect()
    assert not root.exists()  # dropping the session's state removes the files


def test_several_dicom_files_with_the_same_name_are_one_series(datasets_dir: Path, settings) -> None:
    files = sorted((datasets_dir / "dicom_ct_series" / "dicom").glob("*.dcm"))[:3]
    # A folder upload from two sub-folders can repeat names; each file gets its own folder.
    upload = UploadedBytes.from_files([(f"a/{i}/IM.dcm", f.read_bytes()) for i, f in enumerate(files)])
    stage = StagedUpload(upload, settings)
    assert read_staged(stage, settings).scan.spatial_shape == (3, 512, 512)
    assert upload.sha256 == UploadedBytes.from_files(list(reversed(upload.files))).sha256  # order-free identity
    stage.close()
    assert not stage.root.exists()


def test_ground_truth_values_map_like_the_training_masks(datasets_dir: Path, settings) -> None:
    image = datasets_dir / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"
    truth_file = datasets_dir / "msd_hippocampus" / "masks" / "hippocampus_001.nii.gz"
    scan = read_scan(image)
    truth = read_ground_truth(truth_file.name, truth_file.read_bytes(), scan, LABELS, {0: 0, 1: 1, 2: 2}, settings)
    assert np.array_equal(truth, read_scan(truth_file).array)
    two_class = {0: {"name": "background"}, 1: {"name": "nucleus"}}
    with pytest.raises(ScanReadError, match=r"hippocampus_001.nii.gz: ground truth holds values \[2\]"):
        read_ground_truth(truth_file.name, truth_file.read_bytes(), scan, two_class, {0: 0, 255: 1}, settings)


def _refused_as_scan_and_as_truth(name: str, data: bytes, settings, folder: Path, error: type, reason: str) -> None:
    """The upload is refused by name, for ``reason``, both as the scan and as a ground truth."""
    stage = StagedUpload(UploadedBytes.from_files([(name, data)]), settings)
    with pytest.raises(error, match=rf"^{re.escape(name)}: .*{reason}"):
        read_staged(stage, settings)
    stage.close()
    with pytest.raises(error, match=rf"^{re.escape(name)}: .*{reason}"):
        read_ground_truth(name, data, read_scan(np_image(folder)), LABELS, {}, settings)


def test_uploaded_headers_cannot_read_server_files(settings, tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(1, 17)))
    header = ("ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_UCHAR\n"
              f"ElementDataFile: {secret}\n").encode()
    # As a ground truth the secret's bytes would come back as "values" in the error message.
    _refused_as_scan_and_as_truth("scan.mha", header, settings, tmp_path, UnsupportedFormatError, "inside the file")
    assert "mhd" not in SCAN_TYPES and "raw" not in SCAN_TYPES  # detached pairs are not offered


def np_image(folder: Path) -> Path:
    import SimpleITK as sitk

    path = folder / "image.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.uint8)), str(path))
    return path


def test_voxel_cap_is_checked_from_the_header_before_decoding(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from PIL import Image

    from medseg.errors import ScanTooLargeError

    monkeypatch.setenv("MEDSEG_MAX_VOXELS", "100000")
    buf = io.BytesIO()
    Image.new("L", (9400, 9400)).save(buf, format="PNG")
    bomb = buf.getvalue()[:1024]  # a valid header over a cut stream: only the header can be read
    _refused_as_scan_and_as_truth("bomb.png", bomb, load_settings(), tmp_path, ScanTooLargeError,
                                  "header announces 88,360,000 samples")


def test_total_upload_size_is_checked_as_files_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: the total was checked only after every file had been copied into one upload."""
    from app.uploads import collect_upload

    class Chosen:  # what Streamlit's UploadedFile offers: its size without reading, and its bytes
        copied: list[str] = []

        def __init__(self, name: str, size: int):
            self.name, self.size = name, size

        def getvalue(self) -> bytes:
            Chosen.copied.append(self.name)
            return bytes(self.size)

    monkeypatch.setenv("MEDSEG_MAX_UPLOAD_MB", "10")
    files = [Chosen(f"IM{i:04d}.dcm", 4 * 1024**2) for i in range(6)]
    with pytest.raises(UploadError, match=r"above this server's limit of 10 MB; upload fewer files"):
        collect_upload(files, load_settings())
    assert Chosen.copied == ["IM0000.dcm", "IM0001.dcm"]  # the third passes the cap: nothing more is copied
    Chosen.copied.clear()
    upload = collect_upload(files[:2], load_settings())
    assert upload.total_bytes == 8 * 1024**2 and len(Chosen.copied) == 2


def test_concurrent_reads_each_get_only_their_own_warnings(settings, datasets_dir: Path) -> None:
    """Issue 16: with catch_warnings (process-wide), a missing-slice note was lost 3 of 4 times with two users
    reading at once, and twice shown to the other user with the first user's file name."""
    import threading

    gapped = {"first.zip": dicom_zip(datasets_dir, [0, 1, 2, 4]), "second.zip": dicom_zip(datasets_dir, [5, 6, 8, 9])}
    clean = {"third.zip": dicom_zip(datasets_dir, [10, 11, 12])}
    uploads = {**gapped, **clean}
    barrier = threading.Barrier(len(uploads))
    seen: dict[str, list[list[str]]] = {name: [] for name in uploads}

    def read(name: str) -> None:
        for _ in range(4):
            staged = StagedUpload(UploadedBytes.from_files([(name, uploads[name])]), settings)
            barrier.wait(timeout=60)
            seen[name].append(read_staged(staged, settings, allow_missing_slices=True).warnings)
            staged.close()

    threads = [threading.Thread(target=read, args=(name,)) for name in uploads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name in gapped:
        assert len(seen[name]) == 4
        for notes in seen[name]:
            assert notes and all(name in n for n in notes), (name, notes)
            assert not any(other in n for n in notes for other in uploads if other != name)
    assert seen["third.zip"] == [[], [], [], []]
