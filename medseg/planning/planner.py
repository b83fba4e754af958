"""The planner: ``plan_experiment(fingerprint, cfg, device, budget) -> Plan`` — every data-dependent default.

A `Plan` holds config keys (dotted paths, e.g. ``data.patch_size``) with a value and a one-line reason each. It is
applied only to keys the user's YAML and ``--set`` did not set (`apply_plan`), written as ``plan.yaml`` (only the
keys it sets, each with its reason as a comment) and travels in the bundle, so CLI, app and service preprocess
alike. Decisions, in order:

1. **Scale.** Volumes: target spacing = the median spacing per axis. 2.5D slices are taken along the
   lowest-resolution axis (largest spacing) when the data are anisotropic (ratio >= ``ANISOTROPY``, nnU-Net's
   threshold), else along array axis 0. 2D images that state a physical spacing: the median spacing. 2D images
   without one: native when their sizes are near-uniform (the 90th/10th percentile of the geometric-mean side within
   ``UNIFORM_SIZE_RATIO``) and not larger than the budget can see, otherwise each image is resized so its
   geometric-mean side is ``target_size`` with the aspect kept — the image frame is the only scale a photo carries,
   and it is available at prediction time too. ``target_size`` is what the device can train on within the budget,
   never more than the median image, and never so small that the thinnest labelled structure falls below
   ``MIN_THICKNESS`` pixels.
2. **Patch, batch, tile.** The patch is the median resampled image (multiples of 32), shrunk only as far as the
   device's throughput needs to give at least ``MIN_STEPS`` optimiser steps of a batch of at least ``MIN_BATCH``
   in the training share of the budget; batch ``PREFERRED_BATCH`` when it fits (more on a GPU, within memory).
   The inference tile covers the 90th-percentile image in one pass where it can.
3. **Intensity.** CT (DICOM modality or Hounsfield-like range): the dataset's pooled foreground 0.5-99.5
   percentiles as one fixed window (nnU-Net's CT scheme; the network standardises [0, 1] input itself). Everything
   else: per-image percentiles.
4. **Sampling.** Foreground-centred patches for ``foreground_share`` of the samples when patches do not cover the
   image: more for rarer foreground.
5. **Context.** 2.5D neighbours: +-1 slice for anisotropic volumes (neighbours far apart), +-2 otherwise.
6. **Schedule.** With a budget: epochs (validation rounds), patches per epoch and validation cases per round from
   the throughput, refined by a measured step time when training starts (`medseg.engine.budget`). Validation is held
   to ``VAL_SHARE`` of the budget; the final model is scored on every validation case.
7. **Weight-map sigma** (when ``loss.weight_map``): a quarter of the thinnest structure's thickness, 2-10 px.
8. **Cache**: in memory when the resampled dataset fits in ``CACHE_RAM_SHARE`` of RAM, else on disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import yaml

from medseg.config import ExperimentConfig, Intensity, Resample
from medseg.planning.device import TRAIN_BYTES_PER_PIXEL, DeviceProfile
from medseg.planning.fingerprint import Fingerprint

ANISOTROPY = 3.0
UNIFORM_SIZE_RATIO = 2.0
MIN_THICKNESS = 4.0  # pixels, thinnest structure after resizing
MIN_STEPS = 250
MIN_BATCH = 4
PREFERRED_BATCH = 8
MAX_GPU_BATCH = 32
STRIDE = 32  # encoder output stride: patches are multiples of it
TRAIN_SHARE = 0.80  # of the budget: the rest is fingerprint/caching, validation, the final evaluation and a margin
VAL_SHARE = 0.10
MAX_CPU_PATCH_PIXELS = 512 * 512  # without a budget, the largest patch a CPU run takes
MAX_GPU_PATCH_PIXELS = 1024 * 1024
MAX_TILE = 1024
CACHE_RAM_SHARE = 0.35
DEFAULT_ROUNDS = 10  # validation rounds (epochs) in a budgeted run


@dataclass
class PlanEntry:
    value: Any
    reason: str


@dataclass
class Plan:
    """Planned config keys in decision order; ``summary`` holds numbers for the table and the bundle."""

    entries: dict[str, PlanEntry] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # The user's config and the keys they set: later decisions build on the value that will be in force.
    cfg: ExperimentConfig | None = None
    explicit: set[str] = field(default_factory=set)

    def set(self, key: str, value: Any, reason: str) -> None:
        self.entries[key] = PlanEntry(_plain(value), reason)

    def get(self, key: str, default: Any = None) -> Any:
        """The value that will be in force: the user's when they set the key, else the planned one."""
        if key in self.explicit and self.cfg is not None:
            section, name = key.split(".", 1)
            return _plain(getattr(getattr(self.cfg, section), name))
        entry = self.entries.get(key)
        return entry.value if entry is not None else default

    def to_yaml(self, applied: set[str] | None = None) -> str:
        """``section:\\n  key: value  # reason`` for each key (only the applied ones when given); loadable as a
        config fragment."""
        lines = ["# medseg plan: data-dependent settings chosen from the dataset fingerprint; each line says why.",
                 "# Keys set in the experiment YAML or with --set win over these."]
        for note in self.notes:
            lines.append(f"# {note}")
        sections: dict[str, list[str]] = {}
        for key, e in self.entries.items():
            if applied is not None and key not in applied:
                continue
            section, name = key.split(".", 1) if "." in key else ("", key)
            value = yaml.safe_dump(e.value, default_flow_style=True, width=10_000).strip()
            if value.endswith("\n..."):
                value = value[: -len("\n...")]
            value = value.removesuffix("...").strip()
            sections.setdefault(section, []).append(f"  {name}: {value}  # {e.reason}")
        for section, rows in sections.items():
            lines.append(f"{section}:")
            lines.extend(rows)
        return "\n".join(lines) + "\n"

    def rows(self) -> list[tuple[str, str, str]]:
        return [(k, yaml.safe_dump(e.value, default_flow_style=True).strip().removesuffix("...").strip(), e.reason)
                for k, e in self.entries.items()]


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, StrEnum):
        return str(value)
    return value


