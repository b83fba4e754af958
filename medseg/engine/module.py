"""SegModule: the LightningModule — model, loss, metrics, optimiser and schedule from config; nothing else.

Lightning's Trainer owns the loop, precision, accumulation, clipping, checkpointing and resume.
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch

from medseg.config import AugmentConfig, ExperimentConfig
from medseg.engine.budget import ScheduleClock
from medseg.engine.schedules import build_schedule, params_in_steps, snapshot_steps
from medseg.errors import ConfigError
from medseg.inference.tiling import predict_logits_case
from medseg.losses import build_loss
from medseg.losses.distill import distillation_loss
from medseg.metrics import per_label_metrics
from medseg.models import EncoderFeatureCache, build_model
from medseg.models.transfer import apply_transfer_strategy, param_groups, unfreeze_for_epoch
from medseg.transforms.augment_mix import mix_batch, mixed_loss

log = logging.getLogger("medseg")


class SegModule(L.LightningModule):
    def __init__(self, cfg: ExperimentConfig, model: torch.nn.Module | None = None,
                 planned_steps: list[int] | None = None) -> None:
        """``planned_steps``: optimiser steps per epoch when they differ between epochs (a budgeted run,
        `medseg.engine.budget`); the schedule is laid over their sum. Default: Lightning's estimate."""
        super().__init__()
        self.cfg = cfg
        self.model = model if model is not None else build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes)
        apply_transfer_strategy(self.model, cfg.model)
        self.loss_fn = build_loss(cfg.loss, cfg.model)  # wraps deep-supervision heads
        _check_mixing(cfg.augment)
        # Mixup/cutmix draw from their own generator, so switching them on leaves the sampler's shuffle and the
        # patches as they were; its state travels in the checkpoint (on_save_checkpoint) for exact resume.
        self.mix_generator = torch.Generator().manual_seed(cfg.train.seed)
        # Set by `medseg.engine.cached_features.attach_feature_cache` (model.cache_encoder_features): batches
        # that carry case keys and crop offsets then train the decoder on cached encoder features.
        self.feature_cache: EncoderFeatureCache | None = None
        self._val_rows: list[dict[str, float]] = []
        self._epoch_loss_sum, self._epoch_samples = 0.0, 0
        # Base learning rate as an attribute: Lightning's LR finder (`medseg doctor`) reads and sets `lr`.
        self.lr = cfg.train.lr
        # Global steps that end an SGDR cycle (set in configure_optimizers; read by SnapshotEnsemble).
        self.snapshot_steps: list[int] = []
        self.planned_steps = planned_steps
        # Real steps -> steps of the nominal schedule; a budget re-plan stretches or squeezes the rest of it.
        self.schedule_clock: ScheduleClock | None = None
        self._nominal_snapshots: list[int] = []
        self._compiled = None
        self._compile_failed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every pass in the memory format the model is in (validation, Lightning's SWA BatchNorm pass): mixed
        # formats would make oneDNN reorder each input, and statistics differ from training by rounding.
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _net(self, x: torch.Tensor):
        """The network on a training batch: channels-last and/or compiled when configured (``train.channels_last``,
        ``train.compile``); a compile that fails is reported once and the run goes on eagerly."""
        t = self.cfg.train
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if t.compile and self._compiled is None and not self._compile_failed:
            self._compiled = torch.compile(self.model)
        if self._compiled is not None:
            try:
                return self._compiled(x)
            except Exception as e:  # noqa: BLE001 - no C++ compiler, an unsupported op: eager still trains
                log.warning("train.compile: torch.compile failed (%s: %s); training eagerly", type(e).__name__,
                            str(e).splitlines()[0][:200] if str(e) else "")
                self._compiled, self._compile_failed = None, True
        return self.model(x)

    def setup(self, stage: str) -> None:
        if self.cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------------------------- train
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mix_generator"] = self.mix_generator.get_state()  # a uint8 tensor: weights_only loads it
        if self.schedule_clock is not None:  # a budgeted run's re-plans: resume follows the same schedule
            checkpoint["schedule_clock"] = self.schedule_clock.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "mix_generator" in checkpoint:
            self.mix_generator.set_state(checkpoint["mix_generator"])
        if "schedule_clock" in checkpoint:
            self.schedule_clock = ScheduleClock(1)
            self.schedule_clock.load_state_dict(checkpoint["schedule_clock"])

    def on_train_start(self) -> None:
        # DDP: every rank seeded the same stream; ranks > 0 get their own (as ResumableRandomState does for the
        # augmentation). A resumed DDP run is therefore exact on rank 0 only.
        rank = self.trainer.global_rank
        if rank > 0:
            self.mix_generator.manual_seed(self.cfg.train.seed + 2 * rank + 7919 * self.current_epoch)

    def on_train_epoch_start(self) -> None:
        self._epoch_loss_sum, self._epoch_samples = 0.0, 0
        if self.cfg.model.transfer == "gradual_unfreeze":
            unfreeze_for_epoch(self.model, self.current_epoch, self.cfg.model.unfreeze_at_epochs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """``batch``: ``image (B, C, H, W)``, ``label (B, H, W)``, optional ``weight (B, H, W)`` and
        ``soft (B, K, H, W)`` (a teacher's probabilities: adds ``distill.weight`` × the distillation loss); or, with the
        encoder feature cache attached, ``case``/``offset`` keys instead of the image (see `attach_feature_cache`)."""
        label = batch["label"].long()  # labels travel as uint8 until the loss
        bs = label.shape[0]
        if self.feature_cache is not None and "offset" in batch:
            logits = self.feature_cache(batch["case"].tolist(), batch["offset"].tolist(), tuple(label.shape[-2:]))
            loss = self.loss_fn(logits, label, batch.get("weight"))
        else:
            a = self.cfg.augment
            mixed = mix_batch(batch["image"], label, batch.get("weight"), a.mixup, a.cutmix,
                              mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, generator=self.mix_generator)
            logits = self._net(mixed.image)
            loss = mixed_loss(self.loss_fn, logits, mixed)
            if "soft" in batch:  # `medseg distill`: the teacher's probabilities, augmented with the patch
                d = self.cfg.distill
                distill = distillation_loss(logits, batch["soft"], d.loss, d.temperature)
                self.log("distill_loss", distill, on_step=False, on_epoch=True, batch_size=bs)
                loss = loss + d.weight * distill
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self._epoch_loss_sum += loss.detach() * bs  # a tensor: no GPU sync per step
        self._epoch_samples += bs
        return loss

    def epoch_train_loss(self) -> float:
        """Mean training loss of this epoch so far (this process's batches); NaN before any batch. Read by
        LearningCurves at the end of validation, before Lightning reduces ``train_loss_epoch``."""
        return float(self._epoch_loss_sum) / self._epoch_samples if self._epoch_samples else float("nan")

    # -------------------------------------------------------------------------------------------- val
    def validation_step(self, case: dict, batch_idx: int) -> None:
        """One whole case: ``image (C, H, W)`` or ``(C, Z, Y, X)``, ``label``, optional ``weight`` (same
        spatial shape). ``val_loss`` is the training loss (``loss_fn``, with the weight map when the case has
        one) on the un-augmented case, so the curves compare like with like; a volume's slices are its batch,
        as in training. With deep supervision the training loss averages the heads while validation scores the
        inference head (``model.inference_head``), the one the bundle predicts with."""
        icfg = self.cfg.inference.model_copy(update={"batch_size": self.cfg.inference.call_batch(self.device.type)})
        logits = predict_logits_case(self.model, case["image"].to(self.device), self.cfg.data.context_slices, icfg)
        logits = logits.to(self.device)
        label = case["label"].to(self.device).long()
        weight = case.get("weight")
        weight = None if weight is None else weight.to(self.device)
        if logits.ndim == 4:  # (K, Z, Y, X): slices as the batch
            loss = self.loss_fn(logits.transpose(0, 1), label, weight)
        else:
            loss = self.loss_fn(logits[None], label[None], None if weight is None else weight[None])
        pred = logits.argmax(0).cpu().numpy()
        metrics = per_label_metrics(pred, label.cpu().numpy(), self.cfg.data.num_classes, hd95=False)
        row = {"val_loss": float(loss), **{f"dice_{k}": m["dice"] for k, m in metrics.items()}}
        row["val_dice"] = float(np.mean([m["dice"] for m in metrics.values()]))
        self._val_rows.append(row)

    def on_validation_epoch_end(self) -> None:
        if not self._val_rows:
            return
        keys = self._val_rows[0].keys()
        means = {k: float(np.nanmean([r[k] for r in self._val_rows])) for k in keys}
        self._val_rows.clear()
        for k, v in means.items():
            self.log(k, v, prog_bar=k == "val_dice", sync_dist=True)

    # --------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        """Optimiser over `param_groups` (no decay on biases/norms) and a per-step LambdaLR schedule.

        ``schedule_params`` given in epochs (``t0_epochs``) are converted with this run's steps per epoch."""
        t = self.cfg.train
        lr = self.lr * (t.batch_size * t.accumulate_grad_batches / t.base_batch_size if t.scale_lr_with_batch else 1.0)
        groups = param_groups(self.model, lr, t.weight_decay, self.cfg.model.encoder_lr_mult, t.no_decay_on_bias_norm)
        if t.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=lr, momentum=t.momentum, nesterov=t.nesterov)
        elif t.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=lr)
        else:
            opt = torch.optim.AdamW(groups, lr=lr)
        if self.planned_steps:
            total = int(sum(self.planned_steps))
            steps_per_epoch = max(1, total // len(self.planned_steps))
        else:
            total = int(self.trainer.estimated_stepping_batches)
            steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        params = params_in_steps(dict(t.schedule_params), steps_per_epoch)
        if t.schedule in ("cosine", "linear", "sgdr"):
            params.setdefault("min_ratio", t.min_lr_ratio)
        warmup = int(round(t.warmup_epochs * steps_per_epoch))
        schedule = build_schedule(t.schedule, total, warmup, floor=t.min_lr_ratio, **params)
        self._nominal_snapshots = snapshot_steps(t.schedule, total, warmup, **params)
        if self.schedule_clock is None:  # a resumed run restored its clock from the checkpoint already
            self.schedule_clock = ScheduleClock(total)
        clock = self.schedule_clock
        self.update_snapshot_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: schedule(clock.virtual(step)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def update_snapshot_steps(self) -> None:
        """Real steps at which SGDR cycles end, after the schedule clock's latest re-plan."""
        assert self.schedule_clock is not None
        real = (self.schedule_clock.real(v) for v in self._nominal_snapshots)
        self.snapshot_steps = sorted({s for s in real if s is not None})


def _check_mixing(a: AugmentConfig) -> None:
    """Mixing options that cannot work fail at start-up, not after the first epoch."""
    if a.mixup < 0 or a.cutmix < 0 or a.mixup + a.cutmix > 1:
        raise ConfigError(f"augment.mixup ({a.mixup}) and augment.cutmix ({a.cutmix}) are per-batch probabilities: "
                          "each >= 0, together at most 1")
    if a.mixup_alpha <= 0 or a.cutmix_alpha <= 0:
        raise ConfigError(f"augment.mixup_alpha ({a.mixup_alpha}) and augment.cutmix_alpha ({a.cutmix_alpha}) "
                          "are Beta(alpha, alpha) parameters: both must be > 0")
