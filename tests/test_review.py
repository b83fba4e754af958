"""The review dataset (issue 16 item 9): files ``medseg train`` reads, a CSV with provenance, no identifiers."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np

from medseg.data.datalist import discover_cases
from medseg.io import read_mask, read_scan
from medseg.review import case_id, latest_verdicts, read_reviews, save_review


def _save(folder: Path, scan, model_mask, final_mask, verdict: str, sha: str, who: str | None = "dr.a@example.org"):
    return save_review(folder, scan=scan, model_mask=model_mask, final_mask=final_mask, verdict=verdict,
                       note="  missed a\nnucleus ", who=who, model="nuclei", model_version="2",
                       weights_hash="abc123", input_sha256=sha, label_map={0: 0, 255: 1}, num_classes=2)


def test_accepted_and_corrected_cases_form_a_training_dataset(tmp_path: Path, datasets_dir: Path) -> None:
    image = sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[0]
    scan = read_scan(image)
    model = np.zeros(scan.spatial_shape, np.uint8)
    model[10:30, 10:30] = 1
    corrected = model.copy()
    corrected[10:30, 10:20] = 0  # half removed: Dice 2*200/(400+200) = 0.667
    reviews = tmp_path / "reviews"
    _save(reviews, scan, model, model, "accepted", "a" * 64)
    row = _save(reviews, scan, model, corrected, "corrected", "b" * 64, who=None)
    _save(reviews, scan, model, model, "rejected", "c" * 64)
    assert row.who == "anonymous" and row.dice_model_vs_final == "0.6667" and row.note == "missed a nucleus"
    cases = discover_cases(reviews)  # what medseg train reads
    assert sorted(c.id for c in cases) == sorted([case_id("a" * 64), case_id("b" * 64)])
    saved = read_mask(reviews / row.mask).array
    assert np.array_equal(saved, corrected * 255)  # raw values, as the training masks were
    assert np.array_equal(read_scan(reviews / row.image).array, scan.array)
    rows = read_reviews(reviews)
    assert [r.verdict for r in rows] == ["accepted", "corrected", "rejected"]
    assert rows[0].weights_hash == "abc123" and rows[0].who == "dr.a@example.org" and rows[0].dice_model_vs_final == "1.0000"
    names = " ".join(p.name for p in reviews.rglob("*"))
    assert image.stem not in names  # no uploaded file name anywhere
    # Rejecting a case accepted before removes its files (no longer a training target).
    _save(reviews, scan, model, model, "rejected", "a" * 64)
    assert [c.id for c in discover_cases(reviews)] == [case_id("b" * 64)]
    assert latest_verdicts(reviews)[case_id("a" * 64)].verdict == "rejected"


def test_concurrent_saves_keep_every_row(tmp_path: Path, datasets_dir: Path) -> None:
    scan = read_scan(sorted((datasets_dir / "dsb2018_nuclei" / "images").glob("*.png"))[1])
    mask = np.zeros(scan.spatial_shape, np.uint8)
    threads = [threading.Thread(target=_save, args=(tmp_path, scan, mask, mask, "accepted", hashlib.sha256(str(i).encode()).hexdigest()))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(read_reviews(tmp_path)) == 6
