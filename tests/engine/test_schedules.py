from __future__ import annotations

import math

import pytest

from medseg.engine.schedules import SCHEDULES, build_schedule, sgdr_cycle_ends


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_starts_at_one_after_warmup_and_stays_positive(name: str) -> None:
    f = build_schedule(name, total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1)  # warmup: (step+1)/warmup
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)  # schedule's own step 0
    assert all(f(s) >= 0 for s in range(100))


def test_cosine_values() -> None:
    f = build_schedule("cosine", 100, 0, min_ratio=0.0)
    assert f(50) == pytest.approx(0.5)
    assert f(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f(100) == pytest.approx(0.0)


def test_poly_and_step_and_invsqrt() -> None:
    assert build_schedule("poly", 100)(50) == pytest.approx(0.5**0.9)
    assert build_schedule("step", 90, step_size=30, gamma=0.1)(65) == pytest.approx(0.01)
    assert build_schedule("invsqrt", 100, timescale=100)(300) == pytest.approx(0.5)
    assert build_schedule("linear", 100)(75) == pytest.approx(0.25)


def test_sgdr_restarts_at_cycle_ends() -> None:
    f = build_schedule("sgdr", 70, 0, t0=10, t_mult=2, min_ratio=0.0)
    assert sgdr_cycle_ends(70, 10, 2) == [10, 30, 70]
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)  # restart
    assert f(20) == pytest.approx(0.5)  # middle of the 20-step cycle
    assert f(30) == pytest.approx(1.0)
    assert f(69) < 0.01


def test_warmup_shifts_the_schedule_clock() -> None:
    f = build_schedule("cosine", 110, warmup_steps=10, min_ratio=0.0)
    assert f(60) == pytest.approx(0.5)  # 50 steps into a 100-step cosine


def test_epoch_valued_params_become_steps() -> None:
    from medseg.engine.schedules import params_in_steps

    assert params_in_steps({"t0_epochs": 2, "t_mult": 2, "min_ratio": 0.0}, 50) == {"t0": 100, "t_mult": 2, "min_ratio": 0.0}
    assert params_in_steps({"step_size_epochs": 0.5}, 3) == {"step_size": 2}


def test_snapshot_steps_are_the_sgdr_cycle_ends_after_warmup() -> None:
    from medseg.engine.schedules import snapshot_steps

    assert snapshot_steps("sgdr", 80, 10, t0=10, t_mult=2) == [20, 40, 80]
    assert snapshot_steps("sgdr", 40) == [10, 20, 30, 40]  # default t0: a quarter of the run
    assert snapshot_steps("cosine", 80, 10) == []
    f = build_schedule("sgdr", 80, 10, t0=10, t_mult=2, min_ratio=0.0)
    assert all(f(s) == pytest.approx(1.0) for s in (20, 40))  # each snapshot step is followed by a restart


@pytest.mark.parametrize("name", ["poly", "step", "invsqrt", "cosine", "linear", "sgdr"])
def test_min_lr_ratio_is_the_floor_of_every_decaying_schedule(name: str) -> None:
    # train.min_lr_ratio used to reach cosine/linear/SGDR only: poly decayed to 0 whatever it said.
    f = build_schedule(name, 1000, 0, floor=0.05, **({"timescale": 1} if name == "invsqrt" else {}))
    values = [f(s) for s in range(1000)]
    assert min(values) >= 0.05 - 1e-12
    if name in ("poly", "step", "invsqrt"):
        assert values[-1] == pytest.approx(0.05)  # without the floor these end near 0 (poly, step) or at 0.03
    assert build_schedule(name, 1000, 0, **({"timescale": 1} if name == "invsqrt" else {}))(999) < 0.05
