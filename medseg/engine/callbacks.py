"""Training callbacks: per-epoch metrics.csv and progress.png (learning curves) beside the checkpoints, and
snapshot-ensemble members saved at the end of each SGDR cycle."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import matplotlib
import torch
from safetensors.torch import save_file

from medseg.io.writers import atomic_path

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


class LearningCurves(L.Callback):
    """At the end of every validation: append the epoch's numbers to ``metrics.csv`` and redraw
    ``progress.png`` (train/val loss, val Dice, learning rates).

    The learning rate is recorded per parameter group as ``lr_<group>`` (``lr_encoder``, ``lr_decoder``: they
    differ with ``model.encoder_lr_mult``; a group's no-decay twin shares its rate), at the end of the epoch.

    The row is written before the epoch's checkpoint (Lightning runs checkpoint callbacks last) and the rows
    travel in the checkpoint, so a run killed between the two loses nothing: the resumed run rewrites
    ``metrics.csv`` from the checkpoint's rows (dropping any the interrupted run wrote after it) and redoes
    the epoch.
    """

    FIELDS = ("epoch", "train_loss", "val_loss", "val_dice")  # then one lr_<group> column per parameter group

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.rows: list[dict[str, float]] = []
        self._restored = False

    def state_dict(self) -> dict[str, list[dict[str, float]]]:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict[str, list[dict[str, float]]]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]
        self._restored = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._restored:
            self.rows = []
        elif trainer.is_global_zero:
            self._write()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._record(trainer, pl_module, validated=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Epochs without validation (train.val_every > 1) still get their training loss and LR; such a row
        # reaches a checkpoint with the next validation's.
        if not any(r["epoch"] == float(trainer.current_epoch) for r in self.rows):
            self._record(trainer, pl_module, validated=False)

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, validated: bool) -> None:
        epoch = float(trainer.current_epoch)
        train_loss = pl_module.epoch_train_loss() if hasattr(pl_module, "epoch_train_loss") else math.nan
        if math.isnan(train_loss) and any(r["epoch"] == epoch for r in self.rows):
            return  # a resumed epoch that the checkpoint already finished: no batches ran, keep its row
        m = trainer.callback_metrics if validated else {}  # else they are the last validation's
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": float(m.get("val_loss", math.nan)),
            "val_dice": float(m.get("val_dice", math.nan)),
            **(group_learning_rates(trainer.optimizers[0]) if trainer.optimizers else {}),
        }
        self.rows = [r for r in self.rows if r["epoch"] != epoch] + [row]
        if trainer.is_global_zero:
            self._write()

    def _write(self) -> None:
        extra = sorted({k for r in self.rows for k in r} - set(self.FIELDS))
        with atomic_path(self.out_dir / "metrics.csv") as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*self.FIELDS, *extra], restval=math.nan)
            w.writeheader()
            w.writerows(self.rows)
        plot_learning_curves(self.rows, self.out_dir / "progress.png")


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{"lr_encoder": ..., "lr_decoder": ...}``: the current rate of each named parameter group
    (`medseg.models.transfer.param_groups`; ``<name>_no_decay`` counts as ``<name>``), ``lr_group<i>`` for
    unnamed groups."""
    rates: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        name = str(group.get("name", f"group{i}")).removesuffix("_no_decay")
        rates.setdefault(f"lr_{name}", float(group["lr"]))
    return rates


def learning_rate_columns(rows: list[dict[str, float]]) -> list[str]:
    """The learning-rate columns of metrics.csv rows (``lr_<group>``; ``lr`` in runs from before the split)."""
    return sorted({k for r in rows for k in r if k == "lr" or k.startswith("lr_")})


class SnapshotEnsemble(L.Callback):
    """Snapshot ensembles (Huang et al. 2017): when an SGDR cycle ends (``pl_module.snapshot_steps``, the
    global steps computed with the schedule), save the model's weights as
    ``<out_dir>/snapshot_<cycle>.safetensors``. The files are on disk, not in the checkpoint, so a resumed run
    keeps the snapshots taken before the interruption."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self._last_saved = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step  # optimiser steps so far; stays put over accumulated micro-batches
        steps = getattr(pl_module, "snapshot_steps", [])
        if step == self._last_saved or step not in steps or not trainer.is_global_zero:
            return
        self._last_saved = step
        state = {k: v.detach().contiguous().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        with atomic_path(self.out_dir / f"snapshot_{steps.index(step) + 1}.safetensors") as tmp:
            save_file(state, str(tmp))


def read_snapshots(out_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Snapshot members saved by `SnapshotEnsemble`, in cycle order: ``{"snapshot_1": state, ...}``."""
    from safetensors.torch import load_file

    files = sorted(Path(out_dir).glob("snapshot_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    return {p.stem: load_file(str(p)) for p in files}


def plot_learning_curves(rows: list[dict[str, float]], path: Path) -> None:
    epochs = [r["epoch"] + 1 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in rows], "o-", label="val")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(epochs, [r["val_dice"] for r in rows], "o-", color="tab:green")
    axes[1].set_title("val Dice (foreground mean)")
    axes[1].set_ylim(0, 1)
    for column in learning_rate_columns(rows):
        axes[2].plot(epochs, [r.get(column, math.nan) for r in rows], "o-", label=column.removeprefix("lr_"))
    axes[2].set_title("learning rate per parameter group (end of epoch)")
    axes[2].set_yscale("log")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
