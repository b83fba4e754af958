"""`medseg distill`: an ensemble bundle (folds, snapshots, with TTA) taught to one smaller model (issue 19 part 1).

The student is an ordinary `medseg train` run on the teacher's own planned preprocessing (so both see each case on the
same model grid), with another encoder if asked, one member and no TTA. What it adds to training:

1. **Teacher targets, computed once.** Every training case is read onto the model grid (the same cache training
   uses), and the teacher's `Predictor` — all members, its TTA views, its calibration temperature — gives its mean
   class probabilities ``(K, *grid)`` there. They are written to ``OUT/teacher_targets/<key>/<case>.npy`` (float16),
   where ``key`` hashes the teacher's weights, the TTA mode and the grid settings: a rerun, or another student of the
   same teacher on the same data, reads them instead of predicting again.
2. **Soft targets through the data pipeline.** `SoftTargetCache` hands each cached case to the patch sampler with
   its ``soft`` array; `PatchDataset` cuts, pads and augments it with the image and mask (albumentations moves all
   targets with one set of random parameters), so the soft target stays aligned under flips, affine and elastic
   warps. Images without masks (``--unlabeled``) are labelled by the teacher: its argmax is their mask.
3. **Loss.** `SegModule` adds ``distill.weight · T² · KL(teacher_T ‖ student_T)`` (``distill.loss: kl``, ``T`` =
   ``distill.temperature``) or the soft Dice to the supervised loss whenever a batch carries ``soft``.

Validation is the teacher bundle's own split when it has one for this data (``splits.json``), else a new seeded one.
The model card and ``preprocessing.json`` (``distillation``) name the teacher (name, weights hash, members, TTA) and
give the teacher's and the student's Dice on the same validation cases, both predicted as a user would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.bundle import Bundle, load_bundle
from medseg.config import ExperimentConfig, TTAMode, apply_overrides, validate_config
from medseg.data.datalist import Case, _index_by_stem
from medseg.data.dataset import CaseCache, build_case_cache, case_input, foreground_points
from medseg.errors import ConfigError, DatasetError
from medseg.io.writers import atomic_path, write_text_atomic

log = logging.getLogger("medseg.distill")

# Data settings that decide the model grid and the network input: the student must share them with its teacher.
GRID_KEYS = ("label_map", "resample", "target_spacing", "target_size", "slice_axis", "intensity", "intensity_range",
             "ct_window", "channels", "context_slices", "separate_touching")
# Weight sources a student may start from; anything else (a file, a bundle) belongs to some other network.
GENERIC_INIT = ("none", "imagenet-offline", "imagenet")


@dataclass
class DistillResult:
    bundle: Path
    teacher_name: str
    teacher_hash: str
    teacher_passes: int  # model passes per image (members × TTA views)
    teacher_dice: float  # on the validation cases below
    student_dice: float
    n_val: int
    n_train: int
    n_unlabeled: int
    targets_computed: int  # teacher predictions made by this run (the others were read from the cache)
    seconds: float


def student_config(teacher: Bundle, data: Path, encoder: str | None, max_minutes: float | None,
                   overrides: list[str] | None) -> ExperimentConfig:
    """The teacher's planned config on ``data``, for one model: ``encoder`` (default: the teacher's), started from the
    teacher's generic weights source (ImageNet or none), no snapshots/SWA, no TTA, not re-planned."""
    cfg = teacher.config.model_copy(deep=True)
    cfg.data.root, cfg.data.datalist, cfg.data.group_column = Path(data).resolve(), None, None
    cfg.data.split_file, cfg.data.limit_cases, cfg.data.train_fraction = None, None, 1.0
    cfg.plan = False  # the teacher's plan, as it is: the teacher's targets live on its grid
    if encoder:
        cfg.model.encoder = encoder
    if cfg.model.pretrained not in GENERIC_INIT:
        cfg.model.pretrained = "imagenet-offline"
    cfg.model.cache_encoder_features = False
    cfg.train.snapshots = cfg.train.swa = False
    if cfg.train.schedule == "sgdr":
        cfg.train.schedule, cfg.train.schedule_params = "cosine", {}
    cfg.train.budget_minutes = max_minutes
    # The teacher's own pseudo-labelling is not the student's: images without masks come in through --unlabeled
    # (labelled by the teacher, with soft targets); inherited rounds would mix samples without them.
    cfg.train.unlabeled = type(cfg.train.unlabeled)()
    cfg.inference.tta = TTAMode.none  # single-model inference cost is the point
    cfg.name = f"{teacher.name}-student"
    cfg.description = f"Student of `{teacher.name}` (knowledge distillation, medseg distill)."
    if overrides:
        cfg = validate_config(apply_overrides(cfg.model_dump(mode="json"), overrides), "--set")
    _check_student(cfg, teacher.config)
    return cfg


