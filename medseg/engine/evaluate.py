"""The one evaluation loop: a predictor against labeled cases on their own grids — per-case, per-label Dice, IoU
and HD95, and for cases with an instance map (``data.instances_dir``) the object metrics of the predicted
foreground's connected components: AJI, Panoptic Quality, object F1 and fused objects (`medseg.metrics.object_metrics`).
`medseg evaluate`, the end of `medseg train` (the Dice of what the bundle ships), the demo and the benchmarks all
score through `evaluate_cases`. A case that cannot be read is reported and the others are scored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.bundle import load_bundle
from medseg.config import ExperimentConfig
from medseg.data import Case, discover_cases, read_datalist, train_val_ids
from medseg.data.preprocess import map_labels
from medseg.errors import DatasetError, MedsegError
from medseg.io import read_mask, read_scan
from medseg.metrics import object_metrics, per_label_metrics

log = logging.getLogger("medseg")
# The per-case object metrics `Evaluation.object_summary` averages, and how reports name them.
OBJECT_METRIC_NAMES = {"aji": "AJI", "pq": "PQ", "object_f1": "object F1"}


@dataclass
class Evaluation:
    """``rows``: one per case and foreground label ``{case, label, dice, iou[, hd95]}``; ``summary``: label name ->
    (mean, sd) Dice over cases; ``mean_dice``: mean over labels of the per-label means; ``failed``: one line per
    case that could not be scored, or whose objects could not (its Dice is kept); ``objects``: one per case with an instance map ``{case, aji, pq, object_f1,
    fused, objects, components}`` (the predicted foreground's connected components against the instance map)."""

    rows: list[dict[str, Any]]
    summary: dict[str, tuple[float, float]]
    failed: list[str] = field(default_factory=list)
    objects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def object_summary(self) -> dict[str, tuple[float, float]]:
        """Metric -> (mean, sd) over the cases with an instance map (AJI, PQ, object F1); empty without any."""
        return {k: (float(np.mean([o[k] for o in self.objects])), float(np.std([o[k] for o in self.objects])))
                for k in OBJECT_METRIC_NAMES if self.objects}

    @property
    def mean_dice(self) -> float:
        return float(np.mean([m for m, _ in self.summary.values()])) if self.summary else float("nan")

    @property
    def n_cases(self) -> int:
        return len({r["case"] for r in self.rows})


def load_target(case: Case, cfg: ExperimentConfig, shape: tuple[int, ...]) -> np.ndarray:
    """The case's mask as class indices on the image's own grid."""
    if case.mask is None:
        raise DatasetError(f"{case.image.name}: no mask to evaluate against")
    return map_labels(read_mask(case.mask), cfg.data.label_map, shape, case.mask.name)


def evaluate_cases(
    predictor: Any,
    cases: Sequence[Case],
    cfg: ExperimentConfig,
    *,
    hd95: bool = True,
    surface_tolerance_mm: float | None = None,
    on_case: Callable[[Case, Any, Any, np.ndarray], None] | None = None,
) -> Evaluation:
    """Predict every case with ``predictor`` (anything with ``predict_scan``) and score it against its mask
    (surface Dice too with ``surface_tolerance_mm``), and against its instance map when it has one.
    ``on_case(case, scan, prediction, target)`` is called after each case (writers, progress)."""
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    objects: list[dict[str, Any]] = []
    labels = cfg.data.labels
    for case in cases:
        try:
            scan = read_scan(case.image)
            target = load_target(case, cfg, scan.spatial_shape)
            pred = predictor.predict_scan(scan)
        except MedsegError as e:
            failed.append(str(e))
            log.warning("not scored: %s", e)
            continue
        metrics = per_label_metrics(pred.mask, target, cfg.data.num_classes, spacing=scan.geometry.spacing_zyx, hd95=hd95,
                                    surface_tolerance_mm=surface_tolerance_mm)
        for k, m in metrics.items():
            rows.append({"case": case.id, "label": labels[k], **m})
        if case.instances is not None:
            try:
                instances = read_mask(case.instances).array
                if instances.shape != pred.mask.shape:
                    raise DatasetError(f"{case.instances.name}: instance map {instances.shape} differs from the "
                                       f"image's grid {pred.mask.shape}")
            except MedsegError as e:  # the case keeps its Dice
                failed.append(f"objects not scored: {e}")
                log.warning("objects not scored: %s", e)
            else:
                om = object_metrics(pred.mask, instances)
                objects.append({"case": case.id, "aji": om["aji"], "pq": om["pq"], "object_f1": om["f1"],
                                "fused": int(om["merged"]), "objects": int(om["n_gt"]), "components": int(om["n_pred"])})
        if on_case is not None:
            on_case(case, scan, pred, target)
    summary = {}
    for k in range(1, cfg.data.num_classes):
        d = [r["dice"] for r in rows if r["label"] == labels[k]]
        if d:
            summary[labels[k]] = (float(np.mean(d)), float(np.std(d)))
    return Evaluation(rows, summary, failed, objects)


def bundle_cases(bundle_cfg: ExperimentConfig, bundle_path: Path, data: Path | None, split: str) -> list[Case]:
    """The cases of ``split`` (val | train | all) of the data a bundle was trained on (or ``data``)."""
    if data is not None:
        cases = discover_cases(Path(data), bundle_cfg.data.images_dir, bundle_cfg.data.masks_dir,
                               bundle_cfg.data.instances_dir)
    elif bundle_cfg.data.datalist is not None:
        cases = read_datalist(bundle_cfg.data.datalist)
    elif bundle_cfg.data.root is not None:
        cases = discover_cases(bundle_cfg.data.root, bundle_cfg.data.images_dir, bundle_cfg.data.masks_dir,
                               bundle_cfg.data.instances_dir)
    else:
        raise DatasetError("no data: pass --data")
    if split != "all":
        split_file = Path(bundle_path) / "splits.json"
        if not split_file.is_file():
            raise DatasetError(f"{Path(bundle_path).name}: bundle has no splits.json; use --split all")
        folds = json.loads(split_file.read_text())["folds"]
        train_ids, val_ids = train_val_ids(folds, bundle_cfg.data.fold)
        wanted = set(val_ids if split == "val" else train_ids)
        cases = [c for c in cases if c.id in wanted]
    if not cases:
        raise DatasetError(f"no cases of split {split!r} found in the data")
    return cases


def evaluate_bundle(bundle_path: Path, data: Path | None, split: str = "val", device: str = "auto") -> Evaluation:
    """`medseg evaluate`: the bundle on the cases of ``split`` (its own data, or ``data``), through `evaluate_cases`;
    raises when no case could be scored."""
    from medseg.inference import Predictor

    bundle = load_bundle(bundle_path)
    cases = bundle_cases(bundle.config, bundle.path, data, split)
    result = evaluate_cases(Predictor.from_bundle(bundle, device=device), cases, bundle.config)
    if not result.rows:
        raise DatasetError(f"no case could be scored: {result.failed[0] if result.failed else 'no cases'}")
    return result
