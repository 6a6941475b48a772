"""A user-plugged reward (loaded by dotted path in the RL run test): 1 if the answer starts with a digit."""

from megatron_kimi.rl.rewards import RewardOutput


def starts_with_digit(samples):
    ok = [s.response[:1].isdigit() for s in samples]
    return [RewardOutput(score=float(x), correct=x, info={}) for x in ok]


BATCHES = []  # the sizes of the batches digit_else_raise was called with, in this process


def digit_else_raise(samples):
    """``starts_with_digit``, but a batch holding a response that does not start with a digit raises (the
    loop's reward call then scores those samples alone: 0 and a reward error each)."""
    BATCHES.append(len(samples))
    if not all(s.response[:1].isdigit() for s in samples):
        raise ValueError("not a digit")
    return starts_with_digit(samples)
