"""Semi-supervised training (`train.unlabeled`): images without masks are an error by default; switched on, they are
pseudo-labelled each round (by the current model or a teacher bundle), kept where confident, and trained on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from engine_data import REPO, TINY_OVERRIDES, StopAfterEpoch, make_tiny_dataset
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config import load_config
from medseg.engine.pseudo_labels import (
    PseudoLabelledCases,
    PseudoLabelRounds,
    confidence_map,
    pseudo_label,
    round_start_epochs,
)
from medseg.engine.train import load_cases, train, unlabeled_cases
from medseg.errors import ConfigError, DatasetError
from medseg.losses.functional import IGNORE_INDEX

DEMO = REPO / "configs/experiments/demo_nuclei.yaml"
UNLABELED = 3


@pytest.fixture(scope="module")
def partly_labeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """11 tiny nuclei images; the last 3 have no mask."""
    root = make_tiny_dataset(tmp_path_factory.mktemp("semi") / "data", n=8 + UNLABELED)
    for p in sorted((root / "masks").iterdir())[-UNLABELED:]:
        p.unlink()
    return root


def _cfg(root: Path, *sets: str):
    return load_config(DEMO, [f"data.root={root}", *TINY_OVERRIDES, *sets])


def test_an_image_without_a_mask_stays_an_error_by_default(partly_labeled: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"image without mask: .*train\.unlabeled\.enabled"):
        load_cases(_cfg(partly_labeled))
    images = sorted((partly_labeled / "images").iterdir())
    datalist = tmp_path / "list.csv"
    datalist.write_text("image,mask\n" + "".join(
        f"{p},{partly_labeled / 'masks' / p.name if (partly_labeled / 'masks' / p.name).exists() else ''}\n"
        for p in images))
    with pytest.raises(DatasetError, match=r"image without a mask: .*train\.unlabeled\.enabled"):
        load_cases(_cfg(partly_labeled, "data.root=null", f"data.datalist={datalist}"))
    cases = load_cases(_cfg(partly_labeled, "data.root=null", f"data.datalist={datalist}", "train.unlabeled.enabled=true"))
    assert len(unlabeled_cases(cases)) == UNLABELED  # an empty mask column = an unlabeled image


def test_unlabeled_images_are_pseudo_labelled_and_trained_on_through_the_cli(partly_labeled: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[str] = []
    original = PseudoLabelledCases.draw

    def recording_draw(self, rng):
        d, z = original(self, rng)
        drawn.append(str(d["id"]))
        assert set(np.unique(d["label"])) <= {0, 1, IGNORE_INDEX}
        return d, z

    monkeypatch.setattr(PseudoLabelledCases, "draw", recording_draw)
    out = tmp_path / "run"
    sets = [*TINY_OVERRIDES, "train.epochs=2", "train.unlabeled.enabled=true", "train.unlabeled.rounds=1",
            "train.unlabeled.confidence=0.6", "train.unlabeled.share=0.5", "train.unlabeled.strong_preset=light"]
    res = CliRunner().invoke(app, ["train", str(DEMO), "--data", str(partly_labeled), "--out", str(out),
                                   *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    ids = sorted(p.stem for p in (partly_labeled / "images").iterdir() if not (partly_labeled / "masks" / p.name).exists())
    with np.load(out / "pseudo_labels/round_1.npz") as f:
        labels = {k: f[k] for k in f.files}
    assert sorted(labels) == ids  # every unlabeled image got a pseudo-label, on its model grid
    for lab in labels.values():
        assert lab.shape == (64, 64) and set(np.unique(lab)) <= {0, 1, IGNORE_INDEX}
    # Epoch 0 is labeled-only warm-up; epoch 1 (8 samples, share 0.5) draws pseudo-labelled patches.
    assert drawn and set(drawn) <= set(ids)
    split = json.loads((out / "splits.json").read_text())
    assert not set(ids) & {i for fold in split["folds"] for i in fold}  # never validated on
    info = json.loads((out / "run_info.json").read_text())
    assert [r["round"] for r in info["pseudo_labels"]] == [1] and info["pseudo_labels"][0]["epoch"] == 1
    assert info["pseudo_labels"][0]["cases"] == UNLABELED
    assert "## Semi-supervised" in (out / "bundle/model_card.md").read_text()

    # A resumed run reloads the round's labels from disk instead of predicting with weights it no longer has.
    from medseg.data.dataset import build_case_cache

    cfg = load_config(out / "config.yaml")
    pseudo = PseudoLabelledCases(build_case_cache(unlabeled_cases(load_cases(cfg)), cfg), None, 0.5)
    rounds = PseudoLabelRounds(cfg, pseudo, out)
    rounds.load_state_dict({"round": 1})
    rounds.on_fit_start(SimpleNamespace(current_epoch=2, is_global_zero=True), None)
    assert pseudo.ready and pseudo.round == 1
    for i, case_id in enumerate(pseudo.cache.ids):
        np.testing.assert_array_equal(pseudo.labels[i]["label"], labels[case_id])


@pytest.mark.slow
def test_a_teacher_bundle_pseudo_labels_the_first_round(partly_labeled: Path, tiny_data: Path, tmp_path: Path) -> None:
    from medseg.data.dataset import build_case_cache, case_input
    from medseg.inference import Predictor

    teacher = train(_cfg(tiny_data, "train.epochs=1"), tmp_path / "teacher", progress=False)  # fully labeled data
    out = tmp_path / "student"
    cfg = _cfg(partly_labeled, "train.epochs=1", "train.unlabeled.enabled=true", "train.unlabeled.rounds=1",
               f"train.unlabeled.teacher={teacher.bundle}", "train.unlabeled.measure=entropy",
               "train.unlabeled.confidence=0.2")
    train(cfg, out, progress=False)
    info = json.loads((out / "run_info.json").read_text())
    assert info["pseudo_labels"][0]["teacher"] is True and info["pseudo_labels"][0]["epoch"] == 0
    planned = load_config(out / "config.yaml")
    cache = build_case_cache(unlabeled_cases(load_cases(planned)), planned)
    predictor = Predictor.from_bundle(teacher.bundle, device="cpu", backend="torch")
    with np.load(out / "pseudo_labels/round_1.npz") as f:
        for i, case_id in enumerate(cache.ids):
            probs, _ = predictor.predict_image(case_input(cache[i], planned.data))
            np.testing.assert_array_equal(f[case_id], pseudo_label(probs, "entropy", 0.2))


@pytest.mark.slow
def test_a_teacher_of_another_task_is_refused(partly_labeled: Path, tiny_data: Path, tmp_path: Path) -> None:
    teacher = train(_cfg(tiny_data, "train.epochs=1", "data.channels=3"), tmp_path / "rgb", progress=False)
    cfg = _cfg(partly_labeled, "train.epochs=1", "train.unlabeled.enabled=true", "train.unlabeled.rounds=1",
               f"train.unlabeled.teacher={teacher.bundle}")
    with pytest.raises(ConfigError, match="input channels"):
        train(cfg, tmp_path / "student", progress=False)
    shutil.rmtree(tmp_path / "rgb")


def test_confidence_filter_by_max_probability_or_entropy() -> None:
    probs = np.array([[[0.95, 0.6, 0.5]], [[0.05, 0.4, 0.5]]], dtype=np.float32)  # (K=2, 1, 3)
    np.testing.assert_allclose(confidence_map(probs, "max_prob"), [[0.95, 0.6, 0.5]], rtol=1e-6)
    entropy = confidence_map(probs, "entropy")
    assert entropy[0, 0] > 0.7 and entropy[0, 2] == pytest.approx(0.0, abs=1e-6)  # uniform: no confidence
    assert pseudo_label(probs, "max_prob", 0.9).tolist() == [[0, IGNORE_INDEX, IGNORE_INDEX]]
    assert pseudo_label(probs, "max_prob", 0.55).tolist() == [[0, 0, IGNORE_INDEX]]
    assert pseudo_label(probs, "max_prob", 0.0).tolist() == [[0, 0, 0]]
    fg = np.array([[[0.1]], [[0.9]]], dtype=np.float32)
    assert pseudo_label(fg, "entropy", 0.5).tolist() == [[1]]


def test_rounds_split_the_epochs() -> None:
    assert round_start_epochs(9, 2, teacher=False) == [3, 6]  # warm-up, round 1, round 2
    assert round_start_epochs(9, 3, teacher=True) == [0, 3, 6]
    assert round_start_epochs(2, 1, teacher=False) == [1]
    with pytest.raises(ConfigError, match="needs at least 3 epochs"):
        round_start_epochs(2, 2, teacher=False)


def test_ignored_pixels_reach_the_loss_as_zero_weight(tiny_cfg) -> None:
    """A training step on a batch whose labels are all IGNORE_INDEX produces no gradient: unconfident pseudo-labels
    do not train the model."""
    from medseg.engine.module import SegModule

    module = SegModule(tiny_cfg())
    batch = {"image": torch.rand(2, 1, 64, 64), "label": torch.full((2, 64, 64), IGNORE_INDEX, dtype=torch.uint8)}
    module.log = lambda *a, **k: None  # no trainer attached
    loss = module.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in module.model.parameters())


class _PseudoBatches(L.Callback):
    """Per epoch: how many training batches held pseudo-labelled pixels (``IGNORE_INDEX``, which labeled masks never
    carry). It looks at the batches the main process receives, so it sees what data-loader workers produced."""

    def __init__(self) -> None:
        self.per_epoch: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        hit = int(bool((batch["label"] == IGNORE_INDEX).any()))
        self.per_epoch[trainer.current_epoch] = self.per_epoch.get(trainer.current_epoch, 0) + hit



def test_a_run_resumed_at_a_round_start_trains_on_that_rounds_labels(partly_labeled: Path, tmp_path: Path) -> None:
    """Interrupted after the warm-up epoch and resumed: the round that starts the resumed run's first epoch is
    predicted before that epoch's loader (and its worker processes) starts, so the epoch draws pseudo-labels, as the
    uninterrupted run's epoch 1 does (non-persistent workers copy the dataset when the epoch's loader starts).
    Confidence 0.999 leaves most pixels of a barely trained model ignored."""
    cfg = _cfg(partly_labeled, "train.epochs=2", "train.unlabeled.enabled=true", "train.unlabeled.rounds=1",
               "train.unlabeled.confidence=0.999", "train.unlabeled.share=0.9", "data.num_workers=1")
    out = tmp_path / "resumed"
    train(cfg, out, progress=False, extra_callbacks=[StopAfterEpoch(0)])
    assert not (out / "pseudo_labels").exists()  # interrupted before the round
    resumed = _PseudoBatches()
    train(cfg, out, resume=True, progress=False, extra_callbacks=[resumed])
    assert (out / "pseudo_labels/round_1.npz").is_file()
    assert resumed.per_epoch.get(0, 0) == 0 and resumed.per_epoch.get(1, 0) > 0, resumed.per_epoch
