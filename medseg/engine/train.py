"""`medseg train`: cases -> split -> cached datasets -> Lightning fit -> model bundle, curves, metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from medseg.bundle import RESEARCH_NOTICE, save_bundle
from medseg.config import ExperimentConfig, config_to_yaml
from medseg.data import Case, discover_cases, load_or_make_splits, read_datalist, train_val_ids
from medseg.data.dataset import PatchDataset, WholeCaseDataset, build_case_cache, collate_single
from medseg.engine.callbacks import LearningCurves
from medseg.engine.module import SegModule
from medseg.errors import ConfigError, DatasetError
from medseg.transforms.augment import build_augmentation_2d

log = logging.getLogger("medseg")


@dataclass
class TrainResult:
    out_dir: Path
    bundle: Path
    best_val_dice: float
    epochs_run: int
    seconds: float


def load_cases(cfg: ExperimentConfig) -> list[Case]:
    d = cfg.data
    if d.datalist is not None:
        cases = read_datalist(d.datalist)
    elif d.root is not None:
        cases = discover_cases(d.root, d.images_dir, d.masks_dir, d.instances_dir)
    else:
        raise ConfigError("config names no data: set data.root (images/ + masks/) or data.datalist, or pass --data")
    if d.limit_cases:
        cases = cases[: d.limit_cases]
    if not cases:
        raise DatasetError("empty dataset")
    return cases


def split_file_for(cfg: ExperimentConfig, out_dir: Path) -> Path:
    return Path(cfg.data.split_file or out_dir / "splits.json")


def split_cases(cfg: ExperimentConfig, cases: list[Case], out_dir: Path) -> tuple[list[Case], list[Case]]:
    split_file = split_file_for(cfg, out_dir)
    folds = load_or_make_splits(Path(split_file), cases, cfg.data.folds, cfg.data.split_seed)
    train_ids, val_ids = train_val_ids(folds, cfg.data.fold)
    by_id = {c.id: c for c in cases}
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]


def preprocessing_record(cfg: ExperimentConfig) -> dict:
    d = cfg.data
    return {
        "channels": d.channels, "intensity": str(d.intensity), "ct_window": list(d.ct_window),
        "context_slices": d.context_slices, "input_channels": d.input_channels, "num_classes": d.num_classes,
        "array_convention": "(y, x[, C]) or (z, y, x); network input (B, C, H, W), 2.5D channels slice-major",
    }


def model_card(cfg: ExperimentConfig, n_train: int, n_val: int, val_metrics: dict[str, float], extra: str = "") -> str:
    labels = "\n".join(f"| {i} | {n} |" for i, n in sorted(cfg.data.labels.items()))
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in val_metrics.items())
    data = cfg.data.root.name if cfg.data.root else (cfg.data.datalist.name if cfg.data.datalist else "?")
    return f"""# {cfg.name}

**{RESEARCH_NOTICE}**

{cfg.description or "Segmentation model trained with medseg."}

## Model
- Architecture: {cfg.model.arch} with encoder `{cfg.model.encoder}` (initialised from `{cfg.model.pretrained}`)
- Input: {cfg.data.input_channels} channel(s) ({cfg.data.channels} per slice, 2.5D context ±{cfg.data.context_slices}), intensity `{cfg.data.intensity}`

## Labels
| index | name |
|---|---|
{labels}

## Training data
- Dataset: `{data}`; {n_train} training and {n_val} validation cases (fold {cfg.data.fold} of {cfg.data.folds}, seed {cfg.data.split_seed})

## Validation metrics
| metric | value |
|---|---|
{metrics}
{extra}
## Intended use
Research on {", ".join(n for i, n in sorted(cfg.data.labels.items()) if i)} segmentation in images like the training data.
Not a medical device. Check every output.
"""


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def build_trainer(cfg: ExperimentConfig, out_dir: Path, progress: bool = True, extra_callbacks: list | None = None) -> L.Trainer:
    t = cfg.train
    ckpt_dir = out_dir / "checkpoints"
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_dice", mode="max", save_last=True,
                        save_on_train_epoch_end=False),
        LearningCurves(out_dir),
        *(extra_callbacks or []),
    ]
    if t.early_stop_patience:
        callbacks.append(EarlyStopping(monitor="val_dice", mode="max", patience=t.early_stop_patience))
    return L.Trainer(
        default_root_dir=out_dir,
        max_epochs=t.epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        check_val_every_n_epoch=t.val_every,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=CSVLogger(out_dir, name="logs"),
        callbacks=callbacks,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )


def train(cfg: ExperimentConfig, out_dir: Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train one model as configured; write ``out_dir/{bundle/, progress.png, metrics.csv, splits.json}``."""
    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    (out_dir / "config.yaml").write_text(config_to_yaml(cfg))

    cases = load_cases(cfg)
    train_cases, val_cases = split_cases(cfg, cases, out_dir)
    log.info("training on %d cases, validating on %d", len(train_cases), len(val_cases))
    train_cache = build_case_cache(train_cases, cfg, progress=progress)
    val_cache = build_case_cache(val_cases, cfg, progress=progress)
    augment = build_augmentation_2d(
        cfg.augment.preset, cfg.data.patch_size, cfg.data.input_channels, padding_mode=cfg.augment.padding_mode,
        rgb=cfg.data.channels == 3 and cfg.data.context_slices == 0,  # no hue shifts on stacks of gray slices
    )
    train_ds = PatchDataset(train_cache, cfg, augment, cfg.train.samples_per_epoch)
    bs = cfg.train.batch_size
    train_dl = torch.utils.data.DataLoader(
        train_ds, batch_size=bs, shuffle=True, num_workers=cfg.data.num_workers,
        drop_last=len(train_ds) > bs,  # a last batch of 1 breaks BatchNorm
        persistent_workers=cfg.data.num_workers > 0,
    )
    val_dl = torch.utils.data.DataLoader(WholeCaseDataset(val_cache), batch_size=1, collate_fn=collate_single)

    module = SegModule(cfg)
    trainer = build_trainer(cfg, out_dir, progress)
    last = out_dir / "checkpoints" / "last.ckpt"
    trainer.fit(module, train_dl, val_dl, ckpt_path=str(last) if resume and last.exists() else None)

    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    best_score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    state = (
        _strip_prefix(torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"])
        if best_path else module.model.state_dict()
    )
    val_dice = float(best_score) if best_score is not None else float("nan")
    bundle = out_dir / "bundle"
    if trainer.is_global_zero:
        save_bundle(
            bundle, cfg, {"model": state}, preprocessing_record(cfg),
            model_card(cfg, len(train_cases), len(val_cases), {"val Dice (foreground mean)": val_dice}),
            extra_files={"splits.json": split_file_for(cfg, out_dir).read_text()},
        )
    return TrainResult(out_dir, bundle, val_dice, trainer.current_epoch, time.time() - start)