def _round_to_stride(n: float, small: int = 128) -> int:
    """Multiple of STRIDE: rounded up for small sizes (cover the whole of a small image), nearest otherwise."""
    if n <= small:
        return int(max(STRIDE * 2, math.ceil(n / STRIDE) * STRIDE))
    return int(max(STRIDE * 2, round(n / STRIDE) * STRIDE))


@dataclass
class _Budget:
    minutes: float | None
    train_seconds: float | None  # training share of the budget


def _steps(budget: _Budget, device: DeviceProfile, batch: int, patch_px: float) -> float:
    assert budget.train_seconds is not None
    return budget.train_seconds * device.train_pixels_per_s / (batch * patch_px)


def fit_patch_and_batch(
    patch: tuple[int, int], device: DeviceProfile, budget: _Budget
) -> tuple[tuple[int, int], int, str]:
    """The largest patch (aspect kept, multiples of 32) up to ``patch`` and a batch that give at least MIN_STEPS
    optimiser steps in the budget's training time; GPU batches grow within memory. Returns (patch, batch, reason)."""
    h, w = patch
    if device.is_gpu:
        cap = MAX_GPU_PATCH_PIXELS
        mem_batch = int(0.5 * device.memory_bytes / (TRAIN_BYTES_PER_PIXEL / 2 * h * w))
        batch = int(max(2, min(MAX_GPU_BATCH, mem_batch)))
    else:
        cap = MAX_CPU_PATCH_PIXELS
        # Small patches: more of them per step (per-step overhead dominates below ~8 x 256² pixels on a CPU).
        batch = int(np.clip(PREFERRED_BATCH * 256 * 256 // (h * w), PREFERRED_BATCH if h * w <= 256 * 256 else MIN_BATCH,
                            MAX_GPU_BATCH))
    while h * w > cap and max(h, w) > 2 * STRIDE:
        h, w = _shrink(h, w)
    if budget.train_seconds is None:
        return (h, w), batch, f"median image {patch[0]}x{patch[1]}" + ("" if (h, w) == tuple(patch) else f", capped at {cap} px on this device")
    for b in ([batch] if batch <= MIN_BATCH else [batch, MIN_BATCH]):
        if _steps(budget, device, b, h * w) >= MIN_STEPS:
            return (h, w), b, (f"median image {patch[0]}x{patch[1]}; batch {b} gives ~{_steps(budget, device, b, h * w):.0f} "
                               f"steps in {budget.minutes:g} min")
    b = MIN_BATCH
    while _steps(budget, device, b, h * w) < MIN_STEPS and max(h, w) > 2 * STRIDE:
        h, w = _shrink(h, w)
    return (h, w), b, (f"median image {patch[0]}x{patch[1]} shrunk so batch {b} gets ~{_steps(budget, device, b, h * w):.0f} "
                       f"steps (>= {MIN_STEPS}) in {budget.minutes:g} min on {device.name}")


