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
import logging
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medseg.config import ExperimentConfig, config_to_yaml, validate_config
from medseg.errors import BundleError
from medseg.io.overlay import default_color
from medseg.io.writers import fsync_dir

HEX_COLOUR = re.compile(r"#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})")
RESEARCH_NOTICE = "Research use only — not for diagnosis."
PERMISSION_HINT = "cannot read it (permission denied); the user running medseg needs read access to the whole bundle"
log = logging.getLogger(__name__)


def is_hex_colour(value: object) -> bool:
    """``#rrggbb`` or ``#rgb``: the only colours a bundle may give (they end up in the app's HTML and CSS)."""
    return isinstance(value, str) and HEX_COLOUR.fullmatch(value) is not None


def _saved_colour(index: int, spec: str | None) -> str:
    """A config colour as the ``#rrggbb`` a bundle stores: colour names are converted; anything unusable gets
    the default (with a warning), so the bundle saved at the end of a training run always loads."""
    default = default_color(index)
    if spec is None or is_hex_colour(spec):
        return spec or default
    from PIL import ImageColor

    try:
        return "#{:02x}{:02x}{:02x}".format(*ImageColor.getrgb(spec)[:3])
    except ValueError:
        log.warning("label %d: colour %r is not a colour; the bundle uses %s", index, spec[:40], default)
        return default


def label_table(cfg: ExperimentConfig) -> dict[int, dict[str, str]]:
    return {
        i: {"name": name, "color": _saved_colour(i, cfg.data.colors.get(i))}
        for i, name in sorted(cfg.data.labels.items())
    }


def _checked_labels(raw: Any, shown: str) -> dict[int, dict[str, str]]:
    """``labels.json`` as ``{index: {"name", "color"}}``; a name that is not text or a colour that is not
    ``#rrggbb``/``#rgb`` is a ``BundleError`` (a colour like ``red;position:fixed`` would style the app)."""
    if not isinstance(raw, dict):
        raise BundleError(f"{shown}/labels.json: does not hold an object of labels")
    labels = {}
    for key, value in raw.items():
        try:
            index = int(key)
        except ValueError:
            raise BundleError(f"{shown}/labels.json: label key {str(key)[:20]!r} is not a class index") from None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise BundleError(f"{shown}/labels.json: label {index} has no text name")
        colour = value.get("color")
        if not is_hex_colour(colour):
            raise BundleError(
                f"{shown}/labels.json: label {index} colour {str(colour)[:20]!r} is not #rrggbb or #rgb"
            )
        labels[index] = dict(value)
    return labels


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
        members = {}
        for p in self.member_files:
            try:
                members[p.stem] = load_file(str(p))
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a damaged or vanished file
                raise BundleError(f"{self.path.name}/weights/{p.name}: cannot read weights ({_one_line(e)})") from None
        return members

    @property
    def weights_hash(self) -> str:
        """SHA-256 over all member files (short form shown in the app and audit log)."""
        h = hashlib.sha256()
        for p in self.member_files:
            h.update(p.read_bytes())
        return h.hexdigest()[:16]


def _previous_copy(final: Path) -> Path:
    """Where ``_atomic_dir_write`` parks the bundle it replaces, for the moment between its two renames."""
    return final.with_name(f".{final.name}.old")


