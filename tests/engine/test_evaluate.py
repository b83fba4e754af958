"""The one evaluation loop (`evaluate_cases`): object metrics where a case has an instance map, through the same
predictions as Dice; a case whose instance map is unreadable or on another grid keeps its Dice and is reported."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from medseg.config import load_config
from medseg.data import discover_cases
from medseg.engine.evaluate import evaluate_cases
from medseg.metrics import object_metrics

REPO = Path(__file__).resolve().parents[2]


class _FixedPredictor:
    """Predicts the same mask for every scan: the union of every case's objects (touching pairs fused)."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def predict_scan(self, scan):
        return SimpleNamespace(mask=self.mask.copy())


def _two_touching_objects(root: Path, n: int = 2) -> tuple[Path, np.ndarray]:
    """``n`` cases of two 10x20 objects sharing an edge: the mask is their union, the instance map tells them apart."""
    instances = np.zeros((32, 48), np.uint8)
    instances[8:18, 4:24], instances[8:18, 24:44] = 1, 2
    for sub in ("images", "masks", "instances"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        Image.fromarray((instances > 0).astype(np.uint8) * 200).save(root / "images" / f"c{i}.png")
        Image.fromarray((instances > 0).astype(np.uint8) * 255).save(root / "masks" / f"c{i}.png")  # the demo label map
        Image.fromarray(instances).save(root / "instances" / f"c{i}.png")
    return root, instances


def test_cases_with_instance_maps_get_aji_and_pq_of_the_same_prediction(tmp_path: Path) -> None:
    root, instances = _two_touching_objects(tmp_path / "data")
    cfg = load_config(REPO / "configs/experiments/demo_nuclei.yaml", [f"data.root={root}"])
    cases = discover_cases(root, instances_dir="instances")
    fused = instances > 0  # a perfect pixel mask that fuses the two objects into one component
    result = evaluate_cases(_FixedPredictor(fused.astype(np.uint8)), cases, cfg, hd95=False)
    assert result.summary["nucleus"][0] == pytest.approx(1.0)  # Dice cannot see the fusion
    expected = object_metrics(fused, instances)
    assert [o["case"] for o in result.objects] == ["c0", "c1"]
    for o in result.objects:
        assert (o["aji"], o["pq"], o["fused"], o["objects"], o["components"]) == (
            pytest.approx(expected["aji"]), pytest.approx(expected["pq"]), 1, 2, 1)
    assert o["pq"] == 0.0 and o["aji"] == pytest.approx(0.5)  # each object's IoU with the blob is 0.5, not above

    separated = fused.copy()
    separated[:, 23:25] = False  # a 2-px gap: two components, each matching its object
    result = evaluate_cases(_FixedPredictor(separated.astype(np.uint8)), cases, cfg, hd95=False)
    assert result.object_summary["pq"][0] > 0.8 and all(o["fused"] == 0 for o in result.objects)


def test_an_instance_map_on_another_grid_is_reported_and_the_dice_kept(tmp_path: Path) -> None:
    root, instances = _two_touching_objects(tmp_path / "data")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "instances" / "c1.png")
    cfg = load_config(REPO / "configs/experiments/demo_nuclei.yaml", [f"data.root={root}"])
    result = evaluate_cases(_FixedPredictor((instances > 0).astype(np.uint8)),
                            discover_cases(root, instances_dir="instances"), cfg, hd95=False)
    assert result.n_cases == 2 and [o["case"] for o in result.objects] == ["c0"]
    assert len(result.failed) == 1 and "c1.png" in result.failed[0] and "grid" in result.failed[0]
