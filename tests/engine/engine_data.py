"""The tiny real dataset and config of the engine tests (tests import these from here, not from conftest: every
test folder has a conftest module, and which one ``import conftest`` finds depends on the run)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples/data/dsb2018_sample"
CROP = 64


def _crop_with_foreground(mask: np.ndarray) -> tuple[int, int]:
    """Top-left corner of the 64x64 window holding the most foreground (coarse search)."""
    best, where = -1, (0, 0)
    for y in range(0, mask.shape[0] - CROP + 1, 16):
        for x in range(0, mask.shape[1] - CROP + 1, 16):
            fg = int((mask[y : y + CROP, x : x + CROP] > 0).sum())
            if fg > best:
                best, where = fg, (y, x)
    return where


def make_tiny_dataset(root: Path, n: int = 8, instances: bool = False) -> Path:
    """``n`` real 64x64 image/mask pairs (gray) cropped around nuclei (and their instance maps in instances/)."""
    for sub in ("images", "masks", *(["instances"] if instances else [])):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for p in sorted((SAMPLE / "images").iterdir())[:n]:
        image = np.asarray(Image.open(p).convert("L"))
        mask = np.asarray(Image.open(SAMPLE / "masks" / p.name).convert("L"))
        y, x = _crop_with_foreground(mask)
        Image.fromarray(image[y : y + CROP, x : x + CROP]).save(root / "images" / f"{p.stem}.png")
        Image.fromarray(mask[y : y + CROP, x : x + CROP]).save(root / "masks" / f"{p.stem}.png")
        if instances:
            objects = np.asarray(Image.open(SAMPLE / "instances" / p.name))
            Image.fromarray(objects[y : y + CROP, x : x + CROP]).save(root / "instances" / f"{p.stem}.png")
    return root


TINY_OVERRIDES = [
    "data.patch_size=[64, 64]", "data.channels=1", "data.folds=4", "model.pretrained=none",
    "model.decoder_channels=[32, 16, 8, 8, 8]", "train.batch_size=4", "train.samples_per_epoch=8",
    "train.warmup_epochs=0", "augment.preset=none", "inference.tile_size=[64, 64]", "train.lr=0.003",
]


class StopAfterEpoch(L.Callback):
    """Stops a run after validating ``epoch``, as an interruption would (its checkpoint is written): the resume tests
    then continue it with ``train(..., resume=True)``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True
