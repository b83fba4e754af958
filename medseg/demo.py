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
from medseg.engine.evaluate import evaluate_cases
from medseg.engine.train import load_cases, split_cases, train
from medseg.inference import Predictor
from medseg.inference.outputs import ModelStamp, write_prediction_outputs

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

    predictor = Predictor.from_bundle(result.bundle)
    planned = predictor.cfg  # the bundle's config: the plan applied
    _, held_aside = split_cases(planned, load_cases(planned), args.out)
    pred_dir = args.out / "predictions"

    def write(case, scan, pred, target) -> None:
        write_prediction_outputs(scan, pred, predictor.labels, pred_dir, case.id, label_map=planned.data.label_map,
                                 model=ModelStamp(predictor.name, predictor.weights_hash))

    evaluation = evaluate_cases(predictor, held_aside, planned, hd95=False, on_case=write)
    dices = [r["dice"] for r in evaluation.rows]
    for r in evaluation.rows:
        print(f"  {r['case']}: Dice {r['dice']:.3f}")
    summary = {
        "held_aside_cases": len(dices), "mean_dice": float(np.mean(dices)), "val_dice_reported_by_train": result.val_dice,
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
