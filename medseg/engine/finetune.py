"""Fine-tune a bundle on reviewed cases (``medseg.review``) into its next version (issue 16 item 10).

The run is ``medseg.engine.train.train`` with the parent bundle's own planned config (``config.yaml``), started from
the parent's weights (``model.pretrained`` = the bundle) and not re-planned. Its data: the reviewed cases (accepted
or corrected, latest verdict per case) and, optionally, the original training data. A share of the reviewed cases is
held aside as the validation set, so the model card can say how the parent and the new version do on corrections
neither was trained on (before / after Dice through the one evaluation loop, ``evaluate_cases``).

The new bundle records its lineage in ``preprocessing.json``: ``version`` (parent + 1; a bundle without one counts
as version 1), ``lineage`` (parent name, version and weights hash, the data used, before/after Dice); the training
fingerprint is the parent's (the data the reviews come from is the same kind).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from medseg.bundle import Bundle, load_bundle
from medseg.data.datalist import Case, discover_cases
from medseg.errors import MedsegError
from medseg.review import latest_verdicts

log = logging.getLogger("medseg.finetune")
HOLD_OUT = 0.2  # share of reviewed cases held aside for before/after Dice
MIN_REVIEWED = 2  # one to train on, one to check


@dataclass
class FinetuneResult:
    bundle: Path
    version: int
    parent_weights_hash: str
    n_reviewed_train: int
    n_held_aside: int
    n_original: int
    dice_before: float
    dice_after: float
    seconds: float


def bundle_version(bundle: Bundle) -> int:
    """The bundle's version number (1 when it records none: a model trained from scratch)."""
    try:
        return int(bundle.preprocessing.get("version") or 1)
    except (TypeError, ValueError):
        return 1


def next_version_path(bundle_path: Path, bundle: Bundle, folder: Path | None = None) -> Path:
    """Where the next version goes: ``demo-nuclei`` -> ``demo-nuclei-v2``, ``demo-nuclei-v2`` -> ``-v3`` (beside
    the bundle, or in ``folder``)."""
    stem = re.sub(r"-v\d+$", "", Path(bundle_path).name.removesuffix(".zip"))
    return Path(folder or Path(bundle_path).resolve().parent) / f"{stem}-v{bundle_version(bundle) + 1}"


def reviewed_cases(reviews: Path) -> list[Case]:
    """The reviewed cases with files whose latest verdict is accepted or corrected."""
    verdicts = latest_verdicts(reviews)
    if not (Path(reviews) / "images").is_dir():
        return []
    cases = discover_cases(reviews)
    return [c for c in cases if verdicts.get(c.id) is not None and verdicts[c.id].verdict in ("accepted", "corrected")]


def split_held_aside(cases: list[Case], share: float = HOLD_OUT) -> tuple[list[Case], list[Case]]:
    """(train, held aside): a fixed share chosen by case-id hash, so adding reviews keeps earlier choices stable."""
    ranked = sorted(cases, key=lambda c: hashlib.sha256(c.id.encode()).hexdigest())
    n_held = max(1, round(share * len(cases)))
    held = {c.id for c in ranked[:n_held]}
    return [c for c in cases if c.id not in held], [c for c in cases if c.id in held]


