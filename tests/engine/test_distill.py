"""`medseg distill` (issue 19 part 1): an ensemble teacher's cached soft targets teach one student, through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.bundle import load_bundle
from medseg.cli import app
from medseg.data.dataset import PatchDataset
from medseg.inference import Predictor
from medseg.io import read_scan
from medseg.losses.distill import distillation_loss, kl_distillation, soft_dice_distillation
from medseg.transforms.augment import build_augmentation_2d

STUDENT_SETS = ["--set", "train.epochs=1", "--set", "train.samples_per_epoch=8", "--set", "train.accelerator=cpu"]


@pytest.fixture(scope="module")
def teacher(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real two-member teacher: a snapshot ensemble (two SGDR cycles of one epoch) on the tiny nuclei crops."""
    from engine_data import REPO, TINY_OVERRIDES

    from medseg.config import load_config
    from medseg.engine.train import train

    cfg = load_config(REPO / "configs/experiments/demo_nuclei.yaml", [
        f"data.root={tiny_data}", *TINY_OVERRIDES, "train.epochs=2", "train.schedule=sgdr",
        "train.schedule_params={t0_epochs: 1}", "train.snapshots=true", "train.accelerator=cpu", "name=tiny-teacher"])
    result = train(cfg, tmp_path_factory.mktemp("teacher"), progress=False)
    assert len(result.members) == 2
    return result.bundle


