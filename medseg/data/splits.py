"""Seeded, grouped k-fold splits, saved as JSON and reused so every run and every fold sees the same cases."""

from __future__ import annotations

import json
import random
from pathlib import Path

from medseg.data.datalist import Case
from medseg.errors import DatasetError
from medseg.io.writers import write_text_atomic


def make_folds(cases: list[Case], folds: int, seed: int) -> list[list[str]]:
    """Assign case ids to ``folds`` folds. Cases sharing a ``group`` land in the same fold (correlated images
    never straddle train and val). Groups are shuffled with ``seed`` and dealt largest-first to the
    emptiest fold, which keeps folds balanced when groups differ in size."""
    if folds < 2:
        raise DatasetError(f"need at least 2 folds, got {folds}")
    groups: dict[str, list[str]] = {}
    for c in cases:
        groups.setdefault(c.group if c.group is not None else f"__case__{c.id}", []).append(c.id)
    if len(groups) < folds:
        raise DatasetError(f"{len(groups)} independent cases/groups cannot fill {folds} folds")
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    keys.sort(key=lambda k: -len(groups[k]))  # stable: ties keep the shuffled order
    out: list[list[str]] = [[] for _ in range(folds)]
    for k in keys:
        min(out, key=len).extend(groups[k])
    return [sorted(f) for f in out]


def load_or_make_splits(path: Path, cases: list[Case], folds: int, seed: int) -> list[list[str]]:
    """Reuse ``path`` when it matches these cases, fold count and seed; otherwise (re)write it."""
    ids = sorted(c.id for c in cases)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("seed") == seed and len(saved.get("folds", [])) == folds and sorted(
            i for f in saved["folds"] for i in f
        ) == ids:
            return saved["folds"]
    split = make_folds(cases, folds, seed)
    write_text_atomic(path, json.dumps({"seed": seed, "folds": split}, indent=1))  # DDP ranks may write at once
    return split


def train_val_ids(split: list[list[str]], fold: int) -> tuple[list[str], list[str]]:
    if not 0 <= fold < len(split):
        raise DatasetError(f"fold {fold} does not exist (have {len(split)} folds)")
    val = split[fold]
    train = [i for k, f in enumerate(split) if k != fold for i in f]
    return train, val
