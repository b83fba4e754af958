"""`medseg train`: cases -> split -> cached datasets -> Lightning fit -> model bundle, curves, metrics.

Recipes on top of one run (all Lightning): SGDR snapshot ensembles (`SnapshotEnsemble`), stochastic weight
averaging with BatchNorm statistics recomputed (`StochasticWeightAveraging`), early stopping, a wall-clock
budget (``max_time``), exact resume from ``OUT/checkpoints/last.ckpt``. Every member ends up in the bundle;
``OUT/run_info.json`` records config, git commit and package versions; the curves are diagnosed at the end.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
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
from medseg.data.dataset import (
    PatchDataset,
    WholeCaseDataset,
    build_case_cache,
    check_left_out_share,
    collate_single,
)
from medseg.engine.budget import BudgetGuard, initial_epoch_steps, monotonic
from medseg.engine.cached_features import attach_feature_cache
from medseg.engine.callbacks import LearningCurves, SnapshotEnsemble, read_snapshots
from medseg.engine.checkpointing import AtomicCheckpointIO, ResumableRandomState
from medseg.engine.diagnose import Finding, diagnose_curves
from medseg.engine.evaluate import OBJECT_METRIC_NAMES
from medseg.engine.module import SegModule
from medseg.errors import ConfigError, DatasetError
from medseg.models.pretrained import load_checkpoint
from medseg.planning import DeviceProfile, detect_device, plan_run
from medseg.transforms.augment import build_augmentation_2d

log = logging.getLogger("medseg")

# Packages whose versions decide whether a run can be reproduced; recorded in run_info.json.
_VERSIONED = ("medseg", "torch", "torchvision", "lightning", "monai", "segmentation-models-pytorch", "timm",
              "albumentations", "numpy", "SimpleITK", "optuna", "safetensors")


@dataclass
class TrainResult:
    out_dir: Path
    bundle: Path
    best_val_dice: float  # best val Dice of a single checkpoint during training (ModelCheckpoint's score)
    epochs_run: int
    seconds: float
    members: list[str] = field(default_factory=list)  # ensemble members written to the bundle
    val_dice: float = float("nan")  # Dice of what the bundle ships, on every validation case, source grids
    global_step: int = 0
    findings: list[Finding] = field(default_factory=list)  # diagnosis of the learning curves
    left_out: list[str] = field(default_factory=list)  # unreadable cases, one line each (the others were used)


def load_cases(cfg: ExperimentConfig) -> list[Case]:
    """Every case of the dataset. Images without a mask (``images/`` entries with no mask, datalist rows with an
    empty mask column) are an error unless ``train.unlabeled.enabled``; then they come back with ``mask=None``."""
    d = cfg.data
    unlabeled = cfg.train.unlabeled.enabled
    if d.datalist is not None:
        cases = read_datalist(d.datalist, d.group_column)
    elif d.group_column is not None:
        raise ConfigError(f"data.group_column={d.group_column!r} needs data.datalist (a CSV/JSON with that column)")
    elif d.root is not None:
        cases = discover_cases(d.root, d.images_dir, d.masks_dir, d.instances_dir, require_masks=not unlabeled)
    else:
        raise ConfigError("config names no data: set data.root (images/ + masks/) or data.datalist, or pass --data")
    if d.limit_cases:
        cases = cases[: d.limit_cases]
    if not cases:
        raise DatasetError("empty dataset")
    missing = [c for c in cases if c.mask is None]
    if missing and not unlabeled:
        names = ", ".join(c.image.name for c in missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        raise DatasetError(f"{d.datalist.name if d.datalist else d.root}: image without a mask: {names} — give it a "
                           "mask, or set train.unlabeled.enabled: true to train on it with pseudo-labels")
    if unlabeled and len(missing) == len(cases):
        raise DatasetError("train.unlabeled: every image lacks a mask; semi-supervised training needs some labeled ones")
    return cases


def labeled(cases: list[Case]) -> list[Case]:
    return [c for c in cases if c.mask is not None]


def unlabeled_cases(cases: list[Case]) -> list[Case]:
    return [c for c in cases if c.mask is None]


def split_file_for(cfg: ExperimentConfig, out_dir: Path) -> Path:
    return Path(cfg.data.split_file or out_dir / "splits.json")


def split_cases(cfg: ExperimentConfig, cases: list[Case], out_dir: Path) -> tuple[list[Case], list[Case]]:
    """(train, val) among the labeled cases (the folds hold only those; unlabeled images are training-only)."""
    cases = labeled(cases)
    split_file = split_file_for(cfg, out_dir)
    folds = load_or_make_splits(Path(split_file), cases, cfg.data.folds, cfg.data.split_seed)
    train_ids, val_ids = train_val_ids(folds, cfg.data.fold)
    if cfg.data.train_fraction < 1.0:  # low-data experiments: a seeded subset of the training fold, same val
        keep = max(1, round(cfg.data.train_fraction * len(train_ids)))
        train_ids = sorted(random.Random(cfg.data.split_seed).sample(sorted(train_ids), keep))
    by_id = {c.id: c for c in cases}
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]


def preprocessing_record(cfg: ExperimentConfig, fingerprint: dict | None = None) -> dict:
    """``preprocessing.json``: how a scan becomes network input (the config's data section says the same; this is
    the human-readable summary) and the training data's fingerprint summary (what later scans are checked against)."""
    d = cfg.data
    record = {
        "channels": d.channels, "intensity": str(d.intensity), "ct_window": list(d.ct_window),
        "intensity_range": list(d.intensity_range) if d.intensity_range else None,
        "resample": str(d.resample), "target_spacing": list(d.target_spacing) if d.target_spacing else None,
        "target_size": d.target_size, "slice_axis": d.slice_axis,
        "context_slices": d.context_slices, "input_channels": d.input_channels, "num_classes": d.num_classes,
        "array_convention": "(y, x[, C]) or (z, y, x); network input (B, C, H, W), 2.5D channels slice-major",
    }
    if fingerprint is not None:
        record["training_fingerprint"] = fingerprint
    return record


