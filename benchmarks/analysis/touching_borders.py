"""Why a `benchmarks/touching.py` model does or does not separate touching nuclei: per variant, the predicted
foreground relative to the ground truth, and the share of touching-border pixels (object pixels next to another
object, `data.separate_touching`'s gaps) that the model predicts as background — the cut it should learn.

    .venv/bin/python benchmarks/analysis/touching_borders.py [--cases 133]   # after touching.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medseg.config import load_config
from medseg.data.preprocess import touching_borders
from medseg.engine.train import load_cases, split_cases
from medseg.inference import Predictor
from medseg.io import read_scan
from medseg.metrics import object_metrics

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "outputs/bench/touching")
    ap.add_argument("--cases", type=int, default=None, help="first N validation cases (default all)")
    ap.add_argument("--variants", nargs="*", default=None, help="run folders under --out (default all)")
    args = ap.parse_args()
    cfg = load_config(REPO / "configs/experiments/nuclei_dsb2018.yaml")
    variants = args.variants or sorted(p.parent.name for p in args.out.glob("*/bundle"))
    _, val = split_cases(cfg, load_cases(cfg), args.out / variants[0])
    val = val[: args.cases] if args.cases else val
    for variant in variants:
        predictor = Predictor.from_bundle(args.out / variant / "bundle", device="cpu")
        fg_pred = fg_gt = border = border_cut = merged = 0
        for case in val:
            pred = predictor.predict_scan(read_scan(case.image)).mask > 0
            inst = read_scan(case.instances).array
            b = touching_borders(inst)
            fg_pred += int(pred.sum())
            fg_gt += int((inst > 0).sum())
            border += int(b.sum())
            border_cut += int((b & ~pred).sum())
            merged += int(object_metrics(pred, inst)["merged"])
        print(json.dumps({"variant": variant, "pred/gt foreground": round(fg_pred / fg_gt, 3),
                          "touching-border px predicted background": round(border_cut / max(border, 1), 3),
                          "border px": border, "merged": merged}), flush=True)


if __name__ == "__main__":
    main()
