"""The whole model under sequence parallelism (sp = 2 and 4 of 4 gloo processes) equals the model on full rows: logits,
and the gradient of every parameter, for each mixer alone and for a hybrid of all of them, with packed
documents that cross rank boundaries."""
import pytest
import torch
import torch.distributed as dist

from model import LM
from parallel.sequence import SequenceParallel

ROWS, LOCAL_LEN, VOCAB = 2, 6, 64
TINY = dict(vocab_size=VOCAB, d_model=32, gla=dict(num_heads=2, use_short_conv=True),
            mamba2=dict(head_dim=16, d_state=8), gated_deltanet=dict(num_heads=2, head_dim=8),
            deltanet=dict(num_heads=2, head_dim=8, allow_neg_eigval=True),
            gated_deltaproduct=dict(num_heads=2, head_dim=8, num_householder=2, allow_neg_eigval=True),
            rglru=dict(num_heads=2, width=16), pararnn=dict(num_heads=2, width=16),
            mlstm=dict(num_heads=2, input_gate_bias=2.0),  # writes of e^2: the stabiliser at work at once
            attention=dict(num_heads=2, window=5))
PATTERNS = ["G", "M", "D", "E", "P", "R", "U", "L", "X", "A", "W", "GMDAW"]
SIGNED_MAMBA2 = dict(TINY["mamba2"], allow_neg_eigval=True)  # Mamba2 with negative eigenvalues
# The LSTM through (h, c) and its CIFG variant: Newton steps on the block-diagonal scan (2x2 transitions)
VARIANTS = [("M", {"mamba2": SIGNED_MAMBA2}), ("L", {"pararnn": dict(TINY["pararnn"], lstm="hc")}),
            ("L", {"pararnn": dict(TINY["pararnn"], lstm="cifg")})]


def batch_layout(sp_size: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Token rows and each row's document starts: row 0 has a document across every slice boundary and
    one starting exactly on one; row 1 is a single document spanning all ranks."""
    T = sp_size * LOCAL_LEN
    starts = [sorted({0, 4, LOCAL_LEN, T - 2}), [0]]
    return torch.randint(0, VOCAB, (ROWS, T)), starts


def cu_seqlens_of(starts: list[list[int]], row_len: int, lo: int = 0) -> torch.Tensor:
    """cu_seqlens over the flattened rows' slice [lo, lo + row_len) of each row (every row start included)."""
    bounds = {len(starts) * row_len}
    for b, row in enumerate(starts):
        bounds.add(b * row_len)
        bounds.update(b * row_len + s - lo for s in row if lo <= s < lo + row_len)
    return torch.tensor(sorted(bounds), dtype=torch.int32)


def run_checks(rank: int, world_size: int, sp_size: int) -> None:
    # sp groups of consecutive ranks, as on the mesh; subgroups (not the world) when sp < world size.
    groups = [dist.new_group(list(range(first, first + sp_size))) for first in range(0, world_size, sp_size)]
    group, sp_rank = groups[rank // sp_size], rank % sp_size
    for pattern, overrides in [(pattern, {}) for pattern in PATTERNS] + VARIANTS:
        torch.manual_seed(0)  # same weights and tokens on every rank
        lm = LM.from_config(dict(TINY, pattern=pattern, **overrides))
        tokens, starts = batch_layout(sp_size)
        T = tokens.shape[1]
        logits = lm(tokens, cu_seqlens=cu_seqlens_of(starts, T))
        weight = torch.randn_like(logits)
        (logits * weight).sum().backward()
        expected_grads = {name: p.grad.clone() for name, p in lm.named_parameters()}
        lm.zero_grad()

        lo = sp_rank * LOCAL_LEN
        sp = SequenceParallel(group, cu_seqlens_of(starts, LOCAL_LEN, lo),
                              torch.tensor([lo in row for row in starts]))
        local_logits = lm(tokens[:, lo : lo + LOCAL_LEN], cu_seqlens=sp.cu_seqlens, sp=sp)
        torch.testing.assert_close(local_logits, logits[:, lo : lo + LOCAL_LEN].detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{pattern}: logits differ: {m}")
        (local_logits * weight[:, lo : lo + LOCAL_LEN]).sum().backward()
        for name, param in lm.named_parameters():
            dist.all_reduce(param.grad, group=group)  # what FSDP's reduce over the sp ranks does
            torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{pattern}: d{name} differs: {m}")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sp_size", [2, 4])
def test_model_under_sequence_parallel_matches_full_rows(spawn, sp_size):
    """4 processes: two sp groups of 2, or one of 4."""
    spawn(run_checks, 4, sp_size)