def model_card(cfg: ExperimentConfig, n_train: int, n_val: int, val_metrics: dict[str, float], extra: str = "") -> str:
    labels = "\n".join(f"| {i} | {n} |" for i, n in sorted(cfg.data.labels.items()))
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in val_metrics.items())
    data = cfg.data.root.name if cfg.data.root else (cfg.data.datalist.name if cfg.data.datalist else "?")
    scale = {"none": "native grid", "spacing": f"resampled to {tuple(cfg.data.target_spacing or ())} mm",
             "size": f"each image resized to a {cfg.data.target_size} px geometric-mean side"}[str(cfg.data.resample)]
    return f"""# {cfg.name}

**{RESEARCH_NOTICE}**

{cfg.description or "Segmentation model trained with medseg."}

## Model
- Architecture: {cfg.model.arch} with encoder `{cfg.model.encoder}` (initialised from `{cfg.model.pretrained}`)
- Input: {cfg.data.input_channels} channel(s) ({cfg.data.channels} per slice, 2.5D context ±{cfg.data.context_slices}), intensity `{cfg.data.intensity}`, {scale}

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
    max_time: timedelta | None = None, reload_dataloaders: bool = False,
) -> L.Trainer:
    """``reload_dataloaders``: re-read the loaders' lengths every epoch (a budgeted run re-plans them)."""
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
        reload_dataloaders_every_n_epochs=1 if reload_dataloaders else 0,
        logger=build_loggers(cfg, out_dir),
        callbacks=[*build_callbacks(cfg, out_dir, progress), *(extra_callbacks or [])],
        plugins=[AtomicCheckpointIO()],  # temp file + rename in the checkpoint folder, whatever TMPDIR is
        enable_progress_bar=progress,
        enable_model_summary=False,
    )


def build_train_augmentation(cfg: ExperimentConfig, preset: str | None = None, seed_offset: int = 0):
    """The 2D training augmentation from ``cfg.augment`` (``preset``: another preset, e.g. the strong one of
    semi-supervised training), with the shape-bias random convolution when configured."""
    a = cfg.augment
    return build_augmentation_2d(
        preset or a.preset, cfg.data.patch_size, cfg.data.input_channels, padding_mode=a.padding_mode,
        rgb=cfg.data.channels == 3 and cfg.data.context_slices == 0,  # no hue shifts on stacks of gray slices
        seed=cfg.train.seed + seed_offset,  # albumentations keeps its own RNG, which seed_everything does not reach
        random_convolution=a.random_convolution, random_convolution_kernels=a.random_convolution_kernels,
    )