def _shrink(h: int, w: int) -> tuple[int, int]:
    """One step smaller, aspect kept: the longer side loses a stride."""
    if h >= w:
        nh = h - STRIDE
        return nh, max(2 * STRIDE, _round_to_stride(w * nh / h, small=0))
    nw = w - STRIDE
    return max(2 * STRIDE, _round_to_stride(h * nw / w, small=0)), nw


def _pixels_for_budget(device: DeviceProfile, budget: _Budget) -> float:
    """Patch pixels at which a MIN_BATCH batch gets exactly MIN_STEPS steps (inf without a budget)."""
    if budget.train_seconds is None:
        return float("inf")
    return budget.train_seconds * device.train_pixels_per_s / (MIN_STEPS * MIN_BATCH)


# ----------------------------------------------------------------------------------------------- plan


def resampled_shapes(fp: Fingerprint, plan: Plan) -> np.ndarray:
    """Every read case's spatial shape on the model grid under the plan's scale decisions, slice axis first for
    volumes: ``(n, ndim)``."""
    shapes = fp.shapes
    mode = plan.get("data.resample", "none")
    if mode == "spacing":
        shapes = shapes * fp.spacings / np.asarray(plan.get("data.target_spacing"), dtype=np.float64)
    elif mode == "size":
        side = np.prod(shapes, axis=1) ** (1.0 / shapes.shape[1])
        shapes = shapes * (float(plan.get("data.target_size")) / side)[:, None]
    if shapes.shape[1] == 3:
        axis = int(plan.get("data.slice_axis", 0))
        shapes = shapes[:, [axis] + [a for a in range(3) if a != axis]]
    return shapes


def plan_experiment(
    fp: Fingerprint,
    cfg: ExperimentConfig,
    device: DeviceProfile,
    budget_minutes: float | None = None,
    n_train: int | None = None,
    explicit: set[str] | None = None,
) -> Plan:
    """Plan every data-dependent key for ``fp`` on ``device`` within ``budget_minutes`` (None: no budget).
    ``n_train``: training cases (default: 4/5 of the dataset, the default fold split). ``explicit``: keys the user
    set (default: none); decisions that depend on an earlier one use the user's value for those."""
    plan = Plan(cfg=cfg, explicit=set(explicit or ()))
    n_train = n_train or max(1, round(fp.n_cases * (1 - 1 / max(2, cfg.data.folds))))
    budget = _Budget(budget_minutes, budget_minutes * 60 * TRAIN_SHARE if budget_minutes else None)
    plan.summary.update(device=device.describe(), budget_minutes=budget_minutes, n_cases=fp.n_cases, n_train=n_train)
    _plan_labels(fp, plan)
    if fp.ndim == 3:
        _plan_volume(fp, cfg, plan)
    else:
        _plan_image(fp, cfg, device, budget, plan)
    shapes = resampled_shapes(fp, plan)
    in_plane = shapes[:, -2:]
    slices = float(np.median(shapes[:, 0])) if fp.ndim == 3 else 1.0
    _plan_patch(device, budget, plan, in_plane)
    _plan_sampling(fp, plan, in_plane)
    if cfg.loss.weight_map:
        _plan_sigma(fp, plan)
    _plan_schedule(fp, cfg, device, budget, plan, n_train, in_plane, slices)
    _plan_cache(fp, device, plan, shapes)
    return plan


