"""`medseg doctor`: check a setup before a long run, and say what is wrong in plain words.

1. **Data**: pairs found; raw mask values against ``data.label_map``; class balance after mapping; empty
   masks; intensity ranges and constant images; sizes and spacings, with outliers.
2. **Initial loss**: cross-entropy of the untrained model against its value at chance, ``ln C``.
3. **Overfit a tiny subset**: a few fixed batches, no augmentation or weight decay, the configured optimiser
   and learning rate (constant), trained by the real ``SegModule.training_step`` in a Lightning Trainer with
   ``overfit_batches``: a sound setup memorises them (Dice near 1). Divergence means the learning rate is too
   high; unchanged weights mean everything is frozen (or the rate is 0).
4. **LR range test**: Lightning's LR finder (``Tuner.lr_find``) — loss against an exponentially growing
   rate, a plot ``OUT/lr_find.png`` and a suggested rate compared with ``train.lr``.

Every finding is a `Check` with a stable ``code`` (e.g. ``label_map_mismatch``, ``lr_too_high``, ``frozen``)
and a severity; errors stop the checks that depend on them.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from medseg.config import ExperimentConfig
from medseg.data import Case
from medseg.errors import MedsegError
from medseg.metrics import mean_foreground_dice, per_label_metrics
from medseg.planning import Fingerprint

log = logging.getLogger("medseg")

Severity = Literal["ok", "info", "warning", "error"]


@dataclass(frozen=True)
class Check:
    code: str
    severity: Severity
    message: str


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    suggested_lr: float | None = None
    lr_plot: Path | None = None

    def add(self, code: str, severity: Severity, message: str) -> None:
        self.checks.append(Check(code, severity, message))

    @property
    def codes(self) -> set[str]:
        return {c.code for c in self.checks}

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.severity in ("warning", "error")]

    @property
    def has_errors(self) -> bool:
        return any(c.severity == "error" for c in self.checks)


# ------------------------------------------------------------------------------------------------ data
def _names(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_data(cfg: ExperimentConfig, fp: Fingerprint, report: DoctorReport, label_map_planned: bool = False) -> None:
    """Rules over the dataset fingerprint (`medseg.planning.fingerprint`, the planner reads the same one): labels,
    balance, intensities and sizes. ``label_map_planned``: the label map was inferred from the masks."""
    _check_cases(cfg, fp, report)
    unmapped = _check_label_map(cfg, fp, report, label_map_planned)
    _check_balance(cfg, fp, report, unmapped)
    _check_intensities(fp, report, cfg.data.intensity)
    _check_sizes(cfg, fp, report)


def _check_cases(cfg: ExperimentConfig, fp: Fingerprint, report: DoctorReport) -> None:
    """How many cases were found and checked; which cannot be read or have masks of the wrong shape."""
    d = cfg.data
    root = d.root or d.datalist
    report.add("data_found", "ok", f"{fp.n_cases} image/mask pairs found in {root}"
               + (f"; checking {len(fp.cases)} of them" if len(fp.cases) < fp.n_cases else ""))
    shape = [p for p in fp.problems if "mask shape" in p]
    unreadable = [p for p in fp.problems if "mask shape" not in p]
    if unreadable:
        report.add("unreadable", "error", f"{len(unreadable)} case(s) cannot be read: {_names(unreadable, 2)}")
    if shape:
        report.add("mask_shape_mismatch", "error", f"{len(shape)} mask(s) differ in shape from their image: {_names(shape)}")


def _check_label_map(cfg: ExperimentConfig, fp: Fingerprint, report: DoctorReport, label_map_planned: bool) -> dict[int, list[str]]:
    """Mask values the label map does not cover (an error naming them and a map that would); returns them."""
    d = cfg.data
    labelled = [c for c in fp.cases if c.has_mask]
    unmapped: dict[int, list[str]] = {}
    for c in labelled:
        for v in c.mask_values:
            if v not in d.label_map:
                unmapped.setdefault(v, []).append(c.id)
    if unmapped:
        raw = sorted(unmapped)
        cases_hit = sorted({i for ids in unmapped.values() for i in ids})
        hint = "{" + ", ".join(f"{v}: {i}" for i, v in enumerate(fp.mask_values())) + "}"
        report.add("label_map_mismatch", "error",
                   f"mask values {raw[:10]} in {len(cases_hit)} of {len(labelled)} masks are not in data.label_map "
                   f"{dict(sorted(d.label_map.items()))} (e.g. {_names(cases_hit, 2)}): set data.label_map to map every "
                   f"raw value to a class, e.g. {hint}")
    elif label_map_planned:
        report.add("label_map_inferred", "info", f"data.label_map {dict(sorted(d.label_map.items()))} inferred from the "
                   "mask values (set it in the config to choose another)")
    return unmapped


def _check_balance(cfg: ExperimentConfig, fp: Fingerprint, report: DoctorReport, unmapped: dict[int, list[str]]) -> None:
    """Class shares over all pixels (absent and rare classes) and masks without foreground."""
    d = cfg.data
    labelled = [c for c in fp.cases if c.has_mask]
    class_pixels: dict[int, int] = {}
    for c in labelled:
        for v, n in c.mask_values.items():
            if v in d.label_map:
                class_pixels[d.label_map[v]] = class_pixels.get(d.label_map[v], 0) + n
    total = sum(class_pixels.values())
    if total:
        shares = {k: class_pixels.get(k, 0) / total for k in sorted(d.labels)}
        report.add("class_balance", "info", "class balance (pixels): " + ", ".join(f"{d.labels[k]} {100 * s:.2f}%" for k, s in shares.items()))
        absent = [d.labels[k] for k, s in shares.items() if s == 0 and k != 0]
        if absent and not unmapped:
            report.add("class_absent", "error", f"class(es) {absent} never occur in the masks after label mapping: "
                       "check data.label_map and data.labels")
        rare = [f"{d.labels[k]} ({100 * s:.2f}%)" for k, s in shares.items() if 0 < s < 0.01 and k != 0]
        if rare:
            report.add("class_imbalance", "warning", f"rare class(es) {rare}: keep a Dice term in the loss (dice_ce) "
                       "or class weights; the plan centres patches on foreground (data.foreground_share)")
    empty = [c.id for c in labelled if not any(d.label_map.get(v, 0) for v in c.mask_values)]
    if empty:
        share = len(empty) / max(1, len(labelled))
        report.add("empty_masks", "warning" if share > 0.2 else "info",
                   f"{len(empty)} mask(s) have no foreground ({_names(empty)}): fine if intended (negatives), "
                   "otherwise a wrong label map or an export error")


def _check_intensities(fp: Fingerprint, report: DoctorReport, intensity: str) -> None:
    """Constant images, the intensity range and scheme, maxima that suggest mixed bit depths or modalities."""
    stats = [(c, c.intensity) for c in fp.cases if c.intensity is not None]
    constant = [c.id for c, i in stats if i.max <= i.min]
    if constant:
        report.add("constant_images", "warning", f"{len(constant)} image(s) are constant (one value): {_names(constant)}")
    if stats:
        lows, highs = np.array([i.min for _, i in stats]), np.array([i.max for _, i in stats])
        dtypes = sorted({c.dtype for c in fp.cases})
        report.add("intensity", "info", f"intensities {lows.min():g}..{highs.max():g} (dtypes {dtypes}, channels "
                   f"{sorted(fp.channels)}, modality {fp.modality or 'unknown'}); normalised with '{intensity}' to [0, 1]")
        med = float(np.median(highs))
        if med > 0 and (highs.max() > 20 * med or highs.min() < med / 20):
            report.add("intensity_outliers", "warning", f"image maxima range from {highs.min():g} to {highs.max():g} "
                       f"(median {med:g}): mixed bit depths or modalities?")


def _check_sizes(cfg: ExperimentConfig, fp: Fingerprint, report: DoctorReport) -> None:
    """The size range, cases far from the median size, and mixed spacings without resampling."""
    d = cfg.data
    areas = np.array([float(np.prod(c.shape)) for c in fp.cases])
    med_area = float(np.median(areas))
    summary = fp.summary()
    spacings = {tuple(round(s, 3) for s in c.spacing) for c in fp.cases}
    report.add("sizes", "info", f"sizes from {tuple(summary['shape_min'])} to {tuple(summary['shape_max'])} (array order), "
               f"median {tuple(summary['shape_median'])}; patch {tuple(d.patch_size)}"
               + ("" if fp.spacing_stated else "; no physical spacing stated"))
    outliers = [f"{c.id} {c.shape}" for c, a in zip(fp.cases, areas, strict=True) if a > 4 * med_area or a < med_area / 4]
    if outliers and d.resample == "none":
        report.add("size_outliers", "warning", f"{len(outliers)} case(s) far from the median size: {_names(outliers)}; "
                   "leave data.resample to the plan (it resizes images of varying size)")
    if len(spacings) > 1 and fp.spacing_stated and d.resample == "none":
        report.add("mixed_spacing", "warning" if fp.ndim == 3 else "info",
                   f"{len(spacings)} different spacings and data.resample: none: the network sees structures at "
                   "different scales (leave data.resample to the plan)")


# ------------------------------------------------------------------------------------------- training
def _fixed_batches(cfg: ExperimentConfig, cases: list[Case], n_batches: int) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` batches of patches without augmentation, drawn once and reused every step."""
    from medseg.data.dataset import PatchDataset, build_case_cache
    from medseg.transforms.augment import build_augmentation_2d

    bs = cfg.train.batch_size
    cache = build_case_cache(cases, cfg)
    augment = build_augmentation_2d("none", cfg.data.patch_size, cfg.data.input_channels,
                                    padding_mode=cfg.augment.padding_mode, seed=cfg.train.seed)
    ds = PatchDataset(cache, cfg, augment, bs * n_batches)
    g = torch.Generator().manual_seed(cfg.train.seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, generator=g)
    return list(dl)


