"""The dpo config tree: the example loads; bad values name the key."""

from __future__ import annotations

import pytest

from megatron_kimi.cli import COMMANDS
from megatron_kimi.config import ConfigError, DPOConfig, load_config, validate_layout
from tests.dpo.bodies import CONFIG


def test_example_config_and_command():
    cfg = load_config(str(CONFIG), [], DPOConfig)
    assert (cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.length_ratio, cfg.data.pairs_from) == (0.1, "sigmoid", 1.5, "samples")
    assert COMMANDS["dpo"][0] is DPOConfig
    assert validate_layout(load_config(str(CONFIG), ["parallel.tensor=2"], DPOConfig), 4) == 2
    assert DPOConfig().optimizer.lr == 1e-6  # TRL's default


@pytest.mark.parametrize("override,msg", [
    ("dpo.beta=0", "dpo.beta must be > 0"),
    ("dpo.loss=hinge", "dpo.loss: 'hinge' is not one of"),
    ("dpo.label_smoothing=0.5", "dpo.label_smoothing must be in [0, 0.5)"),
    ("dpo.length_ratio=0.9", "dpo.length_ratio must be >= 1"),
    ("data.pairs_from=pair", "data.pairs_from: 'pair' is not one of"),
    ("data.pairs=", "data.pairs: set the pairs jsonl"),
    ("parallel.context=2", "parallel.context must be 1"),
    ("training.seq_length=256", "exceeds model.max_position_embeddings=128"),
])
def test_bad_values_name_the_key(override, msg):
    with pytest.raises(ConfigError) as e:
        load_config(str(CONFIG), [override], DPOConfig)
    assert msg in str(e.value)


def test_label_smoothing_is_for_sigmoid_only():
    load_config(str(CONFIG), ["dpo.label_smoothing=0.1"], DPOConfig)
    with pytest.raises(ConfigError, match="applies to dpo.loss=sigmoid only"):
        load_config(str(CONFIG), ["dpo.label_smoothing=0.1", "dpo.loss=ipo"], DPOConfig)