MAX_INFERRED_CLASSES = 20


def infer_label_map(values: list[int]) -> tuple[dict[int, int], dict[int, str]]:
    """Raw mask values -> (label_map, labels): 0 stays background, the other values become classes 1..K-1 in
    increasing order; a binary mask's class is called "foreground"."""
    fg = [v for v in sorted(values) if v != 0]
    label_map = {0: 0, **{v: i + 1 for i, v in enumerate(fg)}}
    labels = {0: "background", **({1: "foreground"} if len(fg) == 1 else {i + 1: f"label {v}" for i, v in enumerate(fg)})}
    return label_map, labels


def _plan_labels(fp: Fingerprint, plan: Plan) -> None:
    """The label map from the masks' values, unless the config names one. A value found in a single mask of ten or
    more is not taken for a class (a stray value in one badly exported mask; that case is reported when it is
    read); with ``data.labels`` given, its K classes are 0 and the K-1 values found in the most masks."""
    if "data.label_map" in plan.explicit:
        return
    counts: dict[int, int] = {}
    labelled = [c for c in fp.cases if c.has_mask]
    for c in labelled:
        for v in c.mask_values:
            counts[v] = counts.get(v, 0) + 1
    if not counts:
        return
    values = sorted(counts)
    if len(labelled) >= 10:
        values = [v for v in values if v == 0 or counts[v] >= 2]
    named = plan.cfg.data.labels if plan.cfg is not None and "data.labels" in plan.explicit else None
    if named is not None:
        common = sorted((v for v in values if v != 0), key=lambda v: (-counts[v], v))[: len(named) - 1]
        values = sorted({0, *common})
    if len(values) > MAX_INFERRED_CLASSES:
        from medseg.errors import DatasetError

        raise DatasetError(f"the masks hold {len(values)} different values ({values[:6]}...): too many to be classes; "
                           "set data.label_map (raw value -> class index)")
    label_map, labels = infer_label_map(values)
    stray = sorted(set(counts) - set(values))
    note = f"; {stray} in few masks: not classes (those masks are reported)" if stray else ""
    plan.set("data.label_map", label_map, f"mask values {values} found in the masks, 0 is background{note}")
    if named is None:
        plan.set("data.labels", labels, f"{len(labels)} classes")
    elif len(named) != len(label_map):
        from medseg.errors import DatasetError

        raise DatasetError(f"data.labels names {len(named)} classes, but the masks hold values {values}: set "
                           "data.label_map to map them")


