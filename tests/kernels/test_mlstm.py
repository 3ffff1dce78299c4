"""The mLSTM ops (kernels/mlstm: GLA's kernels on the stabilised gates) against the xLSTM recurrence written out
step by step (naive.py), itself checked against the unstabilised formula: the chunked PyTorch path, the Triton
ops (interpreted on CPU), the fused recurrent (decode) path, forward and every gradient, odd lengths, packed
documents, initial states with their own stabiliser, input gates far past fp32's exponent range, and the
state summary with the combine sequence parallelism uses."""
from unittest import mock

import pytest
import torch

from kernels.mlstm import (chunk_mlstm, combine_mlstm_states, fused_recurrent_mlstm, mlstm_state_summary,
                           naive_recurrent_mlstm, split_state)
from kernels.tuning import pinned_config
from compare import assert_matches, run
from inputs import CU_SEQLENS, PACKED_T, NUM_DOCS, mlstm_inputs


def true_units(state: torch.Tensor) -> torch.Tensor:
    """(C | n) exp(m): the state whatever stabiliser it was written with."""
    memory, m = split_state(state)
    return memory * torch.exp(m)[..., None, None]


def test_the_reference_is_the_unstabilised_recurrence():
    """naive_recurrent_mlstm == C_t = e^f C + e^i k v^T, n_t = e^f n + e^i k, h = C^T q / max(|n.q|, 1) in fp64,
    final state included (in true units)."""
    inputs, _ = mlstm_inputs(2, 40, 2, 8, 6, num_states=2)
    q, k, v, i, f, state = inputs.values()
    o, final = naive_recurrent_mlstm(q, k, v, i, f, scale=0.5, initial_state=state, output_final_state=True)
    memory = true_units(state)  # [N, H, K, V+1]
    for t in range(q.shape[1]):
        kv = k[:, t, :, :, None] * torch.cat([v[:, t], v.new_ones(2, 2, 1)], -1)[:, :, None, :]
        memory = f[:, t].exp()[..., None, None] * memory + i[:, t].exp()[..., None, None] * kv
        numerator, denominator = (0.5 * q[:, t, :, :, None] * memory).sum(2).split([6, 1], -1)
        torch.testing.assert_close(o[:, t], numerator / denominator.abs().clamp_min(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(true_units(final), memory, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [1, 15, 100])
def test_chunk_torch_fp64(T):
    inputs, upstream = mlstm_inputs(2, T, 2, 16, 8, num_states=2, seed=T)
    expected = run(naive_recurrent_mlstm, inputs, upstream, torch.float64, "cpu")
    assert_matches(run(chunk_mlstm, inputs, upstream, torch.float64, "cpu"), expected, 1e-10)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_chunk_fp32_cu_seqlens(kernels, monkeypatch, nan_buffers):
    monkeypatch.setenv("BATON_KERNELS", kernels)
    inputs, upstream = mlstm_inputs(1, PACKED_T, 2, 16, 16, num_states=NUM_DOCS)
    expected = run(naive_recurrent_mlstm, inputs, upstream, torch.float64, "cpu", CU_SEQLENS)
    assert_matches(run(chunk_mlstm, inputs, upstream, torch.float32, "cpu", CU_SEQLENS), expected, 2e-4)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fused_recurrent_cu_seqlens(kernels, monkeypatch):
    monkeypatch.setenv("BATON_KERNELS", kernels)
    inputs, upstream = mlstm_inputs(1, PACKED_T, 2, 16, 16, num_states=NUM_DOCS, seed=1)
    expected = run(naive_recurrent_mlstm, inputs, upstream, torch.float64, "cpu", CU_SEQLENS)
    assert_matches(run(fused_recurrent_mlstm, inputs, upstream, torch.float32, "cpu", CU_SEQLENS), expected, 2e-4)


def test_input_gates_past_fp32s_range_stay_finite_and_exact():
    """exp(i) up to e^150 (fp32 overflows at e^88): the stabilised fp32 op still matches fp64, and the final
    state's stabiliser is the largest log-weight, so its memory is O(1). Positive q and k: with signed ones n . q
    may cancel to far below its terms, and h = C^T q / (n . q) is then ill-conditioned in any precision."""
    inputs, upstream = mlstm_inputs(1, PACKED_T, 2, 16, 16, num_states=NUM_DOCS, input_gates=60.0, seed=2)
    inputs["i"] = inputs["i"].clamp(-50, 150)
    inputs["q"], inputs["k"] = inputs["q"].abs(), inputs["k"].abs()
    inputs["initial_state"][..., :-1] = inputs["initial_state"][..., :-1].abs()
    expected = run(naive_recurrent_mlstm, inputs, upstream, torch.float64, "cpu", CU_SEQLENS)
    actual = run(chunk_mlstm, inputs, upstream, torch.float32, "cpu", CU_SEQLENS)
    assert_matches(actual, expected, 2e-4)
    assert actual["final_state"][..., -1].max() > 88 and actual["final_state"][..., :-1].abs().max() < 1e3


def test_state_summary_composes_with_any_initial_state():
    """final(S_0) == combine(transition, S_local, S_0) per sequence in true units (what sequence parallelism
    chains), the empty document's included; and the combine's gradients are the chain's."""
    inputs, _ = mlstm_inputs(1, PACKED_T, 2, 16, 8, num_states=NUM_DOCS, seed=3)
    q, k, v, i, f, s0 = inputs.values()
    local, transition = mlstm_state_summary(k, v, i, f, CU_SEQLENS)
    _, final = naive_recurrent_mlstm(q, k, v, i, f, initial_state=s0, output_final_state=True, cu_seqlens=CU_SEQLENS)
    combined = combine_mlstm_states(transition, local, s0)
    torch.testing.assert_close(true_units(combined), true_units(final), rtol=1e-10, atol=1e-10)
    assert (combined[..., -1] >= local[..., -1]).all()  # the larger stabiliser is kept: nothing scaled above 1
    torch.testing.assert_close(transition[2], torch.ones_like(transition[2]))  # the empty document
    cut = combine_mlstm_states(torch.zeros_like(transition), local, s0)  # a document starts in the slice
    torch.testing.assert_close(cut, local)


def test_bad_shapes_are_refused():
    inputs, _ = mlstm_inputs(1, 10, 2, 8, 4, num_states=1)
    q, k, v, i, f, state = inputs.values()
    with pytest.raises(ValueError, match=r"f must be \[B, T, H\]"):
        chunk_mlstm(q, k, v, i, f[..., None])
    with pytest.raises(ValueError, match=r"initial_state must be \[N, H, K, V\+2\]"):
        chunk_mlstm(q, k, v, i, f, initial_state=state[..., :-1])


@pytest.mark.gpu  # compiled on a GPU (bench.gpu_check), interpreted here
@pytest.mark.usefixtures("nan_buffers")
@pytest.mark.parametrize("index", range(3))
def test_step_kernel_every_candidate_twice(index):
    """The decode step's kernel (no gradients) == the reference, outputs and final state, packed documents with
    initial states and a ragged value block (V = 24), under autotune candidate `index`, launched twice."""
    from kernels.mlstm.fused_recurrent import fused_recurrent_mlstm_triton
    inputs, _ = mlstm_inputs(1, 150, 2, 16, 24, num_states=NUM_DOCS - 1, seed=4)
    cu_seqlens = torch.tensor([0, 5, 70, 70, 71, 150], dtype=torch.int32)
    *gated, state = inputs.values()
    expected = naive_recurrent_mlstm(*gated, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
    fp32 = [x.float() for x in inputs.values()]
    with pinned_config(index):
        first = fused_recurrent_mlstm_triton(*fp32[:5], initial_state=fp32[5], output_final_state=True,
                                             cu_seqlens=cu_seqlens)
        second = fused_recurrent_mlstm_triton(*fp32[:5], initial_state=fp32[5], output_final_state=True,
                                              cu_seqlens=cu_seqlens)
    for a, b, e in zip(first, second, expected):
        assert torch.equal(a, b)
        assert ((a.double() - e).abs().max() / e.abs().max()).item() < 2e-4


def test_decoding_takes_the_step_kernel_and_training_the_gla_form(monkeypatch):
    """On the Triton backend fused_recurrent_mlstm runs its own kernel when no gradient is wanted, and GLA's form
    (differentiable) otherwise; both give the reference's step."""
    import kernels.mlstm.fused_recurrent as step_module
    monkeypatch.setenv("BATON_KERNELS", "triton")
    inputs, _ = mlstm_inputs(3, 1, 2, 16, 24, num_states=3, seed=5)
    q, k, v, i, f, state = (x.float() for x in inputs.values())
    expected, _ = naive_recurrent_mlstm(q, k, v, i, f, initial_state=state)
    with mock.patch.object(step_module, "fused_recurrent_mlstm_triton",
                           wraps=step_module.fused_recurrent_mlstm_triton) as step:
        with torch.no_grad():
            decoded, _ = fused_recurrent_mlstm(q, k, v, i, f, initial_state=state)
        assert step.call_count == 1
        trained, _ = fused_recurrent_mlstm(q.requires_grad_(), k, v, i, f, initial_state=state)
        assert step.call_count == 1 and trained.grad_fn is not None
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trained.detach(), expected, rtol=1e-4, atol=1e-5)
