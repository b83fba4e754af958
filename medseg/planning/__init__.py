"""Planning from the data: a dataset fingerprint (`fingerprint`), a device profile (`device`) and the planner
(`planner`) that turns both, and a wall-clock budget, into every data-dependent config value (`plan_run`)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from medseg.config import ExperimentConfig
from medseg.data.datalist import Case
from medseg.io.writers import write_text_atomic
from medseg.planning.device import DeviceProfile, cpu_profile, detect_device, gpu_profile
from medseg.planning.fingerprint import Fingerprint, compute_fingerprint, summary_lines
from medseg.planning.planner import Plan, apply_plan, explicit_keys, plan_experiment

__all__ = [
    "DeviceProfile", "Fingerprint", "Plan", "PlannedRun", "apply_plan", "compute_fingerprint", "cpu_profile",
    "detect_device", "explicit_keys", "fingerprint_for", "gpu_profile", "plan_experiment", "plan_run", "summary_lines",
]

log = logging.getLogger("medseg")


@dataclass
class PlannedRun:
    cfg: ExperimentConfig  # the config with the plan applied
    plan: Plan
    applied: set[str]  # planned keys that took effect (the others were set by the user)
    explicit: set[str]  # keys the user set
    fingerprint: Fingerprint


def _cases_key(cases: list[Case], cfg: ExperimentConfig) -> str:
    h = hashlib.sha256()
    for c in cases:
        h.update(f"{c.id}|{c.image}|{c.mask}\n".encode())
    return h.hexdigest()[:16]


def fingerprint_for(cases: list[Case], cfg: ExperimentConfig, out_dir: Path | None = None,
                    max_cases: int | None = 300) -> Fingerprint:
    """The fingerprint of ``cases``; reused from ``out_dir/fingerprint.json`` when it was made for the same cases
    (cross-validation folds, resumed runs), else computed and saved there."""
    key = _cases_key(cases, cfg)
    path = Path(out_dir) / "fingerprint.json" if out_dir is not None else None
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("cases_key") == key:
                return Fingerprint.load(path)
        except (ValueError, KeyError, TypeError):
            pass  # damaged or old: compute again
    log.info("fingerprinting %d cases", min(len(cases), max_cases or len(cases)))
    fp = compute_fingerprint(cases, max_cases=max_cases, seed=cfg.data.split_seed)
    if path is not None:
        fp.save(path)
        data = json.loads(path.read_text())
        data["cases_key"] = key
        path.write_text(json.dumps(data, indent=1))
    return fp


def plan_run(
    cfg: ExperimentConfig,
    cases: list[Case],
    out_dir: Path | None = None,
    device: DeviceProfile | None = None,
    explicit: set[str] | None = None,
    n_train: int | None = None,
    max_cases: int | None = 300,
) -> PlannedRun:
    """Fingerprint ``cases``, plan for ``device`` (default: the one training will use) within
    ``cfg.train.budget_minutes``, apply the plan to the keys the user did not set; write ``plan.yaml`` and
    ``fingerprint.json`` into ``out_dir``."""
    explicit = explicit_keys(cfg) if explicit is None else explicit
    fp = fingerprint_for(cases, cfg, out_dir, max_cases)
    device = device or detect_device(cfg.train.accelerator, cfg.model.encoder)
    plan = plan_experiment(fp, cfg, device, cfg.train.budget_minutes, n_train, explicit)
    planned, applied = apply_plan(cfg, plan, explicit)
    if out_dir is not None:
        write_plan(plan, applied, Path(out_dir))
    return PlannedRun(planned, plan, applied, explicit, fp)


def write_plan(plan: Plan, applied: set[str], out_dir: Path) -> Path:
    return write_text_atomic(Path(out_dir) / "plan.yaml", plan.to_yaml(applied))
