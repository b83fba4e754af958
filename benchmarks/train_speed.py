"""Training throughput: medseg's training step against the loop a user would write (issue: performance).

Both sides train the same network (smp UNet, timm-tf_efficientnet_lite0, random init — weights do not change
speed), on the same images, patch, batch, augmentation (albumentations: pad, random sized crop, flips, affine,
elastic/grid warp, brightness/contrast/gamma, noise/blur — medseg's ``default`` preset), loss (Dice + CE) and
threads, in one process, alternating blocks of steps so that machine load hits both alike:

* **plain**: images decoded once into memory as float32 (what a script does), an albumentations ``Compose`` on the
  whole image per sample, a ``DataLoader``, ``model(x)``, loss, ``backward``, ``AdamW.step``;
* **medseg**: its own dataset (cache in the source dtype, a window around the patch centre converted and augmented
  instead of the whole image) and ``SegModule.training_step`` (+ the same optimiser), with the training options
  under test (``--channels-last``, ``--compile``).

Sources: ``small`` — DSB2018 images (256–512 px), ``large`` — the same images upscaled 4x (1024–2048 px, as camera
photos or slides are). Prints images/s for both and their ratio (target >= 1.3x).

    .venv/bin/python benchmarks/train_speed.py --steps 12 --blocks 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("MEDSEG_DATASETS", REPO.parent / "shared" / "datasets"))


def make_source(kind: str, work: Path, n: int) -> Path:
    from PIL import Image

    src = DATASETS / "dsb2018_nuclei"
    dst = work / kind
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir(parents=True)
    for p in sorted((src / "images").iterdir())[:n]:
        im, mk = Image.open(p), Image.open(src / "masks" / p.name)
        if kind == "large":
            size = (im.width * 4, im.height * 4)
            im, mk = im.resize(size, Image.BILINEAR), mk.resize(size, Image.NEAREST)
        im.convert("RGB").save(dst / "images" / p.name)
        mk.save(dst / "masks" / p.name)
    return dst


def plain_loop(data: Path, patch: int, batch: int, seed: int):
    """What a user writes with smp + albumentations + plain PyTorch. Returns ``step()`` (one optimiser step)."""
    import albumentations as A
    import cv2
    import segmentation_models_pytorch as smp
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in sorted((data / "images").iterdir())]
    masks = [(np.asarray(Image.open(p)) > 0).astype(np.int64) for p in sorted((data / "masks").iterdir())]
    aug = A.Compose([
        A.PadIfNeeded(min_height=int(patch * 1.25), min_width=int(patch * 1.25), border_mode=cv2.BORDER_REFLECT_101),
        A.RandomSizedCrop(min_max_height=(int(patch * 0.8), int(patch * 1.25)), size=(patch, patch)),
        A.SquareSymmetry(p=1.0),
        A.Affine(rotate=(-45, 45), shear=(-10, 10), border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.OneOf([A.ElasticTransform(alpha=300, sigma=12, p=1.0), A.GridDistortion(p=1.0)], p=0.3),
        A.RandomBrightnessContrast(0.2, 0.2, p=0.5), A.RandomGamma(p=0.3),
        A.OneOf([A.GaussNoise(std_range=(0.01, 0.05), p=1.0), A.GaussianBlur(sigma_limit=(0.3, 1.0), p=1.0)], p=0.2),
    ], seed=seed)

    class DS(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10**6

        def __getitem__(self, i: int):
            j = i % len(images)
            out = aug(image=images[j], mask=masks[j])
            return torch.from_numpy(out["image"].transpose(2, 0, 1).copy()), torch.from_numpy(out["mask"])

    loader = iter(torch.utils.data.DataLoader(DS(), batch_size=batch, shuffle=True, num_workers=0))
    model = smp.Unet("timm-tf_efficientnet_lite0", encoder_weights=None, in_channels=3, classes=2)
    dice, ce = smp.losses.DiceLoss("multiclass"), torch.nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model.train()

    def step() -> None:
        x, y = next(loader)
        y = y.long()
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = dice(logits, y) + ce(logits, y)
        loss.backward()
        opt.step()

    return step


def medseg_loop(data: Path, patch: int, batch: int, seed: int, channels_last: bool, compile_: bool):
    from medseg.config import load_config
    from medseg.data import discover_cases
    from medseg.engine.module import SegModule
    from medseg.engine.train import build_dataloaders

    cfg = load_config(None, [f"data.root={data}", "plan=false", f"data.patch_size=[{patch}, {patch}]", "data.channels=3",
                             f"train.batch_size={batch}", "model.pretrained=none", f"train.seed={seed}",
                             f"train.samples_per_epoch={10**6}", f"train.channels_last={str(channels_last).lower()}",
                             f"train.compile={str(compile_).lower()}", "augment.preset=default"])
    cases = discover_cases(data)
    train_dl, _ = build_dataloaders(cfg, cases, cases[:1])
    loader = iter(train_dl)
    module = SegModule(cfg)
    module.setup("fit")
    module.log = lambda *a, **k: None  # no Trainer here: logging is Lightning's job, not part of a step
    opt = torch.optim.AdamW(module.model.parameters(), 1e-3)
    module.model.train()

    def step() -> None:
        b = next(loader)
        opt.zero_grad(set_to_none=True)
        loss = module.training_step(b, 0)
        loss.backward()
        opt.step()

    return step


def measure(step, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="*", default=["small", "large"])
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="steps per measured block")
    ap.add_argument("--blocks", type=int, default=3, help="alternating blocks per side")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results/train_speed.jsonl")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="medseg-train-speed-"))
    rows = []
    try:
        for kind in args.sources:
            data = make_source(kind, work, args.images)
            sides = {"plain": plain_loop(data, args.patch, args.batch, 0),
                     "medseg": medseg_loop(data, args.patch, args.batch, 0, args.channels_last, args.compile)}
            for step in sides.values():  # warm-up: first-call allocations, oneDNN primitives, compilation
                measure(step, 3)
            times: dict[str, list[float]] = {k: [] for k in sides}
            for _ in range(args.blocks):
                for name, step in sides.items():
                    times[name].append(measure(step, args.steps) / args.steps)
            per_img = {k: args.batch / float(np.median(v)) for k, v in times.items()}
            row = {"source": kind, "patch": args.patch, "batch": args.batch, "threads": torch.get_num_threads(),
                   "channels_last": args.channels_last, "compile": args.compile,
                   "plain_img_s": round(per_img["plain"], 2), "medseg_img_s": round(per_img["medseg"], 2),
                   "ratio": round(per_img["medseg"] / per_img["plain"], 2), "date": time.strftime("%Y-%m-%d")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("\n| source | patch | batch | threads | channels-last | compile | plain img/s | medseg img/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['patch']}² | {r['batch']} | {r['threads']} | {r['channels_last']} | {r['compile']} | "
              f"{r['plain_img_s']} | {r['medseg_img_s']} | **{r['ratio']}x** |")


if __name__ == "__main__":
    main()
