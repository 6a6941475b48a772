"""A user-plugged reward (loaded by dotted path in the RL run test): 1 if the answer starts with a digit."""

from megatron_kimi.rl.rewards import RewardOutput


def starts_with_digit(samples):
    ok = [s.response[:1].isdigit() for s in samples]
    return [RewardOutput(score=float(x), correct=x, info={}) for x in ok]
