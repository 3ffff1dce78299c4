"""ModelConfig: patterns, and impossible values rejected with a one-line error naming the key."""
import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from model import LM, ModelConfig
from model.config import AttentionConfig, GLAConfig, ParaRNNConfig, RGLRUConfig


def test_pattern_repeats_to_n_layers():
    assert ModelConfig(pattern="GGA", n_layers=6).layer_mixers() == ["gla", "gla", "attention"] * 2
    assert ModelConfig(pattern=["M", "gated_deltanet", "W"]).layer_mixers() == [
        "mamba2", "gated_deltanet", "sliding_window"]
    assert ModelConfig(pattern="A").has_recurrent_layers() is False
    assert ModelConfig(pattern="AAG").has_recurrent_layers() is True


@pytest.mark.parametrize("fields, message", [
    (dict(pattern="GQA"), "model.pattern: letter 'Q' names no mixer"),
    (dict(pattern=""), "model.pattern is empty"),
    (dict(pattern="GGA", n_layers=4), "model.n_layers=4 must be a positive multiple"),
    (dict(pattern="A", attention=AttentionConfig(num_heads=6, num_kv_heads=4)), "model.attention.num_heads=6"),
    (dict(pattern="A", attention=AttentionConfig(num_heads=3)), "must divide d_model=256"),
    (dict(pattern="G", gla=GLAConfig(num_heads=3)), "model.gla.num_heads=3"),
    (dict(pattern="R", rglru=RGLRUConfig(num_heads=3, width=64)), "model.rglru.num_heads=3 must divide the width 64"),
    (dict(pattern="R", rglru=RGLRUConfig(conv_size=1)), "model.rglru.conv_size must be >= 2"),
    (dict(pattern="U", pararnn=ParaRNNConfig(num_heads=3, width=64)), "model.pararnn.num_heads=3 must divide the width"),
    (dict(pattern="L", pararnn=ParaRNNConfig(newton_tol=0.0)), "model.pararnn.newton_tol must be > 0"),
    (dict(pattern="L", pararnn=ParaRNNConfig(newton_max_iters=0)), "newton_max_iters >= 1"),
    (dict(vocab_size=0), "model.vocab_size must be >= 1"),
])
def test_bad_values_raise_naming_the_key(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_unused_mixer_settings_are_not_checked():
    ModelConfig(pattern="A", gla=GLAConfig(num_heads=3))  # no GLA layer: nothing to complain about


def test_from_config_accepts_dicts_and_rejects_unknown_keys():
    lm = LM.from_config({"pattern": "GA", "d_model": 32, "vocab_size": 50, "gla": {"num_heads": 2},
                         "attention": {"num_heads": 2}})
    assert [type(block.mixer).__name__ for block in lm.blocks] == ["GLA", "Attention"]
    with pytest.raises(ConfigKeyError):
        LM.from_config(OmegaConf.create({"pattern": "A", "d_modle": 32}))
    with pytest.raises(ValueError, match="model.pattern: letter 'Q'"):
        LM.from_config({"pattern": "Q"})
