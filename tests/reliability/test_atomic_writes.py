"""Interrupted writes never leave a half file that is later loaded.

A child process (crash_child.py) writes masks, overlays, bundles and checkpoints in a loop, alternating two
versions; it is SIGKILLed at random moments and at exact points (temporary file complete but not renamed; a
bundle replacement between its two renames). After every kill the output must load and equal one of the two
versions exactly, and the temporary leftovers must be invisible to medseg's readers and listings.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.bundle import find_bundles, load_bundle
from medseg.cli import expand_inputs
from medseg.errors import BundleError
from medseg.io import read_scan

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import crash_child  # noqa: E402
from robust_harness import WriterChild as Child  # noqa: E402


def _hidden_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------- masks


def _check_mask(out: Path, versions: list[np.ndarray], any_write_done: bool) -> None:
    target = out / "mask.nii.gz"
    if not target.exists():
        assert not any_write_done, "a completed mask disappeared"
        return
    mask = read_scan(target).array
    assert any(np.array_equal(mask, v) for v in versions), "the mask on disk is neither version"
    if any_write_done:  # the folder, read as one input, is the mask, not a leftover temporary file
        assert read_scan(out).source == "mask.nii.gz"
    assert expand_inputs([out]) == [target]


@pytest.mark.slow  # a campaign of random-moment kills (.ci/run); the exact-point kills below stay fast
def test_mask_writes_killed_at_random_moments_leave_a_whole_mask(tmp_path: Path) -> None:
    versions = crash_child.versions_mask((24, 256, 256))
    rng = random.Random(1)
    any_done = False
    for _ in range(4):
        child = Child("mask", tmp_path)
        child.wait_for("WRITING")
        time.sleep(rng.uniform(0, 1.5))
        child.kill()
        any_done |= child.done >= 0
        _check_mask(tmp_path, versions, any_done)
    assert any_done, "no write ever completed: the kills tested nothing"


def test_mask_write_killed_before_the_final_rename_keeps_the_old_mask(tmp_path: Path) -> None:
    versions = crash_child.versions_mask((24, 256, 256))
    child = Child("mask", tmp_path)  # one complete write first (version 0)...
    child.wait_for("DONE")
    child.kill()
    child = Child("mask", tmp_path, hook="before_replace")  # ...then killed with version 0's rewrite complete
    child.wait_for("HOOK")
    child.kill()
    assert np.array_equal(read_scan(tmp_path / "mask.nii.gz").array, versions[0])
    leftovers = _hidden_leftovers(tmp_path)
    assert leftovers and all(p.name.endswith(".tmp.nii.gz") for p in leftovers)  # the killed write's temp file
    assert expand_inputs([tmp_path]) == [tmp_path / "mask.nii.gz"]
    assert read_scan(tmp_path).source == "mask.nii.gz"


def test_overlay_write_killed_before_rename_keeps_the_old_overlay(tmp_path: Path) -> None:
    child = Child("overlay", tmp_path)
    child.wait_for("DONE")
    child.kill()
    before = (tmp_path / "overlay.png").read_bytes()
    child = Child("overlay", tmp_path, hook="before_replace")
    child.wait_for("HOOK")
    child.kill()
    assert (tmp_path / "overlay.png").read_bytes() == before
    assert read_scan(tmp_path / "overlay.png").array.shape == (512, 512, 3)


# ------------------------------------------------------------------------------------------- bundles


def _bundle_version(path: Path) -> int:
    b = load_bundle(path)
    w = b.load_members()["model"]
    values = {float(w["w"].min()), float(w["w"].max()), float(w["b"].min()), float(w["b"].max())}
    assert len(values) == 1, f"mixed weights {values}"
    version = int(values.pop()) - 1
    assert b.preprocessing == {"version": version} and f"version {version}" in b.model_card, "mixed bundle"
    return version


@pytest.mark.slow  # a campaign of random-moment kills (.ci/run); the exact-point kills below stay fast
def test_bundle_saves_killed_at_random_moments_leave_a_whole_bundle(tmp_path: Path) -> None:
    rng = random.Random(2)
    any_done = False
    for _ in range(4):
        child = Child("bundle", tmp_path)
        child.wait_for("WRITING")
        time.sleep(rng.uniform(0, 1.0))
        child.kill()
        any_done |= child.done >= 0
        if any_done:
            assert _bundle_version(tmp_path / "bundle") in (0, 1)
        else:
            with pytest.raises(BundleError):
                load_bundle(tmp_path / "bundle")
        assert find_bundles(tmp_path) in ([tmp_path / "bundle"], [])
    assert any_done, "no save ever completed: the kills tested nothing"


def test_bundle_replacement_killed_between_its_renames_still_loads_the_old_bundle(tmp_path: Path) -> None:
    child = Child("bundle", tmp_path)
    child.wait_for("DONE")  # version 0 saved
    child.kill()
    child = Child("bundle", tmp_path, hook="between_renames")  # version 0 again: old moved aside, new not in
    child.wait_for("HOOK")
    child.kill()
    assert not (tmp_path / "bundle").exists()  # the window this test is about
    assert _bundle_version(tmp_path / "bundle") == 0  # load_bundle falls back to the complete old copy
    # The next save completes normally and clears the parked copy.
    child = Child("bundle", tmp_path)
    child.wait_for("DONE")
    child.kill()
    assert _bundle_version(tmp_path / "bundle") in (0, 1)
    assert not (tmp_path / ".bundle.old").exists()


# ------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_ok(path: Path) -> bool:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a half-written checkpoint
        return False
    w = state["state_dict"]["w"]
    return float(w.min()) == float(w.max()) == state["epoch"] + 1


@pytest.mark.slow
@pytest.mark.parametrize("tmpdir_kind", ["same_filesystem", "other_filesystem"])
def test_checkpoint_saves_killed_mid_write_leave_a_loadable_last_ckpt(tmpdir_kind: str, tmp_path: Path) -> None:
    """The engine's Trainer writes last.ckpt through its CheckpointIO; a kill while it grows must not leave a
    partial file. Lightning 2.6's own CheckpointIO stages the bytes under TMPDIR and moves them in place: a copy
    into last.ckpt when TMPDIR is another file system (tmpfs /tmp, a mounted output volume in Docker). The
    engine's AtomicCheckpointIO writes beside the checkpoint and renames, whatever TMPDIR is."""
    if tmpdir_kind == "other_filesystem":
        shm = Path("/dev/shm")
        if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("no second file system (/dev/shm) to stage temporary files on")
        staging = shm / f"medseg-test-{os.getpid()}"
    else:
        staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    child = Child("checkpoint", tmp_path, env={"TMPDIR": str(staging)})
    child.wait_for("DONE")
    full = last.stat().st_size
    bad = []
    try:
        for _ in range(5):
            # Kill while last.ckpt is being rewritten: the moment its size drops below a full checkpoint's
            # (a copy in place), or right after a new write starts when the file is replaced atomically.
            child.wait_for("WRITING")
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                try:
                    if last.stat().st_size < full:
                        break
                except FileNotFoundError:
                    break
            child.kill()
            if not _checkpoint_ok(last):
                bad.append(f"partial last.ckpt ({last.stat().st_size:,} of {full:,} bytes)")
                last.unlink()
            child = Child("checkpoint", tmp_path, env={"TMPDIR": str(staging)})
            child.wait_for("DONE")
    finally:
        child.kill()
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    assert not bad, bad
