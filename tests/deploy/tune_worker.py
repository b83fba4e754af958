"""One search worker for the distributed-search tests, with a probe on the trials it starts.

    python tune_worker.py cli|library DATA OUT STORAGE STUDY TRIALS [--hang]

``cli`` runs the real ``medseg tune CONFIG --storage STORAGE --study STUDY --trials TRIALS`` command;
``library`` calls ``medseg.engine.tune.tune`` with a 1 s heartbeat and 3 s grace period (the CLI's 60 s
heartbeat would make a killed-worker test wait minutes). Both search a tiny config (real 64² crops, small UNet,
1 epoch). The probe appends ``<pid> <trial folder>`` to ``OUT/probe.log`` each time this worker starts a trial's
training; with ``--hang`` the worker then stops there for good (a worker that will be killed mid-trial; its
Optuna heartbeat thread keeps beating until the kill).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "data.patch_size=[64, 64]", "data.channels=1", "data.folds=4", "model.pretrained=none",
    "model.decoder_channels=[32, 16, 8, 8, 8]", "train.batch_size=4", "train.samples_per_epoch=8",
    "train.warmup_epochs=0", "augment.preset=none", "inference.tile_size=[64, 64]", "train.epochs=1",
    'tune.space={"train.lr": {type: loguniform, low: 1.0e-4, high: 1.0e-2}}', "tune.pruner=none",
]


def main() -> None:
    mode, data, out, storage, study, trials = sys.argv[1:7]
    hang = "--hang" in sys.argv[7:]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import medseg.engine.tune as tune_module
    from medseg.config import load_config

    real_train = tune_module.train

    def probed_train(cfg, run_dir, *args, **kwargs):
        with open(out_dir / "probe.log", "a") as f:
            f.write(f"{os.getpid()} {Path(run_dir).name}\n")
        if hang:
            while True:
                time.sleep(60)
        return real_train(cfg, run_dir, *args, **kwargs)

    tune_module.train = probed_train
    config = REPO / "configs/experiments/demo_nuclei.yaml"
    if mode == "cli":
        from medseg.cli import main as cli_main

        sys.argv = [sys.argv[0], "tune", str(config), "--data", data, "--out", out, "--storage", storage,
                    "--study", study, "--trials", trials, *(a for item in TINY for a in ("--set", item))]
        cli_main()
        return
    cfg = load_config(config, [f"data.root={data}", *TINY])
    result = tune_module.tune(cfg, out_dir, int(trials), storage=storage, study_name=study,
                              heartbeat_interval=1, grace_period=3)
    print(f"worker {os.getpid()}: study {result.study_name}: {result.complete} complete, {result.failed} failed")


if __name__ == "__main__":
    main()
