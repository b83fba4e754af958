"""What the planner assumes about the machine: training/inference throughput and memory.

Throughput is in *pixels per second* for a UNet with an EfficientNet-Lite0 encoder (forward + backward + optimiser
step for training; forward only for inference), so a plan can price any patch and batch. The CPU figures were
measured on this project's 2-core build machine (README, "Speed": about 3 training images/s at 256², 210 ms per 512²
inference pass) and scale with the number of cores; other encoders scale by a relative cost factor. The plan only
uses these to choose patch, batch and a first estimate of the schedule: a budgeted run measures its real step time
before it fixes the schedule (`medseg.engine.budget`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Measured on 2 cores: ~3 images/s at 256² (training), 210 ms per 512² pass (inference, eager, BN folded).
CPU_TRAIN_PIXELS_PER_S_PER_CORE = 98_000.0
CPU_INFER_PIXELS_PER_S_PER_CORE = 550_000.0
# Not measured here (no GPU was lent when this was written): a conservative figure for an A100/H100-class GPU with
# bf16 autocast; the budget calibration replaces it with the measured step time.
GPU_TRAIN_PIXELS_PER_S = 40_000_000.0
GPU_INFER_PIXELS_PER_S = 150_000_000.0
# Training activation memory per input pixel per sample, UNet + Lite0, fp32 (bf16 about half): a batch of 8 at 256²
# measured about 1.6 GB of activations on the CPU.
TRAIN_BYTES_PER_PIXEL = 3_000.0

# Relative training cost per pixel against Lite0 (FLOPs at 256², smp UNet decoder included); unknown encoders 1.5.
ENCODER_COST = {
    "timm-tf_efficientnet_lite0": 1.0, "timm-tf_efficientnet_lite1": 1.3, "timm-tf_efficientnet_lite2": 1.6,
    "timm-tf_efficientnet_lite3": 2.3, "timm-tf_efficientnet_lite4": 3.6,
    "efficientnet-b0": 1.1, "efficientnet-b1": 1.5, "efficientnet-b2": 1.8, "efficientnet-b3": 2.5,
    "efficientnet-b4": 3.8, "resnet18": 1.0, "resnet34": 1.5, "resnet50": 2.2,
}


@dataclass(frozen=True)
class DeviceProfile:
    kind: str  # "cpu" | "cuda"
    name: str
    train_pixels_per_s: float
    infer_pixels_per_s: float
    memory_bytes: int  # RAM for the CPU, device memory for a GPU
    host_memory_bytes: int  # RAM (for the data cache)

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def describe(self) -> str:
        return (f"{self.name}: ~{self.train_pixels_per_s / 1e6:.2f} Mpx/s training, "
                f"~{self.infer_pixels_per_s / 1e6:.2f} Mpx/s inference (Lite0 UNet), "
                f"{self.memory_bytes / 2**30:.0f} GiB")


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def detect_device(accelerator: str = "auto", encoder: str = "timm-tf_efficientnet_lite0") -> DeviceProfile:
    """The profile of the device training will use (``train.accelerator``), scaled for ``encoder``."""
    cost = ENCODER_COST.get(encoder, 1.5)
    host = _host_memory()
    use_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if use_gpu:
        props = torch.cuda.get_device_properties(0)
        return DeviceProfile("cuda", props.name, GPU_TRAIN_PIXELS_PER_S / cost, GPU_INFER_PIXELS_PER_S / cost,
                             int(props.total_memory), host)
    cores = max(1, torch.get_num_threads())
    return DeviceProfile("cpu", f"CPU ({cores} threads)", CPU_TRAIN_PIXELS_PER_S_PER_CORE * cores / cost,
                         CPU_INFER_PIXELS_PER_S_PER_CORE * cores / cost, host, host)


def cpu_profile(cores: int = 2, memory_gib: float = 24) -> DeviceProfile:
    """A CPU profile with a given core count (tests and docs plan for a known machine)."""
    mem = int(memory_gib * 2**30)
    return DeviceProfile("cpu", f"CPU ({cores} threads)", CPU_TRAIN_PIXELS_PER_S_PER_CORE * cores,
                         CPU_INFER_PIXELS_PER_S_PER_CORE * cores, mem, mem)


def gpu_profile(memory_gib: float = 80, name: str = "GPU") -> DeviceProfile:
    mem = int(memory_gib * 2**30)
    return DeviceProfile("cuda", name, GPU_TRAIN_PIXELS_PER_S, GPU_INFER_PIXELS_PER_S, mem, 4 * mem)
