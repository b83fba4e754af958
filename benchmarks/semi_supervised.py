"""Semi-supervised training from unlabeled scans (``train.unlabeled``): Montgomery chest X-ray lungs, val fold 0.

Three rows with the same training compute (epochs × crops per epoch, the same optimiser steps):

  10% labeled            11 of the 110 training images with masks, nothing else
  10% + 90% unlabeled    the same 11 with masks, the other 99 given without masks (pseudo-label rounds)
  100% labeled           all 110 with masks
  10% + 90%, teacher     noisy student: the 10% row's bundle pseudo-labels round 1 (epoch 0), the student round 2
                         (the teacher's own training is extra compute; run after the "labeled" row)

The images are given through CSV datalists (an empty mask column = unlabeled), with one split file so that every
row validates on the same 28 images. The 10% subset is the seeded one ``data.train_fraction=0.1`` picks.

    .venv/bin/python benchmarks/semi_supervised.py --epochs 9 --samples 64
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

from medseg.config import load_config
from medseg.data import load_or_make_splits, train_val_ids
from medseg.engine.train import load_cases, train

REPO = Path(__file__).resolve().parents[1]
# Images at 256² (the plan would keep 512²): four times fewer pixels, so a CPU budget buys more steps.
SCALE = ["data.resample=size", "data.target_size=256", "data.patch_size=[256, 256]", "inference.tile_size=[256, 256]"]


def write_datalist(path: Path, rows: list[tuple[Path, Path | None]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask"])
        for image, mask in rows:
            w.writerow([str(image), str(mask) if mask else ""])
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "configs/experiments/lungs_montgomery.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "outputs/bench/semi_supervised")
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--samples", type=int, default=64, help="training crops per epoch")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", nargs="*", default=["labeled", "semi", "full", "teacher"])
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    base = load_config(args.config, SCALE)
    cases = load_cases(base)
    folds = load_or_make_splits(args.out / "folds.json", cases, base.data.folds, base.data.split_seed)
    train_ids, val_ids = train_val_ids(folds, base.data.fold)
    keep = max(1, round(args.fraction * len(train_ids)))
    few = sorted(random.Random(base.data.split_seed).sample(sorted(train_ids), keep))  # train_fraction's subset
    by_id = {c.id: c for c in cases}
    val = [by_id[i] for i in sorted(val_ids)]
    labeled = [by_id[i] for i in few]
    rest = [by_id[i] for i in sorted(set(train_ids) - set(few))]
    rows_spec = {
        "labeled": (f"{args.fraction:.0%} labeled", labeled, [], []),
        "semi": (f"{args.fraction:.0%} labeled + {1 - args.fraction:.0%} unlabeled", labeled, rest,
                 ["train.unlabeled.enabled=true", f"train.unlabeled.rounds={args.rounds}"]),
        "full": ("100% labeled", labeled + rest, [], []),
        "teacher": (f"{args.fraction:.0%} labeled + {1 - args.fraction:.0%} unlabeled, teacher = the {args.fraction:.0%} "
                    "row's model", labeled, rest,
                    ["train.unlabeled.enabled=true", f"train.unlabeled.rounds={args.rounds + 1}",
                     f"train.unlabeled.teacher={args.out / 'labeled/run/bundle'}"]),
    }
    # Rows of earlier invocations are kept (a row re-run replaces its old result).
    old = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else []
    results = [r for r in old if r["row"] not in {rows_spec[k][0] for k in args.rows}]
    for key in args.rows:
        name, with_masks, without, sets = rows_spec[key]
        out = args.out / key
        datalist = write_datalist(out / "datalist.csv", [(c.image, c.mask) for c in [*val, *with_masks]]
                                  + [(c.image, None) for c in without])
        # Two folds, the validation images and the labeled training images: fold 0 is the same 28 every row.
        split = out / "split.json"
        split.write_text(json.dumps({"seed": 0, "folds": [sorted(c.id for c in val),
                                                          sorted(c.id for c in with_masks)]}))
        cfg = load_config(args.config, [*SCALE, "data.root=null", f"data.datalist={datalist}", "data.folds=2",
                                        "data.fold=0", f"data.split_file={split}", f"train.epochs={args.epochs}",
                                        f"train.samples_per_epoch={args.samples}",
                                        # No validation rounds: every row ships its last weights, scored once on all 28.
                                        "train.val_every=1000", *sets, *args.sets])
        t0 = time.time()
        result = train(cfg, out / "run", progress=False)
        info = json.loads((out / "run/run_info.json").read_text())
        row = {"row": name, "labeled": len(with_masks), "unlabeled": len(without), "val_cases": len(val),
               "val_dice": round(result.val_dice, 4),
               "steps": result.global_step, "minutes": round((time.time() - t0) / 60, 1),
               "pseudo_labels": info.get("pseudo_labels", [])}
        results.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))  # kept as each row ends
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nMontgomery lungs at 256², val fold 0 ({len(val)} images); {args.epochs} epochs × {args.samples} crops per row")
    print("| training data | images with masks | without masks | val Dice (shipped model) | pixels kept per round | time |")
    print("|---|---|---|---|---|---|")
    for r in results:
        kept = " / ".join(f"{100 * p['kept_share']:.0f}%" for p in r["pseudo_labels"]) or "—"
        print(f"| {r['row']} | {r['labeled']} | {r['unlabeled']} | {r['val_dice']:.3f} | {kept} | {r['minutes']} min |")


if __name__ == "__main__":
    main()