def test_distill_cli_writes_a_student_bundle_that_predicts(teacher: Path, tiny_data: Path, tmp_path: Path) -> None:
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for p in sorted((tiny_data / "images").iterdir())[:2]:  # images only: the teacher labels them
        (unlabeled / f"extra_{p.name}").write_bytes(p.read_bytes())
    out = tmp_path / "student"
    args = ["distill", str(teacher), "--data", str(tiny_data), "--out", str(out), "--teacher-tta", "flips",
            "--unlabeled", str(unlabeled), "--device", "cpu", *STUDENT_SETS]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "teacher" in res.output and "8 teacher target(s) computed" in res.output  # 6 training + 2 unlabelled

    parent = load_bundle(teacher)
    student = load_bundle(out / "bundle")
    assert [p.stem for p in student.member_files] == ["model"]  # one member, whatever the teacher had
    record = student.preprocessing["distillation"]
    assert record["teacher_weights_hash"] == parent.weights_hash
    assert (record["teacher_members"], record["teacher_tta"], record["teacher_passes_per_image"]) == (2, "flips", 8)
    assert (record["labelled_train_cases"], record["unlabelled_cases"], record["validation_cases"]) == (6, 2, 2)
    assert 0.0 <= record["teacher_dice"] <= 1.0 and 0.0 <= record["student_dice"] <= 1.0
    assert "## Distillation" in student.model_card and parent.weights_hash in student.model_card
    assert f"teacher {record['teacher_dice']:.4f}, student {record['student_dice']:.4f}" in student.model_card
    assert str(student.config.inference.tta) == "none" and not student.config.train.snapshots

    scan = read_scan(sorted((tiny_data / "images").iterdir())[0])
    pred = Predictor.from_bundle(out / "bundle", device="cpu").predict_scan(scan)
    assert pred.mask.shape == scan.spatial_shape and pred.probs.shape == (2, *scan.spatial_shape)

    # One cached target per training case, in a folder keyed by teacher, TTA and grid (a rerun finds it again).
    folders = list((out / "teacher_targets").iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.npy"))) == 8
    from medseg.engine.distill import student_config, targets_key

    key = targets_key(parent, "flips", student_config(parent, tiny_data, None, None, STUDENT_SETS[1::2]))
    assert folders[0].name == key != targets_key(parent, "none", student.config)


def test_a_student_with_another_encoder_learns_from_the_teachers_targets(teacher: Path, tiny_data: Path,
                                                                        tmp_path: Path) -> None:
    """``--student-encoder``: a smaller network (here timm's tiny test EfficientNet) trains on the teacher's targets and
    ships as a bundle of that encoder, which predicts."""
    out = tmp_path / "small"
    res = CliRunner().invoke(app, ["distill", str(teacher), "--data", str(tiny_data), "--out", str(out),
                                   "--student-encoder", "tu-test_efficientnet", "--device", "cpu", *STUDENT_SETS])
    assert res.exit_code == 0, res.output
    student, parent = load_bundle(out / "bundle"), load_bundle(teacher)
    assert student.config.model.encoder == "tu-test_efficientnet" != parent.config.model.encoder
    assert student.preprocessing["distillation"]["teacher_weights_hash"] == parent.weights_hash
    n_student, n_teacher = (sum(t.numel() for t in next(iter(b.load_members().values())).values())
                            for b in (student, parent))
    assert n_student < n_teacher
    scan = read_scan(sorted((tiny_data / "images").iterdir())[0])
    assert Predictor.from_bundle(out / "bundle", device="cpu").predict_scan(scan).mask.shape == scan.spatial_shape


def test_cached_targets_are_the_teachers_probabilities(teacher: Path, tiny_data: Path, tmp_path: Path) -> None:
    from medseg.data.datalist import discover_cases
    from medseg.data.dataset import build_case_cache, case_input
    from medseg.engine.distill import SoftTargetCache, _teacher_predictor, compute_targets, student_config

    parent = load_bundle(teacher)
    cfg = student_config(parent, tiny_data, None, None, None)
    cache = build_case_cache(discover_cases(tiny_data)[:2], cfg)
    predictor = _teacher_predictor(parent, "flips", "cpu")
    assert compute_targets(predictor, cache, cfg, tmp_path, "flips") == 2
    assert compute_targets(predictor, cache, cfg, tmp_path, "flips") == 0  # cached
    served = SoftTargetCache([cache], tmp_path)[1]
    expected = predictor.predict_probs(case_input(cache[1], cfg.data), tta="flips")
    np.testing.assert_allclose(np.asarray(served["soft"], dtype=np.float32), expected, atol=1e-3)  # float16 on disk
    assert not np.allclose(expected, predictor.predict_probs(case_input(cache[1], cfg.data), tta="none"), atol=1e-3)


def test_soft_targets_move_with_image_and_mask_under_augmentation(tiny_cfg) -> None:
    """A soft target equal to the one-hot mask comes out of the heavy augmentation (flips, affine, elastic) as the
    one-hot of the augmented mask: the three are transformed together."""
    cfg = tiny_cfg("augment.preset=heavy", "data.foreground_share=0.5")
    rng = np.random.default_rng(0)
    label = np.zeros((80, 80), np.uint8)
    label[10:45, 20:70] = 1
    case = {"id": "a", "image": rng.integers(0, 255, (1, 80, 80)).astype(np.uint8), "bounds": None,
            "label": label, "spacing": np.ones(2, np.float32),
            "fg_points": np.argwhere(label == 1).astype(np.int32), "fg_classes": np.ones(int(label.sum()), np.uint8),
            "soft": np.stack([label == 0, label == 1]).astype(np.float16)}
    augment = build_augmentation_2d("heavy", cfg.data.patch_size, cfg.data.input_channels, seed=3)
    ds = PatchDataset([case], cfg, augment, samples_per_epoch=12)
    for i in range(12):
        s = ds[i]
        assert s["soft"].shape == (2, *s["label"].shape)
        agree = (s["soft"].argmax(0) == s["label"].long()).float().mean()
        assert agree > 0.97, (i, float(agree))  # only pixels on the resampled boundary may differ
        assert torch.allclose(s["soft"].sum(0), torch.ones_like(s["soft"][0]), atol=1e-3)  # reflect padding


def test_distillation_losses() -> None:
    torch.manual_seed(0)
    teacher = torch.softmax(torch.randn(2, 3, 8, 8) * 2, dim=1)
    matched = torch.log(teacher)  # the student that reproduces the teacher
    other = torch.randn(2, 3, 8, 8)
    for t in (1.0, 2.0, 4.0):
        assert float(kl_distillation(matched, teacher, t)) < 1e-5
        assert float(kl_distillation(other, teacher, t)) > 0.01
    hard = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 8, 8)), 3).permute(0, 3, 1, 2).float()
    assert float(soft_dice_distillation(hard * 50, hard)) < 1e-3 < float(soft_dice_distillation(other, hard))
    # Padding (teacher all zero) does not count; deep-supervision heads are averaged.
    padded = teacher.clone()
    padded[:, :, :, 4:] = 0
    wild = matched.clone()
    wild[:, :, :, 4:] = torch.randn(2, 3, 8, 4) * 10
    assert float(kl_distillation(wild, padded)) < 1e-5
    both = distillation_loss([matched, other], teacher, "kl", 2.0)
    assert torch.isclose(both, kl_distillation(other, teacher, 2.0) / 2, rtol=1e-4, atol=1e-6)
    # The gradient moves the student's probabilities toward the teacher's.
    logits = other.clone().requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=100.0)  # the loss is a mean over 128 pixels
    before = float(kl_distillation(logits.detach(), teacher))
    for _ in range(20):
        opt.zero_grad()
        kl_distillation(logits, teacher).backward()
        opt.step()
    assert float(kl_distillation(logits.detach(), teacher)) < 0.5 * before


