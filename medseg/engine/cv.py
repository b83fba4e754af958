"""`medseg cv`: k-fold cross-validation -> out-of-fold predictions, per-case metrics, a fold-ensemble bundle.

Every fold trains with ``data.fold = k`` on one shared ``OUT/splits.json`` (seeded, grouped, reused), so
each case is validated exactly once. Each fold's model predicts its own validation cases; those
out-of-fold (OOF) probability maps are the honest estimate of how the method does on unseen data:

```
OUT/fold_<k>/          a normal training run (bundle, curves, checkpoints); skipped when already done
OUT/oof/<case>.npz     OOF class probabilities (K, *spatial) with geometry (.nii.gz for volumes)
OUT/oof_metrics.csv    per case and label: fold, Dice, IoU, HD95, surface Dice
OUT/cv_summary.json    mean ± sd per label, temperature and calibration error before/after
OUT/bundle/            one bundle, the K fold models as ensemble members, calibration.json
```

A temperature is fitted on the OOF pixels (`medseg.engine.calibrate`) and stored in the bundle's
calibration.json; the Predictor divides every member's logits by it.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from medseg.bundle import load_bundle, save_bundle
from medseg.config import ExperimentConfig
from medseg.data import load_or_make_splits
from medseg.engine.calibrate import Calibration, fit_temperature, sample_pixels
from medseg.engine.evaluate import evaluate_cases
from medseg.engine.train import labeled, load_cases, model_card, preprocessing_record, train
from medseg.errors import DatasetError
from medseg.inference import Predictor
from medseg.io import write_probabilities

log = logging.getLogger("medseg")

METRICS = ("dice", "iou", "hd95", "surface_dice")


@dataclass
class CVResult:
    out_dir: Path
    bundle: Path
    summary: dict[str, dict[str, float]]  # label -> {dice_mean, dice_sd, iou_mean, ...}
    calibration: Calibration
    fold_dice: list[float]  # best val Dice of each fold's run
    oof_files: list[Path]


def fold_config(cfg: ExperimentConfig, folds: int, fold: int, split_file: Path) -> ExperimentConfig:
    data = cfg.data.model_copy(update={"folds": folds, "fold": fold, "split_file": split_file})
    return cfg.model_copy(update={"data": data})


def _train_fold(cfg: ExperimentConfig, fold_dir: Path, resume: bool, progress: bool, max_time: timedelta | None) -> float:
    """Train one fold unless a finished run is already there (a restarted `medseg cv` keeps done folds)."""
    done = fold_dir / "fold_done.json"
    if resume and done.is_file() and (fold_dir / "bundle").is_dir():
        log.info("%s: already trained, kept", fold_dir.name)
        return float(json.loads(done.read_text())["best_val_dice"])
    result = train(cfg, fold_dir, resume=resume, progress=progress, max_time=max_time)
    done.write_text(json.dumps({"best_val_dice": result.best_val_dice, "epochs": result.epochs_run}))
    return result.best_val_dice


def cross_validate(
    cfg: ExperimentConfig,
    out_dir: Path,
    folds: int | None = None,
    resume: bool = False,
    progress: bool = True,
    max_time_per_fold: timedelta | None = None,
    oof_format: str = "auto",
    pixels_per_case: int = 20000,
    surface_tolerance: float = 1.0,
    device: str = "auto",
) -> CVResult:
    """Train ``folds`` folds (default ``cfg.data.folds``) and write OOF maps, metrics and the fold-ensemble
    bundle (see module docstring). ``oof_format``: ``auto`` (npz for 2D, NIfTI for volumes), ``npz`` or
    ``nifti``. ``surface_tolerance`` in mm (pixels when the scan has no spacing) for surface Dice."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k_folds = folds or cfg.data.folds
    split_file = Path(cfg.data.split_file or out_dir / "splits.json")
    cases = labeled(load_cases(cfg))  # unlabeled images (train.unlabeled) train in every fold, never validate
    split = load_or_make_splits(split_file, cases, k_folds, cfg.data.split_seed)
    by_id = {c.id: c for c in cases}

    fold_dice = []
    for k in range(k_folds):
        log.info("fold %d of %d", k + 1, k_folds)
        fold_dice.append(_train_fold(fold_config(cfg, k_folds, k, split_file), out_dir / f"fold_{k}", resume, progress, max_time_per_fold))

    # Out-of-fold predictions: each case by the one model that did not train on it.
    oof_dir = out_dir / "oof"
    oof_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(cfg.train.seed)
    rows, files, samples = [], [], []
    labels = cfg.data.labels
    fold_cfg = cfg
    suffix = {"npz": ".npz", "nifti": ".nii.gz"}.get(oof_format, "")

    def keep_oof(case, scan, pred, target) -> None:
        files.append(write_probabilities(pred.probs, scan, oof_dir / f"{case.id}{suffix}"))
        samples.append(sample_pixels(pred.probs, target, pixels_per_case, rng))

    for k, val_ids in enumerate(split):
        predictor = Predictor.from_bundle(out_dir / f"fold_{k}" / "bundle", device=device)
        fold_cfg = predictor.cfg  # the fold's planned config (label map included)
        evaluation = evaluate_cases(predictor, [by_id[i] for i in val_ids], fold_cfg,
                                    surface_tolerance_mm=surface_tolerance, on_case=keep_oof)
        for r in evaluation.rows:
            rows.append({"case": r["case"], "fold": k, "label": r["label"], **{n: r.get(n, float("nan")) for n in METRICS}})
        labels = fold_cfg.data.labels
    if not rows:
        raise DatasetError("cross-validation found no validation cases")
    with (out_dir / "oof_metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "fold", "label", *METRICS])
        w.writeheader()
        w.writerows(rows)

    summary = summarise(rows, [labels[i] for i in sorted(labels) if i != 0])
    calibration = fit_temperature(np.concatenate([s[0] for s in samples]), np.concatenate([s[1] for s in samples]))
    log.info("temperature %.3f: ECE %.4f -> %.4f on %d OOF pixels", calibration.temperature,
             calibration.ece_before, calibration.ece_after, calibration.pixels)
    if not 0.051 < calibration.temperature < 19.9:
        log.warning("the temperature reached its search bound (%.3g): the fold models are close to chance or "
                    "degenerate; train longer before trusting their probabilities", calibration.temperature)
    (out_dir / "cv_summary.json").write_text(json.dumps(
        {"folds": k_folds, "cases": len(cases), "per_label": summary, "fold_best_val_dice": fold_dice,
         "calibration": calibration.to_json()}, indent=1))
    # The bundle's config is a fold's: the plan applied (every fold plans from the same fingerprint).
    bundle = write_cv_bundle(fold_cfg, out_dir, k_folds, split_file, summary, calibration, len(cases))
    return CVResult(out_dir, bundle, summary, calibration, fold_dice, files)


def summarise(rows: list[dict], label_names: list[str]) -> dict[str, dict[str, float]]:
    """Mean ± sd over cases of each metric, per label (NaN HD95 of cases missing the label left out)."""
    out: dict[str, dict[str, float]] = {}
    for name in label_names:
        sel = [r for r in rows if r["label"] == name]
        stats: dict[str, float] = {}
        for m in METRICS:
            v = np.array([r[m] for r in sel], dtype=float)
            v = v[np.isfinite(v)]
            stats[f"{m}_mean"] = float(v.mean()) if v.size else float("nan")
            stats[f"{m}_sd"] = float(v.std()) if v.size else float("nan")
        out[name] = stats
    return out


def write_cv_bundle(
    cfg: ExperimentConfig, out_dir: Path, k_folds: int, split_file: Path, summary: dict[str, dict[str, float]],
    calibration: Calibration, n_cases: int,
) -> Path:
    """One bundle whose members are every fold's members (``fold_<k>`` or ``fold_<k>_<member>``)."""
    members = {}
    for k in range(k_folds):
        fold_bundle = load_bundle(out_dir / f"fold_{k}" / "bundle")
        for p in fold_bundle.member_files:
            members[f"fold_{k}" if len(fold_bundle.member_files) == 1 else f"fold_{k}_{p.stem}"] = load_file(str(p))
    metrics = {f"CV {m} {label} (mean ± sd over {n_cases} cases)": s[f"{m}_mean"]
               for label, s in summary.items() for m in ("dice",)}
    table = "\n".join(
        f"| {label} | {s['dice_mean']:.4f} ± {s['dice_sd']:.4f} | {s['iou_mean']:.4f} | {s['hd95_mean']:.2f} | {s['surface_dice_mean']:.4f} |"
        for label, s in summary.items()
    )
    extra = f"""
## Cross-validation ({k_folds} folds, out-of-fold)
| label | Dice (mean ± sd) | IoU | HD95 | surface Dice |
|---|---|---|---|---|
{table}

## Ensemble and calibration
- Members: the {k_folds} fold models ({', '.join(members)}), probabilities averaged
- Temperature {calibration.temperature:.3f} fitted on out-of-fold pixels; expected calibration error
  {calibration.ece_before:.4f} before, {calibration.ece_after:.4f} after
"""
    card_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"folds": k_folds})})
    return save_bundle(
        out_dir / "bundle", card_cfg, members, preprocessing_record(cfg),
        model_card(card_cfg, n_cases, n_cases, metrics, extra).replace(
            f"{n_cases} training and {n_cases} validation cases (fold {cfg.data.fold} of {k_folds}",
            f"{n_cases} cases in {k_folds}-fold cross-validation (each validated once",
        ),
        calibration=calibration.to_json(),
        extra_files={"splits.json": split_file.read_text(), "cv_summary.json": (out_dir / "cv_summary.json").read_text()},
    )
