"""`medseg evaluate`: a bundle against labeled cases of a split; per-case, per-label Dice and HD95."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medseg.bundle import load_bundle
from medseg.data import discover_cases, read_datalist, train_val_ids
from medseg.data.preprocess import map_labels
from medseg.errors import DatasetError
from medseg.inference import Predictor
from medseg.io import read_scan
from medseg.metrics import per_label_metrics


def evaluate_bundle(bundle_path: Path, data: Path | None, split: str = "val", device: str = "auto"):
    """Returns (rows, summary): rows ``{case, label, dice, iou, hd95}``; summary label -> (mean, sd) Dice."""
    bundle = load_bundle(bundle_path)
    cfg = bundle.config
    if data is not None:
        cases = discover_cases(Path(data), cfg.data.images_dir, cfg.data.masks_dir)
    elif cfg.data.datalist is not None:
        cases = read_datalist(cfg.data.datalist)
    elif cfg.data.root is not None:
        cases = discover_cases(cfg.data.root, cfg.data.images_dir, cfg.data.masks_dir)
    else:
        raise DatasetError("no data: pass --data")
    if split != "all":
        split_file = bundle.path / "splits.json"
        if not split_file.is_file():
            raise DatasetError(f"{bundle.path.name}: bundle has no splits.json; use --split all")
        folds = json.loads(split_file.read_text())["folds"]
        train_ids, val_ids = train_val_ids(folds, cfg.data.fold)
        wanted = set(val_ids if split == "val" else train_ids)
        cases = [c for c in cases if c.id in wanted]
    if not cases:
        raise DatasetError(f"no cases of split {split!r} found in the data")
    predictor = Predictor.from_bundle(bundle, device=device)
    rows = []
    for case in cases:
        scan = read_scan(case.image)
        target = map_labels(read_scan(case.mask), cfg.data.label_map, scan.spatial_shape, case.mask.name)
        pred = predictor.predict_scan(scan)
        metrics = per_label_metrics(pred.mask, target, cfg.data.num_classes, spacing=scan.geometry.spacing_zyx)
        for k, m in metrics.items():
            rows.append({"case": case.id, "label": cfg.data.labels[k], **m})
    summary = {}
    for k in range(1, cfg.data.num_classes):
        d = [r["dice"] for r in rows if r["label"] == cfg.data.labels[k]]
        summary[cfg.data.labels[k]] = (float(np.mean(d)), float(np.std(d)))
    return rows, summary
