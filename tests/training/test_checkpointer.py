"""Checkpointer.save(step, last_step=...): the one place that decides when to save and when a
preemption stops the run (train, sft and rl all call it after every step)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_kimi.training import checkpointer as ckpt_mod
from megatron_kimi.training.checkpointer import Checkpointer


class _Trainer:
    def __init__(self):
        self.state = SimpleNamespace(step=0)
        self.saved = []

    def save(self, root, keep_last, extra):
        self.saved.append((self.state.step, keep_last, extra))
        return root / f"iter_{self.state.step:07d}"


@pytest.fixture
def confirmed(monkeypatch):
    calls = []
    monkeypatch.setattr(ckpt_mod.preemption, "confirm_saved", lambda path, step: calls.append((path.name, step)))
    return calls


def _run(ckpt, trainer, steps, stop_at=None, steps_per_call=1):
    """Drive ``ckpt`` as a loop would; returns the step it stopped at (None: ran to the end)."""
    asked = []
    ckpt.should_stop = lambda: asked.append(1) or (stop_at is not None and len(asked) >= stop_at)
    for step in range(1, steps + 1):
        trainer.state.step = step * steps_per_call
        if ckpt.save(step, last_step=step == steps):
            return step, len(asked)
    return None, len(asked)


@pytest.mark.parametrize("interval,at_end,want", [(0, True, [6]), (0, False, []), (2, True, [2, 4, 6]),
                                                  (4, True, [4, 6]), (4, False, [4])])
def test_interval_and_end_saves(tmp_path, confirmed, interval, at_end, want):
    trainer = _Trainer()
    ckpt = Checkpointer(trainer, tmp_path, interval=interval, at_end=at_end, keep_last=3, extra={"config": 1})
    assert _run(ckpt, trainer, 6) == (None, 6)  # the preemption flag is asked at every step (a collective)
    assert [s for s, _, _ in trainer.saved] == want
    assert all(k == 3 and e == {"config": 1} for _, k, e in trainer.saved)
    assert not ckpt.stopped and confirmed == []


def test_preemption_saves_confirms_and_stops(tmp_path, confirmed):
    trainer = _Trainer()  # an rl-like loop: 2 optimizer steps per iteration, checkpoints named by step
    ckpt = Checkpointer(trainer, tmp_path, interval=0, at_end=True)
    assert _run(ckpt, trainer, 6, stop_at=3, steps_per_call=2) == (3, 3)
    assert [s for s, _, _ in trainer.saved] == [6] and confirmed == [("iter_0000006", 6)]
    assert ckpt.stopped


def test_preemption_on_the_last_step_lets_the_run_end(tmp_path, confirmed):
    trainer = _Trainer()
    ckpt = Checkpointer(trainer, tmp_path, interval=0, at_end=True)
    assert _run(ckpt, trainer, 4, stop_at=4) == (None, 4)
    assert [s for s, _, _ in trainer.saved] == [4] and confirmed == [] and not ckpt.stopped


def test_before_save_runs_only_before_a_save(tmp_path, confirmed):
    trainer, calls = _Trainer(), []
    ckpt = Checkpointer(trainer, tmp_path, interval=2, at_end=False, should_stop=lambda: False)
    for step in range(1, 5):
        trainer.state.step = step
        ckpt.save(step, last_step=step == 4, before_save=lambda: calls.append(trainer.state.step))
    assert calls == [2, 4] == [s for s, _, _ in trainer.saved]
