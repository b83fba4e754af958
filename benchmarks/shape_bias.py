"""Shape-biased training (random convolution, ``augment.random_convolution``) on a cross-source test: DSB2018 nuclei,
trained on one image source and tested on the other.

Split rule (by channel statistics): an image whose colour channels are identical (stored as one-channel PNG; in
DSB2018 these are the fluorescence images and a few grayscale brightfield ones) is **gray**; an image whose channels
differ (H&E and brightfield colour images) is **colour**. Every row trains on gray images only (80%, seeded) and is
tested on the held-out 20% of the gray images (in-source) and on every colour image (cross-source), with the same
model, budget and seed; only the augmentation differs. Then `medseg robustness` runs on each bundle (in-source
validation cases, corruptions only).

Reports Dice, AJI and Panoptic Quality (MONAI `PanopticQualityMetric`) of the connected components of the predicted
mask against the instance maps.

    .venv/bin/python benchmarks/shape_bias.py --epochs 6 --samples 96
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from medseg.config import load_config
from medseg.data.datalist import Case
from medseg.engine.evaluate import evaluate_cases
from medseg.engine.train import train
from medseg.inference import Predictor
from medseg.io import read_scan

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/datasets/dsb2018_nuclei"
VARIANTS = {
    "default augmentation": [],
    "+ random convolution (p = 0.5)": ["augment.random_convolution=0.5"],
}


def is_gray(path: Path) -> bool:
    """The split rule: one channel, or colour channels identical to each other."""
    a = read_scan(path).channels_first()
    return a.shape[0] == 1 or all(np.array_equal(a[0], a[c]) for c in range(1, min(3, a.shape[0])))


def score(predictor: Predictor, cfg, stems: list[str]) -> dict[str, float]:
    """Dice, AJI and PQ of the same predictions, through medseg's one evaluation loop (`evaluate_cases`)."""
    cases = [Case(stem, DATA / "images" / f"{stem}.png", DATA / "masks" / f"{stem}.png",
                  DATA / "instances" / f"{stem}.png") for stem in stems]
    evaluation = evaluate_cases(predictor, cases, cfg, hd95=False)
    objects = evaluation.object_summary
    return {"dice": evaluation.mean_dice, "aji": objects["aji"][0], "pq": objects["pq"][0], "n": evaluation.n_cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "configs/experiments/nuclei_dsb2018.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "outputs/bench/shape_bias")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--samples", type=int, default=96, help="training crops per epoch")
    ap.add_argument("--robustness-cases", type=int, default=20)
    ap.add_argument("--in-source-cases", type=int, default=None, help="score only the first N in-source test images")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    stems = sorted(p.name[:-4] for p in (DATA / "images").glob("*.png"))
    gray = [s for s in stems if is_gray(DATA / "images" / f"{s}.png")]
    colour = [s for s in stems if s not in set(gray)]
    shuffled = sorted(gray)
    random.Random(0).shuffle(shuffled)
    n_val = len(gray) // 5
    gray_val, gray_train = sorted(shuffled[:n_val]), sorted(shuffled[n_val:])
    args.out.mkdir(parents=True, exist_ok=True)
    datalist = args.out / "gray.csv"
    with datalist.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "instances"])
        for s in gray:
            w.writerow([DATA / "images" / f"{s}.png", DATA / "masks" / f"{s}.png", DATA / "instances" / f"{s}.png"])
    split = args.out / "split.json"
    split.write_text(json.dumps({"seed": 0, "folds": [gray_val, gray_train]}))
    print(f"split: {len(gray)} gray ({len(gray_train)} train, {len(gray_val)} in-source test), {len(colour)} colour "
          "(cross-source test)", flush=True)

    rows = []
    for name in args.variants:
        out = args.out / name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "").replace("+_", "")
        cfg = load_config(args.config, [
            "data.root=null", f"data.datalist={datalist}", "data.instances_dir=null", "data.folds=2", "data.fold=0",
            f"data.split_file={split}", "data.channels=3", f"train.epochs={args.epochs}",
            f"train.samples_per_epoch={args.samples}", "train.val_every=1000", *VARIANTS[name], *args.sets])
        t0 = time.time()
        result = train(cfg, out, progress=False)
        minutes = (time.time() - t0) / 60
        predictor = Predictor.from_bundle(result.bundle)
        row = {"variant": name, "in_source": score(predictor, cfg, gray_val[: args.in_source_cases]),
               "cross_source": score(predictor, cfg, colour),
               "train_min": round(minutes, 1)}
        # The robustness command as a user runs it: in-source validation cases, corruptions only.
        rob = out / "robustness"
        subprocess.run([sys.executable, "-m", "medseg.cli", "robustness", str(result.bundle), "--split", "val",
                        "--limit-cases", str(args.robustness_cases), "--no-attacks", "--out", str(rob)], check=True,
                       stdout=subprocess.DEVNULL)
        row["robustness"] = json.loads((rob / "robustness.json").read_text())
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "robustness"}), flush=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))  # kept as each row ends

    print(f"\nDSB2018, trained on {len(gray_train)} gray images, {args.epochs} epochs × {args.samples} crops of 256²")
    print("| augmentation | in-source Dice | AJI | PQ | cross-source Dice | AJI | PQ | train time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["in_source"], r["cross_source"]
        print(f"| {r['variant']} | {a['dice']:.3f} | {a['aji']:.3f} | {a['pq']:.3f} | {b['dice']:.3f} | {b['aji']:.3f} "
              f"| {b['pq']:.3f} | {r['train_min']} min |")
    print(f"\n`medseg robustness BUNDLE --split val --limit-cases {args.robustness_cases} --no-attacks` (Dice)")
    print("| corruption | severity | " + " | ".join(r["variant"] for r in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for i, base in enumerate(rows[0]["robustness"]):
        cells = " | ".join(f"{r['robustness'][i]['dice']:.3f}" for r in rows)
        print(f"| {base['corruption']} | {base['severity']} | {cells} |")


if __name__ == "__main__":
    main()
