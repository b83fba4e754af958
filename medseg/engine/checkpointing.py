"""What makes a killed training run resumable exactly: checkpoints that are never half written, and the
random-number state that decides the next epoch's patches and augmentations saved inside them.

Lightning saves model, optimiser, scheduler and loop state, but not the RNGs (its trainer only restores them
in fault-tolerant modes we do not use) and not albumentations' private generators. Without them a resumed
epoch draws other patches than the uninterrupted run would: on small data that alone moves val Dice by 0.1+.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from medseg.io.writers import fsync_dir


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write ``path`` as ``.<name>.tmp-<pid>`` in the same folder, fsync, then ``os.replace``.

    Lightning 2.6 stages the bytes under TMPDIR and moves them in place, which is a copy (not atomic) when
    TMPDIR is another file system: a tmpfs ``/tmp``, or an output volume mounted into a container. A rename
    inside the checkpoint folder is atomic on every local file system, so a kill leaves the old checkpoint or
    the new one, never a torn file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------- RNG state
# Checkpoints are loaded with weights_only=True, so every state below is stored as tensors, ints, strings and
# containers (numpy's legacy state tuple holds an ndarray, which that loader refuses).


def collect_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy's global and Python's ``random`` state."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableRandomState(L.Callback):
    """Saves the RNG state with every checkpoint and puts it back when a run resumes.

    The state is taken when the checkpoint is written (end of validation) and restored at ``on_train_start``,
    i.e. before the next epoch's data loader is iterated: the sampler's shuffle, the worker seeds and (with
    ``num_workers: 0``) the augmentation draws then continue exactly where the uninterrupted run was.
    ``augment`` is the training augmentation, if it keeps its own generators (``Augment2D``), seeded with
    ``seed``.

    Under DDP every rank built the same seeded augmentation; each rank > 0 is reseeded from ``seed`` and its
    rank so the ranks draw different streams. The checkpoint holds rank 0's state, so a resumed DDP run is exact
    on rank 0 only (ranks > 0 get fresh streams, still distinct per rank and epoch).
    """

    def __init__(self, augment: Any = None, seed: int | None = None) -> None:
        self.augment = augment
        self.seed = seed
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"rng": collect_rng_state()}
        if self.augment is not None and hasattr(self.augment, "state_dict"):
            state["augment"] = self.augment.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called while the checkpoint is restored, before Lightning has finished setting up: anything that
        # draws random numbers after this (model init of a resumed run, sanity checks) would consume them.
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resumed = self._pending is not None
        if resumed:
            restore_rng_state(self._pending["rng"])
            if "augment" in self._pending and self.augment is not None and hasattr(self.augment, "load_state_dict"):
                self.augment.load_state_dict(self._pending["augment"])
            self._pending = None
        rank = trainer.global_rank
        if rank > 0 and self.seed is not None and hasattr(self.augment, "reseed"):
            # reseed(s) seeds the pipeline's two generators with s and s + 1: 2 * rank keeps ranks disjoint.
            self.augment.reseed(self.seed + 2 * rank + (7919 * trainer.current_epoch if resumed else 0))
