"""Model bundles: everything a trained model needs to predict, in one directory (or a .zip of it).

```
bundle/
  model_card.md          what it segments, labels, data, metrics, intended use
  config.yaml            the resolved experiment config
  labels.json            {index: {"name", "color"}}
  preprocessing.json     channels, intensity, 2.5D context, input normalisation
  weights/*.safetensors  one file per ensemble member (folds, snapshots, SWA)
  calibration.json       softmax temperature fitted on out-of-fold predictions (optional)
```

Weights are safetensors and metadata JSON/YAML, so loading a bundle never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from medseg.config import ExperimentConfig, config_to_yaml, validate_config
from medseg.errors import BundleError

DEFAULT_COLORS = ["#000000", "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                  "#bcf60c", "#fabebe", "#008080", "#e6beff"]
RESEARCH_NOTICE = "Research use only — not for diagnosis."


def label_table(cfg: ExperimentConfig) -> dict[int, dict[str, str]]:
    return {
        i: {"name": name, "color": cfg.data.colors.get(i, DEFAULT_COLORS[i % len(DEFAULT_COLORS)])}
        for i, name in sorted(cfg.data.labels.items())
    }


@dataclass
class Bundle:
    path: Path
    config: ExperimentConfig
    labels: dict[int, dict[str, str]]
    preprocessing: dict[str, Any]
    member_files: list[Path]
    calibration: dict[str, Any] | None = None
    model_card: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    def load_members(self) -> dict[str, dict[str, torch.Tensor]]:
        """Ensemble members' state dicts, by member name (file stem)."""
        return {p.stem: load_file(str(p)) for p in self.member_files}

    @property
    def weights_hash(self) -> str:
        """SHA-256 over all member files (short form shown in the app and audit log)."""
        h = hashlib.sha256()
        for p in self.member_files:
            h.update(p.read_bytes())
        return h.hexdigest()[:16]


def _atomic_dir_write(final: Path, write: Any) -> Path:
    """Build the bundle in a sibling temp dir, then swap it in: a crash never leaves a half bundle."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_bundle(
    out: Path,
    cfg: ExperimentConfig,
    members: dict[str, dict[str, torch.Tensor]],
    preprocessing: dict[str, Any],
    model_card: str,
    calibration: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a bundle directory at ``out`` (replacing an existing one atomically). ``extra_files``:
    more text files by name (e.g. ``splits.json``, so ``medseg evaluate`` knows the validation cases)."""
    if not members:
        raise BundleError("a bundle needs at least one ensemble member")

    def write(tmp: Path) -> None:
        (tmp / "weights").mkdir()
        for name, state in members.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / "weights" / f"{name}.safetensors"))
        (tmp / "config.yaml").write_text(config_to_yaml(cfg))
        (tmp / "labels.json").write_text(json.dumps(label_table(cfg), indent=1))
        (tmp / "preprocessing.json").write_text(json.dumps(preprocessing, indent=1))
        (tmp / "model_card.md").write_text(model_card)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        if calibration is not None:
            (tmp / "calibration.json").write_text(json.dumps(calibration, indent=1))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())

    return _atomic_dir_write(Path(out), write)


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle directory or .zip (extracted with medseg's safe-zip caps)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        from medseg.io.archive import extract_zip_safely

        root = extract_zip_safely(path)
        inner = [p.parent for p in root.rglob("config.yaml")]
        if len(inner) != 1:
            raise BundleError(f"{path.name}: zip does not hold exactly one bundle (config.yaml)")
        path = inner[0]
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory or .zip")
    for required in ("config.yaml", "labels.json", "preprocessing.json"):
        if not (path / required).is_file():
            raise BundleError(f"{path.name}: incomplete bundle, {required} is missing")
    members = sorted((path / "weights").glob("*.safetensors"))
    if not members:
        raise BundleError(f"{path.name}: bundle has no weights/*.safetensors")
    try:
        cfg = validate_config(yaml.safe_load((path / "config.yaml").read_text()), f"{path.name}/config.yaml")
        labels = {int(k): v for k, v in json.loads((path / "labels.json").read_text()).items()}
        prep = json.loads((path / "preprocessing.json").read_text())
        calib_file = path / "calibration.json"
        calibration = json.loads(calib_file.read_text()) if calib_file.is_file() else None
    except (ValueError, yaml.YAMLError) as e:
        raise BundleError(f"{path.name}: corrupt bundle metadata ({e})") from None
    card = (path / "model_card.md").read_text() if (path / "model_card.md").is_file() else ""
    return Bundle(path, cfg, labels, prep, members, calibration, card)


def find_bundles(folder: Path) -> list[Path]:
    """Bundle directories (or .zip files) directly inside ``folder`` or one level down."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {p.parent for p in folder.glob("*/config.yaml")} | {p.parent for p in folder.glob("*/*/config.yaml")}
    found |= set(folder.glob("*.zip"))
    return sorted(p for p in found if not p.name.startswith("."))
