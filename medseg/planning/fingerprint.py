"""Dataset fingerprint: what the planner and the doctor need to know about a dataset, measured once.

Per case (``CaseFingerprint``): spatial shape (array order), spacing (array order, mm) and whether the file states
one, channels, dtype, modality hint, intensity statistics over the whole image and inside the foreground
(percentiles 0.5 / 99.5, mean, std), voxels per raw mask value (the file's values: the fingerprint does not depend
on ``data.label_map``, which the planner may infer from it), and per mask value the connected components: count,
median size (voxels) and median *thickness*. A component's thickness is twice the
largest distance from its inside to its border (``2 * max(EDT)``): a nucleus 14 px across is 14 px thick, a
membrane 5 px wide is 5 px thick however long it is. The planner keeps the thinnest class resolvable when it
rescales.

Dataset level (``Fingerprint``): the cases, and the foreground intensity distribution pooled over cases (nnU-Net's
CT normalisation takes its clip range and z-score from it): percentiles 0.5 / 99.5, mean, std.

Cost is bounded: at most ``max_cases`` cases (spread evenly over the list) are read; each contributes at most
``FOREGROUND_SAMPLES`` foreground voxels to the pooled statistics and its global statistics come from at most
``GLOBAL_SAMPLES`` voxels. Unreadable cases are listed in ``problems`` (one line each), not fatal: the doctor
reports them, training reports them when it reads the case.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.data.datalist import Case
from medseg.errors import MedsegError
from medseg.io import Scan, read_mask, read_scan
from medseg.io.writers import write_text_atomic

log = logging.getLogger("medseg")

FOREGROUND_SAMPLES = 10_000  # per case, as nnU-Net
GLOBAL_SAMPLES = 200_000
FINGERPRINT_VERSION = 1


@dataclass
class IntensityStats:
    p005: float  # 0.5th percentile
    p995: float  # 99.5th percentile
    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: np.ndarray) -> IntensityStats | None:
        if values.size == 0:
            return None
        v = values.astype(np.float64, copy=False)
        lo, hi = np.percentile(v, (0.5, 99.5))
        return cls(float(lo), float(hi), float(v.mean()), float(v.std()), float(v.min()), float(v.max()))


@dataclass
class ObjectStats:
    """Connected components of one class in one case (8-/26-connectivity)."""

    count: int
    median_voxels: float
    median_thickness: float  # voxels, at the case's native grid (2 * max distance to the component's border)


@dataclass
class CaseFingerprint:
    id: str
    shape: tuple[int, ...]  # spatial, array order (z, y, x) or (y, x)
    spacing: tuple[float, ...]  # mm, array order
    spacing_stated: bool  # the file states a physical spacing (PNG/JPEG without one: False)
    channels: int
    dtype: str
    modality: str | None  # DICOM Modality; else None
    intensity: IntensityStats | None
    foreground_intensity: IntensityStats | None
    mask_values: dict[int, int]  # raw mask value -> voxels
    objects: dict[int, ObjectStats]  # per raw mask value present in this case (background too)
    has_mask: bool = True

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def empty(self) -> bool:
        """Labeled, but no foreground voxel."""
        return self.has_mask and not any(v for k, v in self.mask_values.items() if k != 0)

    @property
    def side(self) -> float:
        """Geometric-mean side in voxels (in-plane for volumes is not meant: all axes)."""
        return float(np.prod(self.shape)) ** (1.0 / len(self.shape))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mask_values"] = {str(k): v for k, v in self.mask_values.items()}
        d["objects"] = {str(k): asdict(v) for k, v in self.objects.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseFingerprint:
        return cls(
            id=d["id"], shape=tuple(d["shape"]), spacing=tuple(d["spacing"]), spacing_stated=d["spacing_stated"],
            channels=d["channels"], dtype=d["dtype"], modality=d.get("modality"),
            intensity=IntensityStats(**d["intensity"]) if d.get("intensity") else None,
            foreground_intensity=IntensityStats(**d["foreground_intensity"]) if d.get("foreground_intensity") else None,
            mask_values={int(k): int(v) for k, v in d["mask_values"].items()},
            objects={int(k): ObjectStats(**v) for k, v in d["objects"].items()},
            has_mask=d.get("has_mask", True),
        )


@dataclass
class Fingerprint:
    """What the planner decides from. ``cases`` holds the read (sampled) cases; ``n_cases`` counts all."""

    n_cases: int
    cases: list[CaseFingerprint]
    foreground_intensity: IntensityStats | None  # pooled over cases
    problems: list[str] = field(default_factory=list)
    version: int = FINGERPRINT_VERSION

    # ------------------------------------------------------------------------------------------ summary
    @property
    def ndim(self) -> int:
        dims = {c.ndim for c in self.cases}
        if len(dims) != 1:
            raise MedsegError(f"the dataset mixes 2D images and 3D volumes ({sorted(dims)}); train them separately")
        return dims.pop()

    @property
    def shapes(self) -> np.ndarray:
        return np.array([c.shape for c in self.cases], dtype=np.float64)

    @property
    def spacings(self) -> np.ndarray:
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    @property
    def median_shape(self) -> tuple[int, ...]:
        return tuple(int(round(v)) for v in np.median(self.shapes, axis=0))

    @property
    def median_spacing(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.median(self.spacings, axis=0))

    @property
    def spacing_stated(self) -> bool:
        """Most cases state a physical spacing."""
        return sum(c.spacing_stated for c in self.cases) * 2 > len(self.cases)

    @property
    def channels(self) -> set[int]:
        return {c.channels for c in self.cases}

    @property
    def modality(self) -> str | None:
        """The most common DICOM modality, or a hint from the data (``CT`` for Hounsfield-like ranges,
        ``photo`` for 8-bit RGB), or None."""
        stated = [c.modality for c in self.cases if c.modality]
        if stated:
            return max(set(stated), key=stated.count)
        if self.looks_like_ct:
            return "CT"
        if self.channels == {3} and all(c.dtype == "uint8" for c in self.cases):
            return "photo"  # 8-bit colour: camera, endoscopy, microscopy
        return None

    @property
    def looks_like_ct(self) -> bool:
        """Signed volumes whose minimum sits near air (-1024 HU) and maximum above soft tissue."""
        vols = [c for c in self.cases if c.ndim == 3 and c.intensity is not None]
        if not vols or len(vols) * 2 < len(self.cases):
            return False
        lows = np.median([c.intensity.min for c in vols])
        highs = np.median([c.intensity.max for c in vols])
        return -1100 <= lows <= -500 and highs >= 300

    def mask_values(self) -> list[int]:
        """Every raw value found in the read masks."""
        return sorted({k for c in self.cases for k in c.mask_values})

    def foreground_fraction(self) -> float:
        """Median over labeled cases of the share of voxels whose mask value is not 0."""
        fr = [1 - c.mask_values.get(0, 0) / max(1, sum(c.mask_values.values())) for c in self.cases if c.has_mask]
        return float(np.median(fr)) if fr else 0.0

    def thinnest_structure(self) -> tuple[int, float] | None:
        """(raw mask value, median thickness in voxels at the native grid) of the value whose components are
        thinnest (median over cases of each case's median), or None without objects."""
        best: tuple[int, float] | None = None
        for k in sorted({k for c in self.cases for k in c.objects}):
            t = [c.objects[k].median_thickness for c in self.cases if k in c.objects]
            value = float(np.median(t))
            if best is None or value < best[1]:
                best = (k, value)
        return best

    def case_thickness(self, k: int) -> dict[str, float]:
        return {c.id: c.objects[k].median_thickness for c in self.cases if k in c.objects}

    # --------------------------------------------------------------------------------------------- json
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "n_cases": self.n_cases,
            "foreground_intensity": asdict(self.foreground_intensity) if self.foreground_intensity else None,
            "problems": list(self.problems),
            "summary": self.summary(),
            "cases": [c.to_dict() for c in self.cases],
        }

    def summary(self) -> dict[str, Any]:
        """A few dataset-level numbers (also what a bundle keeps to check later scans against)."""
        if not self.cases:
            return {}
        shapes, spacings = self.shapes, self.spacings
        return {
            "ndim": int(shapes.shape[1]),
            "n_read": len(self.cases),
            "shape_min": [int(v) for v in shapes.min(0)],
            "shape_median": list(self.median_shape),
            "shape_max": [int(v) for v in shapes.max(0)],
            "spacing_min": [float(v) for v in spacings.min(0)],
            "spacing_median": list(self.median_spacing),
            "spacing_max": [float(v) for v in spacings.max(0)],
            "spacing_stated": self.spacing_stated,
            "channels": sorted(self.channels),
            "dtypes": sorted({c.dtype for c in self.cases}),
            "modality": self.modality,
            "intensity_p005_median": _median([c.intensity.p005 for c in self.cases if c.intensity]),
            "intensity_p995_median": _median([c.intensity.p995 for c in self.cases if c.intensity]),
            "foreground_fraction_median": self.foreground_fraction(),
            "empty_masks": sum(c.empty for c in self.cases),
        }

    def save(self, path: Path) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> Fingerprint:
        d = json.loads(Path(path).read_text())
        return cls(
            n_cases=d["n_cases"], cases=[CaseFingerprint.from_dict(c) for c in d["cases"]],
            foreground_intensity=IntensityStats(**d["foreground_intensity"]) if d.get("foreground_intensity") else None,
            problems=list(d.get("problems", [])),
            version=d.get("version", FINGERPRINT_VERSION),
        )


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if len(values) else None


