"""Optuna search on tiny trials: best config, restart-safe budget, retry of a killed worker's trial."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from medseg.config import load_config
from medseg.engine.tune import apply_params, open_study, suggest, tune
from medseg.errors import ConfigError

SPACE = ('tune.space={"train.lr": {type: loguniform, low: 1.0e-4, high: 1.0e-2}, '
         '"model.decoder_channels": {type: categorical, choices: [[32, 16, 8, 8, 8], [16, 8, 8, 8, 8]]}}')


def test_tune_writes_best_config_and_survives_restarts_and_killed_workers(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg("train.epochs=1", "train.samples_per_epoch=4", SPACE)
    result = tune(cfg, tmp_path, trials=3)
    assert (tmp_path / "study.db").is_file() and result.storage.startswith("sqlite:///")
    assert result.complete == 3
    best = load_config(result.best_config)  # a valid, complete config that `medseg train` accepts
    assert best.train.lr == pytest.approx(result.best_params["train.lr"])
    assert list(best.model.decoder_channels) == result.best_params["model.decoder_channels"]
    assert (tmp_path / "optimization_history.png").stat().st_size > 1000
    assert (tmp_path / "param_importances.png").is_file()
    study = optuna.load_study(study_name=cfg.name, storage=result.storage)
    assert result.best_value == pytest.approx(max(t.value for t in study.trials))
    assert {Path(t.user_attrs["run_dir"]).name for t in study.trials} == {"0000", "0001", "0002"}

    # Restart with the same budget: nothing more runs.
    assert tune(cfg, tmp_path, trials=3).complete == 3

    # A worker dies mid-trial: its trial stays RUNNING and its heartbeat stops ...
    stale_study = open_study(cfg, result.storage, cfg.name, seed=None, heartbeat_interval=1, grace_period=1)
    killed = stale_study.ask()
    stale_study._storage.record_heartbeat(killed._trial_id)
    time.sleep(2.5)
    # ... the next worker fails it and runs its retry (in the killed trial's folder) within the budget of 4.
    again = tune(cfg, tmp_path, trials=4, heartbeat_interval=1, grace_period=1)
    trials = optuna.load_study(study_name=cfg.name, storage=result.storage).trials
    assert trials[killed.number].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert Path(retry[0].user_attrs["run_dir"]).name == f"{killed.number:04d}"
    assert again.complete == 4


def test_space_errors_name_the_key(tiny_cfg) -> None:
    trial = optuna.create_study().ask()
    with pytest.raises(ConfigError, match=r"train\.lr.*needs 'high'"):
        suggest(trial, {"train.lr": {"type": "loguniform", "low": 1e-4}})
    with pytest.raises(ConfigError, match="type must be"):
        suggest(trial, {"train.lr": {"type": "gaussian"}})
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        apply_params(tiny_cfg(), {"train.lrr": 1.0})


def test_workers_racing_to_create_the_tables_join_the_study(tiny_cfg, tmp_path: Path, monkeypatch) -> None:
    # PostgreSQL fails all but one of the workers that CREATE TABLE on an empty database at once.
    import sqlalchemy

    import medseg.engine.tune as tune_module
    from medseg.errors import MedsegError

    real, calls = tune_module.RDBStorage, {"n": 0}

    def racing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise sqlalchemy.exc.IntegrityError("CREATE TABLE studies", {}, Exception(
                'duplicate key value violates unique constraint "pg_type_typname_nsp_index"'))
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_module, "RDBStorage", racing)
    monkeypatch.setattr(tune_module.time, "sleep", lambda s: None)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    failures = 2
    study = open_study(tiny_cfg(), url, "raced", seed=0)
    assert calls["n"] == 3 and study.study_name == "raced"
    calls["n"], failures = 0, 99
    with pytest.raises(MedsegError, match="cannot open the study storage after 5 tries: IntegrityError"):
        open_study(tiny_cfg(), url, "raced", seed=0)
