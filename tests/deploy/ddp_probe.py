"""`medseg ...` with a probe on what each DDP process does: ``MEDSEG_DDP_PROBE=DIR python ddp_probe.py train ...``.

Lightning's launcher re-runs this same command line for ranks 1..N-1, so every rank installs the probe.
The probe only observes: after ``Trainer.fit`` each rank writes ``rank_<r>.json`` (world size, backend, steps),
and every checkpoint or bundle actually written to disk is logged with the writing rank in ``writes.log``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def install(probe: Path) -> None:
    import lightning as L

    import medseg.engine.train as train_module
    from medseg.engine.checkpointing import AtomicCheckpointIO

    probe.mkdir(parents=True, exist_ok=True)

    def log_write(kind: str, path: object) -> None:
        with open(probe / "writes.log", "a") as f:
            f.write(f"{_rank()} {kind} {path}\n")

    original_fit = L.Trainer.fit

    def fit(self, *args, **kwargs):
        import torch.distributed as dist

        out = original_fit(self, *args, **kwargs)
        (probe / f"rank_{self.global_rank}.json").write_text(json.dumps({
            "global_rank": self.global_rank, "world_size": self.world_size,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "global_step": self.global_step, "pid": os.getpid(),
        }))
        return out

    original_save_checkpoint = AtomicCheckpointIO.save_checkpoint  # the engine's CheckpointIO

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        log_write("checkpoint", path)
        return original_save_checkpoint(self, checkpoint, path, storage_options)

    original_save_bundle = train_module.save_bundle

    def save_bundle(out, *args, **kwargs):
        log_write("bundle", out)
        return original_save_bundle(out, *args, **kwargs)

    L.Trainer.fit = fit
    AtomicCheckpointIO.save_checkpoint = save_checkpoint
    train_module.save_bundle = save_bundle


if __name__ == "__main__":
    # The probe folder comes by environment: Lightning re-launches ranks with this file's argv unchanged and
    # the parent's environment, and the CLI must see its usual argv.
    install(Path(os.environ["MEDSEG_DDP_PROBE"]))
    from medseg.cli import main

    main()
