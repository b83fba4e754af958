"""Inference backends: what runs one ensemble member's forward pass (``inference.backend``, ``--backend``).

All three take a batch ``(B, C, H, W)`` float32 in [0, 1] of any H, W and return logits ``(B, K, H, W)``
float32 on the CPU; tiling, TTA, blending and the softmax stay with the caller, so every backend goes through
the same overlap-tile code and differs only in how the network is executed:

* ``torch`` — eager PyTorch, channels-last (oneDNN's CPU convolutions ran 2x faster in NHWC here; cuDNN's are
  fastest in it under autocast). No warm-up.
* ``compile`` — ``torch.compile`` (inductor) of the same module: fuses activations, concatenations and
  upsampling (a 512² Lite0 UNet pass ran about 1.8x faster on this 2-core CPU), at the price of a compile per
  new tile shape (tens of seconds; needs a C++ compiler). If compiling fails the runner logs it once and
  continues eagerly.
* ``onnxruntime`` — the member exported to ONNX in memory (no file) and run by ONNX Runtime with the process's
  thread count. The graph is the padded network (`padded_logits`): the runner reflect-pads to the stride and
  crops, exactly as `SegmentationNet.forward` does, so the outputs agree with ``torch`` to float rounding
  (tests/inference/test_backends.py: max |Δ probability| <= 1e-4).

``auto`` picks the fastest measured for the device (`default_backend`; ``benchmarks/inference.py --backend``).
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Callable
from enum import StrEnum

import torch
from torch import nn

log = logging.getLogger("medseg")

Runner = Callable[[torch.Tensor], torch.Tensor]


class Backend(StrEnum):
    AUTO = "auto"
    TORCH = "torch"
    COMPILE = "compile"
    ONNXRUNTIME = "onnxruntime"


def default_backend(device: torch.device) -> Backend:
    """The backend ``auto`` means on ``device``.

    CPU: ``onnxruntime``. Measured alone on this 2-core CPU (README, "Inference backends"): 100 vs 128 ms per 512²
    image and 108 vs 145 ms per 2.5D slice against eager torch, a 300-slice CT end to end in 46 s instead of 57 s,
    for a one-off export of about a second per member; ``compile`` compiles for ~15 s per tile shape. A network
    the exporter cannot take runs eagerly (with a warning). GPU: eager ``torch`` (cuDNN under autocast).
    """
    return Backend.ONNXRUNTIME if device.type == "cpu" else Backend.TORCH


def padded_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of a medseg network for a batch already padded to its output stride, without
    `SegmentationNet.forward`'s size-dependent pad/crop (which a traced graph would freeze to one size)."""
    if hasattr(model, "encode") and hasattr(model, "decode"):
        return model.decode(model.encode(x, model.encoder_depth_needed()))
    return model(x)


def export_graph(module: nn.Module, example: torch.Tensor, out: str | io.BytesIO, output: str, opset: int = 17) -> None:
    """``module`` as an ONNX graph ``image (B, C, H, W) -> output`` with dynamic batch, height and width.

    The TorchScript exporter needs no extra packages (the dynamo one needs onnxscript) and handles the dynamic
    H/W of these convolutional graphs. Used by the ``onnxruntime`` backend (in memory) and `export_onnx` (file)."""
    dims = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(module, (example,), out, dynamo=False, input_names=["image"], output_names=[output],
                          dynamic_axes={"image": dims, output: dims}, opset_version=opset)


def member_runner(model: nn.Module, backend: Backend | str, device: torch.device) -> Runner:
    """A function running ``model`` (eval mode, on ``device``) with ``backend`` (not ``auto``: resolve first)."""
    backend = Backend(backend)
    if backend is Backend.AUTO:
        backend = default_backend(device)
    eager = _eager_runner(model, device)
    if backend is Backend.ONNXRUNTIME:
        try:
            return _onnx_runner(model, device)
        except Exception as e:  # noqa: BLE001 - an op the exporter or ONNX Runtime lacks: eager still works
            log.warning("backend onnxruntime: the export failed (%s: %s); running eagerly", type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "")
            return eager
    if backend is Backend.COMPILE:
        return _compiled_runner(model, device, eager)
    return eager


def _eager_runner(model: nn.Module, device: torch.device) -> Runner:
    cuda = device.type == "cuda"

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=cuda):
            return model(x).float().cpu()

    return run


def _compiled_runner(model: nn.Module, device: torch.device, eager: Runner) -> Runner:
    compiled: list = [torch.compile(model, dynamic=False)]
    cuda = device.type == "cuda"

    def run(x: torch.Tensor) -> torch.Tensor:
        if compiled[0] is not None:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            try:
                with torch.autocast(device.type, enabled=cuda):
                    return compiled[0](x).float().cpu()
            except Exception as e:  # noqa: BLE001 - no C++ compiler, an unsupported op: eager still works
                log.warning("backend compile: torch.compile failed (%s: %s); running eagerly", type(e).__name__,
                            str(e).splitlines()[0][:200] if str(e) else "")
                compiled[0] = None
        return eager(x)

    return run


def _onnx_runner(model: nn.Module, device: torch.device) -> Runner:
    import onnxruntime as ort

    from medseg.models.network import reflect_pad_to_multiple

    stride = int(getattr(model, "output_stride", 32))
    cpu_model = model if device.type == "cpu" else copy.deepcopy(model).cpu()  # the members stay where they are

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = cpu_model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return padded_logits(self.net, x)

    example = torch.rand(1, int(getattr(model, "in_channels", 3)), 2 * stride, 3 * stride)
    buffer = io.BytesIO()
    export_graph(Padded().eval(), example, buffer, "logits")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Memory patterns pre-plan one arena block per input shape: as fast here (134 ms per 512² slice either way,
    # batches of 2) and 0.1-0.5 GB more resident with them on.
    options.enable_mem_pattern = False
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(buffer.getvalue(), options, providers=providers)

    def run(x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        xp = reflect_pad_to_multiple(x.detach().to("cpu", torch.float32), stride).contiguous()
        (logits,) = session.run(["logits"], {"image": xp.numpy()})
        return torch.from_numpy(logits[..., :h, :w])

    return run
