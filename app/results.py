"""A finished segmentation, as kept in ``st.session_state`` between reruns (so viewing never re-runs a model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from app.exports import Provenance
from app.gate import Decision
from app.predictors import ModelInfo
from medseg.io import Scan


@dataclass
class Result:
    """``key`` says what produced it: (input SHA-256, series, model weights, TTA); a rerun with the same key
    reuses this object instead of predicting again."""

    key: tuple
    scan: Scan
    prediction: Any  # medseg.inference.Prediction (or the remote client's equivalent)
    info: ModelInfo
    provenance: Provenance
    seconds: float
    read_warnings: list[str] = field(default_factory=list)
    truth: np.ndarray | None = None
    truth_name: str = ""
    truth_marker: tuple | None = None  # which ground-truth upload ``truth``/``truth_error`` belong to
    truth_error: str = ""
    table: pd.DataFrame | None = None
    auto_window: tuple[float, float] | None = None  # the scan's percentile window (display), computed once
    decision: Decision = field(default_factory=Decision)  # compatibility problems and whether run anyway
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # download name/bytes by kind, made once

    @property
    def mask(self) -> np.ndarray:
        return self.prediction.mask

    def file(self, kind: str, make: Callable[[], tuple[str, bytes]]) -> tuple[str, bytes]:
        """``(name, bytes)`` of a download, made once (again only after the mask changed: ``forget_files``)."""
        if kind not in self.files:
            self.files[kind] = make()
        return self.files[kind]

    def forget_files(self) -> None:
        self.files.clear()