def test_the_training_step_adds_the_weighted_distillation_term(tiny_cfg) -> None:
    from medseg.engine.module import SegModule

    torch.manual_seed(0)
    batch = {"image": torch.rand(2, 1, 64, 64), "label": torch.randint(0, 2, (2, 64, 64), dtype=torch.uint8)}
    soft = torch.softmax(torch.randn(2, 2, 64, 64), 1)
    losses = {}
    for weight in (0.0, 1.0, 3.0):
        torch.manual_seed(0)  # the same initial weights for every module
        module = SegModule(tiny_cfg("train.channels_last=false", f"distill.weight={weight}"))
        module.log = lambda *a, **k: None
        module.eval()  # BatchNorm in eval: the three modules compute the same logits
        with torch.no_grad():
            losses[weight] = float(module.training_step({**batch, "soft": soft}, 0))
            plain = float(module.training_step(batch, 0))
    assert losses[0.0] == pytest.approx(plain, rel=1e-5)
    extra = losses[1.0] - losses[0.0]
    assert extra > 0 and losses[3.0] - losses[0.0] == pytest.approx(3 * extra, rel=1e-3)


def test_a_student_that_preprocesses_differently_is_refused(teacher: Path, tiny_data: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["distill", str(teacher), "--data", str(tiny_data), "--out", str(tmp_path / "s"),
                                   "--set", "data.intensity=minmax", *STUDENT_SETS])
    assert res.exit_code == 1 and "data.intensity" in res.output and "Traceback" not in res.output


def test_teacher_labelled_images_carry_what_labelled_cases_carry(teacher: Path, tiny_data: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """With weight maps on, labelled cases carry ``weight`` and images from --unlabeled did not: a batch mixing them
    lost the weights or failed to collate. Every sample now has the same keys; the student's config does not
    inherit the teacher's ``train.unlabeled`` (its images without masks come in through --unlabeled)."""
    from medseg.engine import distill as distill_module

    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for p in sorted((tiny_data / "images").iterdir())[:2]:
        (unlabeled / f"extra_{p.name}").write_bytes(p.read_bytes())
    keys: list[frozenset[str]] = []
    wrap = distill_module.SoftTargetCache.__getitem__

    def recording(self, k):
        d = wrap(self, k)
        keys.append(frozenset(d))
        return d

    monkeypatch.setattr(distill_module.SoftTargetCache, "__getitem__", recording)
    res = CliRunner().invoke(app, ["distill", str(teacher), "--data", str(tiny_data), "--out", str(tmp_path / "s"),
                                   "--unlabeled", str(unlabeled), "--device", "cpu", *STUDENT_SETS,
                                   "--set", "loss.weight_map=true", "--set", "train.batch_size=8"])
    assert res.exit_code == 0, res.output
    assert keys and len(set(keys)) == 1 and "weight" in keys[0], set(keys)

    parent = load_bundle(teacher)
    taught = parent.config.model_copy(deep=True)
    taught.train.unlabeled.enabled = True
    from dataclasses import replace

    from medseg.engine.distill import student_config

    assert not student_config(replace(parent, config=taught), tiny_data, None, None, None).train.unlabeled.enabled
