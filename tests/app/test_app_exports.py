"""Downloads: right grid and values, the research notice inside the file, names without patient data."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from app_inputs import dicom_zip
from PIL import Image

from app.exports import Provenance, dicom_seg_bytes, file_name, mask_bytes, overlay_png_bytes
from medseg.bundle import RESEARCH_NOTICE
from medseg.io import read_scan

PROV = Provenance("tiny-nuclei", "a1b2c3d4", "a1b2c3d4e5f60718", "ab" * 32)
LABELS = {0: {"name": "background", "color": "#000000"}, 1: {"name": "thing", "color": "#ffd500"}}


def test_nifti_mask_keeps_the_scan_geometry_and_carries_the_notice(datasets_dir: Path, tmp_path: Path) -> None:
    scan = read_scan(datasets_dir / "msd_hippocampus" / "images" / "hippocampus_003.nii.gz")
    truth = read_scan(datasets_dir / "msd_hippocampus" / "masks" / "hippocampus_003.nii.gz").array.astype(np.uint8)
    name, data = mask_bytes(scan, truth, {0: 0, 1: 1, 2: 2}, PROV)
    assert name == "segmentation_abababababab.nii.gz"
    (tmp_path / name).write_bytes(data)
    back = sitk.ReadImage(str(tmp_path / name))
    ref = sitk.ReadImage(str(datasets_dir / "msd_hippocampus" / "images" / "hippocampus_003.nii.gz"))
    assert back.GetSize() == ref.GetSize()
    assert np.allclose(back.GetSpacing(), ref.GetSpacing()) and np.allclose(back.GetOrigin(), ref.GetOrigin())
    assert np.allclose(back.GetDirection(), ref.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(back), truth)
    assert back.GetMetaData("descrip") == RESEARCH_NOTICE


def test_png_mask_holds_class_indices_or_training_values_and_text_chunks(datasets_dir: Path) -> None:
    path = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[0]
    scan = read_scan(path)
    mask = (np.asarray(Image.open(datasets_dir / "dsb2018_nuclei" / "masks" / path.name)) == 255).astype(np.uint8)
    name, data = mask_bytes(scan, mask, {0: 0, 255: 1}, PROV)
    assert name == "segmentation_abababababab.png"
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(np.asarray(im), mask)  # class indices by default (README "Prediction outputs")
        assert im.text["Disclaimer"] == RESEARCH_NOTICE
        assert "a1b2c3d4e5f60718" in im.text["Source"] and im.text["Description"] == "segmentation mask (class indices)"
    _, data = mask_bytes(scan, mask, {0: 0, 255: 1}, PROV, values="raw")
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(np.asarray(im), mask * 255)  # class 1 written as 255, like the training masks


def test_overlay_png_is_the_view_with_the_notice() -> None:
    view = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    name, data = overlay_png_bytes(view, PROV, "axial7")
    assert name == "overlay_abababababab_axial7.png"
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(np.asarray(im), view)
        assert im.text["Disclaimer"] == RESEARCH_NOTICE


def test_dicom_seg_references_the_series_and_says_research_only(datasets_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "ct.zip").write_bytes(dicom_zip(datasets_dir, range(3)))
    with zipfile.ZipFile(tmp_path / "ct.zip") as zf:
        zf.extractall(tmp_path / "ct")
    scan = read_scan(tmp_path / "ct")
    mask = (scan.array > 100).astype(np.uint8)  # bone and contrast: a real, non-empty region
    name, data = dicom_seg_bytes(scan, mask, LABELS, PROV)
    assert name == "segmentation_abababababab.dcm"
    seg = pydicom.dcmread(io.BytesIO(data))
    assert seg.Modality == "SEG"
    assert "Research use only" in seg.SeriesDescription
    assert seg.SegmentSequence[0].SegmentLabel == "thing"
    referenced = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    # These files leave SOPInstanceUID empty; their file meta holds it, and the SEG must point at those slices.
    sources = sorted((tmp_path / "ct").rglob("*.dcm"))
    assert referenced == {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for f in sources}


@pytest.mark.parametrize("kind,suffix", [("segmentation", ".nii.gz"), ("overlay", "_coronal3.png")])
def test_file_names_hold_only_the_content_hash(kind: str, suffix: str) -> None:
    prov = Provenance("m", "v", "w", "0123456789abcdef" * 4)
    assert file_name(kind, prov, suffix) == f"{kind}_0123456789ab{suffix}"


@pytest.mark.parametrize("values", ["indices", "raw"])
@pytest.mark.parametrize("image", ["dsb2018_nuclei/images", "msd_hippocampus/images"])
def test_cli_service_and_app_write_byte_identical_masks(values: str, image: str, models_dir: Path, inference_service: str,
                                                        datasets_dir: Path, tmp_path: Path) -> None:
    """One writer, one convention: for the same input and ``values`` option, ``medseg predict``, the service's
    ``GET /mask`` and the app's download are the same bytes (PNG for a 2D picture, NIfTI for a volume)."""
    import hashlib
    import time

    import httpx
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.inference import Predictor

    bundle = models_dir / "tiny-nuclei"
    src = sorted((datasets_dir / image).iterdir())[0]
    scan = read_scan(src)
    suffix = ".nii.gz" if scan.is_volume else ".png"
    res = CliRunner().invoke(app, ["predict", str(bundle), str(src), "--out", str(tmp_path / "cli"), "--device", "cpu",
                                   "--mask-values", values])
    assert res.exit_code == 0, res.output
    cli = next((tmp_path / "cli").glob(f"*_mask{suffix}")).read_bytes()

    headers = {"X-Medseg-Client": "tests"}
    job = httpx.post(f"{inference_service}/v1/segment", files={"file": (src.name, src.read_bytes())}, headers=headers,
                     timeout=60).json()["job_id"]
    for _ in range(1200):
        if httpx.get(f"{inference_service}/v1/jobs/{job}", timeout=30).json()["status"] in ("done", "failed"):
            break
        time.sleep(0.1)
    served = httpx.get(f"{inference_service}/v1/jobs/{job}/mask", timeout=30,
                       params={"format": "png" if suffix == ".png" else "nifti", "values": values})
    assert served.status_code == 200, served.text

    predictor = Predictor.from_bundle(bundle, device="cpu")
    pred = predictor.predict_scan(scan)
    prov = Provenance(predictor.name, "v1", predictor.weights_hash, hashlib.sha256(src.read_bytes()).hexdigest())
    _, downloaded = mask_bytes(scan, pred.mask, predictor.cfg.data.label_map, prov, values=values)

    assert scan.is_volume or 0 < pred.mask.mean() < 1  # a non-trivial mask, so equal bytes mean something
    assert cli == served.content == downloaded