# ------------------------------------------------------------------------------------------- measuring


def sample_cases(cases: Sequence[Case], max_cases: int | None) -> list[Case]:
    """At most ``max_cases`` cases, spread evenly over the list (first and last included)."""
    if max_cases is None or len(cases) <= max_cases:
        return list(cases)
    return [cases[i] for i in np.linspace(0, len(cases) - 1, max_cases).round().astype(int)]


def _subsample(values: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if values.size <= n:
        return values
    return values[rng.integers(0, values.size, n)]  # with replacement: a permutation of millions costs more


def object_stats(label: np.ndarray, k: int) -> ObjectStats | None:
    """Connected components of class ``k`` in a label map (full connectivity)."""
    binary = label == k
    if not binary.any():
        return None
    structure = ndimage.generate_binary_structure(binary.ndim, binary.ndim)
    components, n = ndimage.label(binary, structure=structure)
    sizes = np.bincount(components.ravel())[1:]
    # One EDT for the whole class: inside a component the distance to the nearest non-class voxel is the
    # distance to its own border (components of one class never touch: they would be one component).
    edt = ndimage.distance_transform_edt(binary)
    peak = [float(edt[box][components[box] == i + 1].max()) for i, box in enumerate(ndimage.find_objects(components))]
    return ObjectStats(int(n), float(np.median(sizes)), float(np.median(2.0 * np.asarray(peak))))


MAX_MASK_VALUES = 64  # more distinct values: not a label map (a JPEG-compressed mask, a probability map)


def fingerprint_case(case: Case, rng: np.random.Generator, scan: Scan | None = None) -> tuple[CaseFingerprint, np.ndarray]:
    """Read one case (image and mask) and measure it: (fingerprint, sample of up to ``FOREGROUND_SAMPLES``
    foreground intensities for the pooled statistics). Raises MedsegError when it cannot be read."""
    scan = scan if scan is not None else read_scan(case.image)
    image = scan.channels_first()  # (C, *spatial)
    flat = image.reshape(image.shape[0], -1)
    intensity = IntensityStats.of(_subsample(flat.ravel(), GLOBAL_SAMPLES, rng))
    mask_values: dict[int, int] = {}
    objects: dict[int, ObjectStats] = {}
    fg_stats = None
    fg_sample = np.empty(0, dtype=np.float32)
    has_mask = case.mask is not None
    if has_mask:
        label = read_mask(case.mask).array
        if label.shape != scan.spatial_shape:
            raise MedsegError(f"{case.mask.name}: mask shape {label.shape} != image shape {scan.spatial_shape}")
        values, counts = np.unique(label, return_counts=True)
        if len(values) > MAX_MASK_VALUES:
            raise MedsegError(f"{case.mask.name}: mask holds {len(values)} different values, not a label map "
                              "(a JPEG-compressed mask?); save masks as PNG/NIfTI with one value per class")
        mask_values = {int(k): int(v) for k, v in zip(values, counts, strict=True)}
        fg = label.ravel() != 0
        if fg.any():
            fg_values = flat[:, fg].mean(axis=0) if flat.shape[0] > 1 else flat[0, fg]
            fg_sample = _subsample(fg_values, FOREGROUND_SAMPLES, rng).astype(np.float32)
            fg_stats = IntensityStats.of(fg_sample)
        for k in sorted(mask_values):  # value 0 too: in ISBI-style data the background is the thin membrane
            stats = object_stats(label, k)
            if stats is not None:
                objects[k] = stats
    fp = CaseFingerprint(
        id=case.id,
        shape=tuple(int(s) for s in scan.spatial_shape),
        spacing=tuple(float(s) for s in scan.geometry.spacing_zyx),
        spacing_stated=bool(scan.meta.get("spacing_from_file", scan.is_volume or scan.meta.get("format") == "dicom")),
        channels=int(image.shape[0]),
        dtype=str(scan.array.dtype),
        modality=scan.meta.get("modality"),
        intensity=intensity,
        foreground_intensity=fg_stats,
        mask_values=mask_values,
        objects=objects,
        has_mask=has_mask,
    )
    return fp, fg_sample


def compute_fingerprint(
    cases: Sequence[Case],
    *,
    max_cases: int | None = 300,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Fingerprint:
    """Fingerprint ``cases`` (at most ``max_cases`` of them read, evenly spread). Unreadable cases become
    one-line ``problems``; if none can be read, MedsegError. Independent of the config."""
    chosen = sample_cases(cases, max_cases)
    rng = np.random.default_rng(seed)
    read: list[CaseFingerprint] = []
    problems: list[str] = []
    pooled: list[np.ndarray] = []
    for i, case in enumerate(chosen):
        try:
            fp, fg_sample = fingerprint_case(case, rng)
        except MedsegError as e:
            problems.append(str(e))
            continue
        except MemoryError:
            problems.append(f"{case.image.name}: too large to fingerprint in memory")
            continue
        read.append(fp)
        if fg_sample.size:
            pooled.append(fg_sample)
        if progress is not None:
            progress(i + 1, len(chosen))
    if not read:
        raise MedsegError(f"no case could be read for the fingerprint: {problems[0] if problems else 'no cases'}")
    fg = IntensityStats.of(np.concatenate(pooled)) if pooled else None
    return Fingerprint(len(cases), read, fg, problems)


def summary_lines(fp: Fingerprint) -> list[str]:
    """Human-readable lines (for `medseg plan`)."""
    s = fp.summary()
    lines = [
        f"{fp.n_cases} cases ({s['n_read']} read), {s['ndim']}D, channels {s['channels']}, dtypes {s['dtypes']}",
        f"shape min/median/max {tuple(s['shape_min'])} / {tuple(s['shape_median'])} / {tuple(s['shape_max'])}",
        f"spacing median {tuple(round(v, 3) for v in s['spacing_median'])}"
        + ("" if s["spacing_stated"] else " (not stated by the files: pixels)"),
        f"modality {s['modality'] or 'unknown'}; median foreground fraction {100 * s['foreground_fraction_median']:.1f}%;"
        f" empty masks {s['empty_masks']}",
    ]
    thin = fp.thinnest_structure()
    if thin is not None:
        lines.append(f"mask values {fp.mask_values()}; thinnest structure: value {thin[0]}, median thickness "
                     f"{thin[1]:.1f} voxels")
    if fp.problems:
        lines.append(f"{len(fp.problems)} unreadable case(s): {fp.problems[0]}")
    return lines
