from __future__ import annotations

import numpy as np
import pytest

from medseg.metrics import object_metrics, panoptic_quality, per_label_metrics


def test_per_label_dice_iou_hd95_hand_computed() -> None:
    target = np.zeros((20, 20), np.int64)
    target[5:15, 5:15] = 1  # 100 px
    pred = np.zeros_like(target)
    pred[5:15, 5:10] = 1  # 50 px, all inside
    m = per_label_metrics(pred, target, 2)[1]
    assert m["dice"] == pytest.approx(2 * 50 / 150)
    assert m["iou"] == pytest.approx(50 / 100)
    assert m["hd95"] == pytest.approx(5.0, abs=1.0)  # far edge is 5 px away
    scaled = per_label_metrics(pred, target, 2, spacing=(2.0, 2.0))[1]
    assert scaled["hd95"] == pytest.approx(2 * m["hd95"])


def test_absent_label_counts_as_perfect_dice_and_nan_hd() -> None:
    z = np.zeros((8, 8), np.int64)
    m = per_label_metrics(z, z, 3)
    assert m[1]["dice"] == 1.0 and m[2]["dice"] == 1.0 and np.isnan(m[1]["hd95"])


def _two_touching() -> np.ndarray:
    inst = np.zeros((30, 40), np.int64)
    inst[10:20, 5:20] = 1
    inst[10:20, 20:35] = 2  # touches object 1
    return inst


def test_object_metrics_separated_vs_merged() -> None:
    gt = _two_touching()
    separated = gt > 0
    separated[:, 19:21] = False  # a 2-px gap between the two predicted objects
    merged = gt > 0
    sep, mer = object_metrics(separated, gt), object_metrics(merged, gt)
    assert sep["merged"] == 0 and sep["n_pred"] == 2 and sep["f1"] == 1.0
    assert mer["merged"] == 1 and mer["n_pred"] == 1 and mer["f1"] == 0.0
    assert sep["aji"] > mer["aji"]
    assert object_metrics(gt > 0, gt)["aji"] == pytest.approx(150 / 300)  # one component vs 2 objects
    perfect = object_metrics(separated, np.where(separated, gt, 0))
    assert perfect["aji"] == pytest.approx(1.0)


def test_panoptic_quality_matches_hand_computation() -> None:
    # GT: two 10x10 objects. Prediction: one component over 8 of the 10 columns of the first (IoU 80/100 = 0.8,
    # a match), nothing on the second (FN) and a stray 4x4 blob (FP). SQ = 0.8, RQ = 1 / (1 + 0.5 + 0.5) = 0.5.
    gt = np.zeros((40, 40), np.int32)
    gt[0:10, 0:10] = 1
    gt[20:30, 20:30] = 2
    pred = np.zeros((40, 40), bool)
    pred[0:10, 0:8] = True
    pred[32:36, 0:4] = True
    metrics = object_metrics(pred, gt)
    assert metrics["pq"] == pytest.approx(0.8 * 0.5, abs=1e-5)
    assert object_metrics(gt > 0, gt)["pq"] == pytest.approx(1.0, abs=1e-5)
    assert panoptic_quality(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0


def test_panoptic_quality_does_not_talk_to_other_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the end of a DDP run only rank 0 scores the shipped model; a metric that all-gathers its buffers would wait
    for, or crash on, ranks that are not scoring (MONAI's cumulative metrics do when torch.distributed is up)."""
    import torch.distributed

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as in a DDP run, without peers
    gt = np.zeros((40, 40), np.int32)
    gt[0:10, 0:10], gt[20:30, 20:30] = 1, 2
    assert panoptic_quality(gt, gt) == pytest.approx(1.0, abs=1e-5)
    assert object_metrics(gt > 0, gt)["pq"] == pytest.approx(1.0, abs=1e-5)
