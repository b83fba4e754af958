"""Load test of the inference service on loopback: concurrent clients each running full segment round trips.

    .venv/bin/python benchmarks/service.py [--clients 8] [--requests 20] [--size 96] [--max-queued 4]
                                           [--bundle BUNDLE] [--device cpu] [--scale-out 2]

Starts ``medseg serve`` as its own process on 127.0.0.1 (a free port), then times, per scenario:
  * ``/health``: plain HTTP requests (the web stack's overhead);
  * ``segment``: one round trip = POST /v1/segment (waiting out 429s by Retry-After) -> poll the job ->
    GET the mask (NIfTI) and check its shape; latency is the whole round trip as a client sees it.
Images are ``--size``² crops of DSB2018 nuclei images (real data, distinct per request). Without ``--bundle`` an
untrained UNet (ImageNet Lite0 encoder, offline) is built: the speed is the architecture's, not the weights'.
A small ``--max-queued`` makes the queue fill on purpose, so 429s are expected and counted separately;
every other non-success is an error. Everything is bounded by ``--deadline`` seconds. Prints tables; asserts
nothing about time.

``--scale-out N`` measures the shared queue instead: a Redis server (Debian's ``redis-server``) on loopback, one
API replica (``medseg serve --broker``) and 1, then N ``medseg worker`` processes on this machine, the same
``segment`` load each time (jobs/s and p95 per worker count). On a CPU the workers split the cores
(``OMP_NUM_THREADS`` = cores / workers), the way one worker per GPU splits GPUs.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("MEDSEG_DATASETS", REPO.parent / "shared" / "datasets"))


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    refused_429: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def crops(n: int, size: int) -> list[bytes]:
    """``n`` distinct PNG crops (``size``²) from DSB2018 images, cycling through the images and offsets."""
    files = sorted((DATASETS / "dsb2018_nuclei" / "images").iterdir())
    out = []
    for i in range(n):
        img = np.asarray(Image.open(files[i % len(files)]).convert("RGB"))
        y = (i * 37) % max(1, img.shape[0] - size)
        x = (i * 53) % max(1, img.shape[1] - size)
        buf = io.BytesIO()
        Image.fromarray(img[y : y + size, x : x + size]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def build_bundle(out: Path) -> Path:
    import torch

    from medseg.bundle import save_bundle
    from medseg.config import load_config
    from medseg.engine.train import preprocessing_record
    from medseg.models import build_model

    cfg = load_config(REPO / "configs/experiments/demo_nuclei.yaml", ["inference.tile_size=[128, 128]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes)
    return save_bundle(out, cfg, {"model": model.state_dict()}, preprocessing_record(cfg), "# benchmark bundle\n")


def start_server(bundle: Path, port: int, device: str, max_queued: int, work: Path,
                 broker: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "MEDSEG_SERVICE_WORK_DIR": str(work)}
    if broker:  # the shared queue: jobs go to `medseg worker` processes, files in the shared folder
        env.update(MEDSEG_SERVICE_BROKER=broker, MEDSEG_SERVICE_RESULTS_DIR=str(work))
    proc = subprocess.Popen(
        [sys.executable, "-m", "medseg.cli", "serve", str(bundle), "--port", str(port), "--device", device,
         "--max-queued", str(max_queued)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"medseg serve exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code in ((200, 503) if broker else (200,)):
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("medseg serve did not come up in 180 s")


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """Debian's redis-server on a free loopback port, no persistence; returns it and its URL."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--scale-out needs redis-server (apt-get install redis-server)")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("redis-server did not come up in 30 s")


