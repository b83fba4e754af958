"""Distributed search: several `tune` workers sharing one Optuna study in a real PostgreSQL server.

Each worker is its own process (tests/deploy/tune_worker.py: the `medseg tune --storage URL --study NAME`
command, or the library with a short heartbeat for the kill test) on the same study and output folder, as on
a cluster with a shared filesystem. Checks that every trial is recorded once (unique numbers, unique folders, one
training per trial) and that a killed worker's trial is failed by its stale heartbeat and retried by another
worker in the same folder. Marked ``slow`` (about 2 minutes on 2 cores); CI runs it explicitly
(.ci/run: ``pytest -m slow tests/deploy``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().parent / "tune_worker.py"


def start_worker(mode: str, data: Path, out: Path, storage: str, study: str, trials: int,
                 *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), mode, str(data), str(out), storage, study, str(trials),
                             *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def probe_lines(out: Path) -> list[tuple[int, str]]:
    path = out / "probe.log"
    if not path.is_file():
        return []
    return [(int(pid), folder) for pid, folder in (line.split() for line in path.read_text().splitlines())]


def test_two_workers_share_one_study_and_record_every_trial_once(postgres_url: str, tiny_data: Path,
                                                                 tmp_path: Path) -> None:
    # As documented (README "Scaling"): create the study once, then start any number of workers. Workers racing
    # to create Optuna's tables in an empty database would collide (CREATE TYPE ... already exists).
    subprocess.run([str(Path(sys.executable).with_name("optuna")), "create-study", "--storage", postgres_url,
                    "--study-name", "shared", "--direction", "maximize", "--skip-if-exists"],
                   check=True, capture_output=True, timeout=120)
    workers = [start_worker("cli", tiny_data, tmp_path, postgres_url, "shared", 4) for _ in range(2)]
    for w in workers:
        finish(w)

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    # The budget is 4 finished trials; each worker may finish one it had already started when the 4th landed.
    assert 4 <= len(finished) <= 5 and len(finished) == len(trials)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    folders = [Path(t.user_attrs["run_dir"]).name for t in trials]
    assert len(set(folders)) == len(folders)

    started = probe_lines(tmp_path)
    assert Counter(folder for _, folder in started) == Counter(folders)  # each trial trained once, none lost
    assert {pid for pid, _ in started} == {w.pid for w in workers}  # both workers did share the work
    for folder in folders:
        assert (tmp_path / "trials" / folder / "bundle" / "config.yaml").is_file()
    assert (tmp_path / "best_config.yaml").is_file()


def test_a_killed_workers_trial_is_retried_by_another(postgres_url: str, tiny_data: Path, tmp_path: Path) -> None:
    doomed = start_worker("library", tiny_data, tmp_path, postgres_url, "retry", 1, "--hang")
    deadline = time.monotonic() + 300
    while not probe_lines(tmp_path):  # its trial is RUNNING and its heartbeat beats
        assert doomed.poll() is None, doomed.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the first worker never started its trial"
        time.sleep(0.5)
    study = optuna.load_study(study_name="retry", storage=postgres_url)
    [running] = study.get_trials(deepcopy=False)
    assert running.state == TrialState.RUNNING
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate(timeout=60)

    finish(start_worker("library", tiny_data, tmp_path, postgres_url, "retry", 1))

    trials = optuna.load_study(study_name="retry", storage=postgres_url).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    killed, retry = trials
    assert retry.system_attrs["failed_trial"] == killed.number and retry.params == killed.params
    assert Path(retry.user_attrs["run_dir"]).name == f"{killed.number:04d}"  # continues in the killed one's folder
    pids = [pid for pid, _ in probe_lines(tmp_path)]
    assert len(pids) == 2 and pids[0] == doomed.pid and pids[1] != doomed.pid
