"""``ScanPredictor``: what the CLI, the web app and the service need of a model, whether it runs in this process
(``medseg.inference.Predictor``) or behind the inference service (``medseg.service.client.RemotePredictor``).

Per-call options (test-time augmentation, progress reports) are arguments of ``predict_scan``, never settings to
change on a shared object: one loaded model serves every caller, whatever TTA each asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from medseg.config import TTAMode

if TYPE_CHECKING:
    from medseg.inference.predictor import Prediction
    from medseg.io import Scan

Progress = Callable[[float], None]


@runtime_checkable
class ScanPredictor(Protocol):
    """A model that segments scans. ``labels``: class index -> ``{"name", "color"}``; ``device``: a
    ``torch.device`` (the server's, for a remote model); ``weights_hash`` identifies the weights."""

    name: str
    weights_hash: str
    labels: dict[int, dict[str, str]]

    @property
    def device(self) -> Any: ...

    def predict_scan(
        self, scan: Scan, *, tta: TTAMode | str | None = None, progress: Progress | None = None
    ) -> Prediction:
        """Segment one scan on its own grid. ``tta``: None for the model's default; ``progress(fraction)`` is
        called as the work advances (0 < fraction <= 1)."""
        ...
