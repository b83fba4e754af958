"""Every config key does something (issue 14): ``extra="forbid"`` tells users that each accepted key has an
effect, so a key that nothing reads is a defect.

The fields are walked from the pydantic models (`leaf_keys`), never listed by hand. A handful of tiny *scenarios*
(real ``train`` + ``Predictor.predict_scan`` runs on 64x64 nuclei crops or 4 hippocampus volumes, one epoch or
two; ``tune`` for the ``tune`` section, ``distill`` for the ``distill`` section) give every key a non-default value somewhere; while a scenario runs, every
attribute read on a config section is recorded (`ConfigReads`). The test then demands, for each key:

* some scenario sets it to a value other than the model's default, that scenario succeeds, and the key is read
  during it; or
* it is in `NOT_EXERCISED` (only meaningful on a GPU or in multi-process DDP, each with its reason, tested
  elsewhere) and is still read by some scenario.

Reads made by generic code do not count: pydantic validators (they see every value) and ``Plan.get`` (the planner
looks up whichever key it is deciding); ``model_dump``/``model_copy``/``==`` read ``__dict__``, not attributes.

How this was checked to catch a dead key: ``test_a_new_key_that_nothing_reads_fails`` adds a field ``dummy`` to
a subclass of ``TrainConfig`` and shows that `leaf_keys` finds it and `problems` reports it (``train.dummy: no
scenario sets a non-default value``; once a scenario sets it, ``... set to a non-default value in [...] but never
read``). On real runs the test caught exactly that: its first run reported ``train.min_lr_ratio`` set in a scenario
with ``train.schedule=poly`` (poly takes no floor, so the key did nothing there) and ``inference.overlap`` /
``inference.blend`` set for images no larger than one tile (no tiling, so both unread).

Slow (a few minutes: about fifteen tiny runs); ``.ci/run`` runs it with the other slow tests.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_data import make_tiny_dataset
from pydantic import BaseModel

from medseg.config import ExperimentConfig, _Section, load_config
from medseg.errors import ConfigError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs/experiments/demo_nuclei.yaml"
HIPPO = REPO / "configs/experiments/hippocampus_2p5d.yaml"
TINY = [
    "data.patch_size=[64, 64]", "data.channels=1", "data.folds=4", "model.pretrained=none",
    "model.decoder_channels=[32, 16, 8, 8, 8]", "train.batch_size=4", "train.samples_per_epoch=8",
    "train.epochs=1", "augment.preset=none", "inference.tile_size=[64, 64]",
]  # fmt: skip

# Keys no CPU test run can exercise: each is still required to be *read* (so it cannot be dead), just not with a
# non-default value. The reason names where it is covered.
NOT_EXERCISED = {
    "train.devices": "more than one device is multi-process DDP (tests/deploy/test_ddp.py, -m slow)",
    "train.num_nodes": "multi-node DDP (torchrun --nnodes): tests/deploy/test_ddp.py checks the world-size rule",
    "train.strategy": "ddp / fsdp need several processes (tests/deploy/test_ddp.py)",
}


# ------------------------------------------------------------------------------------------------- keys


def leaf_keys(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default for every field of every section (walked from the pydantic models)."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out |= leaf_keys(info.annotation, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = info.get_default(call_default_factory=True)
    return out


def value_of(cfg: ExperimentConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node.__dict__[part]  # not getattr: looking at the value is not the run reading it
    return node


def section_paths(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> dict[type, str]:
    """Section class -> its dotted prefix ("" for the top level)."""
    out: dict[type, str] = {model: prefix}
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out |= section_paths(info.annotation, f"{prefix}{name}.")
    return out


def _generic(code: Any) -> bool:
    """Readers that look at whatever key they are handed: their reads say nothing about a key being used."""
    if code.co_filename.endswith("medseg/config.py") and code.co_name.startswith("_"):  # validators
        return True
    if code.co_filename.endswith("medseg/planning/planner.py") and code.co_name == "get":  # Plan.get(key)
        return True
    return "/pydantic/" in code.co_filename


class ConfigReads:
    """Records ``section.field`` for every attribute read of a config field while active."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self._paths = section_paths()
        self._fields = {cls: set(cls.model_fields) for cls in self._paths}

    @contextmanager
    def recording(self) -> Iterator[set[str]]:
        original = object.__getattribute__
        paths, fields, keys = self._paths, self._fields, self.keys

        def getattribute(obj: Any, name: str) -> Any:
            value = original(obj, name)
            cls = type(obj)
            if name in fields.get(cls, ()) and not _generic(sys._getframe(1).f_code):
                keys.add(paths[cls] + name)
            return value

        _Section.__getattribute__ = getattribute  # type: ignore[method-assign]
        try:
            yield keys
        finally:
            del _Section.__getattribute__


