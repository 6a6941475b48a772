"""Data utilities: tokenizers, corpora, samplers and batch construction."""
