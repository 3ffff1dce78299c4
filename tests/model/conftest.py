"""Small fp32 models exercising every option of every mixer, for the model tests."""
import pytest
import torch

from model import LM, ModelConfig
from model.config import (AttentionConfig, DeltaNetConfig, GatedDeltaNetConfig, GatedDeltaProductConfig, GLAConfig,
                          Mamba2Config, MLSTMConfig, ParaRNNConfig, RGLRUConfig)

VOCAB = 97
# One model per mixer (W: a window shorter than the test sequences), a hybrid of all of them, and Griffin's
# pattern (two RG-LRU blocks per window block), the ParaRNN GRU and LSTM, and the mLSTM.
PATTERNS = ["A", "W", "G", "M", "D", "E", "P", "R", "GMDAW", "RRW", "U", "L", "X"]


def small_config(pattern: str, **overrides) -> ModelConfig:
    fields = dict(
        vocab_size=VOCAB, d_model=64, d_ff=128, pattern=pattern, tie_embeddings=False,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, window=5),
        gla=GLAConfig(num_heads=2, use_short_conv=True),
        mamba2=Mamba2Config(expand=2, head_dim=16, d_state=16, n_groups=2),
        gated_deltanet=GatedDeltaNetConfig(num_heads=2, head_dim=16, expand_v=2.0, allow_neg_eigval=True),
        deltanet=DeltaNetConfig(num_heads=2, head_dim=16, expand_v=1.0, allow_neg_eigval=True),
        gated_deltaproduct=GatedDeltaProductConfig(num_heads=2, head_dim=16, expand_v=1.5, num_householder=3,
                                                   allow_neg_eigval=True, use_output_gate=False),
        rglru=RGLRUConfig(num_heads=2, width=48),
        pararnn=ParaRNNConfig(num_heads=2, width=32),
        mlstm=MLSTMConfig(num_heads=2, input_gate_bias=2.0),  # writes of e^2: the stabiliser at work at once
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def pytest_generate_tests(metafunc):
    """A test taking `pattern` runs once per entry of PATTERNS, unless it parametrizes it itself."""
    explicit = any("pattern" in marker.args[0] for marker in metafunc.definition.iter_markers("parametrize"))
    if "pattern" in metafunc.fixturenames and not explicit:
        metafunc.parametrize("pattern", PATTERNS)


@pytest.fixture
def make_lm():
    def build(pattern: str, seed: int = 0, **overrides) -> LM:
        torch.manual_seed(seed)
        return LM(small_config(pattern, **overrides)).eval()
    return build
