"""Bundle loading: what a bundle may say (colours), and one clear error per problem (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medseg.bundle import load_bundle, save_bundle
from medseg.config import load_config
from medseg.errors import BundleError


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
