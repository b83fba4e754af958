"""Transfer learning on small data: Montgomery chest X-ray lungs, 10% and 100% of the training split, the
same epoch budget for every row: random init vs offline ImageNet (EfficientNet-Lite0) × {full, freeze_encoder,
partial, gradual_unfreeze}. Prints val Dice and training time.

    .venv/bin/python benchmarks/transfer.py --epochs 6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medseg.config import load_config
from medseg.engine.train import train

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "random init, full": ["model.pretrained=none"],
    "ImageNet, full": [],
    "ImageNet, freeze_encoder": ["model.transfer=freeze_encoder"],
    "ImageNet, partial (2 stages)": ["model.transfer=partial", "model.freeze_stages=2"],
    "ImageNet, gradual_unfreeze": ["model.transfer=gradual_unfreeze", "model.unfreeze_at_epochs=[1, 2, 3, 4, 5]"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "configs/experiments/lungs_montgomery.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "outputs/bench/transfer")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.1, 1.0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    rows = []
    for fraction in args.fractions:
        for name in args.variants:
            # Every row gets the same compute (epochs x 48 random crops), so the 10% rows differ only in how
            # much data they see, not in how long they train.
            sets = [f"train.epochs={args.epochs}", f"data.train_fraction={fraction}", "train.samples_per_epoch=48",
                    *VARIANTS[name], *args.sets]
            cfg = load_config(args.config, sets)
            t0 = time.time()
            result = train(cfg, args.out / f"{fraction:g}" / name.replace(" ", "_").replace(",", ""), progress=False)
            row = {"fraction": fraction, "variant": name, "val_dice": round(result.best_val_dice, 4),
                   "minutes": round((time.time() - t0) / 60, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nMontgomery lungs, val fold 0; {args.epochs} epochs × 48 crops of 256² each row")
    print("| training data | init / strategy | best val Dice | train time |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['fraction']:.0%} | {r['variant']} | {r['val_dice']:.3f} | {r['minutes']} min |")


if __name__ == "__main__":
    main()
