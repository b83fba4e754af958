"""Fixtures for scale-out tests: throwaway PostgreSQL and Redis servers on 127.0.0.1 and a tiny real dataset.

PostgreSQL comes from Debian's ``postgresql`` package (``/usr/lib/postgresql/15/bin``; ``MEDSEG_PG_BIN`` to
override). The cluster lives in a fresh temp folder and is removed afterwards. PostgreSQL refuses to run as
root, so under root (CI) initdb/pg_ctl run as the unprivileged ``nobody`` user. Redis comes from Debian's
``redis-server`` (no persistence, its folder in a temp dir).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples/data/dsb2018_sample"
PG_BIN = Path(os.environ.get("MEDSEG_PG_BIN", "/usr/lib/postgresql/15/bin"))
CROP = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user() -> dict:
    """subprocess kwargs that drop root to ``nobody`` (postgres will not run as root); nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a fresh PostgreSQL server on 127.0.0.1 (trust auth, user ``medseg``)."""
    if not (PG_BIN / "initdb").is_file():
        raise RuntimeError(f"PostgreSQL server binaries not found in {PG_BIN}: apt-get install postgresql "
                           "(or set MEDSEG_PG_BIN)")
    root = Path(tempfile.mkdtemp(prefix="medseg-pg-"))
    user = _as_user()
    if user:
        os.chown(root, user["user"], user["group"])
    data, log = root / "data", root / "server.log"
    port = _free_port()
    run = dict(check=True, capture_output=True, text=True, timeout=120, cwd=root, **user)
    try:
        subprocess.run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "medseg", "--auth=trust", "-E", "UTF8",
                        "--no-instructions"], **run)
        # fsync off: a throwaway test cluster; unix socket in our folder, TCP on loopback only.
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=50"
        subprocess.run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60",
                        "start"], **run)
    except subprocess.CalledProcessError as e:
        server_log = log.read_text() if log.is_file() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {e.stderr}\n{server_log}") from None
    try:
        yield f"postgresql+psycopg2://medseg@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60, cwd=root, **user)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 real 64x64 image/mask pairs (gray) cropped around nuclei from the CC0 DSB2018 sample."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for p in sorted((SAMPLE / "images").iterdir())[:8]:
        image = np.asarray(Image.open(p).convert("L"))
        mask = np.asarray(Image.open(SAMPLE / "masks" / p.name).convert("L"))
        ys, xs = np.nonzero(mask)
        y = int(np.clip(ys.mean() - CROP // 2, 0, mask.shape[0] - CROP)) if ys.size else 0
        x = int(np.clip(xs.mean() - CROP // 2, 0, mask.shape[1] - CROP)) if xs.size else 0
        Image.fromarray(image[y : y + CROP, x : x + CROP]).save(root / "images" / f"{p.stem}.png")
        Image.fromarray(mask[y : y + CROP, x : x + CROP]).save(root / "masks" / f"{p.stem}.png")
    return root


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """URL of a fresh Redis server on 127.0.0.1 (no persistence), stopped and removed after the module."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: apt-get install redis-server")
    root = Path(tempfile.mkdtemp(prefix="medseg-redis-"))
    port = _free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root), "--save", "",
                             "--appendonly", "no", "--protected-mode", "yes"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
