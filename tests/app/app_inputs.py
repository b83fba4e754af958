"""Inputs for the app's tests: a tiny model bundle, and scans built from the real files in the shared datasets."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pydicom
import torch

REPO = Path(__file__).resolve().parents[2]
APP_SCRIPT = REPO / "app" / "streamlit_app.py"
TWO_SERIES_UID = "1.2.826.0.1.3680043.10.543.77.2"
# An untrained timm test encoder (0.36 M weights) with one 512-pixel tile per slice: fast on a shared CPU.
TINY_OVERRIDES = [
    "model.encoder=tu-test_efficientnet",
    "name=tiny-nuclei",
    "description=Untrained test model",
    "data.labels={0: background, 1: nucleus}",
    "data.label_map={0: 0, 255: 1}",
    "model.pretrained=none",
    "model.decoder_channels=[16, 8, 8, 8, 8]",
    "inference.tile_size=[512, 512]",
]


def make_tiny_bundle(out: Path) -> Path:
    """A random-weight nuclei bundle (2 classes, 3 channels, raw masks 0/255) written to ``out``."""
    from medseg.bundle import save_bundle
    from medseg.config import load_config
    from medseg.engine.train import preprocessing_record
    from medseg.models import build_model

    cfg = load_config(None, TINY_OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes)
    card = "# tiny-nuclei\n\nUntrained, for tests.\n\n## Validation metrics\n| metric | value |\n|---|---|\n| val Dice | 0.0000 |\n"
    return save_bundle(out, cfg, {"model": model.state_dict()}, preprocessing_record(cfg), card)


def dicom_zip(
    datasets_dir: Path,
    slices: range | list[int],
    *,
    second_series: list[int] | None = None,
) -> bytes:
    """A zip of real CT slices (``IM0001.dcm`` is index 0) in a folder, as a scanner export would be.

    ``second_series``: also add these slices re-labelled as another series (new SeriesInstanceUID), so the zip
    holds two series and the app must ask which one to segment.
    """
    src = datasets_dir / "dicom_ct_series" / "dicom"
    files = sorted(src.glob("IM*.dcm"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in slices:
            zf.write(files[i], f"export/series1/{files[i].name}")
        for i in second_series or []:
            ds = pydicom.dcmread(files[i])
            ds.SeriesInstanceUID = TWO_SERIES_UID
            ds.SeriesDescription = "CT Body copy"
            ds.SeriesNumber = 2
            ds.SeriesDate, ds.SeriesTime = "20230105", "0930"  # a later series of the study: its own date and time
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PID-4711", "19610203"
            ds.SOPInstanceUID = f"{TWO_SERIES_UID}.{i + 1}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            out = io.BytesIO()
            ds.save_as(out)
            zf.writestr(f"export/series2/{files[i].name}", out.getvalue())
    return buf.getvalue()


def add_training_fingerprint(bundle: Path, dataset: Path, max_cases: int = 16) -> Path:
    """Give a bundle the fingerprint of real training data (what ``medseg train`` records), as the compatibility
    checks read it."""
    import json

    from medseg.data.datalist import discover_cases
    from medseg.planning.fingerprint import compute_fingerprint

    record = json.loads((bundle / "preprocessing.json").read_text())
    record["training_fingerprint"] = compute_fingerprint(discover_cases(dataset), max_cases=max_cases).summary()
    (bundle / "preprocessing.json").write_text(json.dumps(record, indent=1))
    return bundle
