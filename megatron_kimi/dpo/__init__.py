"""DPO on preference pairs (``megatron-kimi dpo``), the long2short method of Kimi k1.5 §2.4.

* :mod:`~megatron_kimi.dpo.loss` -- the loss variants (sigmoid with label smoothing, IPO) and the
  metrics TRL logs (``rewards/chosen`` ...), as pure functions of per-sequence log-probs;
* :mod:`~megatron_kimi.dpo.data` -- pairs jsonl, or pairs built from ``sample`` output by the paper's
  rule (shortest correct vs. wrong or > ``length_ratio`` x longer), tokenized through the SFT chat path;
* :mod:`~megatron_kimi.dpo.batching` -- pair packs (chosen and rejected as two THD sequences of one
  pack), the training forward step, the frozen reference's log-probs (computed once, cached on disk).
"""