def _main_logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, list | tuple) else out


def check_initial_loss(cfg: ExperimentConfig, model: torch.nn.Module, batches, report: DoctorReport) -> None:
    """Cross-entropy at initialisation against ln C: far above means over-confident random logits."""
    from medseg.losses import build_loss

    model.train()
    with torch.no_grad():
        out = model(batches[0]["image"])
        logits = _main_logits(out)
        ce = float(F.cross_entropy(logits, batches[0]["label"].long()))
        # The training loss as SegModule builds it (over every deep-supervision head, with the weight map).
        configured = float(build_loss(cfg.loss, cfg.model)(out, batches[0]["label"].long(), batches[0].get("weight")))
    chance = math.log(cfg.data.num_classes)
    if not math.isfinite(ce) or not math.isfinite(configured):
        report.add("nan_loss", "error", f"the loss of the untrained model is not finite (cross-entropy {ce}, {cfg.loss.name} {configured}): "
                   "check the inputs for NaN/inf and the loss settings")
    elif ce > 2 * chance + 0.5:
        report.add("initial_loss_high", "warning", f"initial cross-entropy {ce:.3f} is far above its value at chance ln {cfg.data.num_classes} = {chance:.3f}: "
                   "the untrained model is confidently wrong — check the output layer's initialisation or pretrained head")
    else:
        report.add("initial_loss_ok", "ok", f"initial cross-entropy {ce:.3f} ≈ ln {cfg.data.num_classes} = {chance:.3f} at chance "
                   f"({cfg.loss.name}: {configured:.3f})")


