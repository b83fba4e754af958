"""`medseg train`: cases -> split -> cached datasets -> Lightning fit -> model bundle, curves, metrics.

Recipes on top of one run (all Lightning): SGDR snapshot ensembles (`SnapshotEnsemble`), stochastic weight
averaging with BatchNorm statistics recomputed (`StochasticWeightAveraging`), early stopping, a wall-clock
budget (``max_time``), exact resume from ``OUT/checkpoints/last.ckpt``. Every member ends up in the bundle;
``OUT/run_info.json`` records config, git commit and package versions; the curves are diagnosed at the end.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    ModelCheckpoint,
    RichProgressBar,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger

from medseg.bundle import RESEARCH_NOTICE, save_bundle
from medseg.config import ExperimentConfig, config_to_yaml
from medseg.data import Case, discover_cases, load_or_make_splits, read_datalist, train_val_ids
from medseg.data.dataset import PatchDataset, WholeCaseDataset, build_case_cache, collate_single
from medseg.engine.cached_features import attach_feature_cache
from medseg.engine.callbacks import LearningCurves, SnapshotEnsemble, read_snapshots
from medseg.engine.checkpointing import AtomicCheckpointIO, ResumableRandomState
from medseg.engine.diagnose import Finding, diagnose_curves
from medseg.engine.module import SegModule
from medseg.errors import ConfigError, DatasetError
from medseg.models.pretrained import load_checkpoint
from medseg.transforms.augment import build_augmentation_2d

log = logging.getLogger("medseg")

# Packages whose versions decide whether a run can be reproduced; recorded in run_info.json.
_VERSIONED = ("medseg", "torch", "torchvision", "lightning", "monai", "segmentation-models-pytorch", "timm",
              "albumentations", "numpy", "SimpleITK", "optuna", "safetensors")


@dataclass
class TrainResult:
    out_dir: Path
    bundle: Path
    best_val_dice: float  # best val Dice of a single checkpoint (ModelCheckpoint's score)
    epochs_run: int
    seconds: float
    members: list[str] = field(default_factory=list)  # ensemble members written to the bundle
    final_val_dice: float = float("nan")  # val Dice of the last validation (the SWA model when swa is on)
    global_step: int = 0
    findings: list[Finding] = field(default_factory=list)  # diagnosis of the learning curves


def load_cases(cfg: ExperimentConfig) -> list[Case]:
    d = cfg.data
    if d.datalist is not None:
        cases = read_datalist(d.datalist, d.group_column)
    elif d.group_column is not None:
        raise ConfigError(f"data.group_column={d.group_column!r} needs data.datalist (a CSV/JSON with that column)")
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
    if cfg.data.train_fraction < 1.0:  # low-data experiments: a seeded subset of the training fold, same val
        keep = max(1, round(cfg.data.train_fraction * len(train_ids)))
        train_ids = sorted(random.Random(cfg.data.split_seed).sample(sorted(train_ids), keep))
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


def _git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_run_info(cfg: ExperimentConfig, out_dir: Path, resumed: bool) -> Path:
    """``OUT/run_info.json``: what it takes to reproduce the run (resolved config, git commit of the medseg
    source, package versions, seed/determinism, platform). Rewritten on resume with ``resumed: true``."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "resumed": resumed,
        "git_commit": _git_commit(Path(__file__).resolve().parent),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "seed": cfg.train.seed,
        "deterministic": cfg.train.deterministic,
        "argv": sys.argv,
        "packages": versions,
        "config": cfg.model_dump(mode="json"),
    }
    path = Path(out_dir) / "run_info.json"
    path.write_text(json.dumps(info, indent=1, default=str))
    return path


def build_loggers(cfg: ExperimentConfig, out_dir: Path) -> list:
    """CSV always; TensorBoard and MLflow when configured (their packages are optional extras)."""
    loggers: list = [CSVLogger(out_dir, name="logs")]
    t = cfg.train
    if t.log_tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        try:
            loggers.append(TensorBoardLogger(out_dir, name="tensorboard"))
        except ModuleNotFoundError:
            raise ConfigError("train.log_tensorboard needs the tensorboard package (pip install tensorboard)") from None
    if t.mlflow_uri:
        from lightning.pytorch.loggers import MLFlowLogger

        try:
            loggers.append(MLFlowLogger(experiment_name=cfg.name, tracking_uri=t.mlflow_uri))
        except ModuleNotFoundError:
            raise ConfigError("train.mlflow_uri needs the mlflow package (pip install mlflow)") from None
    return loggers


