"""Training recipes at equal wall-clock budgets on CPU: which gives the best held-out Dice?

Recipes (each gets ``--minutes-per-recipe`` of training, enforced by Lightning's ``max_time``):

- ``single``:  one model, constant learning rate (also measures how many epochs fit in the budget)
- ``cosine``:  cosine decay with one warmup epoch, over the epochs that fit
- ``sgdr``:    SGDR (4 cycles) + snapshot ensemble of the cycle ends
- ``swa``:     cosine, then stochastic weight averaging over the last 40% with BatchNorm recomputed
- ``cv5``:     5-fold cross-validation, each fold a fifth of the budget, the 5 fold models as ensemble

Every recipe trains on the same development cases (its own validation fold for checkpoint selection) and
is scored on the same held-out test cases, which no recipe trains or selects on (for ``cv5`` the dev cases
are its folds). Prints a table of test Dice (mean ± sd over test cases) and training time.

    .venv/bin/python benchmarks/recipes.py --minutes-per-recipe 2 --patch 128 --cases 120

Timings depend on the machine's load; the budget, not the epoch count, is what is held equal.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from medseg.config import ExperimentConfig, load_config
from medseg.data import discover_cases
from medseg.data.preprocess import map_labels
from medseg.engine.cv import cross_validate
from medseg.engine.train import train
from medseg.inference import Predictor
from medseg.io import read_scan
from medseg.metrics import mean_foreground_dice, per_label_metrics

REPO = Path(__file__).resolve().parents[1]
DATASETS = {
    "isbi2012": ("configs/experiments/isbi2012_membranes.yaml", "isbi2012_em"),
    "dsb2018": ("configs/experiments/nuclei_dsb2018.yaml", "dsb2018_nuclei"),
}
RECIPES = ("single", "cosine", "sgdr", "swa", "cv5")


def split_dev_test(cfg: ExperimentConfig, n_cases: int | None, test_fraction: float, seed: int = 0):
    cases = discover_cases(cfg.data.root, cfg.data.images_dir, cfg.data.masks_dir, cfg.data.instances_dir)
    random.Random(seed).shuffle(cases)
    if n_cases:
        cases = cases[:n_cases]
    n_test = max(2, round(test_fraction * len(cases)))
    return cases[n_test:], cases[:n_test]


def write_datalist(cases, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "mask", "instances"])
        w.writeheader()
        for c in cases:
            w.writerow({"id": c.id, "image": c.image, "mask": c.mask, "instances": c.instances or ""})
    return path


def test_dice(bundle: Path, cfg: ExperimentConfig, test_cases) -> tuple[float, float, int]:
    predictor = Predictor.from_bundle(bundle, device="cpu")
    dice = []
    for case in test_cases:
        scan = read_scan(case.image)
        target = map_labels(read_scan(case.mask), cfg.data.label_map, scan.spatial_shape, case.mask.name)
        pred = predictor.predict_scan(scan)
        dice.append(mean_foreground_dice(per_label_metrics(pred.mask, target, cfg.data.num_classes, hd95=False)))
    return float(np.mean(dice)), float(np.std(dice)), len(predictor.members)


def with_train(cfg: ExperimentConfig, **update) -> ExperimentConfig:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


def run_dataset(name: str, args: argparse.Namespace, out: Path) -> list[dict]:
    config, folder = DATASETS[name]
    overrides = [
        f"data.root={args.datasets / folder}", f"data.patch_size=[{args.patch}, {args.patch}]",
        f"model.pretrained={args.pretrained}", f"train.batch_size={args.batch}",
        f"train.samples_per_epoch={args.samples_per_epoch}",
        # whole images in one pass: overlapping tiles would make per-epoch validation cost more than training
        f"inference.tile_size=[{args.tile}, {args.tile}]",
    ]
    base = load_config(REPO / config, overrides)
    dev, test = split_dev_test(base, args.cases, args.test_fraction)
    datalist = write_datalist(dev, out / name / "dev.csv")
    data = base.data.model_copy(update={"root": None, "datalist": datalist, "split_file": out / name / "splits.json"})
    base = base.model_copy(update={"data": data})
    budget = timedelta(minutes=args.minutes_per_recipe)
    print(f"\n== {name}: {len(dev)} dev cases, {len(test)} test cases, {args.minutes_per_recipe} min per recipe", flush=True)

    rows, fit_epochs = [], None
    for recipe in args.recipes:
        run_dir = out / name / recipe
        start = time.time()
        if recipe == "single":
            r = train(with_train(base, epochs=1000, schedule="constant", warmup_epochs=0), run_dir, progress=False, max_time=budget)
            fit_epochs = max(2, r.epochs_run)  # the other recipes plan their schedules over this many epochs
            bundle, epochs = r.bundle, r.epochs_run
        elif recipe == "cv5":
            per_fold = max(2, (fit_epochs or 10) // 5)
            cfg = with_train(base, epochs=per_fold, schedule="cosine", warmup_epochs=min(1, per_fold / 4))
            res = cross_validate(cfg, run_dir, folds=5, progress=False, max_time_per_fold=budget / 5, device="cpu")
            bundle, epochs = res.bundle, per_fold
        else:
            e = fit_epochs or 10
            if recipe == "cosine":
                cfg = with_train(base, epochs=e, schedule="cosine", warmup_epochs=min(1.0, e / 4))
            elif recipe == "sgdr":
                cfg = with_train(base, epochs=e, schedule="sgdr", warmup_epochs=0, snapshots=True,
                                 schedule_params={"t0_epochs": max(1, e // 4), "t_mult": 1})
            else:  # swa: Lightning's BatchNorm pass takes one more (forward-only) epoch of the budget
                n = max(2, e - 1)
                cfg = with_train(base, epochs=n, schedule="cosine", warmup_epochs=min(1.0, n / 4), swa=True,
                                 swa_start_epoch=0.5, swa_lr=base.train.lr * 0.2)
            r = train(cfg, run_dir, progress=False, max_time=budget)
            bundle, epochs = r.bundle, r.epochs_run
        minutes = (time.time() - start) / 60
        mean, sd, members = test_dice(bundle, base, test)
        row = {"dataset": name, "recipe": recipe, "members": members, "epochs": epochs, "minutes": round(minutes, 2),
               "test_dice": round(mean, 4), "test_dice_sd": round(sd, 4)}
        rows.append(row)
        print(f"   {recipe:7s} members={members} epochs={epochs} {minutes:.1f} min  test Dice {mean:.4f} ± {sd:.4f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes-per-recipe", type=float, default=2.0)
    p.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    p.add_argument("--only", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples-per-epoch", type=int, default=32)
    p.add_argument("--tile", type=int, default=512, help="inference tile (validation and test)")
    p.add_argument("--cases", type=int, default=120, help="cases used per dataset (dev + test); 0 = all")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--pretrained", default="imagenet-offline")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_recipes")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    rows = []
    for name in args.only:
        rows += run_dataset(name, args, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| dataset | recipe | members | epochs | wall min | test Dice (mean ± sd) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['recipe']} | {r['members']} | {r['epochs']} | {r['minutes']:.1f} | "
              f"{r['test_dice']:.4f} ± {r['test_dice_sd']:.4f} |")
    print(f"\n{args.minutes_per_recipe} min of training per recipe (max_time), patch {args.patch}, batch {args.batch}, "
          f"{args.samples_per_epoch} patches per epoch, encoder init {args.pretrained}, {args.threads} threads")


if __name__ == "__main__":
    main()
