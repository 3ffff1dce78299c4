"""The FLOPs formula (model/flops.py) against what a forward pass actually computes."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.attention import attention_mask
from model.flops import mixing_flops_per_token, projection_flops_per_token
from model.recurrent import ShortConvolution

VOCAB = 97  # tests/model/conftest.py's small models
B, T = 2, 128  # two whole 64-token kernel chunks per row


def count_flops(lm):
    ids = torch.randint(0, VOCAB, (B, T))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        lm(ids)
    return {module: {str(op): n for op, n in ops.items()} for module, ops in counter.get_flop_counts().items()}


def test_projection_flops_equal_the_counted_matmuls(make_lm):
    lm = make_lm("GMDAW")
    counted = count_flops(lm)["Global"]
    conv = sum(2 * m.weight.numel() for m in lm.modules() if isinstance(m, ShortConvolution))  # not a matmul
    assert counted["aten.mm"] + counted["aten.addmm"] == B * T * (projection_flops_per_token(lm) - conv)


@pytest.mark.parametrize("pattern", ["G", "M", "D", "E", "P"])
def test_recurrence_flops_match_the_chunk_kernels(make_lm, pattern):
    """The chunk formula against the batched matmuls of the chunked kernels (the delta rule's triangular
    solve is in the formula but not a matmul, hence the tolerance)."""
    lm = make_lm(pattern)
    counted = count_flops(lm)["LM.blocks.0.mixer"]["aten.bmm"]
    assert counted == pytest.approx(B * T * mixing_flops_per_token(lm, T)[0], rel=0.15)


@pytest.mark.parametrize("pattern", ["A", "W"])
def test_attention_flops_count_the_attended_pairs(make_lm, pattern):
    lm = make_lm(pattern)
    mixer = lm.blocks[0].mixer
    positions = torch.arange(T)
    pairs = attention_mask(positions, torch.zeros(1, T, dtype=torch.long), positions, mixer.window).sum().item()
    assert T * mixing_flops_per_token(lm, T)[0] == pytest.approx(4 * mixer.num_heads * mixer.head_dim * pairs)


def test_training_flops_scale_with_context_only_for_full_attention(make_lm):
    recurrent, window, full = make_lm("GMD"), make_lm("W"), make_lm("A")
    assert recurrent.flops_per_token(4096) == recurrent.flops_per_token(256)
    assert window.flops_per_token(4096) == pytest.approx(window.flops_per_token(256), rel=1e-3)
    assert full.flops_per_token(4096) > full.flops_per_token(256)
    assert full.flops_per_token(256) > 3 * projection_flops_per_token(full)
