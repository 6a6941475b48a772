"""megatron_kimi.config: loading, overrides, error messages (dotted keys, file names), layout checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_kimi.config import (
    ConfigError,
    RLConfig,
    SFTConfig,
    TrainConfig,
    build_config,
    load_config,
    parse_overrides,
    validate_layout,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny" / "train.yaml"


def _yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ unknown keys
def test_unknown_nested_key_names_dotted_key_and_suggests(tmp_path):
    path = _yaml(tmp_path, "model:\n  hiden_size: 32\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert "model.hiden_size" in msg
    assert "'model.hidden_size'" in msg
    assert str(path) in msg


def test_unknown_key_via_override_suggests():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["optimizer.lrr=0.1"])
    msg = str(ei.value)
    assert "optimizer.lrr" in msg and "'optimizer.lr'" in msg


def test_unknown_top_level_section(tmp_path):
    path = _yaml(tmp_path, "modle:\n  hidden_size: 32\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert "'modle'" in msg and "'model'" in msg


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["training.zzzzzzzz=1"])
    msg = str(ei.value)
    assert "training.zzzzzzzz" in msg and "did you mean" not in msg
    assert "global_batch_size" in msg  # the valid keys are listed


# ------------------------------------------------------------------------------------ wrong types
@pytest.mark.parametrize(
    "yaml_text, key, fragment",
    [
        ("model:\n  hidden_size: big\n", "model.hidden_size", "integer"),
        ("model:\n  hidden_size: 64.5\n", "model.hidden_size", "integer"),
        ("model:\n  hidden_size: true\n", "model.hidden_size", "integer"),
        ("parallel:\n  sequence_parallel: 'yes'\n", "parallel.sequence_parallel", "true/false"),
        ("parallel:\n  sequence_parallel: 1\n", "parallel.sequence_parallel", "true/false"),
        ("optimizer:\n  decay_style: 3\n", "optimizer.decay_style", "not one of"),
        ("precision:\n  dtype: fp8\n", "precision.dtype", "not one of"),
        ("model: [1, 2]\n", "model", "section"),
        ("optimizer:\n  lr: fast\n", "optimizer.lr", "number"),
        ("data:\n  path: 5\n", "data.path", "string"),
        ("parallel:\n  virtual_pipeline: two\n", "parallel.virtual_pipeline", "integer"),
    ],
)
def test_wrong_types_name_the_dotted_key(tmp_path, yaml_text, key, fragment):
    path = _yaml(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert f"{key}:" in msg, msg
    assert fragment in msg, msg
    assert str(path) in msg, msg



@pytest.mark.parametrize(
    "schema, override, message",
    [
        (TrainConfig, "optimizer.lr=abc", "optimizer.lr: expected a number, got 'abc'"),
        (TrainConfig, "training.steps=1.5", "training.steps: expected an integer, got 1.5"),
        (TrainConfig, "data.on_error=ignore", "data.on_error: 'ignore' is not one of ['raise', 'skip']"),
        (TrainConfig, "training.max_consecutive_nan_steps=0", "training.max_consecutive_nan_steps must be >= 1"),
        (SFTConfig, "data.overlong=wrap", "data.overlong: 'wrap' is not one of ['truncate', 'drop', 'error']"),
        (RLConfig, "rl.reward_timeout_s=soon", "rl.reward_timeout_s: expected a number, got 'soon'"),
        (RLConfig, "rl.reward_timeout_s=0", "rl.reward_timeout_s must be > 0"),
        (RLConfig, "rl.scoring_workers=0", "rl.scoring_workers must be >= 1"),
    ],
)
def test_wrong_types_from_a_cli_override_name_the_field_and_the_type(schema, override, message):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override], schema=schema)
    assert message in str(ei.value)

def test_bool_field_via_override_quoted_yes_is_a_string():
    # PyYAML (YAML 1.1) reads an unquoted `yes` as true; the quoted "yes" is a string and is rejected
    cfg = load_config(None, ["parallel.tensor=2", "parallel.sequence_parallel=yes"])
    assert cfg.parallel.sequence_parallel is True
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["parallel.sequence_parallel='yes'"])
    assert "parallel.sequence_parallel: expected true/false, got 'yes'" in str(ei.value)


def test_optional_field_accepts_null_and_value(tmp_path):
    cfg = load_config(_yaml(tmp_path, "model:\n  num_query_groups: null\n  kv_channels: 16\n"))
    assert cfg.model.num_query_groups is None and cfg.model.kv_channels == 16


# ------------------------------------------------------------------------------------ file errors
def test_yaml_syntax_error_names_the_file(tmp_path):
    path = _yaml(tmp_path, "model:\n  hidden_size: [1, 2\n", name="broken.yaml")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert str(path) in msg and "invalid YAML" in msg


def test_yaml_top_level_not_a_mapping_names_the_file(tmp_path):
    path = _yaml(tmp_path, "- a\n- b\n", name="list.yaml")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(path) in str(ei.value) and "mapping" in str(ei.value)


def test_empty_yaml_gives_defaults(tmp_path):
    cfg = load_config(_yaml(tmp_path, ""))
    assert cfg == TrainConfig()


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(path) in str(ei.value) and "does not exist" in str(ei.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------ overrides
def test_parse_overrides_nested_and_scalars():
    out = parse_overrides(["a.b=1", "run_dir=x", "optimizer.lr=3e-3", "a.c=true", "s=", "n=null"])
    assert out == {"a": {"b": 1, "c": True}, "run_dir": "x", "optimizer": {"lr": "3e-3"}, "s": "", "n": None}
    assert isinstance(out["a"]["b"], int)


def test_override_float_without_dot_is_a_float():
    cfg = load_config(None, ["optimizer.lr=3e-3", "optimizer.min_lr=1e-4"])
    assert isinstance(cfg.optimizer.lr, float) and cfg.optimizer.lr == pytest.approx(3e-3)
    assert cfg.optimizer.min_lr == pytest.approx(1e-4)
    cfg = load_config(None, ["optimizer.lr=1"])  # an int for a float field becomes a float
    assert isinstance(cfg.optimizer.lr, float) and cfg.optimizer.lr == 1.0


def test_override_value_with_equals_sign():
    assert parse_overrides(["data.path=a=b.txt"]) == {"data": {"path": "a=b.txt"}}


@pytest.mark.parametrize("bad", ["model.hidden_size", "novalue", "=3", "a..b=1", "a.=1"])
def test_bad_override(bad):
    with pytest.raises(ConfigError) as ei:
        parse_overrides([bad])
    assert repr(bad) in str(ei.value)


def test_override_value_and_section_clash():
    with pytest.raises(ConfigError, match="value and a section"):
        parse_overrides(["a=1", "a.b=2"])


def test_nested_override_merge_keeps_other_yaml_keys(tmp_path):
    path = _yaml(tmp_path, "run_dir: from_yaml\nmodel:\n  hidden_size: 32\n  num_layers: 4\n"
                           "optimizer:\n  lr: 0.01\n  min_lr: 0.001\n")
    cfg = load_config(path, ["model.hidden_size=128", "run_dir=x"])
    assert cfg.model.hidden_size == 128
    assert cfg.model.num_layers == 4  # kept from YAML
    assert cfg.optimizer.lr == 0.01 and cfg.optimizer.min_lr == 0.001
    assert cfg.run_dir == "x"
    assert cfg.model.ffn_hidden_size == TrainConfig().model.ffn_hidden_size  # default where unset


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run_dir = "elsewhere"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.hidden_size = 1  # type: ignore[misc]


def test_build_config_names_source():
    with pytest.raises(ConfigError, match=r"^my-source: unknown key 'model\.bogus'"):
        build_config(TrainConfig, {"model": {"bogus": 1}}, source="my-source")


# ------------------------------------------------------------------------------------ layout
def test_heads_not_divisible_by_tensor():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["model.num_attention_heads=6", "model.hidden_size=96", "parallel.tensor=4"])
    msg = str(ei.value)
    assert "model.num_attention_heads=6" in msg and "parallel.tensor=4" in msg


def test_layers_not_divisible_by_pipeline():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["model.num_layers=3", "parallel.pipeline=2"])
    msg = str(ei.value)
    assert "model.num_layers=3" in msg and "parallel.pipeline=2" in msg


def test_layers_not_divisible_by_pipeline_times_virtual():
    # 4 layers divide pp=2 but not pp=2 x vpp=4 = 8
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["model.num_layers=4", "parallel.pipeline=2", "parallel.virtual_pipeline=4"])
    msg = str(ei.value)
    assert "model.num_layers=4" in msg and "parallel.pipeline=2" in msg and "parallel.virtual_pipeline=4" in msg
    cfg = load_config(None, ["model.num_layers=4", "parallel.pipeline=2", "parallel.virtual_pipeline=2"])
    assert cfg.parallel.virtual_pipeline == 2


def test_validate_layout_world_size_clash():
    cfg = load_config(None, ["parallel.tensor=4", "model.num_attention_heads=4"])
    with pytest.raises(ConfigError) as ei:
        validate_layout(cfg, world_size=6)
    msg = str(ei.value)
    assert "world size 6" in msg and "parallel.tensor=4" in msg and "(= 4)" in msg
    assert validate_layout(cfg, world_size=8) == 2


def test_validate_layout_global_batch_vs_micro_times_dp():
    cfg = load_config(None, ["training.global_batch_size=8", "training.micro_batch_size=2"])
    assert validate_layout(cfg, world_size=2) == 2
    assert validate_layout(cfg, world_size=4) == 4
    with pytest.raises(ConfigError) as ei:
        validate_layout(cfg, world_size=3)
    msg = str(ei.value)
    assert "training.global_batch_size=8" in msg and "training.micro_batch_size=2" in msg
    assert "data-parallel size 3" in msg


def test_global_batch_not_divisible_by_micro():
    with pytest.raises(ConfigError, match=r"training\.global_batch_size=10 .*training\.micro_batch_size=4"):
        load_config(None, ["training.global_batch_size=10", "training.micro_batch_size=4"])


def test_sequence_parallel_needs_tensor():
    with pytest.raises(ConfigError, match=r"parallel\.sequence_parallel needs parallel\.tensor > 1"):
        load_config(None, ["parallel.sequence_parallel=true"])
    cfg = load_config(None, ["parallel.sequence_parallel=true", "parallel.tensor=2"])
    assert cfg.parallel.sequence_parallel


def test_virtual_pipeline_needs_pipeline():
    with pytest.raises(ConfigError, match=r"parallel\.virtual_pipeline needs parallel\.pipeline > 1"):
        load_config(None, ["parallel.virtual_pipeline=2"])


def test_min_lr_above_lr():
    with pytest.raises(ConfigError, match=r"optimizer\.min_lr"):
        load_config(None, ["optimizer.lr=1e-4", "optimizer.min_lr=1e-3"])


# ------------------------------------------------------------------------------------ the example
def test_load_tiny_example():
    cfg = load_config(TINY)
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 64 and cfg.model.num_query_groups == 1
    assert isinstance(cfg.model.rotary_base, float) and cfg.model.rotary_base == 10000.0
    assert cfg.optimizer.lr == pytest.approx(3e-3) and cfg.optimizer.min_lr == pytest.approx(3e-4)
    assert cfg.training.global_batch_size == 16 and cfg.training.micro_batch_size == 4
    assert cfg.checkpoint.save_interval == 50 and cfg.checkpoint.keep_last == 2
    assert validate_layout(cfg, world_size=1) == 1
    cfg2 = load_config(TINY, ["parallel.tensor=2"])  # the layout the example's header suggests
    assert validate_layout(cfg2, world_size=2) == 1