def build_callbacks(cfg: ExperimentConfig, out_dir: Path, progress: bool) -> list[L.Callback]:
    t = cfg.train
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="best", monitor="val_dice", mode="max",
                        save_on_train_epoch_end=False),
        # A second, unmonitored checkpoint for resume: Lightning 2.6's save_last only writes last.ckpt in
        # epochs where the monitored top-k checkpoint was saved too, which would resume from a stale epoch.
        ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                        enable_version_counter=False, save_on_train_epoch_end=False),
        LearningCurves(out_dir),
    ]
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    if t.early_stop_patience:
        callbacks.append(EarlyStopping(monitor="val_dice", mode="max", patience=t.early_stop_patience))
    if t.snapshots:
        if t.schedule != "sgdr":
            raise ConfigError(f"train.snapshots needs train.schedule: sgdr (snapshots are taken at its restarts), got {t.schedule!r}")
        callbacks.append(SnapshotEnsemble(out_dir / "snapshots"))
    if t.swa:
        # Lightning averages the weights from swa_start_epoch on (SWALR anneals to swa_lr), then runs one
        # extra pass over the training loader with BatchNorm momentum None to recompute the running
        # statistics for the averaged weights (the averaged weights never saw the old statistics).
        callbacks.append(StochasticWeightAveraging(
            swa_lrs=t.swa_lr if t.swa_lr is not None else 0.2 * t.lr,
            swa_epoch_start=t.swa_start_epoch, annealing_epochs=1,
        ))
    return callbacks


def build_trainer(
    cfg: ExperimentConfig, out_dir: Path, progress: bool = True, extra_callbacks: list | None = None,
    max_time: timedelta | None = None,
) -> L.Trainer:
    t = cfg.train
    if t.swa and t.early_stop_patience:
        raise ConfigError("train.swa and train.early_stop_patience exclude each other: SWA needs the run to reach its last epoch")
    return L.Trainer(
        default_root_dir=out_dir,
        max_epochs=t.epochs,
        max_time=max_time,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        # smp's timm EfficientNet encoders keep conv_head/bn2, which never reach the loss: plain DDP would stop
        # at the first step, so "ddp" means Lightning's DDP that tolerates unused parameters.
        strategy="ddp_find_unused_parameters_true" if t.strategy == "ddp" else t.strategy,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        check_val_every_n_epoch=t.val_every,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=build_loggers(cfg, out_dir),
        callbacks=[*build_callbacks(cfg, out_dir, progress), *(extra_callbacks or [])],
        plugins=[AtomicCheckpointIO()],  # temp file + rename in the checkpoint folder, whatever TMPDIR is
        enable_progress_bar=progress,
        enable_model_summary=False,
    )


def build_dataloaders(cfg: ExperimentConfig, train_cases: list[Case], val_cases: list[Case], progress: bool = False):
    """(train loader of random augmented patches, val loader of whole cases)."""
    train_cache = build_case_cache(train_cases, cfg, progress=progress)
    val_cache = build_case_cache(val_cases, cfg, progress=progress)
    augment = build_augmentation_2d(
        cfg.augment.preset, cfg.data.patch_size, cfg.data.input_channels, padding_mode=cfg.augment.padding_mode,
        rgb=cfg.data.channels == 3 and cfg.data.context_slices == 0,  # no hue shifts on stacks of gray slices
        seed=cfg.train.seed,  # albumentations keeps its own RNG, which seed_everything does not reach
    )
    train_ds = PatchDataset(train_cache, cfg, augment, cfg.train.samples_per_epoch)
    bs = cfg.train.batch_size
    train_dl = torch.utils.data.DataLoader(
        train_ds, batch_size=bs, shuffle=True, num_workers=cfg.data.num_workers,
        drop_last=len(train_ds) > bs,  # a last batch of 1 breaks BatchNorm
        persistent_workers=cfg.data.num_workers > 0,
    )
    val_dl = torch.utils.data.DataLoader(WholeCaseDataset(val_cache), batch_size=1, collate_fn=collate_single)
    return train_dl, val_dl


def _load_checkpoint_state(path: str) -> dict[str, torch.Tensor]:
    # weights_only=True: plain tensors and containers only; our checkpoints hold nothing else.
    return _strip_prefix(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])