# --------------------------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    """One tiny run. ``data``: nuclei | renamed (other folder names) | datalist | hippo | partly (3 images without
    masks); ``run``: train (then predict one scan with the bundle) | tune | distill (train a teacher, distill it,
    predict with the student). ``optional_package``: the keys need it; where it is not installed the run must stop at
    once with a one-line ConfigError naming it."""

    name: str
    overrides: list[str]
    config: Path = DEMO
    data: str = "nuclei"
    run: str = "train"
    optional_package: str = ""
    compile_stub: bool = False  # torch.compile replaced by the identity (compiling on CPU takes minutes)


SCENARIOS = [
    Scenario("options_2d", [
        "name=every-key", "description=tiny", "data.separate_touching=true", "data.label_map={0: 0, 128: 1, 255: 1}",
        "data.colors={1: '#00ff00'}", "data.intensity=minmax", "data.foreground_share=0.5", "data.fold=1",
        "data.split_seed=3", "data.limit_cases=7", "data.train_fraction=0.8", "data.cache=none",
        "data.resample=size", "data.target_size=56", "model.norm=group", "model.groups=4",
        "model.upsampling=bilinear", "model.transfer=partial", "model.freeze_stages=1", "model.encoder_lr_mult=0.5",
        "loss.name=dice_focal", "loss.focal_gamma=1.5", "loss.dice_batch=false", "loss.dice_include_background=true",
        "loss.dice_smooth=0.001", "loss.dice_weight=0.5", "loss.ce_weight=2.0", "loss.weight_map=true",
        "loss.w0=5.0", "loss.sigma=3.0", "loss.objects=instances", "loss.class_weights=[1.0, 2.0]",
        "loss.max_class_weight=5.0", "augment.preset=light", "train.warmup_epochs=0.5", "train.schedule=poly",
        "train.lr=0.002", "train.weight_decay=0.001", "inference.tile_size=[32, 32]",
        "inference.overlap=0.5", "inference.blend=constant", "inference.padding_mode=constant",
        "inference.tta=flips", "inference.batch_size=2", "inference.threshold=0.6", "inference.keep_largest=true",
        "inference.fill_holes=true", "inference.min_object_size=5", "inference.uncertainty=variance",
    ]),  # fmt: skip
    Scenario("sgd_swa", [
        "train.optimizer=sgd", "train.momentum=0.8", "train.nesterov=false", "train.no_decay_on_bias_norm=false",
        "train.scale_lr_with_batch=true", "train.base_batch_size=2", "train.epochs=2", "train.swa=true",
        "train.swa_start_epoch=0.5", "train.swa_lr=0.001", "train.accumulate_grad_batches=2",
        "train.gradient_clip_val=1.0", "train.seed=7", "train.deterministic=true", "train.channels_last=false",
        "train.precision=bf16-mixed", "train.accelerator=cpu", "train.compile=true", "train.val_every=2",
        "data.cache=disk", "data.num_workers=1", "model.bn_momentum=0.05", "model.upsampling=transpose",
        "augment.preset=heavy", "augment.padding_mode=constant", "loss.label_smoothing=0.05",
        "inference.backend=compile",
    ], compile_stub=True),  # fmt: skip
    Scenario("sgdr_snapshots", [
        "train.optimizer=adam", "train.schedule=sgdr", "train.schedule_params={t0_epochs: 1}",
        "train.snapshots=true", "train.epochs=2", "train.early_stop_patience=3", "loss.name=ce",
        "train.min_lr_ratio=0.1",
    ]),  # fmt: skip
    Scenario("unetplusplus", [
        "model.arch=unetplusplus", "model.deep_supervision=true", "model.deep_supervision_weights=[1, 0.5, 0.5, 0.25, 0.25]",
        "model.inference_head=pruned", "model.pruned_depth=2", "augment.mixup=0.5", "augment.cutmix=0.5",
        "augment.mixup_alpha=0.3", "augment.cutmix_alpha=0.8", "loss.weight_map=true", "loss.objects=membrane",
    ]),  # fmt: skip
    Scenario("cached_features", [
        "model.transfer=freeze_encoder", "model.cache_encoder_features=true", "train.val_max_cases=1",
        "model.encoder=resnet18", "model.zero_init_residual=true",
    ]),  # fmt: skip
    Scenario("gradual_unfreeze", ["model.transfer=gradual_unfreeze", "model.unfreeze_at_epochs=[1, 1]",
                                  "train.epochs=2"]),
    Scenario("no_plan_ct_window", ["plan=false", "data.intensity=ct_window", "data.ct_window=[300.0, 50.0]",
                                   "data.split_file=SPLITS"]),
    Scenario("renamed_folders", ["data.images_dir=scans", "data.masks_dir=labels", "data.instances_dir=objects"],
             data="renamed"),
    Scenario("datalist_groups", ["data.root=null", "data.datalist=DATALIST", "data.group_column=site"], data="datalist"),
    Scenario("budget", ["train.budget_minutes=0.3", "train.epochs=2"]),
    # Images without masks, pseudo-labelled by a teacher (the options_2d bundle) in the one round (epoch 0).
    Scenario("semi_supervised_shape_bias", [
        "train.epochs=2", "train.unlabeled.enabled=true", "train.unlabeled.rounds=1", "train.unlabeled.confidence=0.7",
        "train.unlabeled.measure=entropy", "train.unlabeled.share=0.3", "train.unlabeled.strong_preset=light",
        "train.unlabeled.teacher=TEACHER", "augment.random_convolution=0.5", "augment.random_convolution_kernels=[3, 5]",
    ], data="partly"),  # fmt: skip
    Scenario("hippocampus_2p5d", [
        "data.patch_size=[32, 32]", "data.context_slices=1", "data.slice_axis=1", "data.resample=spacing",
        "data.target_spacing=[1.5, 1.5, 1.5]", "data.intensity=fixed", "data.intensity_range=[0.0, 600.0]",
        "data.folds=2", "loss.weight_map=true", "loss.sigma_in_mm=true", "inference.tile_size=[32, 32]",
    ], config=HIPPO, data="hippo"),  # fmt: skip
    Scenario("tensorboard", ["train.log_tensorboard=true"], optional_package="tensorboard"),
    Scenario("mlflow", ["train.mlflow_uri=file:MLRUNS"], optional_package="mlflow"),
    Scenario("distill_kl", ["distill.weight=0.5", "distill.temperature=3.0"], run="distill"),
    Scenario("distill_soft_dice", ["distill.loss=soft_dice"], run="distill"),
    Scenario("tune", [
        'tune.space={"train.lr": {type: loguniform, low: 1.0e-4, high: 1.0e-2}}', "tune.sampler=random",
        "tune.pruner=none", "tune.direction=minimize",
    ], run="tune"),  # fmt: skip
]


@dataclass
class Outcome:
    cfg: ExperimentConfig  # the scenario's config as the user wrote it (before planning)
    reads: set[str] = field(default_factory=set)
    detail: str = ""  # what the run gave (val Dice, ...)
    error: str = ""  # why it failed: every scenario runs, so one failure does not hide the others


def _datasets(root: Path) -> dict[str, Path]:
    nuclei = make_tiny_dataset(root / "nuclei", n=8, instances=True)
    renamed = root / "renamed"
    for old, new in (("images", "scans"), ("masks", "labels"), ("instances", "objects")):
        shutil.copytree(nuclei / old, renamed / new)
    datalist = root / "datalist.csv"
    rows = ["image,mask,instances,site"] + [
        f"nuclei/images/{p.name},nuclei/masks/{p.name},nuclei/instances/{p.name},site{i % 4}"
        for i, p in enumerate(sorted((nuclei / "images").iterdir()))
    ]
    datalist.write_text("\n".join(rows) + "\n")
    partly = root / "partly"
    shutil.copytree(nuclei, partly)
    for p in sorted((partly / "masks").iterdir())[-3:]:
        p.unlink()
    hippo = root / "hippo"
    shared = REPO.parent / "shared/datasets/msd_hippocampus"
    for sub in ("images", "masks"):
        (hippo / sub).mkdir(parents=True)
        for p in sorted((shared / sub).iterdir())[:4]:
            shutil.copy(p, hippo / sub / p.name)
    return {"nuclei": nuclei, "renamed": renamed, "datalist": datalist, "hippo": hippo, "partly": partly}


def _config(s: Scenario, data: dict[str, Path], out: Path) -> ExperimentConfig:
    root = data[s.data] if s.data in ("hippo", "renamed", "partly") else data["nuclei"]
    subst = {"SPLITS": str(out / "my_splits.json"), "DATALIST": str(data["datalist"]), "MLRUNS": str(out / "mlruns"),
             "TEACHER": str(out.parent / "options_2d" / "bundle")}
    overrides = []
    for o in s.overrides:
        for k, v in subst.items():
            o = o.replace(k, v)
        overrides.append(o)
    return load_config(s.config, [f"data.root={root}", *TINY, *overrides])


def _run(s: Scenario, cfg: ExperimentConfig, out: Path, image: Path) -> str:
    from medseg.engine.train import train
    from medseg.engine.tune import tune
    from medseg.inference import Predictor
    from medseg.io import read_scan

    if s.optional_package and importlib.util.find_spec(s.optional_package) is None:
        try:
            train(cfg, out, progress=False)
        except ConfigError as e:
            assert f"needs the {s.optional_package} package" in str(e), e
            return f"refused: {s.optional_package} is not installed"
        raise AssertionError(f"trained without {s.optional_package} installed")
    if s.run == "tune":
        result = tune(cfg, out, trials=1)
        assert result.complete == 1
        return f"tuned: best value {result.best_value:.3f}"
    if s.run == "distill":  # a teacher trained with the scenario's config; its student reads the distill section
        from medseg.engine.distill import distill

        teacher = train(cfg, out / "teacher", progress=False)
        student = distill(teacher.bundle, cfg.data.root, out / "student", max_minutes=None, device="cpu",
                          progress=False)
        scan = read_scan(image)
        assert Predictor.from_bundle(student.bundle, device="cpu").predict_scan(scan).mask.shape == scan.spatial_shape
        return f"student val Dice {student.student_dice:.3f} (teacher {student.teacher_dice:.3f})"
    result = train(cfg, out, progress=False)
    scan = read_scan(image)
    pred = Predictor.from_bundle(result.bundle, device="cpu").predict_scan(scan)
    assert pred.mask.shape == scan.spatial_shape
    return f"val Dice {result.val_dice:.3f}"


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every scenario run once (shared by the tests below), with the config keys it read."""
    root = tmp_path_factory.mktemp("every_key")
    data = _datasets(root / "data")
    images = {"hippo": sorted((data["hippo"] / "images").iterdir())[0]}
    nuclei_image = sorted((data["nuclei"] / "images").iterdir())[0]
    results: dict[str, Outcome] = {}
    real_compile = torch.compile
    for s in SCENARIOS:
        out = root / s.name
        cfg = _config(s, data, out)
        recorder = ConfigReads()
        if s.compile_stub:
            torch.compile = lambda model, **_: model  # type: ignore[assignment]
        detail, error = "", ""
        try:
            with recorder.recording():
                detail = _run(s, cfg, out, images.get(s.data, nuclei_image))
        except Exception as e:  # noqa: BLE001 - reported by test_every_scenario_succeeded
            error = f"{type(e).__name__}: {str(e)[:500]}"
        finally:
            torch.compile = real_compile
        results[s.name] = Outcome(cfg, recorder.keys, detail, error)
    return results


