"""Offline checkpoint tools: ``inspect`` (what is in a checkpoint, is it complete) and ``reshard``."""
