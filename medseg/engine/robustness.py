"""Robustness of a bundle: Dice on the same cases under graded corruptions of the scan (noise, blur, contrast,
gamma, JPEG, rotation, scale, inversion) and under FGSM / PGD attacks on the network input.

Corrupted cases are written to a scratch folder and scored by the one evaluation loop
(`medseg.engine.evaluate.evaluate_cases`), so a corruption row means exactly what `medseg evaluate` means; the
geometric corruptions move the mask with the image. Attacks perturb the [0, 1] network input on the model grid
(L-inf, cross-entropy against the label on that grid, gradients through the Predictor's members) and are scored
by the same loop through `AttackedPredictor`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from medseg.config import ExperimentConfig
from medseg.data import Case
from medseg.data.preprocess import prepare_scan
from medseg.engine.evaluate import evaluate_cases, load_target
from medseg.errors import DatasetError
from medseg.io import read_mask, read_scan
from medseg.io.geometry import Scan
from medseg.io.writers import write_scan

log = logging.getLogger("medseg")

# ------------------------------------------------------------------------------------------ corruptions
# Each corruption maps a channels-first float image in [0, 1] (C, *spatial) and one parameter to the same;
# geometric ones also take the interpolation mode so the mask is moved by the same transform (nearest).


def _gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import RandGaussianNoise

    noise = RandGaussianNoise(prob=1.0, mean=0.0, std=std, sample_std=False)
    noise.set_random_state(seed=int(rng.integers(2**31)))
    return np.asarray(noise(x))


def _blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import GaussianSmooth

    return np.asarray(GaussianSmooth(sigma=sigma)(x))


def _contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    # Contrast squeezed towards each channel's mean: a flat, washed-out scan.
    mean = x.reshape(x.shape[0], -1).mean(1).reshape(-1, *([1] * (x.ndim - 1)))
    return mean + (x - mean) * factor


def _gamma(x: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import AdjustContrast

    return np.asarray(AdjustContrast(gamma=gamma)(x))


def _jpeg(x: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    import albumentations as A  # noqa: N812 - the usual name

    compress = A.ImageCompression(quality_range=(int(quality), int(quality)), p=1.0)

    def one(plane: np.ndarray) -> np.ndarray:  # (C, H, W) -> (C, H, W) through an 8-bit JPEG
        hwc = np.clip(np.moveaxis(plane, 0, -1) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.moveaxis(compress(image=hwc)["image"], -1, 0).astype(np.float32) / 255.0

    return _per_slice(x, one)


def _rotate(x: np.ndarray, degrees: float, mode: str) -> np.ndarray:
    from monai.transforms import Rotate

    rotate = Rotate(angle=math.radians(degrees), keep_size=True, mode=mode, padding_mode="zeros")
    return _per_slice(x, lambda plane: np.asarray(rotate(plane)))


def _scale(x: np.ndarray, zoom: float, mode: str) -> np.ndarray:
    from monai.transforms import Zoom

    scale = Zoom(zoom=zoom, keep_size=True, mode=mode, padding_mode="constant")
    return _per_slice(x, lambda plane: np.asarray(scale(plane)))


def _invert(x: np.ndarray, _level: float, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - x


def _per_slice(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a 2D transform to a (C, H, W) image, or to every axial slice of a (C, Z, Y, X) volume."""
    if x.ndim == 3:
        return fn(x)
    return np.stack([fn(x[:, z]) for z in range(x.shape[1])], axis=1)


@dataclass(frozen=True)
class Corruption:
    """``levels[s - 1]`` is the parameter of severity ``s`` (severity 0 is the clean scan)."""

    name: str
    levels: tuple[float, ...]
    apply: Callable[..., np.ndarray]
    geometric: bool = False
    grey_only: bool = False


CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in (
    Corruption("gaussian_noise", (0.04, 0.08, 0.16), _gaussian_noise),  # std, on the [0, 1] intensity range
    Corruption("blur", (1.0, 2.0, 3.0), _blur),  # Gaussian sigma, pixels
    Corruption("contrast", (0.7, 0.5, 0.3), _contrast),  # remaining contrast
    Corruption("gamma", (1.5, 2.25, 3.0), _gamma),
    Corruption("jpeg", (30, 15, 5), _jpeg),  # JPEG quality
    Corruption("rotation", (5.0, 10.0, 15.0), _rotate, geometric=True),  # degrees, in-plane
    Corruption("scale", (0.9, 0.8, 0.7), _scale, geometric=True),  # zoom out, zero-padded
    Corruption("invert", (1.0,), _invert, grey_only=True),  # one level: an image is inverted or not
)}  # fmt: skip