def _check_student(cfg: ExperimentConfig, teacher_cfg: ExperimentConfig) -> None:
    differ = [k for k in GRID_KEYS if getattr(cfg.data, k) != getattr(teacher_cfg.data, k)]
    if differ:
        raise ConfigError(f"distill: the student must preprocess like the teacher (its targets are on the teacher's "
                          f"model grid); these data settings differ: {', '.join('data.' + k for k in differ)}")
    if cfg.augment.mixup or cfg.augment.cutmix:
        raise ConfigError("distill: augment.mixup/cutmix blend images but not the teacher's targets; set both to 0")
    if cfg.model.cache_encoder_features:
        raise ConfigError("distill: model.cache_encoder_features trains on cached features without the soft targets")


def unlabeled_cases(folder: Path) -> list[Case]:
    """Images without masks: ``folder/images/*`` when that exists, else the scans directly in ``folder``."""
    folder = Path(folder)
    images = folder / "images" if (folder / "images").is_dir() else folder
    if not images.is_dir():
        raise DatasetError(f"{folder}: --unlabeled needs a folder of images (or one with an images/ folder)")
    found = _index_by_stem(images)
    if not found:
        raise DatasetError(f"{images}: no supported scans found for --unlabeled")
    return [Case(id=f"unlabeled_{stem}", image=path) for stem, path in found.items()]