def train(
    cfg: ExperimentConfig,
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    extra_callbacks: list[L.Callback] | None = None,
    max_time: timedelta | None = None,
) -> TrainResult:
    """Train one model as configured; write ``out_dir/{bundle/, progress.png, metrics.csv, splits.json,
    run_info.json, diagnosis.txt, checkpoints/}``.

    The bundle's members: ``swa`` (with ``train.swa``), ``snapshot_<i>`` for each completed SGDR cycle (with
    ``train.snapshots``), otherwise ``model`` (the best checkpoint by val Dice). ``resume`` continues from
    ``checkpoints/last.ckpt`` (same epoch, optimiser and scheduler state); ``max_time`` stops the run after
    that much wall-clock time (the bundle is still written).
    """
    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    last = out_dir / "checkpoints" / "last.ckpt"
    resuming = resume and last.exists()
    if not resuming:
        # A fresh run must not inherit members or checkpoints of an earlier run in the same folder.
        shutil.rmtree(out_dir / "snapshots", ignore_errors=True)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    (out_dir / "config.yaml").write_text(config_to_yaml(cfg))
    write_run_info(cfg, out_dir, resuming)

    cases = load_cases(cfg)
    train_cases, val_cases = split_cases(cfg, cases, out_dir)
    log.info("training on %d cases, validating on %d", len(train_cases), len(val_cases))
    train_dl, val_dl = build_dataloaders(cfg, train_cases, val_cases, progress)

    module = SegModule(cfg)
    if cfg.model.cache_encoder_features:  # the decoder trains on a frozen encoder's features, computed once per case
        train_dl = attach_feature_cache(module, train_dl, cfg)
    # The RNG state (global and the augmentation's own) goes into every checkpoint: --resume then draws the
    # same patches as an uninterrupted run would.
    rng_state = ResumableRandomState(train_dl.dataset.augment, cfg.train.seed)
    trainer = build_trainer(cfg, out_dir, progress, [rng_state, *(extra_callbacks or [])], max_time)
    # Our checkpoints hold only tensors, numbers, strings and containers (model, optimiser, scheduler,
    # loop and callback state), so resume loads them with weights_only=True: nothing is unpickled.
    if resuming:  # a tampered or damaged last.ckpt: a one-line error now, not a traceback from inside fit
        load_checkpoint(last)
    trainer.fit(module, train_dl, val_dl, ckpt_path=str(last) if resuming else None,
                weights_only=True if resuming else None)

    ckpt = trainer.checkpoint_callback
    best_path = ckpt.best_model_path if ckpt else ""
    best_score = ckpt.best_model_score if ckpt else None
    val_dice = float(best_score) if best_score is not None else float("nan")
    final = trainer.callback_metrics.get("val_dice")
    final_dice = float(final) if final is not None else float("nan")

    members: dict[str, dict[str, torch.Tensor]] = {}
    notes = []
    if cfg.train.snapshots:
        members.update(read_snapshots(out_dir / "snapshots"))
        notes.append(f"- Snapshot ensemble: {len(members)} SGDR cycle end(s)")
    # Lightning's SWA adds one epoch (the BatchNorm pass); a run stopped earlier (max_time, early stop)
    # never got the averaged weights, so it must not claim to hold them.
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.model.modules())
    swa_finished = cfg.train.swa and trainer.current_epoch >= cfg.train.epochs + int(has_bn)
    if cfg.train.swa and not swa_finished:
        log.warning("SWA did not finish (stopped after epoch %d of %d): the bundle holds the best checkpoint instead",
                    trainer.current_epoch, cfg.train.epochs)
    if swa_finished:
        # After fit the module holds the SWA average with BatchNorm statistics recomputed by Lightning.
        members["swa"] = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
        notes.append(f"- Stochastic weight averaging from epoch {cfg.train.swa_start_epoch}; val Dice of the average {final_dice:.4f}")
    if not members:
        if cfg.train.snapshots and not cfg.train.swa:
            log.warning("no SGDR cycle completed (run stopped early?): the bundle holds the best checkpoint instead")
        members["model"] = _load_checkpoint_state(best_path) if best_path else module.model.state_dict()

    curves = next((c for c in trainer.callbacks if isinstance(c, LearningCurves)), None)
    findings = diagnose_curves(curves.rows) if curves is not None else []
    if trainer.is_global_zero:
        (out_dir / "diagnosis.txt").write_text("\n".join(f"[{f.code}] {f.message}" for f in findings) + "\n")
    bundle = out_dir / "bundle"
    if trainer.is_global_zero:
        extra = ("\n## Ensemble\n" + "\n".join(notes) + f"\n- Members: {', '.join(members)}\n") if notes else ""
        save_bundle(
            bundle, cfg, members, preprocessing_record(cfg),
            model_card(cfg, len(train_cases), len(val_cases), {"val Dice (foreground mean)": val_dice}, extra),
            extra_files={"splits.json": split_file_for(cfg, out_dir).read_text()},
        )
    return TrainResult(out_dir, bundle, val_dice, trainer.current_epoch, time.time() - start, list(members),
                       final_dice, trainer.global_step, findings)
