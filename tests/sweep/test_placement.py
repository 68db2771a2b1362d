"""Where trials run and how many at once (sweep/placement.py), without GPUs: card sizes are
given, as NVML would report them."""

from __future__ import annotations

import pytest

from sweep import placement
from sweep.errors import ConfigError
from sweep.placement import CONTEXT_GIB, MARGIN, Placement


@pytest.fixture
def h200(monkeypatch):
    """Cards of 140 GiB with 2 GiB already held by someone else."""
    monkeypatch.setattr(placement, "card_memory", lambda index: (140.0, 2.0))


def _fill(p: Placement, key) -> list:
    slots = []
    while (slot := p.take(key)) is not None:
        slots.append(slot)
    return slots


def test_auto_starts_at_the_budget_then_packs_by_learned_peak(h200):
    p = Placement([0], None, 1, budget_gib=24.0, learned={}, cores=64)
    key = ("qwen2.5-0.5b", "qlora")
    first = _fill(p, key)
    assert len(first) == int(138 // (24 + CONTEXT_GIB))  # 5: nothing known yet
    assert all(s.gpu == 0 and s.env()["CUDA_VISIBLE_DEVICES"] == "0" for s in first)
    for slot in first:
        p.give(slot, peak_gib=6.0, out_of_memory=False)
    packed = _fill(p, key)
    assert len(packed) == int(138 // (6.0 * MARGIN))  # 18 once 6 GiB trials were seen
    p.give(packed[0], peak_gib=5.0, out_of_memory=True)  # an OOM: back to the budget
    assert p.estimate(key) == 24 + CONTEXT_GIB


def test_running_trials_tighten_the_first_wave(h200):
    """The first trials' peaks after a training step (not only at their end) make room."""
    p = Placement([0], None, 1, budget_gib=24.0, learned={}, cores=64)
    key = ("qwen2.5-0.5b", "qlora")
    first = _fill(p, key)
    assert len(first) == 5
    for slot in first:
        p.observe(slot, 6.0)
    assert all(s.estimate_gib == 6.0 * MARGIN for s in first)
    more = _fill(p, key)  # 138 GiB minus five running trials now expected at 7.5 GiB
    assert len(more) == int((138 - 5 * 6.0 * MARGIN) // (6.0 * MARGIN))
    p.observe(first[0], 9.0)  # a peak only grows: the whole model's estimate follows
    assert p.estimate(key) == 9.0 * MARGIN
    p.give(first[0], peak_gib=9.0, out_of_memory=False)
    assert first[0] not in p.running and len(p.running) == 4 + len(more)


def test_open_slots_count_what_may_still_start_per_card(h200):
    """While memory holds the first wave back, the count limit says how many trials may still
    start on a card (the sweep starts their processes ahead)."""
    p = Placement([0, 1], None, 1, budget_gib=24.0, learned={}, cores=16)
    first = _fill(p, ("m", "qlora"))  # 5 per card: nothing known yet
    assert [p.open_slots(g) for g in (0, 1)] == [8 - 5, 8 - 5]
    p.give(first[0], 2.0, False)
    assert p.open_slots(first[0].gpu) == 4 and p.open_slots(1 - first[0].gpu) == 3
    cpu = Placement(None, 1, 3, budget_gib=24.0, learned={}, cores=12)
    cpu.take(("m", "qlora"))
    assert cpu.open_slots(None) == 2


def test_open_slots_follow_a_known_peak(monkeypatch):
    """Once a model's peak is known, open slots count what fits in the card's memory too: a
    7B trial on a 24 GiB card leaves room for no second one, whatever the core count."""
    monkeypatch.setattr(placement, "card_memory", lambda index: (24.0, 0.5))
    p = Placement([0], None, 1, budget_gib=24.0, learned={}, cores=16)
    key = ("qwen2.5-7b", "qlora")
    (first,) = _fill(p, key)  # nothing known: the idle card takes one
    assert p.open_slots(0, key) == 15  # by count (memory unknown)
    p.observe(first, 14.0)
    assert p.open_slots(0, key) == 0 and p.open_slots(0) == 15
    p.give(first, 14.0, False)
    assert p.open_slots(0, key) == 1  # 23.5 GiB hold one trial of 17.5


def test_auto_spreads_over_gpus_and_caps_at_cores(h200):
    p = Placement([0, 1], None, 1, budget_gib=24.0, learned={("m", "qlora"): 1.0}, cores=8)
    slots = _fill(p, ("m", "qlora"))
    assert len(slots) == 8  # memory would allow 110 per card: one core per trial
    assert sorted(s.gpu for s in slots) == [0] * 4 + [1] * 4
    assert all(s.threads == 1 for s in slots)


def test_fixed_count_per_gpu(h200):
    p = Placement([0, 1], 3, 1, budget_gib=24.0, learned={}, cores=16)
    slots = _fill(p, ("m", "qlora"))
    assert sorted(s.gpu for s in slots) == [0, 0, 0, 1, 1, 1]


def test_cpu_jobs_share_the_cores():
    p = Placement(None, 1, 3, budget_gib=24.0, learned={}, cores=12)
    slots = _fill(p, ("m", "qlora"))
    assert len(slots) == 3
    assert all(s.gpu is None and s.env() == {"OMP_NUM_THREADS": "4"} for s in slots)
    p.give(slots[0], None, False)
    assert p.take(("m", "qlora")) is not None


def test_packed_gpu_trials_wait_for_the_card_asleep_unless_the_user_says(h200, monkeypatch):
    monkeypatch.delenv("SWEEP_CUDA_WAIT", raising=False)
    packed = _fill(Placement([0], 4, 1, 24.0, {}, cores=16), ("m", "qlora"))
    assert [s.env()["SWEEP_CUDA_WAIT"] for s in packed] == ["block"] * 4
    (alone,) = _fill(Placement([0], 1, 1, 24.0, {}, cores=16), ("m", "qlora"))
    assert "SWEEP_CUDA_WAIT" not in alone.env()  # one trial: CUDA's default
    monkeypatch.setenv("SWEEP_CUDA_WAIT", "spin")
    assert (
        _fill(Placement([0], 2, 1, 24.0, {}, cores=16), ("m", "qlora"))[0].env()["SWEEP_CUDA_WAIT"]
        == "spin"
    )


def test_a_misspelt_wait_mode_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("SWEEP_CUDA_WAIT", "blocking")
    with pytest.raises(ConfigError, match="SWEEP_CUDA_WAIT: .*'blocking'.*did you mean 'block'"):
        placement.check_cuda_wait()
    monkeypatch.setenv("SWEEP_CUDA_WAIT", "spin")
    placement.check_cuda_wait()


def test_one_trial_at_a_time_keeps_the_environment():
    (slot,) = _fill(Placement(None, 1, 1, 24.0, {}), ("m", "qlora"))
    assert slot.env() == {}


def test_auto_without_a_memory_figure_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(placement, "card_memory", lambda index: None)
    with pytest.raises(ConfigError, match="--gpus: GPU 0: no memory figure"):
        Placement([0], None, 1, 24.0, {})


@pytest.mark.parametrize("text", ["", "a", "0,0", "-1", "1,,x"])
def test_bad_gpu_lists(text):
    with pytest.raises(ConfigError, match="--gpus"):
        placement.parse_gpus(text)


def test_a_slot_knows_whether_another_trial_shared_its_card(h200):
    """`shared`: another trial ran on the same GPU at some time while it ran (a later one
    too), which decides whether its out-of-memory is the card's or its own (sweep/trial.py)."""
    p = Placement([0, 1], 1, 1, budget_gib=24.0, learned={}, cores=64)
    key = ("qwen2.5-0.5b", "qlora")
    alone, other_card = p.take(key), p.take(key)
    assert {alone.gpu, other_card.gpu} == {0, 1} and not alone.shared and not other_card.shared
    p = Placement([0], 2, 1, budget_gib=24.0, learned={}, cores=64)
    first = p.take(key)
    assert not first.shared
    second = p.take(key)
    assert first.shared and second.shared
    p.give(second, 5.0, False)
    third = p.take(key)
    assert third.shared