# ------------------------------------------------------------------------------------------------- tests


def problems(outcomes: dict[str, Outcome], keys: dict[str, Any]) -> list[str]:
    """One line per key (dotted key -> default) that no successful scenario reads with a non-default value."""
    found = []
    for key, default in keys.items():
        if key in NOT_EXERCISED:
            if not any(key in o.reads for o in outcomes.values()):
                found.append(f"{key}: allowed not to be exercised ({NOT_EXERCISED[key]}), but never read")
            continue
        changed = [name for name, o in outcomes.items() if not o.error and value_of(o.cfg, key) != default]
        if not changed:
            found.append(f"{key}: no scenario sets a non-default value")
        elif not any(key in outcomes[name].reads for name in changed):
            found.append(f"{key}: set to a non-default value in {changed} but never read")
    return found


def test_every_key_is_read_with_a_non_default_value(outcomes: dict[str, Outcome]) -> None:
    found = problems(outcomes, leaf_keys())
    assert not found, "\n".join(found)


def test_a_new_key_that_nothing_reads_fails() -> None:
    from types import SimpleNamespace as NS

    from pydantic import Field

    from medseg.config import TrainConfig

    class Train(TrainConfig):
        dummy: int = 0

    class Experiment(ExperimentConfig):
        train: Train = Field(default_factory=Train)

    assert leaf_keys(Experiment)["train.dummy"] == 0  # walked from the models: a new field is picked up
    keys = {"train.dummy": 0}
    assert problems({"a": Outcome(NS(train=NS(dummy=0)))}, keys) == ["train.dummy: no scenario sets a non-default value"]
    assert problems({"a": Outcome(NS(train=NS(dummy=1)))}, keys) == [
        "train.dummy: set to a non-default value in ['a'] but never read"]
    assert problems({"a": Outcome(NS(train=NS(dummy=1)), reads={"train.dummy"})}, keys) == []


