"""The segmentation network medseg trains and predicts with: an smp encoder + decoder behind one wrapper.

`SegmentationNet` adds what smp's models lack, reusing smp's encoder, decoder blocks and heads (and their
weights) unchanged:

- **Any input size.** ``forward`` reflect-pads (B, C, H, W) on the bottom/right to the next multiple of
  ``output_stride`` (32 for a depth-5 encoder), runs the network and crops the logits back to (H, W), so
  border pixels see mirrored context instead of zeros and callers never care about divisibility.
- **Choice of decoder upsampling** (``nearest`` / ``bilinear`` interpolation or a learned 2x2 stride-2
  ``transpose`` convolution). The decoder forward is re-run here block by block (smp's blocks hard-code
  ``F.interpolate``), calling each smp block's own convolutions and attention modules.
- **UNet++ deep supervision** (`UnetPlusPlusNet`): 1x1 conv heads on the nested nodes X(0,1) ... X(0,4),
  with optional pruned inference at a shallower node, computing only the nodes (and encoder stages) it needs.
- **Frozen BatchNorm stays frozen.** ``train()`` keeps every BatchNorm whose affine parameters are all frozen
  (``requires_grad=False``) in eval mode, so freezing an encoder (see `medseg.models.transfer`) also freezes
  its running statistics even though Lightning calls ``model.train()`` every epoch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medseg.errors import ConfigError
from medseg.models.encoders import input_normalisation, modules_by_name, trace_encoder_stages


def reflect_pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom/right to H, W divisible by ``multiple`` by mirroring.

    Reflection needs pad < size; images smaller than the pad (H=5 to 32) are mirrored repeatedly, and a
    1-pixel dimension is replicated.
    """
    h, w = x.shape[-2:]
    target_h, target_w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    while x.shape[-2] < target_h or x.shape[-1] < target_w:
        ch, cw = x.shape[-2:]
        ph, pw = min(target_h - ch, ch - 1), min(target_w - cw, cw - 1)
        if (target_h > ch and ph == 0) or (target_w > cw and pw == 0):
            x = F.pad(x, (0, target_w - cw, 0, target_h - ch), mode="replicate")
        else:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    return x


