"""`medseg finetune` (issue 16 item 10): a new bundle version from reviewed cases, through the one training loop."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from medseg.bundle import load_bundle
from medseg.cli import app
from medseg.io import read_mask, read_scan
from medseg.review import save_review

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))
from app_inputs import make_tiny_bundle  # noqa: E402


def _reviews(folder: Path, datasets_dir: Path, n: int) -> None:
    """``n`` real nuclei images 'corrected' to their ground truth, as the app saves them."""
    root = datasets_dir / "dsb2018_nuclei"
    for i, image in enumerate(sorted((root / "images").glob("*.png"))[:n]):
        scan = read_scan(image)
        truth = (read_mask(root / "masks" / image.name).array > 0).astype(np.uint8)
        save_review(folder, scan=scan, model_mask=np.zeros_like(truth), final_mask=truth, verdict="corrected",
                    note="", who="tester", model="tiny-nuclei", model_version="", weights_hash="x",
                    input_sha256=hashlib.sha256(str(i).encode()).hexdigest(), label_map={0: 0, 255: 1}, num_classes=2)


def test_finetune_writes_the_next_version_with_lineage(tmp_path: Path, datasets_dir: Path) -> None:
    parent = make_tiny_bundle(tmp_path / "models" / "tiny-nuclei")
    reviews = tmp_path / "reviews"
    _reviews(reviews, datasets_dir, 5)
    res = CliRunner().invoke(app, [
        "finetune", str(parent), "--data", str(reviews), "--max-minutes", "0.5", "--device", "cpu",
        "--set", "train.epochs=1", "--set", "train.samples_per_epoch=8", "--set", "data.patch_size=[64, 64]",
        "--set", "train.batch_size=4", "--set", "train.accelerator=cpu",
    ])
    assert res.exit_code == 0, res.output
    new = tmp_path / "models" / "tiny-nuclei-v2"
    assert "version 2 written" in res.output and "held-aside" in res.output
    bundle = load_bundle(new)
    lineage = bundle.preprocessing["lineage"]
    assert bundle.preprocessing["version"] == 2
    assert lineage["parent_weights_hash"] == load_bundle(parent).weights_hash
    assert (lineage["reviewed_train_cases"], lineage["held_aside_cases"]) == (4, 1)
    assert bundle.weights_hash != lineage["parent_weights_hash"]  # it did train
    assert "## Fine-tuning (version 2)" in bundle.model_card and "before" in bundle.model_card
    assert bundle.name == "tiny-nuclei"  # same model, next version
    from medseg.bundle import find_bundles

    assert [p.name for p in find_bundles(tmp_path / "models")] == ["tiny-nuclei", "tiny-nuclei-v2"]  # not the run
    splits = json.loads((tmp_path / "models" / ".finetune-runs" / ".tiny-nuclei-v2" / "splits.json").read_text())
    assert len(splits["folds"][0]) == 1  # validation = the held-aside review


def test_finetune_with_too_few_reviews_says_so(tmp_path: Path, datasets_dir: Path) -> None:
    parent = make_tiny_bundle(tmp_path / "tiny")
    _reviews(tmp_path / "reviews", datasets_dir, 1)
    res = CliRunner().invoke(app, ["finetune", str(parent), "--data", str(tmp_path / "reviews")])
    assert res.exit_code == 1 and "needs at least 2" in res.output