def _plan_image(fp: Fingerprint, cfg: ExperimentConfig, device: DeviceProfile, budget: _Budget, plan: Plan) -> None:
    """2D: channels, intensity and scale."""
    channels = 3 if 3 in fp.channels else 1
    plan.set("data.channels", channels, "RGB images present" if channels == 3 else "grey images")
    if fp.modality == "CT" and fp.foreground_intensity is not None:
        _plan_ct_window(fp, plan)
    else:
        plan.set("data.intensity", Intensity.percentile,
                 f"{fp.modality or 'non-CT'} images: each image clipped to its own 0.5-99.5 percentiles")
    shapes = fp.shapes  # (n, 2)
    sides = np.sqrt(shapes[:, 0] * shapes[:, 1])
    median_side = float(np.median(sides))
    spread = float(np.percentile(sides, 90) / max(1.0, np.percentile(sides, 10)))
    plan.summary.update(size_spread=spread, median_side=median_side)
    limit = _pixels_for_budget(device, budget)
    cap = MAX_GPU_PATCH_PIXELS if device.is_gpu else MAX_CPU_PATCH_PIXELS
    too_big = median_side**2 > 4 * min(cap, limit)  # even crops would see little of each image
    if fp.spacing_stated:
        spacing = np.array(fp.median_spacing)
        scale = max(1.0, median_side / math.sqrt(min(cap, limit))) if too_big else 1.0
        target = tuple(float(s * scale) for s in spacing)
        spacings = fp.spacings
        varies = bool(np.any(spacings.max(0) > 1.1 * spacings.min(0)))
        if varies or scale > 1:
            plan.set("data.resample", Resample.spacing, "the files state their pixel spacing"
                     + (", which varies" if varies else "") + (f"; coarsened {scale:.2f}x to fit the budget" if scale > 1 else ""))
            plan.set("data.target_spacing", target, "median spacing" + (" (coarsened)" if scale > 1 else ""))
            return
        plan.set("data.resample", Resample.none, "one pixel spacing for all images: native grid")
        return
    if spread <= UNIFORM_SIZE_RATIO and not too_big:
        plan.set("data.resample", Resample.none, f"no physical spacing; sizes near-uniform (90th/10th percentile side "
                 f"{spread:.2f}x <= {UNIFORM_SIZE_RATIO:g}x): native")
        return
    size = min(median_side, math.sqrt(min(cap, limit)))
    why = f"what {budget.minutes:g} min on this device trains whole" if size < median_side and budget.minutes else "the median image"
    thin = fp.thinnest_structure()
    if thin is not None:
        k, _ = thin
        per_case = fp.case_thickness(k)
        side_of = {c.id: c.side for c in fp.cases}
        # Each image is scaled by size / its side: its structures get thickness t * size / side.
        need = float(np.median([MIN_THICKNESS * side_of[i] / t for i, t in per_case.items() if t > 0] or [0]))
        if need > size:
            size = min(need, 2 * median_side)
            why = f"keeps the thinnest structure (mask value {k}) >= {MIN_THICKNESS:g} px thick"
    # A multiple of the stride: the median image is then exactly one patch.
    size = int(max(2 * STRIDE, (math.floor if size < median_side else round)(size / STRIDE) * STRIDE))
    plan.set("data.resample", Resample.size, f"no physical spacing and sizes vary {spread:.1f}x (90th/10th percentile)"
             if spread > UNIFORM_SIZE_RATIO else f"images of ~{median_side:.0f} px are too large for the budget")
    plan.set("data.target_size", size, f"each image resized to a geometric-mean side of {size} px, aspect kept: {why}")


def _plan_ct_window(fp: Fingerprint, plan: Plan) -> None:
    fg = fp.foreground_intensity
    assert fg is not None
    plan.set("data.intensity", Intensity.fixed, "CT: one window for the dataset (nnU-Net's CT normalisation)")
    plan.set("data.intensity_range", (round(fg.p005, 1), round(fg.p995, 1)),
             "0.5-99.5 percentiles of the foreground voxels over all cases (HU)")


def _plan_volume(fp: Fingerprint, cfg: ExperimentConfig, plan: Plan) -> None:
    """3D: channels, intensity, target spacing, slice axis, 2.5D context."""
    channels = max(fp.channels)
    plan.set("data.channels", channels, f"{channels} channel(s) per slice (2.5D neighbours add channels)")
    if fp.modality == "CT" and fp.foreground_intensity is not None:
        _plan_ct_window(fp, plan)
    else:
        plan.set("data.intensity", Intensity.percentile, f"{fp.modality or 'non-CT'} volumes: each clipped to its own "
                 "0.5-99.5 percentiles")
    spacing = np.array(fp.median_spacing)  # (z, y, x)
    ratio = float(spacing.max() / spacing.min())
    anisotropic = ratio >= ANISOTROPY
    axis = int(np.argmax(spacing)) if anisotropic else 0
    plan.set("data.slice_axis", axis, (f"lowest resolution axis ({spacing[axis]:.2f} mm vs {spacing.min():.2f} mm in "
                                       f"plane, {ratio:.1f}x)" if anisotropic else f"near-isotropic ({ratio:.1f}x): array axis 0"))
    plan.set("data.context_slices", 1 if anisotropic else 2,
             "+-1 neighbour: slices are far apart" if anisotropic else "+-2 neighbours: slices as close as pixels")
    spacings = fp.spacings
    varies = bool(np.any(spacings.max(0) > 1.1 * spacings.min(0)))
    target = tuple(float(v) for v in spacing)
    if varies:
        plan.set("data.resample", Resample.spacing, "spacing differs between cases: one grid for all")
        plan.set("data.target_spacing", target, "median spacing per axis (mm, array order)")
    else:
        plan.set("data.resample", Resample.none, f"every case has spacing {tuple(round(float(v), 3) for v in spacing)}: native grid")
    plan.summary.update(anisotropy=ratio, slice_axis=axis)


