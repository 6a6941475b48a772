"""rl/partial.py: the replay buffer of partial rollouts (segments, finishing, groups, checkpoint state)."""

from __future__ import annotations

import json

import pytest

from megatron_kimi.rl.partial import ReplayBuffer, loss_start


def test_segments_until_stop_length_or_the_segment_cap():
    buf = ReplayBuffer(k=2, budget=3, max_new_tokens=8, max_segments=3)
    (g,) = buf.add([5], [[1, 2]])
    a, b = buf.pending()
    assert (a.group, a.prompt_index, a.sample_index, b.sample_index) == (g, 5, 0, 1)
    assert buf.budget_for(a) == 3
    buf.extend(a, [10, 11, 12], [-0.1, -0.2, -0.3], "length", version=0, mean_entropy=1.0)
    buf.extend(b, [20, 21], [-0.5, -0.6], "stop", version=0)
    assert not a.finished and b.finished and b.finish_reason == "stop"
    assert buf.pop_complete() == []  # the group waits for a
    assert buf.pending() == [a] and a.next_input() == [1, 2, 10, 11, 12]
    buf.extend(a, [13, 14, 15], [-0.4] * 3, "length", version=1, mean_entropy=2.0)
    assert not a.finished and buf.budget_for(a) == 2  # 8 - 6 left
    buf.extend(a, [16, 17], [-0.7] * 2, "length", version=2)
    assert a.finish_reason == "length" and a.segments == 3
    assert a.versions == [0, 0, 0, 1, 1, 1, 2, 2] and a.segment_starts == [0, 3, 6]
    assert a.entropy_sum == pytest.approx(3 * 1.0 + 3 * 2.0)
    (group,) = buf.pop_complete()
    assert [t.sample_index for t in group] == [0, 1] and len(buf) == 0
    assert loss_start(a, "last") == 6 and loss_start(a, "all") == 0 and loss_start(b, "last") == 0  # by version


def test_segment_cap_cuts_a_long_response():
    buf = ReplayBuffer(k=1, budget=2, max_new_tokens=100, max_segments=2)
    buf.add([0], [[1]])
    (t,) = buf.pending()
    buf.extend(t, [3, 4], [0.0, 0.0], "length", version=0)
    buf.extend(t, [5, 6], [0.0, 0.0], "length", version=1)
    assert t.finish_reason == "length" and t.response_ids == [3, 4, 5, 6]


def test_state_round_trips_through_json_and_checks_k():
    buf = ReplayBuffer(k=2, budget=2, max_new_tokens=10, max_segments=4)
    buf.add([3, 7], [[1], [2, 2]])
    t = buf.pending()[0]
    buf.extend(t, [9, 9], [-1.0, -2.0], "length", version=4)
    state = json.loads(json.dumps(buf.state_dict()))
    again = ReplayBuffer(k=2, budget=2, max_new_tokens=10, max_segments=4)
    again.load_state_dict(state)
    assert again.state_dict() == buf.state_dict() and again.next_group == 2
    assert [x.next_input() for x in again.pending()] == [x.next_input() for x in buf.pending()]
    with pytest.raises(ValueError, match="rl.k"):
        ReplayBuffer(k=3, budget=2, max_new_tokens=10, max_segments=4).load_state_dict(state)
    with pytest.raises(ValueError, match="partial_budget"):
        ReplayBuffer(k=1, budget=0, max_new_tokens=10, max_segments=1)
    with pytest.raises(ValueError, match="partial_loss_segments"):
        loss_start(t, "first")