def _memorise_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The run's config for memorising fixed batches: no regularisation (weight decay, mixup/cutmix) and the
    configured rate from the first step (constant schedule, no warmup), so divergence means the rate."""
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"weight_decay": 0.0, "schedule": "constant", "warmup_epochs": 0.0,
                                              "schedule_params": {}, "snapshots": False, "swa": False}),
        "augment": cfg.augment.model_copy(update={"mixup": 0.0, "cutmix": 0.0}),
    })


class _StepLosses(L.Callback):
    """The training loss of every step; stops the run at the first non-finite one."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = float(outputs["loss"])
        self.losses.append(loss if math.isfinite(loss) else float("nan"))
        if not math.isfinite(loss):
            trainer.should_stop = True


def check_overfit(cfg: ExperimentConfig, model: torch.nn.Module, batches, report: DoctorReport, steps: int,
                  target_dice: float = 0.9, out_dir: Path | None = None) -> None:
    """Train on the fixed batches only, with the real ``SegModule.training_step`` and its optimiser through a
    Lightning Trainer (``overfit_batches``): a sound setup memorises them."""
    from medseg.engine.module import SegModule

    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    if not trainable:
        report.add("frozen", "error", f"no parameter is trainable (all {n_params:,} are frozen): nothing can learn — "
                   "unfreeze the model (model.transfer: full, or fewer model.freeze_stages)")
        return
    module = SegModule(_memorise_config(cfg), model=model)
    model.train()  # Lightning keeps the modes it finds (frozen BatchNorm stays in eval: SegmentationNet.train)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    recorder = _StepLosses()
    trainer = L.Trainer(
        default_root_dir=out_dir, max_steps=steps, overfit_batches=len(batches), accelerator=cfg.train.accelerator,
        devices=1, precision=cfg.train.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder],
    )
    # batch_size=None: the loader hands out the fixed batches as they are, in order, every epoch.
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    losses = recorder.losses
    if not losses:
        return  # steps=0: nothing was trained, nothing to judge
    first, last = losses[0], losses[-1]
    moved = max(float((p.detach().cpu() - before[n].cpu()).abs().max()) for n, p in model.named_parameters() if n in before)
    if not math.isfinite(last) or last > 1.5 * first + 1e-6 or (len(losses) > 4 and max(losses) > 10 * first):
        report.add("lr_too_high", "error", f"training on {len(batches)} fixed batch(es) diverged at train.lr={cfg.train.lr:g} "
                   f"(loss {first:.3f} → {last:.3g} after {len(losses)} steps): lower the learning rate (see the LR range test), "
                   "add warmup or gradient clipping")
        return
    if moved == 0.0:
        report.add("frozen", "error", f"no weight changed in {len(losses)} optimiser steps: the learning rate is 0 "
                   f"(train.lr={cfg.train.lr:g}, model.encoder_lr_mult={cfg.model.encoder_lr_mult:g}) or every trainable part is frozen")
        return
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        dice = np.mean([
            mean_foreground_dice(per_label_metrics(model(b["image"].to(device)).argmax(1)[i].cpu(), b["label"][i], cfg.data.num_classes, hd95=False))
            for b in batches for i in range(len(b["label"]))
        ])
    share = sum(p.numel() for p in trainable) / n_params
    frozen_note = f" ({100 * (1 - share):.0f}% of the weights frozen)" if share < 1 else ""
    if dice >= target_dice:
        report.add("overfit_ok", "ok", f"memorised {len(batches)} fixed batch(es) in {len(losses)} steps: Dice {dice:.3f}, loss {first:.3f} → {last:.3f}{frozen_note}")
    else:
        report.add("cannot_overfit", "warning", f"after {len(losses)} steps on {len(batches)} fixed batch(es) Dice is only {dice:.3f} "
                   f"(loss {first:.3f} → {last:.3f}){frozen_note}: a setup that cannot memorise a few patches will not learn the dataset — "
                   "check labels against images, the loss, the learning rate, frozen layers; or run more doctor steps")


