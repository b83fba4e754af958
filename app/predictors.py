"""The one place that decides *what* segments a scan: an in-process ``Predictor`` loaded from a bundle, or the
remote inference service when ``MEDSEG_INFERENCE_URL`` is set. Both are ``medseg.inference.protocol.ScanPredictor``:
``predict_scan(scan, tta=..., progress=...) -> Prediction``.

Models are cached with ``st.cache_resource`` (shared by all sessions, loaded once per bundle); they are never
mutated after loading: each session's TTA mode goes to every ``predict_scan`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from medseg.bundle import Bundle, find_bundles, load_bundle
from medseg.config import TTAMode
from medseg.inference.protocol import ScanPredictor
from medseg.io import Scan

TTA_MODES = tuple(TTAMode)
TTA_LABELS = {
    TTAMode.none: "Off (fastest)",
    TTAMode.flips: "Flips",
    TTAMode.multicrop: "Multi-crop",
    TTAMode.full: "Flips + multi-crop (slowest)",
}


@dataclass(frozen=True)
class ModelInfo:
    """What the page shows about the model that produced a result (and what the audit log records)."""

    name: str
    version: str  # "" when the bundle records no version
    weights_hash: str
    device: str
    labels: dict[int, dict[str, str]]
    model_card: str = ""
    description: str = ""
    label_map: dict[int, int] = field(default_factory=dict)  # raw mask value -> class (for ground truths)
    remote: bool = False


def list_bundles(models_dir: Path) -> list[Path]:
    return find_bundles(models_dir)


def _stamp(path: Path) -> float:
    """Changes when a bundle is replaced on disk (``save_bundle`` swaps the folder), so the cache reloads."""
    weights = path / "weights"
    return (weights if weights.is_dir() else path).stat().st_mtime


@st.cache_resource(show_spinner="Loading model…", max_entries=8)
def _bundle(path: str, stamp: float) -> Bundle:
    return load_bundle(path)  # a .zip bundle is extracted once here, not on every rerun


@st.cache_resource(show_spinner="Loading model…", max_entries=4)
def _local_predictor(path: str, stamp: float) -> ScanPredictor:
    from medseg.inference import Predictor

    return Predictor.from_bundle(_bundle(path, stamp))


@st.cache_resource(show_spinner="Connecting to the inference service…")
def _remote_predictor(url: str, version: str = "") -> ScanPredictor:
    from medseg.service.client import RemotePredictor

    predictor = RemotePredictor(url)
    predictor.version = version  # known from the service's version list, not from the version's own API
    return predictor


def remote_versions(url: str) -> list[dict[str, Any]]:
    """The service's model and its fine-tuned versions (``GET /v1/versions``), oldest first; each version's API is
    at ``url + base_path``. Asked on every run, so a version trained meanwhile shows up."""
    return _remote_predictor(url).versions()  # type: ignore[attr-defined]


def load_bundle_cached(path: Path) -> Bundle:
    return _bundle(str(path), _stamp(path))


def get_predictor(*, inference_url: str | None, bundle_path: Path | None, version: str = "") -> ScanPredictor:
    """The predictor to use: the remote service (or one of its fine-tuned versions) when a URL is given, else the
    bundle in-process (one loaded model per bundle, whatever TTA mode each session picks)."""
    if inference_url:
        return _remote_predictor(inference_url, version)
    if bundle_path is None:
        raise ValueError("no model bundle chosen")
    return _local_predictor(str(bundle_path), _stamp(bundle_path))


def device_text(device: Any, remote: bool = False) -> str:
    """``cuda:0`` -> ``GPU (NVIDIA H100…)``, ``cpu`` -> ``CPU``; a remote device is named, never queried here."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if remote:
        return f"{'GPU' if kind == 'cuda' else kind.upper() or 'unknown'} ({device}) on the inference service"
    if kind == "cuda":
        import torch

        index = getattr(device, "index", None)
        return f"GPU ({torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())})"
    return kind.upper() if kind else "unknown"


def describe(predictor: Any, bundle: Bundle | None) -> ModelInfo:
    """ModelInfo from a predictor (and its bundle when local)."""
    weights_hash = str(getattr(predictor, "weights_hash", "") or (bundle.weights_hash if bundle else ""))
    cfg = getattr(predictor, "cfg", None) or (bundle.config if bundle else None)
    version = ""
    if bundle is not None:
        version = str(bundle.extra.get("version") or bundle.preprocessing.get("version") or "")
    version = version or str(getattr(predictor, "version", "") or "")
    return ModelInfo(
        name=str(getattr(predictor, "name", "") or (bundle.name if bundle else "model")),
        version=version,  # "" when the bundle records none; the weights hash still identifies the model
        weights_hash=weights_hash,
        device=device_text(getattr(predictor, "device", ""), remote=bundle is None),
        labels={int(k): dict(v) for k, v in dict(getattr(predictor, "labels", None) or {}).items()},
        model_card=bundle.model_card if bundle else str(getattr(predictor, "model_card", "") or ""),
        description=str(cfg.description) if cfg is not None and getattr(cfg, "description", None) else "",
        label_map=dict(cfg.data.label_map) if cfg is not None else dict(getattr(predictor, "label_map", {}) or {}),
        remote=bundle is None,
    )


def run_inference(
    predictor: ScanPredictor, scan: Scan, on_progress: Callable[[float], None] | None = None,
    tta: TTAMode | str | None = None,
) -> Any:
    """``predictor.predict_scan(scan, tta=tta)`` (None: the bundle's TTA), reporting progress clamped to [0, 1]."""
    progress = None
    if on_progress is not None:
        def progress(fraction: float) -> None:
            on_progress(min(1.0, max(0.0, float(fraction))))
    return predictor.predict_scan(scan, tta=tta, progress=progress)
