"""Multi-process training with Lightning DDP on this CPU machine: 2 processes (gloo) through `medseg train`.

Checks, for Lightning's launcher and for torchrun, that both ranks train the same number of steps in one process
group, that only rank 0 writes checkpoints and the bundle, and that the bundle loads and predicts. Marked
``slow`` (1–2 minutes per launcher on 2 cores); CI runs it explicitly (.ci/run: ``pytest -m slow tests/deploy``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.bundle import load_bundle
from medseg.inference import Predictor
from medseg.io import read_scan

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SAMPLE = REPO / "examples/data/dsb2018_sample"

pytestmark = pytest.mark.slow

TINY = ["--epochs", "1", "--limit-cases", "8", "--set", "data.patch_size=[64, 64]", "--set", "train.batch_size=2",
        "--set", "train.samples_per_epoch=8", "--set", "inference.tile_size=[128, 128]",
        "--set", "train.accelerator=cpu"]


# Lightning's own launcher (`medseg train --devices 2 --strategy ddp` starts rank 1 itself) and torchrun (the
# multi-node launcher: it starts every rank, Lightning only joins them), as documented in README "Scaling".
LAUNCHERS = {
    "lightning": [sys.executable],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_ddp_training_writes_once_and_predicts(launcher: str, tmp_path: Path) -> None:
    out, probe = tmp_path / "run", tmp_path / "probe"
    env = {**os.environ, "MEDSEG_DDP_PROBE": str(probe), "OMP_NUM_THREADS": "1"}
    cmd = [*LAUNCHERS[launcher], str(HERE / "ddp_probe.py"), "train",
           str(REPO / "configs/experiments/demo_nuclei.yaml"), "--data", str(SAMPLE), "--out", str(out),
           "--devices", "2", "--strategy", "ddp", *TINY]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    ranks = [json.loads((probe / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    # 8 patches per epoch split over 2 ranks, batch 2: both ranks step together, 2 steps each.
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2

    writes = [line.split(" ", 2) for line in (probe / "writes.log").read_text().splitlines()]
    assert writes, "nothing was written"
    assert {rank for rank, _, _ in writes} == {"0"}, writes
    assert [path for _, kind, path in writes if kind == "bundle"] == [str(out / "bundle")]
    assert any(kind == "checkpoint" for _, kind, _ in writes)
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "metrics.csv").read_text().count("\n") == 2

    bundle = load_bundle(out / "bundle")
    assert bundle.config.train.strategy == "ddp" and bundle.config.train.devices == 2
    image = sorted((SAMPLE / "images").iterdir())[-1]
    pred = Predictor.from_bundle(bundle, device="cpu").predict_scan(read_scan(image))
    assert pred.mask.shape == read_scan(image).spatial_shape and pred.mask.dtype == np.uint8
    assert np.isfinite(pred.probs).all()