def corrupt_image(scan: Scan, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``scan.array`` under corruption ``name`` at ``severity`` (0 = unchanged): same shape and dtype, values
    within the image's own [min, max]."""
    corruption = CORRUPTIONS[name]
    if severity == 0:
        return scan.array
    if corruption.grey_only and scan.channels > 1:
        raise ValueError(f"{name} applies to grey images only ({scan.source} has {scan.channels} channels)")
    array = scan.array
    lo, hi = float(array.min()), float(array.max())
    span = hi - lo if hi > lo else 1.0
    x = ((scan.channels_first().astype(np.float32) - lo) / span).astype(np.float32)
    param = corruption.levels[severity - 1]
    if corruption.geometric:
        y = corruption.apply(x, param, "bilinear")
    else:
        y = corruption.apply(x, param, np.random.default_rng(seed))
    y = np.clip(np.asarray(y, dtype=np.float32), 0.0, 1.0) * span + lo
    if np.issubdtype(array.dtype, np.integer):
        y = np.rint(y)
    y = y.astype(array.dtype)
    return y[0] if array.ndim == scan.spatial_ndim else np.moveaxis(y, 0, -1)


def corrupt_mask(mask: Scan, name: str, severity: int) -> np.ndarray:
    """The raw mask moved by a geometric corruption (nearest neighbour, so label values are kept); unchanged
    for intensity corruptions."""
    corruption = CORRUPTIONS[name]
    if severity == 0 or not corruption.geometric:
        return mask.array
    moved = corruption.apply(mask.channels_first().astype(np.float32), corruption.levels[severity - 1], "nearest")
    moved = np.rint(np.asarray(moved)).astype(mask.array.dtype)
    return moved[0] if mask.array.ndim == mask.spatial_ndim else np.moveaxis(moved, 0, -1)


def corrupt_case(case: Case, name: str, severity: int, out_dir: Path, seed: int = 0) -> Case:
    """Write ``case`` under a corruption to ``out_dir`` (image and, for geometric ones, the moved mask) and return
    the case that points there, with the same id."""
    if case.mask is None:
        raise DatasetError(f"{case.image.name}: no mask to evaluate against")
    scan = read_scan(case.image)
    suffix = ".png" if not scan.is_volume else ".nii.gz"
    image = write_scan(Scan(corrupt_image(scan, name, severity, seed), scan.geometry, scan.source),
                       out_dir / f"{case.id}_image{suffix}")
    mask_path = case.mask
    if CORRUPTIONS[name].geometric:
        mask = read_mask(case.mask)
        mask_path = write_scan(Scan(corrupt_mask(mask, name, severity), mask.geometry, mask.source),
                               out_dir / f"{case.id}_mask{suffix}")
    return Case(case.id, image, mask_path)


# ------------------------------------------------------------------------------------------ attacks

ATTACK_EPS: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
PGD_STEPS = 10


def member_loss(members: Sequence[torch.nn.Module], x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the members' mean softmax against ``label`` for a whole image ``x`` (1, C, H, W); the
    image is padded to a multiple of 32 (the encoders' stride) and the logits cropped back."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % 32, -w % 32
    padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    probs = torch.stack([m(padded).float().softmax(1) for m in members]).mean(0)[..., :h, :w]
    return F.nll_loss(torch.log(probs.clamp_min(1e-8)), label)


@torch.enable_grad()  # callers may be in no_grad (scoring); the attack needs the input gradient
def fgsm(members: Sequence[torch.nn.Module], x: torch.Tensor, label: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` (L-inf) that raises the loss; stays in [0, 1]."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(member_loss(members, x, label), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


@torch.enable_grad()
def pgd(members: Sequence[torch.nn.Module], x: torch.Tensor, label: torch.Tensor, eps: float,
        steps: int = PGD_STEPS, seed: int = 0) -> torch.Tensor:
    """Projected gradient ascent in the L-inf ball of radius ``eps`` (random start, step 2.5·eps/steps)."""
    gen = torch.Generator().manual_seed(seed)
    step = 2.5 * eps / steps
    adv = (x + (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * eps).clamp(0, 1)
    for _ in range(steps):
        adv = adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(member_loss(members, adv, label), adv)
        adv = torch.min(torch.max(adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return adv.detach()


ATTACKS: dict[str, Callable[..., torch.Tensor]] = {"fgsm": fgsm, "pgd": pgd}


class AttackedPredictor:
    """A Predictor whose network input is attacked before it predicts, so `evaluate_cases` scores attacks
    exactly like clean cases. The label comes from the case whose image file the scan was read from."""

    def __init__(self, predictor: Any, cases: Sequence[Case], cfg: ExperimentConfig, attack: str, eps: float) -> None:
        self.predictor = predictor
        self.cases = {c.image.name: c for c in cases}
        self.cfg = cfg
        self.attack = ATTACKS[attack]
        self.eps = eps

    def predict_scan(self, scan: Scan) -> Any:
        if scan.is_volume:
            raise DatasetError(f"{scan.source}: adversarial rows support 2D scans only")
        target = load_target(self.cases[scan.source], self.cfg, scan.spatial_shape)
        prepared = prepare_scan(scan, self.cfg.data, label=target)
        device = self.predictor.device
        x = torch.from_numpy(np.ascontiguousarray(prepared.model_input(self.cfg.data, scan.source), dtype=np.float32))
        label = torch.from_numpy(np.asarray(prepared.label, dtype=np.int64))
        adv = self.attack(self.predictor.members, x[None].to(device), label[None].to(device), self.eps)[0].cpu()
        # The attacked input goes through the Predictor's own path (TTA, back to the scan grid, postprocessing).
        self.predictor.prepare = lambda _scan: (adv, prepared.geometry)
        try:
            return self.predictor.predict_scan(scan)
        finally:
            del self.predictor.prepare


# ------------------------------------------------------------------------------------------ the report


def corruption_rows(predictor: Any, cases: Sequence[Case], cfg: ExperimentConfig, scratch: Path,
                    names: Sequence[str] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """One row ``{corruption, severity, param, dice, n_cases}`` per corruption and severity (1..), each scored by
    `evaluate_cases` on the corrupted copies of ``cases``."""
    grey = all(read_scan(c.image).channels == 1 for c in cases)
    rows = []
    for name in names or list(CORRUPTIONS):
        corruption = CORRUPTIONS[name]
        if corruption.grey_only and not grey:
            log.info("robustness: %s skipped (colour images)", name)
            continue
        for severity, param in enumerate(corruption.levels, start=1):
            folder = scratch / f"{name}_{severity}"
            folder.mkdir(parents=True, exist_ok=True)
            corrupted = [corrupt_case(c, name, severity, folder, seed) for c in cases]
            result = evaluate_cases(predictor, corrupted, cfg, hd95=False)
            rows.append({"corruption": name, "severity": severity, "param": float(param),
                         "dice": result.mean_dice, "n_cases": result.n_cases})
    return rows


def attack_rows(predictor: Any, cases: Sequence[Case], cfg: ExperimentConfig,
                eps_levels: Sequence[float] = ATTACK_EPS) -> list[dict[str, Any]]:
    """One row per attack (FGSM, PGD) and eps, scored by `evaluate_cases` through `AttackedPredictor`."""
    rows = []
    for attack in ATTACKS:
        for severity, eps in enumerate(eps_levels, start=1):
            result = evaluate_cases(AttackedPredictor(predictor, cases, cfg, attack, eps), cases, cfg, hd95=False)
            rows.append({"corruption": attack, "severity": severity, "param": float(eps),
                         "dice": result.mean_dice, "n_cases": result.n_cases})
    return rows


def robustness_rows(predictor: Any, cases: Sequence[Case], cfg: ExperimentConfig, *,
                    eps_levels: Sequence[float] = ATTACK_EPS, seed: int = 0) -> list[dict[str, Any]]:
    """The clean row (severity 0), every corruption row and an attack row per attack and eps (none when
    ``eps_levels`` is empty)."""
    clean = evaluate_cases(predictor, cases, cfg, hd95=False)
    if not clean.rows:
        raise DatasetError(f"no case could be scored: {clean.failed[0] if clean.failed else 'no cases'}")
    rows = [{"corruption": "clean", "severity": 0, "param": 0.0, "dice": clean.mean_dice, "n_cases": clean.n_cases}]
    with tempfile.TemporaryDirectory(prefix="medseg-robustness-") as scratch:
        rows += corruption_rows(predictor, cases, cfg, Path(scratch), seed=seed)
    if eps_levels:
        rows += attack_rows(predictor, cases, cfg, eps_levels)
    return rows


def write_rows(rows: Sequence[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """``robustness.json`` and ``robustness.csv`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "robustness.json", out_dir / "robustness.csv"
    json_path.write_text(json.dumps(list(rows), indent=2))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def plot_rows(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """A PNG of Dice against severity, one line per corruption/attack, each starting from the clean Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = next(r["dice"] for r in rows if r["corruption"] == "clean")
    names = list(dict.fromkeys(r["corruption"] for r in rows if r["corruption"] != "clean"))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name in names:
        pts = [(0, clean)] + [(r["severity"], r["dice"]) for r in rows if r["corruption"] == name]
        style = "--" if name in ATTACKS else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
    eps = ", ".join(f"{r['param'] * 255:g}" for r in rows if r["corruption"] == "fgsm")
    ax.set_xlabel(f"severity (0 = clean; attacks: eps = {eps} / 255)" if eps else "severity (0 = clean)")
    ax.set_ylabel("mean foreground Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, ncol=2)
    ax.set_title(title or "Dice under corruption")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