def targets_key(teacher: Bundle, tta: TTAMode, cfg: ExperimentConfig) -> str:
    """What the cached targets depend on: the teacher's weights and calibration, the TTA mode, the grid."""
    grid = cfg.data.model_dump(mode="json", include=set(GRID_KEYS))
    text = json.dumps({"weights": teacher.weights_hash, "calibration": teacher.calibration, "tta": str(tta),
                       "grid": grid, "version": 1}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _target_file(folder: Path, case_id: str) -> Path:
    # Case ids are file stems (no patient data); hashed anyway so an odd stem never makes an odd path.
    return folder / f"{hashlib.sha256(case_id.encode()).hexdigest()[:24]}.npy"


def compute_targets(predictor: Any, cache: CaseCache, cfg: ExperimentConfig, folder: Path, tta: TTAMode) -> int:
    """The teacher's probabilities for every cached case not in ``folder`` yet (float16 ``(K, *grid)``); returns how
    many it predicted. The input is the training cache's own network input (`case_input`), so it is the grid the
    student's patches are cut from."""
    folder.mkdir(parents=True, exist_ok=True)
    made = 0
    for i in range(len(cache)):
        d = cache[i]
        path = _target_file(folder, str(d["id"]))
        if path.is_file():
            continue
        probs = predictor.predict_probs(case_input(d, cfg.data), tta=tta)
        with atomic_path(path) as tmp:  # a killed run never leaves half a target behind
            np.save(tmp, probs.astype(np.float16))
        made += 1
    return made


class SoftTargetCache(torch.utils.data.Dataset):
    """The training cases (and teacher-labelled images) as `PatchDataset` reads them: each cached case with
    ``soft`` (the teacher's probabilities, memory-mapped); an image without a mask gets the teacher's argmax as
    ``label`` (and its foreground points, for centred patches)."""

    def __init__(self, caches: list[CaseCache], folder: Path) -> None:
        self.caches = caches
        self.folder = Path(folder)
        self.index = [(c, i) for c, cache in enumerate(caches) for i in range(len(cache))]
        self.problems = [p for cache in caches for p in cache.problems]
        self.ids = [i for cache in caches for i in cache.ids]
        self._pseudo: dict[str, dict[str, np.ndarray]] = {}
        weighted = False  # the loss uses weight maps: teacher-labelled images need one too, or batches mix keys
        for k in range(len(self.index)):
            d = self._case(k)
            weighted = weighted or "weight" in d
            soft = self._soft(str(d["id"]))
            if soft.shape[1:] != d["image"].shape[1:]:
                raise DatasetError(f"{d['id']}: teacher target shape {soft.shape[1:]} differs from the case's "
                                   f"model grid {d['image'].shape[1:]} (stale teacher_targets folder?)")
            if "label" not in d:
                label = np.asarray(soft).argmax(0).astype(np.uint8)
                points, classes = foreground_points(label)
                self._pseudo[str(d["id"])] = {"label": label, "fg_points": points, "fg_classes": classes}
        for extra in self._pseudo.values() if weighted else ():
            extra["weight"] = np.ones(extra["label"].shape, dtype=np.float32)  # no boundary term without instances

    def _case(self, k: int) -> dict[str, Any]:
        c, i = self.index[k]
        return self.caches[c][i]

    def _soft(self, case_id: str) -> np.ndarray:
        return np.load(_target_file(self.folder, case_id), mmap_mode="r", allow_pickle=False)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, Any]:
        d = self._case(k)
        d["soft"] = self._soft(str(d["id"]))
        d.update(self._pseudo.get(str(d["id"]), {}))
        return d


def _teacher_predictor(teacher: Bundle, tta: TTAMode, device: str):
    from medseg.inference import Predictor

    # Its default TTA set to ``tta``: the teacher's Dice is measured with the views its targets were made with.
    inference = teacher.config.inference.model_copy(update={"tta": tta})
    return Predictor.from_bundle(replace(teacher, config=teacher.config.model_copy(update={"inference": inference})),
                                 device=device)


