"""A process that writes outputs in a loop, to be SIGKILLed by tests (tests/reliability/test_atomic_writes.py).

    python crash_child.py KIND OUT [HOOK]

KIND: ``mask`` (write_mask, a NIfTI volume), ``overlay`` (write_overlay PNG), ``bundle`` (save_bundle),
``checkpoint`` (a Lightning checkpoint through the engine's own Trainer's CheckpointIO). Version ``i % 2`` of
the content is written on iteration ``i``; ``WRITING i`` / ``DONE i`` lines go to stdout.

HOOK stops the process at an exact point, prints ``HOOK`` and sleeps until killed:
``before_replace`` (the temporary file is complete, the final rename not done), ``between_renames`` (a bundle
replacement has moved the old bundle aside and not yet moved the new one in).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def versions_mask(like_shape: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 3, like_shape).astype(np.uint8), rng.integers(0, 5, like_shape).astype(np.uint8)]


def bundle_members(version: int) -> dict:
    import torch

    return {"model": {"w": torch.full((1024, 1024), float(version + 1)), "b": torch.full((7,), float(version + 1))}}


def _hang(reason: str) -> None:
    print("HOOK", reason, flush=True)
    time.sleep(3600)


def install_hook(hook: str) -> None:
    if hook == "before_replace":
        real = os.replace

        def replace(src, dst, *a, **k):
            if Path(src).name.startswith("."):
                _hang(f"{src} -> {dst}")
            return real(src, dst, *a, **k)

        os.replace = replace
    elif hook == "between_renames":
        real_rename = Path.rename
        calls = {"n": 0}

        def rename(self, target):
            calls["n"] += 1
            result = real_rename(self, target)
            if Path(target).name.endswith(".old"):  # the old bundle is aside; the new one not yet in place
                _hang(f"{self} -> {target}")
            return result

        Path.rename = rename


def main() -> None:
    kind, out = sys.argv[1], Path(sys.argv[2])
    hook = sys.argv[3] if len(sys.argv) > 3 else "none"
    install_hook(hook)
    if kind in ("mask", "overlay"):
        from medseg.io import Geometry, Scan, write_mask, write_overlay

        shape = (24, 256, 256) if kind == "mask" else (512, 512)
        like = Scan(np.zeros(shape, np.int16), Geometry.identity(shape), source="like")
        masks = versions_mask(shape)
        for i in range(10**6):
            print("WRITING", i, flush=True)
            if kind == "mask":
                write_mask(masks[i % 2], like, out / "mask.nii.gz")
            else:
                write_overlay(like, masks[i % 2], None, out / "overlay.png")
            print("DONE", i, flush=True)
    elif kind == "bundle":
        from medseg.bundle import save_bundle
        from medseg.config import load_config

        cfg = load_config(None, ["name=crash", "data.labels={0: bg, 1: thing}"])
        for i in range(10**6):
            print("WRITING", i, flush=True)
            save_bundle(out / "bundle", cfg, bundle_members(i % 2), {"version": i % 2}, f"# version {i % 2}")
            print("DONE", i, flush=True)
    elif kind == "checkpoint":
        import torch

        from medseg.config import load_config
        from medseg.engine.train import build_trainer

        cfg = load_config(None, ["name=crash"])
        trainer = build_trainer(cfg, out, progress=False)
        io = trainer.strategy.checkpoint_io
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for i in range(10**6):
            print("WRITING", i, flush=True)
            state = {"state_dict": {"w": torch.full((8 * 1024, 1024), float(i % 2 + 1))}, "epoch": i % 2}
            io.save_checkpoint(state, out / "checkpoints" / "last.ckpt")
            print("DONE", i, flush=True)
    else:
        raise SystemExit(f"unknown kind {kind}")


if __name__ == "__main__":
    main()
