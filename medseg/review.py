"""The review dataset: cases a clinician accepted or corrected in the app, in the layout ``medseg train`` reads.

::

    REVIEWS_DIR/
      images/<case>.nii.gz | .png     the scan (volumes and DICOM as NIfTI with their geometry; 2D pictures as PNG)
      masks/<case>.nii.gz  | .png     the accepted / corrected mask, in the training masks' raw values (label_map)
      reviews.csv                     one row per verdict: who, when, model, weights hash, verdict, note, Dice
                                      between the model's mask and the final one

``<case>`` is ``case_`` + the first 16 hex digits of the upload's SHA-256 (and of the series UID for multi-series
uploads): no file name, no DICOM header, nothing that names a patient. A case reviewed again is overwritten (the
latest verdict is the training target); reviews.csv keeps every row. Rejected cases get a row and no files (a
rejected mask is no training target). Writes are atomic and the CSV is appended under a lock, so two reviewers
saving at once never interleave.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from medseg.inference.outputs import MaskValues, mask_values
from medseg.io import Scan, write_mask, write_scan
from medseg.metrics import mean_foreground_dice, per_label_metrics

REVIEWS_CSV = "reviews.csv"
VERDICTS = ("accepted", "corrected", "rejected")


@dataclass(frozen=True)
class ReviewRow:
    case: str
    time: str
    who: str
    model: str
    model_version: str
    weights_hash: str
    verdict: str
    note: str
    dice_model_vs_final: str  # "" for rejected cases
    image: str
    mask: str


def case_id(input_sha256: str, series_uid: str | None = None) -> str:
    digest = hashlib.sha256(f"{input_sha256}:{series_uid or ''}".encode()).hexdigest() if series_uid else input_sha256
    return f"case_{digest[:16]}"


def _suffix(scan: Scan) -> str:
    if scan.is_volume or scan.meta.get("format") in ("nifti", "dicom", "nrrd", "metaimage"):
        return ".nii.gz"
    return ".png"


def agreement(model_mask: np.ndarray, final_mask: np.ndarray, num_classes: int) -> float:
    """Mean foreground Dice between the model's mask and the reviewed one (1.0: accepted unchanged)."""
    return mean_foreground_dice(per_label_metrics(model_mask, final_mask, num_classes, hd95=False))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save_review(
    folder: Path,
    *,
    scan: Scan,
    model_mask: np.ndarray,
    final_mask: np.ndarray,
    verdict: str,
    note: str,
    who: str | None,
    model: str,
    model_version: str,
    weights_hash: str,
    input_sha256: str,
    label_map: dict[int, int],
    num_classes: int,
    series_uid: str | None = None,
) -> ReviewRow:
    """Save one verdict into ``folder`` (created when missing); returns the row written to reviews.csv."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r}: use one of {', '.join(VERDICTS)}")
    folder = Path(folder)
    case = case_id(input_sha256, series_uid)
    image = mask = dice = ""
    if verdict == "rejected":  # an earlier accepted mask of this case is no training target any more
        for old in [*folder.glob(f"images/{case}.*"), *folder.glob(f"masks/{case}.*")]:
            old.unlink()
    else:
        suffix = _suffix(scan)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        image, mask = f"images/{case}{suffix}", f"masks/{case}{suffix}"
        if suffix == ".png" and scan.array.dtype not in (np.uint8, np.uint16):
            image = f"images/{case}.nii.gz"  # a float 2D picture: PNG cannot hold it
        write_scan(scan, folder / image)
        write_mask(mask_values(final_mask, label_map, MaskValues.raw), scan, folder / mask)
        dice = f"{agreement(model_mask, final_mask, num_classes):.4f}"
    row = ReviewRow(case, datetime.now(UTC).isoformat(timespec="seconds"), who or "anonymous", model, model_version,
                    weights_hash, verdict, " ".join(note.split())[:500], dice, image, mask)
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / REVIEWS_CSV
    with _locked(table):
        new = not table.exists()
        with open(table, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(row)))
            if new:
                writer.writeheader()
            writer.writerow(asdict(row))
    return row


def read_reviews(folder: Path) -> list[ReviewRow]:
    """Every row of ``folder/reviews.csv`` (oldest first); [] when there is none."""
    table = Path(folder) / REVIEWS_CSV
    if not table.is_file():
        return []
    with open(table, newline="", encoding="utf-8") as f:
        return [ReviewRow(**{k: r.get(k, "") for k in ReviewRow.__dataclass_fields__}) for r in csv.DictReader(f)]


def latest_verdicts(folder: Path) -> dict[str, ReviewRow]:
    """The latest row per case (what its files hold)."""
    return {row.case: row for row in read_reviews(folder)}


def zip_reviews(folder: Path, dest: Path) -> Path:
    """The review dataset as one zip (``images/``, ``masks/``, ``reviews.csv``; nothing else), written to ``dest``:
    what the app uploads to fine-tune on an inference service on another machine."""
    folder = Path(folder)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        if (folder / REVIEWS_CSV).is_file():
            zf.write(folder / REVIEWS_CSV, REVIEWS_CSV)
        for sub in ("images", "masks"):
            for path in sorted((folder / sub).glob("case_*")):
                if path.is_file() and not path.name.startswith("."):
                    zf.write(path, f"{sub}/{path.name}")
    return Path(dest)
