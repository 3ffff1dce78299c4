"""The mixer registry (model/registry.py): a mixer registered once is usable by letter in a pattern, built by
the LM, counted by the FLOPs formula, and (if recurrent) carries the ops sequence parallelism scans with."""
import pytest
import torch
import torch.nn as nn

from configs.errors import ConfigError
from model import LM, ModelConfig
from model.flops import mixing_flops_per_token
from model.registry import MIXERS, Mixer, register

VOCAB = 97  # tests/model/conftest.py's small models


class Shift(nn.Module):
    """A stand-in mixer: each token sees the previous one (enough to be a token mixer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cu_seqlens=None, sp=None, cache=None):
        return self.proj(torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1])


@pytest.fixture
def shift_mixer():
    mixer = register(Mixer("shift", "S", config_key="attention", build=Shift, flops=lambda module, seq_len: 7.0))
    yield mixer
    del MIXERS["shift"]


def test_a_registered_mixer_is_built_by_letter_and_counted(shift_mixer):
    lm = LM.from_config(dict(vocab_size=VOCAB, d_model=32, pattern="SA", attention=dict(num_heads=2)))
    assert isinstance(lm.blocks[0].mixer, Shift)
    assert lm(torch.randint(0, VOCAB, (2, 5))).shape == (2, 5, VOCAB)
    assert mixing_flops_per_token(lm, 16)[0] == 7.0  # the formula it registered


def test_letters_and_names_are_unique_and_unknown_letters_list_the_registered_ones(shift_mixer):
    with pytest.raises(ValueError, match="clashes"):
        register(Mixer("other", "S", config_key="attention", build=Shift, flops=lambda m, t: 0.0))
    with pytest.raises(ConfigError, match="letter 'Q' names no mixer .*S=shift"):
        ModelConfig(pattern="QA")


@pytest.mark.parametrize("name", [name for name, mixer in MIXERS.items() if mixer.recurrent])
def test_recurrent_mixers_carry_their_ops_and_state_dims(make_lm, name):
    mixer = MIXERS[name]
    assert mixer.recurrent and mixer.core.kernel in ("gla", "gla_scalar", "gated_delta_rule", "diagonal_scan",
                                                     "mlstm")
    lm = make_lm(mixer.letter)
    state = lm.init_state(1, 8).caches[0]["recurrent"]
    assert tuple(state.shape[2:]) == mixer.head_dims(lm.config)  # [N, H, K, V]