def build_dataloaders(cfg: ExperimentConfig, train_cases: list[Case], val_cases: list[Case], progress: bool = False,
                      cache_dir: Path | None = None, unlabeled: list[Case] | None = None,
                      wrap_train_cache: Callable | None = None):
    """(train loader of random augmented patches, val loader of whole cases on the model grid). ``unlabeled``: images
    without masks for semi-supervised training; the train dataset's ``pseudo`` then holds them (`PseudoLabelledCases`).
    ``wrap_train_cache``: turns the training cases' cache into the one patches are drawn from (`medseg distill` adds
    teacher targets)."""
    train_cache = build_case_cache(train_cases, cfg, progress=progress, cache_dir=cache_dir, check_left_out=False)
    val_cache = build_case_cache(val_cases, cfg, progress=progress, cache_dir=cache_dir, check_left_out=False)
    pseudo = None
    problems = [*train_cache.problems, *val_cache.problems]
    if unlabeled:
        from medseg.engine.pseudo_labels import PseudoLabelledCases

        unlabeled_cache = build_case_cache(unlabeled, cfg, progress=progress, cache_dir=cache_dir, check_left_out=False)
        problems += unlabeled_cache.problems
        u = cfg.train.unlabeled
        pseudo = PseudoLabelledCases(unlabeled_cache, build_train_augmentation(cfg, u.strong_preset, seed_offset=7_919),
                                     u.share, weight_map=cfg.loss.weight_map)
    check_left_out_share(problems, len(train_cases) + len(val_cases) + len(unlabeled or []))
    if wrap_train_cache is not None:
        train_cache = wrap_train_cache(train_cache)
    augment = build_train_augmentation(cfg)
    train_ds = PatchDataset(train_cache, cfg, augment, cfg.train.samples_per_epoch, pseudo=pseudo)
    bs = cfg.train.batch_size
    workers = cfg.data.num_workers
    train_dl = torch.utils.data.DataLoader(
        train_ds, batch_size=bs, shuffle=True, num_workers=workers,
        drop_last=len(train_ds) > bs,  # a last batch of 1 breaks BatchNorm
        # Persistent workers would keep the pseudo-labels of the round they started in: each epoch's workers must
        # start from the dataset as the round left it.
        persistent_workers=workers > 0 and pseudo is None,
        pin_memory=torch.cuda.is_available() and cfg.train.accelerator != "cpu",
    )
    val_ds = WholeCaseDataset(val_cache, cfg, max_cases=cfg.train.val_max_cases, seed=cfg.data.split_seed)
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=1, collate_fn=collate_single)
    return train_dl, val_dl


def _load_checkpoint_state(path: str) -> dict[str, torch.Tensor]:
    # weights_only=True: plain tensors and containers only; our checkpoints hold nothing else.
    return _strip_prefix(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])


@dataclass
class _RunSetup:
    cfg: ExperimentConfig
    train_cases: list[Case]
    val_cases: list[Case]
    fingerprint: dict | None
    plan_rows: list[tuple[str, str, str]]
    left_out: list[str] = field(default_factory=list)
    unlabeled: list[Case] = field(default_factory=list)  # images without masks (train.unlabeled)


def _prepare_run(cfg: ExperimentConfig, out_dir: Path, resuming: bool, device: DeviceProfile | None) -> _RunSetup:
    """Cases, split, plan (applied to the keys the user did not set); writes config.yaml and run_info.json."""
    cases = load_cases(cfg)
    train_cases, val_cases = split_cases(cfg, cases, out_dir)
    fingerprint, rows = None, []
    if cfg.plan:
        planned = plan_run(cfg, cases, out_dir, device, n_train=len(train_cases))
        cfg = planned.cfg
        fingerprint = planned.fingerprint.summary()
        rows = [r for r in planned.plan.rows() if r[0] in planned.applied]
        for key, value, reason in rows:
            log.info("plan: %s = %s  (%s)", key, value, reason)
    (out_dir / "config.yaml").write_text(config_to_yaml(cfg))
    write_run_info(cfg, out_dir, resuming)
    unlabeled = unlabeled_cases(cases)
    if cfg.train.unlabeled.enabled:
        _check_unlabeled(cfg, unlabeled)
    return _RunSetup(cfg, train_cases, val_cases, fingerprint, rows, unlabeled=unlabeled)


