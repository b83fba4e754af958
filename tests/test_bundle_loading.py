"""Bundle loading: what a bundle may say (colours), and one clear error per problem (issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medseg.bundle import load_bundle, save_bundle
from medseg.config import load_config
from medseg.errors import BundleError

REPO = Path(__file__).resolve().parents[1]


def _save(path: Path, *overrides: str) -> Path:
    cfg = load_config(None, ["name=tiny", "data.labels={0: bg, 1: thing}", *overrides])
    return save_bundle(path, cfg, {"model": {"w": torch.zeros(2, 3)}}, {"channels": 3}, "# tiny")


def _set_label(path: Path, **fields: object) -> None:
    labels = json.loads((path / "labels.json").read_text())
    labels["1"].update(fields)
    (path / "labels.json").write_text(json.dumps(labels))


@pytest.mark.parametrize("colour", ["red;position:fixed", "#ff00001", "url(x)", "#gg0000", "", 12])
def test_a_colour_that_is_not_hex_is_refused_when_the_bundle_loads(colour: object, tmp_path: Path) -> None:
    path = _save(tmp_path / "b")
    _set_label(path, color=colour)
    with pytest.raises(BundleError, match=r"^b/labels\.json: label 1 .*colour .* is not #rrggbb or #rgb"):
        load_bundle(path)


def test_hex_colours_load_and_named_config_colours_are_saved_as_hex(tmp_path: Path) -> None:
    path = _save(tmp_path / "b")
    for colour in ("#abc", "#A0B1C2"):
        _set_label(path, color=colour)
        assert load_bundle(path).labels[1]["color"] == colour
    _set_label(path, name=["not", "text"])
    with pytest.raises(BundleError, match=r"^b/labels\.json: label 1 .*name"):
        load_bundle(path)
    named = load_bundle(_save(tmp_path / "named", "data.colors={1: red}"))
    assert named.labels[1]["color"] == "#ff0000"


# ------------------------------------------------------------------------ permissions and clear errors

def _load_without_file_permissions_override(paths: list[Path]) -> list[str]:
    """``load_bundle(path)`` for each path, in one child that file permissions apply to (as root: without
    CAP_DAC_OVERRIDE); one line per path: the BundleError's message, or ``loaded``."""
    code = ("import sys\nfrom medseg.bundle import load_bundle\nfrom medseg.errors import BundleError\n"
            "for path in sys.argv[1:]:\n    try:\n        load_bundle(path)\n        print('loaded')\n"
            "    except BundleError as e:\n        print(e)\n")
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    result = subprocess.run([*prefix, sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]  # every failure a BundleError, not a traceback
    return result.stdout.splitlines()


def test_unreadable_bundle_parts_get_a_permission_message(tmp_path: Path) -> None:
    targets = [".", "weights", "weights/model.safetensors", "labels.json", "config.yaml"]
    paths = [_save(tmp_path / f"b{i}") for i in range(len(targets))]  # one bundle per unreadable part
    for path, target in zip(paths, targets, strict=True):
        (path / target).chmod(0)
    try:
        lines = _load_without_file_permissions_override(paths)
    finally:
        for path, target in zip(paths, targets, strict=True):
            (path / target).chmod(0o755 if (path / target).is_dir() else 0o644)
    assert len(lines) == len(targets), lines
    for i, (target, line) in enumerate(zip(targets, lines, strict=True)):
        shown = f"b{i}" if target == "." else f"b{i}/{target}"
        assert line == (f"{shown}: cannot read it (permission denied); the user running medseg needs "
                        "read access to the whole bundle"), (target, line)


def test_weights_that_do_not_fit_the_network_are_a_bundle_error(tmp_path: Path) -> None:
    from medseg.inference import Predictor
    from medseg.models import build_model

    cfg = load_config(None, ["model.encoder=tu-test_efficientnet", "model.pretrained=none",
                             "model.decoder_channels=[16, 8, 8, 8, 8]", "data.labels={0: bg, 1: a}"])
    state = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes).state_dict()
    other = cfg.model_copy(deep=True)
    other.data.labels = {0: "bg", 1: "a", 2: "b"}  # three classes: the head's weights have the wrong shape
    path = save_bundle(tmp_path / "three", other, {"fold0": state}, {"channels": 3}, "# three")
    with pytest.raises(BundleError, match=r"^three/weights/fold0\.safetensors: the weights do not fit the network "
                                          r"config\.yaml describes \(size mismatch for "):
        Predictor.from_bundle(path, device="cpu")


def test_bundles_are_written_readable_for_other_users(tmp_path: Path) -> None:
    """The container runs as user medseg: a bundle written 0700 by another user could not be mounted and read."""
    path = _save(tmp_path / "b")
    modes = {str(p.relative_to(path)): oct(p.stat().st_mode & 0o777) for p in [path, *path.rglob("*")]}
    assert modes.pop(".") == "0o755" and modes.pop("weights") == "0o755"
    assert set(modes.values()) == {"0o644"}, modes
