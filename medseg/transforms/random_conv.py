"""Random convolution (RandConv, Xu et al. 2021, "Robust and generalizable visual representation learning via random
convolutions"): a shape-bias augmentation. Each call filters the image with a freshly drawn random convolution
(kernel size from ``kernel_sizes``, weights ~ N(0, 1/(k²·C)), C -> C channels), which changes its texture, local
contrast and colour — a bright object may turn dark — while every edge and shape stays where it was. A model trained
on such images cannot rely on texture or stain and must use shape, which is what transfers to a new image source.

As in the paper's mixing variant, the output is ``α·x + (1 - α)·conv(x)`` with ``α ~ U(0, 1)``. The filtered image
is first brought to the input's per-channel mean and standard deviation and the result clipped to the input's range,
so the network sees intensities of the usual scale (the paper feeds raw filter outputs to an ImageNet-normalised
network; here inputs are [0, 1] images).

`RandomConvolution` (array, channel-first ``(C, H, W)``) and `RandomConvolutiond` (dictionary) follow MONAI's
randomizable-transform conventions (``prob``, ``set_random_state``). Training applies it per patch through
`medseg.transforms.augment.Augment2D` (``augment.random_convolution``: its probability).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor

__all__ = ["RandomConvolution", "RandomConvolutiond", "random_convolution"]


def random_convolution(image: torch.Tensor, kernel: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α·x + (1 - α)·conv(x)`` for ``image (C, H, W)`` float and ``kernel (C, C, k, k)``; the filtered image is
    standardised to the input's per-channel mean/std, the result clipped to the input's [min, max]."""
    x = image[None].float()
    pad = kernel.shape[-1] // 2
    # Mirror padding: zero padding would draw a frame (a false edge) around every patch.
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    filtered = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=mode) if pad else x, kernel.to(x))
    dims = (-2, -1)
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    f_mean, f_std = filtered.mean(dims, keepdim=True), filtered.std(dims, keepdim=True)
    filtered = (filtered - f_mean) / (f_std + 1e-6) * std + mean
    out = alpha * x + (1.0 - alpha) * filtered
    return out.clamp(float(x.min()), float(x.max()))[0]


class RandomConvolution(RandomizableTransform):
    """Random convolution of a channel-first image ``(C, H, W)``, with probability ``prob``.

    Args:
        prob: probability per call.
        kernel_sizes: odd kernel sizes to draw from (the paper: 1, 3, 5, 7; size 1 only remixes colours).
        mix: draw ``α ~ U(0, 1)`` and blend with the input (RandConv-mix); False: ``α = 0``.
    """

    def __init__(self, prob: float = 0.5, kernel_sizes: Sequence[int] = (1, 3, 5, 7), mix: bool = True) -> None:
        RandomizableTransform.__init__(self, prob)
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd sizes >= 1, got {list(kernel_sizes)}")
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.mix = mix
        self._kernel: np.ndarray | None = None
        self._alpha = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        channels = int(data.shape[0])
        k = self.kernel_sizes[int(self.R.randint(len(self.kernel_sizes)))]
        # Kaiming-normal fan-in scale, as in the paper: the output's variance matches the input's.
        self._kernel = self.R.normal(0.0, 1.0 / np.sqrt(k * k * channels), (channels, channels, k, k)).astype(np.float32)
        self._alpha = float(self.R.uniform(0.0, 1.0)) if self.mix else 0.0

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if img.ndim != 3:
            raise ValueError(f"RandomConvolution takes a channel-first 2D image (C, H, W), got {tuple(img.shape)}")
        if randomize:
            self.randomize(img)
        if not self._do_transform or self._kernel is None:
            return img
        out = random_convolution(convert_to_tensor(img, track_meta=False), torch.from_numpy(self._kernel), self._alpha)
        result, *_ = convert_to_dst_type(out, img, dtype=img.dtype)
        return result

    # Exact resume: the generator's state as plain lists and numbers (torch.load(weights_only=True) reads them).
    def state_dict(self) -> dict[str, Any]:
        name, key, pos, has_gauss, cached = self.R.get_state()
        return {"name": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.R.set_state((state["name"], np.asarray(state["key"], dtype=np.uint32), state["pos"], state["has_gauss"],
                          state["cached"]))


class RandomConvolutiond(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandomConvolution`: the same random filter for every key of one call (e.g.
    two views of one image)."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, kernel_sizes: Sequence[int] = (1, 3, 5, 7),
                 mix: bool = True, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.transform = RandomConvolution(1.0, kernel_sizes, mix)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandomConvolutiond:
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        first = True
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], randomize=first)
            first = False
        return d