def test_the_allow_list_names_real_keys_only() -> None:
    assert set(NOT_EXERCISED) <= set(leaf_keys())


def test_every_scenario_succeeded(outcomes: dict[str, Outcome]) -> None:
    assert set(outcomes) == {s.name for s in SCENARIOS}
    failed = {name: o.error for name, o in outcomes.items() if o.error}
    assert not failed, "\n".join(f"{name}: {why}" for name, why in failed.items())


def test_the_recorder_ignores_generic_readers() -> None:
    """Validation and dumping touch every field; neither may count as a use."""
    recorder = ConfigReads()
    with recorder.recording() as keys:
        cfg = load_config(None, ["data.resample=size", "data.target_size=32"])
        cfg.model_dump()
        cfg.model_copy(deep=True)
        assert keys == set()
        _ = cfg.train.lr, cfg.data.num_classes
    assert keys == {"train", "train.lr", "data", "data.labels"}
    assert np.isclose(cfg.train.lr, 1e-3)  # the class is itself again after recording
    assert "__getattribute__" not in _Section.__dict__


class EmptyMask:
    """The baseline a trained model must beat: predicts background everywhere (a ``ScanPredictor``)."""

    name, weights_hash, labels, device = "empty", "", {}, torch.device("cpu")

    def predict_scan(self, scan, *, tta=None, progress=None):
        from medseg.inference import Prediction

        shape = scan.spatial_shape
        probs = np.zeros((2, *shape), dtype=np.float32)
        probs[0] = 1.0
        return Prediction(probs, np.zeros(shape, np.uint8), np.zeros(shape, np.float32), scan.geometry)


def test_demo_sized_training_beats_the_empty_mask_baseline(tmp_path: Path) -> None:
    """The demo (its data, model, patch and pretrained encoder; 3 of its 15 epochs) against predicting nothing,
    on the same held-aside cases, through the one evaluation loop."""
    from medseg.engine.evaluate import evaluate_cases
    from medseg.engine.train import load_cases, split_cases, train
    from medseg.inference.protocol import ScanPredictor

    result = train(load_config(DEMO, ["train.epochs=3"]), tmp_path, progress=False)
    planned = load_config(result.bundle / "config.yaml")
    _, held_aside = split_cases(planned, load_cases(planned), tmp_path)
    assert isinstance(EmptyMask(), ScanPredictor)
    baseline = evaluate_cases(EmptyMask(), held_aside, planned, hd95=False).mean_dice
    assert result.val_dice > baseline + 0.3, (result.val_dice, baseline)
