"""GPU path (issue: performance): training images/s and a CT end to end with flip TTA, on whatever CUDA device
is present.

* **train**: the default network (UNet, EfficientNet-Lite0) through ``SegModule.training_step`` + AdamW on
  512² batches of 16 under bf16 autocast, channels-last (the data already on the device: this row measures the
  step, not the loader), images/s over timed steps after a warm-up;
* **ct**: a 512×512×300 DICOM series (the real CT in ../shared/datasets stacked 15 times, uncompressed) read,
  segmented by a 2.5D bundle with flip TTA (4 passes per slice) in slice batches sized to the GPU, and the
  mask written as NIfTI — seconds per stage and in total (goal on an H100/H200-class GPU: < 10 s).

Prints a table and appends the row to ``benchmarks/results/gpu.jsonl``. ``--device cpu --small`` runs the same
code tiny on a CPU (what the test of this script does); no test needs a GPU.

    python benchmarks/gpu.py                 # on the GPU machine
    python benchmarks/gpu.py --device cpu --small
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from backends import make_bundle, make_ct_series  # noqa: E402 - benchmarks/ is not a package


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_row(device: torch.device, size: int, batch: int, steps: int) -> dict:
    from medseg.config import load_config
    from medseg.engine.module import SegModule

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    cfg = load_config(None, ["model.pretrained=none", "plan=false", "data.channels=3", f"train.batch_size={batch}",
                             "data.labels={0: background, 1: structure}", "train.channels_last=true",
                             f"train.precision={'bf16-mixed' if bf16 else '32-true'}"])
    module = SegModule(cfg).to(device)
    module.setup("fit")
    module.log = lambda *a, **k: None  # no Trainer: logging is not part of a step
    opt = torch.optim.AdamW(module.model.parameters(), 1e-3)
    module.model.train()
    g = torch.Generator(device=device).manual_seed(0)
    image = torch.rand(batch, 3, size, size, device=device, generator=g)
    label = (torch.rand(batch, size, size, device=device, generator=g) > 0.7).to(torch.uint8)
    data = {"image": image, "label": label}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module.training_step(data, 0)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t
    return {"size": size, "batch": batch, "bf16": bf16, "channels_last": True, "steps": steps,
            "images_per_s": round(batch * steps / seconds, 1)}


def ct_row(device: torch.device, work: Path, repeat: int, slice_batch: int) -> dict:
    from medseg.inference import Predictor
    from medseg.inference.outputs import ModelStamp, write_prediction_outputs
    from medseg.io import read_scan

    bundle = make_bundle(work / "bct", ct=True)
    series = make_ct_series(work / "series", repeat)
    predictor = Predictor.from_bundle(bundle, device=str(device))
    predictor.inference.batch_size = slice_batch  # slice batches sized to the GPU (a benchmark-only setting)
    warm = torch.rand(predictor.cfg.data.channels, 4, 512, 512)
    predictor.predict_image(warm, tta="flips")  # cuDNN autotuning and allocator warm-up outside the timed run
    sync(device)
    t0 = time.perf_counter()
    scan = read_scan(series)
    t1 = time.perf_counter()
    pred = predictor.predict_scan(scan, tta="flips")
    sync(device)
    t2 = time.perf_counter()
    write_prediction_outputs(scan, pred, predictor.labels, work / "out", name="ct", label_map=predictor.cfg.data.label_map,
                             model=ModelStamp(predictor.name, predictor.weights_hash))
    t3 = time.perf_counter()
    return {"slices": int(scan.array.shape[0]), "tta": "flips", "slice_batch": slice_batch,
            "read_s": round(t1 - t0, 2), "predict_s": round(t2 - t1, 2), "write_s": round(t3 - t2, 2),
            "total_s": round(t3 - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes (a CPU check of this script)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results/gpu.jsonl")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or --device cpu --small to check the script")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size, batch, steps, repeat, slice_batch = (64, 2, 2, 1, 4) if args.small else (512, 16, 20, 15, 32)
    work = Path(tempfile.mkdtemp(prefix="medseg-gpu-"))
    try:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        record = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "small": args.small,
                  "train": train_row(device, size, batch, steps), "ct": ct_row(device, work, repeat, slice_batch)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(record), flush=True)
    if not args.small:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as f:
            f.write(json.dumps(record) + "\n")
    tr, ct = record["train"], record["ct"]
    print(f"\n| device | train img/s ({tr['size']}², batch {tr['batch']}, bf16 {tr['bf16']}, channels-last) | "
          f"CT {ct['slices']} slices flips: read s | predict s | write s | total s |")
    print("|---|---|---|---|---|---|")
    print(f"| {name} | {tr['images_per_s']} | {ct['read_s']} | {ct['predict_s']} | {ct['write_s']} | **{ct['total_s']}** |")


if __name__ == "__main__":
    main()
