"""A finished segmentation, as kept in ``st.session_state`` between reruns (so viewing never re-runs a model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from app.editing import EditHistory
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

    edited: np.ndarray | None = None  # the user's corrected copy of the mask (None until the first edit)
    history: EditHistory = field(default_factory=EditHistory)
    review: Any = None  # the medseg.review.ReviewRow saved for this result, once reviewed

    @property
    def model_mask(self) -> np.ndarray:
        """The mask as the model produced it (never edited)."""
        return self.prediction.mask

    @property
    def mask(self) -> np.ndarray:
        """What is shown, measured and downloaded: the corrected mask once edited, else the model's."""
        return self.edited if self.edited is not None else self.prediction.mask

    @property
    def was_edited(self) -> bool:
        return self.edited is not None and not np.array_equal(self.edited, self.prediction.mask)

    def edited_mask(self) -> np.ndarray:
        """The editable copy (made on first use)."""
        if self.edited is None:
            self.edited = self.prediction.mask.copy()
        return self.edited

    def file(self, kind: str, make: Callable[[], tuple[str, bytes]]) -> tuple[str, bytes]:
        """``(name, bytes)`` of a download, made once (again only after the mask changed: ``forget_files``)."""
        if kind not in self.files:
            self.files[kind] = make()
        return self.files[kind]

    def forget_files(self) -> None:
        self.files.clear()