def start_worker(bundle: Path, device: str, broker: str, results: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "MEDSEG_SERVICE_BROKER": broker, "MEDSEG_SERVICE_RESULTS_DIR": str(results),
           "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "medseg.cli", "worker", str(bundle), "--device", device],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_workers(base: str, n: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/health", timeout=5).json().get("workers", 0) == n:
            return
        time.sleep(0.5)
    raise SystemExit(f"{n} worker(s) not live after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def scale_out(args: argparse.Namespace, console: Console, deadline: float) -> None:
    """The shared queue with 1, then ``args.scale_out`` workers on this machine: jobs/s and p95 per count."""
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="medseg-bench-scale-") as tmp:
        tmp_path = Path(tmp)
        bundle = args.bundle or build_bundle(tmp_path / "bundle")
        images = crops(args.clients * args.requests, args.size)
        redis_proc, broker = start_redis(tmp_path / "redis")
        port = free_port()
        server = start_server(bundle, port, "cpu", args.max_queued, tmp_path / "results", broker=broker)
        base = f"http://127.0.0.1:{port}"
        workers: list[subprocess.Popen] = []
        table = Table(title=f"shared queue (Redis + Dramatiq) on loopback: 1 API replica, N workers on one machine, "
                            f"{args.size}² PNG crops, {args.clients} clients × {args.requests} requests, "
                            f"queue bound {args.max_queued}, {cores} CPU cores split between the workers")
        for col in ("workers", "threads each", "wall s", "jobs/s", "p50 ms", "p95 ms", "429s", "errors"):
            table.add_column(col, justify="right")
        try:
            for n in sorted({1, args.scale_out}):
                for w in workers:
                    stop(w)
                threads = max(1, cores // n)
                workers = [start_worker(bundle, args.device, broker, tmp_path / "results", threads) for _ in range(n)]
                wait_workers(base, n)
                run_scenario(base, 1, 2, "segment", images, args.size, deadline)  # warm-up: first passes
                outcome, wall = run_scenario(base, args.clients, args.requests, "segment", images, args.size,
                                             deadline)
                lat = sorted(outcome.latencies)
                table.add_row(str(n), str(threads), f"{wall:.1f}", f"{len(lat) / wall:.2f}",
                              ms(statistics.median(lat) if lat else None), ms(percentile(lat, 0.95)),
                              str(outcome.refused_429), str(len(outcome.errors)))
                for e in sorted(set(outcome.errors))[:5]:
                    console.print(f"[red]error[/red] {e}", highlight=False)
            console.print(table)
        finally:
            for w in workers:
                stop(w)
            stop(server)
            redis_proc.terminate()
            redis_proc.wait(30)


def segment_round_trip(client: httpx.Client, data: bytes, size: int, outcome: Outcome, deadline: float) -> None:
    start = time.perf_counter()
    while True:
        r = client.post("/v1/segment", files={"file": ("crop.png", data)})
        if r.status_code == 202:
            break
        if r.status_code == 429 and time.monotonic() < deadline:
            with outcome.lock:
                outcome.refused_429 += 1
            time.sleep(float(r.headers.get("Retry-After", "1")))
            continue
        raise RuntimeError(f"POST /v1/segment -> {r.status_code} {r.text[:200]}")
    job_id = r.json()["job_id"]
    while True:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["status"] == "done":
            break
        if status["status"] == "failed":
            raise RuntimeError(f"job failed: {status['error']}")
        if time.monotonic() > deadline:
            raise RuntimeError("deadline passed while waiting for a job")
        time.sleep(0.02)
    mask = client.get(f"/v1/jobs/{job_id}/mask", params={"format": "png"})
    if mask.status_code != 200:
        raise RuntimeError(f"GET mask -> {mask.status_code}")
    shape = np.asarray(Image.open(io.BytesIO(mask.content))).shape
    if shape != (size, size):
        raise RuntimeError(f"mask shape {shape} != {(size, size)}")
    with outcome.lock:
        outcome.latencies.append(time.perf_counter() - start)


def health_request(client: httpx.Client, outcome: Outcome) -> None:
    start = time.perf_counter()
    r = client.get("/health")
    if r.status_code != 200:
        raise RuntimeError(f"/health -> {r.status_code}")
    with outcome.lock:
        outcome.latencies.append(time.perf_counter() - start)


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}"


def run_scenario(base: str, clients: int, requests: int, kind: str, images: list[bytes], size: int,
                 deadline: float) -> tuple[Outcome, float]:
    outcome = Outcome()

    def client_loop(c: int) -> None:
        with httpx.Client(base_url=base, timeout=120, headers={"X-Medseg-Client": "benchmark"}) as client:
            for i in range(requests):
                if time.monotonic() > deadline:
                    with outcome.lock:
                        outcome.errors.append("deadline passed before the request was sent")
                    continue
                try:
                    if kind == "health":
                        health_request(client, outcome)
                    else:
                        segment_round_trip(client, images[(c * requests + i) % len(images)], size, outcome, deadline)
                except Exception as e:  # counted and shown, the load goes on
                    with outcome.lock:
                        outcome.errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="round trips per client")
    ap.add_argument("--size", type=int, default=96, help="image crop size (px)")
    ap.add_argument("--max-queued", type=int, default=4, help="service queue bound (small: 429s on purpose)")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds for the whole run at most")
    ap.add_argument("--scale-out", type=int, default=0, metavar="N",
                    help="measure the shared queue with 1 and N workers instead (needs redis-server)")
    args = ap.parse_args()

    console = Console(width=160)
    deadline = time.monotonic() + args.deadline
    if args.scale_out:
        scale_out(args, console, deadline)
        return
    with tempfile.TemporaryDirectory(prefix="medseg-bench-service-") as tmp:
        tmp_path = Path(tmp)
        bundle = args.bundle or build_bundle(tmp_path / "bundle")
        images = crops(args.clients * args.requests, args.size)
        port = free_port()
        server = start_server(bundle, port, args.device, args.max_queued, tmp_path / "work")
        base = f"http://127.0.0.1:{port}"
        try:
            model = httpx.get(f"{base}/v1/models").json()["models"][0]
            table = Table(title=f"medseg service on loopback: {model['name']} on {model['device']}, "
                                f"{args.size}² PNG crops, queue bound {args.max_queued}, {os.cpu_count()} CPU cores")
            for col in ("scenario", "clients × requests", "wall s", "req/s", "p50 ms", "p95 ms", "max ms",
                        "429s (deliberate)", "errors"):
                table.add_column(col, justify="right")
            scenarios = [("health", args.clients, args.requests), ("segment", 1, min(10, args.requests)),
                         ("segment", args.clients, args.requests)]
            all_errors: list[str] = []
            for kind, clients, requests in scenarios:
                outcome, wall = run_scenario(base, clients, requests, kind, images, args.size, deadline)
                lat = sorted(outcome.latencies)
                table.add_row(kind, f"{clients} × {requests}", f"{wall:.1f}", f"{len(lat) / wall:.2f}",
                              ms(statistics.median(lat) if lat else None), ms(percentile(lat, 0.95)),
                              ms(lat[-1] if lat else None), str(outcome.refused_429), str(len(outcome.errors)))
                all_errors += outcome.errors
            console.print(table)
            for e in sorted(set(all_errors))[:10]:
                console.print(f"[red]error[/red] {e}", highlight=False)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
