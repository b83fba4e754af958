"""``medseg app`` starts Streamlit with production settings; the audit log writes one JSON line per inference."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.audit import AUDIT_LOGGER, audit_inference, configure_audit_log
from medseg.cli import app as cli


def test_medseg_app_runs_streamlit_with_safe_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_call(command, env):  # the real one would block serving the app
        calls.append((command, env))
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    monkeypatch.delenv("MEDSEG_MAX_UPLOAD_MB", raising=False)
    res = CliRunner().invoke(cli, ["app", "--models", str(tmp_path), "--port", "8612", "--max-upload-mb", "300"])
    assert res.exit_code == 0, res.output
    (command, env), = calls
    assert command[1:4] == ["-m", "streamlit", "run"] and command[4].endswith("app/streamlit_app.py")
    assert Path(command[4]).is_file()
    options = dict(arg[2:].split("=", 1) for arg in command[5:])
    assert options["server.port"] == "8612" and options["server.address"] == "localhost"
    assert options["client.showErrorDetails"] == "none"
    assert options["server.enableXsrfProtection"] == "true" and options["browser.gatherUsageStats"] == "false"
    assert options["server.maxUploadSize"] == "300" and env["MEDSEG_MAX_UPLOAD_MB"] == "300"  # one cap, both sides
    assert env["MEDSEG_MODELS_DIR"] == str(tmp_path.resolve())


def test_audit_lines_are_json_without_patient_data(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    logger = configure_audit_log(path)
    assert configure_audit_log(path) is logger and len(logger.handlers) == 1  # reruns add no second handler
    for seconds in (1.5, 2.25):
        audit_inference(logger, input_sha256="f" * 64, model_name="demo", weights_hash="abc", tta="flips",
                        device="CPU", seconds=seconds, remote=False)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seconds"] for r in lines] == [1.5, 2.25]
    assert set(lines[0]) == {"time", "event", "input_sha256", "model", "weights_hash", "tta", "device", "remote",
                             "seconds"}
    configure_audit_log(None)  # back to stderr, so later tests do not write into tmp_path
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger(AUDIT_LOGGER).handlers)
