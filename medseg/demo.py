"""`make demo`: train a small UNet (EfficientNet-Lite0 from offline ImageNet weights) on the bundled DSB2018
sample, predict the held-aside images, write masks/overlays/bundle/curves to outputs/demo, print the Dice."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from medseg.config import load_config
from medseg.data.preprocess import map_labels
from medseg.engine.train import load_cases, split_cases, train
from medseg.inference import Predictor
from medseg.inference.outputs import write_prediction_outputs
from medseg.io import read_scan
from medseg.metrics import per_label_metrics

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, default=REPO / "configs/experiments/demo_nuclei.yaml")
    ap.add_argument("--out", type=Path, default=Path("outputs/demo"))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--models-dir", type=Path, default=Path("models"), help="where the app looks for bundles")
    args = ap.parse_args()

    start = time.time()
    cfg = load_config(args.config, [f"train.epochs={args.epochs}"] if args.epochs else None)
    result = train(cfg, args.out)

    _, held_aside = split_cases(cfg, load_cases(cfg), args.out)
    predictor = Predictor.from_bundle(result.bundle)
    pred_dir = args.out / "predictions"
    dices = []
    for case in held_aside:
        scan = read_scan(case.image)
        pred = predictor.predict_scan(scan)
        write_prediction_outputs(scan, pred, predictor.labels, pred_dir, case.id, label_map=cfg.data.label_map)
        target = map_labels(read_scan(case.mask), cfg.data.label_map, scan.spatial_shape, case.mask.name)
        dice = per_label_metrics(pred.mask, target, cfg.data.num_classes, hd95=False)[1]["dice"]
        dices.append(dice)
        print(f"  {case.id}: Dice {dice:.3f}")
    summary = {
        "held_aside_cases": len(dices), "mean_dice": float(np.mean(dices)), "best_val_dice": result.best_val_dice,
        "epochs": cfg.train.epochs, "minutes": (time.time() - start) / 60,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.models_dir:
        target_dir = args.models_dir / cfg.name
        shutil.rmtree(target_dir, ignore_errors=True)
        shutil.copytree(result.bundle, target_dir)
    print(f"\nDemo done in {summary['minutes']:.1f} min. Held-aside Dice (nucleus): {summary['mean_dice']:.3f} "
          f"over {len(dices)} images.")
    print(f"Outputs: {args.out}/ (bundle/, progress.png, metrics.csv, predictions/*_mask.png, *_overlay.png)")


if __name__ == "__main__":
    main()
