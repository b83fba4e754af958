"""Overlap-tile prediction (U-Net paper): large images in overlapping, Gaussian-blended tiles with a mirrored
border so edge tiles see context; small or odd-sized images in one pass (the model pads to its stride).

Arrays here are tensors: images ``(B, C, H, W)``, logits ``(B, K, H, W)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from medseg.config import InferenceConfig

ModelFn = Callable[[torch.Tensor], torch.Tensor]


def predict_logits_2d(model_fn: ModelFn, image: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    """Logits ``(B, K, H, W)`` for images ``(B, C, H, W)`` of any size."""
    h, w = image.shape[-2:]
    th, tw = cfg.tile_size
    if h <= th and w <= tw:
        return model_fn(image)
    # Mirror a margin around the image so that border pixels are predicted with context, as in the
    # paper's overlap-tile strategy; reflect needs the margin to be smaller than the image side.
    mh, mw = min(th // 8, h - 1), min(tw // 8, w - 1)
    mode = "reflect" if cfg.padding_mode == "reflect" else "constant"
    padded = F.pad(image, (mw, mw, mh, mh), mode=mode)
    roi = (min(th, padded.shape[-2]), min(tw, padded.shape[-1]))
    logits = sliding_window_inference(
        padded, roi_size=roi, sw_batch_size=cfg.batch_size, predictor=model_fn, overlap=cfg.overlap,
        mode=cfg.blend, padding_mode="reflect" if cfg.padding_mode == "reflect" else "constant",
    )
    return logits[..., mh : mh + h, mw : mw + w]


def context_indices(z: int, k: int, depth: int) -> np.ndarray:
    """Slice indices z-k..z+k with edge repetition (2.5D context)."""
    return np.clip(np.arange(z - k, z + k + 1), 0, depth - 1)


def predict_logits_volume(
    model_fn: ModelFn, volume: torch.Tensor, context: int, cfg: InferenceConfig
) -> torch.Tensor:
    """2.5D slice-wise logits ``(K, Z, Y, X)`` for a volume ``(C, Z, Y, X)``.

    Slices are stacked with their ``context`` neighbours as channels (slice-major) and predicted in
    batches of ``cfg.batch_size`` slices, so memory stays bounded by one batch plus the output.
    """
    c, depth = volume.shape[:2]
    out: torch.Tensor | None = None
    for start in range(0, depth, cfg.batch_size):
        zs = range(start, min(depth, start + cfg.batch_size))
        batch = torch.stack(
            [volume[:, context_indices(z, context, depth)].transpose(0, 1).reshape(-1, *volume.shape[2:]) for z in zs]
        )
        logits = predict_logits_2d(model_fn, batch, cfg)  # (b, K, Y, X)
        if out is None:
            out = torch.empty((logits.shape[1], depth, *logits.shape[2:]), dtype=logits.dtype)
        out[:, start : start + len(zs)] = logits.transpose(0, 1).cpu()
    assert out is not None
    return out


def predict_logits_case(model_fn: ModelFn, image: torch.Tensor, context: int, cfg: InferenceConfig) -> torch.Tensor:
    """Logits ``(K, *spatial)`` for one preprocessed case ``(C, H, W)`` or ``(C, Z, Y, X)``."""
    if image.ndim == 4:
        return predict_logits_volume(model_fn, image, context, cfg)
    return predict_logits_2d(model_fn, image[None], cfg)[0]
