"""Typed experiment config (pydantic, ``extra="forbid"``).

Only the CLI and the app read YAML: ``load_config(path, overrides)`` merges ``configs/base.yaml``-style
inheritance (``base:`` key, relative to the file), then ``--set key.sub=value`` overrides, then validates.
Library code receives the typed objects.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Intensity(StrEnum):
    percentile = "percentile"  # per image: clip to its [0.5, 99.5] percentiles, scale to [0, 1]: microscopy, MR, X-ray
    minmax = "minmax"  # scale min..max to [0, 1]
    ct_window = "ct_window"  # clip HU to [level - width/2, level + width/2], scale to [0, 1]
    fixed = "fixed"  # one range for the whole dataset (data.intensity_range), e.g. CT foreground percentiles
    none = "none"


class Resample(StrEnum):
    """How cases are brought to one scale before training and prediction (the plan decides)."""

    none = "none"  # native grid
    spacing = "spacing"  # to data.target_spacing (mm, array order): scans that state their spacing
    size = "size"  # each image to data.target_size pixels (geometric-mean side, aspect kept): photos


class TTAMode(StrEnum):
    """Test-time augmentation (``medseg.inference.tta`` lists each mode's views and their cost in passes)."""

    none = "none"  # the image as is: 1 pass per member
    flips = "flips"  # identity + the 3 mirror images: 4 passes
    multicrop = "multicrop"  # 5 placements in a mirror-padded canvas (shifts the tile seams): 5 passes
    full = "full"  # flips x multicrop: 20 passes


class DataConfig(_Section):
    root: Path | None = None  # folder with images/ and masks/ (relative paths resolve against the config file)
    datalist: Path | None = None  # explicit CSV/JSON datalist instead of folder discovery
    images_dir: str = "images"
    masks_dir: str = "masks"
    instances_dir: str | None = None  # instance maps (0 = background, k = object k), for weight maps/metrics
    separate_touching: bool = False  # with instance maps: pixels where two objects touch become background
    label_map: dict[int, int] = Field(default_factory=lambda: {0: 0, 255: 1})  # raw mask value -> class index
    labels: dict[int, str] = Field(default_factory=lambda: {0: "background", 1: "foreground"})
    colors: dict[int, str] = Field(default_factory=dict)  # class index -> "#rrggbb" (defaults per index)
    channels: int = 3  # network input channels per slice; gray is repeated to 3 / RGB averaged to 1
    intensity: Intensity = Intensity.percentile
    ct_window: tuple[float, float] = (400.0, 40.0)  # (width, level) when intensity == ct_window
    intensity_range: tuple[float, float] | None = None  # (low, high) when intensity == fixed
    context_slices: int = 0  # 2.5D: k neighbours on each side -> (2k+1)*channels input channels (3D only)
    slice_axis: int = 0  # 3D: array axis the 2.5D slices are taken along (the plan picks the low-resolution one)
    resample: Resample = Resample.none
    target_spacing: tuple[float, ...] | None = None  # mm, array order, when resample == spacing
    target_size: int | None = None  # pixels (geometric-mean side), when resample == size
    patch_size: tuple[int, int] = (256, 256)  # training crop (reflect-padded when an image is smaller)
    foreground_share: float = Field(0.0, ge=0.0, le=1.0)  # share of patches centred on a foreground voxel
    folds: int = 5  # seeded (grouped) k-fold split; train/val uses fold `fold` as validation
    fold: int = 0
    split_seed: int = 0
    split_file: Path | None = None  # default: <out>/splits.json
    group_column: str | None = None  # datalist column that keeps correlated images in one fold
    limit_cases: int | None = None
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)  # seeded subset of the training fold (low-data studies)
    cache: Literal["memory", "disk", "none"] = "memory"
    num_workers: int = 0

    @field_validator("context_slices")
    @classmethod
    def _nonneg(cls, v: int) -> int:
        if v < 0:
            raise ValueError("context_slices must be >= 0")
        return v

    @model_validator(mode="after")
    def _labels_cover_map(self) -> DataConfig:
        missing = sorted(set(self.label_map.values()) - set(self.labels))
        if missing:
            raise ValueError(f"label_map targets {missing} have no entry in labels {sorted(self.labels)}")
        return self

    @model_validator(mode="after")
    def _scale_settings_complete(self) -> DataConfig:
        if self.resample == Resample.spacing and not self.target_spacing:
            raise ValueError("resample: spacing needs data.target_spacing (mm, array order)")
        if self.resample == Resample.size and not (self.target_size and self.target_size >= 8):
            raise ValueError("resample: size needs data.target_size (pixels, >= 8)")
        if self.intensity == Intensity.fixed and (not self.intensity_range or self.intensity_range[1] <= self.intensity_range[0]):
            raise ValueError("intensity: fixed needs data.intensity_range [low, high] with low < high")
        if not 0 <= self.slice_axis <= 2:
            raise ValueError("slice_axis must be 0, 1 or 2")
        return self

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    @property
    def input_channels(self) -> int:
        return (2 * self.context_slices + 1) * self.channels


