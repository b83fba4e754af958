"""Test-time augmentation and ensembling: run several passes, map each back, average in probability space.

A *view* is an invertible change of the input image: mirror-padding it into a slightly larger canvas at some
offset (multi-crop), flipping it, rotating it by 90°. Each view is one full overlap-tile pass
(`medseg.inference.tiling.predict_logits_2d`); its softmax is mapped back onto the image grid and averaged
over views × ensemble members. Modes (``InferenceConfig.tta``) and their cost in passes per member:

=============  ==========================================================================  ==============
mode           views                                                                       passes
=============  ==========================================================================  ==============
``none``       the image as is                                                             1
``flips``      identity, flip x, flip y, flip x+y (all axis combinations in 2D)            4
``multicrop``  5 placements in a mirror-padded canvas: 4 corners + centre (see below)      5 (canvas a bit
                                                                                           larger)
``full``       flips × multicrop (× 2 with ``rotations=True``: the 8 symmetries of a       20 (40)
               square)
=============  ==========================================================================  ==============

Multi-crop: along an axis longer than the tile, the canvas gains half a tile of mirrored context and the image
is placed at offset 0, a quarter or half a tile, which shifts the tile grid (and its seams) across the image.
Along an axis no longer than the tile, the image is reflect-padded by an eighth of its length (at least 16 px),
placed at either end or the centre, and the canvas goes through the net whole (padding a small image up to a large
tile would multiply the work for no new context) — the segmentation
analogue of 10-crop (whose crops are the corners and the centre). Every view covers every pixel, so each pixel
averages exactly ``passes`` predictions; :class:`ProbabilityAccumulator` keeps a count map to prove it.

Uncertainty is computed from the same passes: ``entropy`` of the averaged probabilities (normalised by log K
to [0, 1]) or ``variance`` — the per-class variance of the probabilities across all views × members, averaged
over classes and scaled by 4 (a probability's variance is at most 1/4) to [0, 1]. Variance needs more than one
pass (TTA or several members) and is 0 otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from medseg.config import InferenceConfig
from medseg.inference.tiling import ModelFn, predict_logits_2d
from medseg.transforms.padding import pad

FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


@dataclass(frozen=True)
class View:
    """One test-time view of an image ``(B, C, H, W)``.

    ``offset``/``slack`` (per axis y, x): the image sits at ``offset`` inside a canvas ``slack`` pixels larger
    (mirror-padded); ``flip``: spatial dims flipped; ``rot90``: quarter turns in the (H, W) plane;
    ``tile_size``: tile used for this view's pass (None: ``cfg.tile_size``).
    """

    offset: tuple[int, int] = (0, 0)
    slack: tuple[int, int] = (0, 0)
    flip: tuple[int, ...] = ()
    rot90: int = 0
    tile_size: tuple[int, int] | None = None

    def forward(self, image: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
        """``(B, C, H, W)`` -> the view's input ``(B, C, H', W')``."""
        (oy, ox), (sy, sx) = self.offset, self.slack
        x = pad(image, ((0, 0), (0, 0), (oy, sy - oy), (ox, sx - ox)), mode) if sy or sx else image
        if self.flip:
            x = torch.flip(x, self.flip)
        if self.rot90:
            x = torch.rot90(x, self.rot90, (-2, -1))
        return x

    def pass_tile_size(self, cfg: InferenceConfig) -> tuple[int, int]:
        """Tile for this view's pass, in the view's own (possibly rotated) axes."""
        ty, tx = self.tile_size or cfg.tile_size
        return (tx, ty) if self.rot90 % 2 else (ty, tx)

    def inverse(self, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The view's output ``(B, K, H', W')`` -> ``(B, K, H, W)`` on the original image grid."""
        y = output
        if self.rot90:
            y = torch.rot90(y, -self.rot90, (-2, -1))
        if self.flip:
            y = torch.flip(y, self.flip)
        oy, ox = self.offset
        return y[..., oy : oy + size[0], ox : ox + size[1]]


def multicrop_placements(size: int, tile: int) -> tuple[int, tuple[int, int, int], int]:
    """For one axis of length ``size`` and tile ``tile``: ``(slack, (first, centre, last) offsets, tile for
    the pass)`` — see the module docstring."""
    if size > tile:
        slack = tile // 2
        return slack, (0, slack // 2, slack), tile
    slack = max(size // 8, 16)
    return slack, (0, slack // 2, slack), size + slack  # canvas goes through whole: tile = canvas


def multicrop_views(shape: tuple[int, int], tile_size: tuple[int, int]) -> list[View]:
    """The 5 multi-crop views (4 corners + centre) of an image of spatial ``shape`` (H, W)."""
    sy, oys, ty = multicrop_placements(shape[0], tile_size[0])
    sx, oxs, tx = multicrop_placements(shape[1], tile_size[1])
    corners = [(oys[0], oxs[0]), (oys[0], oxs[2]), (oys[2], oxs[0]), (oys[2], oxs[2]), (oys[1], oxs[1])]
    return [View(offset=o, slack=(sy, sx), tile_size=(ty, tx)) for o in corners]


def build_views(mode: str, shape: tuple[int, int], cfg: InferenceConfig, rotations: bool = False) -> list[View]:
    """Views for TTA ``mode`` (``none | flips | multicrop | full``) of an image of spatial ``shape``."""
    if mode == "none":
        return [View()]
    flips = [View(flip=f) for f in FLIPS]
    if rotations:  # the dihedral group of the square: 4 flips × {0, 90°}
        flips += [View(flip=f, rot90=1) for f in FLIPS]
    if mode == "flips":
        return flips
    crops = multicrop_views(shape, cfg.tile_size)
    if mode == "multicrop":
        return crops
    if mode == "full":
        return [View(c.offset, c.slack, f.flip, f.rot90, c.tile_size) for c in crops for f in flips]
    raise ValueError(f"unknown TTA mode {mode!r}; use none, flips, multicrop or full")


class ProbabilityAccumulator:
    """Running mean (and, if asked, second moment) of probability maps ``(B, K, H, W)``, with a count map.

    Holds two or three buffers of the batch's size whatever the number of passes: passes are added one at a
    time, never stacked.
    """

    def __init__(self, track_variance: bool) -> None:
        self.track_variance = track_variance
        self.sum: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None
        self.count: torch.Tensor | None = None  # (H, W): how many passes predicted each pixel

    def add(self, probs: torch.Tensor) -> None:
        if self.sum is None:
            self.sum = torch.zeros_like(probs)
            self.count = torch.zeros(probs.shape[-2:], dtype=torch.int32)
            if self.track_variance:
                self.sq = torch.zeros_like(probs)
        assert self.count is not None
        self.sum += probs
        if self.sq is not None:
            self.sq.addcmul_(probs, probs)
        self.count += 1

    @property
    def passes(self) -> int:
        return int(self.count.min()) if self.count is not None else 0

    def mean(self) -> torch.Tensor:
        """``(B, K, H, W)`` mean probabilities."""
        if self.sum is None or self.count is None or int(self.count.min()) == 0:
            raise RuntimeError("some pixels were predicted by no pass")
        return self.sum / self.count

    def uncertainty(self, kind: str) -> torch.Tensor:
        """``(B, H, W)`` in [0, 1]: normalised entropy of the mean, or scaled variance across passes."""
        mean = self.mean()
        if kind == "variance":
            if self.sq is None:
                raise RuntimeError("variance was not tracked")
            var = (self.sq / self.count - mean * mean).clamp_min(0)
            return (4.0 * var.mean(1)).clamp_(0.0, 1.0)
        return entropy(mean)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Normalised entropy ``(B, *spatial)`` in [0, 1] of probabilities ``(B, K, *spatial)``."""
    k = probs.shape[1]
    h = -(probs * probs.clamp_min(1e-8).log()).sum(1)
    return h / math.log(k) if k > 1 else torch.zeros_like(h)


def predict_probs_tta(
    model_fns: Sequence[ModelFn],
    images: torch.Tensor,
    cfg: InferenceConfig,
    temperature: float = 1.0,
    views: Sequence[View] | None = None,
    track_variance: bool = False,
    on_pass: Callable[[], None] | None = None,
) -> ProbabilityAccumulator:
    """Average ``softmax(logits / temperature)`` over ``views`` (default: ``cfg.tta``'s) × members.

    ``images``: ``(B, C, H, W)`` in [0, 1]; returns the accumulator (``.mean()`` ``(B, K, H, W)``,
    ``.uncertainty(kind)`` ``(B, H, W)``). ``on_pass`` is called after every pass (progress bars).
    """
    size = (int(images.shape[-2]), int(images.shape[-1]))
    views = list(views) if views is not None else build_views(cfg.tta, size, cfg)
    mode = "reflect" if cfg.padding_mode == "reflect" else "constant"
    acc = ProbabilityAccumulator(track_variance)
    for model_fn in model_fns:
        for view in views:
            logits = predict_logits_2d(model_fn, view.forward(images, mode), cfg, view.pass_tile_size(cfg))
            acc.add(view.inverse(torch.softmax(logits.float() / temperature, dim=1), size))
            if on_pass is not None:
                on_pass()
    return acc