def _plan_patch(device: DeviceProfile, budget: _Budget, plan: Plan, in_plane: np.ndarray) -> None:
    med = np.median(in_plane, axis=0)
    patch0 = (_round_to_stride(med[0]), _round_to_stride(med[1]))
    patch, batch, reason = fit_patch_and_batch(patch0, device, budget)
    plan.set("data.patch_size", patch, reason)
    plan.set("train.batch_size", batch, "largest batch that keeps enough optimiser steps" if budget.minutes else
             ("GPU memory" if device.is_gpu else "the CPU's usual batch"))
    patch = plan.get("data.patch_size")
    p90 = np.percentile(in_plane, 90, axis=0)
    tile = tuple(int(min(MAX_TILE, max(p, math.ceil(s / STRIDE) * STRIDE))) for p, s in zip(patch, p90, strict=True))
    plan.set("inference.tile_size", tile, "covers 90% of the images in one pass (fewer overlapping tiles)")
    plan.summary.update(median_resampled_shape=[round(float(s)) for s in med], patch=list(patch), batch=batch)


def _plan_sampling(fp: Fingerprint, plan: Plan, in_plane: np.ndarray) -> None:
    patch = plan.get("data.patch_size")
    coverage = float(np.mean(np.minimum(1.0, patch[0] / in_plane[:, 0]) * np.minimum(1.0, patch[1] / in_plane[:, 1])))
    fg = fp.foreground_fraction()
    if fp.ndim == 2 and coverage >= 0.9:
        plan.set("data.foreground_share", 0.0, f"a patch covers the whole image ({100 * min(coverage, 1):.0f}%)")
        return
    share = 0.5 if fg < 0.01 else 0.33 if fg < 0.25 else 0.1
    where = "per slice" if fp.ndim == 3 else f"patches cover {100 * coverage:.0f}% of an image"
    plan.set("data.foreground_share", share, f"foreground is {100 * fg:.1f}% of the voxels ({where}): "
             f"{100 * share:.0f}% of patches centred on it")


def _plan_sigma(fp: Fingerprint, plan: Plan) -> None:
    thin = fp.thinnest_structure()
    if thin is None:
        return
    scale = 1.0
    size = plan.get("data.target_size")
    if size:
        scale = size / float(np.median([c.side for c in fp.cases]))
    sigma = float(np.clip(0.25 * thin[1] * scale, 2.0, 10.0))
    plan.set("loss.sigma", round(sigma, 1), f"a quarter of the thinnest structure's thickness ({thin[1] * scale:.1f} px), 2-10 px")