class ModelConfig(_Section):
    arch: str = "unet"  # MODELS registry name: unet | unetplusplus
    encoder: str = "timm-tf_efficientnet_lite0"
    pretrained: str = "imagenet-offline"  # none | imagenet-offline | imagenet (hub, online only) | path to file/bundle
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    norm: Literal["batch", "group"] = "batch"
    groups: int = 8
    bn_momentum: float | None = 0.1  # smp's efficientnet-b* encoders ship 0.01, which breaks short runs (NOTES)
    upsampling: Literal["nearest", "bilinear", "transpose"] = "nearest"
    deep_supervision: bool = False
    deep_supervision_weights: tuple[float, ...] | None = None
    inference_head: Literal["full", "mean", "pruned"] = "full"
    pruned_depth: int = 4
    zero_init_residual: bool = False
    transfer: Literal["full", "freeze_encoder", "partial", "gradual_unfreeze"] = "full"
    freeze_stages: int = 0  # for partial
    unfreeze_at_epochs: tuple[int, ...] = ()  # for gradual_unfreeze: one epoch per stage, deepest first
    encoder_lr_mult: float = 1.0
    cache_encoder_features: bool = False


class LossConfig(_Section):
    name: str = "dice_ce"  # LOSSES registry name
    weight_map: bool = False  # U-Net boundary weight maps (pixel-weighted CE)
    w0: float = 10.0
    sigma: float = 5.0  # pixels, or mm when spacing is known and sigma_in_mm
    sigma_in_mm: bool = False
    class_weights: list[float] | None = None  # w_c; None -> balanced from per-image class frequencies
    max_class_weight: float | None = 10.0  # cap w_c: a patch with one tiny object would otherwise weigh thousands
    objects: Literal["instances", "components", "membrane"] = "components"
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    dice_batch: bool = True  # Dice over the whole batch: per-sample Dice punishes patches that lack a class
    dice_include_background: bool = False
    dice_smooth: float = 1e-5
    dice_weight: float = 1.0
    ce_weight: float = 1.0


class AugmentConfig(_Section):
    preset: Literal["none", "light", "default", "heavy"] = "default"
    mixup: float = 0.0  # probability per batch (off by default: blended labels are risky for medical masks)
    cutmix: float = 0.0
    mixup_alpha: float = 0.4
    cutmix_alpha: float = 1.0
    padding_mode: Literal["reflect", "constant"] = "reflect"
    # Shape bias (random convolution, Xu et al. 2021): probability per training patch that its texture and
    # colour are replaced by a random convolution's (`medseg.transforms.random_conv`); shapes are kept.
    random_convolution: float = Field(0.0, ge=0.0, le=1.0)
    random_convolution_kernels: tuple[int, ...] = (1, 3, 5, 7)  # kernel sizes drawn from (odd)

    @field_validator("random_convolution_kernels")
    @classmethod
    def _odd_kernels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(k < 1 or k % 2 == 0 for k in v):
            raise ValueError(f"random_convolution_kernels must be odd sizes >= 1, got {list(v)}")
        return v


class UnlabeledConfig(_Section):
    """Semi-supervised training from images without masks (`medseg.engine.pseudo_labels`). The epochs are split
    into ``rounds`` + 1 equal parts (labeled-only warm-up first) or, with a ``teacher``, ``rounds`` parts. Each round
    starts by predicting every unlabeled image once — with the teacher in the first round, the current model
    otherwise (noisy student: the student becomes the teacher) — keeps the pixels the prediction is confident about,
    and trains on labeled patches plus strongly augmented pseudo-labelled ones."""

    enabled: bool = False  # off: an image without a mask is an error
    rounds: int = Field(2, ge=1)  # pseudo-label passes (with a teacher bundle: every round uses the teacher)
    confidence: float = Field(0.9, ge=0.0, le=1.0)  # keep a pixel when its confidence reaches this
    measure: Literal["max_prob", "entropy"] = "max_prob"  # confidence = max softmax prob, or 1 - normalised entropy
    share: float = Field(0.5, gt=0.0, lt=1.0)  # share of training patches drawn from pseudo-labelled images
    strong_preset: Literal["none", "light", "default", "heavy"] = "heavy"  # student-side augmentation
    teacher: Path | None = None  # a bundle to pseudo-label with (same input channels and classes); None: current model