def distill(
    teacher_path: Path,
    data: Path,
    out: Path,
    *,
    student_encoder: str | None = None,
    max_minutes: float | None = 10.0,
    unlabeled: Path | None = None,
    teacher_tta: TTAMode | str | None = None,
    device: str = "auto",
    progress: bool = True,
    overrides: list[str] | None = None,
) -> DistillResult:
    """Train a student of the bundle at ``teacher_path`` on ``data`` (images/ + masks/) and, optionally, the images
    in ``unlabeled``; ``OUT`` is a training run folder (``OUT/bundle`` the student). ``teacher_tta``: the views the
    teacher predicts with (None: the teacher bundle's ``inference.tta``)."""
    from medseg.engine.evaluate import evaluate_cases
    from medseg.engine.train import load_cases, split_cases, train

    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_bundle(teacher_path)
    tta = TTAMode(teacher_tta) if teacher_tta is not None else TTAMode(teacher.config.inference.tta)
    cfg = student_config(teacher, data, student_encoder, max_minutes, overrides)
    teacher_splits = Path(teacher.path) / "splits.json"
    if teacher_splits.is_file() and not (out / "splits.json").is_file():
        # Used when it covers exactly these cases (load_or_make_splits rewrites it otherwise).
        shutil.copy(teacher_splits, out / "splits.json")
    cases = load_cases(cfg)
    train_cases, val_cases = split_cases(cfg, cases, out)
    extra = unlabeled_cases(unlabeled) if unlabeled is not None else []

    predictor = _teacher_predictor(teacher, tta, device)
    passes_per_image = len(predictor.members) * len(predictor.views(tuple(cfg.data.patch_size), tta))
    folder = out / "teacher_targets" / targets_key(teacher, tta, cfg)
    made = [0]

    def with_targets(train_cache: CaseCache) -> SoftTargetCache:
        caches = [train_cache]
        if extra:
            caches.append(build_case_cache(extra, cfg, progress=progress, cache_dir=out / "cache"))
        t0 = time.time()
        for cache in caches:
            made[0] += compute_targets(predictor, cache, cfg, folder, tta)
        log.info("teacher targets: %d predicted (%d passes each), %d read from %s (%.0f s)", made[0],
                 passes_per_image, sum(len(c) for c in caches) - made[0], folder.name, time.time() - t0)
        return SoftTargetCache(caches, folder)

    log.info("distilling %s (%d members, TTA %s) into %s on %d labelled + %d unlabelled training cases",
             teacher.name, len(predictor.members), tta, cfg.model.encoder, len(train_cases), len(extra))
    result = train(cfg, out, progress=progress, wrap_train_cache=with_targets)
    teacher_dice = evaluate_cases(predictor, val_cases, teacher.config, hd95=False).mean_dice if val_cases else float("nan")
    record = {
        "teacher": teacher.name, "teacher_weights_hash": teacher.weights_hash, "teacher_members": len(predictor.members),
        "teacher_tta": str(tta), "teacher_passes_per_image": passes_per_image,
        "teacher_trained_on_validation_cases": (Path(teacher.path) / "cv_summary.json").is_file(),
        "loss": cfg.distill.loss, "weight": cfg.distill.weight, "temperature": cfg.distill.temperature,
        "labelled_train_cases": len(train_cases), "unlabelled_cases": len(extra), "validation_cases": len(val_cases),
        "teacher_dice": round(teacher_dice, 4), "student_dice": round(result.val_dice, 4), "max_minutes": max_minutes,
    }
    _stamp(result.bundle, record, cfg)
    return DistillResult(result.bundle, teacher.name, teacher.weights_hash, passes_per_image, teacher_dice,
                         result.val_dice, len(val_cases), len(train_cases), len(extra), made[0], time.time() - started)


def _stamp(bundle_dir: Path, record: dict, cfg: ExperimentConfig) -> None:
    """``preprocessing.json`` gets ``distillation``; the model card a section a reader finds without opening JSON."""
    prep_path = bundle_dir / "preprocessing.json"
    prep = json.loads(prep_path.read_text())
    prep["distillation"] = record
    write_text_atomic(prep_path, json.dumps(prep, indent=1))
    loss = (f"supervised loss + {record['weight']} × T² × KL(teacher_T ‖ student_T), T = {record['temperature']}"
            if record["loss"] == "kl" else f"supervised loss + {record['weight']} × soft Dice(student, teacher)")
    caveat = ("\n- The teacher is a cross-validation ensemble: some of its members trained on these validation cases, "
              "so its Dice here is optimistic." if record["teacher_trained_on_validation_cases"] else "")
    section = f"""
## Distillation
- Teacher: `{record['teacher']}`, weights `{record['teacher_weights_hash']}`, {record['teacher_members']} member(s), TTA `{record['teacher_tta']}` ({record['teacher_passes_per_image']} passes per image)
- Student: `{cfg.model.arch}` with encoder `{cfg.model.encoder}`, 1 member, TTA `{cfg.inference.tta}` (1 pass per image)
- Loss: {loss}
- Data: {record['labelled_train_cases']} labelled training cases + {record['unlabelled_cases']} images labelled by the teacher
- Dice on the same {record['validation_cases']} validation cases: teacher {record['teacher_dice']:.4f}, student {record['student_dice']:.4f}{caveat}
"""
    card = bundle_dir / "model_card.md"
    write_text_atomic(card, card.read_text() + section)
