"""Kimi k1.5 RL: online mirror descent, rewards, shaping, the RL loop."""