def _atomic_dir_write(final: Path, write: Any) -> Path:
    """Build the bundle in a sibling temp dir, then swap it in: a crash never leaves a half bundle.

    Replacing takes two renames (final -> .final.old, tmp -> final); a process killed between them leaves the
    complete previous bundle in ``.final.old``, which ``load_bundle`` falls back to.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    old = _previous_copy(final)
    try:
        write(tmp)
        if final.exists():
            if old.exists() and not _is_complete_bundle(old):
                shutil.rmtree(old, ignore_errors=True)
            if old.exists():  # a complete copy from an interrupted save: final is newer, drop the copy
                shutil.rmtree(old)
            final.rename(old)
            tmp.rename(final)
        else:
            tmp.rename(final)
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _is_complete_bundle(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.yaml", "labels.json", "preprocessing.json")) and any(
        (path / "weights").glob("*.safetensors")
    )


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
        # Readable by every user (mkdtemp made the folder 0700): a bundle is mounted into containers that run
        # as another user. Weights and metadata are not secret; they are checked, not executed.
        tmp.chmod(0o755)
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())

    return _atomic_dir_write(Path(out), write)


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle directory or .zip (extracted with medseg's safe-zip caps, into a temporary folder that is
    removed when the returned Bundle is garbage-collected or the interpreter exits).

    Every weights file's safetensors header is checked here, so a truncated or damaged file is a
    ``BundleError`` now rather than a failure at the first prediction.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        from medseg.errors import MedsegError
        from medseg.io.archive import extract_zip_safely

        try:
            root = extract_zip_safely(path)
        except MedsegError as e:
            raise BundleError(f"{path.name}: cannot open the bundle zip ({e})") from None
        try:
            inner = [p.parent for p in root.rglob("config.yaml")]
            if len(inner) != 1:
                raise BundleError(f"{path.name}: zip does not hold exactly one bundle (config.yaml)")
            bundle = _load_bundle_dir(inner[0], shown=path.name)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        weakref.finalize(bundle, shutil.rmtree, str(root), True)
        return bundle
    if not path.exists() and _is_complete_bundle(_previous_copy(path)):
        # A save was killed between its two renames: the previous bundle is complete in .NAME.old.
        log.warning("%s: using the previous bundle left by an interrupted save (%s)", path.name,
                    _previous_copy(path).name)
        return _load_bundle_dir(_previous_copy(path), shown=path.name)
    return _load_bundle_dir(path, shown=path.name)


def _require_readable(path: Path, shown: str) -> None:
    """``path`` (a folder: listable; a file: readable) or a ``BundleError`` that says it is a permission
    problem: a folder one cannot list otherwise looks empty, and an unreadable file missing or corrupt."""
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb"):
                pass
    except PermissionError:
        raise BundleError(f"{shown}: {PERMISSION_HINT}") from None


def _load_bundle_dir(path: Path, shown: str) -> Bundle:
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory or .zip")
    _require_readable(path, shown)
    for required in ("config.yaml", "labels.json", "preprocessing.json"):
        if not (path / required).is_file():
            raise BundleError(f"{shown}: incomplete bundle, {required} is missing")
        _require_readable(path / required, f"{shown}/{required}")
    for optional in ("calibration.json", "model_card.md"):
        if (path / optional).is_file():
            _require_readable(path / optional, f"{shown}/{optional}")
    if (path / "weights").is_dir():
        _require_readable(path / "weights", f"{shown}/weights")
    members = sorted((path / "weights").glob("*.safetensors"))
    if not members:
        raise BundleError(f"{shown}: bundle has no weights/*.safetensors")
    for member in members:
        _require_readable(member, f"{shown}/weights/{member.name}")
        try:
            with safe_open(str(member), framework="pt") as f:  # parses and bounds-checks the header only
                f.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends: damaged or truncated
            raise BundleError(f"{shown}/weights/{member.name}: corrupt weights file ({_one_line(e)})") from None
    try:
        raw_cfg = yaml.safe_load((path / "config.yaml").read_text())
        _check_size(raw_cfg, "config.yaml")
        labels_raw = json.loads((path / "labels.json").read_text())
        prep = json.loads((path / "preprocessing.json").read_text())
        calib_file = path / "calibration.json"
        calibration = json.loads(calib_file.read_text()) if calib_file.is_file() else None
        if not isinstance(prep, dict) or not (calibration is None or isinstance(calibration, dict)):
            raise ValueError("preprocessing.json/calibration.json must hold a JSON object")
    except (ValueError, TypeError, AttributeError, RecursionError, yaml.YAMLError) as e:
        raise BundleError(f"{shown}: corrupt bundle metadata ({_one_line(e)})") from None
    if not isinstance(raw_cfg, dict):
        raise BundleError(f"{shown}: corrupt bundle metadata (config.yaml does not hold a mapping)")
    labels = _checked_labels(labels_raw, shown)
    cfg = validate_config(raw_cfg, f"{shown}/config.yaml")
    card = (path / "model_card.md").read_text(errors="replace") if (path / "model_card.md").is_file() else ""
    return Bundle(path, cfg, labels, prep, members, calibration, card)


# A config has a few hundred values; YAML aliases can make a small file expand to billions (a "billion laughs"),
# which would hang whatever walks the config later (JSON dumps, the app's display).
MAX_CONFIG_NODES = 100_000


def _check_size(obj: Any, name: str) -> None:
    count, stack = 0, [obj]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ValueError(f"{name} expands to more than {MAX_CONFIG_NODES:,} values (YAML alias bomb?)")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _one_line(err: BaseException) -> str:
    """A library message on one line, without directories (bundles may sit in folders named after people)."""
    text = " ".join(str(err).split())
    return re.sub(r"(?:/[^\s\"'/:]+)+/([^\s\"'/:]+)", r"\1", text)


def find_bundles(folder: Path) -> list[Path]:
    """Bundle directories (or .zip files) directly inside ``folder`` or one level down."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {p.parent for p in folder.glob("*/config.yaml")} | {p.parent for p in folder.glob("*/*/config.yaml")}
    found |= set(folder.glob("*.zip"))
    return sorted(p for p in found if not p.name.startswith("."))
