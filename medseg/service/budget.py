"""How much memory the service lets uploads take: the largest scan it decodes and the bytes its queue holds.

A small upload can decode to gigabytes (a 1 MB ``.nii.gz`` of zeros to 1 GB, a 257 KB PNG to 9400 x 9400), and
predicting a scan needs several times its decoded size. So:

* ``voxel_cap``: the largest scan (samples) the service decodes. Default: what a quarter of the machine's memory
  holds at ``prediction_bytes_per_voxel`` (the model's class probabilities and their running sum, float32,
  the float32 input channels, the uncertainty map and the mask, plus the decoded scan itself), never above
  ``medseg.io.MAX_VOXELS``. A header over the cap is refused before decoding (413).
* ``MemoryBudget``: the decoded bytes of every job that is queued or running (4 bytes per sample, reserved from
  the header before decoding; released when the job ends). Default: a quarter of the machine's memory. A
  scan that does not fit now is refused with 429 and Retry-After (it would fit once jobs finish).

"The machine's memory" is the smallest of physical memory and the container's cgroup limit.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medseg.io import MAX_VOXELS

DECODED_BYTES_PER_SAMPLE = 4  # float32 / int32; most scans are smaller (uint8, int16), none is refused for it
MEMORY_FRACTION_PER_SCAN = 0.25
MEMORY_FRACTION_QUEUED = 0.25
MIN_VOXEL_CAP = 1024 * 1024  # whatever the arithmetic says, a 1024 x 1024 image is always served

_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup (container) limit when that is smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return int(total)


def prediction_bytes_per_voxel(num_classes: int, input_channels: int) -> int:
    """Peak bytes per voxel while one scan is predicted (see the module docstring)."""
    return 4 * num_classes * 2 + 4 * input_channels + 4 + 1 + DECODED_BYTES_PER_SAMPLE * input_channels


def default_voxel_cap(predictor: Any, memory_bytes: int) -> int:
    data = predictor.cfg.data
    per_voxel = prediction_bytes_per_voxel(int(data.num_classes), int(data.input_channels))
    return max(MIN_VOXEL_CAP, min(MAX_VOXELS, int(memory_bytes * MEMORY_FRACTION_PER_SCAN) // per_voxel))


class BudgetFullError(Exception):
    """The scan's decoded bytes do not fit into the queue's memory budget now."""

    def __init__(self, needed: int, free: int, retry_after: int):
        super().__init__(
            f"the service's queue is holding its memory budget (this scan needs {needed / 1e6:,.0f} MB, "
            f"{max(free, 0) / 1e6:,.0f} MB are free); retry in about {retry_after} s"
        )
        self.retry_after = retry_after


class MemoryBudget:
    """Decoded bytes of queued and running jobs, against ``limit_bytes``. Thread-safe."""

    def __init__(self, limit_bytes: int, retry_after: Callable[[], int]):
        self.limit_bytes = int(limit_bytes)
        self._retry_after = retry_after
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def reservation(self) -> Reservation:
        return Reservation(self)

    def _take(self, amount: int) -> None:
        with self._lock:
            if self._used + amount > self.limit_bytes:
                free = self.limit_bytes - self._used
            else:
                self._used += amount
                return
        raise BudgetFullError(amount, free, self._retry_after())

    def _give(self, amount: int) -> None:
        with self._lock:
            self._used = max(0, self._used - amount)


class Reservation:
    """One request's share of the budget: ``admit(shape, components)`` (the readers' hook, before decoding) takes it,
    ``release()`` gives it back (idempotent: the request's error path and the worker may both call it)."""

    def __init__(self, budget: MemoryBudget):
        self._budget = budget
        self._held = 0
        self._lock = threading.Lock()

    def admit(self, shape: tuple[int, ...], components: int = 1) -> None:
        amount = math.prod(shape) * max(1, components) * DECODED_BYTES_PER_SAMPLE
        with self._lock:
            extra = amount - self._held
            if extra > 0:
                self._budget._take(extra)
                self._held = amount

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, 0
        self._budget._give(held)

    @property
    def held_bytes(self) -> int:
        return self._held