def _check_unlabeled(cfg: ExperimentConfig, unlabeled: list[Case]) -> None:
    if cfg.model.cache_encoder_features:
        raise ConfigError("train.unlabeled and model.cache_encoder_features exclude each other: cached features are "
                          "computed once for the labeled patches only")
    if not unlabeled:
        log.warning("train.unlabeled is on but every image has a mask: training on the labeled images only")
    else:
        log.info("semi-supervised: %d images without masks get pseudo-labels", len(unlabeled))


def _budget_guard(cfg: ExperimentConfig, train_dl, val_dl, n_val: int, start: float, clock,
                  device: DeviceProfile | None) -> BudgetGuard | None:
    minutes = cfg.train.budget_minutes
    if not minutes:
        return None
    t = cfg.train
    per_step = t.batch_size * t.accumulate_grad_batches
    spe = max(1, len(train_dl.dataset) // per_step)
    device = device or detect_device(t.accelerator, cfg.model.encoder)
    estimate = per_step * cfg.data.patch_size[0] * cfg.data.patch_size[1] / device.train_pixels_per_s
    epoch_steps = initial_epoch_steps(t.epochs, spe, minutes * 60, estimate)
    return BudgetGuard(deadline=start + minutes * 60, clock=clock, epoch_steps=epoch_steps, batch=per_step,
                       train_dataset=train_dl.dataset, val_dataset=val_dl.dataset, n_val_total=n_val,
                       budget_seconds=minutes * 60)


def train(
    cfg: ExperimentConfig,
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    extra_callbacks: list[L.Callback] | None = None,
    max_time: timedelta | None = None,
    *,
    clock=monotonic,
    device: DeviceProfile | None = None,
    wrap_train_cache: Callable | None = None,
) -> TrainResult:
    """Train one model as configured; write ``out_dir/{bundle/, progress.png, metrics.csv, splits.json,
    fingerprint.json, plan.yaml, run_info.json, diagnosis.txt, checkpoints/}``.

    With ``cfg.plan`` the dataset is fingerprinted and every data-dependent key the config does not set is planned
    (`medseg.planning`). With ``train.budget_minutes`` the whole run — planning, caching, training, validation and
    the final evaluation — fits that wall-clock budget, and the LR schedule ends annealed (`medseg.engine.budget`;
    ``clock`` is the time source). ``max_time`` only stops the fit after that long (Lightning's hard stop).
    ``wrap_train_cache``: see `build_dataloaders` (`medseg distill`).

    The bundle's members: ``swa`` (with ``train.swa``), ``snapshot_<i>`` for each completed SGDR cycle (with
    ``train.snapshots``), otherwise ``model`` (the best checkpoint by val Dice). Their ensemble is then scored on
    every validation case through the Predictor (on the cases' own grids): that Dice is what the model card, the
    result and run_info.json report. ``resume`` continues from ``checkpoints/last.ckpt``.
    """
    start, wall_start = clock(), time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    last, resuming = _fresh_or_resumed(out_dir, resume)
    setup = _prepare_run(cfg, out_dir, resuming, device)
    cfg = setup.cfg
    log.info("training on %d cases, validating on %d", len(setup.train_cases), len(setup.val_cases))
    train_dl, val_dl = build_dataloaders(cfg, setup.train_cases, setup.val_cases, progress, cache_dir=out_dir / "cache",
                                         unlabeled=setup.unlabeled if cfg.train.unlabeled.enabled else None,
                                         wrap_train_cache=wrap_train_cache)
    setup.left_out = [*train_dl.dataset.cache.problems, *val_dl.dataset.cache.problems]
    rounds = _pseudo_label_rounds(cfg, train_dl, setup, out_dir, clock)
    module = SegModule(cfg)
    if cfg.model.cache_encoder_features:  # the decoder trains on a frozen encoder's features, computed once per case
        train_dl = attach_feature_cache(module, train_dl, cfg)
    guard = _budget_guard(cfg, train_dl, val_dl, len(setup.val_cases), start, clock, device)
    if guard is not None and rounds is not None:
        guard.reserve = rounds.reserve_seconds
    module.planned_steps = guard.state.epoch_steps if guard else None
    # The RNG state (global, the patch sampler's and the augmentation's own) goes into every checkpoint: --resume
    # then draws the same patches as an uninterrupted run would.
    callbacks = [ResumableRandomState(train_dl.dataset, cfg.train.seed), *([guard] if guard else []),
                 *([rounds] if rounds else []), *(extra_callbacks or [])]
    if guard is not None and max_time is None:  # the guard plans to finish in time; this is the backstop
        max_time = timedelta(seconds=max(1.0, guard.deadline - clock()))
    trainer = build_trainer(cfg, out_dir, progress, callbacks, max_time, reload_dataloaders=guard is not None)
    _fit(trainer, module, train_dl, val_dl, last if resuming else None)
    readable = set(val_dl.dataset.cache.ids)
    setup.val_cases = [c for c in setup.val_cases if c.id in readable]
    return _finish(cfg, out_dir, setup, trainer, module, wall_start)


def _pseudo_label_rounds(cfg: ExperimentConfig, train_dl, setup: _RunSetup, out_dir: Path, clock):
    """The callback that pseudo-labels the unlabeled images each round (``train.unlabeled``), or None."""
    if train_dl.dataset.pseudo is None:
        return None
    from medseg.engine.pseudo_labels import PseudoLabelRounds

    setup.left_out += train_dl.dataset.pseudo.cache.problems
    return PseudoLabelRounds(cfg, train_dl.dataset.pseudo, out_dir, clock=clock)


def _fresh_or_resumed(out_dir: Path, resume: bool) -> tuple[Path, bool]:
    """(``checkpoints/last.ckpt``, whether the run resumes from it). A fresh run must not inherit members or
    checkpoints of an earlier run in the same folder: those are removed."""
    last = out_dir / "checkpoints" / "last.ckpt"
    resuming = resume and last.exists()
    if not resuming:
        shutil.rmtree(out_dir / "snapshots", ignore_errors=True)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return last, resuming


def _fit(trainer: L.Trainer, module: SegModule, train_dl, val_dl, resume_from: Path | None) -> None:
    # Our checkpoints hold only tensors, numbers, strings and containers (model, optimiser, scheduler,
    # loop and callback state), so resume loads them with weights_only=True: nothing is unpickled.
    if resume_from is not None:  # a tampered or damaged last.ckpt: a one-line error now, not a traceback from fit
        load_checkpoint(resume_from)
    trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume_from) if resume_from else None,
                weights_only=True if resume_from else None)


