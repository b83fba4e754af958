"""`medseg serve` as a real process: starts, answers on loopback, stops cleanly on SIGINT; bad bundles fail fast."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

from medseg.bundle import load_bundle
from medseg.cli import app


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_runs_the_service(tiny_bundle: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSEG_SERVICE_WORK_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medseg.cli", "serve", str(tiny_bundle), "--port", str(port), "--device", "cpu",
         "--max-queued", "3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "medseg serve did not come up in 120 s"
                time.sleep(0.5)
        assert health.status_code == 200 and health.json()["max_queued"] == 3
        model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["models"][0]
        assert model["weights_hash"] == load_bundle(tiny_bundle).weights_hash
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Application startup complete" in out


def test_serve_command_rejects_a_missing_bundle(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "nope"), "--port", str(free_port())])
    assert res.exit_code == 1
    assert "not a bundle directory" in res.output


def test_trusted_hosts_default_follows_the_listening_address(caplog) -> None:
    from medseg.service.server import with_default_hosts
    from medseg.service.settings import ServiceSettings

    assert with_default_hosts(ServiceSettings(), "127.0.0.1").trusted_hosts is None  # -> the loopback names
    assert with_default_hosts(ServiceSettings(), "localhost").trusted_hosts is None
    assert with_default_hosts(ServiceSettings(), "0.0.0.0").trusted_hosts == ("*",)
    assert "MEDSEG_SERVICE_TRUSTED_HOSTS" in caplog.text
    assert with_default_hosts(ServiceSettings(trusted_hosts=("gpu-1",)), "0.0.0.0").trusted_hosts == ("gpu-1",)