class TrainConfig(_Section):
    epochs: int = 50
    batch_size: int = 8
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True
    no_decay_on_bias_norm: bool = True
    scale_lr_with_batch: bool = False
    base_batch_size: int = 8
    schedule: str = "cosine"  # SCHEDULES registry name
    warmup_epochs: float = 0.0
    schedule_params: dict[str, Any] = Field(default_factory=dict)
    min_lr_ratio: float = 0.01
    snapshots: bool = False
    swa: bool = False
    swa_start_epoch: float = 0.75
    swa_lr: float | None = None
    samples_per_epoch: int | None = None  # random crops per epoch (None: one per training case)
    budget_minutes: float | None = Field(None, gt=0)  # wall-clock budget of the whole run: shapes the schedule
    val_max_cases: int | None = Field(None, ge=1)  # cases per validation during training (all at the end)
    val_every: int = 1
    early_stop_patience: int | None = None
    precision: str = "32-true"  # 16-mixed / bf16-mixed on GPU
    # NHWC activations: oneDNN's CPU and cuDNN's convolutions are faster in it (benchmarks/train_speed.py: 1.38x here)
    channels_last: bool = True
    compile: bool = False  # torch.compile the network for training (falls back to eager if compiling fails)
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1  # multi-node DDP (torchrun --nnodes): devices × num_nodes must equal the world size
    strategy: str = "auto"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    seed: int = 42
    deterministic: bool = False
    log_tensorboard: bool = False
    mlflow_uri: str | None = None
    unlabeled: UnlabeledConfig = Field(default_factory=UnlabeledConfig)


class InferenceConfig(_Section):
    tile_size: tuple[int, int] = (512, 512)
    overlap: float = 0.25
    blend: Literal["gaussian", "constant"] = "gaussian"
    padding_mode: Literal["reflect", "constant"] = "reflect"
    tta: TTAMode = TTAMode.none  # the bundle's default; every prediction call may choose another
    # Images (2.5D slices or tiles) per network call; None: per device (`call_batch`).
    batch_size: int | None = None
    threshold: float | None = None  # binary tasks: foreground prob threshold; None -> argmax
    keep_largest: bool = False
    fill_holes: bool = False
    min_object_size: int = 0
    uncertainty: Literal["entropy", "variance"] = "entropy"
    # What executes the network (medseg.inference.backends): torch (eager), compile (torch.compile: faster
    # passes, a compile per new tile shape), onnxruntime, or auto (the fastest measured for the device).
    backend: Literal["auto", "torch", "compile", "onnxruntime"] = "auto"

    def call_batch(self, device_type: str = "cpu") -> int:
        """Images per network call: ``batch_size`` when set; else 2 on a CPU (measured, benchmarks/backends.py:
        a 512² 2.5D slice took 151 ms in batches of 2 vs 174 ms in batches of 8 with torch, the same with ONNX
        Runtime, and batches of 8 held 0.9-1.3 GB more activations) and 8 on a GPU, which needs the parallelism."""
        if self.batch_size is not None:
            return self.batch_size
        return 2 if device_type == "cpu" else 8

    @model_validator(mode="before")
    @classmethod
    def _legacy_compile(cls, values: Any) -> Any:
        # Bundles written before `backend` existed say `compile: true|false`.
        if isinstance(values, dict) and "compile" in values:
            values = dict(values)
            if values.pop("compile") and "backend" not in values:
                values["backend"] = "compile"
        return values


class TuneConfig(_Section):
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)  # "train.lr": {type: loguniform, low, high}
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    direction: Literal["maximize", "minimize"] = "maximize"


class DistillConfig(_Section):
    """Knowledge distillation (`medseg distill`): batches that carry the teacher's probabilities add
    ``weight · T² · KL(teacher_T ‖ student_T)`` (``loss: kl``, Hinton's scaling keeps the gradient size independent
    of ``T``) or ``weight · soft Dice(student, teacher)`` to the supervised loss on the labels."""

    loss: Literal["kl", "soft_dice"] = "kl"
    weight: float = Field(1.0, ge=0.0)  # lambda
    temperature: float = Field(2.0, gt=0.0)  # T: > 1 shows the student the teacher's relative confidences


class ExperimentConfig(_Section):
    name: str = "experiment"
    description: str = ""
    plan: bool = True  # fill every data-dependent key not set here from the dataset fingerprint (medseg plan)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


# ---------------------------------------------------------------------------------------------- loading


def _merge_sections(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge two raw configs section by section. Values inside a section replace the base's whole, dicts
    included: an experiment's ``label_map`` must not inherit the base's entries."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path.name}: circular 'base:' chain")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.name}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.name}: top level must be a mapping")
    base = raw.pop("base", None)
    if base is not None:
        parent = _read_yaml(path.parent / base, (*seen, path))
        raw = _merge_sections(parent, raw)
    # Relative data paths are relative to the file that names them.
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("root", "datalist", "split_file"):
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data[key] = str((path.parent / data[key]).resolve())
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for item in overrides or []:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return raw


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            section = _section_model(e["loc"][:-1])
            valid = ", ".join(sorted(section.model_fields)) if section else "?"
            lines.append(f"unknown key {loc!r} (valid keys here: {valid})")
        else:
            lines.append(f"{loc}: {e['msg']}")
    return f"{source}: invalid config: " + "; ".join(lines)


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def validate_config(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment (following ``base:``), apply ``key=value`` overrides, validate."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    return validate_config(raw, source=Path(path).name if path else "config")


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