def _collect_members(cfg: ExperimentConfig, out_dir: Path, trainer: L.Trainer, module: SegModule
                     ) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    ckpt = trainer.checkpoint_callback
    best_path = ckpt.best_model_path if ckpt else ""
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
        notes.append(f"- Stochastic weight averaging from epoch {cfg.train.swa_start_epoch}")
    if not members:
        if cfg.train.snapshots and not cfg.train.swa:
            log.warning("no SGDR cycle completed (run stopped early?): the bundle holds the best checkpoint instead")
        members["model"] = _load_checkpoint_state(best_path) if best_path else module.model.state_dict()
    return members, notes


def _finish(cfg: ExperimentConfig, out_dir: Path, setup: _RunSetup, trainer: L.Trainer, module: SegModule,
            wall_start: float) -> TrainResult:
    """Members -> measured Dice of their ensemble on every validation case -> bundle, diagnosis, run_info."""
    ckpt = trainer.checkpoint_callback
    best_score = ckpt.best_model_score if ckpt else None
    best_dice = float(best_score) if best_score is not None else float("nan")
    members, notes = _collect_members(cfg, out_dir, trainer, module)
    curves = next((c for c in trainer.callbacks if isinstance(c, LearningCurves)), None)
    findings = diagnose_curves(curves.rows) if curves is not None else []
    bundle = out_dir / "bundle"
    shipped = float("nan")
    if trainer.is_global_zero:
        (out_dir / "diagnosis.txt").write_text("\n".join(f"[{f.code}] {f.message}" for f in findings) + "\n")
        shipped, per_label, objects = _score_members(cfg, members, setup.val_cases)
        metrics = {f"val Dice {name} (shipped model, {len(setup.val_cases)} cases)": v for name, v in per_label.items()}
        metrics["val Dice (foreground mean, shipped model)"] = shipped
        for key, value in objects.items():  # cases with instance maps (data.instances_dir)
            metrics[f"val {OBJECT_METRIC_NAMES[key]} (shipped model, connected components vs instance maps)"] = value
        if math.isfinite(best_dice):
            metrics["val Dice (best checkpoint during training, validation subset, model grid)"] = best_dice
        plan = ("\n## Plan\n" + "\n".join(f"- `{k}` = {v}: {why}" for k, v, why in setup.plan_rows) + "\n"
                if setup.plan_rows else "")
        extra = (("\n## Ensemble\n" + "\n".join(notes) + f"\n- Members: {', '.join(members)}\n") if notes else "") + plan
        pseudo_rounds = _pseudo_label_stats(trainer)
        if pseudo_rounds:
            extra += (f"\n## Semi-supervised\n- {len(setup.unlabeled)} images without masks, pseudo-labelled in "
                      f"{len(pseudo_rounds)} round(s); pixels kept (confidence ≥ {cfg.train.unlabeled.confidence}, "
                      f"{cfg.train.unlabeled.measure}): "
                      + ", ".join(f"{100 * r['kept_share']:.0f}%" for r in pseudo_rounds) + "\n")
        if setup.left_out:
            extra += "\n## Cases left out (unreadable)\n" + "\n".join(f"- {p}" for p in setup.left_out) + "\n"
        save_bundle(
            bundle, cfg, members, preprocessing_record(cfg, setup.fingerprint),
            model_card(cfg, len(setup.train_cases), len(setup.val_cases), metrics, extra),
            extra_files={"splits.json": split_file_for(cfg, out_dir).read_text()},
        )
        _record_result(out_dir, shipped, best_dice, trainer, time.time() - wall_start, setup.left_out,
                       len(setup.val_cases), objects)
    return TrainResult(out_dir, bundle, best_dice, trainer.current_epoch, time.time() - wall_start, list(members),
                       shipped, trainer.global_step, findings, setup.left_out)


