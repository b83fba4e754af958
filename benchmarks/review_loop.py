"""The review loop, simulated (issue 16): does fine-tuning on a reviewer's corrections help on cases nobody reviewed?

1. Train a base model (version 1) on a small part of a shared dataset, for a fixed budget.
2. Segment a pool of other cases with it; a simulated reviewer takes the worst ``--worst`` predictions (lowest Dice)
   and replaces each by its ground truth, saved as the app saves a correction (``medseg.review.save_review``).
3. ``medseg finetune`` (``medseg.engine.finetune.finetune``) trains version 2 on those corrections for a fixed budget.
4. Both versions are scored on held-out cases that were neither trained on nor reviewed.
5. The control: version 1 trained on for the same fine-tuning budget on its own base cases (saved as accepted
   reviews, through the same ``finetune``), so that "more training" and "training on corrections" are told apart.
6. Mixed: the corrections plus the base cases (``medseg finetune --with-original``), the same budget.

    .venv/bin/python benchmarks/review_loop.py --base-minutes 3 --finetune-minutes 2

Prints a Markdown table and writes ``benchmarks/results/review_loop.json``. Timings depend on the machine (and on
whatever else runs on it): report them with the machine's load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from medseg.config import load_config
from medseg.data.datalist import discover_cases
from medseg.engine.evaluate import evaluate_cases, load_target
from medseg.engine.finetune import finetune, write_datalist
from medseg.engine.train import train
from medseg.inference import Predictor
from medseg.io import read_scan
from medseg.review import save_review

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/datasets/dsb2018_nuclei")
    ap.add_argument("--config", type=Path, default=REPO / "configs/experiments/demo_nuclei.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "outputs/bench/review_loop")
    ap.add_argument("--base-cases", type=int, default=30)
    ap.add_argument("--pool", type=int, default=60, help="cases the simulated reviewer looks at")
    ap.add_argument("--worst", type=int, default=20, help="of those, how many are corrected")
    ap.add_argument("--test", type=int, default=60, help="untouched held-out cases")
    ap.add_argument("--base-minutes", type=float, default=3.0)
    ap.add_argument("--finetune-minutes", type=float, default=2.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-control", action="store_true", help="skip the 'same budget on the base cases' control")
    ap.add_argument("--no-mixed", action="store_true", help="skip fine-tuning on corrections + base cases")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]

    # A fixed, content-independent order: base | pool | test never overlap.
    cases = sorted(discover_cases(args.data), key=lambda c: hashlib.sha256(c.id.encode()).hexdigest())
    base = cases[: args.base_cases]
    pool = cases[args.base_cases : args.base_cases + args.pool]
    test = cases[args.base_cases + args.pool : args.base_cases + args.pool + args.test]
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    cfg = load_config(args.config, [f"data.datalist={write_datalist(args.out / 'base.csv', [(c.id, c) for c in base])}", "data.root=null",
                                    f"train.budget_minutes={args.base_minutes}"])
    base_run = train(cfg, args.out / "base", progress=False)
    base_minutes = (time.time() - t0) / 60
    v1 = Predictor.from_bundle(base_run.bundle, device=args.device)

    # The simulated reviewer: the worst predictions of the pool (scored by the one evaluation loop), replaced by their
    # ground truth.
    seen = {}
    pool_eval = evaluate_cases(v1, pool, v1.cfg, hd95=False,
                               on_case=lambda case, scan, pred, target: seen.__setitem__(case.id, (case, scan, pred.mask,
                                                                                                   target)))
    dice_by_case: dict[str, list[float]] = {}
    for r in pool_eval.rows:
        dice_by_case.setdefault(r["case"], []).append(float(r["dice"]))
    scored = sorted(((float(np.mean(d)), *seen[cid]) for cid, d in dice_by_case.items() if cid in seen),
                    key=lambda s: s[0])
    reviews = args.out / "reviews"
    for _, case, scan, mask, target in scored[: args.worst]:
        save_review(reviews, scan=scan, model_mask=mask, final_mask=target.astype(np.uint8), verdict="corrected",
                    note="simulated: replaced by ground truth", who="benchmark", model=v1.name, model_version="1",
                    weights_hash=v1.weights_hash, input_sha256=hashlib.sha256(case.id.encode()).hexdigest(),
                    label_map=dict(v1.cfg.data.label_map), num_classes=v1.cfg.data.num_classes)

    t1 = time.time()
    tuned = finetune(base_run.bundle, reviews, args.out / "v2", max_minutes=args.finetune_minutes,
                     device=args.device, progress=False)
    finetune_minutes = (time.time() - t1) / 60
    before = evaluate_cases(v1, test, v1.cfg, hd95=False)
    after = evaluate_cases(Predictor.from_bundle(tuned.bundle, device=args.device), test, v1.cfg, hd95=False)
    control_dice = None
    if not args.no_control:  # the same budget spent on the base cases, as if a reviewer had accepted them unchanged
        accepted = args.out / "control_reviews"
        for case in base:
            scan = read_scan(case.image)
            target = load_target(case, v1.cfg, scan.spatial_shape).astype(np.uint8)
            save_review(accepted, scan=scan, model_mask=target, final_mask=target, verdict="accepted",
                        note="control: base case", who="benchmark", model=v1.name, model_version="1",
                        weights_hash=v1.weights_hash, input_sha256=hashlib.sha256(case.id.encode()).hexdigest(),
                        label_map=dict(v1.cfg.data.label_map), num_classes=v1.cfg.data.num_classes)
        control = finetune(base_run.bundle, accepted, args.out / "v2-control", max_minutes=args.finetune_minutes,
                           device=args.device, progress=False)
        control_dice = evaluate_cases(Predictor.from_bundle(control.bundle, device=args.device), test, v1.cfg,
                                      hd95=False).mean_dice
    mixed = mixed_dice = None
    if not args.no_mixed:  # corrections and the original (base) cases together: --with-original
        original = args.out / "base_data"
        for sub in ("images", "masks"):
            (original / sub).mkdir(parents=True, exist_ok=True)
        for case in base:
            for sub, src in (("images", case.image), ("masks", case.mask)):
                link = original / sub / Path(src).name
                if not link.exists():
                    link.symlink_to(Path(src).resolve())
        mixed = finetune(base_run.bundle, reviews, args.out / "v2-mixed", max_minutes=args.finetune_minutes,
                         with_original=original, device=args.device, progress=False)
        mixed_dice = evaluate_cases(Predictor.from_bundle(mixed.bundle, device=args.device), test, v1.cfg,
                                    hd95=False).mean_dice
    row = {
        "dataset": args.data.name, "base_cases": len(base), "pool": len(pool), "corrected": args.worst,
        "test_cases": before.n_cases, "base_minutes": round(base_minutes, 1),
        "finetune_minutes": round(finetune_minutes, 1),
        "pool_worst_dice_mean": round(float(np.mean([s[0] for s in scored[: args.worst]])), 4),
        "held_aside_before": round(tuned.dice_before, 4), "held_aside_after": round(tuned.dice_after, 4),
        "test_dice_v1": round(before.mean_dice, 4), "test_dice_v2": round(after.mean_dice, 4),
        "test_dice_control": None if control_dice is None else round(control_dice, 4),
        "test_dice_mixed": None if mixed_dice is None else round(mixed_dice, 4),
        "held_aside_after_mixed": None if mixed is None else round(mixed.dice_after, 4),
        "load_1min_start": round(load_start, 2), "load_1min_end": round(os.getloadavg()[0], 2),
        "cpu_threads": os.cpu_count(),
    }
    (REPO / "benchmarks/results").mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks/results/review_loop.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row))
    print(f"\n{args.data.name}: base model on {len(base)} cases ({base_minutes:.1f} min); the worst {args.worst} "
          f"of {len(pool)} pool predictions corrected; fine-tuned {finetune_minutes:.1f} min; 1-min load average "
          f"{row['load_1min_start']} at the start, {row['load_1min_end']} at the end ({os.cpu_count()} CPUs)")
    print("| model | Dice, held-out untouched cases | Dice, held-aside corrections |")
    print("|---|---|---|")
    print(f"| v1 (base) | {row['test_dice_v1']:.3f} ({row['test_cases']} cases) | {row['held_aside_before']:.3f} |")
    print(f"| v2 (fine-tuned on corrections) | {row['test_dice_v2']:.3f} | {row['held_aside_after']:.3f} |")
    if control_dice is not None:
        print(f"| control: v1 trained on as long on its base cases | {control_dice:.3f} | |")
    if mixed is not None:
        print(f"| v2 fine-tuned on corrections + base cases (--with-original) | {mixed_dice:.3f} | "
              f"{mixed.dice_after:.3f} |")


if __name__ == "__main__":
    main()
