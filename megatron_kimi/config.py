"""One typed config tree: dataclasses loaded from YAML plus dotted ``key.sub=value`` overrides.

``load_config(path, overrides, schema)`` reads the YAML, applies the overrides, builds the (frozen)
dataclasses and validates them once. Unknown keys fail with the closest valid name; wrong types name
the dotted key and the file. Layout checks that need the world size live in :func:`validate_layout`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Literal, Optional, Sequence, Union

import yaml

from megatron_kimi.model.vision.config import VisionConfig


class ConfigError(ValueError):
    """A user error in a config file or override (a ValueError, with the key and file named)."""


# ---- The tree ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """A Llama/Qwen2-style decoder (RMSNorm, SwiGLU, RoPE, GQA)."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 2
    num_query_groups: Optional[int] = None  # GQA: number of KV heads; None = num_attention_heads
    kv_channels: Optional[int] = None  # head dim; None = hidden_size // num_attention_heads
    vocab_size: Optional[int] = None  # None = the tokenizer's size
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    add_qkv_bias: bool = False
    tie_word_embeddings: bool = True
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # "auto": Transformer Engine layers when TE is importable on CUDA, else Megatron's local layers.
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    # Packed (THD) attention of the local spec: auto = torch varlen_attn on CUDA (fp16/bf16), else the
    # Triton kernel on CUDA, else SDPA (megatron_kimi/model/packed_attention.py). TE's spec has its own.
    attention_impl: Literal["auto", "torch", "triton", "ref"] = "auto"
    vision: Optional[VisionConfig] = None  # a vision tower + projector: the model is a VLM (model/vision/)


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout. Data parallel size = world_size / (tensor * pipeline * context)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None  # model chunks per pipeline rank (interleaved 1F1B)
    context: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    timeout_s: float = 600.0


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup + decay to a floor."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: Optional[int] = None  # None = training.steps


@dataclass(frozen=True)
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_reduce_in_fp32: bool = True


@dataclass(frozen=True)
class RecomputeConfig:
    granularity: Optional[Literal["selective", "full"]] = None
    method: Literal["uniform", "block"] = "uniform"
    num_layers: int = 1


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = 100
    global_batch_size: int = 8  # sequences per optimizer step (all micro-batches, all DP ranks)
    micro_batch_size: int = 2
    seq_length: int = 64
    seed: int = 1234
    # Steps whose loss or grad norm is NaN/inf are skipped (no update) and counted; this many in a
    # row stop the run with an error (Megatron raises at the first one).
    max_consecutive_nan_steps: int = 5
    # Per-token LM loss: "fused" = the vocab-parallel log-prob kernel on the final hidden state (no
    # [tokens, vocab] logits; megatron_kimi/model/gpt.py), "megatron" = logits + Megatron's cross-entropy.
    lm_loss_impl: Literal["fused", "megatron"] = "fused"


@dataclass(frozen=True)
class DataConfig:
    # A .jsonl ("text" field) / .txt file, or "builtin:arithmetic" (the embedded demo corpus).
    path: str = "builtin:arithmetic"
    text_key: str = "text"
    # A local Hugging Face tokenizer directory, or "builtin:char" (built by the project).
    tokenizer: str = "builtin:char"
    builtin_num_lines: int = 20000
    on_error: Literal["raise", "skip"] = "raise"  # bad jsonl lines: error (file:line) or skip and count


@dataclass(frozen=True)
class CheckpointConfig:
    save_interval: int = 0  # 0 = only at the end
    save_at_end: bool = True
    load: Optional[str] = None  # a checkpoint dir (or a checkpoints/ dir with a `latest` file)
    resume: bool = True  # resume from run_dir/checkpoints if it has a `latest`
    keep_last: int = 2  # 0 = keep all
    load_optimizer: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 1
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """``megatron-kimi train``: causal-LM training on a corpus."""

    run_dir: str = "runs/train"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass(frozen=True)
class SFTStageConfig:
    """One SFT stage: its own data, context length, epochs and LR schedule (optimizer state carries on)."""

    name: str = "stage1"
    # A chat jsonl ({"messages": [...]} per line) or "builtin:chat-arithmetic" (the embedded demo set).
    data: str = "builtin:chat-arithmetic"
    seq_length: int = 256
    epochs: int = 1
    global_batch_size: Optional[int] = None  # packs (sequences of seq_length) per step; default 8
    global_batch_tokens: Optional[int] = None  # or: tokens per step (a multiple of seq_length)
    lr: float = 2e-5
    min_lr: float = 2e-6
    warmup_steps: int = 0
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"

    def packs_per_step(self) -> int:
        if self.global_batch_tokens is not None:
            return self.global_batch_tokens // self.seq_length
        return 8 if self.global_batch_size is None else self.global_batch_size


