"""Train a config and evaluate its bundle on the validation split; print a results table.

    .venv/bin/python benchmarks/train_eval.py configs/experiments/nuclei_dsb2018.yaml --out outputs/bench/nuclei

Used for README's Results (issue: foundation). Numbers depend on the machine; the table says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from medseg.config import load_config
from medseg.engine.evaluate import evaluate_bundle
from medseg.engine.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("config", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    cfg = load_config(args.config, args.sets)
    t0 = time.time()
    result = train(cfg, args.out, progress=False)
    train_min = (time.time() - t0) / 60
    t1 = time.time()
    evaluation = evaluate_bundle(result.bundle, None, "val", "auto")
    rows, summary = evaluation.rows, evaluation.summary
    eval_s = time.time() - t1
    hd = [r["hd95"] for r in rows if np.isfinite(r["hd95"])]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    record = {
        "config": args.config.name, "device": device, "epochs": cfg.train.epochs,
        "train_minutes": round(train_min, 1), "val_cases": len({r["case"] for r in rows}),
        "val_dice": {k: [round(m, 4), round(s, 4)] for k, (m, s) in summary.items()},
        "val_hd95_median": round(float(np.median(hd)), 2) if hd else None,
        "eval_seconds_per_case": round(eval_s / max(1, len({r["case"] for r in rows})), 2),
        "overrides": args.sets,
    }
    (args.out / "benchmark.json").write_text(json.dumps(record, indent=1))
    print("\n| config | device | epochs | train time | val cases | val Dice (mean ± sd) | HD95 median (px/mm) | eval s/case |")
    print("|---|---|---|---|---|---|---|---|")
    dice = "; ".join(f"{k} {m:.3f} ± {s:.3f}" for k, (m, s) in record["val_dice"].items())
    print(f"| {record['config']} | {device} | {cfg.train.epochs} | {train_min:.1f} min | {record['val_cases']} | {dice} | "
          f"{record['val_hd95_median']} | {record['eval_seconds_per_case']} |")


if __name__ == "__main__":
    main()
