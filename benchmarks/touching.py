"""Do U-Net boundary weight maps separate touching nuclei? DSB2018 with instance maps, same model and budget:

  plain            semantic masks as given (touching nuclei are fused in them)
  gaps             pixels where two nuclei touch set to background (data.separate_touching)
  gaps+weightmap   the same, plus the U-Net paper's weight map (w0=10, sigma=5 px) on the cross-entropy

Reports pixel Dice and object-level separation from connected components of the predicted mask: Aggregated
Jaccard Index (AJI), object F1 at IoU > 0.5, and the number of predicted components that fuse ≥ 2 nuclei.

    .venv/bin/python benchmarks/touching.py --epochs 6 --samples 240
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medseg.config import load_config
from medseg.engine.evaluate import evaluate_cases
from medseg.engine.train import load_cases, split_cases, train
from medseg.inference import Predictor

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "touching.json"  # one row per variant, written as each finishes
VARIANTS = {
    "plain": [],
    "gaps": ["data.separate_touching=true"],
    "gaps+weightmap": ["data.separate_touching=true", "loss.weight_map=true", "loss.objects=instances"],
    # The border term alone: without the class-balancing w_c (nuclei are the minority class, so w_c weighs them
    # up), which makes the model grow nuclei into the 1-2 px gaps between them.
    "gaps+weightmap, w_c=1": ["data.separate_touching=true", "loss.weight_map=true", "loss.objects=instances",
                              "loss.class_weights=[1.0, 1.0]"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "configs/experiments/nuclei_dsb2018.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "outputs/bench/touching")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--samples", type=int, default=240, help="training crops per epoch")
    ap.add_argument("--eval-cases", type=int, default=None, help="limit evaluation to the first N val cases")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()

    rows = []
    for name in args.variants:
        sets = [f"train.epochs={args.epochs}", f"train.samples_per_epoch={args.samples}", "train.val_every=100",
                *VARIANTS[name]]
        cfg = load_config(args.config, sets)
        out = args.out / name.replace(", ", "_").replace("=", "")
        t0 = time.time()
        result = train(cfg, out, progress=False)
        minutes = (time.time() - t0) / 60
        _, val = split_cases(cfg, load_cases(cfg), out)
        val = val[: args.eval_cases] if args.eval_cases else val
        # medseg's one evaluation loop: Dice, and AJI / PQ / F1 / fused from the same predictions' components.
        predictor = Predictor.from_bundle(result.bundle)
        evaluation = evaluate_cases(predictor, val, predictor.cfg, hd95=False)  # the bundle's planned label map
        objects = evaluation.object_summary
        rows.append({"variant": name, "dice": evaluation.mean_dice, "aji": objects["aji"][0], "pq": objects["pq"][0],
                     "f1": objects["object_f1"][0], "merged": sum(o["fused"] for o in evaluation.objects),
                     "nuclei": sum(o["objects"] for o in evaluation.objects), "cases": evaluation.n_cases,
                     "train_min": round(minutes, 1)})
        print(json.dumps(rows[-1]), flush=True)
        saved = {r["variant"]: r for r in json.loads(RESULTS.read_text())} if RESULTS.is_file() else {}
        saved[name] = {**rows[-1], "epochs": args.epochs, "samples": args.samples}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(list(saved.values()), indent=1))

    print(f"\nDSB2018 val split, {rows[0]['cases']} images, {rows[0]['nuclei']} nuclei; {args.epochs} epochs × {args.samples} crops each")
    print("| variant | Dice | AJI | PQ | object F1 (IoU>0.5) | fused components | train time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['dice']:.3f} | {r['aji']:.3f} | {r['pq']:.3f} | {r['f1']:.3f} | {r['merged']} | {r['train_min']} min |")


if __name__ == "__main__":
    main()
