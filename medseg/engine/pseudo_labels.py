"""Semi-supervised training from unlabeled images (``train.unlabeled``): pseudo-label rounds inside one Lightning run.

Self-training / noisy student (Xie et al. 2020) with FixMatch's confidence filter (Sohn et al. 2020):

* the epochs are split into rounds (`round_start_epochs`): without a teacher a labeled-only warm-up comes first;
* at the start of each round every unlabeled image is predicted **once** on the model grid — by the teacher bundle in
  the first round when one is given, by the current model otherwise — and each pixel keeps its predicted class where
  the confidence (max softmax probability, or 1 − normalised entropy, the uncertainty `medseg predict` reports)
  reaches ``confidence``; the rest become ``IGNORE_INDEX`` and add nothing to the loss (`pseudo_label`);
* training then draws ``share`` of its patches from the pseudo-labelled images, through the strong augmentation
  (``strong_preset`` plus the configured random convolution: the student sees noisier views than the teacher did),
  and the rest from the labeled ones as before (`PseudoLabelledCases`, used by `PatchDataset`).

Each round's pseudo-labels are written to ``OUT/pseudo_labels/round_<r>.npz`` (case ids are file stems): a resumed run
reloads them instead of predicting with weights it no longer has. The passes' time is reserved in a budgeted run
(`BudgetGuard.reserve`). Validation cases are never pseudo-labelled; unlabeled images are never validated on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from medseg.config import ExperimentConfig, UnlabeledConfig
from medseg.data.dataset import CaseCache, case_input, foreground_points
from medseg.errors import ConfigError
from medseg.inference.tiling import predict_logits_case
from medseg.io.writers import atomic_path
from medseg.losses.functional import IGNORE_INDEX

log = logging.getLogger("medseg")

__all__ = ["PseudoLabelRounds", "PseudoLabelledCases", "confidence_map", "pseudo_label", "round_start_epochs"]


def confidence_map(probs: np.ndarray, measure: str) -> np.ndarray:
    """Per-pixel confidence in [0, 1] of class probabilities ``(K, *spatial)``: ``max_prob`` (the winning class's
    probability) or ``entropy`` (1 − entropy / log K, so a uniform prediction scores 0 and a one-hot one 1)."""
    if measure == "max_prob":
        return probs.max(axis=0)
    if measure == "entropy":
        p = np.clip(probs, 1e-12, 1.0)
        entropy = -(p * np.log(p)).sum(axis=0)
        return 1.0 - entropy / math.log(max(2, probs.shape[0]))
    raise ValueError(f"unknown confidence measure {measure!r} (max_prob or entropy)")


def pseudo_label(probs: np.ndarray, measure: str = "max_prob", confidence: float = 0.9) -> np.ndarray:
    """Class probabilities ``(K, *spatial)`` -> pseudo-label ``(*spatial)`` uint8: the argmax where the confidence
    reaches ``confidence``, ``IGNORE_INDEX`` elsewhere."""
    label = probs.argmax(axis=0).astype(np.uint8)
    label[confidence_map(probs, measure) < confidence] = IGNORE_INDEX
    return label


def round_start_epochs(epochs: int, rounds: int, teacher: bool) -> list[int]:
    """The epochs at which each pseudo-label round starts. Without a teacher the run is split into ``rounds + 1``
    equal parts and the first (labeled only) warms the model up; with one, into ``rounds`` parts from epoch 0."""
    parts = rounds if teacher else rounds + 1
    if epochs < parts:
        raise ConfigError(f"train.unlabeled.rounds={rounds} needs at least {parts} epochs (train.epochs={epochs}): "
                          f"{'each round' if teacher else 'the warm-up and each round'} takes at least one")
    first = 0 if teacher else 1
    return [int(round(epochs * r / parts)) for r in range(first, first + rounds)]


class PseudoLabelledCases:
    """The unlabeled cases (a `CaseCache` on the model grid) with the current round's pseudo-labels, and the strong
    augmentation their patches go through. `PatchDataset` draws ``share`` of its samples from here once labels exist
    (``ready``)."""

    def __init__(self, cache: CaseCache, augment: Any, share: float, weight_map: bool = False) -> None:
        """``weight_map``: the loss uses weight maps, so pseudo-labelled samples carry one too (all ones: no boundary
        term from a guessed label), or they could not share a batch with labeled ones."""
        self.cache = cache
        self.augment = augment
        self.share = share
        self.weight_map = weight_map
        self.labels: dict[int, dict[str, np.ndarray]] = {}  # case index -> label, fg_points, fg_classes
        self.items: list[tuple[int, int]] = []  # (case, slice or -1) with a pseudo-label
        self.round = 0

    @property
    def ready(self) -> bool:
        return bool(self.items)

    def set_labels(self, labels: dict[str, np.ndarray], round_: int) -> None:
        """Labels by case id (``(*grid)`` uint8 with ``IGNORE_INDEX``) for round ``round_``."""
        index = {case_id: i for i, case_id in enumerate(self.cache.ids)}
        self.labels, self.items = {}, []
        for case_id, label in labels.items():
            i = index[case_id]
            confident = np.where(label == IGNORE_INDEX, 0, label)  # foreground centres from confident pixels only
            points, classes = foreground_points(confident, seed=i)
            self.labels[i] = {"label": label, "fg_points": points, "fg_classes": classes}
            if self.weight_map:
                self.labels[i]["weight"] = np.ones(label.shape, dtype=np.float32)
            self.items += [(i, z) for z in range(label.shape[0])] if label.ndim == 3 else [(i, -1)]
        self.round = round_

    def case(self, i: int) -> dict[str, Any]:
        return {**self.cache[i], **self.labels[i]}

    def draw(self, rng: np.random.Generator) -> tuple[dict[str, Any], int]:
        i, z = self.items[int(rng.integers(len(self.items)))]
        return self.case(i), z


class PseudoLabelRounds(L.Callback):
    """Makes each round's pseudo-labels at its start epoch (see the module docstring). ``state_dict``: the round
    reached, so a resumed run reloads that round's labels from ``OUT/pseudo_labels``."""

    def __init__(self, cfg: ExperimentConfig, pseudo: PseudoLabelledCases, out_dir: Path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: the time source the passes are measured with (the budget guard's; tests use a fake one)."""
        self.cfg = cfg
        self.clock = clock
        self.ucfg: UnlabeledConfig = cfg.train.unlabeled
        self.pseudo = pseudo
        self.folder = Path(out_dir) / "pseudo_labels"
        self.starts = round_start_epochs(cfg.train.epochs, self.ucfg.rounds, self.ucfg.teacher is not None)
        self.round = 0  # rounds done
        self.seconds_per_case: float | None = None  # measured on the last pass
        self.stats: list[dict[str, Any]] = []  # per round: kept share of pixels, seconds
        self._teacher = None

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "stats": [dict(s) for s in self.stats]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.stats = [dict(s) for s in state.get("stats", [])]

    # -------------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the first epoch's loader starts: a teacher's round begins at epoch 0, and a resumed run needs
        # the labels of the round it is in.
        if self.round > 0 and not self.pseudo.ready:
            self._reload(self.round)
        self._maybe_start_round(trainer, pl_module, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_start_round(trainer, pl_module, trainer.current_epoch)

    def reserve_seconds(self, epoch: int, val_seconds_per_case: float | None = None) -> float:
        """Seconds the passes of rounds still to come (after ``epoch``) will take: read by the budget guard. Before
        the first pass, a validation case's time stands in for a pass's (the same whole-case prediction)."""
        later = sum(1 for s in self.starts[self.round:] if s > epoch)
        per_case = self.seconds_per_case if self.seconds_per_case is not None else val_seconds_per_case
        return later * (per_case or 0.0) * len(self.pseudo.cache)

    # -------------------------------------------------------------------------------------- rounds
    def _maybe_start_round(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        if self.round >= len(self.starts) or epoch < self.starts[self.round]:
            return
        self.round += 1
        start = self.clock()
        use_teacher = self.round == 1 and self.ucfg.teacher is not None
        labels = self._predict_all(pl_module, use_teacher)
        seconds = self.clock() - start
        self.seconds_per_case = seconds / max(1, len(labels))
        kept = float(np.mean([np.mean(lab != IGNORE_INDEX) for lab in labels.values()])) if labels else 0.0
        self.stats.append({"round": self.round, "epoch": epoch, "teacher": use_teacher, "cases": len(labels),
                           "kept_share": round(kept, 4), "seconds": round(seconds, 1)})
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.folder / f"round_{self.round}.npz") as tmp:  # resume never reads half a round
                np.savez_compressed(tmp, **labels)
        self.pseudo.set_labels(labels, self.round)
        log.info("pseudo-labels round %d (%s): %d unlabeled images, %.1f%% of pixels confident enough to train on",
                 self.round, "teacher" if use_teacher else "current model", len(labels), 100 * kept)

    def _reload(self, round_: int) -> None:
        path = self.folder / f"round_{round_}.npz"
        if not path.is_file():
            log.warning("resume: %s is missing; pseudo-labels are predicted again with the restored model", path)
            self.round = round_ - 1
            return
        with np.load(path, allow_pickle=False) as f:
            self.pseudo.set_labels({k: f[k] for k in f.files}, round_)

    @torch.no_grad()
    def _predict_all(self, pl_module: L.LightningModule, use_teacher: bool) -> dict[str, np.ndarray]:
        predict = self._teacher_probs if use_teacher else None
        model = pl_module.model
        was_training = model.training
        model.eval()
        out = {}
        try:
            for i, case_id in enumerate(self.pseudo.cache.ids):
                d = self.pseudo.cache[i]
                x = case_input(d, self.cfg.data)  # (C, *grid): the whole case, as validation sees it
                if predict is not None:
                    probs = predict(x)
                else:
                    logits = predict_logits_case(pl_module, torch.from_numpy(x).to(pl_module.device),
                                                 self.cfg.data.context_slices, self.cfg.inference)
                    probs = torch.softmax(logits.float(), dim=0).cpu().numpy()
                out[str(case_id)] = pseudo_label(probs, self.ucfg.measure, self.ucfg.confidence)
        finally:
            model.train(was_training)
        return out

    def _teacher_probs(self, x: np.ndarray) -> np.ndarray:
        if self._teacher is None:
            self._teacher = load_teacher(self.ucfg.teacher, self.cfg)
        probs, _ = self._teacher.predict_image(x)
        return probs


def load_teacher(path: Path | None, cfg: ExperimentConfig):
    """The teacher bundle as a Predictor (eager torch). It predicts on this run's model grid, so it must take the same
    input channels and predict the same classes."""
    from medseg.bundle import load_bundle
    from medseg.inference.predictor import Predictor

    if path is None:
        raise ConfigError("train.unlabeled.teacher is not set")
    bundle = load_bundle(path)
    tcfg = bundle.config
    if tcfg.data.input_channels != cfg.data.input_channels or tcfg.data.num_classes != cfg.data.num_classes:
        raise ConfigError(
            f"train.unlabeled.teacher {Path(path).name}: takes {tcfg.data.input_channels} input channels and predicts "
            f"{tcfg.data.num_classes} classes; this run has {cfg.data.input_channels} and {cfg.data.num_classes}")
    device = "cuda" if cfg.train.accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    return Predictor.from_bundle(bundle, device=device, backend="torch")
