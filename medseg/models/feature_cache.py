"""Cache a frozen encoder's features per case, so decoder-only training skips the encoder after epoch 1.

Valid only when the encoder is frozen (no parameter trains, BatchNorm in eval mode) and a case's input is the
same every time it is seen (no random spatial or intensity augmentation): then its features never change.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from medseg.models.network import SegmentationNet, reflect_pad_to_multiple


class EncoderFeatureCache:
    """Runs ``model`` with encoder features looked up by case key instead of recomputed.

    >>> cache = EncoderFeatureCache(model)
    >>> logits = cache(x, keys=["case_001", "case_002"])   # x: (B, C, H, W) -> same as model(x)

    Features are stored per sample, detached, on ``storage_device`` (default: CPU, to spare accelerator memory),
    for the padded input. Memory grows with the number of distinct keys; ``clear()`` empties it.
    """

    def __init__(self, model: SegmentationNet, storage_device: str | torch.device = "cpu") -> None:
        self.model = model
        self.storage_device = torch.device(storage_device)
        self._store: dict[Hashable, list[torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def _check_frozen(self) -> None:
        if any(p.requires_grad for p in self.model.encoder.parameters()):
            raise RuntimeError("EncoderFeatureCache needs a frozen encoder (model.transfer: freeze_encoder)")

    def __call__(self, x: torch.Tensor, keys: Sequence[Hashable]) -> torch.Tensor | list[torch.Tensor]:
        """(B, C, H, W) input and B case keys -> the model's output for ``x`` (logits or deep-supervision list)."""
        self._check_frozen()
        if len(keys) != x.shape[0]:
            raise ValueError(f"{len(keys)} keys for a batch of {x.shape[0]}")
        size = (x.shape[-2], x.shape[-1])
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        if missing:
            xp = reflect_pad_to_multiple(x[missing], self.model.output_stride)
            # Features must not depend on the batch (eval-mode BatchNorm); restore each module's mode after.
            modes = {m: m.training for m in self.model.encoder.modules()}
            self.model.encoder.eval()
            with torch.no_grad():
                feats = self.model.encode(xp)
            for m, mode in modes.items():
                m.training = mode
            for j, i in enumerate(missing):
                self._store[keys[i]] = [f[j].detach().to(self.storage_device) for f in feats]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        device = x.device
        per_sample = [self._store[k] for k in keys]
        features = [
            torch.stack([s[level] for s in per_sample]).to(device) for level in range(len(per_sample[0]))
        ]
        return self.model.forward_padded_features(features, size)