@dataclass(frozen=True)
class SFTDataConfig:
    tokenizer: str = "builtin:char"  # a local HF tokenizer dir (its chat template is used) or builtin:char
    num_workers: int = 2  # tokenization worker processes
    on_error: Literal["raise", "skip"] = "raise"  # malformed jsonl lines
    # Samples longer than a stage's seq_length: cut to it, or leave out (both counted), or stop with an
    # error naming the file and line.
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    cache_dir: Optional[str] = None  # default: RUN_DIR/cache
    builtin_num_samples: int = 3000
    builtin_long_cot: bool = False  # builtin data with worked (long chain-of-thought) answers
    builtin_operands: int = 0  # 0: long-tailed 2..6 operands; n: always n (the RL demo warms up on n=2)
    builtin_multi_turn: bool = True
    builtin_carry_slip: float = 0.0  # P(teacher slips): drops the ones carry (data/chat_synth.py), counts +1 (images)
    builtin_checks: int = 0  # verbose answers: up to this many redundant check lines (data/chat_synth.py)
    image_token: str = "<|image|>"  # a VLM's image placeholder token (added to the tokenizer if missing)


@dataclass(frozen=True)
class SFTTrainingConfig:
    seed: int = 1234
    max_steps: Optional[int] = None  # stop after this many steps in total (smoke runs)
    # Steps whose loss or grad norm is NaN/inf are skipped (no update) and counted; this many in a
    # row stop the run with an error (Megatron raises at the first one).
    max_consecutive_nan_steps: int = 5
    # Per-token LM loss: "fused" = the vocab-parallel log-prob kernel on the final hidden state (no
    # [tokens, vocab] logits; megatron_kimi/model/gpt.py), "megatron" = logits + Megatron's cross-entropy.
    lm_loss_impl: Literal["fused", "megatron"] = "fused"


