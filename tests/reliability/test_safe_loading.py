"""Nothing a user hands medseg is ever unpickled or executed.

Every test plants a payload that, if unpickled (or YAML-constructed), writes a marker file; the marker must
never appear, and the load must fail with a medseg error naming the file. Where a benign file of the same
format loads, that is checked too, so a refusal is due to the payload and not to the format.
"""

from __future__ import annotations

import builtins
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.bundle import load_bundle, save_bundle
from medseg.cli import app
from medseg.config import load_config
from medseg.errors import BundleError, ConfigError, MedsegError, ScanReadError
from medseg.io import read_probabilities
from medseg.models.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


class Payload:
    """Unpickling this runs code that writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _tiny_bundle(path: Path) -> Path:
    cfg = load_config(None, ["name=tiny", "data.labels={0: bg, 1: thing}"])
    return save_bundle(path, cfg, {"model": {"w": torch.ones(2, 3)}}, {"channels": 3}, "# tiny")


# ------------------------------------------------------------------------------------- pretrained weights


def _write_checkpoint(path: Path, kind: str, payload: object) -> None:
    tensors = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    if kind == "legacy_pickle":  # pre-1.6 torch format: a bare pickle stream
        torch.save({**tensors, "extra": payload}, path, _use_new_zipfile_serialization=False)
    elif kind == "torch_zip":  # torch.save's zip format, payload in data.pkl next to real tensors
        torch.save({**tensors, "extra": payload}, path)
    elif kind == "lightning_ckpt":  # a Lightning-style checkpoint: code hidden in the hyper-parameters
        torch.save({"state_dict": tensors, "hyper_parameters": {"cfg": payload}, "epoch": 3}, path)
    else:
        raise ValueError(kind)


@pytest.mark.parametrize(("kind", "suffix"), [("legacy_pickle", ".pth"), ("torch_zip", ".pth"),
                                              ("torch_zip", ".pt"), ("torch_zip", ".bin"),
                                              ("lightning_ckpt", ".ckpt")])
def test_pretrained_checkpoint_with_code_is_refused(kind: str, suffix: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    net = torch.nn.Linear(2, 2)
    benign = tmp_path / f"benign{suffix}"
    _write_checkpoint(benign, kind, payload=[1, 2, 3])  # same layout, plain data: loads
    assert sorted(load_pretrained(net, str(benign)).loaded) == ["bias", "weight"]

    evil = tmp_path / f"evil{suffix}"
    _write_checkpoint(evil, kind, payload=Payload(marker))
    with pytest.raises(ConfigError) as err:
        load_pretrained(net, str(evil))
    assert not marker.exists(), "the checkpoint's code ran"
    message = str(err.value)
    assert message.startswith(f"evil{suffix}: refused to load") and "weights_only=True" in message
    assert "GLOBAL" in message and "exec" in message and "\n" not in message.strip() and str(tmp_path) not in message


def test_cli_train_refuses_pretrained_pickle_with_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pth"
    _write_checkpoint(evil, "torch_zip", Payload(marker))
    res = runner.invoke(app, ["train", str(REPO / "configs/experiments/demo_nuclei.yaml"), "--out",
                              str(tmp_path / "run"), "--epochs", "1", "--limit-cases", "4",
                              "--set", "data.folds=2", "--set", "data.patch_size=[64, 64]",
                              "--set", f"model.pretrained={evil}"])
    assert not marker.exists(), "the checkpoint's code ran"
    assert res.exit_code == 1, res.output
    assert "error: evil.pth: refused to load" in res.output, res.output
    assert isinstance(res.exception, SystemExit)


def test_cli_resume_refuses_a_planted_checkpoint_with_code(tmp_path: Path) -> None:
    """``--resume`` loads OUT/checkpoints/last.ckpt through Lightning; a tampered one must not run code."""
    marker = tmp_path / "pwned.txt"
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    _write_checkpoint(out / "checkpoints" / "last.ckpt", "lightning_ckpt", Payload(marker))
    res = runner.invoke(app, ["train", str(REPO / "configs/experiments/demo_nuclei.yaml"), "--out", str(out),
                              "--epochs", "1", "--limit-cases", "4", "--resume", "--set", "data.folds=2",
                              "--set", "data.patch_size=[64, 64]", "--set", "model.pretrained=none"])
    assert not marker.exists(), "the checkpoint's code ran"
    assert res.exit_code != 0, res.output
    assert "error: last.ckpt: refused to load" in res.output, res.output
    assert isinstance(res.exception, SystemExit)  # a handled error, not an exception escaping the CLI
    assert not (out / "bundle").exists()  # nothing was trained from it


# ------------------------------------------------------------------------------------- bundles


def test_bundle_weights_are_safetensors_only(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    bundle = _tiny_bundle(tmp_path / "b")
    _write_checkpoint(bundle / "weights" / "extra.pth", "torch_zip", Payload(marker))
    with open(bundle / "weights" / "other.pkl", "wb") as f:
        pickle.dump(Payload(marker), f)
    b = load_bundle(bundle)
    assert [p.name for p in b.member_files] == ["model.safetensors"]
    assert list(b.load_members()) == ["model"]
    for p in (bundle / "weights" / "model.safetensors",):
        p.unlink()
    with pytest.raises(BundleError, match=r"b: bundle has no weights/\*\.safetensors"):
        load_bundle(bundle)
    assert not marker.exists()


def test_bundle_zip_with_pickled_weights_only_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    bundle = _tiny_bundle(tmp_path / "b")
    (bundle / "weights" / "model.safetensors").unlink()
    _write_checkpoint(bundle / "weights" / "model.pth", "torch_zip", Payload(marker))
    archive = tmp_path / "evil_bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in bundle.rglob("*"):
            if f.is_file():
                zf.write(f, f.relative_to(tmp_path))
    with pytest.raises(BundleError, match="no weights/"):
        load_bundle(archive)
    assert not marker.exists()


def test_bundle_config_yaml_cannot_construct_objects(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    bundle = _tiny_bundle(tmp_path / "b")
    config = bundle / "config.yaml"
    tag = f"!!python/object/apply:builtins.exec [\"open({str(marker)!r}, 'w').write('pwned')\"]"
    config.write_text(f"description: {tag}\n" + config.read_text())
    with pytest.raises(MedsegError) as err:
        load_bundle(bundle)
    assert not marker.exists()
    assert "b: corrupt bundle metadata" in str(err.value) and "\n" not in str(err.value)


def test_bundle_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """A 'billion laughs' in a schedule's free-form parameters would hang whatever walks the config later."""
    bundle = _tiny_bundle(tmp_path / "b")
    config = bundle / "config.yaml"
    anchors = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    anchors += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = config.read_text()
    assert "schedule_params: {}" in text
    config.write_text(text.replace("schedule_params: {}", "schedule_params: {" + ", ".join(anchors) + "}"))
    with pytest.raises(BundleError, match="expands to more than 100,000 values"):
        load_bundle(bundle)


