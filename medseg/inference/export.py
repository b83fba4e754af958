"""Export a bundle's ensemble to ONNX (``torch.onnx.export``) for serving without PyTorch.

The graph takes ``image`` ``(B, C, H, W)`` float32 in [0, 1] (preprocessed as in
``preprocessing.json``; the encoder's own normalisation is inside the graph) with H and W multiples of the
network's output stride (``output_stride`` in the sidecar, 32 for a depth-5 encoder: reflect-pad and crop
around it, as `SegmentationNet.forward` does), and returns ``probabilities`` ``(B, K, H, W)``: the mean over
ensemble members of ``softmax(logits / temperature)`` — one plain pass; tiling and TTA stay with the caller.
Batch, height and width are dynamic. A JSON sidecar (``<out>.json``) holds labels, channels, 2.5D context,
stride, tile size and the weights hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.bundle import RESEARCH_NOTICE, load_bundle
from medseg.errors import BundleError
from medseg.inference.backends import export_graph, padded_logits
from medseg.inference.predictor import build_member


class EnsembleProbabilities(nn.Module):
    """``(B, C, H, W)`` -> mean member ``softmax(logits / T)`` ``(B, K, H, W)`` for H, W multiples of the
    stride. Skips `SegmentationNet.forward`'s pad/crop, whose size-dependent Python loop would be frozen into
    the traced graph; the caller pads instead."""

    def __init__(self, members: list[nn.Module], temperature: float = 1.0) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for model in self.members:
            p = torch.softmax(padded_logits(model, x) / self.temperature, dim=1)
            total = p if total is None else total + p
        assert total is not None
        return total / len(self.members)


def export_onnx(bundle_path: str | Path, out: str | Path, opset: int = 17) -> Path:
    """Write ``out`` (.onnx) and ``out.json`` (sidecar) for the bundle at ``bundle_path``; returns ``out``."""
    bundle = load_bundle(bundle_path)
    cfg = bundle.config
    members = [build_member(cfg, state) for state in bundle.load_members().values()]
    temperature = float((bundle.calibration or {}).get("temperature", 1.0))
    wrapper = EnsembleProbabilities(members, temperature).eval()
    stride = int(getattr(members[0], "output_stride", 32))
    example = torch.rand(1, cfg.data.input_channels, 2 * stride, 3 * stride)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_graph(wrapper, example, str(out), "probabilities", opset)
    except Exception as e:  # report which bundle failed, not an exporter traceback
        raise BundleError(f"{Path(bundle_path).name}: ONNX export failed ({type(e).__name__}: {e})") from None
    sidecar: dict[str, Any] = {
        "name": cfg.name,
        "weights_hash": bundle.weights_hash,
        "members": len(members),
        "temperature": temperature,
        "input": {"name": "image", "layout": "BCHW", "range": [0.0, 1.0], "channels": cfg.data.input_channels,
                  "channels_per_slice": cfg.data.channels, "context_slices": cfg.data.context_slices,
                  "intensity": str(cfg.data.intensity), "ct_window": list(cfg.data.ct_window),
                  "intensity_range": list(cfg.data.intensity_range) if cfg.data.intensity_range else None,
                  "size_multiple": stride, "pad_mode": "reflect"},
        # The model grid the network was trained on (medseg.transforms.resample): resample each scan like this
        # first, and the probabilities back to the scan's grid before argmax.
        "model_grid": {"resample": str(cfg.data.resample),
                       "target_spacing_mm_array_order": list(cfg.data.target_spacing) if cfg.data.target_spacing else None,
                       "target_size_px_geometric_mean": cfg.data.target_size, "slice_axis": cfg.data.slice_axis},
        "output": {"name": "probabilities", "layout": "BKHW"},
        "output_stride": stride,
        "tile_size": list(cfg.inference.tile_size),
        "labels": {str(k): v for k, v in bundle.labels.items()},
        "notice": RESEARCH_NOTICE,
    }
    Path(str(out) + ".json").write_text(json.dumps(sidecar, indent=1))
    return out
