"""Gated DeltaProduct (kernels/gated_delta_product: the gated delta rule over the interleaved Householder
sub-steps) against its naive loop, token by token and step by step, forward and every gradient.

beta is drawn from (0, 2) (negative eigenvalues, as the presets allow), with odd lengths, packed documents
(an empty one and a one-token one among them) and initial states. Tolerances as test_gated_delta_rule.py's:
the interleaved op is that op on n_h times as many steps.
"""
import pytest
import torch
import torch.nn.functional as F

from compare import assert_matches, run
from inputs import CU_SEQLENS, PACKED_T
from kernels import (chunk_gated_delta_product, chunk_gated_delta_rule, fused_recurrent_gated_delta_product,
                     gated_delta_product_state_summary)
from kernels.gated_delta_product import naive_gated_delta_product

FP32_TOL = 2e-4


def product_inputs(B, T, n_h, H, K, V, num_states, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    inputs = dict(q=F.normalize(rand(B, T, H, K), dim=-1), k=F.normalize(rand(B, T, n_h, H, K), dim=-1),
                  v=rand(B, T, n_h, H, V), g=F.logsigmoid(rand(B, T, H) + 2),
                  beta=2 * torch.rand(B, T, n_h, H, generator=gen, dtype=torch.float64),
                  initial_state=rand(num_states, H, K, V))
    return inputs, dict(o=rand(B, T, H, V), final_state=rand(num_states, H, K, V))


def test_naive_is_the_product_of_householder_transitions():
    """The reference against the definition with explicit K x K matrices: per token the decay, then each
    step's (I - beta k k^T) and write, in order."""
    inputs, _ = product_inputs(1, 4, 3, 2, 5, 3, num_states=1)
    q, k, v, g, beta, state = (inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    o, final = naive_gated_delta_product(q, k, v, g, beta, scale=0.5, initial_state=state, output_final_state=True)
    eye = torch.eye(5, dtype=torch.float64)
    for t in range(4):
        state = g[:, t, :, None, None].exp() * state
        for j in range(3):
            kj, bj = k[:, t, j], beta[:, t, j, :, None, None]
            state = (eye - bj * kj[..., :, None] * kj[..., None, :]) @ state + bj * kj[..., :, None] * v[:, t, j, :, None, :]
        torch.testing.assert_close(o[:, t], 0.5 * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    torch.testing.assert_close(final, state)


@pytest.mark.parametrize("op", [chunk_gated_delta_product, fused_recurrent_gated_delta_product],
                         ids=["chunk", "fused_recurrent"])
@pytest.mark.parametrize("T,n_h,packed", [(1, 2, False), (37, 2, False), (45, 3, False), (PACKED_T, 2, True)])
def test_matches_the_naive_loop_forward_and_backward(op, T, n_h, packed):
    cu_seqlens = CU_SEQLENS if packed else None
    B = 1 if packed else 2
    inputs, upstream = product_inputs(B, T, n_h, 2, 16, 8, len(CU_SEQLENS) - 1 if packed else B, seed=T)
    expected = run(naive_gated_delta_product, inputs, upstream, torch.float64, "cpu", cu_seqlens)
    assert_matches(run(op, inputs, upstream, torch.float64, "cpu", cu_seqlens), expected, 1e-10)
    assert_matches(run(op, inputs, upstream, torch.float32, "cpu", cu_seqlens), expected, FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("op", [chunk_gated_delta_product, fused_recurrent_gated_delta_product],
                         ids=["chunk", "fused_recurrent"])
def test_triton_kernels_on_the_substeps(op, monkeypatch):
    """The same ops through the gated delta rule's Triton kernels (BATON_KERNELS=triton: in the interpreter
    without a GPU), fp32, packed documents with initial states."""
    monkeypatch.setenv("BATON_KERNELS", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cu_seqlens = torch.tensor([0, 5, 6, 29], dtype=torch.int32)
    inputs, upstream = product_inputs(1, 29, 2, 1, 16, 16, num_states=3, seed=3)
    expected = run(naive_gated_delta_product, inputs, upstream, torch.float64, "cpu", cu_seqlens)
    assert_matches(run(op, inputs, upstream, torch.float32, device, cu_seqlens), expected, FP32_TOL)


def test_one_householder_step_is_the_gated_delta_rule():
    inputs, _ = product_inputs(2, 20, 1, 2, 8, 8, num_states=2)
    names = ("q", "k", "v", "g", "beta")
    q, k, v, g, beta = (inputs[n] for n in names)
    o, final = chunk_gated_delta_product(q, k, v, g, beta, initial_state=inputs["initial_state"], output_final_state=True)
    o1, final1 = chunk_gated_delta_rule(q, k[:, :, 0], v[:, :, 0], g, beta[:, :, 0],
                                        initial_state=inputs["initial_state"], output_final_state=True)
    torch.testing.assert_close(o, o1)
    torch.testing.assert_close(final, final1)


def test_state_summary_is_the_final_state_map():
    """S_local and M of each packed document: final state from S_0 = M S_0 + S_local."""
    inputs, _ = product_inputs(1, PACKED_T, 2, 2, 8, 4, num_states=len(CU_SEQLENS) - 1)
    q, k, v, g, beta, state = (inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    _, final = naive_gated_delta_product(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                         cu_seqlens=CU_SEQLENS)
    local, transition = gated_delta_product_state_summary(k, v, g, beta, cu_seqlens=CU_SEQLENS)
    torch.testing.assert_close(transition @ state + local, final)


@pytest.mark.parametrize("bad, message", [
    (dict(k=torch.zeros(1, 8, 2, 16)), "k must be"),
    (dict(v=torch.zeros(1, 8, 2, 16)), "v must be"),
    (dict(beta=torch.zeros(1, 8, 2)), "beta must be"),
    (dict(g=torch.zeros(1, 8, 2, 2)), "g must be"),
    (dict(q=torch.zeros(1, 8, 3, 16)), "q must be"),
])
def test_bad_input_is_a_clear_error(bad, message):
    args = dict(q=torch.zeros(1, 8, 2, 16), k=torch.zeros(1, 8, 2, 2, 16), v=torch.zeros(1, 8, 2, 2, 16),
                g=torch.zeros(1, 8, 2), beta=torch.zeros(1, 8, 2, 2))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        chunk_gated_delta_product(**args)