# ------------------------------------------------------------------------------------- arrays


def test_probability_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "case_probs.npz"
    np.savez(evil, probabilities=np.array([Payload(marker)], dtype=object),
             geometry=np.array(json.dumps({"spacing": [1, 1], "origin": [0, 0], "direction": [1, 0, 0, 1],
                                           "size": [1, 1]})))
    with pytest.raises(ScanReadError, match=r"case_probs\.npz: not a medseg probability file"):
        read_probabilities(evil)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- source audit

UNSAFE_CALLS = {
    r"\bpickle\.loads?\(": "pickle.load",
    r"\bcPickle\b": "cPickle",
    r"\bdill\b": "dill",
    r"\bjoblib\.load\(": "joblib.load",
    r"\bmarshal\.loads?\(": "marshal.load",
    r"\bshelve\.open\(": "shelve",
    r"\byaml\.(?:unsafe_)?load\((?![^)]*Loader=yaml\.SafeLoader)": "yaml.load without SafeLoader",
    r"\byaml\.(?:full_load|unsafe_load|load_all)\(": "unsafe yaml loader",
    r"\btorch\.jit\.load\(": "torch.jit.load",
    r"\btorch\.package\b": "torch.package",
}


def _sources() -> list[Path]:
    files = sorted((REPO / "medseg").rglob("*.py"))
    if (REPO / "app").is_dir():
        files += sorted((REPO / "app").rglob("*.py"))
    return files


def test_source_never_unpickles_user_files() -> None:
    """Every torch.load passes weights_only=True, every np.load allow_pickle=False; no pickle-based loaders.

    Lightning's own resume load (engine/train.py) is covered by passing ``weights_only=True`` to ``fit``.
    """
    problems = []
    for path in _sources():
        text = path.read_text()
        rel = path.relative_to(REPO)
        for call in re.finditer(r"\btorch\.load\(", text):
            args = _call_args(text, call.end())
            if not re.search(r"weights_only\s*=\s*True", args):
                problems.append(f"{rel}: torch.load without weights_only=True: torch.load({args})")
        for call in re.finditer(r"\bnp\.load\(|\bnumpy\.load\(", text):
            args = _call_args(text, call.end())
            if not re.search(r"allow_pickle\s*=\s*False", args):
                problems.append(f"{rel}: np.load without allow_pickle=False: np.load({args})")
        for pattern, what in UNSAFE_CALLS.items():
            if re.search(pattern, text):
                problems.append(f"{rel}: {what}")
        for call in re.finditer(r"\.fit\([^)]*ckpt_path", text):
            args = _call_args(text, text.index("(", call.start()) + 1)
            if not re.search(r"weights_only\s*=\s*True", args):
                problems.append(f"{rel}: Trainer.fit(ckpt_path=...) without weights_only=True")
    assert not problems, "\n".join(problems)


def _call_args(text: str, start: int) -> str:
    depth, i = 1, start
    while depth and i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return " ".join(text[start: i - 1].split())
