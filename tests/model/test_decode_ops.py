"""Constant work per decode step: one step of a hybrid of every mixer runs the same aten operations, writing
the same number of elements, at context 256 and 8192 (counted with a TorchDispatchMode), with no host sync in
the model's own code, and within a budget of operations per block."""
import torch

from model.decode_ops import count_decode_ops

VOCAB = 97  # tests/model/conftest.py's small models
# Operations per block, each kernel call (norm, conv, rotary, fused recurrence) counted once: the goal of
# 60 per recurrent block and 40 per attention block. What a block cannot go below here is 12 fixed operations (two
# norms, the SwiGLU's 3 linears of 2 (t, mm) plus silu and mul, two residual adds) and 2 per linear of the mixer
# (attention's 4: 20 with the MLP's), since the projections keep separate weights.
RECURRENT_BLOCK_BUDGET = 60
ATTENTION_BLOCK_BUDGET = 40


def test_a_decode_step_does_the_same_work_at_context_256_and_8192(make_lm):
    lm = make_lm("GMDAWX")
    max_len = 8192 + 8
    counts = {}
    for context in (256, 8192):
        state = lm.init_state(2, max_len)
        with torch.no_grad():
            lm.step(torch.randint(0, VOCAB, (2, context)), state)
        counts[context] = count_decode_ops(lm, torch.randint(0, VOCAB, (2,)), state)
        assert state.lengths.tolist() == [context + 1] * 2
    assert counts[256] == counts[8192]
    for block in counts[8192]["blocks"]:
        assert block["host_syncs"] == 0, block
        budget = ATTENTION_BLOCK_BUDGET if block["mixer"] in ("attention", "sliding_window") else RECURRENT_BLOCK_BUDGET
        assert block["own_ops"] <= budget, block
