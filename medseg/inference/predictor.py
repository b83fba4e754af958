"""Predictor: a bundle's ensemble applied to scans — preprocessing, overlap-tile/2.5D prediction, test-time
augmentation, member averaging with calibration, argmax/threshold, post-processing — returning masks,
probabilities and uncertainty on the scan's own grid.

Passes per image = members × TTA views (see `medseg.inference.tta`); all are averaged in probability space.
Volumes go slice batch by slice batch (2.5D), and only the batch being predicted exists at more than the output
resolution, so memory is the outputs plus one batch whatever the number of members and views.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.bundle import Bundle, load_bundle
from medseg.config import ExperimentConfig, TTAMode
from medseg.data.preprocess import model_input, prepare_scan
from medseg.inference.backends import Backend, default_backend, member_runner
from medseg.inference.optimize import fold_batchnorm
from medseg.inference.postprocess import measure, postprocess_mask
from medseg.inference.protocol import Progress
from medseg.inference.tiling import ModelFn, slice_batches
from medseg.inference.tta import View, build_views, entropy, predict_probs_tta
from medseg.io import Geometry, Scan
from medseg.models import build_model
from medseg.transforms.resample import from_model_grid

log = logging.getLogger("medseg")

PROGRESS_STEPS = 32  # with a progress callback, a volume is predicted in at least this many slice batches


def expected_tile_calls(shape: tuple[int, int], images: int, cfg: Any) -> int:
    """How many model calls ``predict_logits_2d`` makes for ``images`` images of ``shape`` (MONAI's window grid
    over the mirror-padded image, ``sw_batch_size`` windows a call): the denominator of per-tile progress."""
    from medseg.inference.tiling import tile_margin

    (h, w), (th, tw) = shape, tuple(cfg.tile_size)
    if h <= th and w <= tw:
        return 1
    windows = 1
    for size, tile in ((h, th), (w, tw)):
        padded = size + 2 * tile_margin(size, tile)
        roi = min(tile, padded)
        step = max(1, int(roi * (1 - cfg.overlap)))
        windows *= 1 if padded <= roi else -(-(padded - roi) // step) + 1
    sw_batch = max(1, cfg.call_batch() // max(1, images))
    return -(-windows * images // sw_batch)


@dataclass
class Prediction:
    """``probs (K, *spatial)`` float32, ``mask (*spatial)`` uint8 class indices (post-processed),
    ``uncertainty (*spatial)`` float32 in [0, 1] (``cfg.inference.uncertainty``: normalised entropy or scaled
    variance across passes) — all on the input scan's grid, described by ``geometry``.

    Entropy is a function of ``probs``, so a Prediction made without it (``uncertainty=None``) computes it when it
    is first read: a 512×512×300 CT then never holds the 0.3 GB map unless someone asks for it."""

    probs: np.ndarray
    mask: np.ndarray
    _uncertainty: np.ndarray | None
    geometry: Geometry

    @property
    def uncertainty(self) -> np.ndarray:
        if self._uncertainty is None:
            self._uncertainty = entropy_map(self.probs)
        return self._uncertainty


def entropy_map(probs: np.ndarray, slab: int = 16) -> np.ndarray:
    """Normalised entropy ``(*spatial)`` float32 in [0, 1] of probabilities ``(K, *spatial)`` (`tta.entropy`),
    a volume ``slab`` slices at a time so the temporaries stay small."""
    t = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))
    if t.ndim == 3:
        return entropy(t[None])[0].numpy()
    out = np.empty(t.shape[1:], np.float32)
    for z in range(0, t.shape[1], slab):
        out[z : z + slab] = entropy(t[:, z : z + slab].transpose(0, 1)).numpy()
    return out


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """Ensemble members (``nn.Module`` returning logits ``(B, K, H, W)`` for ``(B, C, H, W)`` input in [0, 1])
    plus the experiment config that says how to preprocess, tile, augment and post-process.

    The config is never changed after construction (one Predictor serves concurrent callers): per-call options
    are arguments (``predict_scan(scan, tta=...)``). ``backend``: what runs the members
    (`medseg.inference.backends`; None: the config's ``inference.backend``), a load-time choice. ``rotations``: with ``tta=full``, also average over 90° rotations (doubles the passes).
    Satisfies ``medseg.inference.protocol.ScanPredictor``.
    """

    def __init__(
        self,
        members: list[torch.nn.Module],
        cfg: ExperimentConfig,
        labels: dict[int, dict[str, str]] | None = None,
        temperature: float = 1.0,
        device: str | torch.device = "auto",
        name: str = "",
        weights_hash: str = "",
        *,
        rotations: bool = False,
        backend: Backend | str | None = None,
    ) -> None:
        if not members:
            raise ValueError("a Predictor needs at least one ensemble member")
        self.device = resolve_device(device) if isinstance(device, str) else device
        # NHWC: oneDNN's CPU convolutions ran 2x faster in it here, and cuDNN's are fastest in it under autocast.
        self.members = [m.to(self.device).eval().to(memory_format=torch.channels_last) for m in members]
        self.cfg = cfg
        # What prediction runs with: the config's inference section with the per-device call batch settled
        # (InferenceConfig.call_batch); the config itself, shared with its other readers, stays as loaded.
        icfg = cfg.inference
        self.inference = icfg.model_copy(update={"batch_size": icfg.call_batch(self.device.type)})
        self.labels = labels or {i: {"name": n, "color": "#ffffff"} for i, n in cfg.data.labels.items()}
        self.temperature = temperature
        self.name = name or cfg.name
        self.weights_hash = weights_hash
        self.rotations = rotations
        # How the members are executed (medseg.inference.backends); a load-time choice, not a per-call one.
        self.backend = Backend(backend or cfg.inference.backend)
        if self.backend is Backend.AUTO:
            self.backend = default_backend(self.device)
        self._runners: list[ModelFn] | None = None
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, os.cpu_count() or 1))

    @classmethod
    def from_bundle(cls, path: str | Path | Bundle, device: str = "auto", backend: Backend | str | None = None) -> Predictor:
        """Load every ensemble member of a bundle once (weights from safetensors only)."""
        bundle = path if isinstance(path, Bundle) else load_bundle(path)
        cfg = bundle.config
        from medseg.errors import BundleError

        members = []
        for name, state in bundle.load_members().items():
            try:
                members.append(build_member(cfg, state))
            except RuntimeError as e:  # load_state_dict: missing/unexpected keys, shapes of another network
                reason = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))[:200]
                raise BundleError(f"{bundle.path.name}/weights/{name}.safetensors: the weights do not fit the "
                                  f"network config.yaml describes ({reason})") from None
        temperature = float((bundle.calibration or {}).get("temperature", 1.0))
        return cls(members, cfg, bundle.labels, temperature, device, cfg.name, bundle.weights_hash, backend=backend)

    @property
    def num_classes(self) -> int:
        return self.cfg.data.num_classes

    # ------------------------------------------------------------------------------------------ passes

    @property
    def model_fns(self) -> list[ModelFn]:
        """One runner per member (built on first use: the ONNX export or compile happens then)."""
        if self._runners is None:
            self._runners = [member_runner(m, self.backend, self.device) for m in self.members]
        return self._runners

    def tta_mode(self, tta: TTAMode | str | None = None) -> TTAMode:
        """The TTA mode a call with ``tta`` uses: the argument, or the bundle's ``inference.tta``."""
        if tta is None:
            return TTAMode(self.inference.tta)
        try:
            return TTAMode(tta)
        except ValueError:
            raise ValueError(f"unknown TTA mode {tta!r}; use {', '.join(TTAMode)}") from None

    def views(self, shape: tuple[int, int], tta: TTAMode | str | None = None) -> list[View]:
        """TTA views (``tta``, default ``cfg.inference.tta``) for slices of spatial ``shape`` (H, W)."""
        return build_views(self.tta_mode(tta), shape, self.inference, self.rotations)

    def passes(self, shape: tuple[int, int], tta: TTAMode | str | None = None) -> int:
        """Model passes per slice (members × views), each a full overlap-tile pass."""
        return len(self.members) * len(self.views(shape, tta))

    # ------------------------------------------------------------------------------------------ images

    def prepare(self, scan: Scan) -> tuple[torch.Tensor, Geometry]:
        """Scan -> (network input ``(C, H, W)`` or ``(C, Z, Y, X)`` float32 in [0, 1] on the model grid, the
        geometry with the operations that led there) — exactly as in training (`prepare_scan`, `model_input`).

        A single-channel volume for a multi-channel net is normalised once and *broadcast* to the channels
        (a view, not a copy): for a 512×512×300 CT that saves 2 of 3 GB of float32.
        """
        data = self.cfg.data
        prepared = prepare_scan(scan, data)
        if scan.is_volume and prepared.image.shape[0] == 1 and data.channels > 1:
            one = model_input(prepared.image, data.model_copy(update={"channels": 1}), prepared.bounds, scan.source)
            x = torch.from_numpy(np.ascontiguousarray(one)).expand(data.channels, *one.shape[1:])
        else:
            x = torch.from_numpy(np.ascontiguousarray(prepared.model_input(data, scan.source), dtype=np.float32))
        if scan.is_volume and x.ndim != 4:
            raise ValueError("volume preprocessing lost its depth axis")
        return x, prepared.geometry

    @torch.inference_mode()
    def predict_image(
        self, image: np.ndarray | torch.Tensor, *, tta: TTAMode | str | None = None, progress: Progress | None = None,
        uncertainty: bool = True,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(probs (K, *spatial), uncertainty (*spatial))`` for a preprocessed image ``(C, H, W)`` or volume
        ``(C, Z, Y, X)``: the mean over members × TTA views (``tta``; None: the config's) of
        ``softmax(logits / temperature)``. ``uncertainty=False``: None instead of the map (not computed)."""
        x = torch.as_tensor(image, dtype=torch.float32)
        icfg = self.inference
        variance = icfg.uncertainty == "variance"
        views = self.views((int(x.shape[-2]), int(x.shape[-1])), tta)
        batch_size = icfg.call_batch()
        if x.ndim == 4 and progress is not None:
            # A progress bar that moves: at least PROGRESS_STEPS updates per volume (one per slice for small
            # volumes, whose single 32-slice batch otherwise showed 0 % until the very end).
            batch_size = max(1, min(batch_size, -(-int(x.shape[1]) // PROGRESS_STEPS)))
        if x.ndim == 3:
            batches: Any = [(0, 1, x[None])]
            n_batches = 1
        else:
            batches = slice_batches(x, self.cfg.data.context_slices, batch_size)
            n_batches = -(-int(x.shape[1]) // batch_size)
        total = max(1, n_batches * len(self.members) * len(views))
        done = [0, 0]  # passes finished, model calls (tiles) in the current pass

        def on_pass() -> None:
            done[0], done[1] = done[0] + 1, 0
            if progress is not None:
                progress(min(1.0, done[0] / total))

        fns = self.model_fns
        if progress is not None and x.ndim == 3:
            # A large 2D image is one pass of many tiles: report per tile call within the pass.
            calls = expected_tile_calls((int(x.shape[-2]), int(x.shape[-1])), 1, icfg)

            def counted(fn: ModelFn) -> ModelFn:
                def run(t: torch.Tensor) -> torch.Tensor:
                    out = fn(t)
                    done[1] += 1
                    if calls > 1:
                        progress(min(1.0, (done[0] + min(0.99, done[1] / calls)) / total))
                    return out

                return run

            fns = [counted(fn) for fn in fns]

        probs: np.ndarray | None = None
        unc: np.ndarray | None = None
        for start, stop, batch in batches:
            acc = predict_probs_tta(fns, batch, icfg, self.temperature, views, variance, on_pass)
            mean = acc.mean()  # (b, K, H, W)
            u = acc.uncertainty(icfg.uncertainty) if uncertainty else None  # (b, H, W)
            if x.ndim == 3:
                return mean[0].numpy(), None if u is None else u[0].numpy()
            if probs is None:  # allocated once the class count is known; filled batch by batch
                probs = np.empty((mean.shape[1], x.shape[1], *mean.shape[2:]), dtype=np.float32)
                if u is not None:
                    unc = np.empty((x.shape[1], *mean.shape[2:]), dtype=np.float32)
            probs[:, start:stop] = mean.transpose(0, 1).numpy()
            if unc is not None and u is not None:
                unc[start:stop] = u.numpy()
        assert probs is not None
        return probs, unc

    def predict_probs(self, image: np.ndarray | torch.Tensor, *, tta: TTAMode | str | None = None) -> np.ndarray:
        """Ensemble- and TTA-mean, temperature-scaled softmax ``(K, *spatial)`` for a preprocessed image
        ``(C, *spatial)``."""
        return self.predict_image(image, tta=tta, uncertainty=False)[0]

    def probs_to_mask(self, probs: np.ndarray) -> np.ndarray:
        """``(K, *spatial)`` -> ``(*spatial)`` uint8: foreground ``>= threshold`` for binary tasks when
        ``cfg.inference.threshold`` is set, else argmax."""
        thr = self.inference.threshold
        if thr is not None and probs.shape[0] == 2:
            return (probs[1] >= thr).astype(np.uint8)
        return probs.argmax(0).astype(np.uint8)

    def predict_scan(
        self, scan: Scan, *, tta: TTAMode | str | None = None, progress: Progress | None = None
    ) -> Prediction:
        """Segment one scan. ``tta``: this call's test-time augmentation (None: the bundle's
        ``inference.tta``); ``progress(fraction)`` is called after every model pass (0 < fraction <= 1).

        The network sees the scan on the model grid (the plan's scale, slices along the planned axis); class
        probabilities and uncertainty are brought back to the scan's own grid *before* argmax, so the mask is
        exact on the input grid."""
        mode = self.tta_mode(tta)  # an unknown mode fails before any preprocessing
        x, grid = self.prepare(scan)
        # Entropy is computed from the final probabilities when first read (Prediction.uncertainty); only the
        # variance across passes must be gathered during the passes.
        variance = self.inference.uncertainty == "variance"
        probs, uncertainty = self.predict_image(x, tta=mode, progress=progress, uncertainty=variance)
        if grid.operations:
            probs = from_model_grid(probs, grid)
            if uncertainty is not None:
                uncertainty = np.clip(from_model_grid(uncertainty[None], grid)[0], 0.0, 1.0)
        mask = self._mask_in_slabs(probs)
        mask = postprocess_mask(mask, self.inference, self.num_classes)
        return Prediction(probs, mask, uncertainty, scan.geometry)

    def _mask_in_slabs(self, probs: np.ndarray) -> np.ndarray:
        # argmax over a whole volume would allocate an int64 array 8x the mask's size; do it slab-wise.
        if probs.ndim == 3:
            return self.probs_to_mask(probs)
        mask = np.empty(probs.shape[1:], dtype=np.uint8)
        for z in range(0, probs.shape[1], 16):
            mask[z : z + 16] = self.probs_to_mask(probs[:, z : z + 16])
        return mask

    def measure(self, pred: Prediction) -> dict[int, dict[str, Any]]:
        """Per-label voxel count, components and area (mm²) / volume (mL) of a prediction's mask."""
        return measure(pred.mask, pred.geometry, self.labels)


def build_member(cfg: ExperimentConfig, state: dict[str, torch.Tensor], fold: bool = True) -> torch.nn.Module:
    """One ensemble member from its state dict (the architecture from ``cfg.model``; no pretrained download),
    in eval mode, with BatchNorm folded into the convolutions when ``fold`` (same outputs, faster)."""
    model_cfg = cfg.model.model_copy(update={"pretrained": "none"})  # weights come from the bundle
    model = build_model(model_cfg, cfg.data.input_channels, cfg.data.num_classes)
    model.load_state_dict(state)
    model.eval()
    if fold:
        model, _ = fold_batchnorm(model, torch.rand(1, cfg.data.input_channels, 32, 32))
    return model
