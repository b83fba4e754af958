"""A wall-clock budget that shapes the schedule (``train.budget_minutes`` / ``--max-minutes``), not just the stop.

A budgeted run keeps a fixed number of epochs (validation rounds, from the plan) and re-plans how many optimiser
steps each *remaining* epoch gets from the time measured so far, so that training, every validation round and the
final evaluation of the shipped model end inside the budget:

* epoch 0 is short (``CALIBRATION_SHARE`` of the planned steps): its steps and its validation round are the
  measurement the first re-plan uses;
* after every epoch, ``steps per remaining epoch = (time left - remaining validation - final evaluation - margin)
  / (remaining epochs * seconds per step)``; validation rounds are trimmed to ``VAL_SHARE`` of the budget;
* the learning-rate schedule is laid over the *nominal* steps planned at the start and followed through a
  `ScheduleClock` that maps real steps onto it: after a re-plan the remaining real steps stretch or squeeze onto
  the remaining nominal ones, so the LR stays continuous and reaches the schedule's floor on the last step;
  SGDR snapshot points move with it.

Lightning's SWA callback reads the epoch count once, so SWA runs keep epochs fixed (only their lengths change).
Everything here reads time from an injectable ``clock`` (tests use a fake one). The guard's state (per-epoch steps,
clock, measurements) travels in checkpoints, so ``--resume`` continues the same plan.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L

log = logging.getLogger("medseg")

CALIBRATION_SHARE = 0.04  # of the planned steps, in epoch 0
CALIBRATION_TIME_SHARE = 0.02  # ... and at most this share of the budget even if steps are 4x slower than estimated
PESSIMISM = 4.0
MIN_CALIBRATION_STEPS = 3
VAL_SHARE = 0.10  # of the budget, all intermediate validation rounds together
FINAL_EVAL_FACTOR = 1.5  # the final evaluation reads and resamples every case: dearer per case than a round
MARGIN_SHARE = 0.03  # of the budget, plus MARGIN_SECONDS: bundle writing, loader start-up, noise
MARGIN_SECONDS = 5.0
MIN_STEPS_PER_EPOCH = 1

Clock = Callable[[], float]


class ScheduleClock:
    """Real optimiser steps -> steps of the nominal schedule (``nominal_total`` steps).

    Until a re-plan, virtual = real. ``replan(step, total)`` at real step ``s0`` (virtual ``v0``) with a new real
    total ``T`` maps the remaining real steps linearly onto the remaining nominal ones:
    ``v(s) = v0 + (s - s0) * (N - v0) / (T - s0)``, so ``v(T) = N`` — the schedule's last step.
    """

    def __init__(self, nominal_total: int) -> None:
        self.nominal_total = max(1, int(nominal_total))
        self.s0, self.v0, self.total = 0, 0.0, self.nominal_total

    def virtual(self, step: float) -> float:
        if self.total <= self.s0:
            return float(self.nominal_total)
        return min(float(self.nominal_total),
                   self.v0 + (step - self.s0) * (self.nominal_total - self.v0) / (self.total - self.s0))

    def real(self, virtual_step: float) -> int | None:
        """The first real step at which the virtual clock reaches ``virtual_step`` (None if before the last re-plan)."""
        if virtual_step < self.v0:
            return None
        if self.nominal_total <= self.v0:
            return self.s0
        return int(math.ceil(self.s0 + (virtual_step - self.v0) * (self.total - self.s0) / (self.nominal_total - self.v0) - 1e-9))

    def replan(self, step: int, new_total: int) -> None:
        self.v0 = self.virtual(step)
        self.s0 = int(step)
        self.total = max(int(step) + 1, int(new_total))

    def state_dict(self) -> dict[str, Any]:
        return {"nominal_total": self.nominal_total, "s0": self.s0, "v0": self.v0, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nominal_total, self.s0 = int(state["nominal_total"]), int(state["s0"])
        self.v0, self.total = float(state["v0"]), int(state["total"])


def initial_epoch_steps(epochs: int, steps_per_epoch: int, budget_seconds: float | None = None,
                        estimated_step_seconds: float | None = None) -> list[int]:
    """The planned steps per epoch: epoch 0 short (the calibration: ``CALIBRATION_SHARE`` of the steps, and no more
    than ``CALIBRATION_TIME_SHARE`` of the budget should steps be ``PESSIMISM`` times slower than estimated), the
    rest equal, the total as planned."""
    total = max(epochs, epochs * steps_per_epoch)
    if epochs == 1:
        return [total]
    first = min(steps_per_epoch, int(round(CALIBRATION_SHARE * total)))
    if budget_seconds and estimated_step_seconds:
        first = min(first, int(CALIBRATION_TIME_SHARE * budget_seconds / (PESSIMISM * estimated_step_seconds)))
    first = max(min(MIN_CALIBRATION_STEPS, steps_per_epoch), first, MIN_STEPS_PER_EPOCH)
    rest = total - first
    base, extra = divmod(rest, epochs - 1)
    return [first] + [base + (1 if i < extra else 0) for i in range(epochs - 1)]


STEP_WINDOW = 50  # recent step intervals the step time is estimated from


@dataclass
class BudgetState:
    epoch_steps: list[int]
    step_seconds: list[float] = field(default_factory=list)  # recent step intervals (batch end to batch end)
    val_seconds_per_case: float | None = None
    val_cases: int | None = None  # cases per round now
    replans: list[dict[str, Any]] = field(default_factory=list)


class BudgetGuard(L.Callback):
    """Re-plans the remaining epochs' lengths (and validation subset) after every epoch (see module docstring).

    ``deadline``: clock time at which the whole run must be done (start + budget); ``n_val_total``: validation
    cases the final evaluation scores; ``batch``: samples per optimiser step (batch x accumulation).
    ``train_dataset``/``val_dataset``: their ``length`` / ``indices`` are what a re-plan changes.
    """

    def __init__(self, *, deadline: float, clock: Clock, epoch_steps: list[int], batch: int, train_dataset: Any,
                 val_dataset: Any = None, n_val_total: int = 0, budget_seconds: float) -> None:
        self.deadline = deadline
        self.clock = clock
        self.batch = batch
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.n_val_total = n_val_total
        self.budget_seconds = budget_seconds
        self.state = BudgetState(list(epoch_steps), val_cases=len(val_dataset) if val_dataset is not None else None)
        self._epoch_start: float | None = None
        self._last_batch_end: float | None = None
        self._val_start: float | None = None
        self._val_time = 0.0
        self._val_n = 0
        # Time the run will spend outside training steps and validation (pseudo-label passes still to come):
        # ``reserve(epoch, val_seconds_per_case) -> seconds``, set by the caller.
        self.reserve: Callable[[int, float | None], float] | None = None
        self._set_length(0)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {"epoch_steps": list(s.epoch_steps), "step_seconds": list(s.step_seconds),
                "val_seconds_per_case": s.val_seconds_per_case, "val_cases": s.val_cases,
                "replans": [dict(r) for r in s.replans]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = BudgetState(list(state["epoch_steps"]), list(state["step_seconds"]),
                                 state.get("val_seconds_per_case"), state.get("val_cases"), list(state.get("replans", [])))
        self._pending_resume = True

    # ----------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "_pending_resume", False):
            self._set_length(trainer.current_epoch)
            self._trim_val()
            self._pending_resume = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self.clock()
        self._last_batch_end = None  # the first batch of an epoch carries loader start-up (and, once, warm-up)
        self._val_time, self._val_n = 0.0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        now = self.clock()
        if self._last_batch_end is not None:
            # Batch end to batch end: the step and the loading of the next batch, which is what a step costs.
            self.state.step_seconds.append((now - self._last_batch_end) * trainer.accumulate_grad_batches)
            del self.state.step_seconds[:-STEP_WINDOW]
        self._last_batch_end = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_start = self.clock()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._val_start is None:
            return
        self._val_time += self.clock() - self._val_start
        self._val_n += int(sum(trainer.num_val_batches)) if trainer.num_val_batches else 0
        self._val_start = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_start is None:
            return
        epoch = trainer.current_epoch
        if not self.state.step_seconds:  # a one-batch epoch measured nothing between batches: use the epoch
            done_steps = self.state.epoch_steps[epoch] if epoch < len(self.state.epoch_steps) else 1
            self.state.step_seconds.append(max(1e-6, self.clock() - self._epoch_start - self._val_time) / max(1, done_steps))
        if self._val_n:
            self.state.val_seconds_per_case = self._val_time / self._val_n
        self.replan(trainer, pl_module, epoch)

    # -------------------------------------------------------------------------------------- planning
    def _step_seconds(self) -> float:
        recent = self.state.step_seconds[-STEP_WINDOW:]
        return sum(recent) / len(recent)

    def replan(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        s = self.state
        remaining_epochs = len(s.epoch_steps) - (epoch + 1)
        if remaining_epochs <= 0:
            return
        now = self.clock()
        per_case = s.val_seconds_per_case or 0.0
        final_eval = FINAL_EVAL_FACTOR * per_case * self.n_val_total
        margin = MARGIN_SHARE * self.budget_seconds + MARGIN_SECONDS
        # Validation rounds: at most VAL_SHARE of the budget over all remaining rounds.
        if self.val_dataset is not None and per_case > 0:
            affordable = int(VAL_SHARE * self.budget_seconds / (len(s.epoch_steps) * per_case))
            s.val_cases = max(1, min(len(self.val_dataset.all_indices), affordable))
            self._trim_val()
        val_rounds = remaining_epochs * per_case * (s.val_cases or 0)
        left = self.deadline - now - final_eval - margin - val_rounds
        if self.reserve is not None:
            left -= self.reserve(epoch, s.val_seconds_per_case)
        step_s = self._step_seconds()
        per_epoch = max(MIN_STEPS_PER_EPOCH, int(left / (remaining_epochs * step_s)))
        new_steps = s.epoch_steps[: epoch + 1] + [per_epoch] * remaining_epochs
        # Every DDP rank must cut its epochs alike (their clocks differ a little): rank 0 decides.
        new_steps = trainer.strategy.broadcast(new_steps, src=0)
        s.val_cases = trainer.strategy.broadcast(s.val_cases, src=0)
        self._trim_val()
        if new_steps != s.epoch_steps:
            done = sum(s.epoch_steps[: epoch + 1])
            new_total = sum(new_steps)
            s.epoch_steps = new_steps
            clock = getattr(pl_module, "schedule_clock", None)
            if clock is not None:
                clock.replan(done, new_total)
                if hasattr(pl_module, "update_snapshot_steps"):
                    pl_module.update_snapshot_steps()
            s.replans.append({"epoch": epoch, "steps_per_epoch": per_epoch, "total_steps": new_total,
                              "seconds_per_step": round(step_s, 4), "val_cases": s.val_cases,
                              "seconds_left": round(left, 1)})
            log.info("budget: %.2f s/step measured; %d steps in each of the %d remaining epochs (%d in all)",
                     step_s, per_epoch, remaining_epochs, new_total)
        self._set_length(epoch + 1)

    def _set_length(self, epoch: int) -> None:
        if epoch < len(self.state.epoch_steps):
            self.train_dataset.length = self.state.epoch_steps[epoch] * self.batch

    def _trim_val(self) -> None:
        if self.val_dataset is not None and self.state.val_cases is not None:
            self.val_dataset.indices = list(self.val_dataset.all_indices[: self.state.val_cases])


def monotonic() -> float:
    return time.monotonic()
