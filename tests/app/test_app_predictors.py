"""The app's model choice: one loaded model per bundle, the session's TTA mode passed to every call."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.predictors import TTA_LABELS, TTA_MODES, get_predictor, run_inference
from medseg.config import TTAMode
from medseg.inference import Predictor
from medseg.io import Geometry, Scan


def test_one_loaded_model_serves_every_tta_mode(models_dir: Path) -> None:
    bundle = models_dir / "tiny-nuclei"
    predictor = get_predictor(inference_url=None, bundle_path=bundle)
    assert isinstance(predictor, Predictor)
    assert get_predictor(inference_url=None, bundle_path=bundle) is predictor  # cached per bundle, not per mode
    default = predictor.cfg.inference.tta
    scan = Scan(np.random.default_rng(0).integers(0, 256, (48, 40), dtype=np.uint8), Geometry.identity((48, 40)))
    fractions: dict[str, list[float]] = {}
    for mode in TTA_MODES:
        fractions[mode] = []
        run_inference(predictor, scan, fractions[mode].append, tta=mode)
    members = len(predictor.members)
    assert {m: len(f) for m, f in fractions.items()} == {"none": members, "flips": 4 * members,
                                                         "multicrop": 5 * members, "full": 20 * members}
    assert predictor.cfg.inference.tta == default  # nothing was set on the shared model
    assert set(TTA_LABELS) == set(TTAMode) == set(TTA_MODES)
