"""The shape-bias option (`augment.random_convolution`) is read from the config and changes the training batches."""

from __future__ import annotations

from pathlib import Path

import torch

from medseg.engine.train import build_dataloaders, load_cases, split_cases


def test_the_config_key_changes_the_training_batches(tiny_cfg, tmp_path: Path) -> None:
    """Same patches (the sampler and the geometric augmentation are untouched), different pixel values."""
    batches = {}
    for p in (0.0, 1.0):
        cfg = tiny_cfg(f"augment.random_convolution={p}", "augment.random_convolution_kernels=[3]", "plan=false",
                       "data.channels=3")
        train_cases, val_cases = split_cases(cfg, load_cases(cfg), tmp_path)
        train_dl, _ = build_dataloaders(cfg, train_cases, val_cases)
        torch.manual_seed(0)
        batches[p] = next(iter(train_dl))
    torch.testing.assert_close(batches[0.0]["label"], batches[1.0]["label"])
    assert not torch.allclose(batches[0.0]["image"], batches[1.0]["image"], atol=0.02)
