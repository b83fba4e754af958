"""A frozen encoder's features, computed once per image and cropped per training patch, so decoder-only
training (``model.transfer: freeze_encoder`` with ``model.cache_encoder_features``) skips the encoder after
each image's first visit.

Valid only when the encoder is frozen (no parameter trains, BatchNorm in eval mode) and an image reaches the
network unchanged every time (no random spatial or intensity augmentation): then its features never change.
The whole image (padded to a multiple of the encoder stride) is encoded once; a patch at an offset that is a
multiple of the stride S then has, at feature level l (stride 2^l), exactly the features
``f_l[:, y/2^l : (y+h)/2^l, x/2^l : (x+w)/2^l]``. They differ from encoding the patch alone only near the patch
border, where the convolutions see the real neighbouring pixels instead of padding (as in validation and
prediction on whole images).

Memory: all levels together hold about (C + 7) floats per pixel for an EfficientNet-Lite0 encoder (C input
channels; 16, 24, 40, 112, 320 channels at strides 2..32), e.g. 40 MB for a 1000² RGB image in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from medseg.models.network import SegmentationNet

__all__ = ["EncoderFeatureCache"]


class EncoderFeatureCache:
    """Runs ``model``'s decoder on cached encoder features of stride-aligned patches.

    >>> cache = EncoderFeatureCache(model, image_of)      # image_of(key) -> (C, Hp, Wp), Hp, Wp multiples of S
    >>> logits = cache(["a", "b"], [(0, 32), (64, 0)], (64, 64))   # like model(patches), (2, K, 64, 64)

    ``image_of(key)`` returns the whole (already padded) network input of a case or slice, in [0, 1]; it is
    called once per key. Features are stored detached on ``storage_device`` (default: CPU, sparing accelerator
    memory). ``encoder_runs`` counts the encoder passes.
    """

    def __init__(
        self,
        model: SegmentationNet,
        image_of: Callable[[Hashable], torch.Tensor],
        storage_device: str | torch.device = "cpu",
    ) -> None:
        self.model = model
        self.image_of = image_of
        self.storage_device = torch.device(storage_device)
        self._store: dict[Hashable, list[torch.Tensor]] = {}
        self.encoder_runs = 0

    def __len__(self) -> int:
        return len(self._store)

    @property
    def stride(self) -> int:
        return self.model.output_stride

    def _check_frozen(self) -> None:
        if any(p.requires_grad for p in self.model.encoder.parameters()):
            raise RuntimeError("EncoderFeatureCache needs a frozen encoder (model.transfer: freeze_encoder)")

    def pyramid(self, key: Hashable) -> list[torch.Tensor]:
        """The encoder's features ``[x, f_2, ..., f_S]`` of image ``key``, each ``(C_l, Hp/2^l, Wp/2^l)``."""
        if key not in self._store:
            self._check_frozen()
            image = self.image_of(key)
            if image.shape[-2] % self.stride or image.shape[-1] % self.stride:
                raise ValueError(f"image {key!r} of shape {tuple(image.shape)} is not padded to a multiple of {self.stride}")
            device = next(self.model.parameters()).device
            # Features must not depend on the batch or the mode: encoder in eval, each module's mode restored.
            modes = {m: m.training for m in self.model.encoder.modules()}
            self.model.encoder.eval()
            try:
                with torch.no_grad():
                    feats = self.model.encode(image[None].to(device))
            finally:
                for m, mode in modes.items():
                    m.training = mode
            self.encoder_runs += 1
            self._store[key] = [f[0].detach().to(self.storage_device) for f in feats]
        return self._store[key]

    def crop(self, key: Hashable, offset: Sequence[int], size: tuple[int, int]) -> list[torch.Tensor]:
        """Features of the patch ``size`` (H, W) at ``offset`` (y, x) of image ``key``; both multiples of S."""
        (y, x), (h, w) = offset, size
        if y % self.stride or x % self.stride or h % self.stride or w % self.stride:
            raise ValueError(f"patch {size} at {tuple(offset)} is not aligned to the encoder stride {self.stride}")
        levels = self.pyramid(key)
        width = levels[0].shape[-1]
        return [f[:, y // s : (y + h) // s, x // s : (x + w) // s] for f in levels for s in [width // f.shape[-1]]]

    def __call__(
        self, keys: Sequence[Hashable], offsets: Sequence[Sequence[int]], size: tuple[int, int]
    ) -> torch.Tensor | list[torch.Tensor]:
        """The model's output (logits ``(B, K, H, W)``, or the deep-supervision list in training mode) for the
        B patches of ``size`` at ``offsets`` of images ``keys``, the decoder running on cached features."""
        if len(keys) != len(offsets):
            raise ValueError(f"{len(keys)} keys for {len(offsets)} offsets")
        crops = [self.crop(k, o, size) for k, o in zip(keys, offsets, strict=True)]
        device = next(self.model.parameters()).device
        features = [torch.stack([c[level] for c in crops]).to(device) for level in range(len(crops[0]))]
        return self.model.forward_padded_features(features, size)
