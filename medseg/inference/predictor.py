"""Predictor: a bundle's ensemble applied to scans — preprocessing, overlap-tile/2.5D prediction,
member averaging with calibration, argmax/threshold — returning masks on the scan's own grid."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg.bundle import Bundle, load_bundle
from medseg.config import ExperimentConfig
from medseg.data.preprocess import prepare_image
from medseg.inference.tiling import predict_logits_case
from medseg.io import Geometry, Scan
from medseg.models import build_model

log = logging.getLogger("medseg")


@dataclass
class Prediction:
    """``probs (K, *spatial)`` float32, ``mask (*spatial)`` uint8 class indices, ``uncertainty (*spatial)``
    (normalised entropy in [0, 1]) — all on the input scan's grid, described by ``geometry``."""

    probs: np.ndarray
    mask: np.ndarray
    uncertainty: np.ndarray
    geometry: Geometry


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    def __init__(
        self,
        members: list[torch.nn.Module],
        cfg: ExperimentConfig,
        labels: dict[int, dict[str, str]] | None = None,
        temperature: float = 1.0,
        device: str | torch.device = "auto",
        name: str = "",
        weights_hash: str = "",
    ) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.members = [m.to(self.device).eval() for m in members]
        self.cfg = cfg
        self.labels = labels or {i: {"name": n, "color": "#ffffff"} for i, n in cfg.data.labels.items()}
        self.temperature = temperature
        self.name = name or cfg.name
        self.weights_hash = weights_hash
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, os.cpu_count() or 1))

    @classmethod
    def from_bundle(cls, path: str | Path | Bundle, device: str = "auto") -> Predictor:
        """Load every ensemble member of a bundle once (weights from safetensors only)."""
        bundle = path if isinstance(path, Bundle) else load_bundle(path)
        cfg = bundle.config
        model_cfg = cfg.model.model_copy(update={"pretrained": "none"})  # weights come from the bundle
        members = []
        for state in bundle.load_members().values():
            model = build_model(model_cfg, cfg.data.input_channels, cfg.data.num_classes)
            model.load_state_dict(state)
            members.append(model)
        temperature = float((bundle.calibration or {}).get("temperature", 1.0))
        return cls(members, cfg, bundle.labels, temperature, device, cfg.name, bundle.weights_hash)

    @property
    def num_classes(self) -> int:
        return self.cfg.data.num_classes

    def _model_fn(self, model: torch.nn.Module):
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
                return model(x.to(self.device)).float().cpu()

        return run

    @torch.inference_mode()
    def predict_probs(self, image: np.ndarray | torch.Tensor) -> np.ndarray:
        """Ensemble-mean, temperature-scaled softmax ``(K, *spatial)`` for a preprocessed image ``(C, *spatial)``."""
        x = torch.as_tensor(image, dtype=torch.float32)
        acc: torch.Tensor | None = None
        for model in self.members:
            logits = predict_logits_case(self._model_fn(model), x, self.cfg.data.context_slices, self.cfg.inference)
            p = torch.softmax(logits / self.temperature, dim=0)
            acc = p if acc is None else acc + p
        assert acc is not None
        return (acc / len(self.members)).numpy().astype(np.float32)

    def probs_to_mask(self, probs: np.ndarray) -> np.ndarray:
        thr = self.cfg.inference.threshold
        if thr is not None and probs.shape[0] == 2:
            return (probs[1] >= thr).astype(np.uint8)
        return probs.argmax(0).astype(np.uint8)

    def predict_scan(self, scan: Scan) -> Prediction:
        image = prepare_image(scan, self.cfg.data)
        if scan.is_volume and image.ndim != 4:
            raise ValueError("volume preprocessing lost its depth axis")
        probs = self.predict_probs(image)
        mask = self.probs_to_mask(probs)
        entropy = -(probs * np.log(np.clip(probs, 1e-8, 1.0))).sum(0) / np.log(probs.shape[0])
        return Prediction(probs, mask, entropy.astype(np.float32), scan.geometry)
