"""Learning-rate schedules as pure functions of the optimisation step.

Each SCHEDULES entry builds ``factor(step) -> float`` (multiplier of the base LR) from the total number of
steps and its own parameters; ``with_warmup`` adds a linear warmup from 0 in front of any of them. They
are plugged into ``torch.optim.lr_scheduler.LambdaLR`` stepped every optimisation step.

Parameters are in steps. A config may give any of them in epochs instead by adding ``_epochs`` to the
name (``train.schedule_params: {t0_epochs: 2, t_mult: 2}`` for SGDR, ``step_size_epochs``, ...);
`params_in_steps` converts them with the run's steps per epoch, so the schedule does not change when the
batch size or the number of samples per epoch does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from medseg.registry import Registry

Schedule = Callable[[int], float]
SCHEDULES: Registry[Callable[..., Schedule]] = Registry("schedule")


@SCHEDULES.register("constant")
def constant(total_steps: int) -> Schedule:
    return lambda step: 1.0


@SCHEDULES.register("step")
def step_decay(total_steps: int, step_size: int | None = None, gamma: float = 0.1) -> Schedule:
    """Multiply by ``gamma`` every ``step_size`` steps (default: a third of the run)."""
    size = step_size or max(1, total_steps // 3)
    return lambda step: gamma ** (step // size)


@SCHEDULES.register("linear")
def linear(total_steps: int, min_ratio: float = 0.0) -> Schedule:
    return lambda step: min_ratio + (1 - min_ratio) * max(0.0, 1 - step / max(1, total_steps))


@SCHEDULES.register("poly")
def poly(total_steps: int, power: float = 0.9) -> Schedule:
    """nnU-Net's polynomial decay: (1 - step/total)^0.9."""
    return lambda step: max(0.0, 1 - step / max(1, total_steps)) ** power


@SCHEDULES.register("cosine")
def cosine(total_steps: int, min_ratio: float = 0.01) -> Schedule:
    return lambda step: min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


@SCHEDULES.register("invsqrt")
def inverse_sqrt(total_steps: int, timescale: int = 100) -> Schedule:
    """1/sqrt(1 + step/timescale): slow decay without a fixed horizon."""
    return lambda step: 1.0 / math.sqrt(1 + step / timescale)


def sgdr_cycle_ends(total_steps: int, t0: int, t_mult: int = 1) -> list[int]:
    """Steps (exclusive ends) at which SGDR cycles finish within ``total_steps``: snapshot points."""
    ends, start, length = [], 0, t0
    while start + length <= total_steps:
        ends.append(start + length)
        start += length
        length *= t_mult
    return ends


@SCHEDULES.register("sgdr")
def sgdr(total_steps: int, t0: int | None = None, t_mult: int = 1, min_ratio: float = 0.01) -> Schedule:
    """Cosine annealing with warm restarts (Loshchilov & Hutter): cycles of length t0, t0*t_mult, ...
    ``t0`` defaults to a quarter of the run."""
    t0 = t0 or max(1, total_steps // 4)

    def factor(step: int) -> float:
        start, length = 0, t0
        while step >= start + length:
            start += length
            length *= t_mult
        t = (step - start) / length
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def with_warmup(schedule: Schedule, warmup_steps: int) -> Schedule:
    """Linear warmup from ~0 to the schedule over ``warmup_steps``; the schedule's own clock starts after it."""
    if warmup_steps <= 0:
        return schedule
    return lambda step: (step + 1) / warmup_steps if step < warmup_steps else schedule(step - warmup_steps)


def params_in_steps(params: dict[str, float], steps_per_epoch: int) -> dict[str, float]:
    """``{"t0_epochs": 2, "t_mult": 2}`` -> ``{"t0": 2 * steps_per_epoch, "t_mult": 2}``: every ``*_epochs``
    parameter becomes the step-valued parameter of the same stem (rounded, at least 1 step)."""
    out: dict[str, float] = {}
    for key, value in params.items():
        if key.endswith("_epochs"):
            out[key.removesuffix("_epochs")] = max(1, int(round(float(value) * steps_per_epoch)))
        else:
            out[key] = value
    return out


def snapshot_steps(name: str, total_steps: int, warmup_steps: int = 0, **params: float) -> list[int]:
    """Global steps at which an SGDR run completes a cycle (after warmup): where snapshot ensembles take
    their members. Empty for schedules without restarts."""
    if name != "sgdr":
        return []
    steps = max(1, total_steps - warmup_steps)
    t0 = int(params.get("t0") or max(1, steps // 4))
    return [warmup_steps + e for e in sgdr_cycle_ends(steps, t0, int(params.get("t_mult", 1)))]


def build_schedule(name: str, total_steps: int, warmup_steps: int = 0, floor: float = 0.0, **params: float) -> Schedule:
    """The named schedule after ``warmup_steps`` of warmup; ``floor`` (``train.min_lr_ratio``) bounds every
    schedule's factor from below (cosine, linear and SGDR decay onto it; poly, step and invsqrt are clamped)."""
    schedule = SCHEDULES.build(name, max(1, total_steps - warmup_steps), **params)
    if floor > 0:
        decaying = schedule
        schedule = lambda step: max(floor, decaying(step))  # noqa: E731 - a closure over the built schedule
    return with_warmup(schedule, warmup_steps)
