"""A reward for the `sample` / `eval` command tests, correctness set by each prompt's "answer":
"all": every response is correct, "none": none is, "digit": those that start with a digit."""

from megatron_kimi.rl.rewards import RewardOutput


def by_answer(samples):
    ok = [s.answer == "all" or (s.answer == "digit" and s.response[:1].isdigit()) for s in samples]
    return [RewardOutput(score=float(x), correct=x, info={}) for x in ok]


def even_length(samples):
    """Correct iff the response has an even number of characters (about half of a near-random model's)."""
    ok = [len(s.response) % 2 == 0 for s in samples]
    return [RewardOutput(score=float(x), correct=x, info={}) for x in ok]
