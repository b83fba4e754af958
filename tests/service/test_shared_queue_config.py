"""The shared queue's configuration, without a broker: clear CLI errors, and the multi-GPU compose file names
only settings that exist (the live scale-out checks are in tests/deploy/test_scale_out.py, marked slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medseg.cli import app
from medseg.service.settings import ENV_PREFIX, ServiceSettings

REPO = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_without_a_broker_says_what_it_needs(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDSEG_SERVICE_BROKER", raising=False)
    monkeypatch.delenv("MEDSEG_SERVICE_RESULTS_DIR", raising=False)
    result = CliRunner().invoke(app, ["worker", str(tiny_bundle)])
    assert result.exit_code == 1
    assert "--broker" in result.output and "--results-dir" in result.output
    assert "Traceback" not in result.output


def test_serve_with_an_unreachable_broker_fails_before_listening(tiny_bundle: Path, tmp_path: Path) -> None:
    url = f"redis://:s3cret@127.0.0.1:{_closed_port()}/0"
    result = CliRunner().invoke(app, ["serve", str(tiny_bundle), "--device", "cpu", "--broker", url,
                                      "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 1
    assert "cannot reach Redis" in result.output and "s3cret" not in result.output  # no password in errors
    assert "Traceback" not in result.output


def test_multi_gpu_compose_file_names_real_settings_and_one_gpu_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((REPO / "docker-compose.multi-gpu.yml").read_text())
    services = compose["services"]
    workers = {name: s for name, s in services.items() if s.get("command", [])[:2] == ["medseg", "worker"]}
    apis = {name: s for name, s in services.items() if s.get("command", [])[:2] == ["medseg", "serve"]}
    assert len(workers) >= 2 and len(apis) >= 2
    gpus = [tuple(s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]) for s in workers.values()]
    assert all(len(g) == 1 for g in gpus) and len(set(gpus)) == len(gpus)  # one GPU each, none shared
    fields = set(ServiceSettings.__dataclass_fields__)
    for service in [*workers.values(), *apis.values()]:
        env = service["environment"]
        for key in env:
            if key.startswith(ENV_PREFIX):
                assert key[len(ENV_PREFIX):].lower() in fields, key
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        settings = ServiceSettings.from_env()  # every value parses
        assert settings.broker == "redis://queue:6379/0" and settings.results_dir == Path("/results")
        assert "results:/results" in service["volumes"]
