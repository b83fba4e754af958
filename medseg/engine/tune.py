"""`medseg tune`: Optuna search over ``cfg.tune.space``, pruned on per-epoch val Dice, in a study that
survives restarts and scales to many workers.

``cfg.tune.space`` maps a dotted config key to a distribution::

    train.lr:           {type: loguniform, low: 1.0e-4, high: 1.0e-2}
    train.weight_decay: {type: loguniform, low: 1.0e-6, high: 1.0e-3}
    train.warmup_epochs: {type: uniform, low: 0, high: 3}
    train.batch_size:   {type: int, low: 4, high: 16, step: 4}
    model.arch:         {type: categorical, choices: [unet, unetplusplus]}

(``grid`` sampling needs ``choices`` or ``values`` for every key.) Each trial is an ordinary training run in
``OUT/trials/<number>/`` on the shared ``OUT/splits.json``; its objective is the best val Dice.

The study lives in an RDB storage — by default SQLite ``OUT/study.db``; any SQLAlchemy URL
(``postgresql://user@host/db``) lets several workers share it — and is opened with ``load_if_exists``.
Running workers send heartbeats; when one is killed its trial goes stale, is marked failed by the next
worker and retried (``RetryHeartbeatStaleTrialCallback``, optuna 5's name for ``RetryFailedTrialCallback``) from the killed run's last checkpoint. ``trials`` is a
budget for the whole study: a restarted worker only runs what is missing.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from medseg.config import ExperimentConfig, config_to_yaml, validate_config
from medseg.engine.train import train
from medseg.errors import ConfigError, MedsegError
from medseg.io.writers import atomic_path, write_text_atomic

log = logging.getLogger("medseg")

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class TuneResult:
    study_name: str
    storage: str
    best_value: float
    best_params: dict[str, Any]
    best_config: Path
    complete: int
    pruned: int
    failed: int
    plots: list[Path]


def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"


def _encode(choice: Any) -> Any:
    # Optuna stores categorical choices as None/bool/int/float/str; lists (decoder_channels) go as JSON text.
    return choice if choice is None or isinstance(choice, bool | int | float | str) else json.dumps(choice)


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One value per key of ``space`` (see module docstring); lists come back decoded."""
    params: dict[str, Any] = {}
    for key, spec in space.items():
        kind = str(spec.get("type", "")).lower()
        try:
            if kind == "loguniform":
                params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=True)
            elif kind == "uniform":
                params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]))
            elif kind == "int":
                params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                                log=bool(spec.get("log", False)))
            elif kind == "categorical":
                params[key] = _decode(trial.suggest_categorical(key, [_encode(c) for c in spec["choices"]]))
            else:
                raise ConfigError(f"tune.space[{key!r}]: type must be loguniform, uniform, int or categorical, got {kind!r}")
        except KeyError as e:
            raise ConfigError(f"tune.space[{key!r}]: {kind} needs {e.args[0]!r}") from None
    return params


def apply_params(cfg: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """``cfg`` with dotted keys replaced (``{"train.lr": 3e-4}``), validated like any config."""
    raw = cfg.model_dump(mode="json")
    for key, value in params.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"tune.space key {key!r}: {p!r} is not a config section")
            node = node[p]
        node[leaf] = value
    return validate_config(raw, source="tune.space")


def build_sampler(cfg: ExperimentConfig, seed: int | None) -> optuna.samplers.BaseSampler:
    t = cfg.tune
    if t.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if t.sampler == "grid":
        grid = {}
        for key, spec in t.space.items():
            values = spec.get("choices", spec.get("values"))
            if values is None:
                raise ConfigError(f"tune.sampler grid: tune.space[{key!r}] needs 'choices' or 'values'")
            grid[key] = [_encode(v) for v in values]
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, len(t.space) * 2)))


def build_pruner(cfg: ExperimentConfig) -> optuna.pruners.BasePruner:
    if cfg.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs)
    if cfg.tune.pruner == "median":
        # Compare from the second epoch on, once two trials have finished: epoch-0 Dice says little.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


STORAGE_ATTEMPTS = 5


def open_study(cfg: ExperimentConfig, storage: str, study_name: str, seed: int | None,
               heartbeat_interval: int = 60, grace_period: int | None = None, max_retry: int = 2) -> optuna.Study:
    """Create or join the study in RDB ``storage`` with heartbeats and retry of failed (killed) trials."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the retry callback is "experimental"
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            rdb = RDBStorage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                             heartbeat_stale_trial_callback=retry)
            return optuna.create_study(
                study_name=study_name, storage=rdb, sampler=build_sampler(cfg, seed), pruner=build_pruner(cfg),
                direction=cfg.tune.direction, load_if_exists=True,
            )
        except sqlalchemy.exc.DBAPIError as e:
            # Workers started together on an empty database all run CREATE TABLE; PostgreSQL lets one win and
            # fails the others with a duplicate-type/unique violation. The tables exist now: join again.
            if attempt == STORAGE_ATTEMPTS - 1:
                raise MedsegError(f"cannot open the study storage after {STORAGE_ATTEMPTS} tries: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0]}") from None
            log.info("study storage busy (%s), retrying", type(e).__name__)
            time.sleep(0.5 * (attempt + 1) + random.random())
    raise AssertionError("unreachable")


def _trial_dir(out_dir: Path, trial: optuna.Trial) -> tuple[Path, bool]:
    """A retried trial continues in the killed trial's folder (from its last checkpoint)."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    original = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    number = original if original is not None else trial.number
    return Path(out_dir) / "trials" / f"{number:04d}", original is not None