def _score_members(cfg: ExperimentConfig, members: dict[str, dict[str, torch.Tensor]], val_cases: list[Case]
                   ) -> tuple[float, dict[str, float], dict[str, float]]:
    """Mean foreground Dice (and per label) of the members' ensemble on every validation case, predicted as a
    user would (Predictor: resampling, tiling, back to the source grid), and the mean AJI / PQ / object F1 over the
    cases with an instance map (empty without)."""
    if not val_cases:
        return float("nan"), {}, {}
    from medseg.engine.evaluate import evaluate_cases
    from medseg.inference.predictor import Predictor, build_member

    predictor = Predictor([build_member(cfg, state) for state in members.values()], cfg,
                          device="cuda" if cfg.train.accelerator != "cpu" and torch.cuda.is_available() else "cpu")
    result = evaluate_cases(predictor, val_cases, cfg, hd95=False)
    return (result.mean_dice, {name: mean for name, (mean, _) in result.summary.items()},
            {key: mean for key, (mean, _) in result.object_summary.items()})


def _record_result(out_dir: Path, shipped: float, best: float, trainer: L.Trainer, seconds: float,
                   left_out: list[str], n_val: int, objects: dict[str, float]) -> None:
    path = out_dir / "run_info.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info["result"] = {"val_dice_shipped": shipped, "val_cases": n_val, "val_dice_best_checkpoint": best,
                      **{f"val_{key}_shipped": v for key, v in objects.items()},
                      "epochs": trainer.current_epoch,
                      "global_step": trainer.global_step, "seconds": round(seconds, 1), "left_out": left_out}
    guard = next((c for c in trainer.callbacks if isinstance(c, BudgetGuard)), None)
    if guard is not None:
        info["budget"] = guard.state_dict()
    pseudo_rounds = _pseudo_label_stats(trainer)
    if pseudo_rounds:
        info["pseudo_labels"] = pseudo_rounds
    path.write_text(json.dumps(info, indent=1, default=str))


def _pseudo_label_stats(trainer: L.Trainer) -> list[dict]:
    """Per pseudo-label round: epoch, teacher or not, cases, share of pixels kept, seconds (none without rounds)."""
    from medseg.engine.pseudo_labels import PseudoLabelRounds

    rounds = next((c for c in trainer.callbacks if isinstance(c, PseudoLabelRounds)), None)
    return list(rounds.stats) if rounds is not None else []