def write_datalist(path: Path, cases: list[tuple[str, Case]]) -> Path:
    """A datalist CSV (``id, image, mask``, absolute paths) of ``(id, case)`` pairs, as ``data.datalist`` reads."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image", "mask"])
        writer.writeheader()
        for case_id, case in cases:
            writer.writerow({"id": case_id, "image": str(Path(case.image).resolve()),
                             "mask": str(Path(case.mask).resolve())})
    return path


def _dice(bundle: Bundle | Path, cases: list[Case], cfg, device: str) -> float:
    from medseg.engine.evaluate import evaluate_cases
    from medseg.inference import Predictor

    return evaluate_cases(Predictor.from_bundle(bundle, device=device), cases, cfg, hd95=False).mean_dice


def finetune(
    bundle_path: Path,
    reviews: Path,
    out: Path,
    *,
    max_minutes: float | None = 10.0,
    with_original: Path | None = None,
    device: str = "auto",
    progress: bool = True,
    overrides: list[str] | None = None,
) -> FinetuneResult:
    """Train the next version of ``bundle_path`` on the reviews in ``reviews``; the new bundle is written to ``out``
    (the run's logs and checkpoints beside it in ``.finetune-runs/.<out name>``). Raises ``MedsegError`` with one line when
    there is too little to train on."""
    import time

    from medseg.config import apply_overrides, validate_config
    from medseg.engine.train import train

    started = time.time()
    parent = load_bundle(bundle_path)
    reviewed = reviewed_cases(reviews)
    if len(reviewed) < MIN_REVIEWED:
        raise MedsegError(f"{Path(reviews).name}: {len(reviewed)} accepted or corrected case(s); fine-tuning needs at "
                          f"least {MIN_REVIEWED} (one to train on, one held aside to check the new version)")
    train_reviewed, held = split_held_aside(reviewed)
    original: list[Case] = []
    if with_original is not None:
        d = parent.config.data
        original = discover_cases(with_original, d.images_dir, d.masks_dir)
    # Two hidden levels down: a models folder (searched two levels deep) never lists the run or its bundle.
    run_dir = Path(out).parent / ".finetune-runs" / f".{Path(out).name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [(f"review_{c.id}", c) for c in train_reviewed] + [(f"held_{c.id}", c) for c in held]
    rows += [(f"orig_{c.id}", c) for c in original]
    datalist = write_datalist(run_dir / "datalist.csv", rows)
    # Validation = the held-aside reviewed cases exactly: a two-fold split file with them as fold 0.
    cfg = parent.config.model_copy(deep=True)
    seed = cfg.data.split_seed
    folds = [[i for i, _ in rows if i.startswith("held_")], [i for i, _ in rows if not i.startswith("held_")]]
    (run_dir / "splits.json").write_text(json.dumps({"seed": seed, "folds": folds}, indent=1))
    cfg.data.root, cfg.data.datalist, cfg.data.split_file = None, datalist, run_dir / "splits.json"
    cfg.data.folds, cfg.data.fold, cfg.data.limit_cases, cfg.data.train_fraction = 2, 0, None, 1.0
    cfg.data.group_column = None
    cfg.model.pretrained = str(Path(parent.path).resolve())
    cfg.plan = False  # the parent's planned config, as it is
    cfg.train.budget_minutes = max_minutes
    if overrides:
        cfg = validate_config(apply_overrides(cfg.model_dump(mode="json"), overrides), "--set")

    before = _dice(parent, held, parent.config, device)
    log.info("fine-tuning %s v%d on %d reviewed (+%d original) cases; %d held aside, Dice before %.4f",
             parent.name, bundle_version(parent), len(train_reviewed), len(original), len(held), before)
    result = train(cfg, run_dir, progress=progress)
    after = result.val_dice
    version = bundle_version(parent) + 1
    lineage = {
        "parent": parent.name, "parent_version": bundle_version(parent), "parent_weights_hash": parent.weights_hash,
        "reviews": Path(reviews).name, "reviewed_train_cases": len(train_reviewed), "held_aside_cases": len(held),
        "original_data": Path(with_original).name if with_original else None, "original_cases": len(original),
        "dice_before": round(before, 4), "dice_after": round(after, 4), "max_minutes": max_minutes,
    }
    _stamp_version(result.bundle, parent, version, lineage)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(result.bundle), str(out))
    return FinetuneResult(out, version, parent.weights_hash, len(train_reviewed), len(held), len(original), before,
                          after, time.time() - started)


def _stamp_version(bundle_dir: Path, parent: Bundle, version: int, lineage: dict) -> None:
    """Write the version, lineage and the parent's training fingerprint into the new bundle, and a model-card
    section a reader finds without opening JSON."""
    prep_path = bundle_dir / "preprocessing.json"
    prep = json.loads(prep_path.read_text())
    prep["version"] = version
    prep["lineage"] = lineage
    if "training_fingerprint" in parent.preprocessing:
        prep["training_fingerprint"] = parent.preprocessing["training_fingerprint"]
    prep_path.write_text(json.dumps(prep, indent=1))
    card = bundle_dir / "model_card.md"
    original = (f"; plus {lineage['original_cases']} cases of the original data `{lineage['original_data']}`"
                if lineage["original_data"] else "")
    section = f"""
## Fine-tuning (version {version})
- Parent: `{lineage['parent']}` version {lineage['parent_version']}, weights `{lineage['parent_weights_hash']}`
- Data: {lineage['reviewed_train_cases']} reviewed cases from `{lineage['reviews']}`{original}
- Held aside: {lineage['held_aside_cases']} reviewed cases, used by neither version for training
- Dice on the held-aside cases: before {lineage['dice_before']:.4f}, after {lineage['dice_after']:.4f}
"""
    card.write_text(card.read_text() + section)
