"""Does this scan look like what the model was trained on? Plain-language problems, checked before a model runs.

A bundle records a summary of its training data (``preprocessing["training_fingerprint"]``, see
``medseg.planning.fingerprint.Fingerprint.summary``) and its planned config (``bundle.config.data``). A scan that
differs in kind (2D vs 3D, colour vs grey, CT vs MR, a very different intensity range, pixel size or image size)
still gets a mask, but that mask means little: an RGB nuclei model "found" 1.1 L of nuclei in an abdominal CT.
The app, the CLI and the service therefore refuse such a scan unless the user explicitly says "run anyway", and
record that they did.

Only coarse, confident checks: a scan inside the training data's range is never flagged, and margins are wide
(a factor of 2-8 beyond the training extremes) so ordinary variation between scanners passes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.config import DataConfig, Intensity
from medseg.errors import MedsegError
from medseg.io import Scan

SPACING_FACTOR = 2.0  # beyond half the finest / twice the coarsest training spacing
SMALL_FACTOR = 2.0  # a side below half of the smallest training image's
LARGE_FACTOR = 8.0  # a side above 8x the largest training image's (tiling copes with large images, up to a point)
INTENSITY_SPANS = 3.0  # percentiles more than 3 training spans beyond the training percentiles
NEGATIVE_SPAN = 0.25  # ... or clearly negative (a quarter span below 0) where every training scan was non-negative
EIGHT_BIT = ("uint8", "int8", "bool")
# Few epochs or a low validation Dice: shown as a warning next to the model's name.
FEW_EPOCHS = 5
LOW_DICE = 0.5


@dataclass(frozen=True)
class Compatibility:
    """``problems``: one sentence each, for the user; empty when the scan fits the model."""

    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        return " ".join(self.problems)


def _kind(ndim: int) -> str:
    return "3D volumes" if ndim == 3 else "2D images"


def _sides(shape: Any) -> str:
    return " × ".join(str(int(v)) for v in shape)


def _scan_percentiles(scan: Scan) -> tuple[float, float]:
    # A strided sample: the percentiles of a few per cent of the voxels, in well under a second.
    array = scan.array
    sample = array[::2, ::4, ::4] if scan.is_volume else array[::2, ::2]
    low, high = np.percentile(sample.astype(np.float32, copy=False), (0.5, 99.5))
    return float(low), float(high)


def check_scan(scan: Scan, fingerprint: Mapping[str, Any] | None, data: DataConfig | None = None) -> Compatibility:
    """Problems with running a model trained on ``fingerprint`` (and planned as ``data``) on ``scan``.

    ``fingerprint``: the bundle's ``preprocessing["training_fingerprint"]``; None or {} (a bundle from before the
    planning work) checks only what the planned config says."""
    fp = dict(fingerprint or {})
    problems: list[str] = []
    modality = str(scan.meta.get("modality") or "").upper()
    trained_modality = str(fp.get("modality") or "")

    ndim = int(fp.get("ndim") or 0)
    scan_ndim = 3 if scan.is_volume else 2
    if ndim and ndim != scan_ndim:
        problems.append(f"The model was trained on {_kind(ndim)}; this scan is a {_kind(scan_ndim)[:-1]}.")

    channels = [int(c) for c in fp.get("channels") or []]
    if channels and scan.channels not in channels:
        trained = " or ".join("colour (RGB)" if c == 3 else "grey" if c == 1 else f"{c}-channel" for c in channels)
        shown = "colour (RGB)" if scan.channels == 3 else "grey" if scan.channels == 1 else f"{scan.channels}-channel"
        problems.append(f"The model was trained on {trained} images; this scan is {shown}.")

    # "photo" is the fingerprint's guess for 8-bit colour data; a DICOM modality is a statement.
    if trained_modality and trained_modality != "photo" and modality and modality != trained_modality.upper():
        problems.append(f"The model was trained on {trained_modality} scans; this scan is {modality}.")
    elif data is not None and data.intensity == Intensity.ct_window and modality and modality != "CT":
        problems.append(f"The model expects CT (Hounsfield units, CT window); this scan is {modality}.")

    problems += _intensity_problems(scan, fp)
    problems += _spacing_problems(scan, fp, ndim == scan_ndim)
    problems += _size_problems(scan, fp, ndim == scan_ndim)
    return Compatibility(tuple(problems))


def _intensity_problems(scan: Scan, fp: Mapping[str, Any]) -> list[str]:
    low_t, high_t = fp.get("intensity_p005_median"), fp.get("intensity_p995_median")
    if low_t is None or high_t is None:
        return []
    dtypes = set(fp.get("dtypes") or [])
    if dtypes and dtypes <= set(EIGHT_BIT):
        low_t, high_t = 0.0, 255.0  # 8-bit training data: anything 8-bit is in range
    span = max(float(high_t) - float(low_t), 1.0)
    low, high = _scan_percentiles(scan)
    # Training data without negative values (MR, microscopy) against a scan well below zero (CT in HU): as telling.
    negative = float(low_t) >= 0 and low < -NEGATIVE_SPAN * span
    if negative or low < float(low_t) - INTENSITY_SPANS * span or high > float(high_t) + INTENSITY_SPANS * span:
        return [f"Its intensities ({low:.4g} to {high:.4g}) are far outside the training scans' ({float(low_t):.4g} to "
                f"{float(high_t):.4g}): a different kind of scan, or another unit."]
    return []


def _spacing_problems(scan: Scan, fp: Mapping[str, Any], same_ndim: bool) -> list[str]:
    if not (same_ndim and fp.get("spacing_stated") and fp.get("spacing_min") and fp.get("spacing_max")):
        return []
    if not scan.is_volume and not scan.meta.get("spacing_from_file", True):
        return []  # the file states no pixel size: nothing to compare
    spacing = [float(s) for s in scan.geometry.spacing_zyx]
    lo, hi = [float(v) for v in fp["spacing_min"]], [float(v) for v in fp["spacing_max"]]
    if len(lo) != len(spacing):
        return []
    if any(s < a / SPACING_FACTOR or s > b * SPACING_FACTOR for s, a, b in zip(spacing, lo, hi, strict=True)):
        fmt = lambda v: " × ".join(f"{x:.2g}" for x in v)  # noqa: E731
        return [f"Its voxel size ({fmt(spacing)} mm) is far from the training scans' ({fmt(lo)} to {fmt(hi)} mm)."]
    return []


def _size_problems(scan: Scan, fp: Mapping[str, Any], same_ndim: bool) -> list[str]:
    if not (same_ndim and fp.get("shape_min") and fp.get("shape_max")):
        return []
    shape = [int(v) for v in scan.spatial_shape]
    lo, hi = [int(v) for v in fp["shape_min"]], [int(v) for v in fp["shape_max"]]
    if len(lo) != len(shape):
        return []
    if any(s < a / SMALL_FACTOR for s, a in zip(shape, lo, strict=True)):
        return [f"It is much smaller ({_sides(shape)}) than any training scan (smallest {_sides(lo)})."]
    if any(s > b * LARGE_FACTOR for s, b in zip(shape, hi, strict=True)):
        return [f"It is much larger ({_sides(shape)}) than any training scan (largest {_sides(hi)})."]
    return []


def training_quality(epochs: int | None, val_dice: float | None) -> str:
    """A short warning for a barely trained model ("trained 2 epochs, val Dice 0.12"), or "" when it looks
    trained (or nothing is known)."""
    weak = (epochs is not None and epochs < FEW_EPOCHS) or (val_dice is not None and val_dice < LOW_DICE)
    if not weak:
        return ""
    parts = []
    if epochs is not None:
        parts.append(f"trained {epochs} epoch{'s' if epochs != 1 else ''}")
    if val_dice is not None:
        parts.append(f"val Dice {val_dice:.2f}")
    return "Barely trained: " + ", ".join(parts)


_CARD_DICE = re.compile(r"^\|\s*val Dice([^|]*)\|\s*([0-9]*\.?[0-9]+)\s*\|", re.M)


def card_val_dice(model_card: str) -> float | None:
    """The validation Dice a model card states: the foreground-mean row of the shipped model when there is one,
    else the first ``val Dice`` row; None when the card states none."""
    rows = [(label, float(value)) for label, value in _CARD_DICE.findall(model_card or "")]
    for label, value in rows:
        if "mean" in label and "shipped" in label:
            return value
    return rows[0][1] if rows else None


def bundle_quality(bundle: Any) -> str:
    """``training_quality`` for a loaded ``medseg.bundle.Bundle`` (its planned epochs, its card's val Dice)."""
    epochs = getattr(getattr(bundle.config, "train", None), "epochs", None)
    return training_quality(int(epochs) if epochs is not None else None, card_val_dice(bundle.model_card))


class IncompatibleScanError(MedsegError):
    """A scan that does not look like the model's training data, refused because "run anyway" was not given."""
