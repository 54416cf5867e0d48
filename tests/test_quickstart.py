"""The quickstart's planning: which model a measured speed buys, and the schedule re-planned as the run goes.
Pure functions, so no timing is involved; the end-to-end run is in tests/test_cli.py."""

import math

import pytest

from llmscratch.errors import UserError
from llmscratch.train import quickstart as qs
from llmscratch.train.config import TrainConfig
from llmscratch.train.quickstart import BudgetSchedule, plan, replanned_steps

CORPUS = 374_000  # train tokens of pydocs with the default 4096-token vocabulary
STEP = 16 * 256


def test_plan_takes_the_largest_model_that_makes_enough_passes():
    """The fast 2-core CPU of issue 24: gpt-tiny at ~14K tok/s would hit its 6-pass cap long before 4 minutes;
    gpt-mini at ~6K tok/s makes ~3.6 passes, enough."""
    p = plan({"gpt-tiny": 14_400, "gpt-mini": 6_200}, 216, CORPUS, STEP)
    assert p.model == "gpt-mini" and p.tokens_per_s == 6_200
    assert p.steps == int(6_200 * 216 / STEP) < p.cap_steps == int(qs.MAX_EPOCHS * CORPUS / STEP)
    assert p.epochs == pytest.approx(6_200 * 216 / CORPUS)
    assert "largest model" in p.reason and "gpt-tiny 14,400 tok/s" in p.reason and "3.6 passes" in p.reason


def test_plan_keeps_the_smaller_model_when_the_larger_would_see_the_text_too_few_times():
    p = plan({"gpt-tiny": 8_000, "gpt-mini": 3_200}, 240, CORPUS, STEP)
    assert p.model == "gpt-tiny" and p.steps == int(8_000 * 240 / STEP)
    assert "too few times" in p.reason


def test_plan_falls_back_to_the_smallest_model_on_a_slow_machine():
    p = plan({"gpt-tiny": 1_000}, 240, CORPUS, STEP)
    assert p.model == "gpt-tiny" and "smallest model" in p.reason and "0.64" in p.reason


def test_plan_caps_a_fast_machine_at_max_epochs_and_says_so():
    p = plan({"gpt-tiny": 1e6, "gpt-mini": 5e5}, 240, CORPUS, STEP)
    assert p.model == "gpt-mini" and p.steps == p.cap_steps
    assert f"stops after {qs.MAX_EPOCHS:g} passes" in p.reason


def test_plan_obeys_a_forced_model():
    p = plan({"gpt-mini": 100.0}, 240, CORPUS, STEP, forced="gpt-mini")
    assert p.model == "gpt-mini" and p.steps == max(1, int(100 * 240 / STEP)) and "--model" in p.reason


def test_replanned_steps_follow_the_measured_speed_within_bounds():
    assert replanned_steps(5, 3.0, 240, planned=150, cap=500) == 150  # too early to trust the speed
    assert replanned_steps(100, 60.0, 240, planned=150, cap=500) == 400  # twice as fast as planned
    assert replanned_steps(100, 60.0, 240, planned=150, cap=300) == 300  # never past the epoch cap
    assert replanned_steps(100, 300.0, 240, planned=150, cap=500) == 101  # over budget: the run ends now
    assert replanned_steps(0, 0.0, 240, planned=900, cap=500) == 500


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_schedule_stretches_the_cosine_to_the_budget():
    """A machine 5x faster than the plan: the cosine is re-planned to end with the budget, not after the planned
    steps (where a fixed schedule would sit at its floor for the remaining 4/5 of the run)."""
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, min_lr_ratio=0.1)
    clock = FakeClock()
    schedule = BudgetSchedule(cfg, budget_s=100.0, planned=20, cap=1000, clock=clock)
    lrs = []
    for step in range(100):  # one second a step: 100 steps fit the budget
        clock.now = float(step)
        lrs.append(schedule(step))
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)  # warmup
    assert schedule.total == 100
    assert lrs[51] == pytest.approx(5.5e-4, rel=0.05)  # half way down the cosine at half the budget
    assert lrs[99] == pytest.approx(1e-4, rel=0.01) and all(a >= b - 1e-12 for a, b in zip(lrs[20:], lrs[21:]))


def test_budget_schedule_ends_at_the_epoch_cap_on_a_fast_machine():
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=0.1)
    clock = FakeClock()
    schedule = BudgetSchedule(cfg, budget_s=100.0, planned=50, cap=50, clock=clock)
    for step in range(50):
        clock.now = step * 0.1  # the cap is reached after 5 of the 100 seconds
        lr = schedule(step)
    assert schedule.total == 50 and lr == pytest.approx(1e-4, rel=0.01)


def test_choose_model_stops_timing_at_the_first_candidate_too_slow(monkeypatch):
    timed = []

    def fake_speed(model_cfg, cfg, steps=2):
        timed.append(model_cfg.name)
        return 1_000.0  # gpt-tiny: 0.6 passes in 4 minutes, so gpt-mini is not worth timing

    monkeypatch.setattr(qs, "measure_tokens_per_s", fake_speed)
    chosen = qs.choose_model("auto", 4096, TrainConfig(batch_size=16), 240, CORPUS)
    assert timed == ["gpt-tiny"] and chosen.model == "gpt-tiny"
    timed.clear()
    assert qs.choose_model("gpt-mini", 4096, TrainConfig(batch_size=16), 240, CORPUS).model == "gpt-mini"
    assert timed == ["gpt-mini"]


def test_measure_tokens_per_s_times_real_steps():
    from llmscratch.config import ModelConfig

    speed = qs.measure_tokens_per_s(ModelConfig.from_preset("gpt-micro"), TrainConfig(batch_size=2, device="cpu"),
                                    steps=1)
    assert math.isfinite(speed) and speed > 0


@pytest.mark.parametrize("kwargs, flag", [({"minutes": float("nan")}, "--minutes"), ({"minutes": -1}, "--minutes"),
                                          ({"model": "gpt-huge"}, "--model")])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, flag):
    out = tmp_path / "q"
    with pytest.raises(UserError, match=flag):
        qs.quickstart(out, **kwargs)
    assert not out.exists()


def test_a_folder_with_other_files_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        qs.quickstart(out, minutes=1)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
