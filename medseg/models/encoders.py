"""Encoder names, input normalisation and stage structure for smp/timm encoders.

One job: know things about an encoder *by its name or module* without downloading anything.

- `resolve_encoder_name` accepts any smp encoder (``efficientnet-b0``, ``timm-tf_efficientnet_lite0``, ``resnet34``,
  ...), any smp timm-universal name (``tu-convnext_tiny``) or a bare timm model name (turned into ``tu-<name>``);
  anything else is a `ConfigError` listing a useful subset and how to see all.
- `input_normalisation` gives the per-channel (mean, std) the encoder's ImageNet weights expect on [0, 1] input.
- `trace_encoder_stages` groups an encoder's parameterised modules into stages shallow -> deep by the output
  stride at which they run, which works for every smp/timm encoder without per-family tables.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from medseg.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)  # TF-style (x - 0.5) / 0.5 on [0, 1] input
HALF_STD = (0.5, 0.5, 0.5)

# Encoders whose ImageNet weights were trained on (x - 0.5) / 0.5 rather than ImageNet statistics.
_HALF_NORM_PREFIXES = ("timm-tf_efficientnet_lite", "inceptionv4", "inceptionresnetv2", "xception")

# What an error message suggests: the families medseg is tuned for, then a pointer to the full lists.
SUGGESTED_ENCODERS = (
    *(f"timm-tf_efficientnet_lite{i}" for i in range(5)),
    *(f"efficientnet-b{i}" for i in range(8)),
    *(f"timm-efficientnet-b{i}" for i in range(8)),
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "tu-<any timm model>",
)


def _timm_base_name(name: str) -> str:
    """``tu-convnext_tiny.fb_in1k`` -> ``convnext_tiny`` (timm's pretrained tag is not part of the arch)."""
    return name.removeprefix("tu-").split(".", 1)[0]


def resolve_encoder_name(name: str) -> str:
    """Return the smp encoder name to build for a configured ``name``.

    smp's own names are returned unchanged, ``tu-<timm model>`` is checked against timm's model list, and a bare
    timm model name (``convnext_tiny``) becomes ``tu-convnext_tiny``. Unknown names raise `ConfigError`.
    """
    smp_names = smp.encoders.get_encoder_names()
    if name in smp_names:
        return name
    if name.startswith("tu-"):
        if timm.is_model(_timm_base_name(name)):
            return name
    elif timm.is_model(_timm_base_name(name)):
        return f"tu-{name}"
    close = difflib.get_close_matches(name, [*smp_names, *timm.list_models()], n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"model.encoder: unknown encoder {name!r}.{hint} Valid encoders include: {', '.join(SUGGESTED_ENCODERS)}. "
        "See all with segmentation_models_pytorch.encoders.get_encoder_names() (smp encoders) and "
        "timm.list_models() (usable as 'tu-<name>')."
    )


def is_lite_encoder(name: str) -> bool:
    """True for EfficientNet-Lite encoders (smp ``timm-tf_efficientnet_lite*`` or timm ``*efficientnet_lite*``)."""
    return "efficientnet_lite" in name


def input_normalisation(name: str, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) the encoder's pretrained weights expect for input scaled to [0, 1].

    Lite and Inception-family encoders use (x - 0.5) / 0.5, timm-universal encoders their timm pretrained config
    (read locally, no download), all others ImageNet statistics. For ``in_channels != 3`` the RGB values are
    repeated cyclically (matching how stem weights are adapted, see `medseg.models.pretrained`), and a single
    channel gets the RGB average.

    Returns:
        (mean, std): two tuples of length ``in_channels``.
    """
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if name.startswith(_HALF_NORM_PREFIXES) or is_lite_encoder(name):
        mean, std = HALF_MEAN, HALF_STD
    elif name.startswith("tu-"):
        try:
            cfg = timm.models.get_pretrained_cfg(_timm_base_name(name))
        except Exception:  # noqa: BLE001 - unknown cfg: fall back to ImageNet statistics
            cfg = None
        if cfg is not None and cfg.mean is not None and len(cfg.mean) == 3:
            mean, std = tuple(cfg.mean), tuple(cfg.std)
    if in_channels == 1:
        return (sum(mean) / 3,), (sum(std) / 3,)
    return tuple(mean[i % 3] for i in range(in_channels)), tuple(std[i % 3] for i in range(in_channels))


def stem_conv_name(encoder: nn.Module, in_channels: int) -> str | None:
    """Qualified name of the encoder's input convolution (the first Conv2d taking ``in_channels``)."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == in_channels:
            return name
    return None


@torch.no_grad()
def trace_encoder_stages(encoder: nn.Module, in_channels: int, depth: int) -> list[list[str]]:
    """Group the encoder's parameterised modules into stages, shallow -> deep.

    Stage ``k`` is everything the encoder runs after producing its feature map at stride ``2**(k-1)`` up to and
    including the module that produces the stride-``2**k`` feature map, i.e. exactly smp's own split of the
    encoder forward. It is found with one eval-mode forward of a small dummy input: forward hooks log the call
    order of all modules and which module returned each feature tensor. If a feature is not the output of any
    module (computed functionally), stages fall back to the output stride at which each module first runs.
    Modules never called in forward (e.g. the unused ``conv_head`` smp keeps for weight compatibility) join the
    deepest stage, so freezing all stages freezes every encoder weight. Empty stages (transformer encoders have
    no stride-2 feature) are dropped.

    Returns:
        A list of stages, each a list of names (relative to ``encoder``; '' is the encoder itself) of the
        modules that own parameters directly.
    """
    # Deepest feature 4x4, so squeeze-excitation's 1x1 maps stand out from real strides.
    size = 4 * 2**depth
    owners = [n for n, m in encoder.named_modules() if any(True for _ in m.parameters(recurse=False))]
    calls: list[tuple[str, object, int]] = []  # (module name, output, running max stride) in hook order
    running = [1]

    def make_hook(mod_name: str):
        def hook(_m: nn.Module, _inp: object, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-1] > 0:
                stride = size // out.shape[-1]
                if stride <= 2**depth:
                    running[0] = max(running[0], stride)
            calls.append((mod_name, out, running[0]))

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in encoder.named_modules() if n]
    modes = {m: m.training for m in encoder.modules()}  # per module: frozen BatchNorm may sit in eval mode
    encoder.eval()  # batch-norm running statistics must not move during the trace
    try:
        device = next(encoder.parameters()).device
        features = encoder(torch.zeros(1, in_channels, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    first_call: dict[str, int] = {}
    for i, (name, _out, _s) in enumerate(calls):
        first_call.setdefault(name, i)
    # Index (in hook order) of the module that returned each feature map; hooks fire after a module's
    # children, so the last match is the outermost module (the whole stage) rather than its final layer.
    ends: list[int | None] = []
    for feat in list(features)[1 : depth + 1]:
        if feat.shape[1] == 0:  # smp's placeholder for a missing stride-2 feature
            ends.append(ends[-1] if ends else -1)
            continue
        hits = [i for i, (_n, out, _s) in enumerate(calls) if out is feat]
        ends.append(hits[-1] if hits else None)

    stages: list[list[str]] = [[] for _ in range(depth)]
    by_identity = all(e is not None for e in ends)
    for name in owners:
        if name not in first_call:  # never run in forward (or the encoder's own parameters)
            k = depth
        elif by_identity:
            idx = first_call[name]
            k = next((j + 1 for j, e in enumerate(ends) if idx <= e), depth)  # type: ignore[operator]
        else:
            stride = calls[first_call[name]][2]
            k = min(max(round(math.log2(stride)), 1), depth)
        stages[k - 1].append(name)
    return [s for s in stages if s]


def modules_by_name(root: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """Look up submodules of ``root`` by qualified name ('' is ``root``)."""
    return [root.get_submodule(n) if n else root for n in names]