def make_objective(cfg: ExperimentConfig, out_dir: Path, progress: bool, max_time: timedelta | None):
    try:
        from optuna_integration import PyTorchLightningPruningCallback
    except ImportError:
        raise MedsegError("medseg tune needs the optuna-integration package (pip install optuna-integration)") from None

    split_file = Path(cfg.data.split_file or Path(out_dir) / "splits.json")

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, cfg.tune.space)
        trial_cfg = apply_params(cfg, params)
        trial_cfg = trial_cfg.model_copy(update={"data": trial_cfg.data.model_copy(update={"split_file": split_file})})
        run_dir, retried = _trial_dir(out_dir, trial)
        trial.set_user_attr("run_dir", str(run_dir))
        result = train(trial_cfg, run_dir, resume=retried, progress=progress, max_time=max_time,
                       extra_callbacks=[PyTorchLightningPruningCallback(trial, monitor="val_dice")])
        trial.set_user_attr("epochs", result.epochs_run)
        trial.set_user_attr("best_checkpoint_val_dice", result.best_val_dice)
        # The Dice of what the trial's bundle ships, on every validation case: what a user would get from it.
        return result.val_dice if math.isfinite(result.val_dice) else result.best_val_dice

    return objective


def save_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optimisation history and parameter importances (optuna.visualization.matplotlib) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written = []
    plots = {"optimization_history.png": ovm.plot_optimization_history,
             "param_importances.png": ovm.plot_param_importances,
             "intermediate_values.png": ovm.plot_intermediate_values}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
                ax = plot(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            with atomic_path(out_dir / name) as tmp:
                fig.savefig(tmp, dpi=90)
            plt.close(fig)
            written.append(out_dir / name)
        except (ValueError, RuntimeError) as e:  # e.g. importances need two finished trials
            log.info("no %s: %s", name, e)
    return written


def tune(
    cfg: ExperimentConfig,
    out_dir: Path,
    trials: int,
    storage: str | None = None,
    study_name: str | None = None,
    progress: bool = False,
    max_time_per_trial: timedelta | None = None,
    heartbeat_interval: int = 60,
    grace_period: int | None = None,
) -> TuneResult:
    """Run trials until the study holds ``trials`` finished (complete or pruned) ones; write
    ``OUT/best_config.yaml``, ``OUT/best_params.json`` and the plots. Safe to run in several processes at
    once against one ``storage`` URL, and to restart."""
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: name the config keys to search, e.g. train.lr: {type: loguniform, low: 1e-4, high: 1e-2}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    url = storage or default_storage(out_dir)
    name = study_name or cfg.name
    # One local worker: a seeded sampler makes the search reproducible. Several workers on a shared
    # storage must not draw the same startup points, so they sample unseeded.
    study = open_study(cfg, url, name, cfg.train.seed if storage is None else None, heartbeat_interval, grace_period)
    optuna.storages.fail_stale_trials(study)  # a killed worker's trial: failed now, a retry is queued
    done = len(study.get_trials(deepcopy=False, states=_FINISHED))
    if done < trials:
        study.optimize(
            make_objective(cfg, out_dir, progress, max_time_per_trial),
            n_trials=trials - done,
            callbacks=[MaxTrialsCallback(trials, states=_FINISHED)],  # other workers count too
            catch=(MedsegError,),  # a bad combination fails its trial, not the study
            gc_after_trial=True,
        )
    all_trials = study.get_trials(deepcopy=False)
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise MedsegError(f"study {name!r}: no trial completed ({len(all_trials)} ran; see OUT/trials/*)")
    best = study.best_trial
    params = {k: _decode(v) for k, v in best.params.items()}
    best_cfg = apply_params(cfg, params)
    best_path = out_dir / "best_config.yaml"
    write_text_atomic(best_path, f"# best of {len(complete)} complete trials in study {name!r}: trial {best.number}, "
                             f"val Dice {best.value:.4f}\n" + config_to_yaml(best_cfg))
    write_text_atomic(out_dir / "best_params.json", json.dumps({"trial": best.number, "value": best.value, "params": params}, indent=1))
    plots = save_plots(study, out_dir)
    return TuneResult(
        name, url, float(best.value), params, best_path, len(complete),
        sum(t.state == TrialState.PRUNED for t in all_trials), sum(t.state == TrialState.FAIL for t in all_trials), plots,
    )
