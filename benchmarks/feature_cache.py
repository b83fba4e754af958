"""Epoch time of decoder-only training with and without cached encoder features (``model.cache_encoder_features``).

Both rows train the same frozen-encoder UNet (offline ImageNet EfficientNet-Lite0, ``model.transfer:
freeze_encoder``, ``augment.preset: none``) on the demo sample; the cached row encodes each training image once
(in its first epoch) and trains the decoder on crops of the cached features afterwards. Epoch times exclude
validation. Prints a table.

    nice -n 10 .venv/bin/python benchmarks/feature_cache.py --epochs 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L

from medseg.config import load_config
from medseg.engine.train import train

REPO = Path(__file__).resolve().parents[1]
FROZEN = ["model.transfer=freeze_encoder", "augment.preset=none"]


class EpochTimes(L.Callback):
    """Wall-clock seconds of each training epoch (validation not included)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "configs/experiments/demo_nuclei.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "outputs/bench/feature_cache")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    rows = []
    for cached in (False, True):
        cfg = load_config(args.config, [f"train.epochs={args.epochs}", *FROZEN,
                                        f"model.cache_encoder_features={str(cached).lower()}", *args.sets])
        times = EpochTimes()
        result = train(cfg, args.out / ("cached" if cached else "plain"), progress=False, extra_callbacks=[times])
        later = times.seconds[1:] or times.seconds
        row = {"cached": cached, "first_epoch_s": round(times.seconds[0], 1),
               "later_epoch_s": round(sum(later) / len(later), 1), "val_dice": round(result.best_val_dice, 4),
               "samples_per_epoch": cfg.train.samples_per_epoch, "patch": list(cfg.data.patch_size)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    plain, cached = rows
    print(f"\n{args.config.name}: frozen encoder, {plain['samples_per_epoch']} crops of "
          f"{plain['patch'][0]}×{plain['patch'][1]} per epoch, {args.epochs} epochs")
    print("| encoder features | first epoch | later epochs (mean) | speed-up (later) | best val Dice |")
    print("|---|---|---|---|---|")
    for r in rows:
        speedup = plain["later_epoch_s"] / r["later_epoch_s"]
        print(f"| {'cached' if r['cached'] else 'recomputed'} | {r['first_epoch_s']} s | {r['later_epoch_s']} s | "
              f"{speedup:.2f}× | {r['val_dice']:.3f} |")


if __name__ == "__main__":
    main()
