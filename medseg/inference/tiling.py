"""Overlap-tile prediction (U-Net paper): large images in overlapping, Gaussian-blended tiles with a mirrored
border so edge tiles see context; small or odd-sized images in one pass (the model pads to its stride).

One call here is one *pass*: every pixel of the input gets logits from the model exactly once (blended where
tiles overlap). Test-time augmentation (`medseg.inference.tta`) and ensembles run several passes.

Arrays here are tensors: images ``(B, C, H, W)``, logits ``(B, K, H, W)``; volumes ``(C, Z, Y, X)``.
``medseg.engine`` validates with :func:`predict_logits_case`, so training and inference tile identically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medseg.config import InferenceConfig
from medseg.transforms.padding import pad

ModelFn = Callable[[torch.Tensor], torch.Tensor]


def tile_margin(size: int, tile: int) -> int:
    """Mirrored context added on each side of an axis before tiling: an eighth of a tile, so that border
    pixels sit inside a tile (not on its blended-down edge) and see mirrored, not zero, context."""
    return tile // 8 if size > 1 else 0


def predict_logits_2d(
    model_fn: ModelFn,
    image: torch.Tensor,
    cfg: InferenceConfig,
    tile_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits ``(B, K, H, W)`` for images ``(B, C, H, W)`` of any size, in one pass.

    Images no larger than the tile go through the model whole (it reflect-pads to its stride). Larger ones
    are mirror-padded by :func:`tile_margin` and predicted by MONAI's ``sliding_window_inference`` with
    ``cfg.overlap`` and ``cfg.blend`` (Gaussian weights by default), then cropped back to exactly ``(H, W)``.
    ``tile_size`` overrides ``cfg.tile_size`` (test-time multi-crop uses a canvas a little above the tile).
    """
    h, w = image.shape[-2:]
    th, tw = tile_size or cfg.tile_size
    if h <= th and w <= tw:
        return model_fn(image)
    mh, mw = tile_margin(h, th), tile_margin(w, tw)
    mode = "reflect" if cfg.padding_mode == "reflect" else "constant"
    # medseg's pad mirrors like numpy for any width (torch's reflect refuses pads wider than the image).
    padded = pad(image, ((0, 0), (0, 0), (mh, mh), (mw, mw)), mode)
    roi = (min(th, padded.shape[-2]), min(tw, padded.shape[-1]))
    # MONAI stacks sw_batch_size windows of *every* image in the batch into one call: keep the network's batch
    # at about cfg.call_batch() tiles, so a batch of 2.5D slices does not multiply activation memory.
    sw_batch = max(1, cfg.call_batch() // max(1, int(image.shape[0])))
    logits = sliding_window_inference(
        padded, roi_size=roi, sw_batch_size=sw_batch, predictor=model_fn, overlap=cfg.overlap,
        mode=cfg.blend, padding_mode=mode,
    )
    return logits[..., mh : mh + h, mw : mw + w]


def context_indices(z: int, k: int, depth: int) -> np.ndarray:
    """Slice indices z-k..z+k with edge repetition (2.5D context)."""
    return np.clip(np.arange(z - k, z + k + 1), 0, depth - 1)


def slice_batches(volume: torch.Tensor, context: int, batch_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """2.5D batches of a volume ``(C, Z, Y, X)``: yields ``(start, stop, batch)`` with ``batch``
    ``(stop - start, (2*context + 1) * C, Y, X)`` — each slice with its ``context`` neighbours as channels
    (slice-major, as in training). Only one batch is materialised at a time, so memory stays bounded."""
    depth = volume.shape[1]
    for start in range(0, depth, batch_size):
        stop = min(depth, start + batch_size)
        yield start, stop, torch.stack(
            [
                volume[:, context_indices(z, context, depth)].transpose(0, 1).reshape(-1, *volume.shape[2:])
                for z in range(start, stop)
            ]
        )


def predict_logits_volume(
    model_fn: ModelFn, volume: torch.Tensor, context: int, cfg: InferenceConfig
) -> torch.Tensor:
    """2.5D slice-wise logits ``(K, Z, Y, X)`` for a volume ``(C, Z, Y, X)``, in batches of ``cfg.call_batch()``
    slices, so memory stays bounded by one batch plus the output."""
    depth = volume.shape[1]
    out: torch.Tensor | None = None
    for start, stop, batch in slice_batches(volume, context, cfg.call_batch()):
        logits = predict_logits_2d(model_fn, batch, cfg)  # (b, K, Y, X)
        if out is None:
            out = torch.empty((logits.shape[1], depth, *logits.shape[2:]), dtype=logits.dtype)
        out[:, start:stop] = logits.transpose(0, 1).cpu()
    assert out is not None
    return out


def predict_logits_case(model_fn: ModelFn, image: torch.Tensor, context: int, cfg: InferenceConfig) -> torch.Tensor:
    """Logits ``(K, *spatial)`` for one preprocessed case ``(C, H, W)`` or ``(C, Z, Y, X)`` (one plain pass)."""
    if image.ndim == 4:
        return predict_logits_volume(model_fn, image, context, cfg)
    return predict_logits_2d(model_fn, image[None], cfg)[0]