class Upsample2x(nn.Module):
    """Doubles H and W: interpolation (``nearest``/``bilinear``) or a learned ``transpose`` convolution.

    The transpose convolution (kernel 2, stride 2, channels -> channels) starts as an exact nearest-neighbour
    upsampling (identity kernel), so switching ``upsampling`` does not change the network at initialisation;
    training then learns the upsampling. Interpolation modes hold no parameters.
    """

    def __init__(self, mode: str, channels: int) -> None:
        super().__init__()
        self.mode = mode
        self.conv: nn.ConvTranspose2d | None = None
        if mode == "transpose":
            self.conv = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2, bias=False)
            with torch.no_grad():
                self.conv.weight.zero_()
                idx = torch.arange(channels)
                self.conv.weight[idx, idx] = 1.0
        elif mode not in ("nearest", "bilinear"):
            raise ValueError(f"unknown upsampling mode {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        if self.conv is not None:
            return self.conv(x)
        if self.mode == "bilinear":
            return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return F.interpolate(x, scale_factor=2.0, mode=self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def run_decoder_block(
    block: nn.Module, x: torch.Tensor, skip: torch.Tensor | None, up: Upsample2x
) -> torch.Tensor:
    """smp's decoder-block forward (UnetDecoderBlock / UNet++ DecoderBlock) with our upsampling.

    x: (B, Cin, h, w), skip: (B, Cskip, 2h, 2w) or None -> (B, Cout, 2h, 2w).
    """
    x = up(x)
    if getattr(block, "is_empty", False):  # smp UNet++ allows 0-channel blocks
        return x.new_empty(x.shape[0], 0, *x.shape[2:])
    if skip is not None:
        x = torch.cat([x, skip], dim=1)
        x = block.attention1(x)
    x = block.conv1(x)
    x = block.conv2(x)
    return block.attention2(x)


class SegmentationNet(nn.Module):
    """Base wrapper: encoder, padding/cropping, stages, frozen-BN handling. Subclasses decode.

    Attributes:
        encoder: the smp encoder; ``encoder(x)`` -> [x, f_2, f_4, ..., f_(2**depth)] feature maps.
        encoder_name: the resolved smp encoder name.
        in_channels, num_classes, encoder_depth: as built.
        input_mean, input_std: per-input-channel normalisation the encoder's pretrained weights expect on
            [0, 1] input (``(x - mean) / std``). ``encode`` applies it (non-persistent buffers), so training,
            the predictor and exported ONNX graphs all see the same normalisation and callers feed [0, 1] input.
        load_report: what `build_model` loaded as initial weights (`medseg.models.pretrained.LoadReport`).
    """

    def __init__(
        self, encoder: nn.Module, encoder_name: str, in_channels: int, num_classes: int, encoder_depth: int
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.encoder_name = encoder_name
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.input_mean, self.input_std = input_normalisation(encoder_name, in_channels)
        self.register_buffer("_mean", torch.tensor(self.input_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.input_std).view(1, -1, 1, 1), persistent=False)
        self.load_report = None
        self._stage_names: list[list[str]] | None = None

    # ------------------------------------------------------------------------------------------ encoder

    @property
    def output_stride(self) -> int:
        """Total downsampling of the encoder; inputs are padded to a multiple of it."""
        return int(self.encoder.output_stride)

    def encoder_stages(self) -> list[list[nn.Module]]:
        """The encoder's parameterised modules grouped by stage, shallow -> deep (stride 2, 4, ..., 32).

        Together the stages hold every encoder parameter exactly once (modules owning parameters directly),
        which is what freezing needs. Found once by tracing (`trace_encoder_stages`) and cached.
        """
        if self._stage_names is None:
            self._stage_names = trace_encoder_stages(self.encoder, self.in_channels, self.encoder_depth)
        return [modules_by_name(self.encoder, names) for names in self._stage_names]

    def encode(self, x: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """Encoder features of a padded batch: [x, f_2, ..., f_(2**d)] with d = ``depth`` or the full depth.

        A shallower ``depth`` runs only the first stages for smp's own encoders (which honour ``_depth``); a
        shallow copy of the encoder carries the changed depth so concurrent full forwards are unaffected.
        timm-universal encoders compute all stages regardless; the extra features are simply ignored.
        """
        x = (x - self._mean) / self._std
        encoder = self.encoder
        if depth is not None and depth < self.encoder_depth and hasattr(encoder, "_depth"):
            encoder = copy.copy(encoder)  # shares parameters/submodules; only `_depth` differs
            encoder._depth = depth
        return encoder(x)

    # ------------------------------------------------------------------------------------------ forward

    def decode(self, features: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Padded-resolution logits (B, K, Hp, Wp) (or a list of them) from encoder features."""
        raise NotImplementedError

    def encoder_depth_needed(self) -> int | None:
        """How many encoder stages the current mode's ``decode`` reads (None: all)."""
        return None

    def forward_padded_features(
        self, features: Sequence[torch.Tensor], size: tuple[int, int]
    ) -> torch.Tensor | list[torch.Tensor]:
        """Decode features of a padded input and crop the logits to the original ``size`` (H, W)."""
        out = self.decode(features)
        h, w = size
        if isinstance(out, list):
            return [o[..., :h, :w] for o in out]
        return out[..., :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, C, H, W) -> logits (B, K, H, W) for any H, W (see module docstring for padding).

        UNet++ with deep supervision in training mode returns a list of full-resolution logits instead.
        """
        size = (x.shape[-2], x.shape[-1])
        xp = reflect_pad_to_multiple(x, self.output_stride)
        features = self.encode(xp, self.encoder_depth_needed())
        return self.forward_padded_features(features, size)

    def train(self, mode: bool = True) -> SegmentationNet:
        """``nn.Module.train`` that keeps frozen BatchNorm layers (all affine params frozen) in eval mode."""
        super().train(mode)
        if mode:
            for m in self.modules():
                if (
                    isinstance(m, _BatchNorm)
                    and m.affine
                    and not (m.weight.requires_grad or m.bias.requires_grad)
                ):
                    m.eval()
        return self


class UnetNet(SegmentationNet):
    """U-Net over smp's ``Unet``: smp's encoder, ``UnetDecoder`` blocks and ``SegmentationHead``."""

    def __init__(
        self, smp_model: nn.Module, encoder_name: str, in_channels: int, num_classes: int, upsampling: str
    ) -> None:
        depth = len(smp_model.decoder.blocks)
        super().__init__(smp_model.encoder, encoder_name, in_channels, num_classes, depth)
        self.decoder = smp_model.decoder
        self.segmentation_head = smp_model.segmentation_head
        enc_ch = list(self.encoder.out_channels)[1:][::-1]
        block_in = [enc_ch[0]] + [b.conv2[0].out_channels for b in self.decoder.blocks][:-1]
        self.upsample = nn.ModuleList(Upsample2x(upsampling, c) for c in block_in)

    def decode(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        feats = list(features)[1:][::-1]  # deepest first, as smp's UnetDecoder
        x = self.decoder.center(feats[0])
        for i, block in enumerate(self.decoder.blocks):
            skip = feats[i + 1] if i + 1 < len(feats) else None
            x = run_decoder_block(block, x, skip, self.upsample[i])
        return self.segmentation_head(x)


class UnetPlusPlusNet(SegmentationNet):
    """UNet++ over smp's ``UnetPlusPlus``, with deep supervision and pruned inference.

    Node naming follows the UNet++ paper: X(i, j) is the node at down-sampling level i after j convolution
    steps along the skip pathway; the top-row nested nodes X(0, 1) ... X(0, D-1) (D = encoder depth, 5) sit at
    stride 2 in smp's decoder (smp's block ``x_{D-1-j}_{D-2}``), and smp adds a final block ``x_0_{D-1}`` that
    upsamples X(0, D-1) to full resolution for the main head.

    Outputs (all (B, K, H, W) logits):
        main: smp's segmentation head on the final full-resolution block (the deepest path, X(0,4)).
        head j (j = 1..D-1): a 1x1 conv on X(0, j), bilinearly upsampled to the input size.

    ``forward`` returns ``[main, head1, ..., head(D-1)]`` in training mode when ``deep_supervision``; otherwise
    one tensor chosen by ``inference_head``: ``full`` = main; ``mean`` = average of main and all heads;
    ``pruned`` = head ``pruned_depth`` alone, computing only the encoder stages and nested nodes X(i, j) it
    depends on (as UNet++ pruning does): cheaper, usually slightly less accurate.
    """

    def __init__(
        self,
        smp_model: nn.Module,
        encoder_name: str,
        in_channels: int,
        num_classes: int,
        upsampling: str,
        deep_supervision: bool,
        inference_head: str,
        pruned_depth: int,
    ) -> None:
        decoder = smp_model.decoder
        super().__init__(smp_model.encoder, encoder_name, in_channels, num_classes, decoder.depth + 1)
        self.decoder = decoder
        self.segmentation_head = smp_model.segmentation_head
        self.deep_supervision = deep_supervision
        self.inference_head = inference_head
        self.pruned_depth = pruned_depth
        d = decoder.depth
        up: dict[str, Upsample2x] = {}
        for name in decoder.blocks:
            depth_idx, layer_idx = (int(v) for v in name.split("_")[1:])
            if layer_idx == d:
                cin = decoder.in_channels[-1]
            elif depth_idx == 0:
                cin = decoder.in_channels[layer_idx]
            else:
                cin = decoder.skip_channels[layer_idx - 1]
            up[name] = Upsample2x(upsampling, cin)
        self.upsample = nn.ModuleDict(up)
        # Heads exist whenever they can be used, so that one state dict serves all inference_head choices.
        # Transformer-style encoders have no stride-2 feature, so smp leaves the nested top row empty (0 ch).
        head_channels = [decoder.blocks[self._top_node(j)].out_channels for j in range(1, d + 1)]
        if 0 in head_channels:
            if deep_supervision or inference_head != "full":
                raise ConfigError(
                    f"encoder {encoder_name!r} has no stride-2 features, so UNet++ has no nested nodes X(0,j) "
                    "for deep supervision or pruned/mean inference heads"
                )
            head_channels = []
        self.ds_heads = nn.ModuleList(nn.Conv2d(c, num_classes, kernel_size=1) for c in head_channels)
        for head in self.ds_heads:
            nn.init.xavier_uniform_(head.weight)  # as smp's initialize_head
            nn.init.zeros_(head.bias)

    @property
    def num_nested(self) -> int:
        """Number of deep-supervision heads: one per top-row nested node X(0,1..D-1)."""
        return len(self.ds_heads)

    def _top_node(self, j: int) -> str:
        """smp block name of the paper's node X(0, j), j = 1..D-1."""
        d = self.decoder.depth
        return f"x_{d - j}_{d - 1}"

    def _node(
        self, name: str, features: Sequence[torch.Tensor], memo: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Output of smp block ``x_{i}_{l}``, computing (and memoising) only the nodes it depends on."""
        if name in memo:
            return memo[name]
        d = self.decoder.depth
        n = self.encoder_depth
        i, layer = (int(v) for v in name.split("_")[1:])

        def feat(k: int) -> torch.Tensor:  # smp's reversed feature index k -> stride 2**(n-k)
            return features[n - k]

        block, up = self.decoder.blocks[name], self.upsample[name]
        if layer == d:  # final full-resolution block, no skip
            out = run_decoder_block(block, self._node(f"x_0_{d - 1}", features, memo), None, up)
        elif i == layer:
            out = run_decoder_block(block, feat(i), feat(i + 1), up)
        else:
            dense = [self._node(f"x_{k}_{layer}", features, memo) for k in range(i + 1, layer + 1)]
            skip = torch.cat([*dense, feat(layer + 1)], dim=1)
            out = run_decoder_block(block, self._node(f"x_{i}_{layer - 1}", features, memo), skip, up)
        memo[name] = out
        return out

    def _head(self, j: int, features: Sequence[torch.Tensor], memo: dict[str, torch.Tensor]) -> torch.Tensor:
        node = self._node(self._top_node(j), features, memo)
        logits = self.ds_heads[j - 1](node)  # 1x1 conv at stride 2, then upsample the (few) logit channels
        return F.interpolate(logits, size=features[0].shape[-2:], mode="bilinear", align_corners=False)

    def _main(self, features: Sequence[torch.Tensor], memo: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.segmentation_head(self._node(f"x_0_{self.decoder.depth}", features, memo))

    def heads(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """[main, head1, ..., head(D-1)] padded-resolution logits, whatever the mode."""
        memo: dict[str, torch.Tensor] = {}
        main = self._main(features, memo)
        return [main, *(self._head(j, features, memo) for j in range(1, self.num_nested + 1))]

    def output_mode(self) -> str:
        """What ``forward`` returns now: ``all`` (the deep-supervision list) or an ``inference_head``."""
        if self.training and self.deep_supervision:
            return "all"
        return self.inference_head

    def encoder_depth_needed(self) -> int | None:
        # X(0, j) reads encoder features down to stride 2**(j+1).
        return self.pruned_depth + 1 if self.output_mode() == "pruned" else None

    def decode(self, features: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        mode = self.output_mode()
        if mode == "all":
            return self.heads(features)
        if mode == "mean":
            return torch.stack(self.heads(features)).mean(dim=0)
        if mode == "pruned":
            return self._head(self.pruned_depth, features, {})
        return self._main(features, {})
