"""Predictor over real (tiny, untrained) bundles: ensembles, calibration, uncertainty, preprocessing, geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from inference_helpers import tiny_state

from medseg.data.preprocess import prepare_image
from medseg.inference import Predictor
from medseg.inference.outputs import ModelStamp, write_prediction_outputs
from medseg.inference.predictor import build_member
from medseg.io import Geometry, Scan, read_scan


def _image(seed: int = 0, shape: tuple[int, int] = (60, 53)) -> Scan:
    rng = np.random.default_rng(seed)
    return Scan(rng.integers(0, 256, shape, dtype=np.uint8), Geometry.identity(shape), "img.png")


def test_two_identical_members_equal_one(make_bundle) -> None:
    two = Predictor.from_bundle(make_bundle("two", {"a": 3, "b": 3}), device="cpu")
    assert len(two.members) == 2 and two.num_classes == 2
    one = Predictor(two.members[:1], two.cfg, two.labels, device="cpu")
    other = build_member(two.cfg, tiny_state(two.cfg, seed=4))
    different = Predictor([two.members[0], other], two.cfg, two.labels, device="cpu")
    scan = _image()
    p1, p2, p3 = (p.predict_scan(scan) for p in (one, two, different))
    np.testing.assert_allclose(p2.probs, p1.probs, atol=1e-6)
    np.testing.assert_array_equal(p2.mask, p1.mask)
    # A genuinely different member changes the average (the members really are both used).
    assert np.abs(p3.probs - p1.probs).max() > 1e-4
    np.testing.assert_allclose(p3.probs.sum(0), 1.0, atol=1e-5)


def test_calibration_temperature_softens_probabilities(make_bundle) -> None:
    hot = Predictor.from_bundle(make_bundle("t2", {"a": 5}, temperature=2.0), device="cpu")
    assert hot.temperature == 2.0  # read from the bundle's calibration.json
    plain = Predictor(hot.members, hot.cfg, hot.labels, temperature=1.0, device="cpu")
    scan = _image(1)
    pp, ph = plain.predict_scan(scan), hot.predict_scan(scan)
    logit = np.log(pp.probs[1]) - np.log(pp.probs[0])  # softmax(l / T): the logit gap is divided by T
    np.testing.assert_allclose(np.log(ph.probs[1]) - np.log(ph.probs[0]), logit / 2, atol=1e-3)
    np.testing.assert_array_equal(ph.mask, pp.mask)  # argmax is unchanged by a temperature


def test_uncertainty_entropy_and_variance(make_bundle) -> None:
    predictor = Predictor.from_bundle(make_bundle("u", {"a": 1, "b": 2}), device="cpu")
    scan = _image(2)
    pred = predictor.predict_scan(scan)
    p = pred.probs
    expected = -(p * np.log(np.clip(p, 1e-8, 1))).sum(0) / np.log(2)
    np.testing.assert_allclose(pred.uncertainty, expected, atol=1e-5)
    cfg = predictor.cfg.model_copy(update={"inference": predictor.cfg.inference.model_copy(update={"uncertainty": "variance"})})
    var = Predictor(predictor.members, cfg, device="cpu").predict_scan(scan).uncertainty
    assert var.shape == scan.spatial_shape and 0 <= var.min() and var.max() <= 1 and var.max() > 0
    assert np.abs(var - pred.uncertainty).max() > 1e-3  # not the entropy again
    single = Predictor([predictor.members[0]], cfg, device="cpu").predict_scan(scan).uncertainty
    assert np.all(single == 0)  # one member, one pass: nothing to disagree with


def test_lean_volume_preprocessing_matches_training(make_bundle, hippo_image: Path) -> None:
    predictor = Predictor.from_bundle(make_bundle("p", {"a": 0}), device="cpu")
    scan = read_scan(hippo_image)
    lean, grid = predictor.prepare(scan)
    full = prepare_image(scan, predictor.cfg.data)
    assert grid.operations == ()  # native grid: nothing to undo
    assert tuple(lean.shape) == full.shape and lean.shape[0] == 3
    assert lean.stride()[0] == 0  # the channels are a broadcast view, not three copies
    np.testing.assert_allclose(lean.numpy(), full, atol=2e-3)


def test_volume_outputs_keep_the_input_geometry(make_bundle, hippo_image: Path, tmp_path: Path) -> None:
    bundle = make_bundle("h", {"a": 0}, ["data.channels=1", "data.context_slices=1", "inference.batch_size=32",
                                         "data.labels={0: bg, 1: anterior, 2: posterior}"])
    predictor = Predictor.from_bundle(bundle, device="cpu")
    scan = read_scan(hippo_image)
    pred = predictor.predict_scan(scan)
    assert pred.mask.shape == scan.spatial_shape and pred.probs.shape == (3, *scan.spatial_shape)
    written = write_prediction_outputs(scan, pred, predictor.labels, tmp_path, "hippo", label_map=predictor.cfg.data.label_map,
                                       model=ModelStamp(predictor.name, predictor.weights_hash), probabilities=True,
                                       uncertainty=True)
    source = sitk.ReadImage(str(hippo_image))
    for kind in ("mask", "uncertainty", "probabilities"):
        out = sitk.ReadImage(str(written[kind]))
        assert out.GetSize() == source.GetSize(), kind
        np.testing.assert_allclose(out.GetSpacing(), source.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(out.GetOrigin(), source.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(out.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written["mask"]))), pred.mask)
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(written["uncertainty"]))),
                               pred.uncertainty, atol=1e-6)
    sizes = predictor.measure(pred)
    assert set(sizes) == {1, 2} and sizes[1]["name"] == "anterior" and "volume_ml" in sizes[1]


def test_every_unetplusplus_inference_head_predicts_from_its_bundle(make_bundle) -> None:
    """A deep-supervised UNet++ bundle predicts with the head its config names (model.inference_head): the
    probabilities are that head's softmax (BatchNorm folded or not), and the three heads give three answers."""
    import torch

    scan = _image(3, (64, 64))
    probs = {}
    for head in ("full", "mean", "pruned"):
        bundle = make_bundle(head, {"model": 7}, ["model.arch=unetplusplus", "model.deep_supervision=true",
                                                  f"model.inference_head={head}", "model.pruned_depth=2"])
        predictor = Predictor.from_bundle(bundle, device="cpu")
        assert predictor.cfg.model.inference_head == head
        probs[head] = predictor.predict_scan(scan).probs
        net = build_member(predictor.cfg, tiny_state(predictor.cfg, seed=7), fold=False)
        with torch.no_grad():
            expected = torch.softmax(net(predictor.prepare(scan)[0][None]), 1)[0].numpy()
        np.testing.assert_allclose(probs[head], expected, atol=1e-4)
    assert np.abs(probs["full"] - probs["mean"]).max() > 1e-3
    assert np.abs(probs["full"] - probs["pruned"]).max() > 1e-3
    assert np.abs(probs["mean"] - probs["pruned"]).max() > 1e-3
