"""Parallelism applied to the single-device model code (context parallelism for packed batches)."""
