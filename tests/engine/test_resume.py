"""Exact resume: a run interrupted after an epoch and resumed with ``--resume`` ends with the same weights and
the same learning curve as an uninterrupted run (the RNG state travels in the checkpoint), and the
checkpoint file is replaced atomically beside itself, not staged elsewhere."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from engine_data import StopAfterEpoch

from medseg.engine.checkpointing import AtomicCheckpointIO
from medseg.engine.train import build_dataloaders, load_cases, split_cases, train

# Random 48x48 crops of the 64x64 tiles with the default augmentation and batch mixing: every epoch's batches
# depend on the sampler's shuffle, the augmentation's own generators, the mixup/cutmix generator and the
# encoder's stochastic depth.
RANDOM_TRAINING = ("train.epochs=3", "augment.preset=default", "data.patch_size=[48, 48]", "train.deterministic=true",
                   "augment.mixup=0.4", "augment.cutmix=0.4")



def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg(*RANDOM_TRAINING)
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, extra_callbacks=[StopAfterEpoch(0)])
    assert [r["epoch"] for r in _rows(tmp_path / "resumed")] == ["0.0"]
    train(cfg, tmp_path / "resumed", resume=True, progress=False)

    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.allclose(straight[k], resumed[k], atol=1e-6)]
    assert not different, different[:5]
    assert _rows(tmp_path / "straight") == _rows(tmp_path / "resumed")


def test_resume_drops_learning_curve_rows_written_after_the_checkpoint(tiny_cfg, tmp_path: Path) -> None:
    # A kill between "row written" and "checkpoint written" leaves metrics.csv one epoch ahead of last.ckpt.
    cfg = tiny_cfg("train.epochs=2")
    train(cfg, tmp_path, progress=False, extra_callbacks=[StopAfterEpoch(0)])
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("1.0,9.9,9.9,0.123,0.001\n")  # the interrupted run's epoch 1, its checkpoint never written
    train(cfg, tmp_path, resume=True, progress=False)
    rows = _rows(tmp_path)
    assert [r["epoch"] for r in rows] == ["0.0", "1.0"]
    assert rows[1]["train_loss"] != "9.9" and "nan" not in rows[1].values()


def test_data_loader_workers_draw_different_augmentations(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg("augment.preset=default", "data.patch_size=[48, 48]", "data.num_workers=2",
                   "train.samples_per_epoch=8", "train.batch_size=1")
    train_dl, _ = build_dataloaders(cfg, *split_cases(cfg, load_cases(cfg), tmp_path))
    assert len(train_dl.dataset.items) >= 2
    # Every tile index twice, one per worker (the loader hands batches to workers in turn).
    train_dl.dataset.items = [train_dl.dataset.items[0]] * len(train_dl.dataset.items)
    images = [b["image"] for b in torch.utils.data.DataLoader(
        train_dl.dataset, batch_size=1, num_workers=2, shuffle=False)]
    assert not torch.equal(images[0], images[1]), "workers 0 and 1 drew the same crop and augmentation"


@pytest.mark.parametrize("staging", ["same folder", "tmpdir elsewhere"])
def test_checkpoint_is_written_beside_itself_and_renamed(tmp_path: Path, monkeypatch, staging: str) -> None:
    if staging == "tmpdir elsewhere":
        monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
        (tmp_path / "elsewhere").mkdir()
    seen = []
    real_replace = __import__("os").replace

    def spy(src, dst):
        seen.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr("medseg.engine.checkpointing.os.replace", spy)
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 4}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 4
    assert [(s.parent, d) for s, d in seen] == [(path.parent, path)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_epochs_without_validation_still_get_a_learning_curve_row(tiny_cfg, tmp_path: Path) -> None:
    train(tiny_cfg("train.epochs=3", "train.val_every=2"), tmp_path, progress=False)
    rows = _rows(tmp_path)
    assert [r["epoch"] for r in rows] == ["0.0", "1.0", "2.0"]
    assert [r["val_dice"] == "nan" for r in rows] == [True, False, True]  # validated after epoch 2 of 3 only
    assert all(r["train_loss"] != "nan" for r in rows)


def test_ddp_ranks_draw_different_augmentations() -> None:
    from types import SimpleNamespace

    import numpy as np

    from medseg.engine.checkpointing import ResumableRandomState
    from medseg.transforms.augment import build_augmentation_2d

    image = np.random.default_rng(0).random((80, 80, 1)).astype(np.float32)
    mask = (image[..., 0] > 0.5).astype(np.uint8)
    outputs = []
    for rank in (0, 1, 2):
        aug = build_augmentation_2d("heavy", (64, 64), 1, seed=42)
        ResumableRandomState(aug, seed=42).on_train_start(SimpleNamespace(global_rank=rank, current_epoch=0), None)
        outputs.append(aug(image, mask)["image"])
    fresh = build_augmentation_2d("heavy", (64, 64), 1, seed=42)(image, mask)["image"]
    np.testing.assert_array_equal(outputs[0], fresh)  # rank 0 (and single-process runs) keep the seed's stream
    assert not np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[1], outputs[2])