@dataclass(frozen=True)
class SFTConfig:
    """``megatron-kimi sft``: packed SFT over one or more stages (Kimi: 32k then 128k)."""

    run_dir: str = "runs/sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # lr fields come from the stages
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    training: SFTTrainingConfig = field(default_factory=SFTTrainingConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    stages: List[SFTStageConfig] = field(default_factory=lambda: [SFTStageConfig()])
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass(frozen=True)
class RLAlgoConfig:
    """Online mirror descent (Kimi k1.5 §2.3)."""

    loss: str = "mirror_descent"  # a name in megatron_kimi.rl.loss.LOSSES
    tau: float = 0.1
    k: int = 8  # samples per prompt
    prompts_per_iteration: int = 32
    iterations: int = 100
    updates_per_iteration: int = 2  # optimizer steps per iteration, over mini-batches of the samples
    reset_optimizer: bool = False  # the paper resets the optimizer state at every iteration
    length_penalty_weight: float = 0.0  # w in §2.3.3 (0 = off)
    length_penalty_warmup: int = 0  # iterations before the length penalty switches on
    repeat_penalty: float = -1.0  # reward of a response stopped by the repeat detector
    eval_interval: int = 0  # held-out evaluation every N iterations (0 = only before and after)
    # Wall-clock limit of one reward call (the samples of one reward kind in one iteration; with
    # async_scoring one finished sample, and all of them done within it after generation ends); past it,
    # or when the reward raises, the samples score 0 and are counted (reward_timeouts, reward_errors).
    reward_timeout_s: float = 300.0
    # Score each sample as soon as it is generated, in scoring_workers threads, while the engine generates
    # the rest (rl/scoring.py); false: all samples after generation, one call per reward kind.
    async_scoring: bool = True
    scoring_workers: int = 4
    # Per-token log π of the training step: "fused" = the vocab-parallel log-prob kernel on the final
    # hidden state, and for rl.loss=mirror_descent the packed mirror-descent loss kernel on per-token
    # log-ratios; "megatron" = logits + Megatron's cross-entropy, then the registry loss on sequence sums.
    logprob_impl: Literal["fused", "megatron"] = "fused"


@dataclass(frozen=True)
class RolloutConfig:
    # vllm: rollout/vllm_backend.py (`make venv-vllm`); vllm_server: an OpenAI-compatible vLLM server
    # (rollout/server_backend.py), started by the run or given by server_url
    engine: Literal["builtin", "vllm", "vllm_server"] = "builtin"
    sync_bucket_mb: int = 512  # vllm, vllm_server: largest safetensors file of a weight sync
    # vllm_server: a running server (http://host:port; started with VLLM_SERVER_DEV_MODE=1) or "" (the run
    # starts one, with this interpreter); with a URL, server_weights_dir is where the weight sync writes
    # (the server must read it). Each HTTP attempt times out after request_timeout_s; a request is retried
    # request_retries times, then dropped (not trained on; counted: dropped_requests).
    server_url: str = ""
    server_weights_dir: str = ""
    request_timeout_s: float = 120.0
    request_retries: int = 2
    server_start_timeout_s: float = 300.0
    # Colocation (CUDA; no-ops on CPU): vLLM's sleep level while the trainer runs (1: weights to CPU,
    # 2: weights dropped -- the sync rewrites them), its share of the GPU, and whether the trainer's
    # optimizer state goes to CPU memory while the engine generates.
    sleep_level: int = 1
    gpu_memory_utilization: float = 0.5
    offload_optimizer: bool = True
    # vllm, vllm_server: vLLM's enforce_eager; null: eager on CPU (compiling is ~14 % faster at 25M
    # params but starts ~27 s later, tools/BENCHMARKS.md), CUDA graphs on GPU (syncs reload in place).
    enforce_eager: Optional[bool] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    max_batch_size: int = 64  # concurrent sequences (continuous batching slots)
    repeat_detection: bool = True
    seed: int = 0
    # Partial rollouts (rl/partial.py): new tokens per trajectory per iteration (0: off, whole responses);
    # an unfinished one continues next iteration, at most partial_max_segments times.
    partial_budget: int = 0
    partial_max_segments: int = 8
    # Which response tokens of a multi-segment sample are in the loss: the last segment's (generated by
    # the current policy; as slime does) or all of them.
    partial_loss_segments: Literal["last", "all"] = "last"


@dataclass(frozen=True)
class RLDataConfig:
    # Prompts jsonl ({"prompt", "answer", "kind", "tests", "difficulty"} per line) or builtin:arithmetic.
    prompts: str = "builtin:arithmetic"
    eval_prompts: Optional[str] = None  # held-out prompts (builtin: a disjoint arithmetic set)
    eval_size: int = 200
    tokenizer: str = "builtin:char"
    reward: Optional[str] = None  # override the per-prompt "kind" reward (a registry name or dotted path)
    image_token: str = "<|image|>"  # a VLM's image placeholder token (rl/images.py; as data.image_token in SFT)
    on_error: Literal["raise", "skip"] = "raise"  # bad prompt lines: error (file:line) or skip and count
    # Prompt sampling (rl/prompt_sampler.py): uniform | curriculum (by "difficulty", easiest part first)
    # | prioritized (P ∝ 1 − success rate + priority_floor).
    sampling: Literal["uniform", "curriculum", "prioritized"] = "uniform"
    curriculum_switch_iteration: int = 0
    curriculum_easy_fraction: float = 0.5
    priority_floor: float = 0.05


@dataclass(frozen=True)
class RLTrainingConfig:
    seed: int = 1234
    seq_length: int = 256  # pack capacity for training micro-batches (prompt + response)
    max_packs_per_microbatch: int = 1
    # Steps whose loss or grad norm is NaN/inf are skipped (no update) and counted; this many in a
    # row stop the run with an error (Megatron raises at the first one).
    max_consecutive_nan_steps: int = 5


@dataclass(frozen=True)
class DifficultyConfig:
    """``megatron-kimi difficulty``: each prompt's pass rate over ``samples`` samples of a checkpoint."""

    samples: int = 10
    temperature: float = 1.0
    output: Optional[str] = None  # None: RUN_DIR/prompts_difficulty.jsonl (never data.prompts itself)
    batch_prompts: int = 64  # prompts generated and scored together


@dataclass(frozen=True)
class SampleConfig:
    """``megatron-kimi sample``: shortest rejection sampling (long2short, Kimi k1.5 §2.4)."""

    n: int = 8  # samples per prompt
    temperature: float = 1.0
    output: Optional[str] = None  # None: RUN_DIR/shortest.jsonl (SFT chat jsonl: the shortest correct)
    samples_output: Optional[str] = None  # None: RUN_DIR/samples.jsonl (every sample; dpo pairs_from=samples)
    batch_prompts: int = 64  # prompts generated and scored together


@dataclass(frozen=True)
class EvalConfig:
    """``megatron-kimi eval``: held-out accuracy and response length of one or more checkpoints."""

    # Evaluated after checkpoint.load (if set), in order; neither: the run's own latest. The CLI turns extra
    # positional arguments (without "=") into this list.
    checkpoints: List[str] = field(default_factory=list)
    temperature: float = 0.0  # 0: greedy
    samples: int = 1  # per held-out prompt
    output_dir: Optional[str] = None  # None: RUN_DIR (eval.json, eval.csv, eval_samples.jsonl)
    plot: Optional[str] = None  # None: OUTPUT_DIR/eval_accuracy_vs_length.png
    batch_prompts: int = 64


@dataclass(frozen=True)
class RLConfig:
    """``megatron-kimi rl``: online mirror-descent RL with verifiable rewards."""

    run_dir: str = "runs/rl"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, min_lr=1e-4, decay_style="constant"))
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    training: RLTrainingConfig = field(default_factory=RLTrainingConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rl: RLAlgoConfig = field(default_factory=RLAlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)  # `megatron-kimi difficulty`
    sample: SampleConfig = field(default_factory=SampleConfig)  # `megatron-kimi sample`
    eval: EvalConfig = field(default_factory=EvalConfig)  # `megatron-kimi eval`
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass(frozen=True)
class DPOAlgoConfig:
    """DPO (long2short, Kimi k1.5 §2.4); the loss and metrics as TRL defines them (megatron_kimi/dpo/loss.py)."""

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # ipo: log-probs averaged per response token, as TRL's IPO
    label_smoothing: float = 0.0  # sigmoid only: cDPO's ε (0 = the DPO paper)
    # data.pairs_from=samples: negatives are the wrong samples and the correct ones longer than
    # length_ratio x the positive (the shortest correct sample); one pair per negative, at most
    # max_pairs_per_prompt of them (0: all) in the file's order.
    length_ratio: float = 1.5
    max_pairs_per_prompt: int = 0


@dataclass(frozen=True)
class DPODataConfig:
    # pairs_from=pairs: {"prompt", "chosen", "rejected"} per line; samples: `sample`'s output,
    # {"prompt", "answer", "samples": [{"response", "correct", "tokens"}, ...]} per line (megatron_kimi/dpo/data.py).
    pairs: str = ""
    pairs_from: Literal["pairs", "samples"] = "pairs"
    tokenizer: str = "builtin:char"  # a local HF tokenizer dir (its chat template, as SFT) or builtin:char
    on_error: Literal["raise", "skip"] = "raise"  # bad jsonl lines: error (file:line: field) or skip and count
    # A pair longer than training.seq_length (chosen + rejected): left out and counted, or an error naming its line.
    overlong: Literal["drop", "error"] = "drop"
    cache_dir: Optional[str] = None  # tokenized pairs and reference log-probs; default RUN_DIR/cache


@dataclass(frozen=True)
class DPOTrainingConfig:
    seed: int = 1234
    seq_length: int = 1024  # pack capacity; a pair (chosen + rejected) must fit in one pack
    global_batch_size: int = 8  # packs per optimizer step (each holds whole pairs); the loss: mean over pairs
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many steps (smoke runs)
    max_consecutive_nan_steps: int = 5
    # Per-token log-probs: "fused" = the vocab-parallel log-prob kernel on the final hidden state,
    # "megatron" = logits + Megatron's cross-entropy.
    lm_loss_impl: Literal["fused", "megatron"] = "fused"


@dataclass(frozen=True)
class DPOConfig:
    """``megatron-kimi dpo``: DPO from ``checkpoint.load`` (also the frozen reference) on preference pairs."""

    run_dir: str = "runs/dpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # TRL's defaults: lr 1e-6, linear decay to 0, no warmup.
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-6, min_lr=0.0,
                                                                                decay_style="linear"))
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    training: DPOTrainingConfig = field(default_factory=DPOTrainingConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    dpo: DPOAlgoConfig = field(default_factory=DPOAlgoConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---- Loading -------------------------------------------------------------------------------


def parse_overrides(items: Sequence[str]) -> dict:
    """``["a.b=1", "run_dir=x"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key part")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set to a value and a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return _build(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            full = f"{where}.{key}" if where else str(key)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {full!r}{hint} (valid: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own checks (__post_init__): name the file too
        raise ConfigError(str(e)) from None


def build_config(schema: type, data: dict, source: str = "<config>") -> Any:
    """Build and validate ``schema`` from a plain dict; errors name ``source``."""
    try:
        cfg = _build(schema, data)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = (), schema: type = TrainConfig) -> Any:
    """Load YAML (``path`` may be None: defaults only), apply overrides, build, validate."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = _merge(data, parse_overrides(overrides))
    return build_config(schema, data, source)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ---- Validation ----------------------------------------------------------------------------


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_model(m: ModelConfig, p: ParallelConfig) -> None:
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
        _check(getattr(m, name) > 0, f"model.{name} must be > 0, got {getattr(m, name)}")
    groups = m.num_query_groups or m.num_attention_heads
    _check(
        m.num_attention_heads % groups == 0,
        f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
        f"model.num_query_groups={groups}",
    )
    if m.kv_channels is None:
        _check(
            m.hidden_size % m.num_attention_heads == 0,
            f"model.hidden_size={m.hidden_size} is not divisible by "
            f"model.num_attention_heads={m.num_attention_heads} (set model.kv_channels)",
        )
    _check(
        m.num_attention_heads % p.tensor == 0,
        f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tensor={p.tensor}",
    )
    _check(
        groups % p.tensor == 0 or p.tensor % groups == 0,
        f"model.num_query_groups={groups} and parallel.tensor={p.tensor}: one must divide the other",
    )
    _check(
        m.ffn_hidden_size % p.tensor == 0,
        f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tensor={p.tensor}",
    )
    chunks = p.pipeline * (p.virtual_pipeline or 1)
    _check(
        m.num_layers % chunks == 0,
        f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline={p.pipeline}"
        + (f" x parallel.virtual_pipeline={p.virtual_pipeline}" if p.virtual_pipeline else ""),
    )
    _check(0.0 <= m.hidden_dropout < 1 and 0.0 <= m.attention_dropout < 1, "dropout must be in [0, 1)")
    bad = m.vision.layout_error(p.tensor) if m.vision is not None else None
    _check(bad is None, str(bad))


def validate_parallel(p: ParallelConfig) -> None:
    for name in ("tensor", "pipeline", "context"):
        _check(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    if p.virtual_pipeline is not None:
        _check(p.virtual_pipeline >= 1, "parallel.virtual_pipeline must be >= 1")
        _check(p.pipeline > 1, "parallel.virtual_pipeline needs parallel.pipeline > 1")
    _check(not p.sequence_parallel or p.tensor > 1, "parallel.sequence_parallel needs parallel.tensor > 1")


def validate(cfg: Any) -> None:
    """Checks that need no world size. Called once by build_config."""
    nan_steps = getattr(getattr(cfg, "training", None), "max_consecutive_nan_steps", 1)
    _check(nan_steps >= 1, f"training.max_consecutive_nan_steps must be >= 1, got {nan_steps}")
    if isinstance(cfg, TrainConfig):
        validate_parallel(cfg.parallel)
        validate_model(cfg.model, cfg.parallel)
        t = cfg.training
        _check(t.steps >= 0, f"training.steps must be >= 0, got {t.steps}")
        _check(t.micro_batch_size >= 1, "training.micro_batch_size must be >= 1")
        _check(t.seq_length >= 1, "training.seq_length must be >= 1")
        _check(t.global_batch_size % t.micro_batch_size == 0, f"training.global_batch_size={t.global_batch_size} "
               f"is not divisible by training.micro_batch_size={t.micro_batch_size}")
        _check(t.seq_length <= cfg.model.max_position_embeddings, f"training.seq_length={t.seq_length} exceeds "
               f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
        if cfg.parallel.sequence_parallel:
            _check(t.seq_length % cfg.parallel.tensor == 0, f"training.seq_length={t.seq_length} is not divisible "
                   f"by parallel.tensor={cfg.parallel.tensor} (needed by sequence parallelism)")
        _validate_optimizer(cfg)
    elif isinstance(cfg, SFTConfig):
        validate_parallel(cfg.parallel)
        validate_model(cfg.model, cfg.parallel)
        _check(len(cfg.stages) >= 1, "stages: at least one stage is needed")
        for i, st in enumerate(cfg.stages):
            w = f"stages[{i}] ({st.name})"
            _check(st.epochs >= 1, f"{w}.epochs must be >= 1")
            _check(st.min_lr <= st.lr, f"{w}.min_lr={st.min_lr} > {w}.lr={st.lr}")
            _check(st.global_batch_size is None or st.global_batch_tokens is None,
                   f"{w}: set one of global_batch_size (packs) and global_batch_tokens, not both")
            if st.global_batch_tokens is not None:
                _check(st.global_batch_tokens % st.seq_length == 0 and st.global_batch_tokens > 0,
                       f"{w}.global_batch_tokens={st.global_batch_tokens} is not a positive multiple of "
                       f"{w}.seq_length={st.seq_length}")
            _check(st.packs_per_step() >= 1, f"{w}: global batch must be >= 1 pack")
            _check(st.seq_length <= cfg.model.max_position_embeddings,
                   f"{w}.seq_length={st.seq_length} exceeds model.max_position_embeddings="
                   f"{cfg.model.max_position_embeddings}")
            multiple = _seq_multiple(cfg.parallel)
            _check(st.seq_length % multiple == 0,
                   f"{w}.seq_length={st.seq_length} is not a multiple of {multiple} (needed by "
                   f"parallel.tensor={cfg.parallel.tensor} with sequence parallel / parallel.context="
                   f"{cfg.parallel.context})")
        _check(cfg.logging.log_interval >= 1, "logging.log_interval must be >= 1")
    elif isinstance(cfg, DPOConfig):
        validate_dpo(cfg)
    elif isinstance(cfg, RLConfig):
        validate_parallel(cfg.parallel)
        validate_model(cfg.model, cfg.parallel)
        _validate_optimizer(cfg)
        r = cfg.rl
        _check(r.k >= 2, f"rl.k={r.k}: the mean-reward baseline needs k >= 2 samples per prompt")
        _check(r.tau > 0, f"rl.tau must be > 0, got {r.tau}")
        _check(r.prompts_per_iteration >= 1 and r.iterations >= 0, "rl.prompts_per_iteration >= 1, rl.iterations >= 0")
        _check(r.updates_per_iteration >= 1, "rl.updates_per_iteration must be >= 1")
        _check(r.reward_timeout_s > 0, f"rl.reward_timeout_s must be > 0, got {r.reward_timeout_s}")
        _check(r.scoring_workers >= 1, f"rl.scoring_workers must be >= 1, got {r.scoring_workers}")
        _check(cfg.parallel.pipeline == 1 and cfg.parallel.context == 1,
               "rl: the built-in rollout engine supports tensor and data parallelism only (parallel.pipeline=1, "
               "parallel.context=1)")
        _check(cfg.rollout.temperature >= 0, "rollout.temperature must be >= 0")
        _check(cfg.rollout.sleep_level in (1, 2), f"rollout.sleep_level must be 1 or 2, got {cfg.rollout.sleep_level}")
        _check(0 < cfg.rollout.gpu_memory_utilization < 1,
               f"rollout.gpu_memory_utilization must be in (0, 1), got {cfg.rollout.gpu_memory_utilization}")
        _check(cfg.rollout.sync_bucket_mb >= 1,
               f"rollout.sync_bucket_mb must be >= 1, got {cfg.rollout.sync_bucket_mb}")
        if cfg.rollout.engine == "vllm_server":
            ro = cfg.rollout
            _check(ro.request_timeout_s > 0, f"rollout.request_timeout_s must be > 0, got {ro.request_timeout_s}")
            _check(ro.request_retries >= 0, f"rollout.request_retries must be >= 0, got {ro.request_retries}")
            _check(ro.server_start_timeout_s > 0,
                   f"rollout.server_start_timeout_s must be > 0, got {ro.server_start_timeout_s}")
            _check(not ro.server_url or ro.server_url.startswith(("http://", "https://")),
                   f"rollout.server_url must be http://host:port (or empty: start a server), got {ro.server_url!r}")
            _check(not ro.server_url or bool(ro.server_weights_dir),
                   f"rollout.server_url={ro.server_url}: set rollout.server_weights_dir to a directory the server "
                   "can read (the weight sync writes safetensors there)")
        _check(cfg.training.seq_length <= cfg.model.max_position_embeddings,
               f"training.seq_length={cfg.training.seq_length} exceeds model.max_position_embeddings="
               f"{cfg.model.max_position_embeddings}")


def validate_dpo(cfg: "DPOConfig") -> None:
    validate_parallel(cfg.parallel)
    validate_model(cfg.model, cfg.parallel)
    _validate_optimizer(cfg)
    d, t = cfg.dpo, cfg.training
    _check(d.beta > 0, f"dpo.beta must be > 0, got {d.beta}")
    _check(0.0 <= d.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
    _check(d.loss == "sigmoid" or d.label_smoothing == 0.0,
           f"dpo.label_smoothing={d.label_smoothing} applies to dpo.loss=sigmoid only (dpo.loss={d.loss})")
    _check(d.length_ratio >= 1.0, f"dpo.length_ratio must be >= 1, got {d.length_ratio}")
    _check(d.max_pairs_per_prompt >= 0, f"dpo.max_pairs_per_prompt must be >= 0 (0: all), got {d.max_pairs_per_prompt}")
    _check(bool(cfg.data.pairs), "data.pairs: set the pairs jsonl (or, with data.pairs_from=samples, the samples jsonl)")
    _check(t.epochs >= 1, f"training.epochs must be >= 1, got {t.epochs}")
    _check(t.global_batch_size >= 1, f"training.global_batch_size must be >= 1 pack, got {t.global_batch_size}")
    _check(t.max_steps is None or t.max_steps >= 0, f"training.max_steps must be >= 0, got {t.max_steps}")
    _check(t.seq_length <= cfg.model.max_position_embeddings,
           f"training.seq_length={t.seq_length} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}")
    multiple = _seq_multiple(cfg.parallel)
    _check(t.seq_length % multiple == 0,
           f"training.seq_length={t.seq_length} is not a multiple of {multiple} (needed by parallel.tensor="
           f"{cfg.parallel.tensor} with sequence parallel)")
    _check(cfg.parallel.context == 1, "dpo: parallel.context must be 1 (the pair loss needs each sequence whole on a rank)")


def _seq_multiple(p: ParallelConfig) -> int:
    m = p.tensor if p.sequence_parallel else 1
    if p.context > 1:
        m = m * 2 * p.context // math.gcd(m, 2 * p.context)
    return m


def _validate_optimizer(cfg) -> None:
    o = cfg.optimizer
    _check(o.lr >= 0 and o.min_lr >= 0, "optimizer.lr and optimizer.min_lr must be >= 0")
    _check(o.min_lr <= o.lr, f"optimizer.min_lr={o.min_lr} > optimizer.lr={o.lr}")
    _check(cfg.logging.log_interval >= 1, "logging.log_interval must be >= 1")


def data_parallel_size(p: ParallelConfig, world_size: int) -> int:
    return world_size // (p.tensor * p.pipeline * p.context)


def batch_checks(cfg) -> list:
    """(name, global batch, micro-batch name, micro batch) for every batch size in the config."""
    if isinstance(cfg, RLConfig):
        return [("rl.prompts_per_iteration", cfg.rl.prompts_per_iteration, "prompts per rank", 1)]
    if isinstance(cfg, DPOConfig):
        return [("training.global_batch_size (packs)", cfg.training.global_batch_size, "micro-batch (packs)", 1)]
    if isinstance(cfg, SFTConfig):
        return [(f"stages[{i}] ({st.name}) global batch (packs)", st.packs_per_step(), "micro-batch (packs)", 1)
                for i, st in enumerate(cfg.stages)]
    t = cfg.training
    return [("training.global_batch_size", t.global_batch_size, "training.micro_batch_size", t.micro_batch_size)]


def validate_layout(cfg, world_size: int) -> int:
    """Checks that need the world size; returns the data-parallel size."""
    p = cfg.parallel
    model_parallel = p.tensor * p.pipeline * p.context
    _check(
        world_size % model_parallel == 0,
        f"world size {world_size} is not divisible by parallel.tensor={p.tensor} x "
        f"parallel.pipeline={p.pipeline} x parallel.context={p.context} (= {model_parallel})",
    )
    dp = world_size // model_parallel
    for where, gbs, mbs_name, mbs in batch_checks(cfg):
        _check(
            gbs % (mbs * dp) == 0,
            f"{where}={gbs} is not divisible by {mbs_name}={mbs} x data-parallel size {dp}",
        )
    return dp
