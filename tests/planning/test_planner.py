"""Planner decisions on synthetic fingerprints: each kind of data gets the scale, slicing and intensity scheme
it needs, the user's keys win, and the plan stays valid as a config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from medseg.config import ExperimentConfig, Intensity, Resample, load_config
from medseg.errors import DatasetError
from medseg.planning import apply_plan, cpu_profile, explicit_keys, gpu_profile, plan_experiment
from medseg.planning.fingerprint import CaseFingerprint, Fingerprint, IntensityStats, ObjectStats
from medseg.planning.planner import MIN_STEPS, MIN_THICKNESS, infer_label_map, resampled_shapes

CPU = cpu_profile(2)


def _case(i: int, shape, spacing=None, *, channels=1, dtype="uint8", stated=False, modality=None, lo=0.0, hi=255.0,
          thickness=20.0, fg=0.1, values=(0, 255)) -> CaseFingerprint:
    n = int(np.prod(shape))
    fg_vox = int(fg * n)
    mask = {values[0]: n - fg_vox, **{v: fg_vox // (len(values) - 1) for v in values[1:]}}
    objects = {v: ObjectStats(3, fg_vox / 3, thickness) for v in values[1:]}
    objects[values[0]] = ObjectStats(1, n - fg_vox, 10 * thickness)
    stats = IntensityStats(lo, hi, (lo + hi) / 2, (hi - lo) / 4, lo, hi)
    return CaseFingerprint(f"c{i}", tuple(shape), tuple(spacing or (1.0,) * len(shape)), stated, channels, dtype,
                           modality, stats, stats, mask, objects)


def _fp(cases, fg=None) -> Fingerprint:
    return Fingerprint(len(cases), cases, fg or IntensityStats(-100.0, 250.0, 60.0, 50.0, -1000.0, 2000.0))


def _plan(fp, *sets, device=CPU, budget=None):
    cfg = load_config(None, list(sets))
    return plan_experiment(fp, cfg, device, budget, explicit=explicit_keys(cfg)), cfg


def test_anisotropic_ct_slices_along_the_coarse_axis_with_one_neighbour_and_a_dataset_window() -> None:
    rng = np.random.default_rng(0)
    cases = [_case(i, (int(rng.integers(40, 80)), 512, 512), (5.0, 0.7 + 0.05 * (i % 3), 0.7 + 0.05 * (i % 3)),
                   dtype="int16", stated=True, lo=-1024, hi=1500, values=(0, 1)) for i in range(12)]
    fg = IntensityStats(-120.0, 260.0, 55.0, 40.0, -900.0, 1200.0)
    plan, _ = _plan(_fp(cases, fg), budget=20)
    assert plan.get("data.slice_axis") == 0 and plan.get("data.context_slices") == 1
    assert plan.get("data.intensity") == Intensity.fixed and plan.get("data.intensity_range") == [-120.0, 260.0]
    assert plan.get("data.resample") == Resample.spacing
    target = plan.get("data.target_spacing")
    assert target[0] == pytest.approx(5.0) and target[1] == pytest.approx(np.median([c.spacing[1] for c in cases]))
    assert plan.get("data.channels") == 1


def test_anisotropy_along_another_axis_moves_the_slice_axis() -> None:
    cases = [_case(i, (200, 220, 30), (0.8, 0.8, 4.0), stated=True, dtype="int16", lo=0, hi=900, values=(0, 1))
             for i in range(6)]
    plan, _ = _plan(_fp(cases))
    assert plan.get("data.slice_axis") == 2 and plan.get("data.context_slices") == 1
    assert plan.get("data.intensity") == Intensity.percentile  # not CT: per image
    shapes = resampled_shapes(_fp(cases), plan)
    assert shapes[0].tolist() == [30, 200, 220]  # slice axis first, in-plane after


def test_isotropic_volumes_keep_axis_0_and_two_neighbours() -> None:
    cases = [_case(i, (36, 50, 35), (1.0, 1.0, 1.0), stated=True, values=(0, 1, 2)) for i in range(8)]
    plan, _ = _plan(_fp(cases))
    assert plan.get("data.slice_axis") == 0 and plan.get("data.context_slices") == 2
    assert plan.get("data.resample") == Resample.none
    assert plan.get("data.label_map") == {0: 0, 1: 1, 2: 2} and len(plan.get("data.labels")) == 3


def test_photos_of_300_to_2000_px_are_resized_with_their_aspect_kept() -> None:
    rng = np.random.default_rng(1)
    sides = np.exp(rng.uniform(np.log(300), np.log(2000), 40))
    cases = [_case(i, (int(s * 0.75), int(s)), channels=3) for i, s in enumerate(sides)]
    plan, cfg = _plan(_fp(cases), budget=20)
    assert plan.get("data.resample") == Resample.size
    size = plan.get("data.target_size")
    assert size % 32 == 0 and 64 <= size <= np.median(np.sqrt([c.shape[0] * c.shape[1] for c in cases]))
    assert plan.get("data.channels") == 3 and plan.get("data.intensity") == Intensity.percentile
    shapes = resampled_shapes(_fp(cases), plan)
    ratios = shapes[:, 0] / shapes[:, 1]
    np.testing.assert_allclose(ratios, [c.shape[0] / c.shape[1] for c in cases], rtol=1e-6)  # aspect kept
    np.testing.assert_allclose(np.sqrt(shapes[:, 0] * shapes[:, 1]), size, rtol=1e-6)  # every image lands on it
    patch = plan.get("data.patch_size")
    assert patch[0] * patch[1] >= 0.8 * np.median(shapes[:, 0] * shapes[:, 1])  # a patch sees (nearly) a whole image
    planned, applied = apply_plan(cfg, plan)
    assert planned.data.resample == Resample.size and "data.target_size" in applied


def test_uniform_512_xrays_stay_native() -> None:
    cases = [_case(i, (512, 512), fg=0.3, thickness=150) for i in range(50)]
    plan, _ = _plan(_fp(cases), budget=20)
    assert plan.get("data.resample") == Resample.none
    assert plan.get("data.channels") == 1 and plan.get("inference.tile_size") == [512, 512]


def test_near_uniform_small_images_stay_native_and_their_patch_covers_them() -> None:
    cases = [_case(i, (252 + 2 * (i % 5), 284 + 4 * (i % 3))) for i in range(30)]  # 252-260 x 284-292 px
    plan, _ = _plan(_fp(cases), budget=20)
    assert plan.get("data.resample") == Resample.none and plan.get("data.patch_size") == [256, 288]
    assert plan.get("data.foreground_share") == 0.0  # nothing to bias: the patch holds (nearly all of) the image


def test_thin_structures_keep_enough_resolution() -> None:
    # Large EM-like images of varying size with 5 px membranes: the budget alone would shrink them 6x.
    rng = np.random.default_rng(2)
    cases = [_case(i, (s, s), thickness=5.0) for i, s in enumerate(rng.integers(600, 3000, 20))]
    plan, _ = _plan(_fp(cases), budget=8)
    size = plan.get("data.target_size")
    for c in cases:
        assert 5.0 * size / math.sqrt(c.shape[0] * c.shape[1]) >= 0.5 * MIN_THICKNESS
    assert "thinnest" in plan.entries["data.target_size"].reason


def test_budget_sets_patch_batch_and_enough_steps() -> None:
    cases = [_case(i, (512, 512)) for i in range(100)]
    short, _ = _plan(_fp(cases), budget=5)
    long, _ = _plan(_fp(cases), budget=60)
    p_short, p_long = short.get("data.patch_size"), long.get("data.patch_size")
    assert p_short[0] <= p_long[0] and p_long == [512, 512]
    for plan in (short, long):
        steps = plan.summary["estimated_steps"]
        assert steps >= MIN_STEPS * 0.95 or plan.get("data.patch_size")[0] == 64
        assert plan.get("train.epochs") >= 1 and plan.get("train.samples_per_epoch") >= plan.get("train.batch_size")
    gpu, _ = _plan(_fp(cases), device=gpu_profile(80), budget=5)
    assert gpu.get("data.patch_size") == [512, 512] and gpu.get("train.batch_size") > 8


def test_user_keys_win_and_plan_yaml_lists_only_what_the_plan_set() -> None:
    cases = [_case(i, (512, 512)) for i in range(20)]
    cfg = load_config(None, ["data.patch_size=[128, 96]", "train.batch_size=2"])
    explicit = explicit_keys(cfg)
    assert {"data.patch_size", "train.batch_size"} <= explicit and "data.channels" not in explicit
    plan = plan_experiment(_fp(cases), cfg, CPU, 10, explicit=explicit)
    planned, applied = apply_plan(cfg, plan, explicit)
    assert planned.data.patch_size == (128, 96) and planned.train.batch_size == 2
    assert "data.patch_size" not in applied and "data.channels" in applied
    text = plan.to_yaml(applied)
    loaded = yaml.safe_load(text)
    assert "patch_size" not in loaded["data"] and loaded["data"]["channels"] == 1
    assert all("#" in line for line in text.splitlines() if line.startswith("  "))  # every key has its reason
    # later decisions use the value in force: a 128x96 patch covers little of a 512² image
    assert plan.get("data.foreground_share") > 0
    ExperimentConfig.model_validate(planned.model_dump(mode="json"))


def test_label_map_inference() -> None:
    assert infer_label_map([0, 255]) == ({0: 0, 255: 1}, {0: "background", 1: "foreground"})
    assert infer_label_map([0, 1, 2])[0] == {0: 0, 1: 1, 2: 2}
    many = [_case(0, (64, 64), values=tuple(range(30)))]
    with pytest.raises(DatasetError, match="different values"):
        _plan(_fp(many))
