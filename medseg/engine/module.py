"""SegModule: the LightningModule — model, loss, metrics, optimiser and schedule from config; nothing else.

Lightning's Trainer owns the loop, precision, accumulation, clipping, checkpointing and resume.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from medseg.config import ExperimentConfig
from medseg.engine.budget import ScheduleClock
from medseg.engine.schedules import build_schedule, params_in_steps, snapshot_steps
from medseg.inference.tiling import predict_logits_case
from medseg.losses import build_loss
from medseg.metrics import per_label_metrics
from medseg.models import build_model
from medseg.models.transfer import apply_transfer_strategy, param_groups, unfreeze_for_epoch


class SegModule(L.LightningModule):
    def __init__(self, cfg: ExperimentConfig, model: torch.nn.Module | None = None,
                 planned_steps: list[int] | None = None) -> None:
        """``planned_steps``: optimiser steps per epoch when they differ between epochs (a budgeted run,
        `medseg.engine.budget`); the schedule is laid over their sum. Default: Lightning's estimate."""
        super().__init__()
        self.cfg = cfg
        self.model = model if model is not None else build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes)
        apply_transfer_strategy(self.model, cfg.model)
        self.loss_fn = build_loss(cfg.loss)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ------------------------------------------------------------------------------------------- train
    def on_train_epoch_start(self) -> None:
        self._epoch_loss_sum, self._epoch_samples = 0.0, 0
        if self.cfg.model.transfer == "gradual_unfreeze":
            unfreeze_for_epoch(self.model, self.current_epoch, self.cfg.model.unfreeze_at_epochs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["image"])
        loss = self.loss_fn(logits, batch["label"].long(), batch.get("weight"))  # labels travel as uint8
        bs = batch["image"].shape[0]
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
        logits = predict_logits_case(self.model, case["image"].to(self.device), self.cfg.data.context_slices, self.cfg.inference)
        logits = logits.to(self.device)
        label = case["label"].to(self.device).long()
        loss = F.cross_entropy(logits[None], label[None])
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
        schedule = build_schedule(t.schedule, total, warmup, **params)
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.schedule_clock is not None:
            checkpoint["schedule_clock"] = self.schedule_clock.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "schedule_clock" in checkpoint:
            self.schedule_clock = ScheduleClock(1)
            self.schedule_clock.load_state_dict(checkpoint["schedule_clock"])