def _plan_schedule(fp: Fingerprint, cfg: ExperimentConfig, device: DeviceProfile, budget: _Budget, plan: Plan,
                   n_train: int, in_plane: np.ndarray, slices: float) -> None:
    patch, batch = plan.get("data.patch_size"), plan.get("train.batch_size")
    step_s = batch * patch[0] * patch[1] / device.train_pixels_per_s
    n_val = max(1, fp.n_cases - n_train)
    val_case_s = float(np.mean(np.prod(in_plane, axis=1))) * slices / device.infer_pixels_per_s * 1.3  # + loss/metrics
    items = n_train * (round(slices) if fp.ndim == 3 else 1)
    if budget.minutes is None:
        epochs = plan.get("train.epochs", cfg.train.epochs)
        plan.set("train.warmup_epochs", 1.0, "one epoch of linear warmup")
        minutes = (epochs * items / batch * step_s + epochs * n_val * val_case_s) / 60
        plan.notes.append(f"no budget: {epochs} epochs of {items} patches, about {minutes:.0f} min on {device.name}; "
                          "pass --max-minutes to fit a budget")
        per_round = max(1, int(VAL_SHARE * (items / batch * step_s) / val_case_s))
        if per_round < n_val:
            plan.set("train.val_max_cases", per_round, f"{per_round} of {n_val} validation cases per epoch keep "
                     f"validation near {100 * VAL_SHARE:.0f}% of the time; all are scored at the end")
        return
    train_s = budget.train_seconds or 0.0
    steps = max(1, int(train_s / step_s))
    rounds = max(1, min(DEFAULT_ROUNDS, steps // 20))
    val_round_s = VAL_SHARE * budget.minutes * 60 / rounds
    per_round = int(max(1, min(n_val, val_round_s // val_case_s)))
    samples = max(batch, steps // rounds * batch)
    plan.set("train.epochs", rounds, f"{rounds} validation rounds over the budget (their lengths re-planned from the "
             "measured step time)")
    rounds = plan.get("train.epochs")
    plan.set("train.samples_per_epoch", samples, f"~{steps} steps of {batch} in {train_s / 60:.1f} min of training "
             f"(~{step_s:.2f} s/step estimated)")
    if per_round < n_val:
        plan.set("train.val_max_cases", per_round, f"{per_round} of {n_val} validation cases per round keep validation "
                 f"near {100 * VAL_SHARE:.0f}% of the budget; all are scored at the end")
    plan.set("train.warmup_epochs", round(0.3 if rounds >= 5 else 0.1 * rounds, 2), "about 3% of the steps warm up")
    plan.summary.update(estimated_steps=steps, estimated_step_seconds=step_s)


def _plan_cache(fp: Fingerprint, device: DeviceProfile, plan: Plan, shapes: np.ndarray) -> None:
    voxels = np.prod(shapes, axis=1)
    per_voxel = np.array([c.channels * np.dtype(c.dtype).itemsize + 1 for c in fp.cases])  # image + uint8 label
    weight = 4 if plan.get("loss.sigma") is not None or (plan.cfg is not None and plan.cfg.loss.weight_map) else 0
    total = float(np.sum(voxels * (per_voxel + weight))) * fp.n_cases / len(fp.cases)
    plan.summary.update(cache_bytes=int(total))
    if total <= CACHE_RAM_SHARE * device.host_memory_bytes:
        plan.set("data.cache", "memory", f"resampled cases take ~{total / 2**20:.0f} MiB in their own dtype")
    else:
        plan.set("data.cache", "disk", f"resampled cases take ~{total / 2**30:.1f} GiB, more than "
                 f"{100 * CACHE_RAM_SHARE:.0f}% of RAM: cached on disk")


# --------------------------------------------------------------------------------------------- applying


def explicit_keys(cfg: ExperimentConfig) -> set[str]:
    """Dotted keys the user set (YAML or --set), from pydantic's ``model_fields_set`` of each section."""
    keys = set(cfg.model_fields_set)
    for name in type(cfg).model_fields:
        section = getattr(cfg, name)
        if hasattr(section, "model_fields_set"):
            keys |= {f"{name}.{k}" for k in section.model_fields_set}
    return keys


def apply_plan(cfg: ExperimentConfig, plan: Plan, explicit: set[str] | None = None) -> tuple[ExperimentConfig, set[str]]:
    """``cfg`` with every planned key the user did not set; returns (config, applied keys). The result is
    validated as a whole (a plan never produces an invalid config)."""
    explicit = explicit_keys(cfg) if explicit is None else explicit
    raw = cfg.model_dump(mode="json")
    applied = set()
    for key, entry in plan.entries.items():
        if key in explicit:
            continue
        section, name = key.split(".", 1)
        raw[section][name] = entry.value
        applied.add(key)
    from medseg.config import validate_config

    return validate_config(raw, "plan"), applied