def lr_range_test(cfg: ExperimentConfig, model: torch.nn.Module, cases: list[Case], out_dir: Path, report: DoctorReport,
                  steps: int) -> None:
    """Lightning's LR finder over the configured training patches; plot and suggestion."""
    from lightning.pytorch.tuner import Tuner

    from medseg.engine.module import SegModule
    from medseg.engine.train import build_dataloaders

    run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"samples_per_epoch": cfg.train.batch_size * (steps + 1)})})
    train_dl, _ = build_dataloaders(run_cfg, cases, cases[:1])
    module = SegModule(run_cfg, model=model)
    model.train()  # the overfit check left it in eval mode; Lightning keeps the modes it finds
    trainer = L.Trainer(default_root_dir=out_dir, max_epochs=1, accelerator=cfg.train.accelerator, devices=1,
                        precision=cfg.train.precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    try:
        finder = Tuner(trainer).lr_find(module, train_dataloaders=train_dl, min_lr=1e-7, max_lr=10.0,
                                        num_training=steps, early_stop_threshold=4.0, update_attr=False)
    except Exception as e:  # the finder fails on degenerate curves; the other checks still stand
        report.add("lr_find_failed", "warning", f"LR range test failed: {e}")
        return
    if finder is None:
        return
    lrs, losses = np.asarray(finder.results["lr"], float), np.asarray(finder.results["loss"], float)
    suggestion, blowup = suggest_lr(lrs, losses), divergence_lr(lrs, losses)
    path = Path(out_dir) / "lr_find.png"
    plot_lr_range(lrs, losses, suggestion, cfg.train.lr, path)
    report.lr_plot = path
    report.suggested_lr = suggestion
    lr = cfg.train.lr
    if blowup is not None and lr >= blowup / 3:
        report.add("lr_too_high", "warning", f"train.lr={lr:g} is at or beyond where the loss blew up in the LR range test "
                   f"({blowup:.2g}; plot: {path}): expect divergence; try {suggestion or blowup / 30:.2g}")
    elif suggestion is None:
        report.add("lr_find_failed", "warning", f"LR range test gave no suggestion (curve too short; plot: {path})")
    elif lr < suggestion / 30:
        report.add("lr_low", "info", f"train.lr={lr:g} is far below the LR range test's suggestion {suggestion:.2g} (plot: {path}): training may be slow")
    else:
        report.add("lr_suggestion", "ok", f"LR range test suggests {suggestion:.2g} (loss blew up at {blowup or float('nan'):.2g}); "
                   f"train.lr={lr:g} is in range (plot: {path})")

def divergence_lr(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """The first rate at which the loss is not finite or above 4x its minimum so far (where it blew up)."""
    best = np.inf
    for lr, loss in zip(lrs, losses, strict=True):
        if not np.isfinite(loss) or loss > 4 * best:
            return float(lr)
        best = min(best, loss)
    return None


def suggest_lr(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """Steepest descent of the (smoothed) loss against log LR, looked for only before the divergence:
    on short, noisy curves Lightning's own suggestion can land on the cliff where the loss explodes."""
    div = divergence_lr(lrs, losses)
    n = len(lrs) if div is None else int(np.searchsorted(lrs, div))
    if n < 5:
        return None
    grad = np.gradient(losses[:n], np.log10(lrs[:n]))
    skip = n // 10  # the first points carry the smoothing's warm-up
    return float(lrs[skip + int(np.argmin(grad[skip:]))])


def plot_lr_range(lrs: np.ndarray, losses: np.ndarray, suggestion: float | None, configured: float, path: Path) -> None:
    """Loss against learning rate (log x). Points after divergence (loss above 4x its minimum) are left out,
    or they would squash the useful part of the curve to a flat line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = np.isfinite(losses)
    if keep.any():
        keep &= losses <= 4 * losses[keep].min()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(lrs[keep], losses[keep], "-", color="tab:blue", label="training loss")
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:green", ls="--", label=f"suggested {suggestion:.2g}")
    ax.axvline(configured, color="tab:red", ls=":", label=f"train.lr {configured:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("LR range test")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_doctor(
    cfg: ExperimentConfig,
    out_dir: Path,
    *,
    model: torch.nn.Module | None = None,
    max_cases: int = 200,
    overfit_batches: int = 2,
    overfit_steps: int = 60,
    lr_find: bool = True,
    lr_find_steps: int = 60,
) -> DoctorReport:
    """All checks in order (see module docstring); ``model`` replaces the configured one (e.g. to check a
    model prepared in code). Writes ``OUT/lr_find.png``."""
    from medseg.engine.train import load_cases
    from medseg.models import build_model
    from medseg.planning import plan_run

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = DoctorReport()
    torch.manual_seed(cfg.train.seed)
    try:
        cases = load_cases(cfg)
        if cfg.plan:  # check what training will run: the plan fills what the config leaves open
            planned = plan_run(cfg, cases, out_dir, max_cases=max_cases)
            cfg, fp, inferred = planned.cfg, planned.fingerprint, "data.label_map" in planned.applied
            for key, value, why in planned.plan.rows():
                if key in planned.applied:
                    report.add("plan", "info", f"{key} = {value}: {why}")
        else:
            from medseg.planning import fingerprint_for

            fp, inferred = fingerprint_for(cases, cfg, out_dir, max_cases=max_cases), False
    except MedsegError as e:
        report.add("no_data", "error", str(e))
        return report
    check_data(cfg, fp, report, inferred)
    if report.has_errors:
        return report  # the training checks would only fail on the same problem
    if model is None:
        model = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes)
    initial_state = copy.deepcopy(model.state_dict())
    try:
        batches = _fixed_batches(cfg, [c for c in cases if c.mask is not None][: max(1, overfit_batches * cfg.train.batch_size)], overfit_batches)
    except MedsegError as e:
        report.add("data_pipeline", "error", str(e))
        return report
    check_initial_loss(cfg, model, batches, report)
    if report.has_errors:
        return report
    check_overfit(cfg, model, batches, report, overfit_steps, out_dir=out_dir)
    if lr_find and not {"frozen"} & report.codes:
        model.load_state_dict(initial_state)  # the range test starts from the untrained weights
        lr_range_test(cfg, model, cases[:32], out_dir, report, lr_find_steps)  # patches of a few cases suffice
    return report
