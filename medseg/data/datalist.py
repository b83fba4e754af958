"""Find (image, mask[, instances]) cases: by file stem in images/ + masks/ folders, or from a CSV/JSON datalist."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from medseg.errors import DatasetError
from medseg.io.formats import SCAN_SUFFIXES

# SCAN_SUFFIXES: single-file scans; DICOM series are folders (one case per sub-folder).


def scan_stem(path: Path) -> str:
    """File name without its scan suffix (``a.nii.gz`` -> ``a``); folders keep their name."""
    name = path.name
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() else name


def _is_scan(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    return path.is_dir() or any(path.name.lower().endswith(s) for s in SCAN_SUFFIXES)


@dataclass(frozen=True)
class Case:
    """One labeled (or unlabeled) example. ``id`` is the file stem: never patient data by construction."""

    id: str
    image: Path
    mask: Path | None = None
    instances: Path | None = None
    group: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {k: (str(v) if v is not None else None) for k, v in asdict(self).items()}


def _index_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if _is_scan(p):
            stem = scan_stem(p)
            if stem in found:
                raise DatasetError(f"{folder}: two files share the stem {stem!r} ({found[stem].name}, {p.name})")
            found[stem] = p
    return found


def discover_cases(
    root: Path,
    images_dir: str = "images",
    masks_dir: str = "masks",
    instances_dir: str | None = None,
    require_masks: bool = True,
) -> list[Case]:
    """Pair ``root/images/<stem>.*`` with ``root/masks/<stem>.*`` (and instance maps when asked)."""
    root = Path(root)
    img_folder = root / images_dir
    if not img_folder.is_dir():
        raise DatasetError(f"{root}: no {images_dir}/ folder (expected {images_dir}/ and {masks_dir}/ with matching stems)")
    images = _index_by_stem(img_folder)
    if not images:
        raise DatasetError(f"{img_folder}: empty dataset (no supported scans found)")
    masks = _index_by_stem(root / masks_dir) if (root / masks_dir).is_dir() else {}
    instances = _index_by_stem(root / instances_dir) if instances_dir and (root / instances_dir).is_dir() else {}
    if require_masks:
        missing = [images[s].name for s in images if s not in masks]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise DatasetError(
                f"{img_folder}: image without mask: {', '.join(missing[:3])}{more} — expected {root / masks_dir}/<same stem>.* "
                "(or set train.unlabeled.enabled: true to train on images without masks)"
            )
    return [Case(id=s, image=p, mask=masks.get(s), instances=instances.get(s)) for s, p in images.items()]


def read_datalist(path: Path, group_column: str | None = None) -> list[Case]:
    """Read an explicit datalist: CSV with columns ``image, mask[, instances, group, id]`` or a JSON list of
    such objects (MONAI-style ``{"training": [...]}`` also accepted). Relative paths resolve against the file.

    ``group_column`` names the column that keeps correlated images (same patient, same slide) in one fold;
    given explicitly, it must exist. Default: ``group`` when present."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            rows = data.get("training", data) if isinstance(data, dict) else data
        else:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path.name}: cannot read datalist ({e})") from None
    if not isinstance(rows, list) or not rows:
        raise DatasetError(f"{path.name}: empty dataset (datalist has no rows)")
    column = group_column or "group"
    if group_column is not None and not any(isinstance(r, dict) and group_column in r for r in rows):
        names = sorted({k for r in rows if isinstance(r, dict) for k in r})
        raise DatasetError(f"{path.name}: no column {group_column!r} (data.group_column); columns: {', '.join(names)}")
    cases = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("image"):
            raise DatasetError(f"{path.name}: row {i + 1} has no 'image' entry")

        def resolve(key: str, row: dict = row) -> Path | None:
            v = row.get(key)
            return (path.parent / v).resolve() if v else None

        image = resolve("image")
        assert image is not None
        cases.append(
            Case(
                id=str(row.get("id") or scan_stem(image)),
                image=image,
                mask=resolve("mask") or resolve("label"),
                instances=resolve("instances"),
                group=str(row[column]) if row.get(column) not in (None, "") else None,
            )
        )
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path.name}: case ids are not unique")
    return cases
